"""One unit of the drift probe: one method at one group size ``n`` with one seed, on one network.

1. the method's network (the setup's weights, the method's norms, ``group_size = n``)
   in training mode, running estimates reset;
2. ``burn_in`` training-mode forwards (no weight updates) of ``B = batch_for(n, batch_size)``
   random samples in groups of ``n``, as a network trains with micro-batch groups inside
   an SGD batch (spec 1.3): they warm up what a method carries from step to step - BRN's
   moving averages (which its effective statistics depend on), the adaptive gain's
   uncertainty estimates, the running estimates. The first of them uses momentum 1,
   so nothing is left of the reset values;
3. ``steps`` more such forwards with a :class:`bkn.stats.DriftRecorder`: every group's
   estimated statistics and output discrepancy, per layer (median, p90 over groups x
   channels);
4. for ``<method>-ema``: the running estimates after those forwards against the
   population, and the output discrepancy of one eval-mode forward.

All methods see the same micro-batches for a given ``(n, seed)`` (common random numbers,
so differences between methods are not sampling noise of the data); the seed also seeds
BKN's Monte-Carlo draws. Per-sample norms (GN, LN, IN) skip the burn-in (they carry
nothing between steps); ``floor`` (synthetic chain only) measures the population-mode
network on the same micro-batches.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from bkn.stats import DriftRecorder, eval_mode, is_batch_norm, running_estimate_rows, use_population_statistics

from .methods import EMA, FLOOR
from .setups import Source


@dataclass(frozen=True)
class Passes:
    """How a unit runs: ``burn_in`` then ``steps`` forwards of batches holding ``batch_size`` samples."""

    burn_in: int
    steps: int
    batch_size: int


def batch_for(group_size: int, batch_size: int) -> int:
    """The batch the groups live in: the smallest multiple of ``group_size`` that holds ``batch_size`` samples."""
    return group_size * -(-batch_size // group_size)


def unit_generator(seed: int, group_size: int) -> torch.Generator:
    # The same stream for every method at (n, seed): common random numbers.
    return torch.Generator().manual_seed(1_000_003 * seed + group_size)


def micro_batches(source: Source, n: int, seed: int, passes: Passes) -> Iterator[torch.Tensor]:
    """The unit's stream of batches: ``burn_in`` then ``steps`` batches of B samples (groups of n)."""
    gen = unit_generator(seed, n)
    size = batch_for(n, passes.batch_size)
    for _ in range(passes.burn_in + passes.steps):
        yield source.sample(size, gen)


def _labelled(name: str, rows: list[dict]) -> list[dict]:
    return [{"method": name, **r} for r in rows]


def batch_unit(
    model: nn.Module, name: str, source: Source, population, n: int, seed: int, passes: Passes, wanted: set
) -> list[dict]:
    """Rows of ``name`` (a method with batch statistics) and of ``name-ema``, each if ``wanted``."""
    layers = [m for m in model.modules() if is_batch_norm(m)]
    for layer in layers:
        layer.reset_running_stats()
    torch.manual_seed(seed)  # BKN's Monte-Carlo draws
    batches = micro_batches(source, n, seed, passes)
    rows = []
    with torch.no_grad():
        momenta = [layer.momentum for layer in layers]
        for layer in layers:
            layer.momentum = 1.0  # the first step replaces the reset values entirely
        model(next(batches))
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        for _ in range(passes.burn_in - 1):
            model(next(batches))
        with DriftRecorder(model, population, n, mode="train") as recorder:
            for x in batches:
                model(x)
        if name in wanted:
            rows += _labelled(name, recorder.rows())
        if name + EMA in wanted:
            rows += _labelled(name + EMA, running_estimate_rows(model, population))
            check = source.sample(batch_for(n, passes.batch_size), unit_generator(seed + 7919, n))
            with eval_mode(model), DriftRecorder(model, population, n, mode="eval") as recorder:
                model(check)
            rows += _labelled(name + EMA, recorder.rows())
    return rows


def per_sample_unit(
    model: nn.Module, name: str, source: Source, population, n: int, seed: int, passes: Passes
) -> list[dict]:
    """Rows of a per-sample norm: its output discrepancy on the unit's measured batches."""
    batches = micro_batches(source, n, seed, passes)
    with torch.no_grad():
        for _ in range(passes.burn_in):
            next(batches)  # drawn, not run: the same measured batches as every other method
        with DriftRecorder(model, population, n, mode="train") as recorder:
            for x in batches:
                model(x)
    return _labelled(name, recorder.rows())


def floor_unit(base: nn.Module, source: Source, population, n: int, seed: int, passes: Passes) -> list[dict]:
    """Rows of ``floor``: the best estimate from each group (synthetic chain), on the same batches."""
    model = use_population_statistics(copy.deepcopy(base), population)
    batches = micro_batches(source, n, seed, passes)
    with eval_mode(model):
        for _ in range(passes.burn_in):
            next(batches)
        with DriftRecorder(model, population, n, mode="floor") as recorder:
            for x in batches:
                model(x)
    return _labelled(FLOOR, recorder.rows())
