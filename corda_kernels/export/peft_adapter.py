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
from typing import NamedTuple, Optional

import torch
from torch import nn

from .. import _backend
from ..nn import LowRankLinear
from ..nn.lowrank_linear import dense_factors as nn_dense_factors
from ..nn.lowrank_linear import serving_factors, with_initial
from .plain import adapters, chosen_adapter

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def dense_factors(layer: LowRankLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT-style dense ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)`` of the layer's own
    adapter, ``diag`` folded in A (:func:`corda_kernels.nn.lowrank_linear.dense_factors`)."""
    with torch.no_grad():
        sparsity = {"diag": layer.diag, "row_index": layer.row_index, "col_index": layer.col_index}
        A, B = nn_dense_factors(layer.A.detach(), layer.B.detach(), layer.out_features, layer.in_features, **sparsity)
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


class _Spec(NamedTuple):
    """One layer's exported adapter: its rank, scale, dropout and whether it uses DoRA."""

    rank: int
    scale: float
    dropout: float
    dora: bool


def _lora_config(specs: dict[str, _Spec], base_model_name_or_path: Optional[str], task: Optional[str]):
    try:
        from peft import LoraConfig
    except ImportError as exc:  # pragma: no cover - peft is an optional dependency
        raise ImportError("saving a PEFT adapter needs `pip install peft`") from exc
    ranks = {n: spec.rank for n, spec in specs.items()}
    alphas = {n: spec.scale * spec.rank for n, spec in specs.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    dropouts = {spec.dropout for spec in specs.values()}
    if len(dropouts) > 1:  # PEFT's LoraConfig has one lora_dropout
        _backend.warn(
            f"the adapters use dropouts {sorted(dropouts)}; PEFT's adapter_config.json holds one, written as "
            f"lora_dropout={max(dropouts)}: training the exported adapter will use it on every layer",
            stacklevel=4,
        )
    doras = {spec.dora for spec in specs.values()}
    if len(doras) > 1:  # PEFT's LoraConfig has one use_dora
        names = sorted(n for n, spec in specs.items() if spec.dora)
        raise ValueError(
            f"save_peft_adapter: layers {names[:3]}{'...' if len(names) > 3 else ''} use DoRA and others do not; "
            "PEFT's adapter_config.json holds one use_dora for every layer"
        )
    return LoraConfig(
        r=r,
        use_dora=doras == {True},
        lora_alpha=alpha,
        target_modules=sorted(specs),
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
    adapter_name: Optional[str] = None,
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
        adapter_name: with several named adapters (``apply(..., adapter_name=)``), the one to
            write (default: the active one); the layers then hold the original weights and the
            adapter applies to the original base, a subtractive one as its rank ``r + r0`` form
            ``[A | A₀], [B | −B₀]`` (PEFT's ``load_adapter`` takes each under its name).

    Raises:
        ValueError: ``model`` carries no ``LowRankLinear`` layer, ``initial`` lacks one of its
            layers' factors (saved from another model), or some layers use DoRA and others not;
            a layer lacks ``adapter_name``, the layers' active adapters differ (ambiguous), or
            ``initial`` is given with several adapters.
        ImportError: peft is not installed.
    """
    from safetensors.torch import load_file, save_file

    layers = adapters(model)
    chosen = chosen_adapter(layers, adapter_name, "save_peft_adapter")
    if chosen is not None and all(not layer.on_original_base for layer in layers.values()):
        chosen = None  # the layers' own (only) adapter: the usual export
    tensors, specs = {}, {}
    if chosen is not None:  # several named adapters on the original weights
        if initial is not None:
            raise ValueError(
                "save_peft_adapter: initial= converts a residual's adapter; these layers hold the original "
                "weights with several adapters, and each exports for the original base as it is"
            )
        for name, layer in layers.items():
            owner = layer.adapter(chosen)
            with torch.no_grad():
                A, B = serving_factors(owner, layer.out_features, layer.in_features)
            tensors[f"base_model.model.{name}.lora_A.weight"] = A.detach().contiguous().cpu()
            tensors[f"base_model.model.{name}.lora_B.weight"] = B.detach().contiguous().cpu()
            specs[name] = _Spec(A.shape[0], float(owner.scale), float(owner.dropout), False)
    else:
        start = None if initial is None else load_file(os.path.join(initial, ADAPTER_WEIGHTS))
        for name, layer in layers.items():
            A, B = dense_factors(layer)
            keys = (f"base_model.model.{name}.lora_A.weight", f"base_model.model.{name}.lora_B.weight")
            if start is not None:
                if any(k not in start for k in keys):
                    missing = [k for k in keys if k not in start][0]
                    raise ValueError(f"initial adapter at {initial} lacks {missing}; was it saved from this model?")
                A, B = with_initial(A, B, start[keys[0]].to(A.dtype), start[keys[1]].to(B.dtype))
            tensors[keys[0]], tensors[keys[1]] = A.contiguous().cpu(), B.contiguous().cpu()
            if getattr(layer, "dora", False):  # PEFT's key for DoRA's magnitude (no ".weight")
                tensors[f"base_model.model.{name}.lora_magnitude_vector"] = layer.magnitude.detach().contiguous().cpu()
            specs[name] = _Spec(A.shape[0], float(layer.scale), float(getattr(layer, "dropout", 0.0)), layer.dora)
    original = initial is not None or chosen is not None
    if base_model_name_or_path is None:
        base_model_name_or_path = _original_id(model) if original else adapter_base(model, layers, residual_model)
    config = _lora_config(specs, base_model_name_or_path, task_type(model))
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    info = {
        "applies_to": "original base" if original else "residual base",
        "adapter_name": chosen,
        "base_model_name_or_path": base_model_name_or_path,
        "original_model": _original_id(model),
        "layers": len(layers),
    }
    with open(os.path.join(path, "corda_kernels.json"), "w") as fh:
        json.dump(info, fh)
