"""``python -m suites.chain_cost --processes N``: the step ratios over N fresh processes.

One process's ratios move by several points from one process to the next on a small
shared machine (the allocator's page faults, the neighbours), more than the paired
rounds inside a process show. Here each of N processes runs the same measurement (without
``--profile``; its own ``--rounds`` and ``--steps``) and the result is, per entry, the
median and quartiles over processes of the per-process median ratio. With ``--baseline
REV`` the processes alternate: even ones measure this checkout's methods, odd ones only
REV's (each beside its own torch-bn), so that each process holds one converted model and
the two sides meet the same phases of the machine.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

from bkn.probes import summary_stats

from .chain_cost_tables import REFERENCE, step_setting


def _child_argv(args, index: int, out: str) -> list[str]:
    argv = ["--methods", *args.methods]
    for key in ("batch", "group_size", "size", "threads", "rounds", "steps", "warmup", "seed", "clock", "allocator"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.baseline and index % 2:
        argv += ["--baseline", args.baseline, "--skip-current"]
    else:
        for text in args.variant:
            argv += ["--variant", text]
    return argv + ["--out", out]


def run(args, log) -> dict:
    """Run the N processes one after another; return the per-process results and the spread."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="chain_cost_") as tmp:
        for i in range(args.processes):
            out = os.path.join(tmp, f"run{i}.json")
            argv = [sys.executable, "-m", "suites.chain_cost", *_child_argv(args, i, out)]
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(
                    f"process {i + 1} of {args.processes} failed ({' '.join(argv)}):\n{done.stderr[-2000:]}"
                )
            with open(out) as f:
                result = json.load(f)
            runs.append(result)
            ratios = ", ".join(f"{n} {r['ratio_median']:.3f}" for n, r in result["methods"].items() if n != REFERENCE)
            log(f"process {i + 1}/{args.processes}: {ratios}")
    names = list(dict.fromkeys(n for r in runs for n in r["methods"]))
    names.sort(key=lambda n: n != REFERENCE)  # the reference first (the result files sort their keys)
    spread = {}
    for name in names:
        ratios = [r["methods"][name]["ratio_median"] for r in runs if name in r["methods"]]
        steps = [r["methods"][name]["step_s_median"] for r in runs if name in r["methods"]]
        faults = [r["methods"][name]["faults_per_step_median"] for r in runs if name in r["methods"]]
        spread[name] = {
            "ratio": summary_stats.spread(ratios),
            "step_s_median": statistics.median(steps),
            "faults_per_step_median": statistics.median(faults),
        }
    return {
        "setting": runs[0]["setting"],
        "processes": args.processes,
        "baseline": args.baseline,
        "spread": spread,
        "runs": runs,
    }


def table(result: dict) -> str:
    s = result["setting"]
    lines = [
        f"{step_setting(s)}, {result['processes']} processes of {s['rounds']} rounds of {s['steps']} "
        f"steps, {s['clock']} clock; per process the median ratio to {REFERENCE}, then over processes:",
        f"{'method':<22}{'n':>4}{'step ms':>9}{'median':>8}{'q25..q75':>14}{'min..max':>14}{'faults/step':>13}",
    ]
    for name, r in result["spread"].items():
        q = r["ratio"]
        lines.append(
            f"{name:<22}{q['n']:>4}{r['step_s_median'] * 1e3:>9.1f}{q['median']:>8.3f}"
            f"{q['q25']:>7.2f}..{q['q75']:<5.2f}{q['min']:>7.2f}..{q['max']:<5.2f}"
            f"{r['faults_per_step_median']:>13.0f}"
        )
    return "\n".join(lines)
