"""The drift probe's short training runs, several at a time, before its units (``--jobs``).

Every network a sweep needs trained (``trained``: one BN network per real-data setup;
``trained-own``: one per method) is independent of the others, and a training run uses
one torch thread well. So before the units run, :func:`pretrain` trains the networks the
weights cache (``--cache``) lacks in ``jobs`` spawned processes, one thread each, and
caches them exactly as :func:`bkn.probes.drift.setups.trained_network` would in the
probe's own process (same function, same seeds, same cache key); the sweep then reads
them from the cache and records the training runs' records from here (``cached:
false`` and their ``train_s``). With ``--executor`` the training runs go to the executor's
workers instead, before the units.
"""

from __future__ import annotations

import multiprocessing
import pathlib

from bkn import methods as registry
from bkn.probes.drift import setups

Job = tuple[str, str, int, str, "str | None"]  # network, data, seed, cache folder, method name (None: BN)


def needed(wanted: list[tuple[str, str, "str | None"]], seed: int, cache: str) -> list[Job]:
    """The ``(network, data, method)`` training runs of ``wanted`` whose weights are not in the cache yet."""
    jobs = []
    for network, data, method in dict.fromkeys(wanted):
        if data == "synthetic":
            continue
        path, _ = setups._cache_file(
            pathlib.Path(cache), network, data, seed, registry.get(method) if method is not None else None
        )
        if not path.exists():
            jobs.append((network, data, seed, cache, method))
    return jobs


def pretrain(
    jobs: list[Job], processes: int, progress=None, executor=None
) -> dict[tuple[str, str, "str | None"], dict]:
    """Train and cache ``jobs`` in ``processes`` spawned processes, or on ``executor`` (a
    ``concurrent.futures.Executor``) when given; ``{(network, data, method): record}``.

    ``progress``: a :class:`~bkn.probes.drift.progress.Progress` (or None), told as each run ends.
    """
    records = {}
    if not jobs:
        return records
    where = "on the executor" if executor is not None else f"in {min(processes, len(jobs))} processes"
    if progress is not None:
        progress.stage(f"training {len(jobs)} network(s) {where} (cached afterwards)")
    if executor is not None:
        import concurrent.futures

        finished = (f.result() for f in concurrent.futures.as_completed([executor.submit(_train, j) for j in jobs]))
        for job, record in finished:
            records[job[0], job[1], job[4]] = _told(progress, job, record)
        return records
    context = multiprocessing.get_context("spawn")  # no forked copies of torch's thread pools
    with context.Pool(min(processes, len(jobs)), initializer=_init) as pool:
        for job, record in pool.imap_unordered(_train, jobs):
            records[job[0], job[1], job[4]] = _told(progress, job, record)
    return records


def _told(progress, job: Job, record: dict) -> dict:
    network, data, _, _, method = job
    if progress is not None:
        progress.stage(f"trained {network} on {data} with {method or 'BN'} in {record.get('train_s', 0):.0f} s")
    return record


def _init() -> None:
    import torch

    from bkn.layers import _native

    torch.set_num_threads(1)
    _native.load()  # BKN's and BRN's compiled kernels, once per process


def _train(job: Job) -> tuple[Job, dict]:
    network, data, seed, cache, method = job
    _init()  # a worker of an executor had no initializer
    source = setups.load_source(data, network)
    _, record = setups.trained_network(
        network, source, seed, cache, method=registry.get(method) if method is not None else None
    )
    return job, record
