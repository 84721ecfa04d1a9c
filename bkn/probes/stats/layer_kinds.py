"""Which modules are normalization layers, and of which kind (batch statistics or per-sample).

Batch-statistic norms (``torch.nn.BatchNorm*``, ``SyncBatchNorm`` and every
:class:`bkn.layers.BatchStatNorm`: ghost BN, BRN, BKN) normalize with statistics over
the samples of a batch or group; they are the layers whose estimates drift. Per-sample
norms (GroupNorm, LayerNorm, InstanceNorm) normalize each sample on its own.
"""

from __future__ import annotations

from torch import nn

from bkn.layers import BatchStatNorm

BATCH_NORMS: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm, BatchStatNorm)
PER_SAMPLE_NORMS: tuple[type, ...] = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def is_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` normalizes with batch statistics in training mode (BN, ghost BN, BRN, BKN)."""
    return isinstance(module, BATCH_NORMS)


def is_per_sample_norm(module: nn.Module) -> bool:
    """Whether ``module`` normalizes each sample on its own (GroupNorm, LayerNorm, InstanceNorm)."""
    return isinstance(module, PER_SAMPLE_NORMS)


def normalization_layers(model: nn.Module, per_sample: bool = True) -> dict[str, nn.Module]:
    """Normalization layers of ``model`` by module name (registration order, not execution order)."""
    return {name: m for name, m in model.named_modules() if is_batch_norm(m) or (per_sample and is_per_sample_norm(m))}


def groups_of(module: nn.Module, channels: int) -> int:
    """How many groups of channels a per-sample norm normalizes together (C for InstanceNorm)."""
    if isinstance(module, nn.GroupNorm):
        return module.num_groups
    if isinstance(module, nn.LayerNorm):
        return 1
    return channels  # InstanceNorm: every channel on its own
