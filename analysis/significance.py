"""Is a change in a benchmark's samples real? The two-sided Mann-Whitney U test.

Benchmark timings are not normal (a floor plus a long right tail from interruptions),
so the test is rank-based, as in ``asv compare``: with samples ``x`` (baseline, size
m) and ``y`` (head, size n), the statistic

    U = #{(i, j): x_i > y_j} + 1/2 #{(i, j): x_i = y_j}

has, when both come from the same distribution, mean mn/2 and a null distribution
that does not depend on that distribution. The two-sided p-value is
``2 min(P(U <= u), P(U >= u))``:

* exactly, from the counts of rank arrangements (the coefficients of the Gaussian
  binomial ``[m+n choose m]_q``), when there are no ties and ``m n <= 2500``;
* otherwise from the normal approximation with tie correction,
  ``sigma^2 = mn/12 ((N+1) - sum(t^3 - t)/(N(N-1)))`` and a continuity correction of 1/2.

With few samples no arrangement is unlikely enough: the smallest two-sided exact
p-value is ``2 / C(m+n, m)`` (:func:`min_p_value`); callers check it before trusting
a "not significant" (one sample per side, as ``asv run --quick`` records, can never be).
"""

from __future__ import annotations

import functools
import math

import numpy as np

EXACT_MAX_PRODUCT = 2500  # m*n up to which the exact null distribution is used


@functools.lru_cache(maxsize=256)
def _u_counts(m: int, n: int) -> tuple[int, ...]:
    """Number of rank arrangements with U = 0..mn: coefficients of the Gaussian binomial [m+n choose m]_q.

    Built as prod_{i=1..m} (1 - q^(n+i)) / (1 - q^i), exactly, in Python integers.
    """
    size = m * n + 1
    poly = [0] * size
    poly[0] = 1
    for i in range(1, m + 1):
        k = n + i  # multiply by (1 - q^k)
        for u in range(size - 1, k - 1, -1):
            poly[u] -= poly[u - k]
        for u in range(i, size):  # divide by (1 - q^i): a running sum with stride i
            poly[u] += poly[u - i]
    return tuple(poly)


def min_p_value(m: int, n: int) -> float:
    """The smallest two-sided p-value any two samples of sizes m and n can give (exact test)."""
    if m == 0 or n == 0:
        return 1.0
    return min(1.0, 2.0 / math.comb(m + n, m))


def mann_whitney_u(x, y) -> tuple[float, float, str]:
    """Two-sided Mann-Whitney U test of ``x`` against ``y``; returns ``(U, p, method)``.

    ``U`` counts pairs with ``x_i > y_j`` (ties count 1/2); ``method`` is ``"exact"`` or
    ``"normal"`` (see the module docstring for when each is used). NaNs are dropped.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    x, y = x[~np.isnan(x)], y[~np.isnan(y)]
    m, n = len(x), len(y)
    if m == 0 or n == 0:
        raise ValueError(f"mann_whitney_u needs samples on both sides, got sizes {m} and {n}")
    both = np.concatenate([x, y])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(len(both))
    sorted_values = both[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    u = float(ranks[:m].sum() - m * (m + 1) / 2.0)
    has_ties = bool((counts > 1).any())

    if not has_ties and m * n <= EXACT_MAX_PRODUCT:
        counts_u = _u_counts(m, n)
        total = math.comb(m + n, m)
        k = int(round(u))
        lower = sum(counts_u[: k + 1]) / total
        upper = sum(counts_u[k:]) / total
        return u, min(1.0, 2.0 * min(lower, upper)), "exact"

    big_n = m + n
    tie_term = float(((counts**3) - counts).sum()) / (big_n * (big_n - 1))
    sigma = math.sqrt(m * n / 12.0 * ((big_n + 1) - tie_term))
    if sigma == 0.0:  # every value equal: no evidence of a difference
        return u, 1.0, "normal"
    z = (abs(u - m * n / 2.0) - 0.5) / sigma
    p = math.erfc(max(z, 0.0) / math.sqrt(2.0))  # = 2 * (1 - Phi(z))
    return u, min(1.0, p), "normal"
