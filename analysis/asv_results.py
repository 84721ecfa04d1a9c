"""Load airspeed velocity (asv 0.6) results into tidy pandas frames.

Layout read (what ``asv run`` writes under its ``results_dir``)::

    .asv/results/benchmarks.json              name -> {params, param_names, type, unit, version, ...}
    .asv/results/<machine>/machine.json       machine, os, arch, cpu, num_cpu, ram
    .asv/results/<machine>/<hash8>-<env>.json one commit on one machine in one environment

A result file (api version 2) stores, per benchmark, one row whose entries are named
by ``result_columns``: ``result`` (one value per parameter combination, in the order of
``itertools.product(*params)``; ``null`` = failed, ``NaN`` = skipped), ``params`` (the
parameter values as Python reprs, e.g. ``"'bn'"``, ``"2"``; their names are in
``benchmarks.json`` only), ``version``,
``started_at``, ``duration``, ``stats_ci_99_a/b`` (99% interval of the median),
``stats_q_25/75``, ``stats_number`` (calls per sample), ``stats_repeat`` (samples) and
``samples`` (the per-call times of every sample, when ``--record-samples`` was given).
Trailing columns that are all ``null`` are dropped by asv, so a row may be short.

Two frames come out (:class:`AsvResults`):

* ``results``: one row per machine x environment x commit x benchmark x parameter
  combination, with the parameters as columns (``method``, ``group_size``, ``shape``, ...: the
  names the suites declare, :data:`bkn.probes.results.LAYER_PARAMS`; a name this module uses for one
  of its own columns gets a ``param_`` prefix),
  the result ``value`` (asv's estimate: the median of the samples), its ``status``
  (``ok``/``skipped``/``failed``) and asv's statistics;
* ``samples``: one row per recorded sample (same keys, ``sample`` index, ``value``).

Nothing here raises on bad input: an unreadable, truncated or malformed file gives a
warning that names it, and the rest is loaded.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import math
import pathlib

import numpy as np
import pandas as pd

from .messages import Messages

RESULTS_API_VERSION = 2  # asv 0.6's Results.api_version
KEY = ["machine", "env_name", "commit", "benchmark", "param_key"]  # one measured thing
# Columns of the results frame, and of the verdict table built from it (analysis.regressions),
# that a parameter name must not shadow.
RESERVED = {
    "machine",
    "env_name",
    "commit",
    "date",
    "benchmark",
    "type",
    "unit",
    "version",
    "param_key",
    "value",
    "status",
    "ci_99_a",
    "ci_99_b",
    "q_25",
    "q_75",
    "number",
    "repeat",
    "n_samples",
    "file",
    "sample",
    "started_at",
    "stale",
    "base_commit",
    "head_commit",
    "base",
    "head",
    "ratio",
    "p_value",
    "significant",
    "test",
    "verdict",
}
_TYPE_BY_PREFIX = {
    "time_": ("time", "seconds"),
    "timeraw_": ("time", "seconds"),
    "peakmem_": ("peakmemory", "bytes"),
    "mem_": ("memory", "bytes"),
    "track_": ("track", "unit"),
}


@dataclasses.dataclass
class AsvResults:
    """Everything read from one asv results folder."""

    results: pd.DataFrame
    samples: pd.DataFrame
    benchmarks: dict
    machines: pd.DataFrame
    param_names: list[str]
    root: pathlib.Path
    files: list[pathlib.Path]

    @property
    def empty(self) -> bool:
        return self.results.empty

    def commits(self) -> pd.DataFrame:
        """The commits with results, oldest first: ``commit``, ``date``, machines, number of results."""
        if self.results.empty:
            return pd.DataFrame(columns=["commit", "date", "machines", "results"])
        table = (
            self.results.groupby("commit", sort=False)
            .agg(
                date=("date", "min"),
                machines=("machine", lambda m: ", ".join(sorted(set(m)))),
                results=("value", "size"),
            )
            .reset_index()
        )
        return table.sort_values(["date", "commit"], na_position="first").reset_index(drop=True)


def parse_param(text):
    """An asv parameter repr (``"'bn'"``, ``"2"``, ``"None"``) -> the Python value; other text unchanged."""
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def param_key(names: list[str], values: tuple) -> str:
    """A readable, stable label for one parameter combination: ``method=bn, group_size=2``."""
    return ", ".join(f"{n}={v}" for n, v in zip(names, values))


def _column_name(name: str) -> str:
    return f"param_{name}" if name in RESERVED else name


def _float(x) -> float:
    """asv stores numbers, ``null`` and the non-standard JSON ``NaN``/``Infinity``; map to float."""
    if x is None:
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _load_json(path: pathlib.Path, messages: Messages, what: str):
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        messages.warn(f"{path}: cannot read {what} ({exc.strerror or exc}); skipped.")
        return None
    try:
        return json.loads(text)  # Python's json accepts asv's NaN / Infinity
    except ValueError as exc:
        messages.warn(f"{path}: corrupt or truncated {what} (invalid JSON: {exc}); skipped.")
        return None


def load_benchmarks(path: pathlib.Path, messages: Messages) -> dict:
    """``benchmarks.json``: benchmark name -> its description (params, param_names, type, unit, version)."""
    if not path.exists():
        return {}
    data = _load_json(path, messages, "asv benchmark list")
    if not isinstance(data, dict):
        if data is not None:
            messages.warn(f"{path}: expected a JSON object of benchmarks; ignored.")
        return {}
    return {name: desc for name, desc in data.items() if isinstance(desc, dict)}


def _benchmark_description(name: str, row_params: list, benchmarks: dict) -> tuple[list[str], str, str, str]:
    """(param_names, type, unit, version) from benchmarks.json, or inferred from the name."""
    desc = benchmarks.get(name)
    function = name.rsplit(".", 1)[-1]
    kind, unit = next((v for p, v in _TYPE_BY_PREFIX.items() if function.startswith(p)), ("unknown", ""))
    if desc is not None:
        names = list(desc.get("param_names") or [])
        kind, unit = desc.get("type", kind), desc.get("unit", unit)
        version = desc.get("version")
    else:
        names, version = [], None
    if len(names) != len(row_params):
        names = [f"param{i + 1}" for i in range(len(row_params))]
    return names, kind, unit, version


def _file_origin(path: pathlib.Path, machine_dir: str, data, messages: Messages) -> dict | None:
    """machine, env_name, commit and date of a result file; None (with a warning) if it is not one."""
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("results"), dict)
        or not isinstance(data.get("result_columns"), list)
    ):
        messages.warn(f"{path}: not an asv result file (no 'results'/'result_columns'); skipped.")
        return None
    version = data.get("version")
    if version != RESULTS_API_VERSION:
        messages.warn(
            f"{path}: asv result format version {version!r}, expected {RESULTS_API_VERSION} "
            "(asv 0.6); run `asv update` on it; skipped."
        )
        return None
    commit = data.get("commit_hash")
    if not isinstance(commit, str) or not commit:
        messages.warn(f"{path}: no 'commit_hash'; skipped.")
        return None
    params = data.get("params") if isinstance(data.get("params"), dict) else {}
    stamp = data.get("date")
    return {
        "machine": params.get("machine") or machine_dir,
        "env_name": data.get("env_name") or path.stem.split("-", 1)[-1],
        "commit": commit,
        "date": pd.to_datetime(stamp, unit="ms", utc=True) if isinstance(stamp, (int, float)) else pd.NaT,
    }


def _benchmark_rows(
    path: pathlib.Path, origin: dict, name: str, entry: dict, benchmarks: dict, rows: list, sample_rows: list
) -> None:
    """Append one row per parameter combination of one benchmark's entry (and its samples).

    Raises TypeError/ValueError for a malformed entry, before appending anything.
    """
    row_params = entry.get("params") or []
    combos = list(itertools.product(*row_params))
    values = entry.get("result")
    values = [None] * len(combos) if values is None else list(values)
    if len(values) != len(combos):
        raise ValueError(f"{len(values)} results for {len(combos)} parameter combinations")
    names, kind, unit, bench_version = _benchmark_description(name, row_params, benchmarks)

    def column(key, default=None):
        v = entry.get(key)
        return [default] * len(combos) if not isinstance(v, list) or len(v) != len(combos) else v

    stats = {k: column(f"stats_{k}") for k in ("ci_99_a", "ci_99_b", "q_25", "q_75", "number", "repeat")}
    samples = column("samples")
    # asv ignores results taken with another version of the benchmark's code than benchmarks.json
    # describes; they are kept here (trends), marked stale, and never compared with fresh ones.
    stale = bench_version is not None and entry.get("version") not in (None, bench_version)
    new_rows, new_samples = [], []
    for j, combo in enumerate(combos):
        parsed = tuple(parse_param(v) for v in combo)
        raw_value = values[j]
        value = _float(raw_value)
        status = "failed" if raw_value is None else ("skipped" if math.isnan(value) else "ok")
        record = {
            **origin,
            "benchmark": name,
            "type": kind,
            "unit": unit,
            "version": entry.get("version"),
            "stale": stale,
            "param_key": param_key(names, parsed),
            "value": value,
            "status": status,
            **{k: _float(v[j]) for k, v in stats.items()},
            "file": str(path),
        }
        for n, v in zip(names, parsed):
            record[_column_name(n)] = v
        s = samples[j]
        finite = [x for x in (_float(x) for x in s) if math.isfinite(x)] if isinstance(s, list) else []
        record["n_samples"] = len(finite) if status == "ok" else 0
        if status == "ok":
            key = {k: origin[k] for k in ("machine", "env_name", "commit")}
            new_samples.extend(
                {**key, "benchmark": name, "param_key": record["param_key"], "sample": i, "value": x}
                for i, x in enumerate(finite)
            )
        new_rows.append(record)
    rows.extend(new_rows)
    sample_rows.extend(new_samples)


def _load_result_file(
    path: pathlib.Path, machine_dir: str, benchmarks: dict, messages: Messages, rows: list, sample_rows: list
) -> bool:
    data = _load_json(path, messages, "asv result file")
    origin = None if data is None else _file_origin(path, machine_dir, data, messages)
    if origin is None:
        return False
    columns = data["result_columns"]
    for name, raw in data["results"].items():
        if not isinstance(raw, list):
            messages.warn(f"{path}: benchmark {name}: malformed entry; skipped.")
            continue
        try:
            _benchmark_rows(path, origin, name, dict(zip(columns, raw)), benchmarks, rows, sample_rows)
        except (TypeError, ValueError) as exc:
            messages.warn(f"{path}: benchmark {name}: malformed entry ({exc}); skipped.")
    return True


def _load_machine(path: pathlib.Path, messages: Messages) -> dict | None:
    if not path.exists():
        messages.warn(
            f"{path.parent}: no machine.json (asv writes it with `asv machine`); "
            "the machine name is taken from the result files."
        )
        return None
    data = _load_json(path, messages, "asv machine description")
    if not isinstance(data, dict):
        return None
    data = {k: v for k, v in data.items() if k != "version"}
    data.setdefault("machine", path.parent.name)
    return data


def load_asv_results(root: str | pathlib.Path, messages: Messages | None = None) -> AsvResults:
    """Read every machine, commit and environment under an asv ``results_dir``.

    Missing folder -> empty frames (the report says which command produces them).
    Each unreadable file costs only itself: it is named in ``messages``.
    """
    messages = messages if messages is not None else Messages()
    root = pathlib.Path(root)
    benchmarks = load_benchmarks(root / "benchmarks.json", messages)
    rows: list[dict] = []
    sample_rows: list[dict] = []
    machines: list[dict] = []
    files: list[pathlib.Path] = []
    if root.is_dir():
        for machine_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            result_files = sorted(p for p in machine_dir.glob("*.json") if p.name != "machine.json")
            if not result_files:
                continue
            info = _load_machine(machine_dir / "machine.json", messages)
            if info is not None:
                machines.append(info)
            for path in result_files:
                if _load_result_file(path, machine_dir.name, benchmarks, messages, rows, sample_rows):
                    files.append(path)

    results = pd.DataFrame(rows)
    if results.empty:
        results = pd.DataFrame(columns=[*KEY, "date", "type", "unit", "value", "status", "n_samples"])
    samples = pd.DataFrame(sample_rows, columns=[*KEY, "sample", "value"])
    param_names = [c for c in results.columns if c not in RESERVED]
    # A parameter column holds ints for group_size etc.; keep numbers numeric where every value is one.
    for c in param_names:
        numeric = pd.to_numeric(results[c], errors="coerce")
        if numeric.notna().sum() == results[c].notna().sum() and results[c].notna().any():
            results[c] = numeric.astype("Int64") if (numeric.dropna() % 1 == 0).all() else numeric
    if not results.empty:
        results = results.sort_values(
            ["date", "commit", "machine", "env_name", "benchmark", "param_key"], kind="stable"
        ).reset_index(drop=True)
    machine_frame = pd.DataFrame(machines)
    return AsvResults(
        results=results,
        samples=samples,
        benchmarks=benchmarks,
        machines=machine_frame,
        param_names=param_names,
        root=root,
        files=files,
    )


def sample_lookup(samples: pd.DataFrame) -> dict[tuple, np.ndarray]:
    """(machine, env_name, commit, benchmark, param_key) -> the recorded samples, as an array."""
    if samples.empty:
        return {}
    return {key: group["value"].to_numpy(dtype=float) for key, group in samples.groupby(KEY, sort=False)}
