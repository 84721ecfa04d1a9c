"""Timing section: time and memory vs batch size per norm and device; ratio to BN; copy-bandwidth fraction."""
from __future__ import annotations

import pandas as pd

from .. import plots
from ..asv_results import AsvResults, parse_param
from ..regressions import resolve_commit
from .base import (
    BENCH_COMMANDS,
    MATCH_PARAMS,
    NORM_PARAMS,
    VARIANT_PARAMS,
    Inputs,
    Section,
    default_variant,
    human,
    label_rows,
    present_columns,
    short_commit,
)


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


def _copy_reference(rows: pd.DataFrame, param_names: list[str]) -> pd.DataFrame:
    """Time of the tensor-copy reference benchmark(s): timed, with batch_size and shape, without norm."""
    if "batch_size" not in rows.columns or "shape" not in rows.columns:
        return rows.iloc[0:0]
    has_norm = rows["norm"].notna() if "norm" in rows.columns else pd.Series(False, index=rows.index)
    copies = rows[(rows["type"] == "time") & ~has_norm & rows["batch_size"].notna() & rows["shape"].notna()]
    if copies.empty:
        return copies
    named = copies[copies["benchmark"].str.contains("copy|bandwidth", case=False, regex=True)]
    copies = named if not named.empty else copies
    first = sorted(copies["benchmark"].unique())[0]  # one reference per report, named in the caption
    return copies[copies["benchmark"] == first]


def _timing_table(frame: pd.DataFrame, index: list[str], unit: str) -> pd.DataFrame:
    table = frame.pivot_table(index=index, columns="batch_size", values="value", aggfunc="median")
    table = table.map(lambda v: human(v, unit))
    table.columns = [f"batch {c}" for c in table.columns]
    return table.reset_index()


def build_timing(inputs: Inputs) -> Section:
    """Time (and memory) vs batch size per norm and device; ratio to BN; fraction of copy bandwidth."""
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

    has_norm = all(c in rows.columns for c in NORM_PARAMS)
    per_norm = rows[rows["norm"].notna() & rows["batch_size"].notna()] if has_norm else rows.iloc[0:0]
    per_norm = per_norm.assign(norm=per_norm["norm"].astype(str)) if not per_norm.empty else per_norm
    if per_norm.empty:
        section.text(
            "No benchmark has both a `norm` and a `batch_size` parameter, so there is nothing to "
            "plot against batch size; the values are in the table below."
        )
    variant_cols = present_columns(per_norm, VARIANT_PARAMS)
    ratios, fractions = [], []
    copies = _copy_reference(rows, asv.param_names)

    type_order = {"time": 0, "peakmemory": 1, "memory": 2, "track": 3}
    benchmarks = sorted(
        per_norm["benchmark"].unique(),
        key=lambda b: (type_order.get(per_norm.loc[per_norm["benchmark"] == b, "type"].iloc[0], 9), b),
    )
    for benchmark in benchmarks:
        bench_rows = per_norm[per_norm["benchmark"] == benchmark]
        unit = bench_rows["unit"].iloc[0]
        kind = bench_rows["type"].iloc[0]
        section.heading(benchmark)
        other = [
            c
            for c in asv.param_names
            if c not in ("norm", "batch_size", "device", *VARIANT_PARAMS)
            and c in bench_rows.columns
            and bench_rows[c].notna().any()
        ]
        devices = bench_rows["device"].astype(object).fillna("-") if "device" in bench_rows.columns else "-"
        bench_rows = bench_rows.assign(device=devices)
        for (where, device), sub in bench_rows.groupby(["where", "device"], sort=True):
            sub = _declared_order(sub, asv, benchmark, [*other, "batch_size"])
            sub = sub.assign(
                panel=label_rows(sub, other) if other else benchmark.rsplit(".", 1)[-1],
                variant=label_rows(sub, variant_cols),
            )
            main, variant = default_variant(sub)
            variant_note = f" ({variant})" if variant else ""
            factor, shown_unit = plots.display_scale(main["value"], unit)
            ylabel = {"seconds": "time", "bytes": "memory"}.get(unit, "value") + f" ({shown_unit})"
            section.figure(
                plots.lines_vs(
                    main.assign(scaled=main["value"] * factor),
                    "batch_size",
                    "scaled",
                    hue="norm",
                    col="panel",
                    xlabel="batch size",
                    ylabel=ylabel,
                    title=f"{benchmark} on {where}, device {device}{variant_note}",
                    errorbar=None,
                ),
                f"{benchmark}: {kind} vs batch size, one line per norm, device {device}, {where}"
                f"{variant_note}.",
            )
            others = sub[sub["variant"] != main["variant"].iloc[0]] if variant else sub.iloc[0:0]
            if not others.empty:
                keys = ["where", "norm", "batch_size", *other]
                relative = others.merge(
                    main[keys + ["value"]].rename(columns={"value": "reference"}), on=keys
                )
                relative = relative.assign(relative=relative["value"] / relative["reference"])
                if not relative.empty:
                    section.figure(
                        plots.lines_vs(
                            relative,
                            "batch_size",
                            "relative",
                            hue="norm",
                            col="panel",
                            style="variant",
                            xlabel="batch size",
                            ylabel=f"{kind} / {kind} at {main['variant'].iloc[0]}",
                            title=f"{benchmark}: other dtypes and memory formats, device {device}",
                            errorbar=None,
                            reference=1.0,
                        ),
                        f"Each other dtype/memory format relative to {main['variant'].iloc[0]} "
                        "(same norm, batch size and shape; below the dashed line = faster).",
                    )

            if kind == "time" and (sub["norm"] == "bn").any():
                match = [
                    c
                    for c in dict.fromkeys(("where", *MATCH_PARAMS, *other))
                    if c in sub.columns and c != "device"
                ]
                bn = sub[sub["norm"] == "bn"][match + ["value"]].rename(columns={"value": "bn"})
                ratio = sub.merge(bn, on=match, how="inner")
                ratio = ratio.assign(ratio_to_bn=ratio["value"] / ratio["bn"], device=device)
                if not ratio.empty:
                    ratios.append(ratio)
                    shown, variant = default_variant(ratio)
                    section.figure(
                        plots.ratio_heatmaps(
                            shown,
                            value="ratio_to_bn",
                            row="norm",
                            column="batch_size",
                            facet="panel",
                            label=variant,
                            title=f"{benchmark}: time / time of BN, device {device}",
                        ),
                        "Ratio of each norm's time to BatchNorm's at the same batch size and shape "
                        "(1 = as fast as BN; red slower, blue faster).",
                    )
            if kind == "time" and not copies.empty:
                match = [c for c in ("where", *MATCH_PARAMS) if c in sub.columns and c in copies.columns]
                reference = copies.assign(where=_where(copies))[match + ["value"]].rename(
                    columns={"value": "copy_time"}
                )
                frac = sub.merge(reference, on=match, how="inner")
                if not frac.empty:
                    frac = frac.assign(fraction_of_copy=frac["copy_time"] / frac["value"], device=device)
                    fractions.append(frac)
                    shown, variant = default_variant(frac)
                    section.figure(
                        plots.lines_vs(
                            shown,
                            "batch_size",
                            "fraction_of_copy",
                            hue="norm",
                            col="panel",
                            xlabel="batch size",
                            ylabel="copy time / norm time",
                            logy=False,
                            errorbar=None,
                            reference=1.0,
                            title=f"{benchmark}: fraction of copy bandwidth, "
                            f"device {device}" + (f" ({variant})" if variant else ""),
                        ),
                        f"Time of a tensor copy of the same size ({copies['benchmark'].iloc[0]}) "
                        "divided by the norm's time: the fraction of the memory bandwidth the "
                        "layer achieves if it moved the data once (1 = as fast as a copy; other "
                        "dtypes and memory formats in the saved data).",
                    )
        index = [
            c
            for c in ("where", "device", *variant_cols, *other, "norm")
            if c in bench_rows.columns and bench_rows[c].notna().any()
        ]
        section.table(
            _timing_table(bench_rows, index, unit), f"{benchmark}: {kind} by batch size.", collapsed=True
        )

    if has_norm and not per_norm.empty and copies.empty:
        section.text(
            "No tensor-copy reference benchmark (a timed benchmark with `batch_size` and `shape` "
            "but no `norm`) in these results, so fractions of copy bandwidth are not shown."
        )
    if ratios:
        section.data["ratio_to_bn"] = pd.concat(ratios).drop(columns=["file"], errors="ignore")
    if fractions:
        section.data["copy_fraction"] = pd.concat(fractions).drop(columns=["file"], errors="ignore")

    rest = rows.drop(per_norm.index)
    if not rest.empty:
        section.heading("Other benchmarks")
        table = rest[["where", "benchmark", "param_key", "type", "value", "unit"]].copy()
        table["value"] = [human(v, u) for v, u in zip(table["value"], table["unit"])]
        section.table(
            table.drop(columns="unit"),
            "Benchmarks without a norm/batch size axis (including the copy-bandwidth reference).",
            collapsed=len(table) > 20,
        )
    return section


