"""Normalization layers: BKN, Batch Renormalization, ghost-batch BN (thin 1d/2d/3d subclasses),
Synchronized BN (statistics pooled over a process group, on the CPU too), and the cross-iteration
rivals MABN (with its centred convolutions) and Cross-Iteration BN."""

from ._base import BatchStatNorm
from .cross_iteration import CrossIterationBatchNorm1d, CrossIterationBatchNorm2d, CrossIterationBatchNorm3d
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from .kalman import BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d, _BatchKalmanNorm
from .mabn import (
    CenteredConv1d,
    CenteredConv2d,
    CenteredConv3d,
    MovingAverageBatchNorm1d,
    MovingAverageBatchNorm2d,
    MovingAverageBatchNorm3d,
)
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, RenormSchedule
from .sync import SyncBatchNorm

__all__ = [
    "BatchStatNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "BatchKalmanNorm1d",
    "BatchKalmanNorm2d",
    "BatchKalmanNorm3d",
    "_BatchKalmanNorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "RenormSchedule",
    "SyncBatchNorm",
    "MovingAverageBatchNorm1d",
    "MovingAverageBatchNorm2d",
    "MovingAverageBatchNorm3d",
    "CenteredConv1d",
    "CenteredConv2d",
    "CenteredConv3d",
    "CrossIterationBatchNorm1d",
    "CrossIterationBatchNorm2d",
    "CrossIterationBatchNorm3d",
]
