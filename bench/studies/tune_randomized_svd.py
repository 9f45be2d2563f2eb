"""Measure randomized_svd's accuracy against the exact truncated SVD, to choose its defaults.

For every matrix ``A``, rank ``r``, oversampling ``p``, power iterations ``q`` and seed, with
``A_r = U diag(S) Vh`` from :func:`randomized_svd` and ``A*_r`` the exact truncated SVD:

- excess = ``(||A - A_r||_F - ||A - A*_r||_F) / ||A - A*_r||_F`` (computed in fp64), and
- deficit = ``1 - sum(S²) / sum(σ_1..r²)``, the captured energy missing from the top ``r``.

Flat spectra make the deficit the hard one, steep spectra the excess; the defaults must keep both
at most ``1e-4``. Each table row is one (family, r, p) and gives the worst excess / deficit over
the family's matrices and seeds for each ``q``, then the smallest ``q`` meeting the target. One run
per (matrix, r, p, seed) goes through randomized_svd's own steps (``_sketch``,
``_subspace_iterates``, ``_factors``) and is evaluated after each power iteration.

Families: ``W`` (the q/k/v/o/gate/up/down weights of SmolLM2-135M layers), ``WC`` (the same
weights times their damped input covariance, as CorDA decomposes them), and ``power a=…``
(4096 x 4096 matrices with singular values ``i^-a`` and random singular vectors; with ``--synthetic``).

Run: ``python bench/studies/tune_randomized_svd.py [--cache /tmp/smollm2.pt] [--synthetic]``.
"""

from __future__ import annotations

import argparse

import smollm2_matrices  # the study's sibling (its directory is on sys.path when run as a script)
import torch

from corda_kernels.linalg import damp_covariance, default_oversample, randomized_svd

TARGET = 1e-4


def real_families(layers, cache):
    """``{family: [(A, exact singular values)]}`` for the SmolLM2 weights and weight x covariance."""
    weights, products = [], []
    for W, C in smollm2_matrices.load(layers, cache).values():
        weights.append(W)
        products.append(W @ damp_covariance(C).covariance)
    return {
        name: [(A, torch.linalg.svdvals(A.double())) for A in mats] for name, mats in (("W", weights), ("WC", products))
    }


def power_law(n, alpha, seed=0):
    """An ``n x n`` fp32 matrix with singular values ``i^-alpha`` (returned too) and random vectors."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    s = torch.arange(1, n + 1, dtype=torch.float64) ** -alpha
    return (U * s.float()) @ V.T, s


def metrics(A64, sv, U, S, Vh, r):
    approx = (U.double() * S.double()) @ Vh.double()
    err = (A64 - approx).norm()
    opt = sv[r:].square().sum().sqrt()
    excess = ((err - opt) / opt).item()
    deficit = (1 - S.double().square().sum() / sv[:r].square().sum()).item()
    return max(excess, 0.0), max(deficit, 0.0)


def oversample(spec: str, r: int) -> int:
    """``"10"`` -> 10; ``"2r"`` -> 2 * r; ``"default"`` -> randomized_svd's default for rank r."""
    if spec == "default":
        return default_oversample(r)
    return int(spec[:-1] or 1) * r if spec.endswith("r") else int(spec)


def sweep(A, r, p, iters, seed):
    """randomized_svd after each power-iteration count in ``iters`` (the same seed: the same sketch)."""
    for q in iters:
        yield randomized_svd(A, r, oversample=p, n_iter=q, seed=seed)


def measure(families, ranks, oversamples, iters, seeds):
    rows = []
    for family, mats in families.items():
        for r in ranks:
            for spec in oversamples:
                p = oversample(spec, r)
                excess, deficit = [0.0] * len(iters), [0.0] * len(iters)
                for A, sv in mats:
                    if r + p >= min(A.shape):
                        continue  # the sketch spans everything: exact
                    A64 = A.double()
                    for seed in seeds:
                        for j, (U, S, Vh) in enumerate(sweep(A, r, p, iters, seed)):
                            e, d = metrics(A64, sv, U, S, Vh, r)
                            excess[j], deficit[j] = max(excess[j], e), max(deficit[j], d)
                rows.append((family, r, spec, excess, deficit))
                print(_row(rows[-1], iters), flush=True)
    return rows


def _first(values, iters):
    q = next((q for q, v in zip(iters, values) if v <= TARGET), None)
    return f">{iters[-1]}" if q is None else str(q)


def _row(row, iters):
    family, r, p, excess, deficit = row
    cells = " | ".join(f"{e:.0e} / {d:.0e}" for e, d in zip(excess, deficit))
    return f"| {family} | {r} | {p} | {cells} | {_first(excess, iters)} | {_first(deficit, iters)} |"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=None, help="a .pt file caching the SmolLM2 weights and covariances")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument(
        "--oversample", nargs="+", default=["10", "20", "r", "2r"], help='e.g. 10, "2r" (2 * rank) or "default"'
    )
    parser.add_argument("--iters", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5, 6, 8])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--synthetic", action="store_true", help="add 4096 x 4096 power-law spectra")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.3, 0.6, 1.0])
    parser.add_argument("--no-real", action="store_true", help="skip the SmolLM2 matrices")
    args = parser.parse_args()

    families = {} if args.no_real else real_families(tuple(args.layers), args.cache)
    if args.synthetic:
        for a in args.alphas:
            families[f"power a={a:g}"] = [power_law(4096, a)]  # its singular values are known
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; target max(excess, deficit) <= {TARGET:g}")
    print(f"| family | r | p | {' | '.join(f'q={q}' for q in args.iters)} | min q (excess) | min q (deficit) |")
    print("| --- | --- | --- |" + " --- |" * (len(args.iters) + 2))
    measure(families, args.ranks, args.oversample, args.iters, range(args.seeds))


if __name__ == "__main__":
    main()
