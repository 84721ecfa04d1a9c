"""``python -m bkn.probes.training``: the training probe's command line (see ``--help``)."""

from __future__ import annotations

import argparse
import sys
import time

from bkn import methods as registry

from .. import cli
from . import DEFAULT_EPOCHS, DEFAULT_GROUP_SIZES, DEFAULT_METHODS, DEFAULT_SEEDS, PRECISE, QUICK, run


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
        f"{QUICK['epochs']} epochs (explicit options still win)",
    )
    cli.add_shared_flags(
        p,
        methods=f"default: {','.join(DEFAULT_METHODS)}; known: {', '.join(registry.names())}",
        group_sizes=f"each dividing --batch-size; default {','.join(map(str, DEFAULT_GROUP_SIZES))}",
        seeds=f"weights, data order, Monte-Carlo draws; default {','.join(map(str, DEFAULT_SEEDS))}",
        threads=2,
        out="results/convergence",
    )
    p.add_argument("--epochs", type=cli.positive_int, help=f"epochs per run (default {DEFAULT_EPOCHS})")
    p.add_argument(
        "--batch-size",
        type=cli.positive_int,
        default=64,
        help="SGD batch size, fixed across group sizes (default %(default)s)",
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
    """Fill the defaults (quick or full) and check the combination; ValueError naming what is wrong."""
    quick = QUICK if args.quick else {}
    defaults = {
        "methods": DEFAULT_METHODS,
        "group_sizes": DEFAULT_GROUP_SIZES,
        "seeds": DEFAULT_SEEDS,
        "epochs": DEFAULT_EPOCHS,
        **quick,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:  # not given: the quick or full default
            setattr(args, name, value)
    bad = [g for g in args.group_sizes if args.batch_size % g]
    if bad:
        divisors = [g for g in range(1, args.batch_size + 1) if args.batch_size % g == 0]
        raise ValueError(
            f"--group-sizes {', '.join(map(str, bad))}: every group size must divide the SGD "
            f"batch size {args.batch_size}; divisors are {', '.join(map(str, divisors))}"
        )
    if (args.depth - 2) % 6 or args.depth < 8:
        raise ValueError(f"--depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {args.depth}")
    return args


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        resolve(args)
    except ValueError as err:
        p.error(str(err))
    from .summary import summary

    started = time.perf_counter()
    frame = run(args)
    print()
    print(summary(frame))
    print(
        f"{frame[['method', 'group_size', 'seed']].drop_duplicates().shape[0]} runs in "
        f"{time.perf_counter() - started:.0f} s with {args.threads} thread(s)"
    )
    print(f"Results: {args.out / 'convergence.parquet'} (and meta.json beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
