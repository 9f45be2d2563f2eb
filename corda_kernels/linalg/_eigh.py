"""A range of eigenpairs of a batch of symmetric matrices, without computing the others.

:func:`eigh_range` ``(G, first, count)``: eigenpairs ``first .. first + count - 1`` in ascending
order. ``torch.linalg.eigh`` computes every eigenvector (tridiagonal reduction, ``4/3 n³``, then a
divide and conquer over all ``n`` vectors and their back-transformation, as much again); LAPACK's
MRRR driver ``?syevr`` (through SciPy on a CPU) computes only the wanted vectors after the same
reduction, several times faster when they are a small part of ``n``, to the same accuracy
(eigenvalues to ``O(eps ||G||)``, orthonormal vectors). Elsewhere (a GPU, whose cuSOLVER ``syevd``
is fast), for small matrices, or when more than :data:`SUBSET_MAX_FRACTION` of the spectrum is
wanted: the full ``torch.linalg.eigh``, sliced.
"""

from __future__ import annotations

import torch

SUBSET_MAX_FRACTION = 0.25  # beyond this share of the spectrum the full decomposition is as cheap
SUBSET_MIN_SIDE = 64  # below this side the full decomposition costs microseconds


def eigh_range(G: torch.Tensor, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ``(..., count)`` ascending and eigenvectors ``(..., n, count)`` ``first .. first +
    count - 1`` (ascending order) of each symmetric ``(..., n, n)`` fp32 / fp64 ``G`` (its lower
    triangle is read, as ``torch.linalg.eigh`` reads it); no gradient."""
    n = G.shape[-1]
    if not (0 <= first and 1 <= count and first + count <= n):
        raise ValueError(f"eigh_range: eigenpairs {first}..{first + count - 1} of a {n} x {n} matrix")
    subset = G.device.type == "cpu" and n >= SUBSET_MIN_SIDE and count <= SUBSET_MAX_FRACTION * n
    if subset:
        try:
            from scipy.linalg import eigh
        except ImportError:  # SciPy is a dependency; a broken install still gets the right answer
            subset = False
    if not subset or G.dtype not in (torch.float32, torch.float64):
        values, vectors = torch.linalg.eigh(G)
        return values[..., first : first + count], vectors[..., first : first + count]
    flat = G.detach().reshape(-1, n, n)
    values = G.new_empty(flat.shape[0], count)
    vectors = G.new_empty(flat.shape[0], n, count)
    for i, g in enumerate(flat):
        w, v = eigh(g.numpy(), subset_by_index=[first, first + count - 1], driver="evr")
        values[i] = torch.from_numpy(w)
        vectors[i] = torch.from_numpy(v)
    return values.reshape(*G.shape[:-2], count), vectors.reshape(*G.shape[:-2], n, count)
