"""Stage 1, calibrate: stream every target layer's input covariance (hooks, sharing, padding,
checkpoints, data-parallel sharding) into a :class:`Calibration`."""

from .collect import calibrate
from .result import Calibration

__all__ = ["Calibration", "calibrate"]
