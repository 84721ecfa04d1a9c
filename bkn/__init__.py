"""bkn: Batch Kalman Normalization and its rivals, for benchmarking under micro-batches.

* :mod:`bkn.layers` - BKN, Batch Renormalization, ghost-batch BN layers.
* :mod:`bkn.transitions` - how a BKN layer's prior is propagated (official, analytic, identity).
* :mod:`bkn.norms` - the registry ``create(name, C, **options)`` used everywhere.
* :func:`bkn.convert` - swap the BatchNorms of any model (torchvision ResNets...) and wire BKN priors.
* :mod:`bkn.models` - the paper's CIFAR ResNet.
"""
from . import layers, norms, transitions
from .convert import convert, prior_summary
from .layers import (
                     BatchKalmanNorm1d,
                     BatchKalmanNorm2d,
                     BatchKalmanNorm3d,
                     BatchRenorm1d,
                     BatchRenorm2d,
                     BatchRenorm3d,
                     GhostBatchNorm1d,
                     GhostBatchNorm2d,
                     GhostBatchNorm3d,
)

__version__ = "0.1.0"

__all__ = [
    "layers", "norms", "transitions", "convert", "prior_summary",
    "BatchKalmanNorm1d", "BatchKalmanNorm2d", "BatchKalmanNorm3d",
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
    "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
]
