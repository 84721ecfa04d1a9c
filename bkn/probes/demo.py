"""A short BKN-vs-BN speed comparison: ``python -m bkn.probes.demo`` (``nox -s demo``).

Prints two tables measured on this machine with ``torch.utils.benchmark``:
1. one normalization layer, forward+backward in training mode, at the ResNet stage
   shapes: native ``BatchNorm2d``, BKN with a prior (official update, p=0.9), BRN,
   and their time relative to BN. The three are timed in turn, round after round, and
   each ratio is the median over rounds of the ratio within a round (with its quartiles):
   on a shared machine that is far steadier than two separate medians;
2. one SGD step of the paper's CIFAR ResNet-20 at batch 8 with normalization groups of 2
   (the official micro-batch setting), for BN, BKN (official and analytic transitions),
   BRN and GN.
The asv suites (``suites/``) measure the full matrix and track it across commits; this
is the quick look, and the check of the layers' speed target (BKN and BRN within 1.25x of
native ``BatchNorm2d`` at every shape above).
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
from torch.utils import benchmark

from bkn import methods
from bkn.layers import _native
from bkn.models import cifar_resnet
from bkn.probes import measure, summary_stats

LAYER_SHAPES = [(8, 64, 56, 56), (8, 256, 14, 14), (2, 512, 7, 7)]


def interleaved(fns: dict, min_run_time: float, rounds: int) -> dict:
    """Per-call times of each function, measured in ``rounds`` interleaved blocks.

    A shared machine's speed drifts over seconds; timing each candidate in turn within
    every round and taking ratios per round cancels most of that drift. Returns
    ``{name: [seconds per call, one per round]}``; each function gets about ``min_run_time``
    seconds in all. A block is timed by ``torch.utils.benchmark`` (:func:`bkn.probes.measure.interleaved`).
    """
    timers = {
        name: benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        for name, fn in fns.items()
    }
    first = next(iter(timers.values()))
    for fn in fns.values():
        fn()  # warm-up
    per_call = first.timeit(3).median
    number = max(1, int(min_run_time / rounds / per_call))
    return measure.interleaved(timers, rounds, number, rotate=False, measure=lambda timer, n: timer.timeit(n).median)


def ratio_summary(samples: dict, name: str, base: str) -> tuple[float, float, float]:
    """Median and quartiles over rounds of ``samples[name] / samples[base]``."""
    q1, q2, q3 = summary_stats.quartiles(summary_stats.paired_ratios(samples, name, base), method="exclusive")
    return q2, q1, q3


def layer_table(min_run_time: float, seed: int, rounds: int = 20, device: str = "cpu") -> list[tuple]:
    """Per shape: median time per call of BN, BKN, BRN (seconds) and the ratios to BN (median, quartiles)."""
    rows = []
    for shape in LAYER_SHAPES:
        gen = torch.Generator().manual_seed(seed)
        c = shape[1]
        x = torch.randn(shape, generator=gen).to(device).requires_grad_()
        grad = torch.randn(shape, generator=gen).to(device)
        prior = (torch.randn(c, generator=gen) * 0.1, 1 + 0.1 * torch.rand(c, generator=gen))
        prior = tuple(t.to(device) for t in prior)
        bn, bkn, brn = (methods.get(name).build(c).to(device) for name in ("bn", "bkn-official", "brn"))
        samples = interleaved(
            {
                "bn": lambda: bn(x).backward(grad),
                "bkn": lambda: bkn(x, prior=prior).backward(grad),
                "brn": lambda: brn(x).backward(grad),
            },
            min_run_time,
            rounds,
        )
        times = {name: statistics.median(values) for name, values in samples.items()}
        rows.append(
            (
                str(shape),
                times["bn"],
                times["bkn"],
                times["brn"],
                ratio_summary(samples, "bkn", "bn"),
                ratio_summary(samples, "brn", "bn"),
            )
        )
    return rows


def network_table(
    min_run_time: float, seed: int, batch: int = 8, group: int = 2, rounds: int = 5, device: str = "cpu"
) -> list[tuple]:
    """Per method: median time of one SGD step of CIFAR ResNet-20 and its ratio to BN's (median over rounds)."""
    steps = {}
    for name in methods.names(tag="speed"):
        method = methods.get(name)
        torch.manual_seed(seed)
        model = cifar_resnet(20, method.norm, **method.layer_options(group_size=group)).to(device)
        x, y = torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)
        steps[name] = measure.TrainStep(model, x, y, lr=0.01)
    samples = interleaved(steps, min_run_time, rounds)
    return [(name, statistics.median(samples[name]), ratio_summary(samples, name, "bn")[0]) for name in steps]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bkn.probes.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the data and models (default 0)")
    parser.add_argument(
        "--min-run-time",
        type=float,
        default=0.5,
        help="seconds per norm and layer shape, or per network step (default 0.5)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=20,
        help="interleaved rounds per layer shape; ratios are medians over rounds (default 20)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronise the GPU; default cpu)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.min_run_time <= 0 or args.threads < 1:
        parser.error("--rounds and --threads must be >= 1 and --min-run-time > 0")
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device must be cpu, or cuda on a machine with a CUDA device; got {args.device!r}")
    torch.set_num_threads(args.threads)
    if args.device == "cuda":  # the compiled kernels are CPU only: the GPU runs the torch Functions
        kernels, where = "Python Functions (torch ops on the GPU)", torch.cuda.get_device_name()
    else:
        kernels = "compiled (bkn/csrc)" if _native.load() is not None else "Python Functions"
        where = platform.processor() or platform.machine()
    print(
        f"torch {torch.__version__}, device {args.device} ({where}), "
        f"threads {torch.get_num_threads()}, seed {args.seed}, kernels: {kernels}\n"
    )
    print(
        "One layer, forward+backward, training mode (torch.utils.benchmark; BN, BKN and BRN timed in turn in "
        f"{args.rounds} rounds: times are medians, ratios medians over rounds [quartiles])"
    )
    print(f"{'shape':<18}{'BN us':>9}{'BKN us':>9}{'BRN us':>9}{'BKN/BN':>21}{'BRN/BN':>21}")
    for shape, bn, bkn, brn, bkn_ratio, brn_ratio in layer_table(
        args.min_run_time, args.seed, args.rounds, args.device
    ):
        cells = [f"{r[0]:.2f} [{r[1]:.2f}-{r[2]:.2f}]" for r in (bkn_ratio, brn_ratio)]
        print(f"{shape:<18}{bn * 1e6:>9.0f}{bkn * 1e6:>9.0f}{brn * 1e6:>9.0f}{cells[0]:>21}{cells[1]:>21}")
    print("\nCIFAR ResNet-20, one SGD step, batch 8, normalization groups of 2 (timed in turn, 5 rounds)")
    print(f"{'method':<22}{'ms/step':>10}{'vs BN':>8}")
    for label, t, ratio in network_table(args.min_run_time, args.seed, device=args.device):
        print(f"{label:<22}{t * 1e3:>10.1f}{ratio:>8.2f}")


if __name__ == "__main__":
    main()
