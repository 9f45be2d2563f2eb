"""Stage 3, adapt: swap each target linear layer for a :class:`LowRankLinear`.

``apply(model, config, ...)`` runs the stage functions that :func:`~corda_kernels.apply_blockwise`
runs per block too: :func:`select_targets` (which layers, checked; nothing modified yet),
:func:`finished_inits` (stage 2: their decompositions and, with ``quantize=``, the quantized and
refined residuals), :func:`swap_in` (each layer replaced by a ``LowRankLinear`` built from its
finished factors: the frozen residual ``W' = W − scale·B·A`` formed in fp32 from the factors as
stored, then cast once, so the adapted model reproduces the original right after initialization).
If anything fails while swapping, the layers already swapped are put back: the model is left as it
was. What to build comes as one :class:`~corda_kernels.AdaptConfig`.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Union

import torch
from torch import nn

from .config import AdaptConfig
from .decomposition import decompose, plan
from .decomposition.refinement import Quantization, make_quantization, quantize_residuals
from .integrations import hf
from .methods import InitMethod, LayerInit
from .nn import LowRankLinear
from .ops.quantized import check_quantizable, require_bitsandbytes


def refuse_adapted(model: nn.Module, where: str = "apply") -> None:
    hf.refuse_adapted(model, where)


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


def build_module(module: nn.Module, init: LayerInit, config: AdaptConfig, name: str = "") -> LowRankLinear:
    """A ``LowRankLinear`` for ``module`` from its finished ``init``.

    The factors are stored as :class:`LowRankLinear` stores them (trainable ones fp32 on a 16-bit
    base unless ``config.autocast_adapter_dtype`` is False). The frozen base is ``init.residual``
    when decomposition formed it (a quantized residual), else the residual subtracting the update
    the forward computes (``A``, ``B`` rounded to the weight's dtype), so the model reproduces the
    original, or the weight itself for methods without a residual. With ``config.dora`` the layer
    gets a DoRA magnitude equal to its adapted weight's row norms (output unchanged)."""
    weight = hf.weight_matrix(module).detach()
    dtype = weight.dtype
    formed = init.residual is not None
    layer = LowRankLinear(
        weight.clone() if init.subtract and not formed else weight.contiguous(),
        init.A,
        init.B,
        bias=module.bias.detach() if module.bias is not None else None,
        scale=init.scale,
        diag=init.diag,
        row_index=init.row_index,
        col_index=init.col_index,
        trainable=init.trainable,
        dropout=config.dropout,
        autocast_adapter_dtype=config.autocast_adapter_dtype,
    )
    if formed:
        layer.quantize_base(init.residual)
    elif init.subtract:
        with torch.no_grad():
            residual = weight.float() - layer.delta_weight(as_computed=True)
            layer.weight.copy_(residual.to(dtype))
    if config.dora:
        try:
            layer.enable_dora()
        except ValueError as err:
            raise ValueError(f"layer {name}: dora=True: {err}") from None
    layer.source_layout = "conv1d" if hf.is_conv1d(module) else "linear"
    layer.base_changed = bool(init.subtract)  # the frozen weight is a residual, not the original
    layer.init_stats = dict(init.stats)
    return layer


class Targets(NamedTuple):
    """The layers to adapt, each checked, with its rank and alpha after the patterns, and the
    quantization asked for (checked against every target)."""

    layers: dict
    ranks: dict
    alphas: dict
    quantization: Optional[Quantization]


def select_targets(model: nn.Module, config: AdaptConfig, covariances=None, where: str = "apply") -> Targets:
    """Stage 3's first step, shared by :func:`apply` and :func:`~corda_kernels.apply_blockwise`: find
    and check the targets (float weights, not tied, finite, on a real device, ranks within their
    shapes, alphas positive) and the quantization, before anything is decomposed or modified.
    ``covariances``' layers are the default targets."""
    refuse_adapted(model, where)
    target_modules = config.target_modules
    if target_modules is None and covariances is not None and hasattr(covariances, "groups"):
        target_modules = list(covariances.groups)
    layers = hf.find_targets(model, target_modules, config.exclude_modules)
    for name, module in layers.items():
        hf.check_adaptable(name, module)
    hf.refuse_meta(model, layers, where)
    hf.check_finite_parameters(((f"{n}.weight", m.weight) for n, m in layers.items()), where)
    refuse_tied(model, layers)
    ranks, alphas = {}, {}
    for name, module in layers.items():
        key, ranks[name] = hf.pattern_entry(config.rank_pattern, name, config.rank)
        try:
            plan.check_rank(name, module, ranks[name])
        except ValueError as exc:
            raise ValueError(f"{exc} (from rank_pattern[{key!r}])" if key is not None else str(exc)) from None
        default = config.alpha if config.alpha is not None else ranks[name]
        key, alphas[name] = hf.pattern_entry(config.alpha_pattern, name, default)
        plan.check_alpha(name, alphas[name], f"alpha_pattern[{key!r}]" if key is not None else "alpha")
    quantization = make_quantization(config.quantize, config.quantize_iters)
    if quantization is not None:
        require_bitsandbytes()
        for name, module in layers.items():
            check_quantizable(name, tuple(hf.weight_matrix(module).shape), quantization.fmt)
    return Targets(layers, ranks, alphas, quantization)


def finished_inits(
    targets: Targets,
    names,
    method: InitMethod,
    config: AdaptConfig,
    covariances=None,
    *,
    progress: bool = True,
    process_group=None,
    cache_dir: Optional[str] = None,
) -> dict[str, LayerInit]:
    """Stage 2 for the layers ``names`` of ``targets``: their decompositions (batched, cached,
    sharded) and, with quantization, their quantized and refined residuals. Touches no module."""
    layers = {n: targets.layers[n] for n in names}
    inits = decompose(
        layers,
        method,
        ranks=targets.ranks,
        alphas=targets.alphas,
        use_rslora=config.use_rslora,
        covariances=covariances,
        seed=config.seed,
        max_batch_bytes=config.max_batch_bytes,
        progress=progress,
        process_group=process_group,
        cache_dir=cache_dir,
        settings=config.to_dict() if cache_dir is not None else None,
    )
    metric = covariances if method.needs_covariance else None  # CorDA refines in its own metric
    return quantize_residuals(layers, inits, targets.quantization, metric, progress=progress)


def apply(
    model: nn.Module,
    config: Union[AdaptConfig, str, InitMethod] = "corda",
    *,
    covariances=None,
    progress: bool = True,
    process_group=None,
    cache_dir: Optional[str] = None,
    **options,
) -> nn.Module:
    """Initialize adapters as ``config`` says and swap them into ``model`` (in place; returns it).

    Every target is decomposed first (layers of one shape as a batch, under a memory bound); only
    then is each replaced by a :class:`~corda_kernels.LowRankLinear` holding the frozen residual
    ``W' = W − s·B·A`` and the factors. A failure leaves the model as it was. Afterwards only the
    adapters' trainable factors require grad. A model loaded from GGUF by transformers has its
    quantization marks dropped, so ``save_pretrained`` and HF ``Trainer`` accept it.

    ``apply(model, "corda", rank=16, mode="kpa")`` and ``apply(model, AdaptConfig(...))`` are the
    same call: keyword options are :class:`~corda_kernels.AdaptConfig` fields (``rank``, ``alpha``,
    ``target_modules``, ``exclude_modules``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``,
    ``dropout``, ``seed``, ``autocast_adapter_dtype``, ``quantize``, ``quantize_iters``,
    ``max_batch_bytes``, ``dora``) or the method's own options, and override a given config's.

    Args:
        model: a Hugging Face model (or any module with linear layers), without adapters.
        config: an :class:`~corda_kernels.AdaptConfig`, a method name (``"corda"``, ``"pissa"``,
            ``"milora"``, ``"lora"``, ``"asymmetric"``, ``"siva"``, ``"partial_lora"``) or a built
            :class:`~corda_kernels.methods.InitMethod`; see the methods page for what each trains.
        covariances: the :class:`~corda_kernels.Calibration` CorDA needs; its layers are the
            default targets.
        progress: show tqdm bars over layers (and refinements).
        process_group: decompose the layers sharded across a ``torch.distributed`` group and
            broadcast the factors, so every rank builds the same adapters (see
            :func:`corda_kernels.decompose`; default: the default group when initialized,
            every rank must call; False for one process).
        cache_dir: a directory caching each layer's decomposition (see
            :mod:`corda_kernels.decomposition.cache`): layers whose weights, covariance and
            settings are unchanged are read back, not decomposed again.
        **options: :class:`~corda_kernels.AdaptConfig` fields and the method's own options
            (e.g. ``mode="kpa"`` for CorDA).

    Returns:
        ``model`` itself, its targets replaced by ``LowRankLinear`` layers.

    Raises:
        ValueError: an unknown method or method option value; CorDA without ``covariances``, or
            covariances of another model, all zero or not damped into positive definite; a rank,
            alpha, dropout, ``quantize`` or ``quantize_iters`` value out of range; the model
            already carries adapters (ours or PEFT's) or sits on the ``meta`` device;
            ``target_modules`` matches nothing; a target's weight is tied to another module; an NF4
            target's ``in_features`` is not a multiple of 64.
        TypeError: a target's weight is not fp32/fp16/bf16, an alpha or dropout is not a number,
            or a method option is unknown (or given with an already built method).
        FloatingPointError: a target's weight or a covariance holds NaN or Inf.
        ImportError: ``quantize`` without bitsandbytes installed.
        RuntimeError: a single layer's decomposition does not fit in memory, or it failed on
            another rank of ``process_group``.
    """
    config = AdaptConfig.build(config, where="apply", **options)
    method: InitMethod = config.make_method()
    targets = select_targets(model, config, covariances, "apply")
    method.prepare(model, targets.layers)
    inits = finished_inits(
        targets,
        targets.layers,
        method,
        config,
        covariances,
        progress=progress,
        process_group=process_group,
        cache_dir=cache_dir,
    )
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    swapped = swap_in(model, targets.layers, inits, config)
    try:
        freeze_all_but_adapters(model)
    except BaseException:  # e.g. Ctrl-C: all or nothing
        restore(model, swapped)
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)
        raise
    hf.forget_gguf_quantization(model)  # GGUF weights were dequantized at load: save and train as plain
    return model


def swap_in(
    model: nn.Module, targets: Mapping[str, nn.Module], inits: Mapping[str, LayerInit], config: AdaptConfig
) -> list[tuple[str, nn.Module]]:
    """Stage 3's last step: replace each target by its ``LowRankLinear`` built from its finished init;
    returns ``(name, replaced module)`` pairs (the undo log). On any failure the layers already
    swapped are put back before re-raising."""
    swapped: list[tuple[str, nn.Module]] = []
    try:
        for name, init in inits.items():
            old = targets[name]
            hf.set_submodule(model, name, build_module(old, init, config, name))
            swapped.append((name, old))
    except BaseException:
        restore(model, swapped)
        raise
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
