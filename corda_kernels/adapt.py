"""Stage 3, adapt: swap each target linear layer for a :class:`LowRankLinear`.

``apply(model, config, ...)`` runs the stage functions that :func:`~corda_kernels.apply_blockwise`
runs per block too: :func:`select_targets` (which layers, checked; nothing modified yet),
:func:`finished_inits` (stage 2: their decompositions and, with ``quantize=``, the quantized and
refined residuals), :func:`swap_in` (each layer replaced by a ``LowRankLinear`` built from its
finished factors: the frozen residual ``W' = W − scale·B·A`` formed in fp32 from the factors as
stored, then cast once, so the adapted model reproduces the original right after initialization).
If anything fails while swapping, the layers already swapped are put back: the model is left as it
was. What to build comes as one :class:`~corda_kernels.AdaptConfig`.

Several named adapters: ``apply(model, ..., adapter_name="b")`` on a model already adapted adds
adapter ``"b"`` to the same layers (:func:`add_adapter`), decomposing the original weights; the
model-level calls :func:`set_adapter`, :func:`adapter_names` and :func:`adapter_rows` (one adapter
per row of a batch, through the segmented op) go with it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from .config import AdaptConfig
from .decomposition import decompose, plan
from .decomposition.refinement import Quantization, make_quantization, quantize_residuals
from .export.peft_adapter import ADAPTER_WEIGHTS
from .integrations import hf
from .methods import InitMethod, LayerInit
from .nn import LowRankLinear
from .nn.lowrank_linear import BASE_ONLY, adapter_dtype, dense_factors
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


def _adapter_options(init, config: AdaptConfig) -> dict:
    """The adapter's options as ``LowRankLinear`` and its ``add_adapter`` take them."""
    return dict(
        scale=init.scale,
        diag=init.diag,
        row_index=init.row_index,
        col_index=init.col_index,
        trainable=init.trainable,
        dropout=config.dropout,
        autocast_adapter_dtype=config.autocast_adapter_dtype,
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
        **_adapter_options(init, config),
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
    layer.layer_name = name
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
    ranks, alphas = ranks_and_alphas(layers, config)
    quantization = make_quantization(config.quantize, config.quantize_iters)
    if quantization is not None:
        require_bitsandbytes()
        for name, module in layers.items():
            check_quantizable(name, tuple(hf.weight_matrix(module).shape), quantization.fmt)
    return Targets(layers, ranks, alphas, quantization)


def ranks_and_alphas(layers: Mapping[str, nn.Module], config: AdaptConfig) -> tuple[dict, dict]:
    """Each layer's rank and alpha after ``config``'s patterns, checked against its shape."""
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
    return ranks, alphas


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
    adapter_name: Optional[str] = None,
    initial: Optional[str] = None,
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
        adapter_name: the adapter's name (default ``"default"``). On a model that already carries
            corda_kernels adapters, a new name adds a further adapter to the same layers, initialized
            from the original weights (see :func:`add_adapter`); the active adapter stays.
        initial: when adding an adapter to a model whose first adapter is subtractive (CorDA,
            PiSSA, MiLoRA, SiVA: its layers hold the residual), the directory
            :func:`~corda_kernels.save_peft_adapter` wrote right after the first ``apply``: its
            initial factors give back the original weights.
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
            target's ``in_features`` is not a multiple of 64. Adding an adapter: a bad or duplicate
            ``adapter_name``, another target set than the model's adapters, ``quantize`` or
            ``dora``, a merged / quantized / DoRA layer, a residual base without ``initial`` (or an
            ``initial`` without that layer); the message names the layer and the option.
        TypeError: a target's weight is not fp32/fp16/bf16, an alpha or dropout is not a number,
            or a method option is unknown (or given with an already built method); an added
            adapter's factors would have another dtype than the layer's (``autocast_adapter_dtype``).
        FloatingPointError: a target's weight or a covariance holds NaN or Inf.
        ImportError: ``quantize`` without bitsandbytes installed.
        RuntimeError: a single layer's decomposition does not fit in memory, or it failed on
            another rank of ``process_group``.
    """
    config = AdaptConfig.build(config, where="apply", **options)
    if adds_further(model, adapter_name, initial, "apply"):
        return add_adapter(
            model,
            adapter_name,
            config,
            covariances=covariances,
            initial=initial,
            progress=progress,
            process_group=process_group,
            cache_dir=cache_dir,
        )
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
    name_adapter(model, (name for name, _ in swapped), adapter_name)
    hf.forget_gguf_quantization(model)  # GGUF weights were dequantized at load: save and train as plain
    return model


def adds_further(model: nn.Module, adapter_name: Optional[str], initial: Optional[str], where: str) -> bool:
    """Whether ``adapter_name`` adds a further adapter (the model already carries corda_kernels
    adapters); else checks ``adapter_name`` and ``initial`` as a first adapter's."""
    if adapter_name is not None and any(isinstance(m, LowRankLinear) for m in model.modules()):
        return True
    if initial is not None:
        raise ValueError(f"{where}: initial= is for adding a further adapter (adapter_name=) to an adapted model")
    if adapter_name is not None:
        _check_name(adapter_name, where)
    return False


def name_adapter(model: nn.Module, names, adapter_name: Optional[str]) -> None:
    """Name the first adapter of the layers ``names`` (and make it their active one)."""
    if adapter_name is not None:
        for name in names:
            layer = model.get_submodule(name)
            layer.adapter_name = layer.active_adapter = adapter_name


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


# ---------------------------------------------------------------------------------------------
# several named adapters


def _check_name(name, where: str) -> None:
    if not isinstance(name, str) or not name or "." in name or name == BASE_ONLY:
        raise ValueError(
            f"{where}: adapter_name must be a non-empty str without '.' and not {BASE_ONLY!r}, got {name!r}"
        )


def _layers(model: nn.Module, where: str) -> dict[str, LowRankLinear]:
    found = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    if not found:
        raise ValueError(f"{where}: {type(model).__name__} carries no corda_kernels adapters (LowRankLinear layers)")
    return found


def adapter_names(model: nn.Module) -> tuple[str, ...]:
    """The named adapters of ``model``'s corda_kernels layers, the first one first.

    Args:
        model: a model adapted by :func:`apply`.

    Returns:
        The names, in the order per-row indices refer to them (:func:`adapter_rows`).

    Raises:
        ValueError: ``model`` carries no adapters, or its layers hold different adapters (the
            message names the first layer that differs).
    """
    layers = _layers(model, "adapter_names")
    first_name, first = next(iter(layers.items()))
    names = first.adapter_names
    for name, layer in layers.items():
        if layer.adapter_names != names:
            raise ValueError(
                f"adapter_names: layer {name} holds adapters {list(layer.adapter_names)}, layer {first_name} "
                f"{list(names)}"
            )
    return names


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make adapter ``name`` the active one of every corda_kernels layer of ``model`` (in place).

    The forward then uses it, and only its trainable factors require grad (as PEFT's
    ``set_adapter``): training with one active adapter trains that adapter.

    Args:
        model: a model adapted by :func:`apply`, with ``name`` among its adapters.
        name: the adapter to activate.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: ``name`` is not one of the model's adapters, or a layer is merged; nothing is
            changed then.
    """
    layers = _layers(model, "set_adapter")
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"set_adapter: unknown adapter {name!r}; the model holds {list(names)}")
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"set_adapter: layer {merged[0]} is merged; unmerge it first")
    for layer in layers.values():
        layer.set_adapter(name)
    return model


@contextlib.contextmanager
def adapter_rows(model: nn.Module, rows: Union[Sequence[Optional[str]], torch.Tensor]) -> Iterator[nn.Module]:
    """Within the block, each row of the batch runs its own adapter, in one call per layer.

    ``with adapter_rows(model, ["a", None, "b"]): model(**batch)`` runs sequence 0 with adapter
    ``"a"``, sequence 1 on the base alone and sequence 2 with ``"b"``: every corda_kernels layer
    runs the segmented op (one base GEMM, rows grouped by adapter), whose outputs per row equal
    each adapter's alone. Gradients reach every used adapter's trainable factors; dropout is not
    applied (training mode with dropout is refused).

    Args:
        model: a model adapted by :func:`apply` with one or more named adapters.
        rows: one adapter name per sequence (``None`` or ``"__base__"``: the base alone), or an
            int64 / int32 tensor indexing :func:`adapter_names` (-1: the base alone) of shape
            ``(batch,)`` (per sequence) or ``(batch, seq)`` (per token); its rows must match the
            batch each layer sees.

    Returns:
        A context manager yielding ``model``.

    Raises:
        ValueError: an unknown adapter name, an index out of ``[-1, n)``, a tensor of another
            shape than the batch's (at the forward: the message names the layer), a merged layer.
        TypeError: ``rows`` is neither a list of names nor an int64/int32 tensor.
    """
    layers = _layers(model, "adapter_rows")
    names = adapter_names(model)
    if isinstance(rows, torch.Tensor):
        if rows.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"adapter_rows: an adapter index tensor must be int64 or int32, got {rows.dtype}")
        if rows.dim() not in (1, 2):
            raise ValueError(
                f"adapter_rows: an adapter index tensor is (batch,) or (batch, seq), got shape {tuple(rows.shape)}"
            )
        if rows.numel():
            lo, hi = (int(v) for v in torch.aminmax(rows))
            if lo < -1 or hi >= len(names):
                raise ValueError(
                    f"adapter_rows: the index holds {lo if lo < -1 else hi}, out of range for the adapters "
                    f"{list(names)} (0..{len(names) - 1}, or -1 for the base alone)"
                )
        index = rows
    elif isinstance(rows, (list, tuple)):
        slots = {n: i for i, n in enumerate(names)}
        unknown = [r for r in rows if r is not None and r != BASE_ONLY and r not in slots]
        if unknown:
            raise ValueError(
                f"adapter_rows: unknown adapter {unknown[0]!r}; the model holds {list(names)} "
                f"(None or {BASE_ONLY!r}: the base alone)"
            )
        index = torch.tensor([-1 if r is None or r == BASE_ONLY else slots[r] for r in rows], dtype=torch.int64)
    else:
        raise TypeError(
            f"adapter_rows: rows must be a list of adapter names or an int tensor, got {type(rows).__name__}"
        )
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"adapter_rows: layer {merged[0]} is merged; unmerge it to run one adapter per row")
    on_device: dict = {}
    try:
        for name, layer in layers.items():
            device = layer.weight.device
            if device not in on_device:
                on_device[device] = index.to(device)
            layer.__dict__["_corda_kernels_rows"] = on_device[device]
            layer.__dict__.setdefault("layer_name", name)
        yield model
    finally:
        for layer in layers.values():
            layer.__dict__.pop("_corda_kernels_rows", None)


def _initial_factors(initial: Optional[str], layers: Mapping[str, LowRankLinear], where: str = "apply") -> dict:
    """``{layer: (A0, B0)}`` for the layers whose base is their first adapter's residual, read from
    ``initial`` (a directory :func:`~corda_kernels.save_peft_adapter` wrote right after ``apply``)."""
    need = [
        n for n, layer in layers.items() if getattr(layer, "base_changed", False) and getattr(layer, "A0", None) is None
    ]
    if not need:
        return {}
    if initial is None:
        first = layers[need[0]]
        raise ValueError(
            f"{where}: layer {need[0]} holds adapter {first.adapter_name!r}'s residual W - s*B0*A0 (a subtractive "
            "method), not the original weight; pass initial= (the directory save_peft_adapter wrote right after "
            "the first apply) so the original weights can be restored for the new adapter"
        )
    from safetensors.torch import load_file

    path = os.path.join(os.fspath(initial), ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise ValueError(f"{where}: initial={initial!r} holds no {ADAPTER_WEIGHTS} (written by save_peft_adapter)")
    start = load_file(path)
    out = {}
    for name in need:
        keys = (f"base_model.model.{name}.lora_A.weight", f"base_model.model.{name}.lora_B.weight")
        if any(k not in start for k in keys):
            raise ValueError(
                f"{where}: initial={initial!r} has no factors for layer {name} (saved from another model?)"
            )
        layer = layers[name]
        A0, B0 = (start[k].to(layer.weight.device) for k in keys)
        if tuple(A0.shape) != (A0.shape[0], layer.in_features) or tuple(B0.shape) != (layer.out_features, A0.shape[0]):
            raise ValueError(
                f"{where}: initial={initial!r}: layer {name}'s factors {tuple(A0.shape)}, {tuple(B0.shape)} do not fit "
                f"its weight ({layer.out_features}, {layer.in_features})"
            )
        out[name] = (A0, B0)
    return out


def _original_linear(layer: LowRankLinear, initial: Optional[tuple]) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``layer``'s original weight (the residual plus its first
    adapter's initial ``s·B0·A0`` when given) and bias: what the new adapter is decomposed from."""
    weight = layer.weight.detach()
    if initial is not None:
        with torch.no_grad():
            weight = (weight.float() + layer._initial_delta(*initial)).to(weight.dtype)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
    return linear


def _initial_of(layer: LowRankLinear, init: LayerInit, config: AdaptConfig) -> tuple:
    """A subtractive adapter's dense initial factors, from its factors rounded as the layer will
    store them (so ``B·A − B0·A0`` is exactly zero at init)."""
    train = adapter_dtype(layer.weight.dtype, config.autocast_adapter_dtype)
    A, B, diag = (
        None if t is None else t.to(train if name in init.trainable else layer.weight.dtype)
        for name, t in (("A", init.A), ("B", init.B), ("diag", init.diag))
    )
    sparsity = {"diag": diag, "row_index": init.row_index, "col_index": init.col_index}
    with torch.no_grad():
        return dense_factors(A, B, layer.out_features, layer.in_features, **sparsity)


class Further(NamedTuple):
    """A further adapter, checked before anything changes (:func:`plan_further`): its name, the
    model's adapted layers with each one's rank and alpha after the patterns (``targets``), and the
    initial factors ``(A0, B0)`` of the layers whose base is their first adapter's residual."""

    name: str
    layers: dict
    starts: dict
    targets: Targets


def plan_further(
    model: nn.Module, adapter_name: str, config: AdaptConfig, initial: Optional[str], where: str
) -> Further:
    """The checks of a further adapter, shared by :func:`add_adapter` and
    :func:`~corda_kernels.apply_blockwise`: the name, the targets (the model's adapted layers),
    ``quantize`` / ``dora``, each layer's state and adapter dtype, ranks and alphas, and the
    initial factors read from ``initial``. Touches no module."""
    _check_name(adapter_name, where)
    layers = _layers(model, where)
    if config.quantize is not None or config.dora:
        option = f"quantize={config.quantize!r}" if config.quantize is not None else "dora=True"
        raise ValueError(
            f"{where}: {option} cannot be used for a further adapter (several adapters share a dense base)"
        )
    if config.target_modules is not None or config.exclude_modules is not None:
        chosen = {
            n
            for n in layers
            if (config.target_modules is None or hf.matches(n, config.target_modules))
            and (config.exclude_modules is None or not hf.matches(n, config.exclude_modules))
        }
        differ = sorted(set(layers) ^ chosen)
        if differ:
            what = "is not one of" if differ[0] in chosen else "is left out of"
            raise ValueError(
                f"{where}: layer {differ[0]} {what} the model's adapted layers under target_modules="
                f"{config.target_modules!r}, exclude_modules={config.exclude_modules!r}: a further adapter goes on the "
                f"same {len(layers)} layers as the first"
            )
    for name, layer in layers.items():
        layer.__dict__.setdefault("layer_name", name)
        layer._check_addable(adapter_name, f"{where}: layer {name}")
        train = LowRankLinear._train_dtype(layer)
        new = adapter_dtype(layer.weight.dtype, config.autocast_adapter_dtype)
        if train is not None and train != new:
            raise TypeError(
                f"{where}: layer {name}: adapters of mixed dtypes: its adapters' trainable factors are {train}, "
                f"the new adapter's would be {new} (autocast_adapter_dtype={config.autocast_adapter_dtype})"
            )
    starts = _initial_factors(initial, layers, where)
    ranks, alphas = ranks_and_alphas(layers, config)
    return Further(adapter_name, layers, starts, Targets(layers, ranks, alphas, None))


@contextlib.contextmanager
def originals_in(model: nn.Module, further: Further, names) -> Iterator[Targets]:
    """Within the block, the layers ``names`` are plain linears holding their original weights
    (:func:`_original_linear`): the model computes the original there, e.g. for calibration or
    Partial-LoRA's few-shot measure. Yields ``further.targets`` on those linears (what
    :func:`finished_inits` decomposes); the adapted layers are put back on exit."""
    originals = {name: _original_linear(further.layers[name], further.starts.get(name)) for name in names}
    swapped = []
    try:
        for name, linear in originals.items():
            hf.set_submodule(model, name, linear)
            swapped.append((name, further.layers[name]))
        yield further.targets._replace(layers=originals)
    finally:
        restore(model, swapped)


def add_finished(further: Further, inits: Mapping[str, LayerInit], config: AdaptConfig, done: list) -> None:
    """Add the further adapter to each layer of ``inits`` from its finished init, turning a residual
    base back into the original first (:meth:`LowRankLinear.use_original_base`). Appends
    ``(name, converted)`` to ``done`` before changing a layer, for :func:`remove_added`."""
    for name, init in inits.items():
        layer = further.layers[name]
        converted = name in further.starts
        if converted:
            layer.use_original_base(*further.starts[name])
        done.append((name, converted))
        start = _initial_of(layer, init, config) if init.subtract else None
        layer.add_adapter(further.name, init.A, init.B, initial=start, **_adapter_options(init, config))


def remove_added(further: Further, done: Sequence[tuple[str, bool]]) -> None:
    """Undo :func:`add_finished` for the layers in ``done``, last first: the new adapter deleted and a
    converted layer's residual base restored (:meth:`LowRankLinear.restore_residual_base`)."""
    for name, converted in reversed(done):
        layer = further.layers[name]
        if further.name in layer.adapter_names:
            layer.delete_adapter(further.name)
        if converted:
            layer.restore_residual_base()


def add_adapter(
    model: nn.Module,
    adapter_name: str,
    config: Union[AdaptConfig, str, InitMethod] = "corda",
    *,
    covariances=None,
    initial: Optional[str] = None,
    progress: bool = True,
    process_group=None,
    cache_dir: Optional[str] = None,
    **options,
) -> nn.Module:
    """Add adapter ``adapter_name`` to every corda_kernels layer of ``model`` (what
    ``apply(model, ..., adapter_name=...)`` runs on an adapted model); all or nothing.

    The new adapter is initialized from the original weights (the model's plain forward is the
    original's while it decomposes, e.g. for Partial-LoRA's few-shot measure): a layer whose weight
    is its first adapter's residual gets the original back as ``W' + s·B0·A0`` from ``initial``
    and keeps ``A0``, ``B0`` frozen (:meth:`LowRankLinear.use_original_base`); a subtractive new
    adapter keeps its own initial factors the same way, so every adapter computes
    ``s·(B·A − B0·A0)`` on the shared ``W`` and reproduces the original at init. The active adapter
    does not change; the new one's factors require grad once it is set (:func:`set_adapter`).
    Targets must be the layers the model's adapters are on (``target_modules`` / ``exclude_modules``
    may name them again); ``quantize`` and ``dora`` are refused.
    """
    where = f"apply(adapter_name={adapter_name!r})"
    config = AdaptConfig.build(config, where=where, **options)
    further = plan_further(model, adapter_name, config, initial, where)
    method: InitMethod = config.make_method()
    with originals_in(model, further, further.layers) as targets:
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
    del targets  # the rebuilt original weights
    done: list[tuple[str, bool]] = []
    try:
        add_finished(further, inits, config, done)
    except BaseException:
        remove_added(further, done)
        raise
    return model
