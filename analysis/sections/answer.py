"""The training section's answer: accuracy against the cost of a step (Pareto chart), and the ranks at a group of 2.

"At a group of 2, which normalization hurts my network least, and at what cost?" Two blocks
from the training probe's results (:mod:`analysis.pareto`, :mod:`analysis.ranking`):

* a Pareto chart per data set, network and group size: final test accuracy with the
  methods' running estimates (mean ± sd over seeds) against the cost of one training step
  relative to BN (the asv network-step benchmark of the same commit where it has every
  method, the probe's own step time otherwise; the caption says which);
* per data set and network, the methods ranked by mean accuracy at a group of 2 with the
  paired tests over seeds (Holm-corrected over every pair): which neighbours the run
  resolves, and how many seeds a 0.5-point gap would need given the run's own spread.
"""

from __future__ import annotations

import math

import pandas as pd

from bkn import methods as registry

from .. import pareto, plots, ranking
from .base import Section

RANK_GROUP = 2  # the question's group size


def add_answer(section: Section, frame: pd.DataFrame, meta: dict, asv_results: pd.DataFrame | None) -> None:
    """The chart and the ranked tables, appended to ``section`` (nothing when there is no test accuracy)."""
    commit = str(meta.get("commit") or _first(frame, "commit") or "")
    table = pareto.points(frame, asv_results, commit or None)
    if table.empty:
        return
    section.heading("The answer: accuracy against the cost of a step")
    table["panel"] = table["network"] + ", group " + table["group_size"].astype(str)
    if len(table["data"].unique()) > 1:
        table["panel"] = table["data"] + " " + table["panel"]
    section.data["pareto_points"] = table.drop(columns="panel")
    sources = _sources(table)
    section.figure(
        plots.pareto(
            table,
            title="Final test accuracy against the cost of one training step",
            xlabel="step time / BN's at this group",
            ylabel="test accuracy (%)",
        ),
        "One point per method and group size: final test accuracy with the methods' running estimates, mean ± one "
        "standard deviation over seeds, against the time of one SGD step over BN's at the same group size (left "
        f"of the dotted line: cheaper than BN). Dashed staircase: the Pareto frontier (no other method is both as "
        f"cheap and as accurate), its methods labelled. Methods without groups sit in every panel at their one "
        f"run. Cost source: {sources}.",
    )
    for (data, network), part in pareto.final_accuracy(frame).groupby(["data", "network"], sort=False):
        groups = pareto.group_sizes(part)
        if groups:
            group = RANK_GROUP if RANK_GROUP in groups else groups[0]
            _ranked_block(section, pareto.at_group(part, group), data, network, group)


def _first(frame: pd.DataFrame, column: str):
    return frame[column].dropna().astype(str).iloc[0] if column in frame and frame[column].notna().any() else None


def _sources(table: pd.DataFrame) -> str:
    parts = []
    for source, rows in table.dropna(subset=["source"]).groupby("source", sort=False):
        sizes = ", ".join(str(g) for g in sorted(rows["group_size"].unique()))
        what = (
            f"the asv network-step benchmark ({pareto.NETWORK_STEP}, the CIFAR ResNet-20) of this commit"
            if source == "asv"
            else "the training probe's own step time (median over epochs per run, ratio to BN's run of the same "
            f"seed, geometric mean over seeds; the runs were not interleaved: per-seed ratios vary by a factor "
            f"{_spread(rows)} (median geometric sd), so smaller cost differences are noise)"
        )
        parts.append(f"{what} at group {sizes}")
    return "; ".join(parts) or "none (no step time recorded)"


def _spread(rows: pd.DataFrame) -> str:
    spread = rows["cost_spread"].dropna() if "cost_spread" in rows else pd.Series(dtype=float)
    return f"{spread.median():.2f}" if len(spread) else "unknown (one seed)"


def _ranked_block(section: Section, accuracy: pd.DataFrame, data: str, network: str, group: int) -> None:
    table, tests = ranking.ranked(accuracy[["method", "seed", "value"]], label=registry.label)
    seeds = int(table["seeds"].max())
    key = f"ranked_{data}_{network}".replace("-", "_")
    section.data[key] = table.assign(above=table["above"].map(lambda r: " ".join(map(str, r))))
    section.data[f"{key}_pairs"] = tests
    shown = pd.DataFrame(
        {
            "rank": table["rank"],
            "method": table["label"],
            "accuracy (%)": [_pm(m, s) for m, s in table[["mean", "sd"]].to_numpy()],
            "seeds": table["seeds"],
            "gap to next (points)": table["gap_to_next"].map(lambda v: "" if math.isnan(v) else f"{v:.2f}"),
            "p vs next (Holm)": table["p_next"].map(lambda v: "" if math.isnan(v) else f"{v:.3g}"),
            "next rank resolved": table["resolved_next"].map({True: "yes", False: "no", None: ""}),
            "significantly above ranks": table["above"].map(lambda r: ", ".join(map(str, r)) or "none"),
        }
    )
    resolved = int((table["resolved_next"] == True).sum())  # noqa: E712 (None is neither)
    section.table(
        shown,
        f"{data}, {network}, at a group of {group}: methods ranked by mean final test accuracy (running "
        f"estimates). Paired over {seeds} seed(s) (same initialization and data order per seed), two-sided "
        f"t-tests, Holm-corrected over all {len(tests)} pairs at alpha = {ranking.DEFAULT_ALPHA}. The run "
        f"resolves {resolved} of {len(table) - 1} adjacent ranks.",
    )
    section.text(_seed_note(accuracy, seeds, len(tests)))


def _seed_note(accuracy: pd.DataFrame, seeds: int, comparisons: int) -> str:
    """How many seeds a 0.5-point gap needs, from this run's spread of paired differences."""
    sd, dof = ranking.paired_sd(accuracy[["method", "seed", "value"]])
    if not (sd > 0):
        return f"With {seeds} seed(s) there is no spread of paired differences to test with: nothing is resolved."
    alpha, gap = ranking.DEFAULT_ALPHA, ranking.DEFAULT_GAP
    plain = ranking.seeds_needed(sd, gap, alpha)
    strict = ranking.seeds_needed(sd, gap, alpha / max(comparisons, 1))
    found = ranking.smallest_gap(seeds, sd, alpha / max(comparisons, 1)) if seeds >= 2 else math.inf
    return (
        f"Spread of the paired differences between methods (pooled over pairs, {dof} degrees of freedom): "
        f"{sd:.2f} points. A paired test finds a {gap}-point gap with probability {ranking.DEFAULT_POWER} with "
        f"{plain} seeds at alpha = {alpha}, {strict} at Holm's strictest level (alpha / {comparisons}); with "
        f"this run's {seeds} seed(s) the smallest gap found that reliably at that level is "
        f"{found:.2f} points."
    )


def _pm(mean: float, sd: float) -> str:
    return f"{mean:.2f} ± {sd:.2f}" if not math.isnan(sd) else f"{mean:.2f}"
