"""Decompositions (pure torch, batched over leading dims; cuSOLVER/cuBLAS through ``torch.linalg``
on a GPU): randomized top-r SVD, exact top-r and bottom-r triplets, top-r triplets at an fp32 SVD's
accuracy (block Krylov), CorDA's CO-SVD and damping."""

from .co_svd import CoSVD, DampedCovariance, co_svd, co_svd_shared, damp_covariance
from .exact_svd import largest_singular_triplets, smallest_singular_triplets
from .randomized_svd import DEFAULT_N_ITER, default_oversample, randomized_svd
from .top_svd import top_singular_triplets

__all__ = [
    "CoSVD",
    "DampedCovariance",
    "co_svd",
    "co_svd_shared",
    "damp_covariance",
    "largest_singular_triplets",
    "randomized_svd",
    "DEFAULT_N_ITER",
    "default_oversample",
    "smallest_singular_triplets",
    "top_singular_triplets",
]
