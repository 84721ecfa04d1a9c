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
* ``meta.json``: :func:`bkn.results.environment`, the arguments, the recipe, the data and
  ``duration_s``.

At the end a summary table is printed (:mod:`~bkn.probes.training.summary`).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

from bkn import methods as registry

from .runs import PRECISE, TrainConfig, make_model, train_model, train_run

__all__ = ["PRECISE", "TrainConfig", "make_model", "train_model", "train_run", "configs", "run"]

DEFAULT_METHODS = ("bn", "bkn-official", "bkn-analytic-adaptive", "brn-scheduled", "gn", "ln")
DEFAULT_GROUP_SIZES = (2, 4, 8, 16, 64)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_EPOCHS = 12
QUICK = {"group_sizes": (2, 8, 64), "seeds": (0,), "epochs": 2}
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
                    )
                )
    return out


def run(args: argparse.Namespace):
    """Train every run of ``args`` and write the results; returns the frame (the TRAINING schema)."""
    import torch
    from tqdm import tqdm

    from bkn.data import digits_dataset
    from bkn.results import TRAINING, environment

    torch.set_num_threads(args.threads)
    train = digits_dataset("train", args.image_size, 1, DATA_SEED)
    test = digits_dataset("test", args.image_size, 1, DATA_SEED)
    if len(train) < args.batch_size:
        raise ValueError(f"--batch-size {args.batch_size} exceeds the {len(train)} training samples")
    runs = configs(args)
    env = environment()
    start = time.perf_counter()
    rows = []
    with tqdm(runs, desc="training probe", unit="run", disable=args.no_progress, file=sys.stderr) as bar:
        for config in bar:
            bar.set_postfix_str(f"{config.method} g={config.group_size} seed={config.seed}")
            rows.extend(train_run(config, train, test))
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
        "notes": "group_size of methods without groups (gn, ln) is the SGD batch size; "
        "brn-scheduled uses RenormSchedule().scaled(total steps)",
    }
    TRAINING.write(frame, meta, args.out)
    return frame


def _method_record(name: str) -> dict:
    method = registry.get(name)
    options = {k: v for k, v in method.options.items()}
    return {"norm": method.norm, "options": options, "scheduled": method.scheduled, "uses_groups": method.uses_groups}
