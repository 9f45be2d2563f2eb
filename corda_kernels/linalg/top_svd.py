"""The top r singular triplets of a batch of matrices to an fp32 SVD's accuracy, without a full SVD.

:func:`top_singular_triplets` ``(A, rank)`` is PEFT's ``init_lora_weights="pissa"`` contract (the
top-r part of ``torch.linalg.svd`` in fp32) at a fraction of the cost on wide matrices. Batched over
leading dims; ``A`` is made tall, ``p x k`` with ``p >= k``, by transposing when wide.

1. Block Krylov (block Lanczos with full reorthogonalization) on ``AᵀA``: the orthonormal basis
   ``Q`` (``k x d``) grows by ``b = max(r, MIN_BLOCK)`` columns a step, ``Y = Aᵀ(A X)`` in ``A``'s
   precision (the GEMMs are the cost), reorthogonalized twice against ``Q`` in fp64. At widths
   growing by :data:`CHECK_GROWTH` a Rayleigh–Ritz step on ``T = QᵀAᵀAQ`` (``d x d``, fp64) gives Ritz
   pairs ``(θ_i, v_i)``; the basis is accepted when each of the top ``r`` has
   ``‖AᵀA v_i − θ_i v_i‖ / σ_i <= tol · σ_1``: the backward error of an fp32 SVD's own triplets,
   so the sin-θ bound (error ``<= residual / gap``) is no worse than PEFT's, near-ties included.
   Then a Rayleigh–Ritz step on ``A`` itself (not its Gram matrix) over the top ``r + b`` Ritz
   vectors: ``svd(A V')`` in fp64 gives ``U``, ``S``, ``V``.
2. Krylov pays when the accepted basis is much narrower than ``k``. When ``k`` is below
   :data:`KRYLOV_MIN_SIDE`, or the basis reaches ``k / 4`` columns unaccepted (a spectrum flat well
   beyond ``σ_r``), the exact path runs instead: the fp64 eigendecomposition of the ``k x k`` Gram
   matrix (only its top ``r`` eigenvectors: :func:`~corda_kernels.linalg._eigh.eigh_range`) and a
   Rayleigh–Ritz step on ``A`` (:func:`gram_top_triplets`), more accurate than an fp32 SVD (Gram
   eigenvalues to ``1e-16 σ_1²``) for the cost of one tridiagonal reduction.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import check_finite, check_matrix, check_rank
from ._eigh import eigh_range
from ._products import gram_lower, times_fp64

DEFAULT_TOL = 5e-7  # relative backward error ``residual / σ_1``; an fp32 SVD's is about 1e-6
KRYLOV_MIN_SIDE = 2048  # below this smaller side the Gram eigendecomposition is as cheap
MIN_BLOCK = 16
CHECK_GROWTH = 1.3  # acceptance checks at basis widths growing by 30% (each check is a d x d eigh)
MAX_BASIS_FRACTION = 4  # give up on Krylov at k / 4 basis columns


def gram_top_triplets(A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``rank`` triplets of ``(..., m, n)`` ``A`` from the fp64 ``eigh`` of its smaller Gram
    matrix and a Rayleigh–Ritz step on ``A`` (no checks; fp32 out). The fp64 products read ``A`` a
    panel at a time (no fp64 copy of ``A``)."""
    tall = A.shape[-2] >= A.shape[-1]
    G = gram_lower(A, rows=not tall, dtype=torch.float64)
    Z = eigh_range(G, G.shape[-1] - rank, rank)[1]
    del G
    if tall:  # Z spans the top right singular vectors: svd(A Z) = U S Wᵀ, V = Z W
        U, S, Wh = torch.linalg.svd(times_fp64(Z.mT, A.mT).mT, full_matrices=False)
        Vh = Wh @ Z.mT
    else:  # Z spans the top left singular vectors: svd(Zᵀ A) = Ur S Vh, U = Z Ur
        Ur, S, Vh = torch.linalg.svd(times_fp64(Z.mT, A), full_matrices=False)
        U = Z @ Ur
    return U.float().contiguous(), S.float().contiguous(), Vh.float().contiguous()


def _orthonormalize(Y: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``Y`` (fp64) orthogonalized twice against the columns of ``Q``, then orthonormalized."""
    for _ in range(2):
        Y = Y - Q @ (Q.mT @ Y)
    return torch.linalg.qr(Y).Q


def _krylov_basis(T: torch.Tensor, rank: int, block: int, tol: float, seed: int) -> Optional[torch.Tensor]:
    """The top ``rank + block`` Ritz vectors ``(..., k, rank + block)`` (fp64) of ``TᵀT`` (tall
    ``T``) once every matrix of the batch passes the acceptance test; ``None`` if the basis would
    exceed ``k / MAX_BASIS_FRACTION`` columns first."""
    k = T.shape[-1]
    limit = k // MAX_BASIS_FRACTION
    generator = torch.Generator(device=T.device).manual_seed(seed)
    X = torch.randn(*T.shape[:-2], k, block, generator=generator, dtype=torch.float64, device=T.device)
    X = torch.linalg.qr(X).Q
    basis, images, check = [X], [], rank + block
    while True:
        images.append((T.mT @ (T @ X.to(T.dtype))).double())
        if len(basis) * block >= check:
            check = max(len(basis) * block + 2 * block, int(CHECK_GROWTH * len(basis) * block))
            Q, Y = torch.cat(basis, -1), torch.cat(images, -1)
            H = Q.mT @ Y
            theta, Z = torch.linalg.eigh(0.5 * (H + H.mT))
            theta, Z = theta.flip(-1), Z.flip(-1)
            top = Z[..., :rank]
            residual = (Y @ top - (Q @ top) * theta[..., None, :rank]).norm(dim=-2)
            sigma = theta[..., :rank].clamp_min(0).sqrt()
            tiny = torch.finfo(torch.float64).tiny
            backward = residual / (sigma[..., :1] * sigma).clamp_min(tiny)
            if bool((backward <= tol).all()):
                return Q @ Z[..., : rank + block]
        if (len(basis) + 1) * block > limit:
            return None
        Q = torch.cat(basis, -1)
        X = _orthonormalize(images[-1], Q)
        basis.append(X)


def top_singular_triplets(
    A: torch.Tensor, rank: int, *, tol: float = DEFAULT_TOL, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``rank`` largest singular triplets of every matrix in ``A``, as accurate as an fp32 SVD's.

    Block Krylov with an acceptance test on wide matrices, the fp64 Gram eigendecomposition
    otherwise or when Krylov does not converge early (see the module doc).

    Args:
        A: ``(..., m, n)`` float tensor; the Krylov products run in its dtype (fp32 for 16-bit).
        rank: ``r`` in ``1..min(m, n)``.
        tol: accepted backward error of each triplet, relative to ``σ_1``; in ``(0, 1)``.
        seed: seed of the Krylov start block.

    Returns:
        ``U (..., m, r)``, ``S (..., r)`` descending, ``Vh (..., r, n)``, fp32.

    Raises:
        TypeError: ``A`` is not a float tensor.
        ValueError: ``A`` is not ``(..., m, n)``, is empty, ``rank`` is outside ``1..min(m, n)``,
            or ``tol`` is outside ``(0, 1)``.
        FloatingPointError: ``A`` holds NaN or Inf.
    """
    op = "top_singular_triplets"
    check_matrix(A, op)
    check_rank(rank, A.shape, op)
    check_finite(A, op)
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not 0 < tol < 1:
        raise ValueError(f"{op}: tol must be a number in (0, 1), got {tol!r}")
    return top_triplets(A, rank, tol=tol, seed=seed)


def top_triplets(
    A: torch.Tensor, rank: int, *, tol: float = DEFAULT_TOL, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`top_singular_triplets` without its checks (for callers that made them)."""
    if A.dtype in (torch.float16, torch.bfloat16):
        A = A.float()
    transposed = A.shape[-2] < A.shape[-1]
    T = A.mT if transposed else A  # (..., p, k), p >= k
    k = T.shape[-1]
    block = max(rank, MIN_BLOCK)
    V = None
    if k >= KRYLOV_MIN_SIDE and 2 * block + rank <= k // MAX_BASIS_FRACTION:
        V = _krylov_basis(T, rank, block, float(tol), seed)
    if V is None:
        return gram_top_triplets(A, rank)
    U, S, Wh = torch.linalg.svd((T @ V.to(T.dtype)).double(), full_matrices=False)
    U, S, V = U[..., :rank], S[..., :rank], V @ Wh[..., :rank, :].mT
    if transposed:
        U, V = V, U
    return U.float().contiguous(), S.float().contiguous(), V.mT.float().contiguous()
