"""damp_covariance's inverse-free check against PEFT's explicit-inverse criterion, on real covariances.

PEFT (``collect_eigens_for_layer``) doubles ``damp`` from 0.01 until ``||C_d inv(C_d) - I||_F <
0.05`` with an fp32 inverse. For every distinct input covariance of SmolLM2-135M (q/k/v share one,
gate/up share one: 4 per layer, 120 in all) this prints PEFT's residual and our probe estimate at
each damp tried, and the damp each picks, then a summary line.

Run: ``python bench/studies/damp_vs_peft.py [--cache /tmp/smollm2.pt]``.
"""

from __future__ import annotations

import argparse
import math

import smollm2_matrices  # the study's sibling (its directory is on sys.path when run as a script)
import torch

from corda_kernels.linalg import damp_covariance


def peft_residual(C, damp):
    n = C.shape[0]
    fixed = C + torch.eye(n) * C.diagonal().mean() * damp
    return torch.dist(fixed @ torch.linalg.inv(fixed), torch.eye(n)).item()


def probe_residual(C, damp, probes=16, seed=0):
    """The statistic damp_covariance computes (same probes, same formula)."""
    n = C.shape[0]
    P = torch.randn(n, probes, generator=torch.Generator().manual_seed(seed))
    P /= P.norm(dim=0)
    fixed = C + torch.eye(n) * (C.diagonal().mean() * damp)
    X = torch.cholesky_solve(P, torch.linalg.cholesky(fixed))
    return (fixed @ X - P).norm().item() * math.sqrt(n / probes)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=None)
    args = parser.parse_args()
    mats = smollm2_matrices.load(tuple(range(30)), args.cache)
    shared = ("k_proj", "v_proj", "up_proj")  # same input as q_proj / gate_proj
    covs = {name: C for name, (_, C) in mats.items() if not name.endswith(shared)}
    print("| input of | n | λ_max / mean λ | PEFT residual at 0.01 | ours at 0.01 | PEFT damp | our damp |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    agree, worst, ratios = 0, 0.0, []
    for name, C in covs.items():
        peft_damp = 0.01
        while peft_residual(C, peft_damp) >= 0.05:
            peft_damp *= 2
        ours = damp_covariance(C).damp.item()
        agree += ours == peft_damp
        lam = torch.linalg.eigvalsh(C.double())
        r_peft, r_ours = peft_residual(C, 0.01), probe_residual(C, 0.01)
        worst = max(worst, r_peft, r_ours)
        ratios.append(r_ours / r_peft)
        print(
            f"| {name} | {C.shape[0]} | {(lam[-1] / lam.mean()).item():.0f} | {r_peft:.4f} | {r_ours:.4f} | "
            f"{peft_damp:g} | {ours:g} |"
        )
    print(
        f"\nsame damp on {agree} / {len(covs)} covariances; largest residual at damp 0.01: {worst:.4f} (threshold "
        f"0.05); ours / PEFT residual: {min(ratios):.2f} .. {max(ratios):.2f}"
    )


if __name__ == "__main__":
    main()
