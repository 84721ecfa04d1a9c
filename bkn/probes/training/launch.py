"""Where the training probe's runs execute: in this process, in parallel jobs, on K DDP workers, or under torchrun.

* one worker (``--world-size 1``), ``--jobs 1``: every run in this process, one after the other;
* one worker, ``--jobs J`` (default 2), or ``--executor``: :func:`run_one` per run on J
  spawned processes (``--threads`` each, 1 by default) or on the executor's workers
  (:func:`bkn.probes.sweeps.execute`), which load the data once and train one run at a
  time; this process prints progress as runs finish and puts the rows back in the runs'
  order, so the result does not depend on J or on which job ran what. A job that raises
  stops the sweep; the error propagates and the results file is not written (the runs
  that finished are saved as shards);
* ``--world-size K``: :func:`spawn` starts K processes with a process group on 127.0.0.1
  (:func:`bkn.probes.distributed.run`: gloo on the CPU, NCCL for CUDA, a finite timeout); each
  runs :func:`train_runs` and rank 0 sends its rows back. When a worker raises, dies or
  the whole run outlasts ``--timeout``, the others are stopped and
  :class:`bkn.probes.distributed.WorkerError` says which and why; the caller then writes nothing;
* under ``torchrun --nproc-per-node K -m bkn.probes.training ...`` (``RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set): :func:`under_torchrun` joins the
  group torchrun set up and runs :func:`train_runs` in this process; rank 0 gets the rows
  (and writes them), the other ranks ``None``. torchrun stops the others when one dies.

Every DDP worker trains the same runs in the same order, so their collectives line up.
"""

from __future__ import annotations

import argparse
import datetime
import os

from bkn.probes.training.progress import Progress
from bkn.probes.training.runs import TrainConfig, train_run

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
COLLECTIVE_TIMEOUT_S = 600.0  # under torchrun: a collective waits at most this long for a stuck peer
# Tests only: "RANK:STEPS" makes worker RANK exit abruptly (os._exit) after STEPS training steps.
KILL_VARIABLE = "BKN_TRAINING_PROBE_KILL"


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def torchrun_world_size() -> int:
    return int(os.environ["WORLD_SIZE"])


def backend(device: str = "cpu") -> str:
    """The process group's backend for the device the probe trains on."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


def spawn(args: argparse.Namespace, runs: list[TrainConfig], keys: list[str] | None = None) -> list[dict]:
    """Every run on ``args.world_size`` spawned workers; rank 0's rows (WorkerError when a worker fails)."""
    from bkn.probes import distributed

    values = distributed.run(
        train_runs, args.world_size, (args, runs, keys), backend=backend(_device(args)), timeout_s=args.timeout
    )
    return values[0]


def under_torchrun(
    args: argparse.Namespace, runs: list[TrainConfig], keys: list[str] | None = None
) -> list[dict] | None:
    """Every run as this torchrun worker; the rows on rank 0, ``None`` on the others."""
    import torch.distributed as dist

    rank, world_size = int(os.environ["RANK"]), torchrun_world_size()
    dist.init_process_group(
        backend(_device(args)),
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=min(args.timeout, COLLECTIVE_TIMEOUT_S)),
    )
    try:
        return train_runs(rank, world_size, args, runs, keys)
    finally:
        dist.destroy_process_group()


def train_runs(
    rank: int, world_size: int, args: argparse.Namespace, runs: list[TrainConfig], keys: list[str] | None = None
) -> list[dict] | None:
    """One worker's part of the probe: every run in order; the rows on rank 0, ``None`` on the others.

    Loads the data itself (a spawned worker shares nothing with its parent) and reports
    progress from rank 0 only. With ``keys`` (the runs' :func:`bkn.probes.sweeps.run_key`), rank 0
    saves each run's rows as a shard in ``args.out`` as soon as it ends.
    """
    import torch

    torch.set_num_threads(args.threads)
    _load_kernels()
    train, test = _datasets(args)
    progress = Progress(len(runs), enabled=rank == 0 and not args.no_progress)
    on_step = _planted_exit(rank)
    rows: list[dict] = []
    try:
        for config in runs:
            progress.start(config)
            run_rows = train_run(config, train, test, on_step)
            if rank == 0 and keys is not None:
                from bkn.probes.results import TRAINING

                TRAINING.write_shard(args.out, keys[runs.index(config)], run_rows, {})
            progress.finish(config, run_rows)
            rows.extend(run_rows)
    finally:
        progress.close()
    return rows if rank == 0 else None


def run_one(payload: tuple[argparse.Namespace, TrainConfig]) -> tuple[list[dict], dict]:
    """One run in any process - this one, a local pool's, a Dask or SLURM worker: ``(rows, {})``. The data,
    the threads and the compiled kernels are prepared on the process's first run (:func:`_job_init`)."""
    args, config = payload
    if _JOB.get("key") != _data_key(args):
        _job_init(args)
    return train_run(config, *_JOB["data"]), {}


_JOB: dict = {}  # in a job process: its data, loaded once by _job_init


def _data_key(args: argparse.Namespace) -> tuple:
    return args.data, args.samples, args.image_size, args.threads


def _job_init(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    _load_kernels()
    _JOB["data"] = _datasets(args)
    _JOB["key"] = _data_key(args)


def _datasets(args: argparse.Namespace):
    """The probe's ``(train, test)`` split, as :func:`bkn.probes.training.datasets` gives it: taken from
    :mod:`.networks` directly, since the package's ``__init__`` imports this module (no import cycle)."""
    from bkn.probes.training import networks

    return networks.datasets(args.data, args.samples, args.image_size)


def _load_kernels() -> None:
    """Load BKN's and BRN's compiled kernels now (seconds per process), not inside the first run's steps,
    whose ``step_time_s`` would include it."""
    from bkn.layers import _native

    _native.load()


def _planted_exit(rank: int):
    """The test hook of :data:`KILL_VARIABLE`: an ``on_step`` that ends this worker abruptly, or ``None``."""
    planted = os.environ.get(KILL_VARIABLE)
    if not planted:
        return None
    kill_rank, steps = (int(part) for part in planted.split(":"))
    if rank != kill_rank:
        return None
    count = 0

    def on_step() -> None:
        nonlocal count
        count += 1
        if count >= steps:
            os._exit(3)  # no cleanup, no message: as a worker killed by the OOM killer or a signal

    return on_step


def _device(args: argparse.Namespace) -> str:
    """The device the probe trains on (the CPU: the probe has no --device flag yet)."""
    return getattr(args, "device", "cpu")
