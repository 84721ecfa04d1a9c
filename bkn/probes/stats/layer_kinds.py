"""Which modules are normalization layers, and of which kind (batch statistics or per-sample).

Batch-statistic norms (``torch.nn.BatchNorm*``, ``SyncBatchNorm`` and every
:class:`bkn.layers.BatchStatNorm`: ghost BN, BRN, BKN) normalize with statistics over
the samples of a batch or group; they are the layers whose estimates drift. Per-sample
norms (GroupNorm, LayerNorm, InstanceNorm) normalize each sample on its own. The rivals from
timm (:mod:`bkn.rivals.layers`) say their kind themselves (``bkn_statistics``) and how they
normalize with given statistics (``normalize_with``).
"""

from __future__ import annotations

from torch import nn

from bkn.layers import BatchStatNorm

BATCH_NORMS: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm, BatchStatNorm)
PER_SAMPLE_NORMS: tuple[type, ...] = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def _rival_kind(module: nn.Module) -> str | None:
    """A rival's kind (``"batch"``: EvoNorm-B0; ``"per_sample"``: FRN, EvoNorm-S0), read from the layer's
    ``bkn_statistics`` (:mod:`bkn.rivals.layers`, which imports timm: not imported here)."""
    return getattr(type(module), "bkn_statistics", None)


def is_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` normalizes with batch statistics in training mode (BN, ghost BN, BRN, BKN, EvoNorm-B0)."""
    return isinstance(module, BATCH_NORMS) or _rival_kind(module) == "batch"


def has_estimates(module: nn.Module) -> bool:
    """Whether ``module`` normalizes with a per-channel (mean, variance) estimate that can be compared with the
    population's (BN, ghost BN, BRN, BKN; not EvoNorm-B0, which divides by a batch std without centring)."""
    return isinstance(module, BATCH_NORMS)


def is_per_sample_norm(module: nn.Module) -> bool:
    """Whether ``module`` normalizes each sample on its own (GroupNorm, LayerNorm, InstanceNorm, FRN, EvoNorm-S0)."""
    return isinstance(module, PER_SAMPLE_NORMS) or _rival_kind(module) == "per_sample"


def normalization_layers(model: nn.Module, per_sample: bool = True) -> dict[str, nn.Module]:
    """Normalization layers of ``model`` by module name (registration order, not execution order)."""
    return {name: m for name, m in model.named_modules() if is_batch_norm(m) or (per_sample and is_per_sample_norm(m))}


def groups_of(module: nn.Module, channels: int) -> int:
    """How many groups of channels a per-sample norm normalizes together (C for InstanceNorm)."""
    if isinstance(module, nn.GroupNorm):
        return module.num_groups
    if isinstance(module, nn.LayerNorm):
        return 1
    if _rival_kind(module) == "per_sample":
        return getattr(module, "groups", channels)  # EvoNorm-S0's groups; FRN: every channel on its own
    return channels  # InstanceNorm: every channel on its own
