"""The probes' command lines: comma-list parsers and the flags both probes share.

Both ``python -m bkn.probes.drift`` and ``python -m bkn.probes.training`` take
``--methods``, ``--group-sizes``, ``--seeds``, ``--threads``, ``--out`` and
``--no-progress`` with one meaning and one syntax (:func:`add_shared_flags`). The list
parsers are argparse ``type`` functions: a bad value exits with status 2 and a message
that names the flag, the value and what was expected. ``--methods``, ``--group-sizes``
and ``--seeds`` default to ``None``, so each probe can fill its quick or full default.
"""

from __future__ import annotations

import argparse
import pathlib
from typing import Callable

from bkn import methods as registry


def _split(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _no_repeats(values: list, text: str) -> None:
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{', '.join(repeated)} given more than once in {text!r}")


def int_list(text: str, minimum: int | None = None) -> tuple[int, ...]:
    """``"1,2,4"`` -> ``(1, 2, 4)``: at least one integer, none repeated, each ``>= minimum`` when given."""
    try:
        values = [int(v) for v in _split(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    if minimum is not None and min(values) < minimum:
        raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {text!r}")
    _no_repeats(values, text)
    return tuple(values)


def positive_int_list(text: str) -> tuple[int, ...]:
    """:func:`int_list` of integers >= 1 (group sizes)."""
    return int_list(text, minimum=1)


def seed_list(text: str) -> tuple[int, ...]:
    """:func:`int_list` of integers >= 0 (seeds)."""
    return int_list(text, minimum=0)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def name_list(text: str) -> tuple[str, ...]:
    """``"a, b"`` -> ``("a", "b")``: at least one name, none repeated."""
    values = _split(text)
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one name, got {text!r}")
    _no_repeats(values, text)
    return tuple(values)


def method_list(check: Callable[[list[str]], object] = registry.resolve) -> Callable[[str], tuple[str, ...]]:
    """A parser of method names checked by ``check`` (the registry's :func:`bkn.methods.resolve` by default,
    whose error lists the known names)."""

    def parse(text: str) -> tuple[str, ...]:
        values = name_list(text)
        try:
            check(list(values))
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return values

    return parse


def add_shared_flags(
    parser: argparse.ArgumentParser,
    *,
    methods: str,
    group_sizes: str,
    seeds: str,
    threads: int,
    threads_help: str = "",
    out: str,
    check_methods: Callable[[list[str]], object] = registry.resolve,
) -> None:
    """Add ``--methods --group-sizes --seeds --threads --out --no-progress``; the strings say the defaults."""
    parser.add_argument("--methods", type=method_list(check_methods), help=f"comma list of methods ({methods})")
    parser.add_argument(
        "--group-sizes",
        type=positive_int_list,
        help=f"comma list of normalization group sizes: samples each norm computes its statistics over ({group_sizes})",
    )
    parser.add_argument("--seeds", type=seed_list, help=f"comma list of seeds ({seeds})")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=threads,
        help=f"torch threads, recorded with the results (default %(default)s{threads_help})",
    )
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path(out), help="output folder (default %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def executor_spec(text: str) -> str:
    """An ``--executor`` value (:func:`bkn.probes.sweeps.check_executor`)."""
    from bkn.probes import sweeps

    try:
        return sweeps.check_executor(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_sweep_flags(parser: argparse.ArgumentParser, jobs: str) -> None:
    """Add ``--executor`` and ``--fresh``: where a sweep's runs go, and whether to ignore the runs saved by an
    earlier, interrupted run (:mod:`bkn.probes.sweeps`). ``jobs`` says what ``--jobs`` means without one."""
    parser.add_argument(
        "--executor",
        type=executor_spec,
        help="send every run to this executor, each saving its shard as it ends: local (--jobs spawned "
        "processes), dask:ADDRESS (a Dask distributed scheduler, e.g. dask:tcp://host:8786; dask:local starts a "
        f"LocalCluster of --jobs worker processes), submitit[:FOLDER[,key=value...]] (SLURM via submitit; the "
        f"pairs go to its update_parameters, e.g. timeout_min=240,slurm_partition=gpu). Default: {jobs}",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start over: delete the runs saved in OUT/shards/<probe>/ by earlier runs (default: run "
        "only the runs not saved yet, so an interrupted sweep resumes where it stopped)",
    )


def interrupted(out, schema, total: int) -> str:
    """What Ctrl-C leaves: the runs saved so far and how to finish."""
    saved = len(list(schema.shard_folder(out).glob("*.parquet"))) if schema.shard_folder(out).exists() else 0
    return (
        f"\ninterrupted: {out / schema.file} not written (earlier results, if any, are left as they were); "
        f"{saved} finished run(s) of this and earlier sweeps are saved in {schema.shard_folder(out)} "
        f"({total} in this sweep): run the same command again to finish the rest (--fresh starts over)"
    )


def open_executor(args: argparse.Namespace):
    """A context giving the executor ``args.executor`` names (with ``args.jobs`` local or Dask-local workers),
    or ``None`` (no ``--executor``: the probe's own way)."""
    import contextlib

    from bkn.probes import sweeps

    if not getattr(args, "executor", None):
        return contextlib.nullcontext(None)
    return sweeps.open_executor(args.executor, args.jobs)
