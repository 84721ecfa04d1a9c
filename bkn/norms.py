"""One registry of normalization layers, used by the models, the suites and the probes.

    >>> from bkn import norms
    >>> norms.names()
    ('bn', 'bkn', 'brn', 'syncbn', 'gn', 'ln', 'in', 'gn-ws', 'frn', 'evonorm-b0', 'evonorm-s0', 'mabn', 'cbn')
    >>> layer = norms.create("bkn", 64, p=0.9, transition="official", group_size=2)

``spatial_dims`` picks the input rank: 0 for (N, C) features, 1 for (N, C, L),
2 (default) for (N, C, H, W), 3 for (N, C, D, H, W). Batch-dependent norms
(bn, brn, bkn) take ``group_size``; ``bn`` without it is ``torch.nn.BatchNorm*d``
itself (the baseline every benchmark is compared to). ``syncbn`` pools its statistics
over the workers of a ``torch.distributed`` process group (:mod:`bkn.layers.sync`).
"""

from __future__ import annotations

import inspect

from torch import nn

from . import layers
from .norm_kinds import BATCH_DEPENDENT_NORMS, NAMES, RIVAL_NORMS

_NAMES = NAMES
_BATCH_DEPENDENT = BATCH_DEPENDENT_NORMS
_TORCH_BN = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_GHOST_BN = {
    0: layers.GhostBatchNorm1d,
    1: layers.GhostBatchNorm1d,
    2: layers.GhostBatchNorm2d,
    3: layers.GhostBatchNorm3d,
}
_BKN = {
    0: layers.BatchKalmanNorm1d,
    1: layers.BatchKalmanNorm1d,
    2: layers.BatchKalmanNorm2d,
    3: layers.BatchKalmanNorm3d,
}
_BRN = {0: layers.BatchRenorm1d, 1: layers.BatchRenorm1d, 2: layers.BatchRenorm2d, 3: layers.BatchRenorm3d}
_MABN = {
    0: layers.MovingAverageBatchNorm1d,
    1: layers.MovingAverageBatchNorm1d,
    2: layers.MovingAverageBatchNorm2d,
    3: layers.MovingAverageBatchNorm3d,
}
_CBN = {
    0: layers.CrossIterationBatchNorm1d,
    1: layers.CrossIterationBatchNorm1d,
    2: layers.CrossIterationBatchNorm2d,
    3: layers.CrossIterationBatchNorm3d,
}
_IN = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def names() -> tuple[str, ...]:
    """Names accepted by :func:`create`."""
    return _NAMES


def batch_dependent(name: str) -> bool:
    """Whether the norm's training-mode statistics depend on the other samples of the batch."""
    return _check_name(name) in _BATCH_DEPENDENT


MIN_GROUP_CHANNELS = 4  # GN's groups hold at least this many channels (docs/design.md §7)


def gn_groups(num_channels: int, max_groups: int = 32, min_channels: int = MIN_GROUP_CHANNELS) -> int:
    """GroupNorm's group count: the largest divisor ``G`` of ``C`` with ``G <= 32`` and ``C / G >= 4``.

    32 groups when ``C`` allows (``C`` = 128, 256, ...); fewer when ``C`` is small, never fewer
    than 4 channels per group, so that GN is not InstanceNorm on narrow layers (with one
    channel per group at ``C`` <= 32 it was: issue 12). ``C`` = 16 -> 4 groups, 32 -> 8,
    64 -> 16; 1 group (LayerNorm over channels and positions) when no divisor qualifies
    (``C`` < 8 or prime).
    """
    if not isinstance(num_channels, int) or num_channels < 1:
        raise ValueError(f"gn_groups: num_channels must be a positive int, got {num_channels!r}")
    divisors = range(1, min(max_groups, num_channels) + 1)
    return max((g for g in divisors if num_channels % g == 0 and num_channels // g >= min_channels), default=1)


def _check_name(name: str) -> str:
    if name not in _NAMES:
        raise ValueError(f"unknown norm {name!r}; known norms: {', '.join(_NAMES)}")
    return name


def _build(name: str, cls, *args, **options) -> nn.Module:
    accepted = set(inspect.signature(cls).parameters) - {
        "self",
        "num_features",
        "num_channels",
        "num_groups",
        "normalized_shape",
    }
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"norm {name!r} ({cls.__name__}) does not take option(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(sorted(accepted))}"
        )
    return cls(*args, **options)


def create(name: str, num_features: int, *, spatial_dims: int = 2, **options) -> nn.Module:
    """Build normalization layer ``name`` for ``num_features`` channels.

    Raises ``ValueError`` for an unknown name (listing the known ones), an unknown
    option (listing the accepted ones) or an unsupported ``spatial_dims``.
    """
    _check_name(name)
    if spatial_dims not in (0, 1, 2, 3):
        raise ValueError(f"norm {name!r}: spatial_dims must be 0, 1, 2 or 3, got {spatial_dims!r}")
    if name in RIVAL_NORMS:
        return _rival(name, num_features, spatial_dims, options)
    if name == "bn":
        if options.get("group_size") is None:
            options.pop("group_size", None)
            return _build(name, _TORCH_BN[spatial_dims], num_features, **options)
        return _build(name, _GHOST_BN[spatial_dims], num_features, **options)
    if name == "bkn":
        return _build(name, _BKN[spatial_dims], num_features, **options)
    if name == "brn":
        return _build(name, _BRN[spatial_dims], num_features, **options)
    if name == "mabn":
        return _build(name, _MABN[spatial_dims], num_features, **options)
    if name == "cbn":
        return _build(name, _CBN[spatial_dims], num_features, **options)
    if name == "syncbn":
        if options.pop("group_size", None) is not None:
            raise ValueError(
                "norm 'syncbn' pools its statistics over the workers of a process group and takes no "
                "group_size (each worker's batch is its share of the pooled batch)"
            )
        return _build(name, layers.SyncBatchNorm, num_features, **options)
    if options.get("group_size") is not None:
        raise ValueError(
            f"norm {name!r} normalizes each sample on its own and takes no group_size "
            f"(got group_size={options['group_size']})"
        )
    options.pop("group_size", None)
    if name == "gn":
        groups = options.pop("num_groups", gn_groups(num_features))
        return _build(name, nn.GroupNorm, groups, num_features, **options)
    if name == "ln":
        if spatial_dims == 0:
            return _build(name, nn.LayerNorm, num_features, **options)
        return _build(name, nn.GroupNorm, 1, num_features, **options)
    if spatial_dims == 0:
        raise ValueError("norm 'in' (instance norm) needs spatial positions; (N, C) features have none")
    options.setdefault("affine", True)
    return _build(name, _IN[spatial_dims], num_features, **options)


def _rival(name: str, num_features: int, spatial_dims: int, options: dict) -> nn.Module:
    """A rival from timm's layers (:mod:`bkn.rivals.layers`, docs/design.md §15); imports timm."""
    if spatial_dims not in (1, 2):
        raise ValueError(
            f"norm {name!r}: spatial_dims must be 1 or 2 (timm's rivals are 2-d layers, a 1-d input runs as "
            f"(N, C, L, 1)), got {spatial_dims!r}"
        )
    if name != "evonorm-b0" and options.get("group_size") is not None:
        raise ValueError(
            f"norm {name!r} normalizes each sample on its own and takes no group_size "
            f"(got group_size={options['group_size']})"
        )
    if name != "evonorm-b0":
        options.pop("group_size", None)
    if name == "gn-ws":  # the norm; bkn.convert swaps the convolutions for weight-standardized ones
        groups = options.pop("num_groups", gn_groups(num_features))
        return _build(name, nn.GroupNorm, groups, num_features, **options)
    from .rivals import layers as rivals

    if name == "evonorm-s0":
        options.setdefault("groups", gn_groups(num_features))
    return _build(name, rivals.NORMS[name], num_features, **options)
