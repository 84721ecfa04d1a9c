"""What both regression engines share: the verdict names and order, and how a verdict table is finished.

:mod:`analysis.regressions` compares two commits from their pooled asv samples (any two
commits with results); :mod:`analysis.rounds` from paired interleaved rounds (the two
commits of one ``nox -s continuous`` run). They test differently; they name, decide and
order their verdicts here.
"""

from __future__ import annotations

import pandas as pd

GROUP = ["machine", "env_name", "benchmark", "param_key"]  # one measured thing across commits

# Worst first in the verdict table.
VERDICT_ORDER = (
    "regression",
    "failed",
    "slower (untested)",
    "improvement",
    "faster (untested)",
    "not significant",
    "not confirmed",  # analysis.rounds: flagged by the first rounds, not by the confirmation rounds
    "benchmark changed",
    "new",
    "removed",
    "fixed",
    "skipped",
    "unchanged",
)


def check_levels(threshold: float, alpha: float) -> None:
    """``ValueError`` unless ``threshold`` > 0 (a fraction) and ``alpha`` in (0, 1)."""
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0 (a fraction: 0.1 means 10%), got {threshold}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def change_verdict(ratio: float, significant, threshold: float, *, at_threshold: bool) -> str:
    """The verdict of a benchmark measured at both commits: ``unchanged`` within the threshold,
    else ``regression``/``improvement`` (significant), ``not significant``, or ``slower``/``faster
    (untested)`` (``significant`` None). ``at_threshold``: whether a ratio of exactly ``1 + threshold``
    (or its inverse) is beyond it."""
    if at_threshold:
        slower, faster = ratio >= 1 + threshold, ratio <= 1 / (1 + threshold)
    else:
        slower, faster = ratio > 1 + threshold, ratio < 1 / (1 + threshold)
    if not (slower or faster):
        return "unchanged"
    if significant is None:
        return "slower (untested)" if slower else "faster (untested)"
    if significant:
        return "regression" if slower else "improvement"
    return "not significant"


def finish(rows: list[dict], columns, base: str, head: str) -> pd.DataFrame:
    """The verdict table of ``rows``: ``columns`` in order, ``significant`` as a nullable boolean, the two
    commits in front, worst verdict first (then the largest ratio)."""
    table = pd.DataFrame(rows, columns=list(columns))
    table["significant"] = table["significant"].astype("boolean")
    table.insert(0, "head_commit", head)
    table.insert(0, "base_commit", base)
    table["_order"] = table["verdict"].map({v: i for i, v in enumerate(VERDICT_ORDER)})
    table = table.sort_values(["_order", "ratio"], ascending=[True, False]).drop(columns="_order")
    return table.reset_index(drop=True)
