"""Public functional ops: input validation, backend dispatch, autograd, torch.library registration."""

from .covariance import CovarianceAccumulator, covariance_update, finalize_covariance, symmetrize_

__all__ = ["CovarianceAccumulator", "covariance_update", "finalize_covariance", "symmetrize_"]
