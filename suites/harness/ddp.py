"""One data-parallel training step over K processes on the CPU (DDP, gloo): :class:`DDPCase` and its peers.

asv times a function in its own benchmark process, so that process is rank 0 of a
K-process gloo group, and :class:`DDPCase` starts the K - 1 others itself (``spawn``,
daemon processes: :func:`_peer_main`). Each peer builds the same model (same seed; DDP
broadcasts rank 0's parameters anyway) on its own seeded batch and runs DDP training
steps in an endless loop. Every step has collectives (DDP's gradient all-reduce, and
SyncBN's statistics all-reduce in every norm layer, forward and backward), so the ranks
advance in lockstep and one step timed on rank 0 is one real K-worker step: its own
compute, the all-reduces, and any wait for a slower worker.

``world_size`` 1 is the baseline: the same step in one process, no process group, no
DDP (``syncbn`` is then plain BN). The difference between the two is what data
parallelism costs per step on this machine; ``syncbn`` minus ``bn`` at K workers is what
pooling the statistics costs on top of DDP's gradient all-reduce.

Nothing hangs: the process group has a finite timeout (:data:`TIMEOUT_S`), rank 0 waits
for its peers' "ready" with a deadline and checks that they are alive before every timed
sample (:meth:`DDPCase.check`), a failed step names the peer that died, and a peer exits
when rank 0 is gone (asv ends a benchmark process with ``os._exit``, which skips every
cleanup: the peer's parent watch, :func:`_exit_with_parent`, covers that). No process
group or process exists before the first :class:`DDPCase` is built (asv forks its
benchmark processes from a server that imported this module).
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import multiprocessing
import os
import pathlib
import sys
import threading
import time
import traceback

import torch

from bkn import methods
from bkn.probes import distributed
from bkn.probes.distributed import DistributedDataParallel

from .matrix import SEED, skip
from .network import NetworkCase, cifar_resnet20
from .process import configure_threads

# The asv parameter of the number of workers. Not (yet) one of bkn.probes.results' constants.
WORLD_PARAM = "world_size"
WORLD_SIZES = (1, 2)
# bn and bkn normalize each worker's batch alone; syncbn pools the K workers' batches.
METHODS = methods.names(tag="distributed")
# Per-worker batch: one normalization group of this many samples (the paper's micro-batch).
GROUP_SIZES = (2,)
SHAPE = "3x32x32"  # the CIFAR ResNet-20's input, as bench_network.TimeCifarResNetTrainStep
NUM_CLASSES = 10
TIMEOUT_S = 60.0  # of every collective: a step whose peer is gone fails within this
READY_TIMEOUT_S = 180.0  # a peer imports torch and builds its model: seconds, minutes on a loaded machine
SUITES_PARENT = str(pathlib.Path(__file__).resolve().parents[2])  # the directory that holds suites/


def build_case(method: str, group_size: int, rank: int) -> NetworkCase:
    """Rank ``rank``'s step (not yet wrapped in DDP): same model and seed everywhere, its own batch."""
    case = NetworkCase(cifar_resnet20, method, group_size, SHAPE, "cpu", "float32", "contiguous", NUM_CLASSES)
    if rank:
        gen = torch.Generator().manual_seed(SEED + rank)
        case.x = torch.randn(case.x.shape, generator=gen)
        case.y = torch.randint(0, NUM_CLASSES, case.y.shape, generator=gen)
    return case


def wrap(model: torch.nn.Module) -> DistributedDataParallel:
    """``model`` in DDP without the per-forward buffer broadcast: each worker keeps its own running
    estimates, so the step's only collectives are the gradient all-reduce and SyncBN's statistics."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return DistributedDataParallel(model, forward_sync_buffers=False)
    return DistributedDataParallel(model, broadcast_buffers=False)  # torch before forward_sync_buffers


def _exit_with_parent(parent: int) -> None:
    """End this process once ``parent`` is gone, even while the main thread is blocked in a collective."""

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _peer_main(rank: int, world_size: int, port: int, method: str, group_size: int, parent: int, conn) -> None:
    """A peer (rank >= 1): build, say "ready", join the group, then DDP steps until stopped."""
    _exit_with_parent(parent)
    try:
        configure_threads()
        case = build_case(method, group_size, rank)
        conn.send(("ready", ""))
        distributed.init_process_group(rank, world_size, port, "gloo", TIMEOUT_S)
        case.model = wrap(case.model)
        while True:
            case.step()
    except BaseException as exc:  # rank 0 reports it
        with contextlib.suppress(OSError):  # rank 0 may be gone already: that is why the step failed
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None


@contextlib.contextmanager
def _suites_importable():
    """Let a spawned peer import this module by name while it starts.

    asv imports the suites through a finder of its own on ``sys.meta_path``, which a
    spawned process lacks, so the directory that holds ``suites/`` goes on the peer's
    ``sys.path`` (spawn copies the parent's when the process starts). At the end: the
    packages already installed, the benchmarked commit's ``bkn`` among them, keep
    precedence over the working tree's.
    """
    added = SUITES_PARENT not in sys.path
    if added:
        sys.path.append(SUITES_PARENT)
    try:
        yield
    finally:
        if added:
            sys.path.remove(SUITES_PARENT)


class DDPCase:
    """Rank 0's training step at ``world_size`` workers (1: one process, no DDP), with its peers running.

    Built once per benchmark process (``harness.timing.cached``); :meth:`check` before
    every sample, :meth:`step` timed, :meth:`close` at exit (or when the next case is built).
    """

    def __init__(self, method: str, group_size: int, world_size: int):
        if world_size < 1:
            raise ValueError(f"{WORLD_PARAM} must be >= 1, got {world_size!r}")
        if world_size > 1 and not distributed.available():
            skip("torch.distributed with the gloo backend is not available in this torch build")
        close_open()  # one process group per process
        self.world_size = world_size
        self.peers: list = []
        self.conns: list = []
        self.errors: dict[int, str] = {}
        global _open
        _open = self
        try:
            self.case = build_case(method, group_size, 0)
            if world_size > 1:
                self._start_peers(method, group_size)
            self.case.warm_up(f"{method} at {WORLD_PARAM} {world_size}")
        except BaseException:
            self.close()
            raise

    def _start_peers(self, method: str, group_size: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        port = distributed.free_port()
        for rank in range(1, self.world_size):
            receive, send = ctx.Pipe(duplex=False)
            args = (rank, self.world_size, port, method, group_size, os.getpid(), send)
            peer = ctx.Process(target=_peer_main, args=args, name=f"ddp-rank-{rank}", daemon=True)
            with _suites_importable():
                peer.start()
            send.close()
            self.peers.append(peer)
            self.conns.append(receive)
        self._wait_ready()
        try:
            distributed.init_process_group(0, self.world_size, port, "gloo", TIMEOUT_S)
            self.case.model = wrap(self.case.model)
        except RuntimeError as err:
            raise self.failure(err) from err

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        waiting = set(range(len(self.peers)))
        while waiting:
            for i in sorted(waiting):
                if self.conns[i].poll(0.1):
                    try:
                        status, text = self.conns[i].recv()
                    except EOFError:  # exited before saying anything: check() names how
                        break
                    if status != "ready":
                        self.errors[i + 1] = text
                        raise self.failure()
                    waiting.discard(i)
            self.check()
            if waiting and time.monotonic() > deadline:
                ranks = [i + 1 for i in sorted(waiting)]
                raise RuntimeError(f"DDP peers {ranks} of {self.world_size} not ready within {READY_TIMEOUT_S:.0f} s")

    def check(self) -> None:
        """Raise (naming the rank and its error) if a peer has exited."""
        if any(p.exitcode is not None for p in self.peers):
            raise self.failure()

    def failure(self, cause: BaseException | None = None) -> RuntimeError:
        """What went wrong, led by the peers that exited: a dead peer makes rank 0's collective fail too."""
        time.sleep(0.2)  # a failing peer's message arrives moments after rank 0's collective error
        self._read_errors()
        parts = []
        for rank, peer in enumerate(self.peers, start=1):
            if peer.exitcode is not None:
                how = f"was killed by signal {-peer.exitcode}" if peer.exitcode < 0 else f"exited ({peer.exitcode})"
                parts.append(f"DDP peer rank {rank} of {self.world_size} {how}")
            if rank in self.errors:
                parts.append(f"rank {rank}: {self.errors[rank]}")
            elif peer.exitcode is not None and peer.exitcode > 0:  # failed while starting, before _peer_main
                parts.append(f"rank {rank} sent no error (its traceback, if any, is on stderr)")
        if cause is not None:
            parts.append(f"rank 0: {type(cause).__name__}: {cause}")
        return RuntimeError("; ".join(parts) or "DDP step failed")

    def _read_errors(self) -> None:
        """Collect the error messages the peers sent (a peer killed by a signal sends none)."""
        for rank, conn in enumerate(self.conns, start=1):
            try:
                while conn.poll(0):
                    status, text = conn.recv()
                    if status != "ready":
                        self.errors[rank] = text
            except (EOFError, OSError):  # the peer has exited and its end of the pipe is closed
                continue

    def step(self) -> torch.Tensor:
        """One training step on rank 0 (in lockstep with the peers when ``world_size`` > 1)."""
        if not self.peers:
            return self.case.step()
        try:
            return self.case.step()
        except RuntimeError as err:  # gloo: a peer gone ("Connection closed by peer") or the timeout
            raise self.failure(err) from err

    def close(self) -> None:
        """Stop the peers (blocked in a collective: terminated) and leave the process group."""
        global _open
        for peer in self.peers:
            if peer.is_alive():
                peer.terminate()
            peer.join(5)
            if peer.is_alive():
                peer.kill()
                peer.join()
        for conn in self.conns:
            conn.close()
        self.peers, self.conns = [], []
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if _open is self:
            _open = None


_open: DDPCase | None = None


def close_open() -> None:
    """Close the case built last in this process, if any (its peers and its process group)."""
    if _open is not None:
        _open.close()


atexit.register(close_open)  # pytest and scripts; asv's benchmark processes end with os._exit
