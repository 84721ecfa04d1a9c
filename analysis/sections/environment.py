"""Environment section: commit, torch, device and threads of every result, asv machines and environments."""

from __future__ import annotations

import platform

import pandas as pd

from bkn.probes.results import git_commit

from .. import plots
from .base import BENCH_COMMANDS, Inputs, Section, human


def _environment_rows(source: str, meta: dict, frame: pd.DataFrame | None) -> dict:
    row = {"source": source}
    keys = ("commit", "torch", "python", "device", "device_name", "threads", "cpus", "created", "duration_s")
    for key in keys:
        value = meta.get(key)
        if value is None and frame is not None and key in frame.columns:
            values = frame[key].dropna().astype(str).unique()
            value = ", ".join(values[:3]) if len(values) else None
        row[key] = value
    arguments = (
        meta.get("arguments")
        if isinstance(meta.get("arguments"), dict)
        else {k: v for k, v in meta.items() if k not in row and k not in ("argv", "arguments")}
    )
    shown = {k: v for k, v in arguments.items() if v not in (None, False, [], "")}
    row["arguments"] = ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) if shown else None
    return row


def build_env(inputs: Inputs) -> Section:
    """Where every result came from: commit, torch, device, threads; asv machines and environments."""
    section = Section("env", "Environment")
    section.text(
        f"Report built from working tree {git_commit()} with Python {platform.python_version()}, "
        f"pandas {pd.__version__}, seaborn {plots.sns.__version__}, "
        f"matplotlib {plots.matplotlib.__version__}."
    )
    rows = []
    for source, probe in (("drift probe", inputs.drift), ("training probe", inputs.training)):
        if probe.frame is not None or probe.meta:
            rows.append(_environment_rows(f"{source} ({probe.path.name})", probe.meta, probe.frame))
        else:
            section.missing(f"{source}: no {probe.path} (nor {probe.meta_path.name})", f"`{probe.command}`")
    if rows:
        table = pd.DataFrame(rows).dropna(axis=1, how="all")
        section.table(table, "Probes: the environment each recorded (meta.json, else the frame's columns).")

    asv = inputs.asv
    probes = ", ".join(
        f"{name} {'present' if p.frame is not None else 'absent'}"
        for name, p in (("drift probe", inputs.drift), ("training probe", inputs.training))
    )
    if asv.empty:
        section.missing(f"asv results: nothing readable under {asv.root}", BENCH_COMMANDS)
        section.summary = f"no asv results; {probes}"
        section.status = "ok" if rows else "missing"
        return section
    section.status = "ok"  # the environment of what exists; the missing probes are listed above
    section.summary = (
        f"asv: {asv.results['machine'].nunique()} machine(s), {asv.results['commit'].nunique()} "
        f"commit(s), {len(asv.files)} result files; {probes}"
    )
    if not asv.machines.empty:
        machines = asv.machines.copy()
        if "ram" in machines.columns:
            ram = pd.to_numeric(machines["ram"], errors="coerce")
            machines["ram"] = [human(v, "bytes") for v in ram]
        section.table(machines, "asv machines (machine.json).")
    envs = (
        asv.results.groupby(["machine", "env_name"])
        .agg(
            commits=("commit", "nunique"),
            first=("date", "min"),
            last=("date", "max"),
            results=("value", "size"),
        )
        .reset_index()
    )
    for column in ("first", "last"):
        envs[column] = envs[column].dt.strftime("%Y-%m-%d %H:%M")
    section.table(envs, "asv environments: commits measured and their commit dates.")
    threads = asv.results[asv.results["benchmark"].str.endswith("track_threads") & (asv.results["status"] == "ok")]
    if not threads.empty:
        threads = threads.assign(commit=threads["commit"].str[:10], threads=threads["value"].astype(int))
        section.table(
            threads[["machine", "env_name", "commit", "threads"]].drop_duplicates(),
            "Torch threads the benchmarks ran with (asv's track_threads benchmark).",
        )
    section.table(
        asv.commits().assign(
            date=lambda f: f["date"].dt.strftime("%Y-%m-%d %H:%M"), commit=lambda f: f["commit"].str[:10]
        ),
        "Commits with asv results, oldest first.",
        collapsed=True,
    )
    return section
