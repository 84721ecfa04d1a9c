"""A short BKN-vs-BN comparison: ``python -m bkn.demo`` (the README's main job for now).

Prints two tables measured on this machine with ``torch.utils.benchmark``:
1. one normalization layer, forward+backward in training mode, at the ResNet stage
   shapes: native ``BatchNorm2d``, BKN with a prior (official update, p=0.9), BRN,
   and their time relative to BN;
2. one SGD step of the paper's CIFAR ResNet-20 at batch 8 with normalization groups of 2
   (the official micro-batch setting), for BN, BKN (official and analytic transitions),
   BRN and GN.
Later issues replace this with the quick benchmark + probe + report pipeline.
"""
from __future__ import annotations

import argparse
import platform

import torch
from torch.utils import benchmark

from . import norms
from .models import cifar_resnet

LAYER_SHAPES = [(8, 64, 56, 56), (8, 256, 14, 14), (2, 512, 7, 7)]


def _time(fn, min_run_time: float) -> float:
    fn()  # warm-up
    return benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time).median


def layer_table(min_run_time: float, seed: int) -> list[tuple]:
    rows = []
    for shape in LAYER_SHAPES:
        gen = torch.Generator().manual_seed(seed)
        c = shape[1]
        x = torch.randn(shape, generator=gen).requires_grad_()
        grad = torch.randn(shape, generator=gen)
        prior = (torch.randn(c, generator=gen) * 0.1, 1 + 0.1 * torch.rand(c, generator=gen))
        bn, bkn, brn = norms.create("bn", c), norms.create("bkn", c, p=0.9), norms.create("brn", c, rmax=3.0, dmax=5.0)
        times = {
            "bn": _time(lambda: bn(x).backward(grad), min_run_time),
            "bkn": _time(lambda: bkn(x, prior=prior).backward(grad), min_run_time),
            "brn": _time(lambda: brn(x).backward(grad), min_run_time),
        }
        rows.append((str(shape), times["bn"], times["bkn"], times["brn"]))
    return rows


def network_table(min_run_time: float, seed: int, batch: int = 8, group: int = 2) -> list[tuple]:
    configs = [("bn (group %d)" % group, "bn", {"group_size": group}),
               ("bkn official", "bkn", {"group_size": group, "transition": "official"}),
               ("bkn analytic", "bkn", {"group_size": group, "transition": "analytic"}),
               ("brn", "brn", {"group_size": group, "rmax": 3.0, "dmax": 5.0}),
               ("gn", "gn", {})]
    rows = []
    for label, name, options in configs:
        torch.manual_seed(seed)
        model = cifar_resnet(20, name, **options)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

        def step():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss
        rows.append((label, _time(step, min_run_time)))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bkn.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the data and models (default 0)")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per measurement (default 0.5)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device cpu ({platform.processor() or platform.machine()}), "
          f"threads {torch.get_num_threads()}, seed {args.seed}\n")
    print("One layer, forward+backward, training mode (median of torch.utils.benchmark)")
    print(f"{'shape':<20}{'BN us':>10}{'BKN us':>10}{'BRN us':>10}{'BKN/BN':>9}{'BRN/BN':>9}")
    for shape, bn, bkn, brn in layer_table(args.min_run_time, args.seed):
        print(f"{shape:<20}{bn * 1e6:>10.0f}{bkn * 1e6:>10.0f}{brn * 1e6:>10.0f}{bkn / bn:>9.2f}{brn / bn:>9.2f}")
    print("\nCIFAR ResNet-20, one SGD step, batch 8, normalization groups of 2")
    rows = network_table(args.min_run_time, args.seed)
    base = rows[0][1]
    print(f"{'norm':<16}{'ms/step':>10}{'vs BN':>8}")
    for label, t in rows:
        print(f"{label:<16}{t * 1e3:>10.1f}{t / base:>8.2f}")


if __name__ == "__main__":
    main()
