"""Training probe section: test accuracy vs group size per method, learning curves."""

from __future__ import annotations

import pandas as pd

from .. import plots
from .base import Inputs, Section, provenance


def build_training(inputs: Inputs) -> Section:
    """Training probe: test accuracy vs group size per method (spread over seeds); learning curves."""
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
    frame["method"] = frame["method"].astype(str)
    frame["metric"] = frame["metric"].astype(str)
    last = frame.groupby(["method", "group_size", "seed", "metric"], observed=True)["epoch"].transform("max")
    final = frame[frame["epoch"] == last]
    section.data["training_final"] = final
    section.summary = (
        f"{final['method'].nunique()} methods, group sizes {int(final['group_size'].min())}–"
        f"{int(final['group_size'].max())}, {final['seed'].nunique()} seed(s), "
        f"{int(frame['epoch'].max())} epoch(s)"
    )
    accuracy = final[final["metric"].isin(["test_acc", "test_acc_precise"])]
    if not accuracy.empty:
        section.figure(
            plots.lines_vs(
                accuracy,
                "group_size",
                "value",
                hue="method",
                col="metric",
                xlabel="normalization group size",
                ylabel="test accuracy",
                logy=False,
                errorbar="sd",
                title="Final test accuracy vs group size",
            ),
            "Test accuracy after the last epoch vs the normalization group size, per method; band: "
            "± one standard deviation over seeds (test_acc_precise: evaluated with population "
            "statistics).",
        )
    summary = (
        final.groupby(["metric", "method", "group_size"], observed=True)["value"]
        .agg(["mean", "std", "count"])
        .reset_index()
    )
    summary["value"] = [
        f"{m:.4g} ± {s:.2g} (n={int(n)})" if pd.notna(s) else f"{m:.4g} (n={int(n)})"
        for m, s, n in summary[["mean", "std", "count"]].to_numpy()
    ]
    table = summary.pivot_table(index=["metric", "method"], columns="group_size", values="value", aggfunc="first")
    table.columns = [f"group {c}" for c in table.columns]
    section.table(table.reset_index(), "Final values: mean ± standard deviation over seeds.")
    for metric in ("train_loss", "test_acc"):
        curves = frame[frame["metric"] == metric]
        if curves["epoch"].nunique() > 1:
            curves = curves.assign(panel="group " + curves["group_size"].astype(str))
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
                    title=f"Learning curves: {metric}",
                ),
                f"{metric} per epoch, one panel per group size; band: ± one standard deviation over seeds.",
            )
    return section
