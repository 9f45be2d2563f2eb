"""Reference (specification) of the fused low-rank linear op, its gradients and its dropout mask.

With ``x`` viewed as ``(N, in)``, ``x_c = x[:, col_index]`` (all columns when None) and
``B_r`` placed at output features ``row_index`` (all rows when None)::

    u = (x_c ⊙ keep / (1 - p)) · Aᵀ                       (N, r)   in the accumulation dtype
    t = u ⊙ (scale · diag)                                (N, r)
    y = x · weightᵀ + bias,  y[:, row_index] += t · Bᵀ    (N, out) cast to x.dtype

The accumulation dtype is float64 for float64 inputs and float32 otherwise; this module computes
everything in it (inputs upcast), so it is also the precision oracle.

Mixed dtypes (fp32 factors on a 16-bit base, as training keeps them): ``A``, ``B`` and ``diag``
may be fp32 while ``x`` / ``weight`` / ``bias`` are fp16 or bf16 (the compute dtype). The rounding
rule, followed by every backend: ``A`` and ``B`` are rounded to the compute dtype where they enter
a product (as if cast once, up front: :func:`compute_factor`); ``diag`` and ``scale`` are never
rounded (they scale the fp32 ``u`` / ``g``). Gradients of ``A``, ``B``, ``diag`` are accumulated in
fp32 and returned in each factor's own dtype, so fp32 factors get fp32 gradients. ``keep`` is the dropout mask
of :func:`dropout_keep` (all True without dropout). Shapes: ``weight (out, in)``, ``A (r, n_cols)``,
``B (n_rows, r)``, ``diag (r,)``, ``bias (out,)``, indices int64.

The gradients (``s = scale``, ``d = diag`` or ones, ``g = dy[:, row_index] · B``)::

    dB = s · dy_rᵀ · (u ⊙ d)        dA = s · (g ⊙ d)ᵀ · drop(x_c)      ddiag = s · Σ_N g ⊙ u
    dx = dy · weight,  dx[:, col_index] += s · ((g ⊙ d) · A) ⊙ keep / (1 - p)
    dweight = dyᵀ · x               dbias = Σ_N dy
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..._dtypes import accumulation_dtype

_M32 = 0xFFFFFFFF
# keep iff the top 24 bits of the element hash are >= round(p * 2**24).
DROPOUT_BITS = 24


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors holding values in [0, 2**32).

    Both multipliers are below 2**31, so every product fits in int64 before it is masked; the
    Triton kernels compute the same function in uint32 arithmetic.
    """
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x1B873593) & _M32
    return h ^ (h >> 16)


def dropout_threshold(p: float) -> int:
    return int(round(p * (1 << DROPOUT_BITS)))


def dropout_keep(seed: int, n_tokens: int, n_cols: int, p: float, device=None) -> torch.Tensor:
    """The ``(n_tokens, n_cols)`` bool keep-mask of dropout probability ``p`` for ``seed``.

    Element ``(m, j)`` (token ``m``, compact column ``j``) is kept iff
    ``mix(mix(mix(seed) ^ m) ^ mix(j)) >> 8 >= round(p · 2**24)``: a pure function of
    ``(seed, m, j)``, so every backend (and a backward pass) regenerates the same mask.
    """
    seed_h = _mix32(torch.tensor(int(seed) & _M32, dtype=torch.int64, device=device))
    row_h = _mix32(seed_h ^ torch.arange(n_tokens, dtype=torch.int64, device=device))
    col_h = _mix32(torch.arange(n_cols, dtype=torch.int64, device=device))
    h = _mix32(row_h[:, None] ^ col_h[None, :])
    return (h >> (32 - DROPOUT_BITS)) >= dropout_threshold(p)


class Options(NamedTuple):
    """The optional parts of one call of the op, in the one order every layer of the package uses
    (public op, registered op, autograd, and the reference / torch / Triton kernels).

    ``scale`` the adapter scale ``s``; ``bias (out,)``; ``row_index`` / ``col_index`` int64 feature
    indices of ``B``'s rows / ``A``'s columns (Partial-LoRA; None: all); ``diag (r,)`` between the
    factors (SiVA); ``dropout`` the probability ``p`` on ``x_c``; ``seed`` the int64 scalar tensor
    that draws the dropout mask (:func:`dropout_keep`; None when ``p == 0``).
    """

    scale: float = 1.0
    bias: Optional[torch.Tensor] = None
    row_index: Optional[torch.Tensor] = None
    col_index: Optional[torch.Tensor] = None
    diag: Optional[torch.Tensor] = None
    dropout: float = 0.0
    seed: Optional[torch.Tensor] = None

    @property
    def plain(self) -> bool:
        """No index sets and no dropout: the adapter covers every feature."""
        return self.row_index is None and self.col_index is None and self.seed is None

    def keep(self, n_tokens: int, n_cols: int, device) -> Optional[torch.Tensor]:
        """The ``(n_tokens, n_cols)`` dropout keep-mask of this call (None without dropout)."""
        if self.seed is None or self.dropout == 0.0:
            return None
        return dropout_keep(int(self.seed), n_tokens, n_cols, self.dropout, device)


def diag_scale(diag: Optional[torch.Tensor], scale: float, r: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``scale · diag`` (``scale`` repeated ``r`` times without a diagonal) in ``dtype``."""
    return torch.full((r,), scale, dtype=dtype, device=device) if diag is None else diag.to(dtype) * scale


def compute_factor(factor: torch.Tensor, compute_dtype: torch.dtype, acc: torch.dtype) -> torch.Tensor:
    """``factor`` rounded to the compute dtype (a no-op for same-dtype factors), then widened to ``acc``."""
    return factor.to(compute_dtype).to(acc)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    opts: Options,
    keep: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, u)``: ``y`` of shape ``(..., out)`` in ``x.dtype``; ``u`` of shape ``(N, r)`` in the
    accumulation dtype. Differentiable by torch autograd (the gradients' specification). ``keep``
    replays a given dropout mask instead of drawing ``opts.seed``'s."""
    scale, bias, row_index, col_index, diag, dropout, _ = opts
    if keep is None:
        keep = opts.keep(x.numel() // max(x.shape[-1], 1), A.shape[1], x.device)
    acc = accumulation_dtype(x.dtype)
    x2 = x.reshape(-1, x.shape[-1]).to(acc)
    xc = x2 if col_index is None else x2[:, col_index]
    if keep is not None:
        xc = xc * keep / (1.0 - dropout)
    u = xc @ compute_factor(A, x.dtype, acc).T
    t = u * diag_scale(diag, scale, A.shape[0], acc, x.device)
    y = x2 @ weight.to(acc).T
    if bias is not None:
        y = y + bias.to(acc)
    low = t @ compute_factor(B, x.dtype, acc).T
    if row_index is None:
        y = y + low
    else:
        y = y.index_add(1, row_index, low)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0]), u


def lowrank_linear(
    x, weight, A, B, *, scale=1.0, bias=None, row_index=None, col_index=None, diag=None, keep=None, dropout=0.0
):
    """The op's output ``y`` (see the module docstring); ``keep`` replays a dropout mask."""
    opts = Options(scale, bias, row_index, col_index, diag, dropout, None)
    return forward(x, weight, A, B, opts, keep if keep is not None and dropout else None)[0]


def backward(
    dy: torch.Tensor,
    x: Optional[torch.Tensor],
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    u: Optional[torch.Tensor],
    opts: Options,
    needs: tuple[bool, bool, bool, bool, bool, bool],
) -> list[Optional[torch.Tensor]]:
    """``[dx, dweight, dA, dB, ddiag, dbias]`` for the inputs flagged in ``needs`` (None otherwise).

    ``x`` is only read for dweight/dA and ``u`` only for dB/ddiag, so callers save them only then.
    """
    scale, _, row_index, col_index, diag, dropout, _ = opts
    keep = opts.keep(dy.numel() // max(dy.shape[-1], 1), A.shape[1], dy.device)
    need_x, need_w, need_a, need_b, need_d, need_bias = needs
    acc = u.dtype if u is not None else accumulation_dtype(dy.dtype)
    dy2 = dy.reshape(-1, dy.shape[-1]).to(acc)
    ds = diag_scale(diag, scale, A.shape[0], acc, dy.device)
    dy_r = dy2 if row_index is None else dy2[:, row_index]
    g = dy_r @ compute_factor(B, dy.dtype, acc)
    h = g * ds
    x2 = xc = None
    if x is not None:
        x2 = x.reshape(-1, x.shape[-1]).to(acc)
        xc = x2 if col_index is None else x2[:, col_index]
        if keep is not None:
            xc = xc * keep / (1.0 - dropout)
    grads: list[Optional[torch.Tensor]] = [None] * 6
    if need_x:
        dx = dy2 @ weight.to(acc)
        low = h @ compute_factor(A, dy.dtype, acc)
        if keep is not None:
            low = low * keep / (1.0 - dropout)
        dx = dx + low if col_index is None else dx.index_add(1, col_index, low)
        grads[0] = dx.reshape(dy.shape[:-1] + (weight.shape[1],)).to(dy.dtype)
    if need_w:
        grads[1] = (dy2.T @ x2).to(weight.dtype)
    if need_a:
        grads[2] = (h.T @ xc).to(A.dtype)
    if need_b:
        grads[3] = (dy_r.T @ (u * ds)).to(B.dtype)
    if need_d:
        grads[4] = (scale * (g * u).sum(0)).to(diag.dtype)
    if need_bias:
        grads[5] = dy2.sum(0).to(weight.dtype)
    return grads


def delta_weight(
    A: torch.Tensor,
    B: torch.Tensor,
    out_features: int,
    in_features: int,
    *,
    scale: float = 1.0,
    diag: Optional[torch.Tensor] = None,
    row_index: Optional[torch.Tensor] = None,
    col_index: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The dense ``(out, in)`` update ``scale · scatter(B · diag(d) · A)`` computed in ``dtype``
    (``A (r, n_cols)`` over ``col_index``, ``B (n_rows, r)`` over ``row_index``, ``diag (r,)``)."""
    core = (B.to(dtype) * diag_scale(diag, scale, A.shape[0], dtype, A.device)) @ A.to(dtype)
    if row_index is not None:
        core = torch.zeros(out_features, core.shape[1], dtype=dtype, device=A.device).index_copy_(0, row_index, core)
    if col_index is not None:
        core = torch.zeros(out_features, in_features, dtype=dtype, device=A.device).index_copy_(1, col_index, core)
    return core
