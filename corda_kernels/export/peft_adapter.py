"""Export as a PEFT LoRA adapter: ``adapter_config.json`` + ``adapter_model.safetensors``.

What: :func:`save_peft_adapter` writes the adapters as a LoRA adapter that
``peft.PeftModel.from_pretrained(residual_base, path)`` loads with the same outputs (row/column
index sets and SiVA's diagonal expanded into dense factors, :func:`dense_factors`), and names the
base it applies to (:func:`adapter_base`). With ``initial=`` (a directory written right after
``apply``) it writes instead the conversion PEFT offers for PiSSA/CorDA: a rank-2r LoRA
``[A | A₀], [B | −B₀]`` that applies to the original, unmodified base weights. DoRA layers add
their magnitude (``lora_magnitude_vector``) and ``use_dora=True``: the converted adapter's adapted
weight ``W + s·(B·A − B₀·A₀)`` equals the residual's ``W' + s·B·A``, so the magnitude is the same.
Why: training,
serving and sharing then go through PEFT's own loaders.

The residual base the adapter applies to is written by :mod:`corda_kernels.export.plain`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Optional

import torch
from torch import nn

from .. import _backend
from ..nn import LowRankLinear
from .plain import adapters

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def dense_factors(layer: LowRankLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT-style dense ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)`` with ``diag`` folded in A."""
    with torch.no_grad():
        A, B = layer.A.detach(), layer.B.detach()
        if layer.diag is not None:
            A = A * layer.diag.detach().unsqueeze(1)
        if layer.col_index is not None:
            dense = A.new_zeros(A.shape[0], layer.in_features)
            dense[:, layer.col_index] = A
            A = dense
        if layer.row_index is not None:
            dense = B.new_zeros(layer.out_features, B.shape[1])
            dense[layer.row_index] = B
            B = dense
        return A.contiguous(), B.contiguous()


# PEFT task types by the model class's suffix (AutoPeftModelFor* needs one to pick the model class).
_TASK_TYPES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


def task_type(model: nn.Module) -> Optional[str]:
    """PEFT's ``task_type`` for ``model``'s class (None when the class name says nothing)."""
    name = type(model).__name__
    return next((task for suffix, task in _TASK_TYPES if name.endswith(suffix)), None)


def _lora_config(
    layers: dict[str, LowRankLinear], base_model_name_or_path: Optional[str], rank_mult: int, task: Optional[str]
):
    try:
        from peft import LoraConfig
    except ImportError as exc:  # pragma: no cover - peft is an optional dependency
        raise ImportError("saving a PEFT adapter needs `pip install peft`") from exc
    ranks = {n: layer.rank * rank_mult for n, layer in layers.items()}
    alphas = {n: layer.scale * ranks[n] for n, layer in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    dropouts = {float(getattr(layer, "dropout", 0.0)) for layer in layers.values()}
    if len(dropouts) > 1:  # PEFT's LoraConfig has one lora_dropout
        _backend.warn(
            f"the adapters use dropouts {sorted(dropouts)}; PEFT's adapter_config.json holds one, written as "
            f"lora_dropout={max(dropouts)}: training the exported adapter will use it on every layer",
            stacklevel=4,
        )
    doras = {bool(getattr(layer, "dora", False)) for layer in layers.values()}
    if len(doras) > 1:  # PEFT's LoraConfig has one use_dora
        names = sorted(n for n, layer in layers.items() if getattr(layer, "dora", False))
        raise ValueError(
            f"save_peft_adapter: layers {names[:3]}{'...' if len(names) > 3 else ''} use DoRA and others do not; "
            "PEFT's adapter_config.json holds one use_dora for every layer"
        )
    return LoraConfig(
        r=r,
        use_dora=doras == {True},
        lora_alpha=alpha,
        target_modules=sorted(layers),
        rank_pattern={n: v for n, v in ranks.items() if v != r},
        alpha_pattern={n: v for n, v in alphas.items() if v != alpha},
        lora_dropout=max(dropouts),
        bias="none",
        init_lora_weights=True,
        base_model_name_or_path=base_model_name_or_path,
        task_type=task,
    )


def _original_id(model: nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def adapter_base(model: nn.Module, layers: dict[str, LowRankLinear], residual_model: Optional[str]) -> Optional[str]:
    """What an adapter without ``initial=`` applies to: ``residual_model`` when given; the original
    model when no layer's base weight was changed (LoRA-style methods: the residual is the
    original); otherwise a value that says what is needed, so PEFT never loads the adapter onto the
    original weights (which would silently give wrong outputs)."""
    if residual_model is not None:
        return os.fspath(residual_model)
    original = _original_id(model)
    if not any(getattr(layer, "base_changed", True) for layer in layers.values()):
        return original
    return f"residual model of {original or type(model).__name__} (save it with corda_kernels.save_residual_model)"


def save_peft_adapter(
    model: nn.Module,
    path: str,
    *,
    base_model_name_or_path: Optional[str] = None,
    initial: Optional[str] = None,
    residual_model: Optional[str] = None,
) -> None:
    """Write a PEFT LoRA adapter of ``model``'s adapters to directory ``path``.

    Writes ``adapter_config.json``, ``adapter_model.safetensors`` (fp32 or the factors' dtype;
    row/column masks and SiVA's diagonal expanded to dense ``lora_A (r, in)`` / ``lora_B (out, r)``;
    DoRA layers' magnitudes as ``lora_magnitude_vector`` with ``use_dora=True``)
    and ``corda_kernels.json`` (what the adapter applies to). Without ``initial`` the adapter
    applies to the residual base (:func:`save_residual_model`); with ``initial`` it is converted,
    as PEFT's ``path_initial_model_for_weight_conversion`` does, to a rank-2r LoRA
    ``[A | A₀], [B | −B₀]`` (scaling kept) that applies to the original base weights.

    Args:
        model: a model adapted by :func:`corda_kernels.apply` (trained or not).
        path: the output directory.
        base_model_name_or_path: the value written to ``adapter_config.json``; overrides the
            defaults below.
        initial: a directory this function wrote right after ``apply`` (the initial adapter);
            the adapter then names the original model.
        residual_model: the directory the residual was or will be saved to (as PEFT resolves it:
            from the working directory or the hub). When not given, ``base_model_name_or_path``
            says that the residual model is needed, never the original id, except for methods that
            left the base weights unchanged (LoRA, asymmetric, Partial-LoRA): loading a CorDA or
            PiSSA adapter onto the original weights would silently give wrong outputs.

    Raises:
        ValueError: ``model`` carries no ``LowRankLinear`` layer, ``initial`` lacks one of its
            layers' factors (saved from another model), or some layers use DoRA and others not.
        ImportError: peft is not installed.
    """
    from safetensors.torch import load_file, save_file

    layers = adapters(model)
    tensors = {}
    for name, layer in layers.items():
        A, B = dense_factors(layer)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.cpu()
        if getattr(layer, "dora", False):  # PEFT's key for DoRA's magnitude (no ".weight")
            tensors[f"base_model.model.{name}.lora_magnitude_vector"] = layer.magnitude.detach().contiguous().cpu()
    if initial is not None:
        start = load_file(os.path.join(initial, ADAPTER_WEIGHTS))
        missing = sorted(k for k in tensors if k not in start)
        if missing:
            raise ValueError(
                f"initial adapter at {initial} lacks {missing[0]} (and {len(missing) - 1} more); "
                "was it saved from this model?"
            )
        for key in [k for k in tensors if ".lora_A." in k or ".lora_B." in k]:
            t0 = start[key].to(tensors[key].dtype)
            tensors[key] = torch.cat([tensors[key], t0], 0) if ".lora_A." in key else torch.cat([tensors[key], -t0], 1)
    if base_model_name_or_path is None:
        base_model_name_or_path = (
            _original_id(model) if initial is not None else adapter_base(model, layers, residual_model)
        )
    config = _lora_config(layers, base_model_name_or_path, 2 if initial is not None else 1, task_type(model))
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    info = {
        "applies_to": "original base" if initial else "residual base",
        "base_model_name_or_path": base_model_name_or_path,
        "original_model": _original_id(model),
        "layers": len(layers),
    }
    with open(os.path.join(path, "corda_kernels.json"), "w") as fh:
        json.dump(info, fh)
