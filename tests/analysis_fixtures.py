"""Synthetic inputs for the report tests: asv 0.6 result files, drift and convergence frames.

The asv files follow the format asv 0.6 writes (``asv/results.py``: ``result_columns``,
one row per benchmark with ``result``, ``params`` as Python reprs, ``version``,
``stats_*``, ``samples``; ``NaN`` for a skipped combination, ``null`` for a failed one;
trailing empty columns dropped), so the loader is exercised on the real layout; a test
also loads them with asv's own ``Results.load``.

Timings: each benchmark x parameter combination has a true per-call time; each sample
is that time times log-normal noise (``sigma``), occasionally with an outlier (an
interrupted sample, 1.5-3x slower), as real timings have.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pathlib
from typing import Callable

import numpy as np
import pandas as pd

from bkn.probes.results import (
    COPY_REFERENCE,
    DRIFT,
    GPU,
    GROUP_PARAM,
    LAYER_PARAMS,
    METHOD_PARAM,
    TENSOR_PARAMS,
    TRAINING,
)

MACHINE = "ci-box"
ENV = "existing-py_usr_bin_python3"
ALL_COLUMNS = [
    "result",
    "params",
    "version",
    "started_at",
    "duration",
    "stats_ci_99_a",
    "stats_ci_99_b",
    "stats_q_25",
    "stats_q_75",
    "stats_number",
    "stats_repeat",
    "samples",
    "profile",
]


@dataclasses.dataclass
class Bench:
    name: str
    param_names: list[str]
    params: list[list]
    type: str = "time"
    unit: str = "seconds"
    version: str = "v1"

    def combos(self):
        return list(itertools.product(*self.params))


def commit_hash(i: int) -> str:
    return f"{i + 1:x}".rjust(2, "a") * 20  # 40 hex digits, distinct, readable


def _median_stats(samples: np.ndarray, number: int) -> dict:
    """asv's statistics of a sample set: quartiles and a 99% interval of the median (order statistics)."""
    n = len(samples)
    ordered = np.sort(samples)
    k = math.floor((n - 2.576 * math.sqrt(n)) / 2)
    ci = (-math.inf, math.inf) if k < 1 else (float(ordered[k - 1]), float(ordered[n - k]))
    return {
        "ci_99_a": ci[0],
        "ci_99_b": ci[1],
        "q_25": float(np.quantile(samples, 0.25)),
        "q_75": float(np.quantile(samples, 0.75)),
        "number": number,
        "repeat": n,
    }


def _write_descriptions(root: pathlib.Path, benches: list[Bench], machine: str) -> None:
    """benchmarks.json and <machine>/machine.json, as asv writes them."""
    described = {}
    for b in benches:
        described[b.name] = {
            "name": b.name,
            "param_names": b.param_names,
            "params": [[repr(v) for v in values] for values in b.params],
            "type": b.type,
            "unit": b.unit,
            "version": b.version,
            "code": "...",
            "number": 0,
            "repeat": 0,
        }
    described["version"] = 2
    (root / "benchmarks.json").write_text(json.dumps(described, indent=2))
    machine_info = {
        "machine": machine,
        "arch": "x86_64",
        "cpu": "Synthetic CPU",
        "num_cpu": "2",
        "os": "Linux",
        "ram": "8000000000",
        "version": 1,
    }
    (root / machine / "machine.json").write_text(json.dumps(machine_info))


def _result_row(b: Bench, commit: int, truth, skip, draw, rng, samples, sigma, outliers, started_ms) -> list:
    """One benchmark's result row of one commit (asv 0.6 column order, trailing Nones dropped)."""
    values, stats, sample_lists = [], [], []
    for combo in b.combos():
        true = math.nan if skip(b, combo) else truth(commit, b, combo)
        if true is None or (isinstance(true, float) and math.isnan(true)):
            values.append(true)
            stats.append(None)
            sample_lists.append(None)
            continue
        if draw is not None:
            s = np.asarray(draw(rng, true, samples), dtype=float)
        else:
            s = true * np.exp(rng.normal(0.0, sigma, size=samples))
            bumped = rng.random(samples) < outliers
            s[bumped] *= rng.uniform(1.5, 3.0, size=bumped.sum())
        values.append(float(np.median(s)))
        stats.append(_median_stats(s, number=5))
        sample_lists.append([float(x) for x in s])
    row = {
        "result": values,
        "params": [[repr(v) for v in values_] for values_ in b.params],
        "version": b.version,
        "started_at": started_ms,
        "duration": 1.0,
    }
    for key in ("ci_99_a", "ci_99_b", "q_25", "q_75", "number", "repeat"):
        column = [None if st is None else st[key] for st in stats]
        row[f"stats_{key}"] = None if all(v is None for v in column) else column
    row["samples"] = None if all(v is None for v in sample_lists) else sample_lists
    row["profile"] = None
    ordered = [row[c] for c in ALL_COLUMNS]
    while ordered and ordered[-1] is None:
        ordered.pop()
    return ordered


def write_asv_results(
    root: pathlib.Path,
    benches: list[Bench],
    truth: Callable[[int, Bench, tuple], float],
    *,
    commits: int = 2,
    samples: int = 10,
    sigma: float = 0.03,
    outliers: float = 0.05,
    seed: int = 0,
    machine: str = MACHINE,
    env: str = ENV,
    first_date_ms: int = 1_700_000_000_000,
    skip: Callable[[Bench, tuple], bool] = lambda b, c: False,
    draw: Callable | None = None,
) -> list[str]:
    """Write benchmarks.json, machine.json and one result file per commit; return the commit hashes.

    ``truth(commit_index, bench, combo)`` is the true time; ``NaN`` from it means "skipped",
    ``None`` means "failed". ``samples=1`` mimics ``asv run --quick``. ``draw(rng, true, n)``, when given,
    replaces the noise model.
    """
    root = pathlib.Path(root)
    (root / machine).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    _write_descriptions(root, benches, machine)
    hashes = []
    for i in range(commits):
        h = commit_hash(i)
        hashes.append(h)
        results = {
            b.name: _result_row(b, i, truth, skip, draw, rng, samples, sigma, outliers, first_date_ms + 1000 * i)
            for b in benches
        }
        data = {
            "commit_hash": h,
            "env_name": env,
            "date": first_date_ms + 3_600_000 * i,
            "params": {"machine": machine, "python": "3.11", "cpu": "Synthetic CPU"},
            "python": "3.11",
            "requirements": {},
            "env_vars": {"OMP_NUM_THREADS": "1"},
            "result_columns": ALL_COLUMNS,
            "results": results,
            "durations": {},
            "version": 2,
        }
        # json.dumps writes NaN as NaN, as asv does.
        (root / machine / f"{h[:8]}-{env}.json").write_text(json.dumps(data))
    return hashes


METHODS = ["bn", "bkn-official", "gn", "ln"]
GROUP_SIZES = [1, 2, 4, 8]
SHAPES = ["64x56x56", "512x7x7"]


def method_benches(memory_formats=("contiguous",)) -> list[Bench]:
    """A small version of the suite's matrix: forward time, peak memory, and the copy reference.

    Parameter names and the copy reference's name are the suites' (:mod:`bkn.probes.results`).
    """
    names = list(LAYER_PARAMS)
    by_name = {
        METHOD_PARAM: METHODS,
        GROUP_PARAM: GROUP_SIZES,
        "shape": SHAPES,
        "device": ["cpu"],
        "dtype": ["float32"],
        "memory_format": list(memory_formats),
    }
    values = [by_name[n] for n in names]
    return [
        Bench("layers.TimeNorm.time_forward", names, values),
        Bench("layers.TimeNorm.time_forward_backward", names, values),
        Bench("layers.PeakMemNorm.peakmem_forward", names, values, type="peakmemory", unit="bytes"),
        Bench(COPY_REFERENCE, list(TENSOR_PARAMS), [by_name[n] for n in TENSOR_PARAMS]),
    ]


def method_truth(commit: int, bench: Bench, combo: tuple) -> float:
    """Plausible times: proportional to the tensor size, methods at fixed multiples of a copy."""
    named = dict(zip(bench.param_names, combo))
    c, *rest = (int(v) for v in named["shape"].split("x"))
    size = named[GROUP_PARAM] * c * int(np.prod(rest) if rest else 1)
    factor = {"bn": 3.0, "bkn-official": 4.5, "gn": 5.0, "ln": 4.0}.get(named.get(METHOD_PARAM), 1.0)
    if bench.type == "peakmemory":
        return float(4 * size * factor + 50e6)
    if "backward" in bench.name:
        factor *= 2.5
    return 1e-9 * size * factor + 2e-6


def drift_frame(seed: int = 0) -> pd.DataFrame:
    """A tidy drift frame in the contract's schema (bkn.probes.results.DRIFT): error shrinks with group size,
    grows with depth; bias/noise rows in both modes, end-to-end rows, and the chain's floor."""
    rng = np.random.default_rng(seed)
    rows = []
    methods = {"bn": 1.0, "bkn-official": 0.6, "brn": 0.9, "bn-ema": 0.5, "floor": 0.3}
    env = {"commit": "abc123", "torch": "2.x", "device": "cpu", "threads": 1}

    def add(data, state, mode, method, batch, layer, depth, metric, statistic, s, value):
        network = "residual-chain" if data == "synthetic" else "cifar-resnet20"
        rows.append(
            dict(data=data, network=network, state=state, mode=mode, method=method, group_size=batch)
            | dict(layer=layer, depth=depth, metric=metric, statistic=statistic, seed=s, value=value, **env)
        )

    for data, mode, method, batch, depth, s in itertools.product(
        ["synthetic", "digits"], ["in-network", "isolation"], methods, [1, 2, 4, 8, 16], range(4), range(2)
    ):
        if method == "floor" and data != "synthetic":
            continue
        state = "init" if data == "synthetic" else "trained"
        base = methods[method] * (1 + 0.2 * depth) / math.sqrt(batch) * (0.5 if mode == "isolation" else 1.0)
        noise = float(np.exp(rng.normal(0, 0.05)))
        layer = f"layers.{depth}.norm"
        for metric, statistic, factor in (
            ("mean_error", "median", 1.0),
            ("mean_error", "p90", 2.0),
            ("kl", "median", 1.0),
            ("kl", "p90", 2.0),
            ("mean_rmse", "rms", 1.2),
            ("mean_bias", "rms", 0.5),
            ("mean_noise", "rms", 1.0),
            ("var_rmse", "rms", 1.5),
        ):
            add(data, state, mode, method, batch, layer, depth, metric, statistic, s, base * factor * noise)
        if depth == 0 and mode == "in-network" and method != "floor":
            agreement = min(1.0, 0.7 + 0.1 * math.log2(batch) / methods[method])
            add(data, state, mode, method, batch, "output", 4, "agreement", "overall", s, agreement)
            add(data, state, mode, method, batch, "output", 4, "logit_discrepancy", "overall", s, base)
    return pd.DataFrame(rows)


def training_frame(seed: int = 0) -> pd.DataFrame:
    """A tidy training-probe frame in the contract's schema (bkn.probes.results.TRAINING): two networks on MNIST-1D."""
    rng = np.random.default_rng(seed)
    rows = []
    quality = {"bn": 0.0, "bkn-official": 0.05, "gn": 0.03}
    for network, method, group, s, epoch in itertools.product(
        ("convnet", "resnet1d"), quality, [1, 2, 4, 8], range(3), range(1, 4)
    ):
        penalty = 0.25 / group if method == "bn" else 0.05 / group
        acc = 0.7 + 0.08 * epoch + quality[method] - penalty + rng.normal(0, 0.01)
        measured = [
            ("training", "train_loss", 1.5 / epoch + penalty + rng.normal(0, 0.02)),
            ("running", "test_acc", acc),
            ("training", "step_time_s", 0.05 + rng.normal(0, 1e-3)),
        ]
        if epoch == 3:
            measured.append(("population", "test_acc", acc + 0.01))
        for evaluation, metric, value in measured:
            rows.append(
                {
                    "data": "mnist1d",
                    "network": network,
                    "method": method,
                    "group_size": group,
                    "batch_size": 8,
                    "world_size": 1,
                    "seed": s,
                    "epoch": epoch,
                    "evaluation": evaluation,
                    "metric": metric,
                    "value": value,
                    "commit": "abc123",
                    "torch": "2.x",
                    "device": "cpu",
                    "threads": 1,
                }
            )
    return pd.DataFrame(rows)


def gpu_frame() -> pd.DataFrame:
    """A small GPU-check tidy file (suites.gpu's columns): a layer ratio, a network step, a graph check, a skip."""
    extra = {"triton": "3.6.0", "device_name": "Synthetic GPU", "backend": "triton", "commit": "abc123"}
    extra.update(torch="2.11.0", device="cuda", threads=16, dtype="float32", note="")
    rows = [
        dict(part="layer", item="torch-bn", shape="8x64x56x56", mode="fwd+bwd", metric="time_s", value=1e-4),
        dict(part="layer", item="bn", shape="8x64x56x56", mode="fwd+bwd", metric="ratio_to_bn", value=1.1, target=1.2),
        dict(part="network", item="brn", shape="resnet18-8x3x224x224", mode="eager", metric="ratio_to_bn", value=1.2),
        dict(part="graph", item="bn", shape="resnet18-8x3x224x224", mode="", metric="host_syncs", value=0, target=0),
        dict(part="asv", item="asv", shape="", mode="", metric="skipped", status="skipped", note="nothing packed"),
    ]
    frame = pd.DataFrame([{"value": math.nan, "target": math.nan, "status": "ok", **extra, **r} for r in rows])
    return GPU.conform(frame, "gpu_frame")


def write_probes(results: pathlib.Path, drift: bool = True, training: bool = True, gpu: bool = True) -> None:
    """Every probe's result file (the drift and training probes', the GPU check's), written through the results
    contract as they write them."""
    env = {
        "commit": "abc123",
        "torch": "2.x",
        "device": "cpu",
        "device_name": "Synthetic CPU",
        "threads": 1,
        "duration_s": 12.5,
        "seeds": [0, 1],
    }
    if drift:
        DRIFT.write(drift_frame(), env, DRIFT.path(results).parent)
    if training:
        TRAINING.write(training_frame(), env, TRAINING.path(results).parent)
    if gpu:
        GPU.write(gpu_frame(), env, GPU.path(results).parent)


# -- a planted change between two commits --------------------------------------------------------
PLANTED = {METHOD_PARAM: "gn", GROUP_PARAM: 4, "shape": "512x7x7"}


def _is_planted(bench: Bench, combo: tuple) -> bool:
    named = dict(zip(bench.param_names, combo))
    return bench.name.endswith(".time_forward") and all(named.get(k) == v for k, v in PLANTED.items())


def planted_truth(slowdown: float = 1.3, small_shift: float = 1.04):
    """Head commit: the planted benchmark 30% slower; a few others really 4% faster (below the threshold)."""

    def truth(commit, bench, combo):
        t = method_truth(commit, bench, combo)
        named = dict(zip(bench.param_names, combo))
        if commit == 1 and _is_planted(bench, combo):
            t *= slowdown
        elif commit == 1 and named.get(METHOD_PARAM) == "ln" and bench.type == "time":
            t /= small_shift
        return t

    return truth
