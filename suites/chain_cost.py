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
import time

import torch
import torchvision
from torch import nn

from bkn import methods
from bkn.probes.results import environment, write_json

from .harness import allocator
from .harness.allocator import ALLOCATORS

REFERENCE = "torch-bn"  # the unconverted model
DEFAULT_METHODS = ("bn", "brn", "gn", "bkn-analytic", "bkn-official")
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


class Step:
    """One model's training step on a fixed seeded batch."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.model, self.x, self.y = model, x, y
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def __call__(self) -> None:
        loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved(
    steps: dict, rounds: int, per_round, log, clock: str = "wall", faults: dict | None = None
) -> dict[str, list[float]]:
    """Mean seconds per call of every entry in each round, the order rotated every round.

    ``per_round``: calls per entry per round, one number or one per entry. ``clock``:
    ``wall`` (elapsed time) or ``cpu`` (this process's CPU time, all its threads).
    ``faults``: a dict that receives, per entry, the minor page faults per call in each round."""
    now = CLOCKS[clock]
    names = list(steps)
    counts = per_round if isinstance(per_round, dict) else dict.fromkeys(names, per_round)
    times = {n: [] for n in names}
    per_call_faults = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            before = allocator.minor_faults()
            start = now()
            for _ in range(counts[n]):
                steps[n]()
            times[n].append((now() - start) / counts[n])
            per_call_faults[n].append((allocator.minor_faults() - before) / counts[n])
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names))
    if faults is not None:
        faults.update(per_call_faults)
    return times


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


def _quantile(values, q):
    return (
        statistics.quantiles(values, n=4, method="inclusive")[{0.25: 0, 0.75: 2}[q]] if len(values) > 1 else values[0]
    )


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
        ratios = [t / ref for t, ref in zip(times[name], times[REFERENCE])]
        result["methods"][name] = {
            "step_s_median": statistics.median(times[name]),
            "ratio_median": statistics.median(ratios),
            "ratio_q25": _quantile(ratios, 0.25),
            "ratio_q75": _quantile(ratios, 0.75),
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
BLOCK_METHODS = ("bn", "bkn-official", "bkn-analytic")


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
                start = time.perf_counter()
                case.forward_backward()
                once = time.perf_counter() - start
                name = f"{kind} {m}"
                cases[name] = case.forward_backward
                counts[name] = max(args.steps, math.ceil(MIN_ROUND_S / max(once, 1e-6)))  # short calls: repeat
        log(f"built {text}")
        times = interleaved(cases, args.rounds, counts, lambda line: None, args.clock)
        entry = {}
        for name in cases:
            kind = name.split()[0]
            ratios = [t / ref for t, ref in zip(times[name], times[f"{kind} bn"])]
            entry[name] = {
                "s_median": statistics.median(times[name]),
                "ratio_median": statistics.median(ratios),
                "ratio_q25": _quantile(ratios, 0.25),
                "ratio_q75": _quantile(ratios, 0.75),
            }
        result["inputs"][text] = entry
        log(f"measured {text}")
    return result


def blocks_table(result: dict) -> str:
    s = result["setting"]
    lines = [
        f"layer (norm alone, given a prior) and block (conv3x3 + norm + ReLU with the chain), forward + backward, "
        f"{s['threads']} threads, {s['rounds']} interleaved rounds, {s['clock']} clock, "
        f"{s.get('allocator', 'default')} allocator; ratio to bn in the same round",
        f"{'input':<14}{'case':<20}{'ms':>9}{'ratio':>8}{'q25..q75':>14}",
    ]
    for text, entry in result["inputs"].items():
        for name, r in entry.items():
            lines.append(
                f"{text:<14}{name:<20}{r['s_median'] * 1e3:>9.2f}{r['ratio_median']:>8.2f}"
                f"{r['ratio_q25']:>7.2f}..{r['ratio_q75']:<5.2f}"
            )
    return "\n".join(lines)


def step_setting(s: dict) -> str:
    """The measured step, as a table's heading starts (this table's and ``--processes``')."""
    return (
        f"ResNet-18 SGD step, {s['size']}x{s['size']}, batch {s['batch']} in groups of {s['group_size']}, "
        f"{s['threads']} threads, {s.get('allocator', 'default')} allocator"
    )


def table(result: dict) -> str:
    s = result["setting"]
    lines = [
        f"{step_setting(s)}, {s['rounds']} interleaved rounds of {s['steps']} steps, {s['clock']} clock",
        f"{'method':<22}{'step ms':>9}{'ratio':>8}{'q25..q75':>14}{'faults/step':>13}",
    ]
    for name, r in result["methods"].items():
        lines.append(
            f"{name:<22}{r['step_s_median'] * 1e3:>9.1f}{r['ratio_median']:>8.2f}"
            f"{r['ratio_q25']:>7.2f}..{r['ratio_q75']:<5.2f}{r.get('faults_per_step_median', math.nan):>13.0f}"
        )
    if all("profile" in r for r in result["methods"].values()):
        lines.append(f"profile (self CPU ms per step): {'total':>8}{'conv':>8}{'convs':>7}{'+conv':>8}{'+other':>8}")
        for name, r in result["methods"].items():
            p = r["profile"]
            lines.append(
                f"  {name:<30}{p['self_cpu_s'] * 1e3:>8.1f}{p['conv_s'] * 1e3:>8.1f}{p['conv_calls']:>7.0f}"
                f"{p['extra_conv_s'] * 1e3:>8.1f}{p['extra_other_s'] * 1e3:>8.1f}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
