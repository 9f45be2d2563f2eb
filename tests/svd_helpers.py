"""Shared helpers of the decomposition tests: matrices with a chosen spectrum, sign alignment."""

import torch


def with_spectrum(m, n, s, batch=(), seed=0, dtype=torch.float64, device="cpu"):
    """``U diag(s) V^T`` with random orthonormal ``U (m, k)``, ``V (n, k)``; ``s`` has ``k`` entries."""
    g = torch.Generator(device=device).manual_seed(seed)
    k = s.shape[-1]
    U = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64, device=device)).Q
    V = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64, device=device)).Q
    return ((U * s.double().to(device)) @ V.mT).to(dtype)


def align_signs(U, U_ref):
    """The sign (+-1 per column, shape (..., 1, r)) that turns each column of U towards U_ref's."""
    return torch.sign((U * U_ref).sum(dim=-2, keepdim=True))
