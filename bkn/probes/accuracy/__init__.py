"""Accuracy probes: how far each method's statistics drift from the population's (``nox -s accuracy``).

For every normalization method, normalization batch size (group size) ``n``, layer
and seed, the probe measures what the method normalizes with in training mode -
BN's batch statistics, BKN's posterior, BRN's effective statistics, the running (EMA)
estimates - against the layer's exact population statistics
(:func:`bkn.stats.population_statistics`), with the metrics of spec section 4
(:mod:`bkn.stats.metrics`), on the synthetic linear-Gaussian chain (closed-form truth
and a floor) and on real images that ship with scikit-learn, for the paper's CIFAR
ResNet and torchvision's ResNet-18 at initialisation and after a short training run.
How one measurement goes: :mod:`bkn.probes.accuracy.sweep`; methods:
:mod:`bkn.probes.accuracy.methods`; data and networks: :mod:`bkn.probes.accuracy.setups`.

Command line: ``python -m bkn.probes.accuracy --help``. Results: ``<out>/drift.parquet``
(tidy: one row per data x network x state x method x batch_size x layer x metric x
statistic x seed, plus ``commit``, ``torch``, ``device``, ``threads``) and
``<out>/meta.json`` (environment, arguments, duration, skipped units), both written
atomically once the run is complete.
"""
from __future__ import annotations

from .methods import DEFAULT_METHODS, FULL_METHODS, METHODS, resolve
from .sweep import Probe, ProbeConfig, check_network, config_record

__all__ = ["METHODS", "DEFAULT_METHODS", "FULL_METHODS", "resolve", "Probe", "ProbeConfig", "check_network",
           "config_record", "run", "write_results", "COLUMNS"]

COLUMNS = ("data", "network", "state", "method", "batch_size", "layer", "depth", "metric", "statistic",
           "seed", "value", "commit", "torch", "device", "threads")


def run(config: ProbeConfig, progress: bool = False):
    """Run the probe; returns ``(frame, record)``: the tidy results and what ``meta.json`` adds."""
    import time

    import pandas as pd

    from bkn.results import environment

    config.validate()
    probe = Probe(config)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(probe.units()), unit="unit", desc="accuracy probe", dynamic_ncols=True)
        probe.progress = bar
    started = time.perf_counter()
    try:
        rows = probe.run()
    finally:
        if bar is not None:
            bar.close()
    env = environment()
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame = pd.DataFrame(columns=list(COLUMNS))
    for key in ("commit", "torch", "device", "threads"):
        frame[key] = env[key]
    frame = frame[list(COLUMNS)].astype({"batch_size": "int64", "depth": "int64", "seed": "int64",
                                          "threads": "int64", "value": "float64"})
    record = {**env, "config": config_record(config), "duration_s": round(time.perf_counter() - started, 2),
              "skipped": probe.skipped, "training": probe.training,
              "timings_s": {k: round(v, 3) for k, v in probe.timings.items()}, "rows": len(frame)}
    return frame, record


def write_results(frame, record: dict, out) -> tuple:
    """Write ``drift.parquet`` and ``meta.json`` under ``out``, each atomically."""
    import pathlib

    from bkn.results import write_json, write_parquet

    out = pathlib.Path(out)
    return write_parquet(out / "drift.parquet", frame), write_json(out / "meta.json", record)
