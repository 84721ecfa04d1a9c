"""The training probe: test accuracy vs normalization group size, per method, on scikit-learn's digits.

``python -m bkn.probes.training`` (``nox -s convergence``) trains the paper's CIFAR-style
ResNet (ResNet-8 by default) on the handwritten digits that ship with scikit-learn
(upsampled to 16x16, a fixed stratified split: 1347 train / 450 test) with the SGD batch
fixed and the normalization group size varied, for BN (ghost batches), BKN (the official
transition with p = 0.9, and the analytic transition with the adaptive gain), BRN (the
paper's schedule scaled to the run: ``brn-scheduled``) at every group size, and GN and LN
(which have no group) once per seed. Methods are :mod:`bkn.methods` names. Every run uses
the same recipe (:class:`~bkn.probes.training.runs.TrainConfig`) and the engine of
:func:`bkn.training.train_epochs`.

Output, in ``--out`` (default ``results/convergence``), written atomically at the end:

* ``convergence.parquet`` (:data:`bkn.results.TRAINING`): tidy, one row per method x
  group_size x seed x epoch x metric, with ``batch_size`` (the SGD batch) and the
  environment columns; metrics ``train_loss``, ``test_acc`` (own inference statistics),
  ``step_time_s`` (mean seconds per SGD step) every epoch, ``test_acc_precise``
  (population statistics of the training set, PreciseBN-style) at the last epoch
  (``--precise every``: every epoch). GN and LN rows carry ``group_size`` = the SGD batch
  size (they normalize each sample on its own; plot them as reference lines).
* ``meta.json``: :func:`bkn.results.environment`, the arguments, the recipe, the data,
  ``duration_s`` and the workers (``world_size``, per-worker batch, launcher).

At the end a summary table is printed (:mod:`~bkn.probes.training.summary`).

Several workers (``--world-size K``, or launched by ``torchrun --nproc-per-node K``): every
run trains with ``DistributedDataParallel`` over K processes (:mod:`.launch`, :mod:`.ddp`);
``--batch-size`` is the global SGD batch, each worker normalizes its ``batch_size / K``
samples in groups of ``group_size`` (``syncbn``: pooled over all workers, so its
``group_size`` is the SGD batch). Rows record ``world_size``. Results are written once,
after every run finished on every worker; a failed worker leaves the previous files as
they were.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time

from bkn import methods as registry

from .runs import PRECISE, TrainConfig, make_model, train_model, train_run

__all__ = ["PRECISE", "TrainConfig", "make_model", "train_model", "train_run", "configs", "run"]

DEFAULT_METHODS = ("bn", "bkn-official", "bkn-analytic-adaptive", "brn-scheduled", "gn", "ln")
DEFAULT_GROUP_SIZES = (2, 4, 8, 16, 64)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_EPOCHS = 12
QUICK = {"group_sizes": (2, 8, 64), "seeds": (0,), "epochs": 2}
# Several workers: SyncBN joins the methods; the quick grid compares BN, SyncBN and BKN at a per-worker group of 2.
WORKER_METHODS = ("bn", "syncbn", "bkn-official", "bkn-analytic-adaptive", "brn-scheduled", "gn", "ln")
QUICK_WORKERS = {"methods": ("bn", "syncbn", "bkn-official"), "group_sizes": (2,), "seeds": (0,), "epochs": 2}
DATA_SEED = 0  # the train/test split is fixed; run seeds vary init, data order and Monte-Carlo draws


def configs(args: argparse.Namespace) -> list[TrainConfig]:
    """Every run: methods with groups at each group size, the others once (group = the SGD batch)."""
    out = []
    for method in args.methods:
        sizes = args.group_sizes if registry.get(method).uses_groups else (args.batch_size,)
        for group_size in sizes:
            for seed in args.seeds:
                out.append(
                    TrainConfig(
                        method=method,
                        group_size=group_size,
                        seed=seed,
                        epochs=args.epochs,
                        batch_size=args.batch_size,
                        depth=args.depth,
                        width=args.width,
                        image_size=args.image_size,
                        lr=args.lr,
                        precise=args.precise,
                        world_size=args.world_size,
                    )
                )
    return out


def datasets(image_size: int):
    """The probe's fixed split of the digits at ``image_size``: ``(train, test)``."""
    from bkn.data import digits_dataset

    return digits_dataset("train", image_size, 1, DATA_SEED), digits_dataset("test", image_size, 1, DATA_SEED)


def run(args: argparse.Namespace):
    """Train every run of ``args`` and write the results; returns the frame (the TRAINING schema).

    With several workers the frame is returned (and written) by the launching process or
    torchrun's rank 0; the other torchrun ranks return ``None``. A failed worker raises
    :class:`bkn.distributed.WorkerError` and nothing is written.
    """
    import torch

    from bkn.results import TRAINING, environment

    from . import launch

    torch.set_num_threads(args.threads)
    train, test = datasets(args.image_size)
    if len(train) < args.batch_size:
        raise ValueError(f"--batch-size {args.batch_size} exceeds the {len(train)} training samples")
    runs = configs(args)
    env = environment()
    start = time.perf_counter()
    if args.world_size > 1 and launch.launched_by_torchrun():
        launcher, rows = "torchrun", launch.under_torchrun(args, runs)
    elif args.world_size > 1:
        launcher, rows = "spawn", launch.spawn(args, runs)
    else:
        launcher, rows = "single process", launch.train_runs(0, 1, args, runs)
    if rows is None:
        return None  # a torchrun worker other than rank 0: rank 0 writes
    duration = time.perf_counter() - start
    frame = TRAINING.frame(rows, env)
    recipe = dataclasses.asdict(runs[0])
    for key in ("method", "group_size", "seed"):
        recipe.pop(key)
    arguments = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}
    meta = {
        **env,
        "arguments": arguments,
        "recipe": recipe,
        "runs": len(runs),
        "duration_s": round(duration, 1),
        "data": {
            "name": "sklearn digits",
            "train": len(train),
            "test": len(test),
            "image_size": args.image_size,
            "channels": 1,
            "split_seed": DATA_SEED,
        },
        "methods": {m: _method_record(m) for m in args.methods},
        "world_size": args.world_size,
        "workers": {
            "worker_batch_size": args.batch_size // args.world_size,
            "threads_per_worker": args.threads,
            "launcher": launcher,
            "backend": launch.backend() if args.world_size > 1 else None,
        },
        "notes": "group_size of methods without groups (gn, ln) and of syncbn (pooled over every worker) is "
        "the SGD batch size; brn-scheduled uses RenormSchedule().scaled(total steps)",
    }
    TRAINING.write(frame, meta, args.out)
    return frame


def _method_record(name: str) -> dict:
    method = registry.get(name)
    options = {k: v for k, v in method.options.items()}
    return {
        "norm": method.norm,
        "options": options,
        "scheduled": method.scheduled,
        "uses_groups": method.uses_groups,
        "batch_dependent": method.batch_dependent,
    }
