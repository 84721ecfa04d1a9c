"""Regression verdicts between two commits from their pooled asv samples, and trends across all commits.

This engine compares any two commits with asv results (the report's comparison, ``nox -s
compare``); :mod:`analysis.rounds` is the drift-robust one for two commits timed in paired
interleaved rounds (``nox -s continuous``). Both finish their tables with
:mod:`analysis.verdict_table`.

For every benchmark and parameter combination measured at both the baseline and the
head commit (on the same machine, in the same environment):

* ``ratio = head / base`` of asv's estimates (the medians of the samples). Every asv
  benchmark type is lower-is-better (time, memory; ``track_`` values by asv's
  convention), so ``ratio > 1`` is a slowdown.
* ``significant``: whether the two sets of samples differ (``test`` says how), by the two-sided
  Mann-Whitney U test (:mod:`analysis.significance`) at level ``alpha`` (default 0.002, the
  level ``asv compare`` uses, which also keeps false alarms rare across hundreds of
  comparisons). When samples were not recorded, or are too few for the test ever to
  reach ``alpha`` (see :func:`analysis.significance.min_p_value`), asv's fallback is used:
  the 99% confidence intervals of the two medians do not overlap. When neither is
  available (a single sample per side, as ``asv run --quick`` records), significance is
  unknown (``significant`` is missing) and the change is only reported, never gated on.
* ``verdict``: ``regression`` when ``ratio > 1 + threshold`` and significant;
  ``improvement`` when ``ratio < 1 / (1 + threshold)`` and significant; ``slower
  (untested)`` / ``faster (untested)`` beyond the threshold with unknown significance;
  ``not significant`` beyond the threshold but not significant; ``unchanged``
  otherwise; and ``new``, ``removed``, ``failed``, ``fixed``, ``skipped``,
  ``benchmark changed`` (its code's version differs, asv does not compare those).

Only ``regression`` makes ``--fail-on-regression`` fail.

How well this works, measured on synthetic asv files (tests/analysis_fixtures.py: 208
comparisons per report, timings with 3% log-normal noise and a fraction of samples
interrupted, 1.5-3x slower; one benchmark made 30% slower): with 20 samples per side and
5% interrupted samples, the slowdown was flagged in 50 of 50 cases and nothing else was
flagged in 25 reports; with 10 samples and 10% interrupted samples, 12 of 50 slowdowns
were missed (an interrupted baseline sample outranks the slowed head samples) and 1 of 25
reports of identical distributions had a false flag. Record enough samples
(``asv run --record-samples``, asv's default repeat) where the verdict matters.
"""

from __future__ import annotations

import math
import subprocess

import numpy as np
import pandas as pd

from .asv_results import AsvResults, sample_lookup
from .significance import mann_whitney_u, min_p_value
from .verdict_table import GROUP, VERDICT_ORDER, change_verdict, check_levels, finish  # noqa: F401 (re-exported)

DEFAULT_THRESHOLD = 0.10  # as a fraction: head/base >= 1.10 is a slowdown beyond it


def threshold_arg(text: str) -> float:
    """``--threshold`` as a fraction: a ratio ``1.10``, a fraction ``0.1`` or ``10%`` all mean 10%.

    asv's ``--factor`` and the issue tracker speak of ratios (1.10), the report's tables of
    fractions (10%); both spellings are accepted and agree, so neither is read silently as
    the other (a ratio r > 1 is the fraction r - 1; a number in (0, 1) is a fraction).
    """
    import argparse

    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a ratio such as 1.10, or a fraction 0.1 / 10%; got {text!r}")
    if text.endswith("%") or value < 1:
        fraction = value
    else:
        fraction = value - 1
    if not 0 < fraction < 10:
        raise argparse.ArgumentTypeError(
            f"expected a ratio above 1 such as 1.10 (10% slower), or a fraction 0.1 / 10%; got {text!r}"
        )
    return fraction


DEFAULT_ALPHA = 0.002
FLAGGED = ("regression", "improvement")


def resolve_commit(rev: str, commits: list[str], repo: str | None = ".") -> str:
    """The full hash of the commit with results that ``rev`` names (a git revision or a hash prefix).

    ``rev`` goes through ``git rev-parse`` first (so ``HEAD~1``, tags and branches work);
    the result, or ``rev`` itself when git does not know it, must be a prefix of exactly
    one commit with results. Raises ValueError otherwise, listing the commits present.
    """
    candidates = [rev]
    if repo is not None:
        try:
            out = subprocess.run(
                ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                cwd=repo,
                capture_output=True,
                text=True,
                timeout=10,
            )
            if out.returncode == 0 and out.stdout.strip():
                candidates.insert(0, out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    for candidate in candidates:
        matches = sorted({c for c in commits if c.startswith(candidate.lower())})
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ValueError(
                f"revision {rev!r} is ambiguous among the commits with results: {', '.join(m[:10] for m in matches)}"
            )
    present = ", ".join(c[:10] for c in commits) or "none"
    raise ValueError(
        f"no asv results for revision {rev!r} (resolved to {candidates[0][:10]}); "
        f"commits with results: {present}. Run `asv run {rev}^!` to measure it."
    )


def default_pair(asv: AsvResults) -> tuple[str, str] | None:
    """(base, head): the two latest commits with results, by commit date; None with fewer than two."""
    commits = asv.commits()["commit"].tolist()
    return (commits[-2], commits[-1]) if len(commits) >= 2 else None


def _significance(
    base: np.ndarray | None, head: np.ndarray | None, base_row, head_row, alpha: float
) -> tuple[object, float, str]:
    """(significant: True/False/None, p-value or NaN, the test that decided)."""
    if base is not None and head is not None and len(base) and len(head) and min_p_value(len(base), len(head)) < alpha:
        _, p, how = mann_whitney_u(base, head)
        return p < alpha, p, f"mann-whitney ({how}, n={len(base)}/{len(head)})"
    a = (base_row["ci_99_a"], base_row["ci_99_b"])
    b = (head_row["ci_99_a"], head_row["ci_99_b"])
    if all(math.isfinite(v) for v in (*a, *b)):
        overlap = a[1] >= b[0] and a[0] <= b[1]
        return (not overlap), math.nan, "99% CI overlap"
    return None, math.nan, "none (too few samples)"


_KEPT = ("type", "unit", "version", "stale", "value", "status", "ci_99_a", "ci_99_b", "n_samples")
_VERDICT_COLUMNS = ("base", "head", "ratio", "p_value", "significant", "test", "verdict")


def _status_verdict(r) -> str | None:
    """The verdict of a merged row decided by presence, version and status alone; None if both sides ran."""
    if r["_merge"] == "left_only":
        return "removed"
    if r["_merge"] == "right_only":
        return "new"
    if r["version_base"] != r["version_head"] and pd.notna(r["version_base"]) and pd.notna(r["version_head"]):
        return "benchmark changed"
    if r["status_base"] == "ok" and r["status_head"] == "failed":
        return "failed"
    if r["status_base"] == "failed" and r["status_head"] == "ok":
        return "fixed"
    if r["status_base"] != "ok" or r["status_head"] != "ok":
        return "skipped" if "skipped" in (r["status_base"], r["status_head"]) else "failed"
    return None


def _compared(r, base_samples, head_samples, threshold: float, alpha: float) -> dict:
    """ratio, p_value, significant, test and verdict of a row measured at both commits."""
    ratio = r["value_head"] / r["value_base"] if r["value_base"] > 0 else math.nan
    sig, p, test = _significance(
        base_samples,
        head_samples,
        {"ci_99_a": r["ci_99_a_base"], "ci_99_b": r["ci_99_b_base"]},
        {"ci_99_a": r["ci_99_a_head"], "ci_99_b": r["ci_99_b_head"]},
        alpha,
    )
    verdict = change_verdict(ratio, sig, threshold, at_threshold=False)
    return {"ratio": ratio, "p_value": p, "significant": sig, "test": test, "verdict": verdict}


def verdicts(
    asv: AsvResults, base: str, head: str, threshold: float = DEFAULT_THRESHOLD, alpha: float = DEFAULT_ALPHA
) -> pd.DataFrame:
    """One row per benchmark x parameters x machine x environment: base, head, ratio, significance, verdict.

    See the module docstring for the test and the verdicts.
    """
    check_levels(threshold, alpha)
    frame = asv.results
    params = asv.param_names
    keep = [c for c in (*GROUP, *_KEPT, *params) if c in frame.columns]
    b = frame.loc[frame["commit"] == base, keep]
    h = frame.loc[frame["commit"] == head, keep]
    merged = b.merge(h, on=GROUP, how="outer", suffixes=("_base", "_head"), indicator=True)
    lookup = sample_lookup(asv.samples)
    rows = []
    for _, r in merged.iterrows():
        row = {c: r[c] for c in GROUP}
        for c in ("type", "unit", *params):
            row[c] = r.get(f"{c}_head") if pd.notna(r.get(f"{c}_head")) else r.get(f"{c}_base")
        row.update(base=r.get("value_base", math.nan), head=r.get("value_head", math.nan))
        row.update(ratio=math.nan, p_value=math.nan, significant=None, test="")
        row["verdict"] = _status_verdict(r)
        if row["verdict"] is None:
            machine, env, benchmark, key = (r[c] for c in GROUP)
            samples = [lookup.get((machine, env, commit, benchmark, key)) for commit in (base, head)]
            row.update(_compared(r, *samples, threshold, alpha))
        rows.append(row)
    return finish(rows, [*GROUP, "type", "unit", *params, *_VERDICT_COLUMNS], base, head)


def trends(asv: AsvResults) -> pd.DataFrame:
    """Tidy values of every benchmark at every commit, oldest first, with the commit's position ``order``."""
    frame = asv.results
    if frame.empty:
        return pd.DataFrame(columns=[*GROUP, "commit", "date", "order", "unit", "value", "q_25", "q_75"])
    commits = asv.commits()
    position = {c: i for i, c in enumerate(commits["commit"])}
    ok = frame.loc[frame["status"] == "ok", [*GROUP, "commit", "date", "unit", "value", "q_25", "q_75"]].copy()
    ok["order"] = ok["commit"].map(position)
    ok["commit_short"] = ok["commit"].str[:8]
    return ok.sort_values([*GROUP, "order"]).reset_index(drop=True)


STEP_WINDOW = 3  # commits on each side whose median a step compares


def steps(trend: pd.DataFrame, threshold: float = DEFAULT_THRESHOLD, window: int = STEP_WINDOW) -> pd.DataFrame:
    """Step changes over the commit history: where a benchmark's level moved by more than ``threshold``.

    For each benchmark x parameters measured at 3 or more commits (``trend``: :func:`trends`,
    oldest first) and each commit ``i`` after the first: ``before`` = the median of the values
    at the ``window`` commits before ``i``, ``after`` = the median at ``i`` and the
    ``window - 1`` commits after it, ``ratio = after / before``. A step is a run of
    consecutive commits whose ratio leaves ``[1/(1+threshold), 1+threshold]`` in the same
    direction, reported at the commit with the largest ``|log ratio|`` of the run (on a tie,
    the one whose value jumped most from the commit before). The
    medians make one outlying commit inside the history no step (it is one value of three
    on each side); at the newest commits the window is shorter, so a change there shows at
    once. No significance test: a value per commit is all a history keeps (asv's
    estimates); the pairwise verdicts above test the latest pair.

    Returns one row per step: the group, ``commit`` (first on the new level), ``previous``
    (the commit before it), ``before``, ``after``, ``ratio``, ``direction``, ``unit``.
    """
    columns = [*GROUP, "commit", "previous", "before", "after", "ratio", "direction", "unit"]
    found = []
    if trend.empty:
        return pd.DataFrame(columns=columns)
    for key, series in trend.groupby(GROUP, sort=False):
        series = series.sort_values("order")
        values = series["value"].to_numpy(dtype=float)
        commits = series["commit"].tolist()
        if len(values) < 3:
            continue
        candidates = []
        for i in range(1, len(values)):
            before = float(np.median(values[max(0, i - window) : i]))
            after = float(np.median(values[i : i + window]))
            if before <= 0 or not (math.isfinite(before) and math.isfinite(after)):
                candidates.append(None)
                continue
            ratio = after / before
            direction = "slower" if ratio > 1 + threshold else "faster" if ratio < 1 / (1 + threshold) else None
            jump = abs(math.log(values[i] / values[i - 1])) if values[i] > 0 and values[i - 1] > 0 else 0.0
            candidates.append((i, before, after, ratio, direction, jump) if direction else None)
        run: list[tuple] = []
        for c in [*candidates, None]:  # a trailing None closes the last run
            if c is not None and (not run or run[-1][4] == c[4]) and (not run or run[-1][0] == c[0] - 1):
                run.append(c)
                continue
            if run:
                # the largest change of level; on a tie (windows that straddle the same step) the commit
                # whose own value jumped
                i, before, after, ratio, direction, _ = max(run, key=lambda r: (round(abs(math.log(r[3])), 9), r[5]))
                found.append(
                    dict(zip(GROUP, key))
                    | dict(commit=commits[i], previous=commits[i - 1], before=before, after=after, ratio=ratio)
                    | dict(direction=direction, unit=series["unit"].iloc[0])
                )
            run = [c] if c is not None else []
    return pd.DataFrame(found, columns=columns)
