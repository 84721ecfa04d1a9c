"""Per-(group, channel) reductions shared by the cross-iteration norms (MABN, CBN).

A batch of ``N = G * g`` samples is viewed as ``G`` groups of ``g`` consecutive samples
(docs/design.md §3); a statistic of shape (G, C) is reduced over a group's samples and
positions, and broadcast back to the input's shape.
"""

from __future__ import annotations

import torch


def group_mean(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean of ``t`` (N, C, ...) over each group's samples and positions: shape (G, C)."""
    tg = t.unflatten(0, (groups, t.shape[0] // groups))
    dims = (1,) + tuple(range(3, tg.dim()))
    return tg.mean(dims)


def expand(stat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (G, C) statistic viewed so that it broadcasts over ``like`` (N, C, ...) grouped as (G, g, C, ...)."""
    return stat.view(stat.shape[0], 1, stat.shape[1], *([1] * (like.dim() - 2)))


def grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``x`` (N, C, ...) as (G, g, C, ...) (a view)."""
    return x.unflatten(0, (groups, x.shape[0] // groups))


def check_window(owner: str, name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value
