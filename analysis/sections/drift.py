"""Statistic drift section: each method's statistic error vs batch size and vs depth (accuracy probe)."""
from __future__ import annotations

import pandas as pd

from .. import plots
from .base import Inputs, Section, label_rows, provenance


def _metric_order(metrics: pd.Series) -> list[str]:
    known = ["mean_error", "var_logratio", "kl", "output_discrepancy"]
    present = list(dict.fromkeys(metrics.astype(str)))
    return [m for m in known if m in present] + [m for m in present if m not in known]


def build_accuracy(inputs: Inputs) -> Section:
    """Statistic drift: error of each method's statistics vs batch size, and vs depth."""
    section = Section("accuracy", "Statistic drift")
    probe = inputs.drift
    if probe.frame is None:
        section.missing(
            f"accuracy probe results: {probe.path}",
            "`nox -s accuracy` (a few minutes; `nox -s accuracy -- --full` for the full sweep)",
        )
        return section
    frame = probe.frame.dropna(subset=["value"])
    if frame.empty:
        section.missing(f"accuracy probe results: {probe.path} has no finite values", "`nox -s accuracy`")
        return section
    section.text(provenance(probe))
    statistics = list(dict.fromkeys(frame["statistic"].astype(str)))
    statistic = "median" if "median" in statistics else statistics[0]
    frame = frame[frame["statistic"].astype(str) == statistic].copy()
    frame["method"] = frame["method"].astype(str)
    frame["panel"] = label_rows(frame, ["data", "network", "state"])
    # "<method>-ema" normalizes with running (EMA) estimates of <method>'s statistics: same colour, dashed.
    ema = frame["method"].str.endswith("-ema")
    frame["family"] = frame["method"].where(~ema, frame["method"].str[: -len("-ema")])
    frame["estimates"] = ema.map({True: "running (EMA)", False: "batch"})
    style = "estimates" if frame["estimates"].nunique() > 1 else None
    # Per seed, average over the normalization layers; the band shows the spread over seeds.
    by_batch = (
        frame.groupby(["panel", "data", "network", "state", "method", "family", "estimates", "batch_size",
                       "metric", "seed"], observed=True)["value"]
        .mean()
        .reset_index()
    )
    section.data["drift_by_batch_size"] = by_batch
    section.summary = (
        f"{by_batch['method'].nunique()} methods, batch sizes {int(by_batch['batch_size'].min())}–"
        f"{int(by_batch['batch_size'].max())}, {by_batch['panel'].nunique()} data/network/state "
        f"combination(s), {by_batch['metric'].nunique()} metric(s), {by_batch['seed'].nunique()} seed(s)"
    )
    section.text(
        f"Statistic shown: the {statistic} over channels of each layer's error; lines: mean over the "
        "network's normalization layers; bands: spread over seeds (interquartile range)."
    )
    for metric in _metric_order(by_batch["metric"]):
        sub = by_batch[by_batch["metric"] == metric]
        section.figure(
            plots.lines_vs(
                sub,
                "batch_size",
                "value",
                hue="family",
                style=style,
                col="panel",
                xlabel="normalization batch size",
                ylabel=str(metric),
                title=f"{metric} vs batch size",
            ),
            f"{metric} of the statistics each method normalizes with, vs the normalization batch "
            "size (lower is better).",
        )
    sizes = sorted(int(b) for b in frame["batch_size"].dropna().unique())
    depth_batch = 2 if 2 in sizes else (next((b for b in sizes if b > 1), sizes[0]) if sizes else None)
    if depth_batch is not None and frame["depth"].nunique() > 1:
        at = frame[frame["batch_size"] == depth_batch]
        by_depth = (
            at.groupby(["panel", "method", "family", "estimates", "depth", "metric", "seed"],
                       observed=True)["value"]
            .mean()
            .reset_index()
        )
        section.data["drift_by_depth"] = by_depth
        for metric in _metric_order(by_depth["metric"]):
            sub = by_depth[by_depth["metric"] == metric]
            section.figure(
                plots.lines_vs(
                    sub,
                    "depth",
                    "value",
                    hue="family",
                    style=style,
                    col="panel",
                    logx2=False,
                    xlabel="depth (norm layer index)",
                    ylabel=str(metric),
                    title=f"{metric} vs depth, batch size {depth_batch}",
                ),
                f"{metric} at each normalization layer, micro-batches of {depth_batch}.",
            )
    table = (
        by_batch.groupby(["metric", "panel", "method", "batch_size"], observed=True)["value"]
        .mean()
        .unstack("batch_size")
        .map(lambda v: f"{v:.3g}")
    )
    table.columns = [f"batch {c}" for c in table.columns]
    section.table(table.reset_index(), "Mean over layers and seeds, by batch size.", collapsed=True)
    return section


