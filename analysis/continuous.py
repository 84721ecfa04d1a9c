"""``python -m analysis.continuous [BASE] [HEAD]`` (``nox -s continuous``): time two commits, gate on slowdowns.

What it does, in order:

1. resolves BASE (default: the merge-base of HEAD with ``main``, or ``HEAD~1`` when HEAD
   is on main) and HEAD (default ``HEAD``). Without a base (first commit, shallow clone)
   it says why, builds the report with the Regressions section saying so, and exits 0;
2. checks both commits out into temporary detached git worktrees (the commits are
   measured, not the working tree) and checks that each one's ``bkn`` is what a
   benchmark process imports there (``PYTHONPATH``, and ``ASV_PYTHONPATH``, which asv turns
   into the benchmark processes' ``PYTHONPATH``, put the checkout first, ahead of the venv's
   editable install), then builds or finds its compiled kernels
   (``python -m bkn.kernels``; the cache is keyed by source, so equal sources share one build);
3. runs ``R`` rounds (``--rounds``, default 6). A round runs the tracking subset
   (:data:`suites.tracking.TRACKING`, ``--only`` narrows it) once at each commit, in ABBA
   order, each as ``asv run --python=same --set-commit-hash=<sha> --record-samples
   [--append-samples] -a rounds=1 -a repeat=<--repeat>`` with a generated asv config whose
   ``benchmark_dir`` is that commit's ``suites/`` and whose results go to the shared
   ``.asv/results`` (so ``asv publish`` and the report see them as ordinary results). asv's
   own ``--interleave-rounds`` refuses ``--python=same``, and a virtualenv per commit would
   reinstall torch (minutes, gigabytes), hence this loop. One line of progress per asv call;
   asv's own output goes to ``<rounds-dir>/<base>-<head>.log``;
4. writes each round's value per benchmark (the fastest of its samples in that round, see
   :func:`round_rows`) to a rounds file (:mod:`analysis.rounds`),
   prints the verdict table (paired-rounds t-test, see there), builds the HTML report
   (``python -m analysis.report --base --head``, whose Regressions section reads the
   rounds file) and exits 1 when a benchmark is slower by ``--threshold`` or more and
   the difference is significant (``--alpha``), 2 on a usage or measurement error;
5. before that verdict, the benchmarks the first rounds call a regression are timed again,
   alone, in ``--confirm-rounds`` fresh rounds (default 6, same ABBA order), and stay a
   regression only if those rounds alone say so too (:mod:`analysis.rounds`, "confirmation").
   The cost is paid only when something is flagged.

The git and checkout plumbing of steps 1-2 (revisions, worktrees' asv configs, the timer, the
checkout check) is in :mod:`analysis.checkouts`; its names are importable from here too.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import pandas as pd

from . import rounds as rounds_mod
from .asv_results import _load_result_file, load_benchmarks
from .checkouts import MALLOC_ENV, TIMER_ENV, NoBase, asv_config, check_checkout, default_base, git, pick_timer, resolve
from .messages import Messages
from .regressions import DEFAULT_THRESHOLD, threshold_arg

DEFAULT_ROUNDS = 6
DEFAULT_REPEAT = 5
DEFAULT_CONFIRM_ROUNDS = 6


def tracking_entries(only: str | None) -> list[tuple[str, tuple]]:
    """The tracking subset, narrowed to the entries whose asv name matches ``only`` (a regex)."""
    import re

    from suites.tracking import TRACKING, asv_name

    entries = list(TRACKING)
    if only:
        entries = [e for e in entries if re.search(only, asv_name(*e))]
        if not entries:
            names = "\n  ".join(asv_name(*e) for e in TRACKING)
            raise ValueError(f"--only {only!r} matches no entry of suites.tracking.TRACKING:\n  {names}")
    return entries


def _commit_values(results: pathlib.Path, commit: str) -> dict[tuple, tuple]:
    """(machine, env_name, benchmark, param_key) -> (samples, value, type, unit) of one commit's result files."""
    messages = Messages(echo=False)
    benchmarks = load_benchmarks(results / "benchmarks.json", messages)
    rows: list[dict] = []
    samples: list[dict] = []
    for machine_dir in sorted(p for p in results.iterdir() if p.is_dir()) if results.is_dir() else []:
        for path in machine_dir.glob(f"{commit[:8]}-*.json"):
            _load_result_file(path, machine_dir.name, benchmarks, messages, rows, samples)
    out: dict[tuple, tuple] = {}
    by_key: dict[tuple, list[float]] = {}
    for s in samples:
        if s["commit"] == commit:
            by_key.setdefault((s["machine"], s["env_name"], s["benchmark"], s["param_key"]), []).append(s["value"])
    for r in rows:
        if r["commit"] != commit:
            continue
        key = (r["machine"], r["env_name"], r["benchmark"], r["param_key"])
        out[key] = (by_key.get(key, []), r["value"] if r["status"] == "ok" else math.nan, r["type"], r["unit"])
    return out


def entry_keys(results: pathlib.Path, entries) -> dict[tuple[str, str], tuple]:
    """(benchmark, param_key) -> tracking entry, with the parameter names asv's discovery recorded."""
    from .asv_results import param_key

    benchmarks = load_benchmarks(results / "benchmarks.json", Messages(echo=False))
    keys = {}
    for name, params in entries:
        names = list((benchmarks.get(name) or {}).get("param_names") or [])
        if len(names) != len(params):
            names = [f"param{i + 1}" for i in range(len(params))]  # as the loader names them
        keys[(name, param_key(names, tuple(params)))] = (name, params)
    return keys


def wanted_keys(results: pathlib.Path, entries) -> set[tuple[str, str]]:
    """(benchmark, param_key) of the tracking entries (:func:`entry_keys`)."""
    return set(entry_keys(results, entries))


def round_rows(before: dict, after: dict, wanted: set, *, replaced: bool, round_index: int, position: int, commit: str):
    """One row per tracked benchmark of one asv call: the fastest of the samples it added, or its value.

    The fastest, not the median: on a shared machine the noise inside a round is one-sided
    (another process preempting the benchmark only adds time), so the minimum of a round's
    few samples is its steadiest estimate; asv's own estimate (the median of every sample)
    stays in the asv results.

    ``replaced``: the call ran without ``--append-samples`` (its samples replaced the old ones).
    A benchmark without samples (memory, ``track_``) keeps one value, this call's.
    """
    rows = []
    for key, (samples, value, kind, unit) in after.items():
        if (key[2], key[3]) not in wanted:
            continue
        old = before.get(key)
        new = samples if replaced or old is None else samples[len(old[0]) :]
        if samples and not new:
            continue  # no sample added: the call did not run it
        rows.append(
            {
                "round": round_index,
                "position": position,
                "commit": commit,
                "benchmark": key[2],
                "param_key": key[3],
                "type": kind,
                "unit": unit,
                "value": float(min(new)) if new else value,
                "n_samples": len(new),
                "_machine": key[0],
                "_env": key[1],
            }
        )
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m analysis.continuous",
        description="Time BASE and HEAD on the tracking subset in interleaved rounds; fail on a significant "
        "slowdown beyond the threshold.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Exit status: 0 (no regression, or no base to compare with); 1 when a benchmark is slower by at "
        "least the threshold and significantly so; 2 on an error.",
    )
    p.add_argument("base", nargs="?", help="baseline revision (default: merge-base with main, or HEAD~1 on main)")
    p.add_argument("head", nargs="?", default="HEAD", help="head revision")
    p.add_argument(
        "--threshold",
        type=threshold_arg,
        default=DEFAULT_THRESHOLD,
        help="gate on head/base at or above this ratio (1.10), also written as a fraction (0.1 or 10%%)",
    )
    p.add_argument("--alpha", type=float, default=rounds_mod.DEFAULT_ALPHA, help="level of the paired-rounds t-test")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="interleaved rounds (each: both commits)")
    p.add_argument("--repeat", type=int, default=DEFAULT_REPEAT, help="samples per benchmark per round")
    p.add_argument(
        "--confirm-rounds",
        type=int,
        default=DEFAULT_CONFIRM_ROUNDS,
        help="rounds that time the benchmarks flagged by the first rounds again, alone; a regression must "
        "show in them too (0: no confirmation)",
    )
    p.add_argument(
        "--timer",
        choices=("cpu", "wall"),
        default="cpu",
        help="what a sample measures ($BKN_BENCH_TIMER): the benchmark process's CPU time (robust to other jobs "
        "on the machine) or wall-clock time; cpu falls back to wall when a commit's suites predate the option",
    )
    p.add_argument("--only", help="regex on asv names: time only these entries of suites.tracking.TRACKING")
    p.add_argument("--repo", type=pathlib.Path, default=pathlib.Path("."), help="git repository of the commits")
    p.add_argument("--asv-results", type=pathlib.Path, default=pathlib.Path(".asv/results"), help="asv results_dir")
    p.add_argument("--rounds-dir", type=pathlib.Path, default=pathlib.Path(".asv/rounds"), help="rounds files")
    p.add_argument("--report", type=pathlib.Path, default=pathlib.Path("reports/report.html"), help="HTML report")
    p.add_argument("--no-report", action="store_true", help="print the verdicts only")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs asv and the benchmarks")
    return p


def _check_args(args) -> None:
    if not 0 < args.alpha < 1:
        raise ValueError(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.rounds < rounds_mod.MIN_ROUNDS:
        raise ValueError(f"--rounds must be at least {rounds_mod.MIN_ROUNDS} (the paired test needs them)")
    if args.repeat < 1:
        raise ValueError(f"--repeat must be a positive number of samples, got {args.repeat}")
    if args.confirm_rounds != 0 and args.confirm_rounds < rounds_mod.MIN_ROUNDS:
        raise ValueError(
            f"--confirm-rounds must be 0 (no confirmation) or at least {rounds_mod.MIN_ROUNDS}, "
            f"got {args.confirm_rounds}"
        )


def format_table(table: pd.DataFrame) -> str:
    """The short terminal table: one line per benchmark x parameters."""
    lines = [f"{'benchmark':<44} {'parameters':<34} {'base':>10} {'head':>10} {'ratio':>6} {'p':>8}  verdict"]
    for _, r in table.iterrows():
        bench = ".".join(r["benchmark"].split(".")[1:])[:44]
        params = ", ".join(v.split("=", 1)[-1] for v in str(r["param_key"]).split(", ")[:3])[:34]
        num = {k: ("–" if pd.isna(r[k]) else f"{r[k]:.4g}") for k in ("base", "head", "ratio", "p_value")}
        lines.append(
            f"{bench:<44} {params:<34} {num['base']:>10} {num['head']:>10} {num['ratio']:>6} {num['p_value']:>8}"
            f"  {r['verdict']}"
        )
    return "\n".join(lines)


def _report(args, base: str | None, head: str, no_base: str | None) -> int:
    from . import report

    argv = ["--out", str(args.report), "--asv-results", str(args.asv_results), "--repo", str(args.repo)]
    argv += ["--rounds-dir", str(args.rounds_dir), "--threshold", str(args.threshold)]
    argv += ["--rounds-alpha", str(args.alpha)]
    if no_base:
        argv += ["--no-base", no_base]
    else:
        argv += ["--base", base, "--head", head]
    return report.main(argv)


def measure(args, base: str, head: str, log) -> pd.DataFrame:
    """The rounds (steps 2-4 of the module docstring); returns the verdict table."""
    repo = pathlib.Path(git(args.repo, "rev-parse", "--show-toplevel"))
    results = args.asv_results.resolve()
    entries = tracking_entries(args.only)
    from suites.tracking import selectors

    bench = [a for s in selectors(entries) for a in ("--bench", s)]
    rounds_file = rounds_mod.rounds_path(args.rounds_dir, base, head)
    log_file = rounds_file.with_suffix(".log")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bkn-continuous-") as tmp, open(log_file, "w") as asv_log:
        tmp = pathlib.Path(tmp)
        checkouts, configs, envs = {}, {}, {}
        try:
            for name, sha in (("base", base), ("head", head)):
                checkouts[sha] = tmp / name
                git(repo, "worktree", "add", "--detach", str(checkouts[sha]), sha)
                configs[sha] = tmp / f"asv-{name}" / "asv.conf.json"
                configs[sha].parent.mkdir()
                asv_config(configs[sha], repo=repo, checkout=checkouts[sha], results=results, sha=sha)
                path = os.pathsep.join([str(checkouts[sha]), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
                envs[sha] = {
                    **os.environ,
                    "PYTHONPATH": path,
                    # asv drops PYTHONPATH from the benchmark processes' environment and sets this instead
                    "ASV_PYTHONPATH": path,
                    "BKN_BENCH_THREADS": os.environ.get("BKN_BENCH_THREADS", "1"),
                    **MALLOC_ENV,
                }
            timer = pick_timer(args.timer, checkouts.values(), log)
            for env in envs.values():
                env[TIMER_ENV] = timer
            log(f"checkouts ({time.monotonic() - started:.0f} s):")
            for sha in (base, head):
                check_checkout(args.python, checkouts[sha], envs[sha], log)
            subprocess.run([args.python, "-m", "asv", "machine", "--yes"], stdout=asv_log, stderr=asv_log, check=True)
            log(f"ready to time ({time.monotonic() - started:.0f} s)")
            rows: list[dict] = []
            keys: dict = {}

            def run_round(r: int, stage: int, selected: list[str], wanted: set, total: int) -> None:
                nonlocal keys
                order = (base, head) if r % 2 == 0 else (head, base)
                for position, sha in enumerate(order):
                    before = _commit_values(results, sha)
                    t0 = time.monotonic()
                    cmd = [args.python, "-m", "asv", "run", "--config", str(configs[sha]), "--python=same"]
                    cmd += [f"--set-commit-hash={sha}", "--record-samples", "--launch-method=forkserver"]
                    cmd += ["-a", "rounds=1", "-a", f"repeat={args.repeat}", *selected]
                    if r > 0:  # the first call replaces older samples of these benchmarks, later ones add
                        cmd.append("--append-samples")
                    asv_log.write(f"\n### round {r + 1} (stage {stage}), {sha[:10]}: {' '.join(cmd)}\n")
                    asv_log.flush()
                    rc = subprocess.run(cmd, env=envs[sha], stdout=asv_log, stderr=subprocess.STDOUT).returncode
                    keys = keys or entry_keys(results, entries)  # benchmarks.json exists after a first call
                    new = round_rows(
                        before,
                        _commit_values(results, sha),
                        wanted or set(keys),
                        replaced=r == 0,
                        round_index=r,
                        position=position,
                        commit=sha,
                    )
                    for row in new:
                        row["stage"] = stage
                    rows.extend(new)
                    which = "base" if sha == base else "head"
                    log(
                        f"{'confirmation ' if stage else ''}round {r + 1}/{total} {which} {sha[:10]}: "
                        f"{len(new)} benchmarks in {time.monotonic() - t0:.0f} s "
                        f"(total {time.monotonic() - started:.0f} s)"
                        + (f"; asv exit status {rc}, see {log_file}" if rc else "")
                    )
                    if not new:
                        raise ValueError(
                            f"asv recorded no result for {sha[:10]} (asv exit status {rc}); see {log_file}"
                        )

            for r in range(args.rounds):
                run_round(r, 0, bench, set(), args.rounds)
            frame = pd.DataFrame(rows).rename(columns={"_machine": "machine", "_env": "env_name"})
            first = rounds_mod.paired_verdicts(frame, base, head, args.threshold, args.alpha)
            first = first[first["verdict"] == "regression"]
            flagged = set(zip(first["benchmark"], first["param_key"]))
            if flagged and args.confirm_rounds:
                again = [keys[k] for k in sorted(flagged) if k in keys]
                log(
                    f"{len(flagged)} benchmark(s) flagged by the first {args.rounds} rounds; timing them again, alone, "
                    f"in {args.confirm_rounds} confirmation rounds: " + ", ".join(f"{b}{p}" for b, p in again)
                )
                selected = [a for s in selectors(again) for a in ("--bench", s)]
                total = args.rounds + args.confirm_rounds
                for r in range(args.rounds, total):
                    run_round(r, 1, selected, flagged, total)
        finally:
            for path in checkouts.values():
                git(repo, "worktree", "remove", "--force", str(path), check=False)
            git(repo, "worktree", "prune", check=False)

    from bkn.probes.results import environment

    machine, env_name = rows[0]["_machine"], rows[0]["_env"]
    rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
    meta = {
        "rounds_run": args.rounds,
        "confirm_rounds": args.confirm_rounds,
        "repeat": args.repeat,
        "tracking": [list(e[:1]) + [list(e[1])] for e in entries],
        "seconds": round(time.monotonic() - started, 1),
        "environment": environment(),
        "bench_threads": envs[head]["BKN_BENCH_THREADS"],
        "timer": timer,
        "malloc_env": MALLOC_ENV,
    }
    rounds_mod.save(rounds_file, base=base, head=head, machine=machine, env_name=env_name, rows=rows, meta=meta)
    log(f"rounds file: {rounds_file} ({meta['seconds']:.0f} s for both commits)")
    _, frame = rounds_mod.load(rounds_file)
    return rounds_mod.paired_verdicts(frame, base, head, args.threshold, args.alpha)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def log(text: str) -> None:
        print(text, flush=True)

    try:
        _check_args(args)
        head = resolve(args.repo, args.head)
        try:
            if args.base:
                base, how = resolve(args.repo, args.base), f"given as {args.base}"
            else:
                base, how = default_base(args.repo, head)
        except NoBase as why:
            log(f"continuous: no base commit: {why}. Nothing measured; the gate passes.")
            if not args.no_report:
                _report(args, None, head, str(why))  # the Regressions section says why it is empty
            return 0
        if base == head:
            raise ValueError(
                f"base and head are the same commit {base[:10]}: asv keys results by commit, so the two could not "
                "be told apart (for an A/A check compare a comment-only commit with its parent, as "
                ".ci/gate_calibration.py does)"
            )
        log(f"continuous: base {base[:10]} ({how}), head {head[:10]}; {args.rounds} rounds x {args.repeat} samples")
        table = measure(args, base, head, log)
    except (ValueError, subprocess.CalledProcessError) as exc:
        print(f"continuous: error: {exc}", file=sys.stderr)
        return 2

    print(format_table(table))
    found = table[table["verdict"] == "regression"]
    status = 0
    if not args.no_report:
        status = _report(args, base, head, None)
    if status not in (0, 1):
        return status
    if not found.empty:
        print(
            f"FAILED: {len(found)} benchmark(s) slower by {args.threshold:.0%} or more, significantly "
            f"(paired rounds, p < {args.alpha:g}): " + ", ".join(sorted(set(found["benchmark"]))),
            file=sys.stderr,
        )
        return 1
    print(f"continuous: no significant slowdown of {args.threshold:.0%} or more.")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
