"""Regressions section: verdicts between the baseline and head commits, trends of the flagged benchmarks.

Two sources of verdicts: a rounds file of ``nox -s continuous`` for the compared pair
(:mod:`analysis.rounds`: paired interleaved rounds, drift-robust) when one exists,
otherwise asv's recorded samples of the two commits (:mod:`analysis.regressions`:
Mann-Whitney over pooled samples, right for two commits measured in one go).
"""

from __future__ import annotations

import math

import pandas as pd

from .. import plots, rounds
from ..regressions import FLAGGED, default_pair, resolve_commit, steps, trends, verdicts
from .base import BENCH_COMMANDS, MAX_TABLE_ROWS, Inputs, Section, human, short_commit


def _verdict_table(frame: pd.DataFrame) -> list[dict]:
    """Rows for the template's verdict table."""
    records = []
    for _, r in frame.iterrows():
        records.append(
            {
                "benchmark": r["benchmark"],
                "params": r["param_key"],
                "machine": r["machine"],
                "base": human(r["base"], r["unit"]),
                "head": human(r["head"], r["unit"]),
                "ratio": _ratio(r),
                "p": "–" if pd.isna(r["p_value"]) else f"{r['p_value']:.2g}",
                "significant": "–" if pd.isna(r["significant"]) else ("yes" if r["significant"] else "no"),
                "test": r["test"],
                "verdict": r["verdict"],
            }
        )
    return records


def _ratio(r) -> str:
    """head/base, with its confidence interval when the verdict came from paired rounds."""
    if pd.isna(r["ratio"]):
        return "–"
    if pd.notna(r.get("ci_low", float("nan"))) and pd.notna(r.get("ci_high", float("nan"))):
        return f"{r['ratio']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
    return f"{r['ratio']:.3f}"


def _rounds_table(inputs: Inputs, base: str, head: str) -> tuple[pd.DataFrame | None, dict]:
    """Paired-rounds verdicts from the rounds file of (base, head), if `nox -s continuous` wrote one."""
    if not inputs.rounds_dir:
        return None, {}
    path = rounds.rounds_path(inputs.rounds_dir, base, head)
    if not path.exists():
        return None, {}
    try:
        header, frame = rounds.load(path)
        table = rounds.paired_verdicts(frame, base, head, inputs.threshold, inputs.rounds_alpha)
    except ValueError as exc:
        inputs.messages.warn(f"{exc}; comparing asv's pooled samples instead")
        return None, {}
    params = inputs.asv.param_names
    if not inputs.asv.empty and params:  # the parameter columns, for the CSV and the trend labels
        cols = [c for c in ("benchmark", "param_key", *params) if c in inputs.asv.results.columns]
        known = inputs.asv.results[cols].drop_duplicates(["benchmark", "param_key"])
        table = table.merge(known, on=["benchmark", "param_key"], how="left")
    return table, {**header, "path": str(path)}


def _pair(inputs: Inputs) -> tuple[str, str] | None:
    """(base, head) from --base/--head, or the two latest commits; None with a single commit.

    ValueError when the options name no commit with results, or the same one twice.
    """
    commits = inputs.asv.commits()["commit"].tolist()
    if not (inputs.base or inputs.head):
        return default_pair(inputs.asv)
    head = resolve_commit(inputs.head, commits, inputs.repo) if inputs.head else commits[-1]
    if inputs.base:
        base = resolve_commit(inputs.base, commits, inputs.repo)
    else:
        before = commits[: commits.index(head)]
        if not before:
            raise ValueError(f"no commit with results before the head {short_commit(head)}; give --base explicitly")
        base = before[-1]
    if base == head:
        raise ValueError(f"--base and --head name the same commit {short_commit(base)}")
    return base, head


def _verdict_blocks(section: Section, table: pd.DataFrame) -> None:
    """The verdict tables: the notable ones open, all of them collapsed (both cut at MAX_TABLE_ROWS)."""
    notable = table[~table["verdict"].isin(["unchanged", "skipped"])]
    if not notable.empty:
        more = (
            f" First {MAX_TABLE_ROWS} of {len(notable)}; all in regressions_verdicts.csv."
            if len(notable) > MAX_TABLE_ROWS
            else ""
        )
        section.blocks.append(
            {
                "kind": "verdicts",
                "rows": _verdict_table(notable.head(MAX_TABLE_ROWS)),
                "collapsed": False,
                "caption": "Every benchmark whose verdict is not 'unchanged', worst first." + more,
            }
        )
    else:
        section.text("No benchmark changed beyond the threshold.")
    section.blocks.append(
        {
            "kind": "verdicts",
            "rows": _verdict_table(table.head(MAX_TABLE_ROWS)),
            "collapsed": True,
            "caption": f"All {len(table)} comparisons"
            + (
                f" (first {MAX_TABLE_ROWS} here; all in regressions_verdicts.csv)."
                if len(table) > MAX_TABLE_ROWS
                else "."
            ),
        }
    )


def _history(section: Section, inputs: Inputs, trend: pd.DataFrame, base: str, head: str) -> None:
    """With 3 or more commits: the step changes over the history, and trend lines of the benchmarks that stepped."""
    commits = inputs.asv.commits()["commit"].tolist()
    if len(commits) < 3:
        return
    found = steps(trend, inputs.threshold)
    section.data["steps"] = found
    section.heading("Trends over history")
    section.text(
        f"{len(commits)} commits have results ({short_commit(commits[0])} … {short_commit(commits[-1])}). A step "
        f"is a change of level beyond the threshold ({inputs.threshold:.0%}) between the medians of up to 3 "
        "commits on each side, reported at the commit where it happens; one outlying commit is no step. "
        f"{len(found)} step(s) found. `asv run main~10..main` measures a range, then `nox -s report` shows it."
    )
    if found.empty:
        keys = [tuple(k) for k in trend[GROUP_COLUMNS].drop_duplicates().head(6).to_numpy()]
        caption = "No step: the first benchmarks' values at every commit, as a sample of the history."
    else:
        shown = found.assign(order=found["ratio"].map(lambda r: -abs(math.log(r)))).sort_values("order")
        table = shown[["benchmark", "param_key", "commit", "before", "after", "ratio", "direction", "unit"]].copy()
        table["commit"] = table["commit"].str[:8]
        table["before"] = [human(v, u) for v, u in zip(table["before"], table["unit"])]
        table["after"] = [human(v, u) for v, u in zip(table["after"], table["unit"])]
        table["ratio"] = table["ratio"].map(lambda r: f"{r:.3f}")
        section.table(table.drop(columns="unit"), "Step changes over the history, largest first.")
        keys = [tuple(k) for k in shown[GROUP_COLUMNS].to_numpy()]
        caption = "Benchmarks with a step, largest first"
    labels = {k: f"{k[2].rsplit('.', 2)[-2]}.{k[2].rsplit('.', 1)[-1]}\n{k[3]}" for k in keys}
    section.figure(
        plots.trend_grid(trend, keys, labels=labels, base=base, head=head, title="Trends over history"),
        f"{caption} ({min(len(keys), plots.MAX_FACETS)} of {len(keys)} shown): value at every commit with "
        "results (median, band: interquartile range); dashed lines: the compared baseline (grey) and head (red).",
    )


GROUP_COLUMNS = ["machine", "env_name", "benchmark", "param_key"]


def build_regressions(inputs: Inputs) -> Section:
    """Verdicts between the baseline and head commits for every benchmark, and trends of the flagged ones."""
    section = Section("regressions", "Regressions across commits")
    asv = inputs.asv
    if inputs.no_base:
        section.missing(
            f"a baseline commit: {inputs.no_base}",
            "`nox -s continuous -- BASE HEAD` with a BASE this clone has (in CI: fetch more history)",
        )
        return section
    if asv.empty:
        section.missing(f"asv results: nothing readable under {asv.root}", BENCH_COMMANDS)
        return section
    try:
        pair = _pair(inputs)
    except ValueError as exc:
        inputs.errors.append(str(exc))
        section.error(f"Cannot compare: {exc}")
        return section
    if pair is None:
        commits = asv.commits()["commit"].tolist()
        section.missing(
            f"asv results for a second commit (only {short_commit(commits[0])} has results under {asv.root})",
            "`asv run --record-samples HEAD~1^!` (measure another commit), then "
            "`nox -s report -- --base HEAD~1 --head HEAD`",
        )
        return section
    base, head = pair
    table, paired = _rounds_table(inputs, base, head)
    if table is None:
        table = verdicts(asv, base, head, inputs.threshold, inputs.alpha)
    section.data["verdicts"] = table
    trend = trends(asv)
    section.data["trends"] = trend
    counts = table["verdict"].value_counts()
    inputs.regressions_found = int(counts.get("regression", 0))
    untested = int(counts.get("slower (untested)", 0) + counts.get("faster (untested)", 0))
    section.summary = (
        f"{short_commit(base)} → {short_commit(head)}: {inputs.regressions_found} significant "
        f"regression(s), {int(counts.get('improvement', 0))} improvement(s), "
        f"{int(counts.get('failed', 0))} failure(s)"
        + (f", {untested} change(s) beyond the threshold that could not be tested (single samples)" if untested else "")
    )
    if paired:
        section.text(
            f"Baseline {short_commit(base)} vs head {short_commit(head)}, measured by `nox -s continuous` in "
            f"{paired.get('rounds_run', '?')} interleaved rounds (ABBA order, {paired.get('repeat', '?')} samples "
            f"per benchmark per round, {paired.get('seconds', '?')} s for both commits; rounds file "
            f"`{paired['path']}`): {len(table)} tracked benchmark × parameter combinations. Ratio: the geometric "
            "mean of the per-round head/base ratios (each round: the fastest of its samples), with its "
            f"{1 - inputs.rounds_alpha:.0%} "
            f"confidence interval. A regression is head/base ≥ {1 + inputs.threshold:.2f} (threshold "
            f"{inputs.threshold:.0%}) with a significant difference (two-sided one-sample t-test of the per-round "
            f"log ratios, p < {inputs.rounds_alpha:g}): rounds, not samples, are the independent units, so a "
            "drift of the machine between rounds is not counted as a change."
        )
    else:
        section.text(
            f"Baseline {short_commit(base)} vs head {short_commit(head)}: {len(table)} benchmark × parameter "
            f"combinations. A change counts when head/base leaves [1/{1 + inputs.threshold:.2f}, "
            f"{1 + inputs.threshold:.2f}] (threshold {inputs.threshold:.0%}) and the samples differ "
            "significantly "
            f"(two-sided Mann-Whitney U, p < {inputs.alpha:g}; without enough recorded samples, non-overlapping "
            "99% confidence intervals; with a single sample significance is unknown)."
        )
    summary = counts.rename_axis("verdict").reset_index(name="count")
    section.table(summary, "Verdicts, counted.")
    section.blocks.append(
        {
            "kind": "summary",
            "regressions": inputs.regressions_found,
            "improvements": int(counts.get("improvement", 0)),
        }
    )
    _verdict_blocks(section, table)

    flagged = table[table["verdict"].isin(FLAGGED)]
    if not flagged.empty:
        keys = [tuple(k) for k in flagged[["machine", "env_name", "benchmark", "param_key"]].to_numpy()]
        labels = {k: f"{k[2].rsplit('.', 2)[-2:][0]}.{k[2].rsplit('.', 1)[-1]}\n{k[3]}" for k in keys}
        section.figure(
            plots.trend_grid(
                trend, keys, labels=labels, base=base, head=head, title="Flagged benchmarks across commits"
            ),
            "Value at every commit with results (median, band: interquartile range); dashed lines: "
            f"baseline (grey) and head (red). {min(len(keys), plots.MAX_FACETS)} of "
            f"{len(keys)} flagged shown.",
        )
    _history(section, inputs, trend, base, head)
    return section
