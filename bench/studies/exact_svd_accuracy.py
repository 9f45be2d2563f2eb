"""Accuracy of the bottom singular values: smallest_singular_triplets vs the shortcuts it replaces.

For ``A = U diag(s) V^T`` (300 x 200, random singular vectors, ``s`` geometric from 1 to 1/κ, so
the bottom values are tiny and tightly packed), the worst relative error of the 16 smallest
singular values against fp64 ``torch.linalg.svdvals`` of the same matrix, for:

- ``fp32 Gram``: ``sqrt(eigvalsh(A^T A))`` in fp32,
- ``fp32 SVD``: ``torch.linalg.svdvals`` in fp32 (PEFT's full SVD),
- ``fp64 Gram + RR``: fp64 ``eigh(A^T A)``, then the singular values of ``A Z`` (Rayleigh–Ritz),
- ``ours``: :func:`smallest_singular_triplets` (fp32 output for fp32 input, fp64 for fp64).

Run: ``python bench/studies/exact_svd_accuracy.py``.
"""

from __future__ import annotations

import torch

from corda_kernels.linalg.exact_svd import smallest_singular_triplets

RANK = 16


def matrix(kappa, dtype, m=300, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), n, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    return ((U * s) @ V.T).to(dtype)


def shortcuts(A):
    A64 = A.double()
    out = {}
    if A.dtype == torch.float32:
        out["fp32 Gram"] = torch.linalg.eigvalsh(A.mT @ A)[:RANK].flip(-1).clamp_min(0).sqrt()
        out["fp32 SVD"] = torch.linalg.svdvals(A)[-RANK:]
    Z = torch.linalg.eigh(A64.mT @ A64).eigenvectors[:, :RANK]
    out["fp64 Gram + RR"] = torch.linalg.svdvals(A64 @ Z)
    out["ours"] = smallest_singular_triplets(A, RANK)[1]
    return out


def main():
    print("| input | κ | " + " | ".join(["fp32 Gram", "fp32 SVD", "fp64 Gram + RR", "ours"]) + " |")
    print("| --- | --- | --- | --- | --- | --- |")
    for dtype in (torch.float32, torch.float64):
        for kappa in (1e4, 1e6, 1e7, 1e8):
            A = matrix(kappa, dtype)
            exact = torch.linalg.svdvals(A.double())[-RANK:]
            errs = {k: ((v.double() - exact).abs() / exact).max().item() for k, v in shortcuts(A).items()}
            cells = [f"{errs[k]:.1e}" if k in errs else "" for k in ("fp32 Gram", "fp32 SVD", "fp64 Gram + RR", "ours")]
            print(f"| {str(dtype)[6:]} | {kappa:.0e} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
