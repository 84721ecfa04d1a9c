"""Statistic drift section: each method's statistic error vs group size and vs depth (the drift probe)."""

from __future__ import annotations

import pandas as pd

from bkn.methods import EMA_SUFFIX
from bkn.results import DRIFT_METRICS

from .. import plots
from .base import Inputs, Section, label_rows, provenance


def _metric_order(metrics: pd.Series) -> list[str]:
    present = list(dict.fromkeys(metrics.astype(str)))
    return [m for m in DRIFT_METRICS if m in present] + [m for m in present if m not in DRIFT_METRICS]


def _tidy(frame: pd.DataFrame, statistic: str) -> pd.DataFrame:
    """One statistic's rows, with a panel label and the method family (``<m>-ema`` is drawn as ``<m>``)."""
    frame = frame[frame["statistic"].astype(str) == statistic].copy()
    frame["method"] = frame["method"].astype(str)
    frame["panel"] = label_rows(frame, ["data", "network", "state"])
    # "<method>-ema" normalizes with running (EMA) estimates of <method>'s statistics: same colour, dashed.
    ema = frame["method"].str.endswith(EMA_SUFFIX)
    frame["family"] = frame["method"].where(~ema, frame["method"].str[: -len(EMA_SUFFIX)])
    frame["estimates"] = ema.map({True: "running (EMA)", False: "batch"})
    return frame


def _add_group_size_figures(section: Section, by_group: pd.DataFrame, style: str | None) -> None:
    for metric in _metric_order(by_group["metric"]):
        section.figure(
            plots.lines_vs(
                by_group[by_group["metric"] == metric],
                "group_size",
                "value",
                hue="family",
                style=style,
                col="panel",
                xlabel="normalization group size",
                ylabel=str(metric),
                title=f"{metric} vs group size",
            ),
            f"{metric} of the statistics each method normalizes with, vs the normalization group "
            "size (lower is better).",
        )


def _add_depth_figures(section: Section, frame: pd.DataFrame, style: str | None) -> None:
    """Error at each normalization layer, at group size 2 (or the smallest above 1)."""
    sizes = sorted(int(b) for b in frame["group_size"].dropna().unique())
    depth_group = 2 if 2 in sizes else (next((b for b in sizes if b > 1), sizes[0]) if sizes else None)
    if depth_group is None or frame["depth"].nunique() <= 1:
        return
    at = frame[frame["group_size"] == depth_group]
    keys = ["panel", "method", "family", "estimates", "depth", "metric", "seed"]
    by_depth = at.groupby(keys, observed=True)["value"].mean().reset_index()
    section.data["drift_by_depth"] = by_depth
    for metric in _metric_order(by_depth["metric"]):
        section.figure(
            plots.lines_vs(
                by_depth[by_depth["metric"] == metric],
                "depth",
                "value",
                hue="family",
                style=style,
                col="panel",
                logx2=False,
                xlabel="depth (norm layer index)",
                ylabel=str(metric),
                title=f"{metric} vs depth, group size {depth_group}",
            ),
            f"{metric} at each normalization layer, groups of {depth_group}.",
        )


def build_drift(inputs: Inputs) -> Section:
    """Statistic drift: error of each method's statistics vs group size, and vs depth."""
    section = Section("drift", "Statistic drift")
    probe = inputs.drift
    if probe.frame is None:
        section.missing(
            probe.problem or f"drift probe results: {probe.path}",
            f"`{probe.command}` (a few minutes; `{probe.command} -- --full` for the full sweep)",
        )
        return section
    frame = probe.frame.dropna(subset=["value"])
    if frame.empty:
        section.missing(f"drift probe results: {probe.path} has no finite values", f"`{probe.command}`")
        return section
    section.text(provenance(probe))
    statistics = list(dict.fromkeys(frame["statistic"].astype(str)))
    statistic = "median" if "median" in statistics else statistics[0]
    frame = _tidy(frame, statistic)
    style = "estimates" if frame["estimates"].nunique() > 1 else None
    # Per seed, average over the normalization layers; the band shows the spread over seeds.
    keys = ["panel", "data", "network", "state", "method", "family", "estimates", "group_size", "metric", "seed"]
    by_group = frame.groupby(keys, observed=True)["value"].mean().reset_index()
    section.data["drift_by_group_size"] = by_group
    section.summary = (
        f"{by_group['method'].nunique()} methods, group sizes {int(by_group['group_size'].min())}–"
        f"{int(by_group['group_size'].max())}, {by_group['panel'].nunique()} data/network/state "
        f"combination(s), {by_group['metric'].nunique()} metric(s), {by_group['seed'].nunique()} seed(s)"
    )
    section.text(
        f"Statistic shown: the {statistic} over channels of each layer's error; lines: mean over the "
        "network's normalization layers; bands: spread over seeds (interquartile range)."
    )
    _add_group_size_figures(section, by_group, style)
    _add_depth_figures(section, frame, style)
    table = (
        by_group.groupby(["metric", "panel", "method", "group_size"], observed=True)["value"]
        .mean()
        .unstack("group_size")
        .map(lambda v: f"{v:.3g}")
    )
    table.columns = [f"group {c}" for c in table.columns]
    section.table(table.reset_index(), "Mean over layers and seeds, by group size.", collapsed=True)
    return section
