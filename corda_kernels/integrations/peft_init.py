"""PEFT's LoRA initializations on corda_kernels' batched engine (used by the global PEFT patch).

Each function here replaces one of PEFT 0.21's own and keeps its semantics (what is stored in
``lora_A`` / ``lora_B``, the scaling, the fp32 computation, the residual written back in the base
weight's dtype); see ``peft/tuners/lora/layer.py`` and ``peft/tuners/lora/corda.py``:

- ``pissa_init`` (``"pissa"``, ``"pissa_niter_N"``): the top-r SVD of ``W`` (``W^T`` for a
  ``fan_in_fan_out`` Conv1D), ``A = sqrt(S/s)·Vh_r``, ``B = U_r·sqrt(S/s)``, residual
  ``W − s·B·A`` (``s`` the LoRA scaling). ``"pissa"`` (PEFT: a full fp32 SVD) uses
  :func:`~corda_kernels.linalg.top_singular_triplets`, batched: block Krylov with an acceptance
  test at an fp32 SVD's backward error on wide matrices, the fp64 Gram eigendecomposition and a
  Rayleigh-Ritz step otherwise (figures: ``bench/results/peft-init.md``).
  ``"pissa_niter_N"`` (PEFT: ``torch.svd_lowrank(W, q=r,
  niter=N)``, no oversampling) uses the same N power iterations on a sketch of
  ``r + max(r, NITER_MIN_OVERSAMPLE)`` columns: at least as accurate.
- ``olora_init``: PEFT's ``Q, R = qr(W)``, ``B = Q[:, :r]``, ``A = R[:r]``. The first r columns of
  a Householder QR depend only on the first r columns of ``W``: ``Q_r, R_rr = qr(W[:, :r])`` and
  ``R[:r, r:] = Q_r^T W[:, r:]``, batched (no full QR).
- ``calib_cov_distribution`` / ``collect_eigens`` (``preprocess_corda``): PEFT's covariance
  normalization (each call's input divided by ``|max x|``, summed per call, divided by the number
  of calls) accumulated by :func:`~corda_kernels.ops.covariance_update`, one sum per group of
  layers fed the same input tensor in every call (q/k/v, gate/up: :class:`_SharedInputs`; PEFT
  keeps equal copies); eigens from :func:`~corda_kernels.linalg.co_svd` (``"ipm"`` is our
  ``"ipa"`` with ``svd="top"``, PEFT's full fp32 SVD to the same accuracy; ``"kpm"`` our
  ``"kpa"``), one layer per call on a CPU (same-shape chunks on a GPU), the
  widest covariances last, each covariance dropped once its eigens are stored when PEFT would
  delete it afterwards (``prune_temporary_fields``); only the r kept components stored (PEFT: full
  U, V per layer). Peak memory: ``bench/results/peft-init.md``.
- ``loftq_init`` (``"loftq"``): PEFT's alternation, ``Q = dequant(quant(W − B·A))`` with the same
  bitsandbytes calls (NF4 blocks of 64 without double quantization, or LLM.int8() rows from fp16),
  ``B·A`` the top-r SVD of ``W − Q`` split as ``B = U_r·sqrt(S_r)``, ``A = sqrt(S_r)·Vh_r`` (no
  LoRA scaling, as PEFT), ``loftq_iter`` times; the base weight becomes ``Q``. The SVD is
  :func:`~corda_kernels.linalg.top_singular_triplets`, batched. PEFT computes on ``"cuda"`` (or
  ``"xpu"``) whatever the weight's device, so it fails on a machine without one; ours computes
  there when one is present and the weight is on the CPU, else on the weight's device, and leaves
  the factors on their parameters' device.

Layers are collected while PEFT injects adapters (:func:`collecting`) and run per shape in chunks
of at most :data:`CHUNK_BYTES` (:func:`run_pending`). A layer or option these do not cover runs
PEFT's own function, with one ``corda_kernels.peft`` log line saying why.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from .._measure import release_free_memory
from ..linalg import co_svd, co_svd_shared, randomized_svd, top_singular_triplets
from ..ops.covariance import covariance_update, symmetrize_
from . import hf

logger = logging.getLogger("corda_kernels.peft")

# "pissa_niter_N": our sketch is r + max(r, this) columns wide (PEFT's torch.svd_lowrank: r).
NITER_MIN_OVERSAMPLE = 8
# Largest stack of fp32 weights (times a work factor) decomposed in one batch. Small: batching buys
# little (LAPACK loops over a batch on a CPU) while a large stack's fp64 work space set the peak
# memory of preprocess_corda (bench/studies/peft_corda_memory.py).
CHUNK_BYTES = 64 << 20
_WORK_FACTOR = 3  # the stacked W, its residual and the solver's work space
_LOFTQ_WORK_FACTOR = 6  # W, the residual, Q, W − Q, B·A and the solver's work space
_CORDA_WORK_FACTOR = 16  # fp64 W, C, C_d, its factor, W·C_d, Gram, QR and SVD work space (measured)
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)

_local = threading.local()


@dataclass
class _Job:
    kind: str  # "pissa" | "olora" | "loftq"
    layer: nn.Module
    adapter: str
    niter: Optional[int] = None  # pissa_niter_N
    fallback: Optional[Callable[[], None]] = None  # PEFT's own init of this layer
    loftq: Optional[tuple[int, int]] = None  # (loftq_bits, loftq_iter)


@contextlib.contextmanager
def collecting() -> Iterator[Optional[list]]:
    """Collect the initializations PEFT asks for while the block runs (the outermost block owns the
    list; nested blocks yield ``None``)."""
    if getattr(_local, "pending", None) is not None:
        yield None
        return
    _local.pending = []
    try:
        yield _local.pending
    finally:
        _local.pending = None


def _pending() -> Optional[list]:
    return getattr(_local, "pending", None)


def _label(layer: nn.Module) -> str:
    base = layer.get_base_layer()
    return f"{type(layer).__name__}({type(base).__name__} {tuple(base.weight.shape)})"


def _common_refusal(layer: nn.Module, adapter: str) -> str:
    """Why our engine cannot initialize ``adapter`` of ``layer`` as PEFT would (empty when it can)."""
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        return "its base layer has no 2-D weight"
    if weight.dtype not in _FLOAT:
        return f"its base weight is {weight.dtype} (quantized or integer); PEFT's code handles or rejects it"
    if weight.device.type == "meta" or weight.numel() == 0 or type(weight.data) is not torch.Tensor:
        return "its base weight is not materialized as a plain tensor (meta, sharded or distributed)"
    if adapter in getattr(layer, "lora_variant", {}):
        variant = type(layer.lora_variant[adapter]).__name__
        return f"adapter {adapter!r} uses a LoRA variant ({variant}) whose own init reads the residual"
    if not isinstance(layer.lora_A[adapter], nn.Linear) or not isinstance(layer.lora_B[adapter], nn.Linear):
        return "its LoRA factors are not nn.Linear"
    if "meta" in (layer.lora_A[adapter].weight.device.type, layer.lora_B[adapter].weight.device.type):
        return "its LoRA factors are on the meta device (low_cpu_mem_usage); PEFT's code handles or rejects it"
    if layer.r[adapter] > min(weight.shape):
        return f"r={layer.r[adapter]} exceeds the weight's smaller side {min(weight.shape)}"
    return ""


def _niter(init: Any) -> Optional[int]:
    """N of "pissa_niter_N" (None for "pissa"); raises ValueError for anything else."""
    if init == "pissa":
        return None
    parts = init.split("_niter_") if isinstance(init, str) else []
    if len(parts) == 2 and parts[0] == "pissa" and parts[1].isdigit():
        return int(parts[1])
    raise ValueError(init)


def _defer_or_run(job: _Job) -> None:
    pending = _pending()
    if pending is None:
        run_pending([job])
    else:
        pending.append(job)


def wrap_pissa(original: Callable) -> Callable:
    """``LoraLayer.pissa_init`` on our engine, PEFT's ``original`` for what it does not cover."""

    def pissa_init(self, adapter_name, init_lora_weights):
        try:
            niter = _niter(init_lora_weights)
        except ValueError:
            return original(self, adapter_name, init_lora_weights)  # PEFT's own error
        reason = _common_refusal(self, adapter_name)
        if reason:
            logger.info("PiSSA of %s runs PEFT's own code: %s", _label(self), reason)
            return original(self, adapter_name, init_lora_weights)
        _defer_or_run(_Job("pissa", self, adapter_name, niter, lambda: original(self, adapter_name, init_lora_weights)))

    pissa_init.__wrapped__ = original
    pissa_init.__doc__ = original.__doc__
    return pissa_init


def wrap_olora(original: Callable) -> Callable:
    """``LoraLayer.olora_init`` on our engine, PEFT's ``original`` for what it does not cover."""

    def olora_init(self, adapter_name):
        reason = _common_refusal(self, adapter_name)
        if not reason and getattr(self, "fan_in_fan_out", False):
            reason = "it is fan_in_fan_out (Conv1D); PEFT's OLoRA factors its stored (in, out) weight as is"
        if reason:
            logger.info("OLoRA of %s runs PEFT's own code: %s", _label(self), reason)
            return original(self, adapter_name)
        _defer_or_run(_Job("olora", self, adapter_name, None, lambda: original(self, adapter_name)))

    olora_init.__wrapped__ = original
    olora_init.__doc__ = original.__doc__
    return olora_init


def _loftq_options(config: Any) -> tuple[Optional[tuple[int, int]], str]:
    """``(bits, iters)`` of a LoraConfig's ``loftq_config``, or why PEFT's own code should see it
    (including its own errors: bits other than 4 / 8, iterations below 1, no bitsandbytes)."""
    options = getattr(config, "loftq_config", None)
    if not isinstance(options, dict):
        return None, "its config has no loftq_config dict"
    bits, iters = options.get("loftq_bits"), options.get("loftq_iter")
    if isinstance(bits, bool) or bits not in (4, 8):
        return None, f"loftq_bits={bits!r} is not 4 or 8 (PEFT's own check)"
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        return None, f"loftq_iter={iters!r} is not a positive integer (PEFT's own check)"
    if importlib.util.find_spec("bitsandbytes") is None:
        return None, "bitsandbytes is not installed (PEFT's own error)"
    return (int(bits), int(iters)), ""


def wrap_loftq(original: Callable) -> Callable:
    """``LoraLayer.loftq_init`` on our engine, PEFT's ``original`` for what it does not cover."""

    def loftq_init(self, adapter_name, config=None, *args, **kwargs):
        options, reason = _loftq_options(config)
        if not reason:
            reason = _common_refusal(self, adapter_name)
        if not reason and getattr(self, "fan_in_fan_out", False):
            reason = "it is fan_in_fan_out (Conv1D); PEFT's LoftQ factors its stored (in, out) weight as is"
        if not reason and (args or kwargs):
            reason = "it was called with arguments PEFT 0.21 does not pass"
        if reason:
            logger.info("LoftQ of %s runs PEFT's own code: %s", _label(self), reason)
            return original(self, adapter_name, config, *args, **kwargs)
        fallback = lambda: original(self, adapter_name, config)  # noqa: E731
        _defer_or_run(_Job("loftq", self, adapter_name, None, fallback, options))

    loftq_init.__wrapped__ = original
    loftq_init.__doc__ = original.__doc__
    return loftq_init


# ---------------------------------------------------------------------------------------------
# The batched runs


def _oriented(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as ``(out, in)`` (PEFT's ``transpose(weight, fan_in_fan_out)``)."""
    return weight.T if getattr(layer, "fan_in_fan_out", False) else weight


def _chunks(jobs: list[_Job], shape: torch.Size) -> Iterator[list[_Job]]:
    factor = _LOFTQ_WORK_FACTOR if jobs[0].kind == "loftq" else _WORK_FACTOR
    per = max(1, CHUNK_BYTES // (factor * 4 * shape[0] * shape[1]))
    for i in range(0, len(jobs), per):
        yield jobs[i : i + per]


def _rounds(jobs: list[_Job]) -> list[list[_Job]]:
    """Split jobs so that no round holds one base weight twice (PEFT would initialize the second
    from the first's residual)."""
    rounds: list[list[_Job]] = []
    seen: list[set[int]] = []
    for job in jobs:
        key = id(job.layer.get_base_layer().weight)
        for members, ids in zip(rounds, seen):
            if key not in ids:
                members.append(job)
                ids.add(key)
                break
        else:
            rounds.append([job])
            seen.append({key})
    return rounds


def run_pending(pending: Optional[list]) -> None:
    """Run the collected initializations: one batch per (method, shape, rank, device), chunked."""
    if not pending:
        return
    jobs, pending[:] = list(pending), []
    for members in _rounds(jobs):
        groups: dict[tuple, list[_Job]] = {}
        for job in members:
            base = job.layer.get_base_layer()
            shape = _oriented(job.layer, base.weight).shape
            key = (job.kind, job.niter, job.loftq, tuple(shape), base.weight.device, job.layer.r[job.adapter])
            groups.setdefault(key, []).append(job)
        for (kind, niter, loftq, shape, _, rank), group in groups.items():
            for chunk in _chunks(group, shape):
                try:
                    if kind == "loftq":
                        _run_loftq(chunk, rank, *loftq)
                    else:
                        (_run_pissa if kind == "pissa" else _run_olora)(chunk, rank, niter)
                except Exception as exc:  # never fail where PEFT would not: PEFT's own code per layer
                    logger.info(
                        "%s of %d layers %s runs PEFT's own code: our engine raised %s: %s",
                        kind,
                        len(chunk),
                        tuple(shape),
                        type(exc).__name__,
                        exc,
                    )
                    for job in chunk:
                        job.fallback()


def _stack(chunk: list[_Job]) -> torch.Tensor:
    return torch.stack([_oriented(j.layer, j.layer.get_base_layer().weight.detach()).float() for j in chunk])


def _write(chunk: list[_Job], W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor) -> None:
    """Store ``A``, ``B`` (fp32, PEFT's values before its dtype moves) and the residual ``W − s·B·A``,
    formed in ``W`` (the chunk's stacked copy: no temporaries of its size)."""
    residual = W.baddbmm_(B * scales[:, None, None], A, alpha=-1)
    for i, job in enumerate(chunk):
        layer = job.layer
        base = layer.get_base_layer()
        for module, value in ((layer.lora_A[job.adapter], A[i]), (layer.lora_B[job.adapter], B[i])):
            param = module.weight
            param.data = value.to(device=param.device, dtype=param.dtype).contiguous()
        res = _oriented(layer, residual[i].to(base.weight.dtype))
        base.weight.data = res.contiguous()


def _scales(chunk: list[_Job], device) -> torch.Tensor:
    return torch.tensor([float(j.layer.scaling[j.adapter]) for j in chunk], dtype=torch.float32, device=device)


@torch.no_grad()
def _run_pissa(chunk: list[_Job], rank: int, niter: Optional[int]) -> None:
    W = _stack(chunk)
    seeds = list(range(len(chunk)))
    if niter is None:
        U, S, Vh = top_singular_triplets(W, rank)
    else:
        U, S, Vh = randomized_svd(W, rank, n_iter=niter, oversample=max(rank, NITER_MIN_OVERSAMPLE), seed=seeds)
    scales = _scales(chunk, W.device)
    root = (S / scales[:, None]).sqrt()
    _write(chunk, W, root[..., :, None] * Vh, U * root[..., None, :], scales)


@torch.no_grad()
def _run_olora(chunk: list[_Job], rank: int, niter: Optional[int]) -> None:
    W = _stack(chunk)
    Q, R_rr = torch.linalg.qr(W[..., :rank])
    R = torch.cat([R_rr, Q.mT @ W[..., rank:]], dim=-1)
    _write(chunk, W, R, Q, _scales(chunk, W.device))


def _loftq_device(weight: torch.Tensor) -> torch.device:
    """Where LoftQ computes: PEFT's accelerator when the weight is on the CPU and one is present
    (PEFT: always ``"xpu"`` or ``"cuda"``), else the weight's device."""
    if weight.device.type == "cpu":
        if hasattr(torch, "xpu") and torch.xpu.is_available():
            return torch.device("xpu")
        if torch.cuda.is_available():
            return torch.device("cuda")
    return weight.device


def _dequantized(res: torch.Tensor, bits: int) -> torch.Tensor:
    """PEFT's ``loftq_init`` quantization round trip of one fp32 ``res``, by the same bitsandbytes
    calls: NF4 (blocks of 64, fp32 absmax) or LLM.int8() (row absmax of the fp16 matrix); fp32 out."""
    import bitsandbytes as bnb

    if bits == 4:
        codes, state = bnb.functional.quantize_4bit(
            res.contiguous(), blocksize=64, compress_statistics=False, quant_type="nf4"
        )
        return bnb.functional.dequantize_4bit(codes, state).float()
    codes, row_scales, _ = bnb.functional.int8_vectorwise_quant(res.contiguous().half())
    return bnb.functional.int8_vectorwise_dequant(codes, row_scales).float()


@torch.no_grad()
def _run_loftq(chunk: list[_Job], rank: int, bits: int, iters: int) -> None:
    weights = [j.layer.get_base_layer().weight for j in chunk]
    device = _loftq_device(weights[0])
    W = torch.stack([w.detach().to(device=device, dtype=torch.float32) for w in weights])
    res = W
    for i in range(iters):
        Q = torch.stack([_dequantized(r, bits) for r in res])
        U, S, Vh = top_singular_triplets(W - Q, rank)
        root = S.sqrt()
        B, A = U * root[..., None, :], root[..., :, None] * Vh
        if i + 1 < iters:
            res = W - B @ A
    for i, job in enumerate(chunk):
        layer, weight = job.layer, weights[i]
        for module, value in ((layer.lora_A[job.adapter], A[i]), (layer.lora_B[job.adapter], B[i])):
            module.weight.data = value.to(module.weight.device).contiguous()  # fp32, as PEFT leaves it
        layer.get_base_layer().weight.data = Q[i].to(device=weight.device, dtype=weight.dtype)


# ---------------------------------------------------------------------------------------------
# CorDA: preprocess_corda's covariance and eigens


def corda_functions(original_calib: Callable, original_collect: Callable) -> tuple[Callable, Callable]:
    """Replacements for ``peft.tuners.lora.corda``'s ``calib_cov_distribution`` and ``collect_eigens``."""

    @torch.no_grad()
    def calib_cov_distribution(model, config, run_model, hooked_model, covariance_file):
        corda = importlib.import_module("peft.tuners.lora.corda")
        if covariance_file is not None and os.path.exists(covariance_file) and os.path.getsize(covariance_file) > 0:
            return original_calib(model, config, run_model, hooked_model, covariance_file)
        if run_model is None:
            return original_calib(model, config, run_model, hooked_model, covariance_file)
        if config.corda_config.use_float16_for_covariance:
            logger.info(
                "preprocess_corda: use_float16_for_covariance=True runs PEFT's own covariance code "
                "(our covariance op accumulates in fp32)"
            )
            return original_calib(model, config, run_model, hooked_model, covariance_file)
        if hooked_model is None:
            hooked_model = model
        hooked_model.eval()
        shared = _SharedInputs()

        def hook(module, inputs, output):
            if inputs[0].squeeze(0).dim() == 2:
                shared.call(module, inputs[0])
            else:  # not (tokens, features) after PEFT's squeeze(0): PEFT's own arithmetic and errors
                _peft_hook_sum(module, inputs[0])
            module.sample_count += 1

        handles, hooked = [], []
        for _, module in corda.target_modules(hooked_model, config):
            module.sample_count = 0
            module.covariance_matrix = 0
            handles.append(module.register_forward_hook(hook))
            hooked.append(module)
        try:
            run_model()
            shared.finish()
        finally:
            for handle in handles:
                handle.remove()
            peft_sums = {m: m.__dict__.pop("_ck_peft_sum") for m in hooked if "_ck_peft_sum" in m.__dict__}
        # Layers fed the same input tensor in every call (q/k/v, gate/up) share one covariance
        # object: PEFT's are equal copies.
        for module, acc in shared.accumulators().items():
            module.covariance_matrix = acc
        shared.groups.clear()
        for module, extra in peft_sums.items():  # PEFT's += of the other calls' sums (broadcast), own copy
            module.covariance_matrix = module.covariance_matrix + extra
        release_free_memory()  # the hooks' per-call temporaries (the eigens step's peak sits on top)
        if hooked_model is not model:
            targets = dict(corda.target_modules(model, config))
            for name, module in corda.target_modules(hooked_model, config):
                if name in targets:
                    targets[name].sample_count = module.sample_count
                    targets[name].covariance_matrix = module.covariance_matrix
        divided: set[int] = set()
        for _, module in corda.target_modules(model, config):
            if id(module.covariance_matrix) not in divided:  # a shared covariance once
                divided.add(id(module.covariance_matrix))
                module.covariance_matrix /= module.sample_count
        if covariance_file is not None:
            everything = {name: module.covariance_matrix for name, module in corda.target_modules(model, config)}
            os.makedirs(os.path.dirname(covariance_file), exist_ok=True)
            torch.save(everything, covariance_file)

    @torch.no_grad()
    def collect_eigens(model, config, verbose):
        corda = importlib.import_module("peft.tuners.lora.corda")
        groups: dict[tuple, list[tuple[str, nn.Module]]] = {}
        for name, module in corda.target_modules(model, config):
            reason = _corda_refusal(module)
            if reason:
                logger.info("CorDA eigens of %s run PEFT's own code: %s", name, reason)
                module.eigens = corda.collect_eigens_for_layer(module, config)
                continue
            W = _corda_weight(module)
            key = (tuple(W.shape), W.device, int(module.rank), module.corda_method)
            groups.setdefault(key, []).append((name, module))
        prune = bool(getattr(config.corda_config, "prune_temporary_fields", False))
        for chunk, solve in _corda_batches(groups):
            try:
                results = solve()
            except Exception as exc:  # never fail where PEFT would not: PEFT's own code per layer
                logger.info(
                    "CorDA eigens of %s run PEFT's own code: co_svd raised %s: %s",
                    ", ".join(name for name, _ in chunk),
                    type(exc).__name__,
                    exc,
                )
                for _, module in chunk:
                    module.eigens = corda.collect_eigens_for_layer(module, config)
                continue
            for (_, module), (U, S, V) in zip(chunk, results):
                module.eigens = corda.CordaEigens(S_WC=S, U_WC=U, V_WC=V)
                if prune:
                    del module.covariance_matrix
            del results
            release_free_memory()

    calib_cov_distribution.__wrapped__ = original_calib
    collect_eigens.__wrapped__ = original_collect
    return calib_cov_distribution, collect_eigens


def _peft_scaled(x: torch.Tensor) -> torch.Tensor:
    """PEFT's calibration input: batch dim squeezed, fp32, divided by ``|max x|``, and its error when
    that holds NaN / ±Inf (PEFT's ``isnan`` / ``isinf`` pair read by one ``aminmax``)."""
    x = x.detach().squeeze(0).float()
    x = x / torch.max(x).abs()
    low, high = torch.aminmax(x)  # NaN propagates, ±Inf shows in one
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        raise ValueError("Invalid value found in input, please check your input data.")
    return x


def _peft_hook_sum(module: nn.Module, x: torch.Tensor) -> None:
    """PEFT's calibration hook (its arithmetic and errors) for an input that is not ``(tokens,
    features)`` after its ``squeeze(0)``: a batch of several sequences raises in ``t()``, a single
    vector sums ``x·x`` (a scalar that PEFT's eigens step then rejects); kept in ``_ck_peft_sum``."""
    x = _peft_scaled(x)
    covariance = x.t().matmul(x)
    if torch.isnan(covariance).any() or torch.isinf(covariance).any():
        raise ValueError(
            "Invalid value found in covariance. Please file an issue at https://github.com/huggingface/peft/issues."
        )
    module._ck_peft_sum = getattr(module, "_ck_peft_sum", 0) + covariance


class _Group:
    """Layers whose inputs have been the same tensors so far, and their covariance sum."""

    def __init__(self, members: set, acc: Optional[torch.Tensor] = None):
        self.members = members
        self.acc = acc  # None: nothing summed yet
        self.pending: Optional[torch.Tensor] = None  # the input of the round in progress
        self.version = 0
        self.consumed: set = set()  # members whose call has taken the pending input

    def takes(self, x: torch.Tensor) -> bool:
        return self.pending is not None and x is self.pending and x._version == self.version


class _SharedInputs:
    """Covariance sums of PEFT's calibration, one per group of layers that receive the same input
    tensor in every call (q/k/v, gate/up): one sum instead of equal copies (peak memory).

    A layer's first call starts a group, or joins the group just started when its input is that
    group's (the same tensor object, unmodified); the group's first round ends at the next call
    that does not join. Later, a round begins when a member is called and ends, summed once
    (PEFT's normalization: divided by ``|max x|``), when every member has been called with the
    same tensor. A member called with another input before that splits the group: those that took
    the pending input keep it, the others go on without it (their sums equal until then, cloned).
    So each layer's sum is PEFT's whatever the model does; no input is held past the next call of
    a hook once its round is complete."""

    def __init__(self):
        self.groups: dict[nn.Module, _Group] = {}
        self.newest: Optional[_Group] = None  # in its first round: later first calls may join

    def call(self, module: nn.Module, x: torch.Tensor) -> None:
        newest, self.newest = self.newest, None
        if newest is not None:
            if module not in self.groups and newest.takes(x):
                newest.members.add(module)
                newest.consumed.add(module)
                self.groups[module] = newest
                self.newest = newest
                return
            self._close(newest)  # every member took its input
        group = self.groups.get(module)
        if group is None:
            group = self.groups[module] = _Group({module})
            self._start(group, module, x)
            self.newest = group
            return
        if group.pending is not None:
            if module not in group.consumed and group.takes(x):
                group.consumed.add(module)
                if group.consumed == group.members:
                    self._close(group)
                return
            self._split(group)
            group = self.groups[module]
        self._start(group, module, x)
        if group.consumed == group.members:
            self._close(group)

    @staticmethod
    def _start(group: _Group, module: nn.Module, x: torch.Tensor) -> None:
        group.pending, group.version, group.consumed = x, x._version, {module}

    def _split(self, group: _Group) -> None:
        """End ``group``'s round for the members that took its input; the others leave without it."""
        rest = group.members - group.consumed
        if rest:
            other = _Group(rest, None if group.acc is None else group.acc.clone())
            for member in rest:
                self.groups[member] = other
            group.members = set(group.consumed)
        self._close(group)

    @staticmethod
    def _close(group: _Group) -> None:
        x = group.pending
        group.pending, group.consumed = None, set()
        x = _peft_scaled(x)
        if group.acc is None:
            group.acc = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
        covariance_update(group.acc, x, check_finite=False)

    def finish(self) -> None:
        """Sum the rounds in progress (each for the members that took it)."""
        newest, self.newest = self.newest, None
        if newest is not None:
            self._close(newest)
        for group in {id(g): g for g in self.groups.values()}.values():
            if group.pending is not None:
                self._split(group)

    def accumulators(self) -> dict:
        """``{layer: its symmetrized sum}``, one tensor per group."""
        out, done = {}, {}
        for module, group in self.groups.items():
            if group.acc is not None:
                if id(group) not in done:
                    done[id(group)] = symmetrize_(group.acc)
                out[module] = done[id(group)]
        return out


def _corda_batches(groups: dict) -> Iterator[tuple[list, Callable[[], list]]]:
    """``(layers, solve)`` pairs in the order the eigens are computed; ``solve()`` returns each
    layer's ``(U, S, V)``.

    ``groups`` maps ``(shape, device, rank, corda_method)`` to its layers. Seeds follow a layer's
    index in its group, so the result does not depend on the batching. On a CPU the layers that
    share one covariance object (q/k/v, gate/up: :class:`_SharedInputs`) are solved together
    (:func:`~corda_kernels.linalg.co_svd_shared`: the covariance checked, damped and factored
    once); LAPACK loops over a batch anyway. Elsewhere layers of one shape are stacked in chunks of
    ``CHUNK_BYTES`` of work (:func:`~corda_kernels.linalg.co_svd`). Peak memory: the largest
    covariances run last, when those of the layers already done have been freed (PEFT deletes them
    after the eigens when ``prune_temporary_fields`` is set; we do it as each batch is stored).
    """
    shared: dict[tuple, list] = {}
    batches = []
    for (shape, device, rank, method), members in groups.items():
        mode = "ipa" if method == "ipm" else "kpa"
        svd = "top" if mode == "ipa" else "exact"  # PEFT: a full fp32 SVD; "top" is as accurate
        if device.type == "cpu":
            for seed, (name, module) in enumerate(members):
                key = (id(module.covariance_matrix), method)
                shared.setdefault(key, []).append((name, module, rank, seed, mode, svd, shape))
            continue
        per = max(1, CHUNK_BYTES // _corda_work(shape))
        for i in range(0, len(members), per):
            chunk = members[i : i + per]
            batches.append(((shape[1], _corda_work(shape)), chunk, partial(_stacked_co_svd, chunk, rank, mode, svd, i)))
    for layers in shared.values():
        chunk = [(name, module) for name, module, *_ in layers]
        n = layers[0][1].covariance_matrix.shape[-1]
        work = max(_corda_work(layer[-1]) for layer in layers)
        batches.append(((n, work), chunk, partial(_shared_co_svd, layers)))
    for _, chunk, solve in sorted(batches, key=lambda batch: batch[0]):
        yield chunk, solve


def _stacked_co_svd(chunk: list, rank: int, mode: str, svd: str, first: int) -> list:
    W = _stacked([_corda_weight(m) for _, m in chunk])
    C = _stacked([m.covariance_matrix.float().to(W.device) for _, m in chunk])
    seeds = list(range(first, first + len(chunk)))
    result = co_svd(W, C, rank, mode=mode, svd=svd, seed=seeds, name=chunk[0][0])
    return [(result.U[j].clone(), result.S[j].clone(), result.V[j].clone()) for j in range(len(chunk))]


def _shared_co_svd(layers: list) -> list:
    names, modules, ranks, seeds, modes, solvers, _ = zip(*layers)
    weights = [_corda_weight(m) for m in modules]
    C = modules[0].covariance_matrix.float().to(weights[0].device)
    results = co_svd_shared(weights, C, list(ranks), mode=modes[0], svd=solvers[0], seeds=list(seeds), names=names)
    return [(r.U, r.S, r.V) for r in results]


def _corda_work(shape: tuple) -> int:
    """Bytes of co_svd work space per layer of this ``(out, in)`` shape (sizes the chunks)."""
    return _CORDA_WORK_FACTOR * 8 * shape[1] * max(shape)


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)``; one tensor as a view (no copy of a lone covariance)."""
    return tensors[0][None] if len(tensors) == 1 else torch.stack(tensors)


def _corda_weight(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach().float()
    return w.T if hf.is_conv1d(module) else w


def _corda_refusal(module: nn.Module) -> str:
    weight = module.weight
    if weight.dtype not in _FLOAT or weight.device.type == "meta" or type(weight.data) is not torch.Tensor:
        return f"its weight is {weight.dtype} on {weight.device.type} (not a plain float tensor)"
    covariance = getattr(module, "covariance_matrix", None)
    if not isinstance(covariance, torch.Tensor):
        return "it has no covariance matrix"
    width = weight.shape[0 if hf.is_conv1d(module) else 1]
    if covariance.shape != (width, width):
        return f"its covariance has shape {tuple(covariance.shape)}, not (in, in) = {(width, width)}"
    if getattr(module, "corda_method", None) not in ("ipm", "kpm"):
        return f"corda_method {getattr(module, 'corda_method', None)!r} is not 'ipm' / 'kpm'"
    rank = getattr(module, "rank", None)
    if not isinstance(rank, int) or not 1 <= rank <= min(weight.shape):
        return f"rank {rank!r} is outside 1..{min(weight.shape)}"
    return ""
