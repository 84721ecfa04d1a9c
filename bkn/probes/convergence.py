"""Training probe: test accuracy vs normalization group size, per norm, on scikit-learn's digits.

``python -m bkn.probes.convergence`` (``nox -s convergence``) trains the paper's CIFAR-style
ResNet (ResNet-8 by default) on the handwritten digits that ship with scikit-learn
(upsampled to 16x16, a fixed stratified split: 1347 train / 450 test) with the SGD batch
fixed and the normalization group size varied, for BN (ghost batches), BKN (the official
transition with p = 0.9, and the analytic transition with the adaptive gain), BRN (the
paper's schedule scaled to the run) at every group size, and GN and LN (which have no
group) once per seed. Every run uses the same recipe (see :class:`bkn.training.TrainConfig`).

Output, in ``--out`` (default ``results/convergence``), written atomically at the end:

* ``convergence.parquet``: tidy, one row per method x group_size x seed x epoch x metric;
  columns ``method, group_size, seed, epoch, metric, value, commit, torch, device, threads``;
  metrics ``train_loss``, ``test_acc`` (own inference statistics), ``step_time_s`` (mean
  seconds per SGD step) every epoch, ``test_acc_precise`` (population statistics of the
  training set, PreciseBN-style) at the last epoch (``--precise every``: every epoch).
  GN and LN rows carry ``group_size`` = the SGD batch size (they normalize each sample on
  its own; plot them as reference lines across group sizes).
* ``meta.json``: :func:`bkn.results.environment`, the arguments, the recipe, the data and
  ``duration_s``.

At the end a summary table is printed: final test accuracy (mean and standard deviation
over seeds) per method x group size, with both kinds of inference statistics, and the
time per SGD step.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys
import time

import pandas as pd
import torch
from tqdm import tqdm

from .. import results, training
from ..data import load_digits

DEFAULT_METHODS = tuple(training.METHODS)
DEFAULT_GROUP_SIZES = (2, 4, 8, 16, 64)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_EPOCHS = 12
QUICK = {"group_sizes": (2, 8, 64), "seeds": (0,), "epochs": 2}
COLUMNS = ["method", "group_size", "seed", "epoch", "metric", "value", "commit", "torch", "device", "threads"]
DATA_SEED = 0  # the train/test split is fixed; run seeds vary init, data order and Monte-Carlo draws


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _name_list(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in values if v not in training.METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown)}; "
                                         f"known methods: {', '.join(training.METHODS)}")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one method")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bkn.probes.convergence", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"CI run: group sizes {QUICK['group_sizes']}, seed {QUICK['seeds'][0]}, "
                        f"{QUICK['epochs']} epochs (explicit options still win)")
    p.add_argument("--methods", type=_name_list, default=DEFAULT_METHODS,
                   help=f"comma-separated methods from: {', '.join(training.METHODS)} (default: all)")
    p.add_argument("--group-sizes", type=_int_list, default=None,
                   help=f"normalization group sizes, each dividing --batch-size "
                        f"(default {','.join(map(str, DEFAULT_GROUP_SIZES))})")
    p.add_argument("--seeds", type=_int_list, default=None,
                   help=f"run seeds (default {','.join(map(str, DEFAULT_SEEDS))})")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs per run (default {DEFAULT_EPOCHS})")
    p.add_argument("--batch-size", type=int, default=64,
                   help="SGD batch size, fixed across group sizes (default %(default)s)")
    p.add_argument("--depth", type=int, default=8, help="CIFAR ResNet depth, 6n+2 (default %(default)s)")
    p.add_argument("--width", type=int, default=16,
                   help="channels of the first stage, doubling per stage (default %(default)s)")
    p.add_argument("--image-size", type=int, default=16,
                   help="digits upsampled to this side, 8 = original (default %(default)s)")
    p.add_argument("--lr", type=float, default=0.1,
                   help="peak learning rate, cosine decay to 0 (default %(default)s)")
    p.add_argument("--precise", choices=training.PRECISE, default="last",
                   help="when to measure the PreciseBN-style accuracy: after the last epoch, every epoch "
                        "or never (default %(default)s)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads, recorded with the results (default %(default)s)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/convergence"),
                   help="output folder for convergence.parquet and meta.json (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults (quick or full) and check the combination; ValueError naming what is wrong."""
    quick = QUICK if args.quick else {}
    defaults = {"group_sizes": DEFAULT_GROUP_SIZES, "seeds": DEFAULT_SEEDS, "epochs": DEFAULT_EPOCHS, **quick}
    for name, value in defaults.items():
        if getattr(args, name) is None:  # not given: the quick or full default
            setattr(args, name, value)
    for name in ("epochs", "batch_size", "threads", "width", "image_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    bad = [g for g in args.group_sizes if g < 1 or args.batch_size % g]
    if bad:
        divisors = [g for g in range(1, args.batch_size + 1) if args.batch_size % g == 0]
        raise ValueError(f"--group-sizes {', '.join(map(str, bad))}: every group size must divide the SGD "
                         f"batch size {args.batch_size}; divisors are {', '.join(map(str, divisors))}")
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.group_sizes)) != len(args.group_sizes):
        raise ValueError(f"--seeds and --group-sizes must not repeat values, got seeds {args.seeds}, "
                         f"group sizes {args.group_sizes}")
    if (args.depth - 2) % 6 or args.depth < 8:
        raise ValueError(f"--depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {args.depth}")
    return args


def configs(args: argparse.Namespace) -> list[training.TrainConfig]:
    """Every run: batch-dependent methods at each group size, GN/LN once (group = the SGD batch)."""
    out = []
    for method in args.methods:
        sizes = args.group_sizes if training.uses_groups(method) else (args.batch_size,)
        for group_size in sizes:
            for seed in args.seeds:
                out.append(training.TrainConfig(
                    method=method, group_size=group_size, seed=seed, epochs=args.epochs,
                    batch_size=args.batch_size, depth=args.depth, width=args.width,
                    image_size=args.image_size, lr=args.lr, precise=args.precise))
    return out


def _mean_std(values: pd.Series, scale: float, digits: int) -> str:
    mean = values.mean() * scale
    std = values.std(ddof=1) * scale if len(values) > 1 else math.nan
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if math.isfinite(std) else f"{mean:.{digits}f}"


def summary(frame: pd.DataFrame) -> str:
    """Final-epoch accuracy (mean ± std over seeds) per method x group size, and ms per step."""
    last = frame[frame.epoch == frame.epoch.max()]
    methods = list(dict.fromkeys(frame.method))
    sizes = sorted(frame[frame.method.map(training.uses_groups)].group_size.unique())
    seeds = sorted(frame.seed.unique())
    columns = [f"g={g}" for g in sizes] + ["per sample"]
    lines = []

    def table(title: str, metric: str, source: pd.DataFrame, scale: float, digits: int, reduce=None) -> None:
        lines.append(title)
        lines.append(f"{'method':<24}" + "".join(f"{c:>15}" for c in columns))
        for method in methods:
            cells = []
            grouped = training.uses_groups(method)
            for column in columns:
                if (column == "per sample") == grouped:
                    cells.append("")
                    continue
                rows = source[(source.method == method) & (source.metric == metric)]
                if grouped:
                    rows = rows[rows.group_size == int(column[2:])]
                values = rows.value if reduce is None else reduce(rows)
                cells.append(_mean_std(values, scale, digits) if len(values) else "-")
            lines.append(f"{method:<24}" + "".join(f"{c:>15}" for c in cells))
        lines.append("")

    epoch = int(frame.epoch.max())
    seed_text = f"seeds {', '.join(map(str, seeds))}"
    table(f"Final test accuracy (%), own inference statistics, epoch {epoch}: mean ± std over {seed_text}",
          "test_acc", last, 100, 1)
    table(f"Final test accuracy (%), population statistics of the training set (PreciseBN-style), "
          f"epoch {epoch}", "test_acc_precise", last, 100, 1)
    table(f"Final training loss, epoch {epoch}", "train_loss", last, 1, 3)
    # Time per step: each run's mean over its epochs, then mean ± std over seeds.
    table("Time per SGD step (ms), mean over epochs; ± over seeds", "step_time_s", frame, 1e3, 1,
          reduce=lambda rows: rows.groupby("seed").value.mean())
    return "\n".join(lines)


def run(args: argparse.Namespace) -> pd.DataFrame:
    torch.set_num_threads(args.threads)
    train = training.Dataset(*load_digits("train", args.image_size, 1, DATA_SEED))
    test = training.Dataset(*load_digits("test", args.image_size, 1, DATA_SEED))
    if len(train) < args.batch_size:
        raise ValueError(f"--batch-size {args.batch_size} exceeds the {len(train)} training samples")
    runs = configs(args)
    env = results.environment()
    start = time.perf_counter()
    rows = []
    with tqdm(runs, desc="convergence", unit="run", disable=args.no_progress, file=sys.stderr) as bar:
        for config in bar:
            bar.set_postfix_str(f"{config.method} g={config.group_size} seed={config.seed}")
            rows.extend(training.train_run(config, train, test))
    duration = time.perf_counter() - start
    frame = pd.DataFrame(rows)
    for key in ("commit", "torch", "device", "threads"):
        frame[key] = env[key]
    frame = frame[COLUMNS].astype({"group_size": "int64", "seed": "int64", "epoch": "int64",
                                   "threads": "int64", "value": "float64"})
    recipe = dataclasses.asdict(runs[0])
    for key in ("method", "group_size", "seed"):
        recipe.pop(key)
    arguments = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}
    meta = {**env, "arguments": arguments, "recipe": recipe, "runs": len(runs),
            "duration_s": round(duration, 1),
            "data": {"name": "sklearn digits", "train": len(train), "test": len(test),
                     "image_size": args.image_size, "channels": 1, "split_seed": DATA_SEED},
            "methods": {m: {"norm": training.METHODS[m][0], "options": training.METHODS[m][1],
                            "uses_groups": training.uses_groups(m)} for m in args.methods},
            "notes": "group_size of methods without groups (gn, ln) is the SGD batch size; "
                     "brn uses RenormSchedule().scaled(total steps)"}
    args.out.mkdir(parents=True, exist_ok=True)
    results.write_parquet(args.out / "convergence.parquet", frame)
    results.write_json(args.out / "meta.json", meta)
    return frame


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        resolve(args)
    except ValueError as err:
        p.error(str(err))
    started = time.perf_counter()
    frame = run(args)
    print()
    print(summary(frame))
    print(f"{frame[['method', 'group_size', 'seed']].drop_duplicates().shape[0]} runs in "
          f"{time.perf_counter() - started:.0f} s with {args.threads} thread(s)")
    print(f"Results: {args.out / 'convergence.parquet'} (and meta.json beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
