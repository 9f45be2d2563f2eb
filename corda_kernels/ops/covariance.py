"""Streaming input covariance: ``cov += x_selᵀ x_sel`` in fp32, and its finalization.

Public calls:

- :func:`covariance_update` ``(cov, x, token_mask=None) -> cov``: ``cov`` is a ``(d, d)`` fp32
  accumulator updated in place; ``x`` is ``(..., d)`` bf16/fp16/fp32 (any strides); ``token_mask``
  is an optional bool tensor of shape ``x.shape[:-1]`` whose False rows (padding) are skipped.
  By default only the upper triangle (diagonal included) is accumulated, which is all the GPU
  kernel computes; :func:`finalize_covariance` mirrors it and divides by the token count.
- :class:`CovarianceAccumulator`: an accumulator that also counts tokens, with a state dict.

Backends (see :mod:`corda_kernels._backend`): ``triton`` (CUDA, or CPU under the interpreter),
``cuda`` (cuBLAS with fp32 output and beta = 1, from ``corda_kernels._C``), ``torch`` (chunked
upper-triangle BLAS) and ``reference``. The op is registered as ``corda_kernels::covariance_update``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from .._dtypes import ACTIVATION_DTYPES
from ..kernels.reference import covariance as reference
from ..kernels.torch import covariance as torch_kernel

# GPU preference, fastest first. H200 (bench/results/gpu-h200-2026-12-04.md): cuBLAS's triangle 1.5-2.5x
# the Triton kernel at d 4096 / 11008 and 8k / 16k bf16 tokens; masked rows are compacted first (the
# compaction + full-square GEMM anchor already beat Triton's in-kernel masking there).
_CUDA_PREFERENCE = ("cuda", "triton", "reference")
_CPU_PREFERENCE = ("torch", "reference")


def _check(cov: torch.Tensor, x: torch.Tensor, token_mask: Optional[torch.Tensor], name: str) -> None:
    where = f" ({name})" if name else ""
    if not isinstance(cov, torch.Tensor) or not isinstance(x, torch.Tensor):
        raise TypeError(f"covariance_update{where}: cov and x must be tensors")
    if cov.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"covariance_update{where}: cov must be float32 (the fp32 accumulator), got {cov.dtype}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"covariance_update{where}: x must be bf16, fp16 or fp32 activations, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"covariance_update{where}: x must have shape (..., d), got a 0-d tensor")
    d = x.shape[-1]
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"covariance_update{where}: cov must be a square (d, d) matrix, got {tuple(cov.shape)}")
    if cov.shape[0] != d:
        raise ValueError(
            f"covariance_update{where}: feature size mismatch: x has d={d} (shape {tuple(x.shape)}) but cov is "
            f"{tuple(cov.shape)}"
        )
    if cov.device != x.device:
        raise ValueError(f"covariance_update{where}: cov is on {cov.device} but x is on {x.device}")
    if token_mask is not None:
        if not isinstance(token_mask, torch.Tensor) or token_mask.dtype != torch.bool:
            got = token_mask.dtype if isinstance(token_mask, torch.Tensor) else type(token_mask).__name__
            raise TypeError(f"covariance_update{where}: token_mask must be a bool tensor, got {got}")
        if tuple(token_mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"covariance_update{where}: token_mask shape {tuple(token_mask.shape)} must equal x.shape[:-1] = "
                f"{tuple(x.shape[:-1])}"
            )
        if token_mask.device != x.device:
            raise ValueError(f"covariance_update{where}: token_mask is on {token_mask.device} but x is on {x.device}")


def _check_finite(x: torch.Tensor, token_mask: Optional[torch.Tensor], name: str) -> None:
    """One read of ``x``: a row holding NaN or ±Inf has a non-finite fp32 sum (so does a row whose
    fp32 sum overflows, whose squares would overflow the covariance anyway)."""
    row_sums = x.reshape(-1, x.shape[-1]).sum(dim=-1, dtype=torch.float32) if x.numel() else None
    if row_sums is None:
        return
    bad = ~torch.isfinite(row_sums)
    if token_mask is not None:
        bad &= token_mask.reshape(-1)
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)
        where = f" in {name}" if name else ""
        raise FloatingPointError(
            f"covariance_update: x{where} holds NaN or Inf (or values beyond fp32's range) in {rows.numel()} "
            f"token row(s) (first flat row "
            f"{int(rows[0])} of {row_sums.numel()}); the covariance was not updated"
        )


def _available(cov: torch.Tensor, x: torch.Tensor, token_mask: Optional[torch.Tensor]) -> dict[str, bool]:
    on_cuda = x.device.type == "cuda"
    return {
        "triton": cov.dtype == torch.float32 and _backend.triton_runs_on(x.device),
        "cuda": on_cuda and cov.dtype == torch.float32 and cov.is_contiguous() and _backend.extension_has_cuda(),
        "torch": x.device.type == "cpu",
    }


@torch.library.custom_op("corda_kernels::covariance_update", mutates_args={"cov"})
def _covariance_update_op(
    cov: torch.Tensor, x: torch.Tensor, token_mask: Optional[torch.Tensor], upper_only: bool
) -> None:
    preference = _CUDA_PREFERENCE if x.device.type == "cuda" else _CPU_PREFERENCE
    backend = _backend.choose("covariance_update", x.device, _available(cov, x, token_mask), preference)
    if backend == "triton":
        from ..kernels.triton import covariance as triton_kernel

        triton_kernel.covariance_update(cov, x, token_mask, upper_only)
    elif backend == "cuda":
        from ..kernels import cuda

        cuda.covariance_update(cov, x, token_mask, upper_only)
    elif backend == "torch":
        torch_kernel.covariance_update(cov, x, token_mask, upper_only)
    else:
        reference.covariance_update(cov, x, token_mask, upper_only)


@_covariance_update_op.register_fake
def _(cov, x, token_mask, upper_only):
    return None


def covariance_update(
    cov: torch.Tensor,
    x: torch.Tensor,
    token_mask: Optional[torch.Tensor] = None,
    *,
    upper_only: bool = True,
    check_finite: bool = True,
    name: str = "",
) -> torch.Tensor:
    """Accumulate ``x_selᵀ x_sel`` into ``cov`` in place and return ``cov``.

    Args:
        cov: ``(d, d)`` float32 accumulator (float64 is accepted for exact oracles).
        x: ``(..., d)`` bf16/fp16/fp32 activations, any leading dims and strides.
        token_mask: optional bool tensor of shape ``x.shape[:-1]``; False rows are excluded.
        upper_only: accumulate only entries with ``i <= j`` (the strict lower triangle of ``cov`` is
            left untouched; :func:`finalize_covariance` mirrors it). False adds the full square.
        check_finite: raise :class:`FloatingPointError` before touching ``cov`` if a selected row
            of ``x`` holds NaN/Inf (one extra read of ``x``).
        name: a label (e.g. the layer name) used in error messages.

    Returns:
        ``cov`` itself, updated in place. Registered as ``torch.ops.corda_kernels.covariance_update``
        (``torch.compile`` traces it). Backends: Triton, cuBLAS (``_C``), chunked CPU BLAS,
        reference; ``CORDA_KERNELS_BACKEND`` forces one.

    Raises:
        TypeError: ``cov`` is not fp32/fp64, ``x`` not bf16/fp16/fp32, or ``token_mask`` not bool.
        ValueError: ``cov`` is not ``(d, d)`` with ``d = x.shape[-1]``, ``x`` is 0-d,
            ``token_mask``'s shape is not ``x.shape[:-1]``, or the tensors are on different devices.
        FloatingPointError: ``check_finite`` and a selected row of ``x`` holds NaN or Inf.
    """
    _check(cov, x, token_mask, name)
    if check_finite:
        _check_finite(x, token_mask, name)
    _covariance_update_op(cov, x, token_mask, upper_only)
    return cov


def count_tokens(token_shape: torch.Size, token_mask: Optional[torch.Tensor] = None) -> int:
    """Tokens selected among ``token_shape`` positions (e.g. ``x.shape[:-1]`` or a batch's ``input_ids``
    shape): the True entries of ``token_mask``, or all of them."""
    return int(token_mask.sum()) if token_mask is not None else token_shape.numel()


def symmetrize_(cov: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Mirror the upper triangle of a square matrix onto its lower triangle, in place.

    Works block by block, so the extra memory is one ``(block, block)`` tile, not a second matrix.
    """
    d = cov.shape[0]
    for i0 in range(0, d, block):
        i1 = min(d, i0 + block)
        diag = cov[i0:i1, i0:i1]
        diag.copy_(diag.triu() + diag.triu(1).mT)
        if i1 < d:
            cov[i1:, i0:i1].copy_(cov[i0:i1, i1:].mT)
    return cov


def finalize_covariance(
    cov: torch.Tensor, count: int, *, upper_only: bool = True, inplace: bool = False
) -> torch.Tensor:
    """The per-token mean covariance: symmetric ``cov / count``.

    Args:
        cov: the ``(d, d)`` sum that :func:`covariance_update` accumulated.
        count: the number of tokens accumulated (a positive int).
        upper_only: how ``cov`` was accumulated: True mirrors its upper triangle first.
        inplace: overwrite ``cov`` instead of returning a new tensor.

    Returns:
        The symmetric ``(d, d)`` mean, in ``cov``'s dtype (``cov`` itself when ``inplace``).

    Raises:
        TypeError: ``count`` is not an int.
        ValueError: ``count`` is negative or 0 (no tokens: every row was padding, or no data).
    """
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"finalize_covariance: count must be an int (tokens accumulated), got {type(count).__name__}")
    if count < 0:
        raise ValueError(f"finalize_covariance: count={count} is negative; it is the number of tokens accumulated")
    if count == 0:
        raise ValueError(
            "finalize_covariance: no tokens were accumulated (count=0); every calibration row was padding or "
            "the data was empty"
        )
    out = cov if inplace else cov.clone()
    if upper_only:
        symmetrize_(out)
    return out.div_(count)


class CovarianceAccumulator:
    """An fp32 ``(d, d)`` covariance accumulator that counts the tokens it has seen.

    ``update(x, token_mask)`` adds ``x``'s selected rows through :func:`covariance_update` (and
    raises what it raises); ``finalize()`` returns the symmetric per-token mean;
    ``merge_(other)`` adds another shard's sums; ``state_dict()`` / ``load_state_dict()`` save
    and restore it.

    Args:
        dim: the feature size ``d``.
        device: where the ``(d, d)`` fp32 buffer lives.
        upper_only: accumulate the upper triangle only (half the FLOPs); ``finalize`` mirrors it.
        name: a label used in error messages.

    Attributes:
        cov: the running ``(d, d)`` fp32 sum.
        count: tokens accumulated so far.

    Raises:
        TypeError: ``update`` with a ``x`` or mask of a wrong dtype (see :func:`covariance_update`).
        ValueError: ``update`` with a ``x`` of another width or a mask of another shape;
            ``merge_`` / ``load_state_dict`` with a state of another size; ``finalize`` before any
            token was added.
        FloatingPointError: ``update`` with NaN or Inf in a selected row of ``x``.

    Examples:
        >>> acc = CovarianceAccumulator(4096, device="cuda")
        >>> for hidden, mask in batches:   # hidden: (B, S, 4096) bf16, mask: (B, S) bool
        ...     acc.update(hidden, mask)
        >>> C = acc.finalize()              # symmetric, divided by acc.count
    """

    def __init__(self, dim: int, device=None, *, upper_only: bool = True, name: str = ""):
        self.cov = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.count = 0
        self.upper_only = upper_only
        self.name = name

    @property
    def dim(self) -> int:
        return self.cov.shape[0]

    def update(
        self,
        x: torch.Tensor,
        token_mask: Optional[torch.Tensor] = None,
        *,
        check_finite: bool = True,
        name: str = "",
        count: Optional[int] = None,
    ) -> int:
        """Add ``x``'s selected rows; returns how many rows were added.

        ``name`` labels errors (default: the accumulator's); ``count`` is what the token count grows
        by (default: the rows added; PEFT's normalization counts forward calls instead).
        """
        covariance_update(
            self.cov, x, token_mask, upper_only=self.upper_only, check_finite=check_finite, name=name or self.name
        )
        added = count_tokens(x.shape[:-1], token_mask)
        self.count += added if count is None else count
        return added

    def merge_(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Add another accumulator's sums and counts (e.g. from another data shard)."""
        if other.dim != self.dim or other.upper_only != self.upper_only:
            raise ValueError(f"cannot merge accumulators of dim {other.dim} into dim {self.dim}")
        self.cov += other.cov.to(self.cov.device)
        self.count += other.count
        return self

    def finalize(self) -> torch.Tensor:
        """Symmetric per-token mean covariance (a new tensor; the accumulator keeps its sums)."""
        return finalize_covariance(self.cov, self.count, upper_only=self.upper_only)

    def state_dict(self) -> dict:
        return {"cov": self.cov, "count": torch.tensor(self.count, dtype=torch.int64)}

    def load_state_dict(self, state: dict) -> None:
        cov = state["cov"]
        if tuple(cov.shape) != tuple(self.cov.shape):
            raise ValueError(
                f"covariance state of shape {tuple(cov.shape)} does not fit an accumulator of dim {self.dim}"
            )
        self.cov.copy_(cov)
        self.count = int(state["count"])
