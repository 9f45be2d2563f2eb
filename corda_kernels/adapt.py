"""Stage 3, adapt: swap each target linear layer for a :class:`LowRankLinear`.

``apply(model, method, ...)`` finds the targets, decomposes them (nothing is modified until every
layer's factors exist), then replaces each layer by a ``LowRankLinear`` holding the frozen
residual ``W' = W − scale·B·A`` (formed in fp32 from the factors as stored, then cast once, so the
adapted model reproduces the original right after initialization) and the trainable factors.
If anything fails while swapping, the layers already swapped are put back: the model is left as it
was. With ``quantize="nf4"|"int8"`` the residual is then stored quantized (bitsandbytes' formats,
:mod:`corda_kernels.decomposition.quantized`), the adapters stay in full precision.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .decomposition import decompose, plan
from .decomposition.quantized import Quantization, damped, make_quantization, quantize_residual
from .integrations import hf
from .methods import InitMethod, LayerInit, make_method
from .nn import LowRankLinear
from .ops.lowrank_linear import check_dropout
from .ops.quantized import check_quantizable, quantize_weight, require_bitsandbytes


def pattern_value(pattern: Optional[Mapping[str, float]], name: str, default):
    """PEFT's rank/alpha_pattern lookup: the first key matching the end of the module name."""
    return pattern_entry(pattern, name, default)[1]


def pattern_entry(pattern: Optional[Mapping[str, float]], name: str, default):
    """``(key, value)`` of the first ``pattern`` key matching the end of ``name``; ``(None, default)``."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return key, value
    return None, default


def refuse_adapted(model: nn.Module) -> None:
    hf.refuse_adapted(model, "apply")


def refuse_tied(model: nn.Module, targets: Mapping[str, nn.Module]) -> None:
    owners: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname)
    for name, module in targets.items():
        names = owners.get(id(module.weight), [])
        others = [n for n in names if n != f"{name}.weight"]
        if others:
            raise ValueError(
                f"layer {name}'s weight is tied to {others[0]}; replacing it by a residual would change that module "
                "too. Exclude the layer (exclude_modules) or untie the weights first"
            )


def build_module(
    module: nn.Module,
    init: LayerInit,
    dropout: float,
    autocast_adapter_dtype: bool = True,
    quantization: Optional[Quantization] = None,
    covariance: Optional[torch.Tensor] = None,
    name: str = "",
    on_iteration=None,
) -> LowRankLinear:
    """A ``LowRankLinear`` for ``module`` with ``init``'s factors and the residual weight.

    The factors are stored as :class:`LowRankLinear` stores them (trainable ones fp32 on a 16-bit
    base unless ``autocast_adapter_dtype`` is False); the residual subtracts the update the forward
    computes (``A``, ``B`` rounded to the weight's dtype), so the model reproduces the original. The
    residual is then quantized per ``quantization`` (``covariance``: the layer's input covariance,
    CorDA's refinement metric; ``on_iteration(t, error)``: called after each refinement)."""
    weight = hf.weight_matrix(module).detach()
    dtype = weight.dtype
    layer = LowRankLinear(
        weight.clone() if init.subtract else weight.contiguous(),
        init.A,
        init.B,
        bias=module.bias.detach() if module.bias is not None else None,
        scale=init.scale,
        diag=init.diag,
        row_index=init.row_index,
        col_index=init.col_index,
        trainable=init.trainable,
        dropout=dropout,
        autocast_adapter_dtype=autocast_adapter_dtype,
    )
    if init.subtract:
        with torch.no_grad():
            residual = weight.float() - layer.delta_weight(as_computed=True)
            layer.weight.copy_(residual.to(dtype))
    layer.source_layout = "conv1d" if hf.is_conv1d(module) else "linear"
    layer.base_changed = bool(init.subtract)  # the frozen weight is a residual, not the original
    layer.init_stats = dict(init.stats)
    if quantization is not None:
        _quantize_layer(layer, weight, init, quantization, covariance, name, on_iteration)
    return layer


@torch.no_grad()
def _quantize_layer(
    layer, weight, init: LayerInit, quantization: Quantization, covariance, name, on_iteration=None
) -> None:
    if not quantization.iters:
        layer.quantize_base(quantize_weight(layer.weight, quantization.fmt, name))
        return
    if not init.subtract or init.diag is not None or init.row_index is not None or init.col_index is not None:
        raise ValueError(
            f"layer {name}: quantize_iters refits dense factors B·A to W − Q; this method's adapter "
            "(no residual, a diagonal or feature indices) does not allow it"
        )
    C = None if covariance is None else damped(covariance, init.stats.get("damp", 0.0))
    Q, A, B, errors = quantize_residual(
        weight.float(), init.A, init.B, init.scale, weight.dtype, quantization, C, name, on_iteration
    )
    layer.A.copy_(A)
    layer.B.copy_(B)
    layer.quantize_base(Q)
    layer.init_stats["quantization_errors"] = errors


def apply(
    model: nn.Module,
    method="corda",
    *,
    rank: int = 8,
    alpha: Optional[float] = None,
    covariances=None,
    target_modules: hf.TargetSpec = None,
    exclude_modules: hf.TargetSpec = None,
    rank_pattern: Optional[Mapping[str, int]] = None,
    alpha_pattern: Optional[Mapping[str, float]] = None,
    use_rslora: bool = False,
    dropout: float = 0.0,
    seed: int = 0,
    max_batch_bytes: Optional[int] = None,
    progress: bool = True,
    process_group=None,
    cache_dir: Optional[str] = None,
    autocast_adapter_dtype: bool = True,
    quantize: Optional[str] = None,
    quantize_iters: int = 0,
    **method_options,
) -> nn.Module:
    """Initialize adapters with ``method`` and swap them into ``model`` (in place; returns it).

    Every target is decomposed first (layers of one shape as a batch, under a memory bound); only
    then is each replaced by a :class:`~corda_kernels.LowRankLinear` holding the frozen residual
    ``W' = W − s·B·A`` and the factors. A failure leaves the model as it was. Afterwards only the
    adapters' trainable factors require grad. A model loaded from GGUF by transformers has its
    quantization marks dropped, so ``save_pretrained`` and HF ``Trainer`` accept it.

    Args:
        model: a Hugging Face model (or any module with linear layers), without adapters.
        method: ``"corda"`` (options ``mode="ipa"|"kpa"``, ``damp``, ``svd``), ``"pissa"`` (``svd``),
            ``"milora"``, ``"lora"``, ``"asymmetric"``, ``"siva"`` (``perc``), ``"partial_lora"``
            (``few_shot``, ``margin``, ``score``, ``metric``, ``densities``), or an
            :class:`~corda_kernels.methods.InitMethod`; see the methods page for what each trains.
        rank: adapter rank ``r`` (a positive int, at most the layer's smaller dimension).
        alpha: LoRA alpha (scaling ``alpha / rank``); defaults to ``rank`` (scaling 1, as the CorDA
            and PiSSA papers use; PEFT's default is 8). Must be positive and finite.
        covariances: the :class:`~corda_kernels.Calibration` CorDA needs; its layers are the
            default targets.
        target_modules: names (suffix match) or a regex (full match), as PEFT takes them; default:
            the calibrated layers, else every linear layer in the block stacks.
        exclude_modules: names or a regex of layers to leave out.
        rank_pattern: per-layer rank overrides, PEFT semantics (first key matching the end of the
            layer name).
        alpha_pattern: per-layer alpha overrides, as ``rank_pattern``.
        use_rslora: scaling ``alpha / sqrt(rank)`` (rank-stabilized LoRA).
        dropout: dropout probability in [0, 1) on the adapter input while training.
        seed: seed of randomized decompositions and random initializations.
        max_batch_bytes: working-set bound of one decomposition chunk (default: a quarter of free
            GPU memory, 2 GiB on CPU).
        progress: show a tqdm bar over layers.
        process_group: decompose the layers sharded across a ``torch.distributed`` group and
            broadcast the factors, so every rank builds the same adapters (see
            :func:`corda_kernels.decompose`; default: the default group when initialized,
            every rank must call; False for one process).
        cache_dir: a directory caching each layer's decomposition (see
            :mod:`corda_kernels.decomposition.cache`): layers whose weights, covariance and
            settings are unchanged are read back, not decomposed again.
        autocast_adapter_dtype: on a bf16/fp16 model, store the trainable factors in fp32 (default,
            as PEFT) so optimizers update them at full precision; False keeps the model's dtype.
        quantize: ``"nf4"`` (bitsandbytes NF4, block 64, double quantization) or ``"int8"``
            (row-wise, as ``Linear8bitLt``): decompose in full precision, then store each frozen
            residual quantized; the adapters stay in full precision. Needs bitsandbytes.
        quantize_iters: LoftQ-style refinements of factors and quantized residual (CorDA: in its
            covariance-weighted metric; others: Frobenius); the best iterate is kept. An integer in
            ``[0, 100]`` (:data:`~corda_kernels.decomposition.quantized.MAX_QUANTIZE_ITERS`; the error
            stops improving after a few); a progress bar counts the refinements.
        **method_options: the method's own options (listed under ``method``).

    Returns:
        ``model`` itself, its targets replaced by ``LowRankLinear`` layers.

    Raises:
        ValueError: an unknown method or method option value; CorDA without ``covariances``, or
            covariances of another model, all zero or not damped into positive definite; a rank,
            alpha, dropout, ``quantize`` or ``quantize_iters`` value out of range; the model already carries adapters
            (ours or PEFT's) or sits on the ``meta`` device; ``target_modules`` matches nothing; a
            target's weight is tied to another module; an NF4 target's ``in_features`` is not a
            multiple of 64.
        TypeError: a target's weight is not fp32/fp16/bf16, an alpha or dropout is not a number,
            or a method option is unknown (or given with an already built method).
        FloatingPointError: a target's weight or a covariance holds NaN or Inf.
        ImportError: ``quantize`` without bitsandbytes installed.
        RuntimeError: a single layer's decomposition does not fit in memory, or it failed on
            another rank of ``process_group``.
    """
    method: InitMethod = make_method(method, **method_options)
    check_dropout(dropout, "apply")
    refuse_adapted(model)
    if target_modules is None and covariances is not None and hasattr(covariances, "groups"):
        target_modules = list(covariances.groups)
    targets, ranks, alphas = prepare_targets(
        model, target_modules, exclude_modules, rank, alpha, rank_pattern, alpha_pattern
    )
    quantization = check_quantization(targets, quantize, quantize_iters)
    method.prepare(model, targets)
    inits = decompose(
        targets,
        method,
        ranks=ranks,
        alphas=alphas,
        use_rslora=use_rslora,
        covariances=covariances,
        seed=seed,
        max_batch_bytes=max_batch_bytes,
        progress=progress,
        process_group=process_group,
        cache_dir=cache_dir,
    )
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    swapped = swap_in(
        model,
        targets,
        inits,
        dropout,
        autocast_adapter_dtype,
        quantization,
        covariances if method.needs_covariance else None,
        progress=progress,
    )
    try:
        freeze_all_but_adapters(model)
    except BaseException:  # e.g. Ctrl-C: all or nothing
        restore(model, swapped)
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)
        raise
    hf.forget_gguf_quantization(model)  # GGUF weights were dequantized at load: save and train as plain
    return model


def check_quantization(targets: Mapping[str, nn.Module], quantize, quantize_iters) -> Optional[Quantization]:
    """The quantization asked for, after checking bitsandbytes is there and every target's shape fits
    (before anything is decomposed or modified)."""
    quantization = make_quantization(quantize, quantize_iters)
    if quantization is not None:
        require_bitsandbytes()
        for name, module in targets.items():
            check_quantizable(name, tuple(hf.weight_matrix(module).shape), quantization.fmt)
    return quantization


def prepare_targets(model, target_modules, exclude_modules, rank, alpha, rank_pattern, alpha_pattern):
    """``(targets, ranks, alphas)``: the layers to adapt, each checked (float weight, not tied, rank
    within its shape), with its rank and alpha after ``rank_pattern`` / ``alpha_pattern``."""
    targets = hf.find_targets(model, target_modules, exclude_modules)
    for name, module in targets.items():
        hf.check_adaptable(name, module)
    hf.refuse_meta(model, targets, "apply")
    hf.check_finite_parameters(((f"{n}.weight", m.weight) for n, m in targets.items()), "apply")
    refuse_tied(model, targets)
    ranks, alphas = {}, {}
    for name, module in targets.items():
        key, ranks[name] = pattern_entry(rank_pattern, name, rank)
        try:
            plan.check_rank(name, module, ranks[name])
        except ValueError as exc:
            raise ValueError(f"{exc} (from rank_pattern[{key!r}])" if key is not None else str(exc)) from None
        key, alphas[name] = pattern_entry(alpha_pattern, name, alpha if alpha is not None else ranks[name])
        plan.check_alpha(name, alphas[name], f"alpha_pattern[{key!r}]" if key is not None else "alpha")
    return targets, ranks, alphas


def swap_in(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    inits: Mapping[str, LayerInit],
    dropout: float,
    autocast_adapter_dtype: bool = True,
    quantization: Optional[Quantization] = None,
    covariances=None,
    *,
    progress: bool = False,
) -> list[tuple[str, nn.Module]]:
    """Replace each target by its ``LowRankLinear``; returns ``(name, replaced module)`` pairs (the
    undo log). On any failure the layers already swapped are put back before re-raising.
    ``covariances`` (when quantize_iters refines in CorDA's metric) maps layers to input covariances;
    ``progress``: a bar of the quantize_iters refinements (layers x iterations)."""
    swapped: list[tuple[str, nn.Module]] = []
    refining = quantization is not None and quantization.iters > 0
    bar = tqdm(
        total=len(inits) * quantization.iters if refining else 0,
        desc="refine quantized residuals",
        unit="iter",
        disable=not (progress and refining),
    )

    def on_iteration(t, error):
        bar.update(1)
        bar.set_postfix(error=f"{error:.3g}")

    try:
        for name, init in inits.items():
            old = targets[name]
            cov = None
            if quantization is not None and quantization.iters and covariances is not None:
                in_f = hf.weight_matrix(old).shape[1]
                cov = plan.layer_covariances(covariances, [name], in_f, init.A.device).unique[0]
            layer = build_module(old, init, dropout, autocast_adapter_dtype, quantization, cov, name, on_iteration)
            hf.set_submodule(model, name, layer)
            swapped.append((name, old))
    except BaseException:
        restore(model, swapped)
        raise
    finally:
        bar.close()
    return swapped


def restore(model: nn.Module, swapped: list[tuple[str, nn.Module]]) -> None:
    """Undo :func:`swap_in`: put the replaced modules back, last first."""
    for name, old in reversed(swapped):
        hf.set_submodule(model, name, old)


def freeze_all_but_adapters(model: nn.Module) -> None:
    """Like PEFT: only the adapters' trainable factors keep ``requires_grad``."""
    keep = {id(p) for m in model.modules() if isinstance(m, LowRankLinear) for p in m.parameters() if p.requires_grad}
    for param in model.parameters():
        if id(param) not in keep:
            param.requires_grad_(False)
