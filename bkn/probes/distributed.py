"""Multi-process runs on this machine: K workers with a process group, bounded in time.

Used by the tests, the multi-worker training probe and the DDP benchmark. :func:`run`
starts ``world_size`` processes (the ``spawn`` start method), each of which joins a
process group over TCP on the loopback interface (gloo on the CPU, NCCL for CUDA) with
a finite ``timeout``, calls ``fn(rank, world_size, *args)`` and sends its return value
back. The parent supervises: when a worker raises, dies (a signal, ``os._exit``) or the
whole run outlasts ``timeout_s``, the remaining workers are terminated and
:class:`WorkerError` names the rank and what happened. Nothing hangs: a worker blocked in
a collective whose peer is gone is killed by the parent, and under ``torchrun`` (no
parent) the process group's own timeout ends it.
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as _TorchDDP

DEFAULT_TIMEOUT_S = 120.0


class WorkerError(RuntimeError):
    """A worker of a multi-process run failed, died or timed out."""


def available() -> bool:
    """Whether torch.distributed (with the gloo backend) can run here."""
    return dist.is_available() and dist.is_gloo_available()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rank: int, world_size: int, port: int, backend: str = "gloo", timeout_s=DEFAULT_TIMEOUT_S):
    """Join the run's process group on 127.0.0.1:``port``; collectives fail after ``timeout_s`` seconds."""
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _worker(rank, world_size, port, backend, timeout_s, fn, args, results) -> None:
    try:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        init_process_group(rank, world_size, port, backend, timeout_s)
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, "ok", _to_bytes(value)))
    except BaseException as exc:  # the parent reports it, with the worker's traceback
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None


def _to_bytes(value) -> bytes:
    """A worker's result as bytes: tensors sent through the queue itself would live in the worker's
    shared memory, which is gone once the worker exits."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)  # our own workers' results


def run(fn, world_size: int, args: tuple = (), *, backend: str = "gloo", timeout_s: float = DEFAULT_TIMEOUT_S):
    """``[fn(0, K, *args), ..., fn(K-1, K, *args)]``, each in its own process with a process group.

    ``fn`` and ``args`` must be picklable (``fn`` a module-level function). Raises
    :class:`WorkerError` when a worker raises, dies, or the run takes longer than
    ``timeout_s`` seconds (the other workers are then terminated).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not available():
        raise WorkerError("torch.distributed with the gloo backend is not available in this torch build")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, backend, timeout_s, fn, args, results), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    values: dict[int, object] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(values) < world_size:
            try:
                rank, status, value = results.get(timeout=0.2)
            except queue.Empty:
                _check_alive(procs, values, deadline, timeout_s)
                continue
            if status != "ok":
                raise WorkerError(_failures(procs, results, {rank: value}))
            values[rank] = _from_bytes(value)
    finally:
        _stop(procs, graceful=len(values) == world_size)
    return [values[r] for r in range(world_size)]


def _failures(procs, results, errors: dict, grace_s: float = 2.0) -> str:
    """Every failed worker, the dead ones first: a worker that died usually makes its peers fail
    in a collective ("Connection reset by peer"), and the report should lead with the cause."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:  # the peers' errors arrive within moments of the first
        try:
            rank, status, value = results.get(timeout=0.1)
        except queue.Empty:
            continue
        if status != "ok":
            errors[rank] = value
    world = len(procs)
    dead = [
        f"worker {r} of {world} {_exit_text(p.exitcode)}"
        for r, p in enumerate(procs)
        if p.exitcode not in (None, 0, 1) and r not in errors
    ]
    raised = [f"worker {r} of {world} failed: {errors[r]}" for r in sorted(errors)]
    return "; ".join(dead + raised) + "; the other workers were stopped"


def _exit_text(code: int) -> str:
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


def _check_alive(procs, done: dict, deadline: float, timeout_s: float) -> None:
    for rank, p in enumerate(procs):
        if rank not in done and p.exitcode is not None and p.exitcode != 0:
            raise WorkerError(
                f"worker {rank} of {len(procs)} {_exit_text(p.exitcode)} before returning; the others were stopped"
            )
    if time.monotonic() > deadline:
        waiting = [r for r in range(len(procs)) if r not in done]
        raise WorkerError(f"workers {waiting} of {len(procs)} did not finish within {timeout_s:.0f} s; stopped")


def _stop(procs, graceful: bool) -> None:
    """Join finished workers; terminate (then kill) any still running after a failure."""
    for p in procs:
        p.join(timeout=10 if graceful else 0.1)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()


class DistributedDataParallel(_TorchDDP):
    """torch's ``DistributedDataParallel`` that also accepts :class:`bkn.layers.SyncBatchNorm` on the CPU.

    torch's refuses every ``torch.nn.SyncBatchNorm`` in a CPU module ("SyncBatchNorm layers
    only work with GPU modules"), since torch's own kernels are CUDA-only. The project's
    subclass pools its statistics over gloo on the CPU, so only torch's own class is refused
    here. (This overrides a private hook of DDP's constructor; the syncbn training and
    benchmark tests fail loudly if a torch release renames it.)
    """

    def _passing_sync_batchnorm_handle(self, module: nn.Module) -> None:
        from bkn.layers.sync import SyncBatchNorm

        if any(isinstance(m, nn.SyncBatchNorm) and not isinstance(m, SyncBatchNorm) for m in module.modules()):
            super()._passing_sync_batchnorm_handle(module)
