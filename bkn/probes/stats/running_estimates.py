"""Writing statistics into the running estimates of batch-statistic norms (PreciseBN-style evaluation)."""

from __future__ import annotations

import torch
from torch import nn

from bkn.probes.stats.layer_kinds import is_batch_norm
from bkn.probes.stats.normalizing import Stats


def use_population_statistics(model: nn.Module, stats: Stats) -> nn.Module:
    """Write ``stats`` (from :func:`bkn.probes.stats.population_statistics`) into the layers' running estimates.

    ``running_mean``/``running_var`` are overwritten (cast to their dtype); Batch
    Renormalization's moving std is synced from the variance, so eval mode normalizes
    with exactly these statistics. Returns ``model``.

    Raises ``ValueError`` for a name that is not a module of ``model``, a module that is
    not a batch-statistic norm or keeps no running estimates, or statistics of the wrong shape.
    """
    modules = dict(model.named_modules())
    for name, (mean, var) in stats.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"use_population_statistics: the model has no module named {name!r}")
        _check_statistics(name, module, mean, var)
        with torch.no_grad():
            if getattr(module, "running_mean", None) is not None:  # EvoNorm-B0 keeps a running variance only
                module.running_mean.copy_(mean)
            module.running_var.copy_(var)
            if hasattr(module, "sync_running_std"):  # BRN: eval normalizes with its moving std
                module.sync_running_std()
    return model


def _check_statistics(name: str, module: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> None:
    """``module`` keeps running estimates that ``(mean, var)`` can replace, or a ``ValueError`` says why not."""
    if not is_batch_norm(module):
        raise ValueError(
            f"use_population_statistics: {name!r} is a {type(module).__name__}, which "
            f"keeps no running estimates; expected a batch-statistic norm "
            f"(BN, ghost BN, BRN, BKN)"
        )
    if getattr(module, "running_var", None) is None:
        raise ValueError(f"use_population_statistics: {name!r} has no running estimates (track_running_stats=False)")
    expected = tuple(module.running_var.shape)
    if tuple(mean.shape) != expected or tuple(var.shape) != expected:
        raise ValueError(
            f"use_population_statistics: statistics for {name!r} must have shape "
            f"{expected}, got mean {tuple(mean.shape)} and var {tuple(var.shape)}"
        )
    if not bool(torch.isfinite(mean).all() and torch.isfinite(var).all() and (var >= 0).all()):
        raise ValueError(f"use_population_statistics: statistics for {name!r} must be finite with var >= 0")
