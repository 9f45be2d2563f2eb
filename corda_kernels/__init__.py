"""corda_kernels: kernels and a drop-in toolkit for data-aware low-rank fine-tuning.

The data flow is calibrate -> decompose -> adapt -> export (see README.md):

>>> cal = corda_kernels.calibrate(model, batches)                       # 1. covariances
>>> corda_kernels.apply(model, "corda", mode="kpa", rank=16, covariances=cal)  # 2.+3.
>>> corda_kernels.save_peft_adapter(model, "adapter")                   # 4.
"""

import logging as _logging
import warnings as _warnings

# The pipeline (calibrate -> decompose -> adapt -> export), its estimate and report, the module, the
# PEFT bridge; then the registered ops and the decompositions. `__all__` groups them in that order.
from ._backend import CordaWarning
from ._version import __version__
from .adapt import adapter_names, adapter_rows, apply, set_adapter
from .blockwise import apply_blockwise
from .calibration import Calibration, calibrate
from .config import AdaptConfig
from .decomposition import decompose
from .export import merge, save_merged_model, save_peft_adapter, save_residual_model, unload
from .integrations.peft_global import patch_peft, peft_patched, unpatch_peft
from .linalg import (
    co_svd,
    co_svd_shared,
    damp_covariance,
    largest_singular_triplets,
    randomized_svd,
    smallest_singular_triplets,
    top_singular_triplets,
)
from .memory import MemoryEstimate, estimate_memory
from .methods.parameters import trainable_parameter_report
from .nn import LowRankLinear
from .ops import CovarianceAccumulator, covariance_update, finalize_covariance
from .ops.dora import dora_linear
from .ops.lowrank_linear import lowrank_linear
from .ops.segmented import lowrank_linear_segmented

_logging.getLogger("corda_kernels").addHandler(_logging.NullHandler())

__all__ = [
    "__version__",
    "CordaWarning",
    # pipeline: 1. calibrate, 2. decompose (apply runs it for you), 3. adapt, 1-3 block-wise, 4. export
    "Calibration",
    "calibrate",
    "decompose",
    "AdaptConfig",
    "apply",
    "apply_blockwise",
    "set_adapter",
    "adapter_names",
    "adapter_rows",
    "merge",
    "unload",
    "save_merged_model",
    "save_peft_adapter",
    "save_residual_model",
    # before running: peak memory; after adapting: what trains
    "MemoryEstimate",
    "estimate_memory",
    "trainable_parameter_report",
    # modules and PEFT
    "LowRankLinear",
    "patch_peft",
    "unpatch_peft",
    "peft_patched",
    # ops and decompositions
    "CovarianceAccumulator",
    "covariance_update",
    "finalize_covariance",
    "lowrank_linear",
    "lowrank_linear_segmented",
    "dora_linear",
    "co_svd",
    "co_svd_shared",
    "damp_covariance",
    "largest_singular_triplets",
    "top_singular_triplets",
    "randomized_svd",
    "smallest_singular_triplets",
]

# Names that left the top level: still importable, with a DeprecationWarning.
_MOVED = {"symmetrize_": ("corda_kernels.ops.covariance", "symmetrize_")}


def __getattr__(name):
    if name in _MOVED:
        import importlib

        module, attr = _MOVED[name]
        _warnings.warn(f"corda_kernels.{name} is deprecated; use {module}.{attr}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'corda_kernels' has no attribute {name!r}")
