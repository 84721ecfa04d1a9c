"""Training probe section: test accuracy vs group size per method, both evaluation modes, learning curves.

One block per data set and network (MNIST-1D: ``convnet`` and ``resnet1d``): final test
accuracy against the normalization group size, one line per method with a band of ± one
standard deviation over seeds, in two labelled panels - with the methods' running
estimates (``evaluation = "running"``; GN and LN: their per-sample statistics) and with
population statistics recomputed after training (``"population"``, PreciseBN) - and a
table of mean ± standard deviation over seeds. Before them the answer (:mod:`.answer`):
accuracy against the cost of a step (a Pareto chart) and the ranks at a group of 2 with
paired tests over seeds. Then the learning curves.
"""

from __future__ import annotations

import pandas as pd

from bkn.probes import sources
from bkn.probes.results import EVALUATIONS

from .. import plots
from .answer import add_answer
from .base import Inputs, Section, provenance

# Panel titles: which statistics the network normalized with at test time.
PANELS = {"running": "running estimates", "population": "population statistics (PreciseBN)"}


def build_training(inputs: Inputs) -> Section:
    """Training probe: test accuracy vs group size per method (spread over seeds), both evaluations."""
    section = Section("training", "Training probe")
    probe = inputs.training
    if probe.frame is None:
        section.missing(
            probe.problem or f"training probe results: {probe.path}",
            f"`{probe.command}` (`{probe.command} -- --quick` for the CI-sized run)",
        )
        return section
    frame = probe.frame.dropna(subset=["value"]).copy()
    if frame.empty:
        section.missing(f"training probe results: {probe.path} has no finite values", f"`{probe.command}`")
        return section
    section.text(provenance(probe))
    for column in ("data", "network", "method", "metric", "evaluation"):
        frame[column] = frame[column].astype(str)
    frame["data"] = frame["data"].map(sources.label)  # your data: imagefolder:NAME (S px)
    keys = ["data", "network", "method", "group_size", "seed", "evaluation", "metric"]
    last = frame.groupby(keys, observed=True)["epoch"].transform("max")
    final = frame[frame["epoch"] == last]
    section.data["training_final"] = final
    networks = list(dict.fromkeys(zip(final["data"], final["network"])))
    section.summary = (
        f"{', '.join(f'{d}/{n}' for d, n in networks)}: {final['method'].nunique()} methods, group sizes "
        f"{int(final['group_size'].min())}–{int(final['group_size'].max())}, {final['seed'].nunique()} seed(s), "
        f"{int(frame['epoch'].max())} epoch(s)"
    )
    section.text(
        "Test accuracy after the last epoch, measured two ways: with each method's running estimates "
        "(what its eval mode uses; GN and LN keep none and normalize each sample on its own) and with "
        "population statistics recomputed after training (PreciseBN: the exact mean and variance of "
        "every normalization layer's input over the training set, layer by layer, written into the running "
        "buffers; GN and LN rows copy their own accuracy). Low in both: the micro-batch hurt the network "
        "itself; low only with running estimates: the estimates are at fault. For BKN the population "
        "statistics are not what it normalizes with in training (its Kalman posterior), so its two numbers "
        "can differ either way."
    )
    asv = inputs.asv.results if inputs.asv is not None else None
    add_answer(section, frame, probe.meta, asv)
    for data, network in networks:
        part = final[(final["data"] == data) & (final["network"] == network)]
        _accuracy_block(section, part, data, network)
    _curves(section, frame)
    return section


def _accuracy_block(section: Section, final: pd.DataFrame, data: str, network: str) -> None:
    accuracy = final[(final["metric"] == "test_acc") & final["evaluation"].isin(list(PANELS))].copy()
    if accuracy.empty:
        return
    section.heading(f"{data}, {network}")
    accuracy["panel"] = accuracy["evaluation"].map(PANELS)
    accuracy["percent"] = 100 * accuracy["value"]
    section.figure(
        plots.lines_vs(
            accuracy,
            "group_size",
            "percent",
            hue="method",
            col="panel",
            xlabel="normalization group size",
            ylabel="test accuracy (%)",
            logy=False,
            errorbar="sd",
            title=f"Final test accuracy vs group size: {data}, {network}",
        ),
        f"{data}, {network}: test accuracy after the last epoch vs the normalization group size (SGD batch "
        f"fixed), per method; band: ± one standard deviation over seeds. Left: the methods' running estimates; "
        f"right: population statistics recomputed after training (PreciseBN). GN and LN have no group and keep no "
        f"running estimates (their per-sample statistics in both panels): shown at the SGD batch.",
    )
    summary = (
        accuracy.groupby(["evaluation", "method", "group_size"], observed=True)["percent"]
        .agg(["mean", "std", "count"])
        .reset_index()
    )
    summary["value"] = [
        f"{m:.1f} ± {s:.1f} (n={int(n)})" if pd.notna(s) else f"{m:.1f} (n={int(n)})"
        for m, s, n in summary[["mean", "std", "count"]].to_numpy()
    ]
    summary["evaluation"] = pd.Categorical(summary["evaluation"], categories=list(PANELS), ordered=True)
    table = summary.pivot_table(
        index=["evaluation", "method"], columns="group_size", values="value", aggfunc="first", observed=True
    )
    table.columns = [f"group {c}" for c in table.columns]
    table = table.reset_index()
    table["evaluation"] = table["evaluation"].astype(str).map(EVALUATIONS)
    section.table(
        table,
        f"{data}, {network}: final test accuracy (%), mean ± standard deviation over seeds (n seeds).",
    )


def _curves(section: Section, frame: pd.DataFrame) -> None:
    for metric, evaluation in (("train_loss", "training"), ("test_acc", "running")):
        curves = frame[(frame["metric"] == metric) & (frame["evaluation"] == evaluation)]
        if curves["epoch"].nunique() > 1:
            curves = curves.assign(panel=curves["network"] + ", group " + curves["group_size"].astype(str))
            section.figure(
                plots.lines_vs(
                    curves,
                    "epoch",
                    "value",
                    hue="method",
                    col="panel",
                    logx2=False,
                    logy=False,
                    errorbar="sd",
                    xlabel="epoch",
                    ylabel=metric,
                    title=f"Learning curves: {metric}, {EVALUATIONS[evaluation]}",
                ),
                f"{metric} per epoch ({EVALUATIONS[evaluation]}), one panel per network and group size; band: ± one "
                "standard deviation over seeds.",
            )
