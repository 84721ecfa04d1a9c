"""The quantile summary of a few measured values: median and quartiles. Torch-free (``analysis`` may use it).

One home for what the demo, ``suites.chain_cost`` and ``suites.chain_cost_spread`` report
over rounds or processes: :func:`quartiles` (q25, median, q75), :func:`spread` (those and
min, max, n) and :func:`paired_ratios` (per-round ratios of two entries timed in the same
rounds). The quartiles are :func:`statistics.quantiles` with ``n=4``: ``method="inclusive"``
is numpy's default (linear) quantile, ``"exclusive"`` numpy's ``"weibull"``; one value is
its own three quartiles.
"""

from __future__ import annotations

import statistics

METHODS = ("inclusive", "exclusive")


def quartiles(values, method: str = "inclusive") -> tuple[float, float, float]:
    """``(q25, median, q75)`` of ``values`` (at least one); ``method`` as :func:`statistics.quantiles`."""
    values = list(values)
    if method not in METHODS:
        raise ValueError(f"quartiles: method must be one of {METHODS}, got {method!r}")
    if not values:
        raise ValueError("quartiles: no values")
    if len(values) == 1:
        return (values[0],) * 3
    q1, q2, q3 = statistics.quantiles(values, n=4, method=method)
    return q1, q2, q3


def spread(values, method: str = "inclusive") -> dict:
    """``{"median", "q25", "q75", "min", "max", "n"}`` of ``values`` (at least one)."""
    values = list(values)
    q25, median, q75 = quartiles(values, method)
    return {"median": median, "q25": q25, "q75": q75, "min": min(values), "max": max(values), "n": len(values)}


def paired_ratios(samples: dict, name: str, base: str) -> list[float]:
    """``samples[name][r] / samples[base][r]`` for every round ``r`` (entries timed in the same rounds)."""
    return [a / b for a, b in zip(samples[name], samples[base])]
