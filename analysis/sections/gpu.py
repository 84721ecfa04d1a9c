"""GPU section: the GPU check's tidy file (``results/gpu/gpu.parquet``, written by ``python -m suites.gpu``).

Where the run came from (device, torch, triton, the layers' backend, commit), the copy
bandwidth, the layer table (every method's forward + backward time over torch's BN, per
shape and dtype, each against the issue's target where one applies), a figure of those ratios
with the targets marked, the achieved bandwidth at the large shape, the network steps (eager
and graphed), the graph checks (host syncs per step, replay against eager), the CUDA tests
and asv, and every part or item that was skipped or failed, with why. A file written by a
``--device cpu`` run is a pipeline check, and the section says so.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd

from bkn import methods as registry

from .. import plots
from .base import Inputs, Section, human, provenance

CHECK_METRICS = ("host_syncs", "aten_ops_per_norm", "kernels_per_norm", "loss_rel", "state_rel")
COMMAND = "`python -m suites.gpu` on a GPU machine (docs/gpu.md says how to make the device call)"


def _verdict(value: float, target: float, unit: str = "×", above: bool = False) -> str:
    if not math.isfinite(value):
        return "–"
    text = f"{value:.2f}{unit}"
    if math.isfinite(target):
        ok = value >= target if above else value <= target
        text += f" {'✓' if ok else '✗'} ({'≥' if above else '≤'} {target:g})"
    return text


def _rows(frame: pd.DataFrame, part: str, metric: str | None = None) -> pd.DataFrame:
    sub = frame[frame["part"] == part]
    return sub[sub["metric"] == metric] if metric is not None else sub


def _order(items) -> list[str]:
    return registry.order(items)


def ratio_figure(ratios: pd.DataFrame, title: str) -> str:
    """One panel per shape: each method's ratio to torch's BN (bars, log scale), its target as a black tick."""
    shapes = list(dict.fromkeys(ratios["shape"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.6), squeeze=False, sharey=True)
    colours = plots.palette(ratios["item"].unique())
    for ax, shape in zip(axes[0], shapes):
        sub = ratios[ratios["shape"] == shape].set_index("item")
        names = [n for n in _order(sub.index) if n in sub.index]
        xs = range(len(names))
        ax.bar(xs, [sub.loc[n, "value"] for n in names], color=[colours[n] for n in names])
        targets = [sub.loc[n, "target"] for n in names]
        ax.scatter(xs, targets, marker="_", s=300, color="black", linewidths=2, zorder=3, label="target")
        ax.axhline(1.0, color="0.3", lw=0.8, ls="--")
        ax.set_yscale("log")
        plots._plain_log_y(ax)
        ax.set_xticks(list(xs), [registry.label(n) for n in names], rotation=60, ha="right", fontsize=7)
        ax.set_title(shape, fontsize=9)
    axes[0][0].set_ylabel("time / torch BN time")
    axes[0][0].legend(loc="upper left", fontsize=7)
    fig.suptitle(title, fontsize=10)
    return plots.to_data_uri(fig)


def build_gpu(inputs: Inputs) -> Section:
    section = Section("gpu", "GPU")
    probe = inputs.gpu
    if probe is None or probe.frame is None:
        where = probe.path if probe is not None else "results/gpu/gpu.parquet"
        what = (probe.problem if probe is not None else None) or f"GPU check results: {where}"
        section.missing(what, COMMAND)
        return section
    frame = probe.frame
    section.data["gpu"] = frame
    section.text(provenance(probe))
    first = frame.iloc[0] if len(frame) else None
    if first is not None:
        section.text(
            f"Device: {first['device_name']} ({first['device']}); torch {first['torch']}, triton {first['triton']}; "
            f"the layers' backend on this device: `{first['backend']}`; commit {first['commit']}."
        )
        if first["device"] == "cpu":
            section.text(
                "This file comes from a `--device cpu` run: a check of the pipeline on tiny shapes, not GPU numbers "
                f"(graphs and the CUDA parts are skipped). Run {COMMAND}."
            )
    bad = frame[frame["status"] != "ok"]
    section.summary = (
        f"{first['device_name'] if first is not None else '?'}: {len(frame)} rows, "
        f"{int((frame['status'] == 'failed').sum())} failed, {int((frame['status'] == 'skipped').sum())} skipped"
    )

    copy = _rows(frame, "bandwidth", "copy_Bps")
    if not copy.empty:
        shown = "; ".join(f"{r.shape} {r.dtype}: {r.value / 1e9:.0f} GB/s" for r in copy.itertuples())
        section.text(f"Copy bandwidth (`dst.copy_(src)`, bytes read + written per second): {shown}.")

    ratios = _rows(frame, "layer", "ratio_to_bn")
    if not ratios.empty:
        section.heading("Layer table: forward + backward over torch's BN")
        section.text(
            "Each method in groups of 2 (BKN handed a prior of one mean and variance per group and channel: the norm "
            "alone) against torch's `BatchNorm2d` over the whole input, timed with CUDA events in interleaved rounds; "
            "the median of the per-round ratios. ✓/✗: the issue's target (float32: ghost BN and BRN ≤ 1.2, BKN ≤ 1.4, "
            "every one of them ≤ 1.1 at the large shape)."
        )
        table = ratios.assign(cell=[_verdict(v, t) for v, t in zip(ratios["value"], ratios["target"])])
        table = table.assign(column=table["shape"] + " · " + table["dtype"])
        wide = table.pivot_table(index="item", columns="column", values="cell", aggfunc="first", sort=False)
        base = _rows(frame, "layer", "time_s")
        base = base[base["item"] == "torch-bn"]
        bn_row = {f"{r.shape} · {r.dtype}": human(r.value, "seconds") for r in base.itertuples()}
        wide = pd.concat([pd.DataFrame([bn_row], index=["torch-bn (time)"]), wide.loc[_order(wide.index)]])
        section.table(wide.rename_axis("method").reset_index(), "Time over torch BN's, per shape and dtype.")
        for dtype in ratios["dtype"].unique():
            section.figure(
                ratio_figure(ratios[ratios["dtype"] == dtype], f"forward + backward over torch BN, {dtype}"),
                f"Ratio to torch's BN per shape ({dtype}; log scale; dashed: parity; black ticks: the targets).",
            )
        fraction = _rows(frame, "layer", "fraction_of_copy")
        if not fraction.empty:
            achieved = _rows(frame, "layer", "achieved_Bps").set_index(["item", "dtype"])["value"]
            large = fraction.assign(
                achieved=[human(achieved.get((r.item, r.dtype)), None) for r in fraction.itertuples()],
                of_copy=[_verdict(v, t, "", above=True) for v, t in zip(fraction["value"], fraction["target"])],
            )
            section.table(
                large[["item", "shape", "dtype", "achieved", "of_copy"]].rename(
                    columns={"item": "method", "achieved": "bytes moved / s", "of_copy": "fraction of copy"}
                ),
                "At the large shape: the bytes forward + backward must move (5 tensor passes) over its time, against "
                "the copy's rate (target ≥ 0.7 for ghost BN, BRN and BKN in float32).",
            )

    steps = _rows(frame, "network", "ratio_to_bn")
    if not steps.empty:
        section.heading("Network training steps over torch's BN")
        cells = steps.assign(cell=[_verdict(v, t) for v, t in zip(steps["value"], steps["target"])])
        wide = cells.pivot_table(
            index="item", columns=["shape", "mode"], values="cell", aggfunc="first", sort=False
        ).loc[lambda w: _order(w.index)]
        wide.columns = [f"{s} · {m}" for s, m in wide.columns]
        section.table(
            wide.rename_axis("method").reset_index(),
            "One SGD step (forward, cross-entropy, backward, SGD with momentum), batch 8 in groups of 2, over the "
            "unconverted network's (torch BN over the batch) in the same mode; graphed: the step replayed as a CUDA "
            "graph, over torch BN's graphed step. Targets (ResNet-18): eager ghost BN, BRN ≤ 1.3, bkn-analytic ≤ 2.0, "
            "bkn-official ≤ 2.5; graphed ≤ 1.15, 1.4, 1.8.",
        )

    graph = _rows(frame, "graph")
    graph = graph[graph["metric"].isin(CHECK_METRICS)]
    if not graph.empty:
        section.heading("Graph checks")
        shown = graph.assign(
            meets=[
                "–" if not math.isfinite(t) else ("✓" if v <= t else "✗")
                for v, t in zip(graph["value"], graph["target"])
            ]
        )[["item", "shape", "metric", "value", "target", "meets", "status", "note"]]
        section.table(
            shown.rename(columns={"item": "method"}),
            "Host syncs per training step (target 0; each one drains the GPU queue and rules out capture), aten ops "
            "and CUDA kernels per norm layer per step of a small conv net (targets: ghost BN and BRN 8, bkn-analytic "
            "16, bkn-official 24), and the largest relative difference between graph replays and eager steps from "
            "the same state.",
        )

    tests = _rows(frame, "tests")
    tests = tests[tests["metric"] != "skipped"] if (tests["status"] != "skipped").any() else tests
    if not tests.empty:
        section.heading("CUDA tests under set_sync_debug_mode('error')")
        section.table(tests[["item", "metric", "value", "status", "note"]], "pytest, -m 'cuda and not slow'.")
    if not bad.empty:
        section.heading("Skipped and failed")
        section.table(
            bad[["part", "item", "shape", "dtype", "mode", "status", "note"]],
            "What did not run or did not pass, and why.",
            collapsed=len(bad) > 20,
        )
    return section
