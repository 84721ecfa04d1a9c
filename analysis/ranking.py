"""Which method is best at a group of 2, and which differences the run resolves: ranks with paired tests.

The training probe trains every method from the same seeds: seed ``s`` fixes the weight
initialization (``torch.manual_seed(s)`` before the network is built; the norms draw
nothing) and the data order (the engine's own generator, seeded with ``s``), so method A
and method B at seed ``s`` differ only in the norm. Their accuracies are therefore
compared *paired over seeds*:

* ``d_s = acc_A(s) - acc_B(s)`` over the seeds both have, ``t = mean(d) / (sd(d) / sqrt(n))``
  with ``n - 1`` degrees of freedom, two-sided p-value (:func:`paired_t`; scipy's
  ``ttest_rel`` computes the same). When every ``d_s`` is equal the test is degenerate:
  p = 1 if they are all 0, else 0. With fewer than 2 common seeds there is no test (NaN);
* every pair of methods in one table is one family of ``m (m - 1) / 2`` tests, corrected for
  their number with Holm's step-down method (:func:`holm`): sort the p-values,
  ``p_(i) * (K - i + 1)``, made monotone, capped at 1. A difference is *significant* when its
  adjusted p-value is below ``alpha`` (default 0.05): the chance of calling any equal pair
  different stays at most ``alpha``;
* :func:`ranked` ranks methods by mean accuracy and says, for each rank, whether it is
  significantly above the next one (*resolved*) and which lower ranks it is significantly
  above;
* :func:`seeds_needed`: how many seeds a paired t-test needs to find a gap of ``gap`` points
  with probability ``power`` at level ``alpha``, given the standard deviation of the paired
  differences (noncentral t; :func:`paired_sd` estimates that deviation from a run).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

DEFAULT_ALPHA = 0.05
DEFAULT_GAP = 0.5  # accuracy points: the gaps between neighbouring methods in the findings table
DEFAULT_POWER = 0.8
RANK_COLUMNS = (
    "rank",
    "method",
    "label",
    "mean",
    "sd",
    "seeds",
    "gap_to_next",
    "p_next",
    "resolved_next",
    "above",
)


def paired_t(a, b) -> tuple[float, float, float, int]:
    """Two-sided paired t-test of ``a`` against ``b`` (paired by position): ``(mean(a - b), t, p, n)``.

    Pairs with a NaN on either side are dropped; fewer than 2 pairs give NaN for t and p.
    """
    from scipy import stats  # the analysis extra; only the t distribution's tail comes from it

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_t needs two 1-d arrays of the same length, got shapes {a.shape} and {b.shape}")
    keep = ~(np.isnan(a) | np.isnan(b))
    d = a[keep] - b[keep]
    n = len(d)
    if n < 2:
        return (float(d.mean()) if n else math.nan), math.nan, math.nan, n
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd <= 1e-12 * max(abs(mean), 1e-12):
        return mean, (0.0 if mean == 0 else math.copysign(math.inf, mean)), (1.0 if mean == 0 else 0.0), n
    t = mean / (sd / math.sqrt(n))
    return mean, t, float(2.0 * stats.t.sf(abs(t), n - 1)), n


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the input's order (NaN stays NaN and does not count as a test)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, math.nan)
    tested = np.flatnonzero(~np.isnan(p))
    k = len(tested)
    running = 0.0
    for i, index in enumerate(tested[np.argsort(p[tested], kind="mergesort")]):
        running = max(running, min(1.0, (k - i) * p[index]))
        out[index] = running
    return out


def pairs(accuracy: pd.DataFrame, alpha: float = DEFAULT_ALPHA) -> pd.DataFrame:
    """Every pair of methods in ``accuracy`` (columns ``method``, ``seed``, ``value``), paired over their common
    seeds: ``a``, ``b``, ``diff`` (mean of a - b), ``seeds``, ``p``, ``p_holm``, ``significant``."""
    _check_level(alpha)
    wide = accuracy.pivot_table(index="seed", columns="method", values="value", aggfunc="first")
    rows = []
    for a, b in itertools.combinations(list(wide.columns), 2):
        diff, _, p, n = paired_t(wide[a].to_numpy(), wide[b].to_numpy())
        rows.append({"a": a, "b": b, "diff": diff, "seeds": n, "p": p})
    frame = pd.DataFrame(rows, columns=["a", "b", "diff", "seeds", "p"])
    frame["p_holm"] = holm(frame["p"].to_numpy()) if len(frame) else []
    frame["significant"] = frame["p_holm"] < alpha
    return frame


def ranked(accuracy: pd.DataFrame, alpha: float = DEFAULT_ALPHA, label=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the ranked table, the pairs) of ``accuracy``: one row per method and seed, columns ``method``, ``seed``,
    ``value`` (accuracy in points).

    Table columns (:data:`RANK_COLUMNS`): ``rank`` (1 = highest mean), ``mean`` and ``sd`` over seeds,
    ``seeds``, ``gap_to_next`` (mean minus the next rank's), ``p_next`` (Holm-adjusted p of this rank vs
    the next), ``resolved_next`` (True/False; None for the last rank or without a test), ``above`` (the
    lower ranks this one is significantly above). ``label`` maps a method name to its label.
    """
    missing = {"method", "seed", "value"} - set(accuracy.columns)
    if missing:
        raise ValueError(f"ranked needs columns method, seed, value; missing {sorted(missing)}")
    if accuracy.duplicated(["method", "seed"]).any():
        raise ValueError("ranked needs one value per method and seed; got duplicates (filter to one network/group)")
    stats = accuracy.groupby("method")["value"].agg(["mean", "std", "count"])
    order = stats.sort_values("mean", ascending=False, kind="mergesort").index.tolist()
    tests = pairs(accuracy, alpha)
    lookup = {}
    for row in tests.itertuples(index=False):
        lookup[(row.a, row.b)] = lookup[(row.b, row.a)] = row
    rank_of = {m: i + 1 for i, m in enumerate(order)}
    rows = []
    for i, method in enumerate(order):
        nxt = order[i + 1] if i + 1 < len(order) else None
        test = lookup.get((method, nxt)) if nxt else None
        p_next = float(test.p_holm) if test is not None else math.nan
        above = [rank_of[o] for o in order[i + 1 :] if lookup[(method, o)].significant and _higher(lookup, method, o)]
        rows.append(
            {
                "rank": i + 1,
                "method": method,
                "label": label(method) if label else method,
                "mean": float(stats.loc[method, "mean"]),
                "sd": float(stats.loc[method, "std"]),
                "seeds": int(stats.loc[method, "count"]),
                "gap_to_next": float(stats.loc[method, "mean"] - stats.loc[nxt, "mean"]) if nxt else math.nan,
                "p_next": p_next,
                "resolved_next": None if nxt is None or math.isnan(p_next) else bool(p_next < alpha),
                "above": above,
            }
        )
    return pd.DataFrame(rows, columns=list(RANK_COLUMNS)), tests


def _higher(lookup, method: str, other: str) -> bool:
    """Whether the paired mean difference puts ``method`` above ``other``."""
    row = lookup[(method, other)]
    return (row.diff > 0) if row.a == method else (row.diff < 0)


def paired_sd(accuracy: pd.DataFrame) -> tuple[float, int]:
    """The standard deviation of paired differences, pooled over every pair of methods (root mean of the
    per-pair variances, each with its ``n - 1`` degrees of freedom), and the pooled degrees of freedom."""
    wide = accuracy.pivot_table(index="seed", columns="method", values="value", aggfunc="first")
    squares, dof = 0.0, 0
    for a, b in itertools.combinations(list(wide.columns), 2):
        d = (wide[a] - wide[b]).dropna().to_numpy()
        if len(d) >= 2:
            squares += float(((d - d.mean()) ** 2).sum())
            dof += len(d) - 1
    return (math.sqrt(squares / dof) if dof else math.nan), dof


def power(n: int, sd: float, gap: float, alpha: float = DEFAULT_ALPHA) -> float:
    """Probability that a two-sided paired t-test at level ``alpha`` over ``n`` seeds finds a true gap ``gap``
    when the paired differences have standard deviation ``sd`` (noncentral t)."""
    from scipy import stats

    if n < 2:
        return 0.0
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    shift = gap / (sd / math.sqrt(n))
    return float(stats.nct.sf(crit, df, shift) + stats.nct.cdf(-crit, df, shift))


def seeds_needed(
    sd: float, gap: float = DEFAULT_GAP, alpha: float = DEFAULT_ALPHA, power_wanted: float = DEFAULT_POWER, limit=1000
) -> int | None:
    """The fewest seeds (>= 2) with which the paired test finds ``gap`` with probability ``power_wanted`` at
    level ``alpha``; None beyond ``limit``."""
    _check_level(alpha)
    if not (sd > 0 and gap > 0 and 0 < power_wanted < 1):
        raise ValueError(f"seeds_needed needs sd > 0, gap > 0, 0 < power < 1; got {sd!r}, {gap!r}, {power_wanted!r}")
    for n in range(2, limit + 1):
        if power(n, sd, gap, alpha) >= power_wanted:
            return n
    return None


def smallest_gap(n: int, sd: float, alpha: float = DEFAULT_ALPHA, power_wanted: float = DEFAULT_POWER) -> float:
    """The smallest true gap the paired test over ``n`` seeds finds with probability ``power_wanted``."""
    if n < 2:
        return math.inf
    lo, hi = 0.0, 1.0
    while power(n, sd, hi * sd, alpha) < power_wanted:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if power(n, sd, mid * sd, alpha) < power_wanted else (lo, mid)
    return hi * sd


def _check_level(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be a probability in (0, 1), got {alpha!r}")
