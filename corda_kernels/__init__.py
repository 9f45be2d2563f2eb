"""corda_kernels: kernels and a drop-in toolkit for data-aware low-rank fine-tuning.

The data flow is calibrate -> decompose -> adapt -> export; see README.md.
"""

import logging as _logging

from .calibrate import Calibration, calibrate
from .ops import CovarianceAccumulator, covariance_update, finalize_covariance, symmetrize_

_logging.getLogger("corda_kernels").addHandler(_logging.NullHandler())

__version__ = "0.1.0"
__all__ = [
    "Calibration",
    "CovarianceAccumulator",
    "calibrate",
    "covariance_update",
    "finalize_covariance",
    "symmetrize_",
]
