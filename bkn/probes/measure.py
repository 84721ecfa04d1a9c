"""The measurement kit: one interleaved timer and one training-step body, for the demo and the suites.

* :func:`interleaved` times several callables in rounds, each round timing every one in
  turn (the order rotated by one each round, unless ``rotate=False``): a shared machine's
  speed drifts over seconds, and entries timed within the same round meet the same
  phase of it, so per-round ratios (:func:`bkn.probes.summary_stats.paired_ratios`)
  cancel most of the drift. It returns ``{name: [seconds per call, one per round]}``.
* :class:`TrainStep`: one SGD step (forward, cross-entropy, backward, SGD with momentum)
  of a model on a fixed batch: what the network benchmarks, ``suites.chain_cost`` and the
  demo time.

The summary of the samples (median, quartiles) is :mod:`bkn.probes.summary_stats`
(torch-free, so that the report can use it too).
"""

from __future__ import annotations

import time

import torch
from torch import nn

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # elapsed time; this process's CPU time


def per_call(fn, number: int, clock=time.perf_counter) -> float:
    """Seconds per call of ``fn`` over ``number`` calls in a row, read on ``clock``."""
    start = clock()
    for _ in range(number):
        fn()
    return (clock() - start) / number


def interleaved(
    entries: dict,
    rounds: int,
    per_round,
    *,
    clock=time.perf_counter,
    rotate: bool = True,
    measure=None,
    on_round=None,
    counter=None,
    counted: dict | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every entry in each of ``rounds`` rounds; every entry is timed once per round.

    ``entries``: ``{name: callable}``. ``per_round``: calls per entry per round, one number or
    ``{name: number}``. ``clock``: what the default measurement reads (:data:`CLOCKS`).
    ``rotate``: start round ``r`` at entry ``r mod len(entries)``, so no entry always runs first.
    ``measure(entry, number)``: seconds per call of a block of ``number`` calls (default:
    :func:`per_call` on ``clock``). ``on_round(r, times)``: called after each round with the
    samples so far. ``counter``: a function read before and after each block (e.g. page
    faults); ``counted`` then receives, per entry, its increase per call in each round.
    """
    if rounds < 1:
        raise ValueError(f"interleaved: rounds must be >= 1, got {rounds}")
    names = list(entries)
    counts = per_round if isinstance(per_round, dict) else dict.fromkeys(names, per_round)
    if measure is None:

        def measure(fn, number):
            return per_call(fn, number, clock)

    times = {n: [] for n in names}
    increases = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names) if rotate else 0
        for n in names[shift:] + names[:shift]:
            before = counter() if counter is not None else 0
            times[n].append(measure(entries[n], counts[n]))
            if counter is not None:
                increases[n].append((counter() - before) / counts[n])
        if on_round is not None:
            on_round(r, times)
    if counted is not None:
        counted.update(increases)
    return times


class TrainStep:
    """One training step of ``model`` on the fixed batch ``(x, y)``: forward, cross-entropy (on float32
    logits), backward, and an SGD step with momentum (gradients set to None, not zeroed). Returns the loss."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 1e-3, momentum: float = 0.9):
        self.model, self.x, self.y = model, x, y
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    def __call__(self) -> torch.Tensor:
        loss = nn.functional.cross_entropy(self.model(self.x).float(), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss
