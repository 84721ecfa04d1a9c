"""Timing section: time and memory vs group size per method and device; ratio to BN; bandwidth; chain cost.

Parameter names are the asv vocabulary of :mod:`bkn.probes.results` (``method``, ``group_size``,
the tensor parameters, the variant axes), the same constants the suites declare; the
copy-bandwidth reference is the benchmark named :data:`bkn.probes.results.COPY_REFERENCE`.

Bandwidth: a benchmark whose method name is in :data:`bkn.probes.results.TENSOR_PASSES` must move
at least ``passes x elements x element size`` bytes (forward: read x, write y;
forward + backward also reads x and dy and writes dx); that over its time is the achieved
rate, shown next to the copy's rate on the same tensors (2 passes over the copy's time).

Chain cost: the block benchmark (:data:`bkn.probes.results.BLOCK_BENCHMARK`, conv + norm + ReLU
with BKN's prior propagation) against the layer benchmark
(:data:`bkn.probes.results.LAYER_BENCHMARK`, the norm alone given its prior), both forward +
backward on the same tensors. For a BKN method ``m``, per block, as fractions of BN's block::

    whole = (block_m - block_bn) / block_bn        norm = (layer_m - layer_bn) / block_bn
    chain = whole - norm                            (the prior's propagation)
"""

from __future__ import annotations

import pandas as pd

from bkn import methods as registry  # torch-free: the legend order of the methods
from bkn.probes.results import (
    BLOCK_BENCHMARK,
    COPY_REFERENCE,
    DTYPE_BYTES,
    GROUP_PARAM,
    LAYER_BENCHMARK,
    METHOD_PARAM,
    TENSOR_PARAMS,
    TENSOR_PASSES,
    VARIANT_PARAMS,
)

from .. import plots
from ..asv_results import AsvResults, parse_param
from ..regressions import resolve_commit
from .base import (
    BENCH_COMMANDS,
    Inputs,
    Section,
    default_variant,
    human,
    label_rows,
    present_columns,
    short_commit,
)

BASELINE = "bn"  # the method every time is divided by in the ratio figure
SYNC = "syncbn"  # its extra time over BASELINE at K workers is the cost of pooling the statistics
# Workers of a data-parallel step (suites/bench_distributed.py; 1 = one process, no DDP). Not
# (yet) a bkn.probes.results constant: the suites declare the same name in suites/harness/ddp.py.
WORLD_PARAM = "world_size"
GROUP_LABEL = "group size"  # axis label of GROUP_PARAM
TYPE_ORDER = {"time": 0, "peakmemory": 1, "memory": 2, "track": 3}


def _declared_order(frame: pd.DataFrame, asv: AsvResults, benchmark: str, columns: list[str]) -> pd.DataFrame:
    """Rows sorted in the order the benchmark declares its parameter values (shapes by ResNet stage)."""
    desc = asv.benchmarks.get(benchmark, {})
    names, values = desc.get("param_names") or [], desc.get("params") or []
    keys = []
    for column in columns:
        if column in names and column in frame.columns:
            declared = [parse_param(v) for v in values[names.index(column)]]
            rank = {str(v): i for i, v in enumerate(declared)}
            keys.append(frame[column].astype(str).map(rank).fillna(len(rank)).rename(f"_rank_{column}"))
    if not keys:
        return frame
    ranked = pd.concat([frame, *keys], axis=1)
    return ranked.sort_values([k.name for k in keys], kind="stable").drop(columns=[k.name for k in keys])


def _head_rows(inputs: Inputs) -> tuple[pd.DataFrame, str]:
    """The results each machine/environment has at the head commit (or its latest when it lacks it)."""
    frame = inputs.asv.results
    frame = frame[frame["status"] == "ok"]
    wanted = None
    if inputs.head:
        try:
            wanted = resolve_commit(inputs.head, inputs.asv.commits()["commit"].tolist(), inputs.repo)
        except ValueError:
            wanted = None
    parts, used = [], set()
    for _, group in frame.groupby(["machine", "env_name"], sort=True):
        if wanted is not None and (group["commit"] == wanted).any():
            commit = wanted
        else:
            commit = group.sort_values("date", kind="stable")["commit"].iloc[-1]
        parts.append(group[group["commit"] == commit])
        used.add(commit)
    rows = pd.concat(parts) if parts else frame.iloc[0:0]
    return rows, ", ".join(sorted(short_commit(c) for c in used))


def _where(frame: pd.DataFrame) -> pd.Series:
    """Machine (and environment, when several) of each row, for figure titles."""
    if frame["env_name"].nunique() > 1:
        return frame["machine"].astype(str) + " / " + frame["env_name"].astype(str)
    return frame["machine"].astype(str)


def _copy_reference(rows: pd.DataFrame) -> pd.DataFrame:
    """Timed rows of the copy-bandwidth reference (:data:`bkn.probes.results.COPY_REFERENCE`), all tensor params."""
    if any(c not in rows.columns for c in TENSOR_PARAMS):
        return rows.iloc[0:0]
    copies = rows[(rows["benchmark"] == COPY_REFERENCE) & (rows["type"] == "time")]
    return copies[copies[list(TENSOR_PARAMS)].notna().all(axis=1)]


def _timing_table(frame: pd.DataFrame, index: list[str], unit: str) -> pd.DataFrame:
    table = frame.pivot_table(index=index, columns=GROUP_PARAM, values="value", aggfunc="median")
    table = table.map(lambda v: human(v, unit))
    table.columns = [f"{GROUP_LABEL} {c}" for c in table.columns]
    return table.reset_index()


def _main_figure(section: Section, benchmark: str, kind: str, unit: str, main, where, device, variant_note) -> None:
    """The benchmark's value vs group size, one line per method, at the default variant."""
    factor, shown_unit = plots.display_scale(main["value"], unit)
    ylabel = {"seconds": "time", "bytes": "memory"}.get(unit, "value") + f" ({shown_unit})"
    section.figure(
        plots.lines_vs(
            main.assign(scaled=main["value"] * factor),
            GROUP_PARAM,
            "scaled",
            hue=METHOD_PARAM,
            col="panel",
            xlabel=GROUP_LABEL,
            ylabel=ylabel,
            title=f"{benchmark} on {where}, device {device}{variant_note}",
            errorbar=None,
        ),
        f"{benchmark}: {kind} vs group size, one line per method, device {device}, {where}{variant_note}.",
    )


def _variant_figure(section: Section, benchmark: str, kind: str, sub, main, other: list[str], device) -> None:
    """Every other dtype/memory format relative to the default variant (same method, group size, shape)."""
    others = sub[sub["variant"] != main["variant"].iloc[0]]
    if others.empty:
        return
    keys = ["where", METHOD_PARAM, GROUP_PARAM, *other]
    relative = others.merge(main[keys + ["value"]].rename(columns={"value": "reference"}), on=keys)
    if relative.empty:
        return
    relative = relative.assign(relative=relative["value"] / relative["reference"])
    section.figure(
        plots.lines_vs(
            relative,
            GROUP_PARAM,
            "relative",
            hue=METHOD_PARAM,
            col="panel",
            style="variant",
            xlabel=GROUP_LABEL,
            ylabel=f"{kind} / {kind} at {main['variant'].iloc[0]}",
            title=f"{benchmark}: other dtypes and memory formats, device {device}",
            errorbar=None,
            reference=1.0,
        ),
        f"Each other dtype/memory format relative to {main['variant'].iloc[0]} "
        "(same method, group size and shape; below the dashed line = faster).",
    )


def _same_tensors(frame: pd.DataFrame, other: list[str]) -> list[str]:
    """Columns that pair two rows measured on the same tensors: every parameter but the method (and device,
    which is fixed per figure), plus the machine."""
    return [c for c in dict.fromkeys(("where", *TENSOR_PARAMS, *other)) if c in frame.columns and c != "device"]


def _ratio_figure(section: Section, benchmark: str, sub, other: list[str], device) -> pd.DataFrame | None:
    """Each method's time over the baseline's (BN) on the same tensors, as heatmaps; the ratios."""
    if not (sub[METHOD_PARAM] == BASELINE).any():
        return None
    match = _same_tensors(sub, other)
    baseline = sub[sub[METHOD_PARAM] == BASELINE][match + ["value"]].rename(columns={"value": BASELINE})
    ratio = sub.merge(baseline, on=match, how="inner")
    if ratio.empty:
        return None
    ratio = ratio.assign(ratio_to_bn=ratio["value"] / ratio[BASELINE], device=device)
    shown, variant = default_variant(ratio)
    section.figure(
        plots.ratio_heatmaps(
            shown.rename(columns={GROUP_PARAM: GROUP_LABEL}),  # the heatmap labels its axes by column name
            value="ratio_to_bn",
            row=METHOD_PARAM,
            column=GROUP_LABEL,
            facet="panel",
            label=variant,
            title=f"{benchmark}: time / time of BN, device {device}",
        ),
        "Ratio of each method's time to BatchNorm's at the same group size and shape "
        "(1 = as fast as BN; red slower, blue faster).",
    )
    return ratio


def _tensor_bytes(frame: pd.DataFrame) -> pd.Series:
    """Bytes of one (group_size, *shape) tensor per row (NaN where the shape or dtype is unknown)."""
    if frame.empty:
        return pd.Series(dtype=float, index=frame.index)
    per_sample = frame["shape"].astype(str).map(lambda t: _prod(t.split("x"))).astype(float)
    elements = per_sample * pd.to_numeric(frame[GROUP_PARAM], errors="coerce").astype(float)
    return elements * frame["dtype"].astype(str).map(DTYPE_BYTES).astype(float)


def _prod(parts) -> float:
    try:
        out = 1
        for p in parts:
            out *= int(p)
        return float(out)
    except ValueError:
        return float("nan")


COPY_LABEL = "copy (reference)"  # the copy's rate, a line beside the methods'


def _bandwidth_figure(section: Section, benchmark: str, sub, copies, device) -> pd.DataFrame | None:
    """Achieved bytes per second of each method (bytes it must move / time) next to the copy's rate."""
    passes = TENSOR_PASSES.get(benchmark.rsplit(".", 1)[-1])
    if passes is None or any(c not in sub.columns for c in ("shape", "dtype")):
        return None
    match = [c for c in ("where", *TENSOR_PARAMS) if c in sub.columns and c in copies.columns]
    copy = copies.assign(where=_where(copies))
    copy = copy.assign(copy_bytes_per_s=TENSOR_PASSES["time_copy"] * _tensor_bytes(copy) / copy["value"])
    rate = sub.assign(bytes_moved=passes * _tensor_bytes(sub))
    rate = rate.assign(bytes_per_s=rate["bytes_moved"] / rate["value"], device=device)
    rate = rate.dropna(subset=["bytes_per_s"])
    if rate.empty:
        return None
    rate = rate.merge(copy[match + ["copy_bytes_per_s"]], on=match, how="left")
    rate = rate.assign(fraction_of_copy_rate=rate["bytes_per_s"] / rate["copy_bytes_per_s"])
    shown, variant = default_variant(rate)
    reference = shown.dropna(subset=["copy_bytes_per_s"]).drop_duplicates(["panel", GROUP_PARAM, *match])
    lines = pd.concat(
        [
            shown.assign(gbps=shown["bytes_per_s"] / 1e9),
            reference.assign(**{METHOD_PARAM: COPY_LABEL, "gbps": reference["copy_bytes_per_s"] / 1e9}),
        ]
    )
    section.figure(
        plots.lines_vs(
            lines,
            GROUP_PARAM,
            "gbps",
            hue=METHOD_PARAM,
            col="panel",
            xlabel=GROUP_LABEL,
            ylabel="achieved GB/s",
            logy=False,
            errorbar=None,
            title=f"{benchmark}: achieved bandwidth, device {device}" + (f" ({variant})" if variant else ""),
        ),
        f"Bytes the operation must move ({passes} tensor passes: "
        + ("read x, write y" if passes == 2 else "read x, write y; read x and dy, write dx")
        + f") over its time, in GB/s, next to a copy of the same tensor ({COPY_REFERENCE}: read and write "
        "once over its time). A method at the copy's line moves its data as fast as the memory system copies; "
        "other dtypes and memory formats are in the saved data.",
    )
    return rate


def _chain_cost_part(section: Section, rows: pd.DataFrame) -> pd.DataFrame | None:
    """Each BKN method's extra time per block over BN's block: the norm's share and the chain's."""
    keys = ["where", *TENSOR_PARAMS]  # TENSOR_PARAMS includes the device
    if any(c not in rows.columns for c in keys):
        return None
    pick = {}
    for name, bench in (("block", BLOCK_BENCHMARK), ("layer", LAYER_BENCHMARK)):
        b = rows[(rows["benchmark"] == bench) & (rows["type"] == "time")]
        pick[name] = b[keys + [METHOD_PARAM, "value"]]
    if pick["block"].empty or pick["layer"].empty:
        return None
    bn = {k: v[v[METHOD_PARAM] == BASELINE].drop(columns=METHOD_PARAM) for k, v in pick.items()}
    both = (
        pick["block"]
        .merge(pick["layer"], on=keys + [METHOD_PARAM], suffixes=("_block", "_layer"))
        .merge(bn["block"].rename(columns={"value": "bn_block"}), on=keys)
        .merge(bn["layer"].rename(columns={"value": "bn_layer"}), on=keys)
    )
    both = both[both[METHOD_PARAM].map(lambda m: m in registry.names() and registry.get(m).norm == "bkn")]
    if both.empty:
        return None
    both = both.assign(
        whole=(both["value_block"] - both["bn_block"]) / both["bn_block"],
        norm=(both["value_layer"] - both["bn_layer"]) / both["bn_block"],
    )
    both = both.assign(chain=both["whole"] - both["norm"])
    section.heading("Chain cost: what BKN's prior propagation adds per block")
    section.text(
        f"`{BLOCK_BENCHMARK}` times conv + norm + ReLU (forward and backward), for BKN with its prior "
        f"propagated through the block's convolution by the method's transition; `{LAYER_BENCHMARK}` times "
        "the norm alone given its prior. Per block, as a fraction of BN's block time: *whole* is the BKN "
        "block's extra time over BN's, *norm* the BKN layer's extra time over BN's layer, *chain* the rest "
        "(the prior's propagation: for the official transition a surrogate pushed through the convolution, "
        "for the analytic one its weight's tap sums). Single samples of two benchmarks: read the pattern, "
        "not a point."
    )
    for (where, device), sub in both.groupby(["where", "device"], sort=True):
        shown, variant = default_variant(sub)
        parts = shown.melt(
            id_vars=[*keys, METHOD_PARAM],
            value_vars=["whole", "norm", "chain"],
            var_name="part",
            value_name="overhead",
        )
        section.figure(
            plots.lines_vs(
                parts.assign(panel=parts["shape"].astype(str)),
                GROUP_PARAM,
                "overhead",
                hue=METHOD_PARAM,
                col="panel",
                style="part",
                xlabel=GROUP_LABEL,
                ylabel="extra time / BN block time",
                logy=False,
                errorbar=None,
                reference=0.0,
                title=f"chain cost per block on {where}, device {device}" + (f" ({variant})" if variant else ""),
            ),
            "Extra time of each BKN method per block, over BN's block: whole, the norm's share and the "
            "chain's (0 = free; 0.5 = half a BN block more).",
        )
    return both


def _benchmark_part(section: Section, asv: AsvResults, benchmark: str, bench_rows, copies, found: dict) -> None:
    """Figures (per machine and device) and the table of one benchmark with a method and a group size."""
    unit, kind = bench_rows["unit"].iloc[0], bench_rows["type"].iloc[0]
    section.heading(benchmark)
    fixed = (METHOD_PARAM, GROUP_PARAM, "device", *VARIANT_PARAMS)
    other = [c for c in asv.param_names if c not in fixed and c in bench_rows.columns and bench_rows[c].notna().any()]
    variant_cols = present_columns(bench_rows, list(VARIANT_PARAMS))
    devices = bench_rows["device"].astype(object).fillna("-") if "device" in bench_rows.columns else "-"
    bench_rows = bench_rows.assign(device=devices)
    for (where, device), sub in bench_rows.groupby(["where", "device"], sort=True):
        sub = _declared_order(sub, asv, benchmark, [*other, GROUP_PARAM])
        sub = sub.assign(
            panel=label_rows(sub, other) if other else benchmark.rsplit(".", 1)[-1],
            variant=label_rows(sub, variant_cols),
        )
        main, variant = default_variant(sub)
        _main_figure(section, benchmark, kind, unit, main, where, device, f" ({variant})" if variant else "")
        if variant:
            _variant_figure(section, benchmark, kind, sub, main, other, device)
        if kind == "time":
            found["ratio_to_bn"].append(_ratio_figure(section, benchmark, sub, other, device))
            found["bandwidth"].append(_bandwidth_figure(section, benchmark, sub, copies, device))
    index = [
        c
        for c in ("where", "device", *variant_cols, *other, METHOD_PARAM)
        if c in bench_rows.columns and bench_rows[c].notna().any()
    ]
    section.table(_timing_table(bench_rows, index, unit), f"{benchmark}: {kind} by group size.", collapsed=True)


def _distributed_part(section: Section, rows: pd.DataFrame) -> pd.DataFrame | None:
    """Data-parallel steps: each method at K workers against the same step in one process, and SyncBN over BN."""
    if WORLD_PARAM not in rows.columns or METHOD_PARAM not in rows.columns or GROUP_PARAM not in rows.columns:
        return None
    timed = rows[(rows["type"] == "time") & rows[WORLD_PARAM].notna() & rows[METHOD_PARAM].notna()]
    timed = timed.assign(workers=timed[WORLD_PARAM].astype(int), **{METHOD_PARAM: timed[METHOD_PARAM].astype(str)})
    keys = ["where", "benchmark", GROUP_PARAM, METHOD_PARAM]
    single = timed[timed["workers"] == 1][keys + ["value"]].rename(columns={"value": "one_process"})
    multi = timed[timed["workers"] > 1][keys + ["workers", "value"]]
    if multi.empty:
        return None
    pair = ["where", "benchmark", GROUP_PARAM, "workers"]
    bn = multi[multi[METHOD_PARAM] == BASELINE][pair + ["value"]].rename(columns={"value": "bn_step"})
    table = multi.merge(single, on=keys, how="left").merge(bn, on=pair, how="left")
    table = table.assign(
        added=table["value"] - table["one_process"],
        ratio=table["value"] / table["one_process"],
        over_bn=(table["value"] - table["bn_step"]).where(table[METHOD_PARAM] != BASELINE),
    )
    rank = {name: i for i, name in enumerate(registry.order(table[METHOD_PARAM]))}
    table = table.assign(_rank=table[METHOD_PARAM].map(rank))
    table = table.sort_values(["where", "benchmark", GROUP_PARAM, "workers", "_rank"]).drop(columns="_rank")
    section.heading("Data-parallel step: what the all-reduce costs")
    section.text(
        f"Benchmarks with a `{WORLD_PARAM}`: one training step timed on rank 0 of K worker processes "
        "(DDP over gloo, each worker on its own batch of `group_size` samples), against the same step in one "
        "process without DDP. The difference is what data parallelism adds per step on that machine: DDP's "
        f"gradient all-reduce and the wait for the slower worker. `{SYNC}` also all-reduces every norm "
        f"layer's statistics, forward and backward: its time over `{BASELINE}`'s at the same K is that cost."
    )
    shown = pd.DataFrame(
        {
            "where": table["where"],
            "benchmark": table["benchmark"],
            GROUP_LABEL: table[GROUP_PARAM],
            METHOD_PARAM: table[METHOD_PARAM],
            "workers": table["workers"],
            "step, 1 process": [human(v, "seconds") for v in table["one_process"]],
            "step, K workers": [human(v, "seconds") for v in table["value"]],
            "added by K workers": [human(v, "seconds") for v in table["added"]],
            "K workers / 1 process": [f"{v:.2f}" if pd.notna(v) else "–" for v in table["ratio"]],
            f"over {BASELINE} at K workers": [human(v, "seconds") for v in table["over_bn"]],
        }
    )
    section.table(
        shown,
        "Per-step time of each method at K workers and in one process; 'added by K workers' is the "
        f"difference (all-reduces and waiting), 'over {BASELINE}' the extra time of the method at the same K "
        f"(for {SYNC}: its statistics all-reduces).",
    )
    return table


def build_timing(inputs: Inputs) -> Section:
    """Time (and memory) vs group size per method and device; ratio to BN; bandwidth; chain cost."""
    section = Section("timing", "Timing")
    asv = inputs.asv
    if asv.empty:
        section.missing(f"asv results: nothing readable under {asv.root}", BENCH_COMMANDS)
        return section
    rows, commits = _head_rows(inputs)
    if rows.empty:
        section.missing("asv results: every benchmark failed or was skipped", BENCH_COMMANDS)
        return section
    rows = rows.assign(where=_where(rows))
    section.text(
        f"Results of commit {commits} (the latest measured on each machine), "
        f"{len(rows)} measurements of {rows['benchmark'].nunique()} benchmarks. "
        "Lines: asv's estimate (median of the samples); lower is better."
    )
    if rows["n_samples"].median() <= 1:
        section.text(
            "These are single-sample results (`asv run --quick`): expect noise of tens of percent on "
            "a shared machine, and read shapes of curves rather than single points."
        )
    section.data["timing"] = rows.drop(columns=["file"], errors="ignore")
    section.summary = (
        f"{len(rows)} measurements of {rows['benchmark'].nunique()} benchmarks at commit {commits} "
        f"on {', '.join(sorted(rows['where'].unique()))}"
    )

    has_axes = METHOD_PARAM in rows.columns and GROUP_PARAM in rows.columns
    per_method = rows[rows[METHOD_PARAM].notna() & rows[GROUP_PARAM].notna()] if has_axes else rows.iloc[0:0]
    if per_method.empty:
        section.text(
            f"No benchmark has both a `{METHOD_PARAM}` and a `{GROUP_PARAM}` parameter, so there is nothing to "
            "plot against group size; the values are in the table below."
        )
    else:
        per_method = per_method.assign(**{METHOD_PARAM: per_method[METHOD_PARAM].astype(str)})
    if WORLD_PARAM in per_method.columns:  # panels of the figures below say "world size 2", not "2.0"
        workers = per_method[WORLD_PARAM]
        labels = workers.map(lambda v: f"world size {int(v)}" if pd.notna(v) else None)
        per_method = per_method.assign(**{WORLD_PARAM: labels})
    copies = _copy_reference(rows)
    found: dict[str, list] = {"ratio_to_bn": [], "bandwidth": []}
    benchmarks = sorted(
        per_method["benchmark"].unique(),
        key=lambda b: (TYPE_ORDER.get(per_method.loc[per_method["benchmark"] == b, "type"].iloc[0], 9), b),
    )
    for benchmark in benchmarks:
        _benchmark_part(section, asv, benchmark, per_method[per_method["benchmark"] == benchmark], copies, found)

    if not per_method.empty and copies.empty:
        section.text(
            f"No copy-bandwidth reference (`{COPY_REFERENCE}`, timed, with "
            f"{', '.join(f'`{c}`' for c in TENSOR_PARAMS)}) in these results, so achieved bandwidth is "
            "shown without the copy's rate beside it."
        )
    found["chain_cost"] = [_chain_cost_part(section, per_method)]
    for name, frames in found.items():
        frames = [f for f in frames if f is not None]
        if frames:
            section.data[name] = pd.concat(frames).drop(columns=["file"], errors="ignore")

    distributed = _distributed_part(section, rows)
    if distributed is not None:
        section.data["distributed"] = distributed

    rest = rows.drop(per_method.index)
    if not rest.empty:
        section.heading("Other benchmarks")
        table = rest[["where", "benchmark", "param_key", "type", "value", "unit"]].copy()
        table["value"] = [human(v, u) for v, u in zip(table["value"], table["unit"])]
        section.table(
            table.drop(columns="unit"),
            "Benchmarks without a method/group size axis (including the copy-bandwidth reference).",
            collapsed=len(table) > 20,
        )
    return section
