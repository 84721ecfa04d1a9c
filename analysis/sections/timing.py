"""Timing section: time and memory vs group size per method and device; ratio to BN; bandwidth; chain cost.

Parameter names are the asv vocabulary of :mod:`bkn.probes.results` (``method``, ``group_size``,
the tensor parameters, the variant axes), the same constants the suites declare; the
copy-bandwidth reference is the benchmark named :data:`bkn.probes.results.COPY_REFERENCE`.

Bandwidth: a benchmark whose method name is in :data:`bkn.probes.results.TENSOR_PASSES` must move
at least ``passes x elements x element size`` bytes (forward: read x, write y;
forward + backward also reads x and dy and writes dx); that over its time is the achieved
rate, shown next to the copy's rate on the same tensors (2 passes over the copy's time).

Two parts have their own modules: the chain cost (:mod:`.chain_cost`, what BKN's prior
propagation adds per block) and the data-parallel step (:mod:`.distributed`, what K workers
add over one process).
"""

from __future__ import annotations

import pandas as pd

from bkn.probes.results import (
    COPY_REFERENCE,
    DTYPE_BYTES,
    GROUP_PARAM,
    METHOD_PARAM,
    TENSOR_PARAMS,
    TENSOR_PASSES,
    VARIANT_PARAMS,
)

from .. import plots
from ..asv_results import AsvResults, parse_param
from ..regressions import resolve_commit
from .base import (
    BASELINE,
    BENCH_COMMANDS,
    GROUP_LABEL,
    Inputs,
    Section,
    default_variant,
    human,
    label_rows,
    present_columns,
    short_commit,
)
from .chain_cost import chain_cost_part
from .distributed import WORLD_PARAM, distributed_part

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
    found["chain_cost"] = [chain_cost_part(section, per_method)]
    for name, frames in found.items():
        frames = [f for f in frames if f is not None]
        if frames:
            section.data[name] = pd.concat(frames).drop(columns=["file"], errors="ignore")

    distributed = distributed_part(section, rows)
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
