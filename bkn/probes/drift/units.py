"""One unit of the drift probe: one method at one group size ``n`` with one seed, on one network, in one mode.

1. the method's network (the setup's weights, the method's norms, ``group_size = n``)
   in training mode, running estimates reset;
2. ``burn_in`` training-mode forwards (no weight updates) of ``B = batch_for(n, batch_size)``
   random samples in groups of ``n``, as a network trains with micro-batch groups inside
   an SGD batch (docs/design.md §3): they warm up what a method carries from step to step - BRN's
   moving averages (which its effective statistics depend on), the adaptive gain's
   uncertainty estimates, the running estimates. The first of them uses momentum 1,
   so nothing is left of the reset values;
3. ``steps`` more such forwards with a :class:`bkn.probes.stats.DriftRecorder`: every group's
   estimated statistics, their bias and noise, and the output discrepancy, per layer;
4. for ``<method>-ema``: the running estimates after those forwards against the
   population, and the output discrepancy of one eval-mode forward.

Modes (docs/design.md §9): ``in-network`` - the network as it runs; before each measured forward the
same batch goes through the network normalizing with its population statistics, which
gives every layer's *input drift* (its training-mode input against its population-mode
input, same samples) and the *end-to-end* rows (``layer = "output"``): the network in
training mode (the method's own statistics) against the same network with population
statistics - ``agreement`` (share of equal argmax), ``logit_discrepancy``
``||z_train - z_pop||^2 / ||z_pop||^2`` and ``accuracy`` in training mode (beside
``accuracy_population``), over all measured samples; for ``<method>-ema`` the same with
the running estimates in eval mode. ``isolation`` - every layer's output, and a BKN
layer's posterior, replaced by the population-statistics ones after it is recorded
(:class:`bkn.probes.stats.DriftRecorder` ``isolate=True``, burn-in included), so each layer's
error is its own estimator's alone.

All methods see the same micro-batches for a given ``(n, seed)`` (common random numbers,
so differences between methods are not sampling noise of the data); the seed also seeds
BKN's Monte-Carlo draws. Per-sample norms (GN, LN, IN) skip the burn-in (they carry
nothing between steps); ``floor`` (synthetic chain only) is the chain's closed-form floor
(:meth:`bkn.probes.stats.residual_chain.ResidualGaussianChain.floor`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from bkn.probes.data import Dataset
from bkn.probes.drift.methods import EMA, FLOOR
from bkn.probes.drift.setups import Source
from bkn.probes.stats import DriftRecorder, eval_mode, is_batch_norm, normalizing_with, running_estimate_rows
from bkn.probes.stats.estimated import capture_inputs
from bkn.probes.stats.metrics import decompose
from bkn.probes.stats.residual_chain import ResidualGaussianChain

MODES = ("in-network", "isolation")
OUTPUT = "output"  # the layer of the end-to-end rows


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


def draw(source: Source, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``size`` random samples and their labels (``None`` on the synthetic chain); the same draws as
    :meth:`bkn.probes.data.Dataset.sample`."""
    if isinstance(source, Dataset):
        if size > len(source):
            raise ValueError(f"a batch of {size} is larger than the data set {source.name!r} ({len(source)} samples)")
        index = torch.randperm(len(source), generator=gen)[:size]
        return source.images[index], source.labels[index]
    return source.sample(size, gen), None


def micro_batches(source: Source, n: int, seed: int, passes: Passes) -> Iterator[tuple]:
    """The unit's stream of ``(inputs, labels)``: ``burn_in`` then ``steps`` batches of B samples (groups of n)."""
    gen = unit_generator(seed, n)
    size = batch_for(n, passes.batch_size)
    for _ in range(passes.burn_in + passes.steps):
        yield draw(source, size, gen)


def _labelled(name: str, rows: list[dict]) -> list[dict]:
    return [{"method": name, **r} for r in rows]


def batch_unit(
    model: nn.Module,
    name: str,
    source: Source,
    population,
    n: int,
    seed: int,
    passes: Passes,
    wanted: set,
    mode: str = "in-network",
) -> list[dict]:
    """Rows of ``name`` (a method with batch statistics) and of ``name-ema``, each if ``wanted``."""
    isolate = _check_mode(mode)
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
        with _burn_in(model, population, n, isolate):
            model(next(batches)[0])
            for layer, momentum in zip(layers, momenta):
                layer.momentum = momentum
            for _ in range(passes.burn_in - 1):
                model(next(batches)[0])
        measured = list(batches)
        with DriftRecorder(model, population, n, mode="train", isolate=isolate) as recorder:
            outputs = _measure(model, recorder, population, measured, isolate)
        if name in wanted:
            rows += _labelled(name, recorder.rows())
            if outputs is not None:
                rows += _labelled(name, end_to_end_rows(*outputs, depth=len(population)))
        if name + EMA in wanted:
            rows += _labelled(name + EMA, running_estimate_rows(model, population))
            check = draw(source, batch_for(n, passes.batch_size), unit_generator(seed + 7919, n))[0]
            with eval_mode(model), DriftRecorder(model, population, n, mode="eval") as recorder:
                model(check)
            rows += _labelled(name + EMA, recorder.rows())
            if not isolate:
                with eval_mode(model):
                    z = torch.cat([model(x) for x, _ in measured])
                z_pop, labels = outputs[1], outputs[2]
                rows += _labelled(name + EMA, end_to_end_rows(z, z_pop, labels, depth=len(population)))
    return rows


def _check_mode(mode: str) -> bool:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    return mode == "isolation"


def _burn_in(model, population, n: int, isolate: bool):
    """Isolation mode warms up in isolation too (what a method carries sees population-mode inputs)."""
    if isolate:
        return DriftRecorder(model, population, n, mode="train", isolate=True)
    return contextlib.nullcontext()


def _measure(model, recorder: DriftRecorder, population, measured, isolate: bool):
    """The measured forwards; in-network, each one preceded by the population-mode forward of the same
    batch (the reference inputs of the input drift, and the end-to-end outputs). Returns ``(z_train, z_pop,
    labels)`` over all measured samples, or ``None`` in isolation mode."""
    z_train, z_pop, labels = [], [], []
    for x, y in measured:
        if not isolate:
            recorder.paused = True
            with eval_mode(model), normalizing_with(model, population), capture_inputs(model, population) as seen:
                z_pop.append(model(x))
            recorder.paused = False
            recorder.reference = seen
        z_train.append(model(x))
        labels.append(y)
    if isolate:
        return None
    labels = None if any(y is None for y in labels) else torch.cat(labels)
    return torch.cat(z_train), torch.cat(z_pop), labels


def end_to_end_rows(z: torch.Tensor, z_pop: torch.Tensor, labels: torch.Tensor | None, depth: int) -> list[dict]:
    """``layer = "output"`` rows: ``logit_discrepancy`` ``||z - z_pop||^2 / ||z_pop||^2`` over all samples;
    for a classifier (2-d outputs) also ``agreement`` (share of samples with equal argmax), and with labels
    ``accuracy`` (of ``z``) and ``accuracy_population`` (of ``z_pop``)."""
    values = end_to_end(z, z_pop, labels)
    return [
        {"layer": OUTPUT, "depth": depth, "metric": metric, "statistic": "overall", "value": value}
        for metric, value in values.items()
    ]


def end_to_end(z: torch.Tensor, z_pop: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
    """The end-to-end metrics of :func:`end_to_end_rows` as ``{metric: value}``."""
    if z.shape != z_pop.shape:
        raise ValueError(f"end_to_end: outputs differ in shape, {tuple(z.shape)} vs {tuple(z_pop.shape)}")
    z, z_pop = z.detach().to(torch.float64), z_pop.detach().to(torch.float64)
    out = {"logit_discrepancy": float((z - z_pop).square().sum() / z_pop.square().sum())}
    if z.dim() == 2:
        predicted, predicted_pop = z.argmax(1), z_pop.argmax(1)
        out["agreement"] = float((predicted == predicted_pop).double().mean())
        if labels is not None:
            out["accuracy"] = float((predicted == labels).double().mean())
            out["accuracy_population"] = float((predicted_pop == labels).double().mean())
    return out


def per_sample_unit(
    model: nn.Module, name: str, source: Source, population, n: int, seed: int, passes: Passes, mode: str = "in-network"
) -> list[dict]:
    """Rows of a per-sample norm: its output discrepancy (and, in-network, its layers' input drift) on the unit's
    measured batches."""
    isolate = _check_mode(mode)
    batches = micro_batches(source, n, seed, passes)
    with torch.no_grad():
        for _ in range(passes.burn_in):
            next(batches)  # drawn, not run: the same measured batches as every other method
        with DriftRecorder(model, population, n, mode="train", isolate=isolate) as recorder:
            _measure(model, recorder, population, list(batches), isolate)
    return _labelled(name, recorder.rows())


def floor_unit(chain: ResidualGaussianChain, population, n: int, seed: int, passes: Passes) -> list[dict]:
    """Rows of ``floor`` on the residual chain, on the unit's measured micro-batches.

    The mean: the maximum-likelihood estimate from each group - the grand mean of its whole
    input, pushed through the exact map ``m_k = mu_0 + const`` - so its error at every
    layer k is ``(xbar_g - mu_0) / sqrt(v_k + eps)``, split into bias and noise like every
    method's (``mean_bias``, ``mean_noise``, ``mean_rmse``; same micro-batches: common random
    numbers). The variance: the closed-form delta-method Cramer-Rao bound ``var_rmse``
    (:meth:`~bkn.probes.stats.residual_chain.ResidualGaussianChain.floor`).
    """
    if not isinstance(chain, ResidualGaussianChain):
        raise ValueError("'floor' is defined on the residual synthetic chain only")
    batches = list(micro_batches(chain, n, seed, passes))[passes.burn_in :]
    mu0 = torch.from_numpy(chain.params["mu0"])
    errors = []
    for x, _ in batches:
        xg = x.to(torch.float64).unflatten(0, (x.shape[0] // n, n))  # (G, n, C, H, W)
        errors.append(xg.mean((1, 3, 4)) - mu0)  # (G, C)
    rows = []
    for depth, (name, (_, var_mse)) in enumerate(chain.floor(n).items()):
        if name not in population:
            continue
        scale = (population[name][1] + chain.eps).sqrt()
        parts = decompose([e / scale for e in errors])
        for metric, statistic, value in (
            ("mean_rmse", "rms", parts["rmse"]),
            ("mean_bias", "rms", parts["bias"]),
            ("mean_noise", "rms", parts["noise"]),
            ("mean_signed_bias", "mean", parts["signed_bias"]),
            ("var_rmse", "rms", float(var_mse.mean().sqrt())),
        ):
            rows.append({"layer": name, "depth": depth, "metric": metric, "statistic": statistic, "value": value})
    return _labelled(FLOOR, rows)
