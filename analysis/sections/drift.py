"""Statistic drift section (the drift probe): end to end, bias vs noise, isolation vs in-network, error/floor.

Figures, each only where the results hold its rows:

* end to end - prediction agreement (and relative logit discrepancy) between the network in
  training mode and the same network with population statistics, vs the group size;
* bias vs noise - the error of the mean (population sigma) split into its bias over groups and
  its spread across groups, median over layers;
* isolation vs in-network - the rmse of the mean as the network runs, and with every earlier
  layer normalizing with its population statistics (each layer's own error alone);
* error / floor on the synthetic residual chain, per layer (1 = the best estimate a group can give);
* each per-layer metric vs group size (in network) and vs depth.
"""

from __future__ import annotations

import pandas as pd

from bkn.methods import EMA_SUFFIX, FLOOR, names
from bkn.probes import sources
from bkn.probes.results import DRIFT_METRICS

from .. import plots
from .base import Inputs, Section, label_rows, provenance

OUTPUT = "output"
PER_LAYER = ("mean_error", "var_logratio", "kl", "output_discrepancy", "input_mean_drift")
HEADLINE = names(tag="headline")


def _metric_order(metrics: pd.Series) -> list[str]:
    present = list(dict.fromkeys(metrics.astype(str)))
    return [m for m in DRIFT_METRICS if m in present] + [m for m in present if m not in DRIFT_METRICS]


def _tidy(frame: pd.DataFrame) -> pd.DataFrame:
    """Panel labels, and ``method`` as the legend shows it: ``<m>-ema`` is drawn as ``<m>`` (same colour),
    dashed (``estimates``: running (EMA) vs batch). The result's own name stays in ``result``."""
    frame = frame.copy()
    frame["data"] = frame["data"].astype(str).map(sources.label)  # your data: imagefolder:NAME (S px)
    frame["result"] = frame["method"].astype(str)
    if "mode" not in frame.columns:
        frame["mode"] = "in-network"
    frame["mode"] = frame["mode"].astype(str)
    frame["panel"] = label_rows(frame, ["data", "network", "state"])
    ema = frame["result"].str.endswith(EMA_SUFFIX)
    frame["method"] = frame["result"].where(~ema, frame["result"].str[: -len(EMA_SUFFIX)])
    frame["estimates"] = ema.map({True: "running (EMA)", False: "batch"})
    return frame


def _mean_over_layers(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per seed, the median over the network's layers (the band then shows the spread over seeds)."""
    return frame.groupby(keys + ["seed"], observed=True)["value"].median().reset_index()


def _style(frame: pd.DataFrame, column: str) -> str | None:
    return column if frame[column].nunique() > 1 else None


def _add_end_to_end(section: Section, frame: pd.DataFrame) -> None:
    out = frame[(frame["layer"] == OUTPUT) & (frame["mode"] == "in-network")]
    if out.empty:
        return
    section.heading("End to end")
    section.text(
        "The network in training mode (each method's own statistics, groups of n) against the same network "
        "normalizing with population statistics, on the same samples: the share of predictions they agree on, "
        "and the relative logit discrepancy ||z_train - z_pop||² / ||z_pop||². Per-layer errors of a few "
        "hundredths of a standard deviation compound with depth. Dashed: the running (EMA) estimates in eval "
        "mode. For BKN the population statistics are the reference, not what it uses at inference (its "
        "running estimates). State 'trained': weights trained with BN; 'trained-own': with the method itself."
    )
    keys = ["panel", "method", "result", "estimates", "group_size", "metric", "seed"]
    values = out.groupby(keys, observed=True)["value"].mean().reset_index()
    section.data["drift_end_to_end"] = values
    for metric, label, caption in (
        ("agreement", "prediction agreement", "Share of equal predictions, training mode vs population statistics"),
        ("logit_discrepancy", "relative logit discrepancy", "||z_train - z_pop||² / ||z_pop||²"),
    ):
        sel = values[values["metric"] == metric]
        if sel.empty:
            continue
        section.figure(
            plots.lines_vs(
                sel,
                "group_size",
                "value",
                hue="method",
                style=_style(sel, "estimates"),
                col="panel",
                xlabel="normalization group size",
                ylabel=label,
                title=f"end to end: {label} vs group size",
                logy=None if metric == "logit_discrepancy" else False,
            ),
            f"{caption} (higher agreement / lower discrepancy is better).",
        )


def _add_bias_noise(section: Section, frame: pd.DataFrame) -> None:
    sel = frame[frame["metric"].isin(["mean_bias", "mean_noise"]) & (frame["result"] != FLOOR)]
    sel = sel[sel["method"].isin(HEADLINE) & (sel["estimates"] == "batch")]
    if sel.empty:
        return
    section.heading("Bias vs noise")
    sel = sel.assign(component=sel["metric"].str.replace("mean_", "", regex=False))
    values = _mean_over_layers(sel, ["panel", "mode", "method", "component", "group_size"])
    section.data["drift_bias_noise"] = values
    for mode in ("in-network", "isolation"):
        part = values[values["mode"] == mode]
        if part.empty:
            continue
        section.figure(
            plots.lines_vs(
                part,
                "group_size",
                "value",
                hue="method",
                style="component",
                col="panel",
                xlabel="normalization group size",
                ylabel="error of the mean (population σ)",
                title=f"bias (over groups) and noise (across groups), {mode}",
            ),
            "Error of the mean split into bias, the signed mean over groups (solid), and noise, the spread "
            "across groups (dashed): mean squared error = bias² + noise². Median over layers. A bias measured "
            "over G groups includes about noise / sqrt(G) of sampling error: small biases are upper bounds.",
        )


def _add_isolation(section: Section, frame: pd.DataFrame) -> None:
    sel = frame[(frame["metric"] == "mean_rmse") & (frame["result"] != FLOOR) & (frame["estimates"] == "batch")]
    if sel.empty or sel["mode"].nunique() < 2:
        return
    section.heading("Isolation vs in-network")
    values = _mean_over_layers(sel, ["panel", "mode", "method", "group_size"])
    section.data["drift_isolation"] = values
    section.figure(
        plots.lines_vs(
            values,
            "group_size",
            "value",
            hue="method",
            style="mode",
            col="panel",
            xlabel="normalization group size",
            ylabel="rmse of the mean (population σ)",
            title="in network vs isolation",
        ),
        "Root mean squared error of the mean, median over layers: in network (as the network runs) and in "
        "isolation (every earlier layer normalizing with its population statistics and handing them on as BKN's "
        "posterior), where what is left is each layer's own estimator (for BKN, its transition's).",
    )


def _add_floor(section: Section, frame: pd.DataFrame) -> None:
    syn = frame[(frame["data"] == "synthetic") & frame["metric"].isin(["mean_rmse", "var_rmse"])]
    syn = syn[syn["mode"] == "in-network"]
    floor = syn[syn["result"] == FLOOR]
    if floor.empty:
        return
    section.heading("Synthetic residual chain: error / floor")
    keys = ["group_size", "depth", "metric"]
    floor = floor.groupby(keys, observed=True)["value"].mean().rename("floor").reset_index()
    ratios = syn[syn["result"] != FLOOR].merge(floor, on=keys)
    ratios = ratios.assign(value=ratios["value"] / ratios["floor"])
    section.data["drift_floor_ratio"] = ratios
    sizes = sorted(int(n) for n in ratios["group_size"].unique())
    at = 2 if 2 in sizes else sizes[0]
    for metric, what in (("mean_rmse", "mean"), ("var_rmse", "variance")):
        part = ratios[(ratios["metric"] == metric) & (ratios["group_size"] == at)]
        if part.empty:
            continue
        section.figure(
            plots.lines_vs(
                part,
                "depth",
                "value",
                hue="method",
                style=_style(part, "estimates"),
                col="panel",
                logx2=False,
                xlabel="depth (norm layer index)",
                ylabel=f"rmse / floor ({what})",
                title=f"error / floor of the {what}, groups of {at}",
                reference=1.0,
            ),
            f"Each method's rmse of the {what} divided by the floor's - the maximum-likelihood estimate of the "
            "input's parameters from the group pushed through the exact map (for the variance, the delta-method "
            "Cramér-Rao bound) - per layer. 1 (dashed) is the best a group can give; BRN and running estimates "
            "pool earlier batches, which the one-group floor does not bound.",
        )


def _add_per_layer(section: Section, frame: pd.DataFrame) -> None:
    sel = frame[(frame["layer"] != OUTPUT) & (frame["mode"] == "in-network") & frame["metric"].isin(PER_LAYER)]
    sel = sel[sel["statistic"] == "median"]
    if sel.empty:
        return
    section.heading("Per layer")
    style = _style(sel, "estimates")
    keys = ["panel", "data", "network", "state", "method", "result", "estimates", "group_size", "metric"]
    by_group = sel.groupby(keys + ["seed"], observed=True)["value"].mean().reset_index()
    section.data["drift_by_group_size"] = by_group
    for metric in _metric_order(by_group["metric"]):
        section.figure(
            plots.lines_vs(
                by_group[by_group["metric"] == metric],
                "group_size",
                "value",
                hue="method",
                style=style,
                col="panel",
                xlabel="normalization group size",
                ylabel=str(metric),
                title=f"{metric} vs group size",
            ),
            f"{metric} (median over groups x channels, mean over the network's layers) vs the normalization "
            "group size, in network (lower is better).",
        )
    sizes = sorted(int(b) for b in sel["group_size"].dropna().unique())
    depth_group = 2 if 2 in sizes else (next((b for b in sizes if b > 1), sizes[0]) if sizes else None)
    if depth_group is None or sel["depth"].nunique() <= 1:
        return
    at = sel[(sel["group_size"] == depth_group) & (sel["metric"] == "mean_error")]
    if at.empty:
        return
    by_depth = at.groupby(["panel", "method", "estimates", "depth", "seed"], observed=True)["value"].mean()
    by_depth = by_depth.reset_index()
    section.data["drift_by_depth"] = by_depth
    section.figure(
        plots.lines_vs(
            by_depth,
            "depth",
            "value",
            hue="method",
            style=style,
            col="panel",
            logx2=False,
            xlabel="depth (norm layer index)",
            ylabel="mean_error",
            title=f"mean_error vs depth, group size {depth_group}",
        ),
        f"mean_error at each normalization layer, groups of {depth_group}, in network.",
    )


def build_drift(inputs: Inputs) -> Section:
    """Statistic drift: end to end, bias vs noise, isolation vs in-network, error/floor, per layer."""
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
    frame = _tidy(frame)
    section.summary = (
        f"{frame['result'].nunique()} methods, group sizes {int(frame['group_size'].min())}–"
        f"{int(frame['group_size'].max())}, {frame['panel'].nunique()} data/network/state "
        f"combination(s), modes {', '.join(sorted(frame['mode'].unique()))}, {frame['seed'].nunique()} seed(s)"
    )
    _add_end_to_end(section, frame)
    _add_bias_noise(section, frame)
    _add_isolation(section, frame)
    _add_floor(section, frame)
    _add_per_layer(section, frame)
    inner = frame[(frame["layer"] != OUTPUT) & (frame["statistic"].isin(["median", "rms"]))]
    keys = ["metric", "mode", "panel", "result", "group_size"]
    table = _mean_over_layers(inner, keys).groupby(keys, observed=True)["value"].mean().unstack("group_size")
    table = table.map(lambda v: f"{v:.3g}")
    table.columns = [f"group {c}" for c in table.columns]
    section.table(table.reset_index(), "Median over layers, mean over seeds, by group size.", collapsed=True)
    return section
