"""Public ops: input validation, backend dispatch, autograd and ``torch.library`` registration.

``covariance_update`` (``corda_kernels::covariance_update``), ``lowrank_linear``
(``corda_kernels::lowrank_linear`` and its backward) and ``lowrank_linear_segmented``
(``corda_kernels::lowrank_linear_segmented`` and its backward, :mod:`.segmented`) are the registered
ops; the decompositions (randomized / exact SVD, CO-SVD) are plain torch compositions in
:mod:`corda_kernels.linalg`.
"""

from .covariance import CovarianceAccumulator, covariance_update, finalize_covariance, symmetrize_

# `lowrank_linear` is both a submodule and its op; the op is imported from `ops.lowrank_linear` (or the
# package root) so that the submodule keeps its name here.
__all__ = ["CovarianceAccumulator", "covariance_update", "finalize_covariance", "symmetrize_"]
