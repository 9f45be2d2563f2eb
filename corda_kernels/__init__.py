"""corda_kernels: kernels and a drop-in toolkit for data-aware low-rank fine-tuning.

The data flow is calibrate -> decompose -> adapt -> export (see README.md):

>>> cal = corda_kernels.calibrate(model, batches)                       # 1. covariances
>>> corda_kernels.apply(model, "corda", mode="kpa", rank=16, covariances=cal)  # 2.+3.
>>> corda_kernels.save_peft_adapter(model, "adapter")                   # 4.
"""

import logging as _logging

from .adapt import apply
from .blockwise import apply_blockwise
from .calibrate import Calibration, calibrate
from .export import merge, save_merged_model, save_peft_adapter, save_residual_model, unload
from .integrations.peft_patch import patch_peft, unpatch_peft
from .memory import MemoryEstimate, estimate_memory
from .nn import LowRankLinear
from .ops import CovarianceAccumulator, covariance_update, finalize_covariance, symmetrize_
from .ops.co_svd import co_svd, damp_covariance
from .ops.exact_svd import smallest_singular_triplets
from .ops.lowrank_linear import lowrank_linear
from .ops.randomized_svd import randomized_svd

_logging.getLogger("corda_kernels").addHandler(_logging.NullHandler())

__version__ = "0.1.0"
__all__ = [
    "Calibration",
    "CovarianceAccumulator",
    "LowRankLinear",
    "MemoryEstimate",
    "apply",
    "apply_blockwise",
    "calibrate",
    "co_svd",
    "covariance_update",
    "damp_covariance",
    "estimate_memory",
    "finalize_covariance",
    "lowrank_linear",
    "merge",
    "patch_peft",
    "randomized_svd",
    "save_merged_model",
    "save_peft_adapter",
    "save_residual_model",
    "smallest_singular_triplets",
    "symmetrize_",
    "unload",
    "unpatch_peft",
]
