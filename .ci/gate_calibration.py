"""False alarms and detections of the regression gate, measured: ``python .ci/gate_calibration.py``.

Builds the planted repository of :mod:`analysis.planted` (a copy of this working tree with
three commits: base, ``slow`` = extra passes in Batch Renormalization's forward, ``comment`` =
a comment line only), then runs ``python -m analysis.continuous`` ``--null`` times on the
comment-only pair (slow -> comment: nothing changed, every flag is a false alarm) and
``--planted`` times on the slowed pair (base -> slow: BRN's benchmarks must be flagged, nothing
else). Each run gets fresh asv results. From each run's rounds file the verdicts are recomputed
at every ``--thresholds`` value, so one series gives the rates at several thresholds. Prints one
line per run as it finishes and a summary table at the end; writes the table to ``--out`` (JSON).

    python .ci/gate_calibration.py                       # 3 null + 2 planted runs, full subset
    python .ci/gate_calibration.py --null 5 --planted 3 --thresholds 0.1,0.25,0.5
    python .ci/gate_calibration.py -- --rounds 8         # after --: options for analysis.continuous

Takes (null + planted) sessions of ``nox -s continuous`` (about 6 minutes each on the 2-core
development machine with other jobs running).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis import continuous, planted, rounds  # noqa: E402
from bkn.probes.results import environment, write_json  # noqa: E402


def _thresholds(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(not 0 < v < 10 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions such as 0.1,0.25, got {text!r}")
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python .ci/gate_calibration.py", description=__doc__.split("\n")[0])
    p.add_argument("--null", type=int, default=3, help="runs on the comment-only pair")
    p.add_argument("--planted", type=int, default=2, help="runs on the planted slowdown")
    p.add_argument("--thresholds", type=_thresholds, default=[0.10, 0.25], help="thresholds to count flags at")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/gate/calibration.json"))
    p.add_argument("extra", nargs="*", help="after --: options passed to python -m analysis.continuous")
    args = p.parse_args(argv)
    if args.null < 0 or args.planted < 0 or args.null + args.planted == 0:
        p.error("--null and --planted must be >= 0, and not both 0")

    runs = []
    with tempfile.TemporaryDirectory(prefix="bkn-gate-calibration-") as tmp:
        tmp = pathlib.Path(tmp)
        commits = planted.make_repo(ROOT, tmp / "repo")
        plan = [("null", commits["slow"], commits["comment"])] * args.null
        plan += [("planted", commits["base"], commits["slow"])] * args.planted
        for i, (kind, base, head) in enumerate(plan):
            work = tmp / f"run{i}"
            t0 = time.monotonic()
            code = continuous.main(
                [base, head, "--repo", str(tmp / "repo"), "--asv-results", str(work / "asv")]
                + ["--rounds-dir", str(work / "rounds"), "--no-report", *args.extra]
            )
            seconds = time.monotonic() - t0
            if code == 2:
                print(f"run {i + 1} ({kind}): the session failed (exit status 2); stopping", file=sys.stderr)
                return 2
            _, frame = rounds.load(rounds.rounds_path(work / "rounds", base, head))
            run = {"run": i + 1, "kind": kind, "seconds": round(seconds), "exit": code, "by_threshold": {}}
            for threshold in args.thresholds:
                table = rounds.paired_verdicts(frame, base, head, threshold=threshold)
                flagged = table[table["verdict"] == "regression"]
                names = [
                    f"{b.split('.')[-2]}({k.split(',')[0]})" for b, k in zip(flagged["benchmark"], flagged["param_key"])
                ]
                slowed = [n for n in names if f"method={planted.SLOW_METHOD}" in n]
                run["by_threshold"][threshold] = {
                    "tracked": len(table),
                    "flagged": names,
                    "false_flags": len(names) - len(slowed),
                    "slowed_flagged": len(slowed),
                }
            runs.append(run)
            print(
                f"== run {i + 1}/{len(plan)} {kind}: {seconds:.0f} s, exit {code}; "
                + "; ".join(
                    f"threshold {t:g}: {r['false_flags']} false, {r['slowed_flagged']} brn flags"
                    for t, r in run["by_threshold"].items()
                ),
                flush=True,
            )

    print("\nregression gate calibration (commits from analysis.planted; machine: see environment)")
    print(
        f"{'threshold':>9} {'pair':<8} {'runs':>4} {'runs with a false flag':>23} {'false flags':>11} "
        f"{'runs detecting brn':>18} {'brn flags per run':>17}"
    )
    for threshold in args.thresholds:
        for kind in ("null", "planted"):
            mine = [r["by_threshold"][threshold] for r in runs if r["kind"] == kind]
            if not mine:
                continue
            false_runs = sum(r["false_flags"] > 0 for r in mine)
            detected = sum(r["slowed_flagged"] > 0 for r in mine) if kind == "planted" else "–"
            per_run = "/".join(str(r["slowed_flagged"]) for r in mine) if kind == "planted" else "–"
            print(
                f"{threshold:>9g} {kind:<8} {len(mine):>4} {false_runs:>23} "
                f"{sum(r['false_flags'] for r in mine):>11} {detected!s:>18} {per_run:>17}"
            )
    write_json(args.out, {"environment": environment(), "options": vars(args) | {"out": str(args.out)}, "runs": runs})
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
