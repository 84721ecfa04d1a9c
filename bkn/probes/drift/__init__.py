"""The drift probe: how far each method's statistics drift from the population's, and what that does to the
network's output (``nox -s accuracy``).

For every normalization method, normalization group size ``n``, layer and seed, the
probe measures what the method normalizes with in training mode - BN's batch statistics,
BKN's posterior, BRN's effective statistics, the running (EMA) estimates - against the
layer's exact population statistics (:func:`bkn.probes.stats.population_statistics`), with the
metrics of docs/design.md §9 (:mod:`bkn.probes.stats.metrics`): per-layer error split into bias and
noise over groups, the input drift caused by upstream layers, and end to end (``layer =
"output"``) the agreement of the network in training mode with the same network using
population statistics. Two modes: in-network, and isolation (every earlier layer
normalizing with its population statistics). Setups: the synthetic residual chain
(closed-form truth and a real floor, :mod:`bkn.probes.stats.residual_chain`) and real images that
ship with scikit-learn, on the paper's CIFAR ResNet (and torchvision's ResNet-18 with
``--full``), trained with BN (``trained``) and with each method (``trained-own``).

Modules: :mod:`~bkn.probes.drift.methods` (the names measured: registry methods,
``<method>-ema``, ``floor``), :mod:`~bkn.probes.drift.setups` (data, networks, the cached
training run), :mod:`~bkn.probes.drift.units` (one measurement),
:mod:`~bkn.probes.drift.sweep` (all of them), :mod:`~bkn.probes.drift.summary` (the
printed tables), :mod:`~bkn.probes.drift.progress` (a bar on a terminal, one line per
stage in a log).

Command line: ``python -m bkn.probes.drift --help``. Results: ``<out>/drift.parquet``
(:data:`bkn.probes.results.DRIFT`: one row per data x network x state x method x group_size x mode
x layer x metric x statistic x seed, plus the environment columns) and ``<out>/meta.json``
(environment, arguments, duration, skipped units), both written atomically once the run
is complete. Each unit's rows are saved under ``<out>/shards/drift/`` as soon as it ends,
so the same command run again after an interruption runs only the units not saved yet
(``--fresh`` starts over); units can go to any ``concurrent.futures`` executor
(``--executor``, :mod:`bkn.probes.sweeps`).
"""

from __future__ import annotations

from bkn.probes.drift.methods import DEFAULT_METHODS, FULL_METHODS
from bkn.probes.drift.sweep import Probe, ProbeConfig, check_network, config_record

__all__ = ["DEFAULT_METHODS", "FULL_METHODS", "Probe", "ProbeConfig", "check_network", "config_record", "run"]


def run(config: ProbeConfig, progress: bool = False, jobs: int = 1, out=None, executor=None, fresh: bool = False):
    """Run the probe; returns ``(frame, record)``: the tidy results (the DRIFT schema) and ``meta.json``'s record.

    ``jobs``: processes for the training runs the weights cache lacks (:mod:`bkn.probes.drift.pretrain`).
    ``out``: each unit's rows saved there as a shard as soon as it ends, and the units saved by an earlier
    (interrupted) run with the same settings read back instead of run again (``fresh``: start over).
    ``executor``: a ``concurrent.futures.Executor`` the units (and training runs) go to; ``None``: this process.
    """
    import time

    from bkn.probes.results import DRIFT, environment

    config.validate()
    env = environment()
    probe = Probe(config, jobs=jobs, executor=executor, out=out, fresh=fresh)
    bar = None
    if progress:
        from bkn.probes.drift.progress import Progress

        bar = Progress(len(probe.units()))
        probe.progress = bar
    started = time.perf_counter()
    try:
        rows = probe.run(env)
    finally:
        if bar is not None:
            bar.close()
    frame = DRIFT.frame(rows, env)
    record = {
        **env,
        "config": config_record(config),
        "duration_s": round(time.perf_counter() - started, 2),
        "jobs": jobs,
        "skipped": probe.skipped,
        "training": probe.training,
        "timings_s": {k: round(v, 3) for k, v in probe.timings.items()},
        "rows": len(frame),
        "units": len(probe.units()),
    }
    return frame, record
