"""Sweeps: lists of independent runs, each saved the moment it ends, spread by any ``concurrent.futures`` executor.

Both probes are sweeps. A run is a :class:`Run`: a ``key`` (a hash of everything that
determines its rows, :func:`run_key`), a label for progress lines, and the ``payload`` a
task function turns into ``(rows, record)``. :func:`execute`:

* with an output folder, reads the shards of runs already done (:meth:`bkn.probes.results.Schema.read_shards`)
  and runs only the rest (``fresh=True`` deletes the shards first): the same command run
  again after Ctrl-C or a killed process picks up where it stopped, losing at most the
  runs that were in progress;
* runs each remaining run in this process (no executor) or submits it to the executor;
  the task writes its own shard (:meth:`~bkn.probes.results.Schema.write_shard`, atomically)
  as soon as the run ends, wherever it runs, and returns its result; the caller gets every
  result in the runs' order, so the rows do not depend on the executor or on which
  process ran what.

Executors (:func:`open_executor`, the probes' ``--executor``): ``local`` (a pool of
``--jobs`` spawned processes), ``dask:ADDRESS`` (a Dask ``distributed`` scheduler, through
``Client(ADDRESS).get_executor()``; ``dask:local`` starts a ``LocalCluster`` of ``--jobs``
worker processes), ``submitit[:FOLDER[,key=value...]]`` (SLURM through submitit's
``AutoExecutor``, or local processes where there is no SLURM; logs under FOLDER; the pairs
go to its ``update_parameters``, e.g. ``timeout_min=240,slurm_partition=gpu``). Dask and
submitit are imported only when asked for.
Workers on other machines need the output folder (and the drift probe's weights cache) on
a shared file system; a shard a worker wrote where this process cannot see it is written
again here.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import importlib.util
import json
import multiprocessing
import os
import pathlib
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

# Tests only: seconds each run pauses after saving its shard, so a test can kill a sweep between two runs.
PAUSE_VARIABLE = "BKN_SWEEP_PAUSE_S"
EXECUTORS = "local, dask:ADDRESS, dask:local, submitit or submitit:FOLDER[,key=value...]"
PACKAGES = {"dask": ("distributed", "'dask[distributed]'"), "submitit": ("submitit", "submitit")}


@dataclass(frozen=True)
class Run:
    key: str  # run_key(...) of everything that determines the run's rows
    label: str  # for progress lines
    payload: Any  # what the task function takes (picklable)


def run_key(fields: dict) -> str:
    """A short stable hash of ``fields`` (JSON-able): the name of the run's shard."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def check_executor(spec: str) -> str:
    """``spec`` if it names an executor this machine can start; ``ValueError`` naming what was expected or the
    package to install."""
    kind, _, rest = spec.partition(":")
    if kind == "local" and not rest:
        return spec
    if kind not in PACKAGES or (kind == "dask" and not rest):
        raise ValueError(f"unknown executor {spec!r}; expected one of {EXECUTORS}")
    if kind == "submitit":
        _submitit_spec(rest)
    module, package = PACKAGES[kind]
    if importlib.util.find_spec(module) is None:
        raise ValueError(
            f"--executor {spec} needs the {module!r} package, which is not installed: "
            f"pip install {package} (or the suite's 'cluster' extra: pip install -e '.[cluster]')"
        )
    return spec


@contextlib.contextmanager
def open_executor(
    spec: str, jobs: int, initializer: Callable | None = None, initargs: tuple = ()
) -> Iterator[concurrent.futures.Executor]:
    """The executor ``spec`` names (:func:`check_executor`), shut down on exit. ``initializer`` prepares each
    local process once; the other executors' workers get no initializer (tasks must prepare themselves)."""
    kind, _, rest = check_executor(spec).partition(":")
    if kind == "local":
        context = multiprocessing.get_context("spawn")  # no forked copies of torch's thread pools
        pool = concurrent.futures.ProcessPoolExecutor(jobs, context, initializer, initargs)
        try:
            yield pool
        except BaseException:  # Ctrl-C or a failed run: drop the queued runs, do not wait for them
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    elif kind == "dask":
        import distributed

        cluster = None
        if rest == "local":
            cluster = distributed.LocalCluster(
                n_workers=jobs, threads_per_worker=1, processes=True, dashboard_address=None
            )
        client = distributed.Client(cluster if cluster is not None else rest)
        try:
            yield client.get_executor()
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    else:
        import submitit

        folder, params = _submitit_spec(rest)
        executor = submitit.AutoExecutor(folder=folder)
        executor.update_parameters(**params)
        with _Submitit(executor) as pool:
            yield pool


def _submitit_spec(rest: str) -> tuple[str, dict]:
    """``"FOLDER,key=value,..."`` -> the log folder and submitit's parameters (ints where they are digits)."""
    folder, *pairs = rest.split(",")
    params = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not (key and eq):
            raise ValueError(f"submitit parameter {pair!r}: expected key=value, e.g. timeout_min=120")
        params[key] = int(value) if value.isdigit() else value
    return folder or "results/submitit", params


class _Submitit(concurrent.futures.Executor):
    """submitit's executor as a ``concurrent.futures.Executor``: its jobs waited on by threads here."""

    def __init__(self, executor):
        self.executor = executor
        self.waiters = concurrent.futures.ThreadPoolExecutor(64)

    def submit(self, fn, /, *args, **kwargs):
        return self.waiters.submit(self.executor.submit(fn, *args, **kwargs).result)

    def shutdown(self, wait: bool = True, **kwargs) -> None:
        self.waiters.shutdown(wait)


def execute(
    runs: list[Run],
    task: Callable[[Any], tuple[list, dict]],
    *,
    schema=None,
    out: str | pathlib.Path | None = None,
    executor: concurrent.futures.Executor | None = None,
    fresh: bool = False,
    on_done: Callable[[Run, tuple, bool], None] | None = None,
) -> list[tuple[list, dict]]:
    """``(rows, record)`` of every run, in the runs' order: read from ``schema``'s shards in ``out`` for those
    done already, computed by ``task(payload)`` (here or on ``executor``) for the others, each saved as a shard
    as soon as it ends. ``on_done(run, result, resumed)`` after each (resumed: read from a shard)."""
    keys = [r.key for r in runs]
    if len(set(keys)) != len(keys):
        raise ValueError("two runs of the sweep have the same key (a bug in the probe that listed them)")
    results: dict[str, tuple] = {}
    if out is not None:
        if fresh:
            shutil.rmtree(schema.shard_folder(out), ignore_errors=True)
        for key, (frame, record) in schema.read_shards(out, keys).items():
            results[key] = (frame.to_dict("records"), record)
        for run in runs:
            if run.key in results and on_done is not None:
                on_done(run, results[run.key], True)
    pending = [r for r in runs if r.key not in results]
    where = (schema.name, str(pathlib.Path(out).resolve())) if out is not None else None
    if executor is None:
        for run in pending:
            results[run.key] = saved_task(task, run.payload, where, run.key)
            if on_done is not None:
                on_done(run, results[run.key], False)
    else:
        futures = {executor.submit(saved_task, task, run.payload, where, run.key): run for run in pending}
        try:
            for future in concurrent.futures.as_completed(futures):
                run = futures[future]
                results[run.key] = result = future.result()
                if where is not None and not (schema.shard_folder(where[1]) / f"{run.key}.parquet").exists():
                    schema.write_shard(where[1], run.key, *result)  # written on a machine without our disk
                if on_done is not None:
                    on_done(run, result, False)
        finally:
            for future in futures:
                future.cancel()
    if out is not None:
        prune(schema, out, keys)
    return [results[key] for key in keys]


def prune(schema, out, keys: list[str]) -> int:
    """Once a sweep is complete: delete the shards in ``out`` that are not its runs (an earlier sweep's with
    other settings or code: the results file beside them will hold this sweep's), and temporary files a
    killed process left over an hour ago. The number of files deleted."""
    folder, keep, deleted = schema.shard_folder(out), {f"{k}.parquet" for k in keys}, 0
    old = time.time() - 3600
    for path in folder.glob("*.parquet") if folder.exists() else []:
        if path.name not in keep:
            path.unlink(missing_ok=True)
            deleted += 1
    for path in folder.glob(".*.tmp") if folder.exists() else []:
        if path.stat().st_mtime < old:
            path.unlink(missing_ok=True)
            deleted += 1
    return deleted


def saved_task(task: Callable, payload, where: tuple[str, str] | None, key: str) -> tuple[list, dict]:
    """``task(payload)``, saved at once as the shard ``key`` of schema ``where[0]`` in folder ``where[1]``."""
    rows, record = task(payload)
    if where is not None:
        from bkn.probes.results import SCHEMAS

        SCHEMAS[where[0]].write_shard(where[1], key, rows, record)
        if os.environ.get(PAUSE_VARIABLE):
            time.sleep(float(os.environ[PAUSE_VARIABLE]))
    return rows, record


def status(done: int, total: int, resumed: int, started: float, unit: str = "runs") -> str:
    """``"12/40 runs (3 from earlier), 35 s elapsed, about 1.5 min left"``: the time left from this session's
    pace (runs read from shards cost nothing and do not count)."""
    elapsed = time.perf_counter() - started
    earlier = f" ({resumed} from earlier)" if resumed else ""
    text = f"{done}/{total} {unit}{earlier}, {_duration(elapsed)} elapsed"
    ran = done - resumed
    if 0 < ran and done < total:
        text += f", about {_duration(elapsed / ran * (total - done))} left"
    return text


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
