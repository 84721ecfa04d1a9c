"""What BKN's prior chain costs in a real network step: ``python -m suites.chain_cost``.

One SGD step (forward, cross-entropy, backward, SGD with momentum) of torchvision's
ResNet-18 at 112x112, batch 8 in normalization groups of 2, 2 threads (issue 13's
setting; every one is an option), for each method converted with
:meth:`bkn.methods.Method.convert` and for the unconverted model (``torch-bn``: torch's
own ``BatchNorm2d`` over the whole batch, the reference every ratio is taken to).

Timing is interleaved so that a busy or drifting machine hits every method alike: all
models are built and warmed up first, then each *round* times ``--steps`` steps of every
method, in an order rotated by one each round. A method's ratio is the median over
rounds of (its mean step time / torch-bn's mean step time in the same round): a paired
ratio, so slow phases of the machine cancel. The spread is the 25th..75th percentile of
those per-round ratios.

``--profile`` adds where the time goes, from ``torch.profiler`` over ``--profile-steps``
steps per method: the self CPU time of convolution ops (forward and backward) against
torch-bn's, so that ``extra convolution`` is the time spent pushing surrogates through
the network's convolutions (the official transition) and ``extra other`` the rest of
what the method adds (the chain's bookkeeping, per-node Python, small per-channel ops,
the analytic transition's moment maps, the norm kernels themselves).

``--blocks`` measures instead the layer and block benchmarks' cases
(:class:`suites.harness.layer.LayerCase`: the norm alone given its prior;
:class:`suites.harness.block.BlockCase`: conv + norm + ReLU with the prior's propagation)
forward + backward, interleaved the same way, at the inputs ``--block-inputs`` (default
(8, 64, 56, 56), (8, 256, 14, 14), (2, 512, 7, 7)), each method's time over BN's (torch's
``BatchNorm2d``) in the same round.

``--processes N`` runs the step measurement in N fresh processes instead and reports, per
entry, the median and quartiles over processes of the per-process ratio (with ``--baseline``
the processes alternate between this checkout and REV): on a small shared machine one
process's ratios move by several points from one process to the next
(:mod:`suites.chain_cost_spread`).

Writes one JSON file (``--out``, atomically) with the environment and every number, and
prints a table. Variants of a method (``--variant NAME=METHOD:key=value,...``) are
measured beside the methods, e.g. ``official-s2=bkn-official:surrogate_stride=2``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch
import torchvision
from torch import nn

from bkn import methods
from bkn.probes import measure, summary_stats
from bkn.probes.results import environment, write_json

from .chain_cost_tables import REFERENCE, blocks_table, step_setting, table  # noqa: F401 (step_setting: re-exported)
from .harness import allocator
from .harness.allocator import ALLOCATORS

DEFAULT_METHODS = methods.names(tag="speed")
_CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::thnn_conv2d", "aten::_convolution")


def _parse_variant(text: str) -> tuple[str, str, dict]:
    """``NAME=METHOD:key=value,key=value`` -> (name, method, options); values are int, float or str."""
    try:
        name, rest = text.split("=", 1)
        method, _, opts = rest.partition(":")
        options = {}
        for item in filter(None, opts.split(",")):
            key, value = item.split("=", 1)
            for cast in (int, float):
                try:
                    value = cast(value)
                    break
                except ValueError:
                    pass
            options[key] = value
    except ValueError:
        raise ValueError(f"--variant must look like NAME=METHOD:key=value,..., got {text!r}") from None
    methods.get(method)
    return name, method, options


def build(name: str, method: str | None, group_size: int, options: dict, seed: int, registry=None) -> nn.Module:
    """ResNet-18 (random init, seeded), unconverted for ``method=None``, else converted in groups
    (by ``registry``: ``bkn.methods``, or a baseline revision's)."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=1000)
    if method is not None:
        model = (registry or methods).get(method).convert(model, group_size=group_size, **options)
    return model.train()


Step = measure.TrainStep  # one model's training step on a fixed seeded batch (lr 1e-3, momentum 0.9)
CLOCKS = measure.CLOCKS


def interleaved(
    steps: dict, rounds: int, per_round, log, clock: str = "wall", faults: dict | None = None
) -> dict[str, list[float]]:
    """Mean seconds per call of every entry in each round, the order rotated every round
    (:func:`bkn.probes.measure.interleaved`).

    ``per_round``: calls per entry per round, one number or one per entry. ``clock``:
    ``wall`` (elapsed time) or ``cpu`` (this process's CPU time, all its threads).
    ``faults``: a dict that receives, per entry, the minor page faults per call in each round."""

    def on_round(r, times):
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {t[-1] * 1e3:.0f} ms" for n, t in times.items()))

    return measure.interleaved(
        steps,
        rounds,
        per_round,
        clock=CLOCKS[clock],
        on_round=on_round,
        counter=allocator.minor_faults,
        counted=faults,
    )


def profile(step: Step, count: int) -> dict[str, float]:
    """Self CPU seconds per step: all ops, and the convolution ops (forward and backward)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(count):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6 / count
    conv = sum(e.self_cpu_time_total for e in events if e.key in _CONV_OPS) / 1e6 / count
    calls = sum(e.count for e in events if e.key in ("aten::convolution",)) / count
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    return {
        "self_cpu_s": total,
        "conv_s": conv,
        "conv_calls": calls,
        "top": [(e.key, e.self_cpu_time_total / 1e6 / count, e.count // count) for e in top],
    }


def _ratio_summary(times: dict, name: str, reference: str) -> dict:
    """Median and quartiles (inclusive) over rounds of the per-round ratios of ``name`` to ``reference``."""
    q25, median, q75 = summary_stats.quartiles(summary_stats.paired_ratios(times, name, reference))
    return {"ratio_median": median, "ratio_q25": q25, "ratio_q75": q75}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m suites.chain_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        help="bkn.methods names, space- or comma-separated",
    )
    parser.add_argument("--variant", action="append", default=[], help="NAME=METHOD:key=value,... (extra options)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--size", type=int, default=112, help="input height and width")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2, help="steps per method per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time (the default); cpu: the process's CPU time, which a machine loaded by other "
        "processes inflates far less (with --threads 1; with more threads it counts spin-waiting)",
    )
    parser.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        default="steady",
        help="steady (the default): glibc keeps freed memory for reuse, so no model's step pays page faults "
        "after the warm-up; default: the C allocator as it comes, whose page faults land on one model or "
        "another from round to round (suites/harness/allocator.py); the faults per step are reported either way",
    )
    parser.add_argument("--profile", action="store_true", help="also profile where the time goes")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--blocks", action="store_true", help="time the layer and block cases instead of the step")
    parser.add_argument(
        "--block-inputs",
        nargs="+",
        default=list(BLOCK_INPUTS),
        help="inputs of --blocks as GROUPxCxHxW (one group each), e.g. 8x64x56x56",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="REV",
        help="also time every method as the bkn package of git revision REV converts it (entries METHOD@REV), "
        "interleaved in this process: before/after a change",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run the step measurement in this many fresh processes and report the spread over them "
        "(with --baseline, alternating this checkout and REV); see suites/chain_cost_spread.py",
    )
    parser.add_argument("--skip-current", action="store_true", help=argparse.SUPPRESS)  # a --processes child
    parser.add_argument("--out", default=None, help="JSON file to write (atomically)")
    args = parser.parse_args(argv)
    args.methods = [m for item in args.methods for m in item.split(",") if m]
    for value, what in (
        (args.batch, "--batch"),
        (args.rounds, "--rounds"),
        (args.steps, "--steps"),
        (args.processes, "--processes"),
    ):
        if value < 1:
            parser.error(f"{what} must be >= 1, got {value}")
    if args.batch % args.group_size:
        parser.error(f"--group-size {args.group_size} must divide --batch {args.batch}")
    torch.set_num_threads(args.threads)
    if args.allocator == "steady" and args.processes == 1:  # (--processes: each child sets its own)
        try:
            allocator.steady()
        except RuntimeError as error:
            parser.error(str(error))

    def log(text):
        print(text, file=sys.stderr, flush=True)

    if args.skip_current and not args.baseline:
        parser.error("--skip-current needs --baseline")
    if args.processes > 1:
        if args.blocks or args.profile:
            parser.error("--processes measures the step only: leave out --blocks and --profile")
        from . import chain_cost_spread

        result = chain_cost_spread.run(args, log)
        print(chain_cost_spread.table(result))
        if args.out:
            write_json(args.out, result)
            log(f"wrote {args.out}")
        return result

    if args.blocks:
        result = blocks(args, log)
        print(blocks_table(result))
        if args.out:
            write_json(args.out, result)
            log(f"wrote {args.out}")
        return result

    entries = {REFERENCE: (None, {})}
    if not args.skip_current:
        entries.update({m: (methods.get(m).name, {}) for m in args.methods})
        for text in args.variant:
            name, method, options = _parse_variant(text)
            entries[name] = (method, options)
    registries = {}
    if args.baseline:
        from . import baseline

        try:
            old = baseline.load(args.baseline).methods
        except ValueError as error:
            parser.error(str(error))
        for m in args.methods:
            name = f"{m}@{args.baseline}"
            entries[name], registries[name] = (methods.get(m).name, {}), old
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    y = torch.randint(0, 1000, (args.batch,), generator=gen)
    steps = {}
    for name, (method, options) in entries.items():
        steps[name] = Step(build(name, method, args.group_size, options, args.seed, registries.get(name)), x, y)
        for _ in range(args.warmup):
            steps[name]()
        log(f"built and warmed up {name}")
    faults = {}
    times = interleaved(steps, args.rounds, args.steps, log, args.clock, faults)
    result = {
        "setting": {
            k: getattr(args, k)
            for k in ("batch", "group_size", "size", "threads", "rounds", "steps", "seed", "clock", "allocator")
        },
        "reference": REFERENCE,
        "entries": {n: {"method": m, "options": o} for n, (m, o) in entries.items()},
        "baseline": args.baseline,
        "environment": environment("cpu"),
        "methods": {},
    }
    for name in entries:
        result["methods"][name] = {
            "step_s_median": statistics.median(times[name]),
            **_ratio_summary(times, name, REFERENCE),
            "step_s": times[name],
            "faults_per_step": faults[name],
            "faults_per_step_median": statistics.median(faults[name]),
        }
    if args.profile:
        for name in entries:
            result["methods"][name]["profile"] = profile(steps[name], args.profile_steps)
        ref = result["methods"][REFERENCE]["profile"]
        for name in entries:
            p = result["methods"][name]["profile"]
            p["extra_conv_s"] = p["conv_s"] - ref["conv_s"]
            p["extra_other_s"] = (p["self_cpu_s"] - p["conv_s"]) - (ref["self_cpu_s"] - ref["conv_s"])
    print(table(result))
    if args.out:
        write_json(args.out, result)
        log(f"wrote {args.out}")
    return result


BLOCK_INPUTS = ("8x64x56x56", "8x256x14x14", "2x512x7x7")
MIN_ROUND_S = 0.02  # a case's share of a round lasts at least this long (short calls are repeated)
BLOCK_METHODS = methods.names(tag="core")


def blocks(args, log) -> dict:
    """Layer (norm alone given a prior) and block (conv + norm + ReLU, with the chain) forward +
    backward times, interleaved, and each method's ratio to BN's in the same round."""
    from .harness.block import BlockCase
    from .harness.layer import LayerCase

    methods_ = [m for m in args.methods if m in BLOCK_METHODS] or list(BLOCK_METHODS)
    if "bn" not in methods_:
        methods_.insert(0, "bn")
    result = {"setting": {k: getattr(args, k) for k in ("threads", "rounds", "steps", "clock", "allocator")}}
    result["environment"] = environment("cpu")
    result["inputs"] = {}
    for text in args.block_inputs:
        group, _, shape = text.partition("x")
        cases, counts = {}, {}
        for m in methods_:
            for kind, build in (("layer", LayerCase), ("block", BlockCase)):
                case = build(m, int(group), shape, "cpu", "float32", "contiguous", prune=False)
                for _ in range(args.warmup):
                    case.forward_backward()
                once = measure.per_call(case.forward_backward, 1)
                name = f"{kind} {m}"
                cases[name] = case.forward_backward
                counts[name] = max(args.steps, math.ceil(MIN_ROUND_S / max(once, 1e-6)))  # short calls: repeat
        log(f"built {text}")
        times = interleaved(cases, args.rounds, counts, lambda line: None, args.clock)
        entry = {}
        for name in cases:
            kind = name.split()[0]
            entry[name] = {"s_median": statistics.median(times[name]), **_ratio_summary(times, name, f"{kind} bn")}
        result["inputs"][text] = entry
        log(f"measured {text}")
    return result


if __name__ == "__main__":
    main()
