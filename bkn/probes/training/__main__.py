"""``python -m bkn.probes.training``: the training probe's command line (see ``--help``)."""

from __future__ import annotations

import argparse
import sys
import time

from bkn import methods as registry

from .. import cli
from . import (
    DEFAULT_EPOCHS,
    DEFAULT_GROUP_SIZES,
    DEFAULT_METHODS,
    DEFAULT_SEEDS,
    PRECISE,
    QUICK,
    QUICK_WORKERS,
    WORKER_METHODS,
    launch,
    run,
)

QUICK_TIMEOUT_S = 900.0
FULL_TIMEOUT_S = 48 * 3600.0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bkn.probes.training",
        description="The training probe: test accuracy vs normalization group size, per method, on "
        "scikit-learn's digits, with the SGD batch fixed. Writes OUT/convergence.parquet and OUT/meta.json "
        "and prints a summary.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"CI run: group sizes {QUICK['group_sizes']}, seed {QUICK['seeds'][0]}, "
        f"{QUICK['epochs']} epochs; with several workers methods {','.join(QUICK_WORKERS['methods'])} at group "
        f"size {QUICK_WORKERS['group_sizes'][0]} (explicit options still win)",
    )
    cli.add_shared_flags(
        p,
        methods=f"default: {','.join(DEFAULT_METHODS)}, with syncbn after bn on several workers; "
        f"known: {', '.join(registry.names())}",
        group_sizes=f"each dividing --batch-size, or each worker's share of it; default "
        f"{','.join(map(str, DEFAULT_GROUP_SIZES))}, on several workers those that divide the share, and the share",
        seeds=f"weights, data order, Monte-Carlo draws; default {','.join(map(str, DEFAULT_SEEDS))}",
        threads=2,
        out="results/convergence",
    )
    _threads_per_worker(p)
    p.add_argument(
        "--world-size",
        type=cli.positive_int,
        help="data-parallel workers: DistributedDataParallel over this many processes on this machine (gloo); "
        "--batch-size is the global SGD batch, split evenly, and --group-sizes must divide each worker's share "
        "(default 1, or torchrun's WORLD_SIZE when launched by torchrun)",
    )
    p.add_argument(
        "--timeout",
        type=_positive_seconds,
        help=f"several workers: stop them and write nothing when the run takes longer than this many seconds, "
        f"or a collective waits that long (default {QUICK_TIMEOUT_S:.0f} with --quick, {FULL_TIMEOUT_S:.0f} "
        f"otherwise; at most {launch.COLLECTIVE_TIMEOUT_S:.0f} per collective under torchrun)",
    )
    p.add_argument("--epochs", type=cli.positive_int, help=f"epochs per run (default {DEFAULT_EPOCHS})")
    p.add_argument(
        "--batch-size",
        type=cli.positive_int,
        default=64,
        help="SGD batch size, fixed across group sizes; on several workers the global batch (default %(default)s)",
    )
    p.add_argument("--depth", type=int, default=8, help="CIFAR ResNet depth, 6n+2 (default %(default)s)")
    p.add_argument(
        "--width",
        type=cli.positive_int,
        default=16,
        help="channels of the first stage, doubling per stage (default %(default)s)",
    )
    p.add_argument(
        "--image-size",
        type=cli.positive_int,
        default=16,
        help="digits upsampled to this side, 8 = original (default %(default)s)",
    )
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate, cosine decay to 0 (default %(default)s)")
    p.add_argument(
        "--precise",
        choices=PRECISE,
        default="last",
        help="when to measure the PreciseBN-style accuracy: after the last epoch, every epoch "
        "or never (default %(default)s)",
    )
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults (quick or full, one worker or several) and check the combination; ValueError naming
    what is wrong."""
    _resolve_workers(args)
    workers = args.world_size > 1
    if args.batch_size % args.world_size:
        raise ValueError(
            f"--batch-size {args.batch_size} does not split evenly over --world-size {args.world_size} workers; "
            f"use a multiple of {args.world_size}"
        )
    per_worker = args.batch_size // args.world_size
    quick = (QUICK_WORKERS if workers else QUICK) if args.quick else {}
    defaults = {
        "methods": WORKER_METHODS if workers else DEFAULT_METHODS,
        "group_sizes": _worker_group_sizes(per_worker) if workers else DEFAULT_GROUP_SIZES,
        "seeds": DEFAULT_SEEDS,
        "epochs": DEFAULT_EPOCHS,
        **quick,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:  # not given: the quick or full default
            setattr(args, name, value)
    bad = [g for g in args.group_sizes if per_worker % g]
    if bad:
        divisors = [g for g in range(1, per_worker + 1) if per_worker % g == 0]
        what = (
            f"the per-worker batch {per_worker} (--batch-size {args.batch_size} over --world-size {args.world_size})"
            if workers
            else f"the SGD batch size {args.batch_size}"
        )
        raise ValueError(
            f"--group-sizes {', '.join(map(str, bad))}: every group size must divide {what}; "
            f"divisors are {', '.join(map(str, divisors))}"
        )
    if "syncbn" in args.methods and not workers:
        raise ValueError(
            "--methods syncbn: SyncBN pools its statistics over the workers of a data-parallel run; with one "
            f"worker it is plain BN over the SGD batch (the bn row at --group-sizes {args.batch_size}); "
            "give --world-size 2 or more"
        )
    if (args.depth - 2) % 6 or args.depth < 8:
        raise ValueError(f"--depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {args.depth}")
    return args


def _resolve_workers(args: argparse.Namespace) -> None:
    """World size (torchrun's when it launched us), threads per worker and the timeout."""
    if launch.launched_by_torchrun():
        launched = launch.torchrun_world_size()
        if args.world_size not in (None, launched):
            raise ValueError(
                f"--world-size {args.world_size}, but torchrun started {launched} workers (WORLD_SIZE); "
                "leave --world-size out under torchrun"
            )
        args.world_size = launched
    if args.world_size is None:
        args.world_size = 1
    if args.threads is None:
        args.threads = 2 if args.world_size == 1 else 1  # several workers share this machine's cores
    if args.timeout is None:
        args.timeout = QUICK_TIMEOUT_S if args.quick else FULL_TIMEOUT_S


def _worker_group_sizes(per_worker: int) -> tuple[int, ...]:
    """The default group sizes that fit a worker's batch, and the whole per-worker batch."""
    sizes = [g for g in DEFAULT_GROUP_SIZES if per_worker % g == 0 and g < per_worker]
    return tuple(sizes + [per_worker])


def _threads_per_worker(p: argparse.ArgumentParser) -> None:
    """--threads (a shared flag) defaults by world size: filled in by :func:`_resolve_workers`."""
    for action in p._actions:
        if action.dest == "threads":
            action.default = None
            action.help = "torch threads per worker, recorded with the results (default 2 with one worker, 1 each "
            action.help += "with several)"


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        resolve(args)
    except ValueError as err:
        p.error(str(err))
    from bkn.distributed import WorkerError

    from .summary import summary

    started = time.perf_counter()
    try:
        frame = run(args)
    except WorkerError as err:
        print(
            f"{p.prog}: error: the run on {args.world_size} workers failed, nothing was written "
            f"(the files in {args.out} are as they were): {err}",
            file=sys.stderr,
        )
        return 1
    if frame is None:
        return 0  # a torchrun worker other than rank 0, which reports
    print()
    print(summary(frame))
    runs = frame[["method", "group_size", "seed"]].drop_duplicates().shape[0]
    workers = f"{args.world_size} workers x " if args.world_size > 1 else ""
    print(f"{runs} runs in {time.perf_counter() - started:.0f} s with {workers}{args.threads} thread(s)")
    print(f"Results: {args.out / 'convergence.parquet'} (and meta.json beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
