"""Normalization layers: BKN, Batch Renormalization, ghost-batch BN (thin 1d/2d/3d subclasses) and
Synchronized BN (statistics pooled over a process group, on the CPU too)."""

from ._base import BatchStatNorm
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from .kalman import BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d, _BatchKalmanNorm
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
]
