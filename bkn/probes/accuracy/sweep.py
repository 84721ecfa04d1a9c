"""The probe's measurement loop: population statistics, then every method x group size x seed.

One *unit* measures one method at one normalization group size ``n`` with one seed on
one setup (data x network x state):

1. the method's network (the setup's weights, the method's norms, ``group_size = n``)
   in training mode, running estimates reset;
2. ``burn_in`` training-mode forwards (no weight updates) of ``B = max(sgd_batch, n)``
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

All methods of a setup see the same micro-batches for a given ``(n, seed)`` (common
random numbers, so differences between methods are not sampling noise of the data);
the seed also seeds BKN's Monte-Carlo draws. Per-sample norms (GN, LN, IN) skip the
burn-in (they carry nothing between steps); ``floor`` (synthetic chain only) measures the
population-mode network on the same micro-batches.

A method that cannot run at a group size (BN with one value per channel) is skipped and
listed in ``meta.json`` under ``skipped``, never silently dropped.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from bkn.stats import (
    DriftRecorder,
    eval_mode,
    is_batch_norm,
    population_statistics,
    running_estimate_rows,
    use_population_statistics,
)

from . import setups
from .methods import DEFAULT_METHODS, METHODS, Method, batch_method, resolve


@dataclass
class ProbeConfig:
    """Everything a probe run depends on (recorded in ``meta.json``)."""

    setups: list[tuple[str, str]] = field(default_factory=lambda: [("synthetic", "linear-chain"),
                                                                   ("digits", "cifar-resnet20")])
    states: list[str] = field(default_factory=lambda: ["trained"])  # the synthetic chain: always "init"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    sgd_batch: int = 16
    burn_in: int = 20
    steps: int = 10
    weights_seed: int = 0
    cache: str = "results/cache"

    def validate(self) -> None:
        resolve(self.methods)
        for data, network in self.setups:
            setups.check_pair(data, network)
        for state in self.states:
            if state not in setups.STATES:
                raise ValueError(f"unknown state {state!r}; known: {', '.join(setups.STATES)}")
        if not self.batch_sizes or any(not isinstance(n, int) or n < 1 for n in self.batch_sizes):
            raise ValueError(f"batch sizes must be positive ints, got {self.batch_sizes}")
        if not self.seeds:
            raise ValueError("give at least one seed")
        for name in ("sgd_batch", "burn_in", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def sgd_batch_for(group_size: int, sgd_batch: int) -> int:
    """The batch the groups live in: the smallest multiple of ``n`` that holds ``sgd_batch`` samples."""
    return group_size * -(-sgd_batch // group_size)


def check_network(model: nn.Module, name: str = "network") -> None:
    """``ValueError`` unless ``model`` has a normalization layer with batch statistics."""
    if not any(is_batch_norm(m) for m in model.modules()):
        raise ValueError(f"{name} ({type(model).__name__}) has no normalization layers with batch statistics "
                         f"(BatchNorm, ghost BN, BRN, BKN): there is nothing for the accuracy probe "
                         f"to measure")


def check_batch_sizes(dataset: setups.Dataset, batch_sizes, sgd_batch: int) -> None:
    for n in batch_sizes:
        needed = sgd_batch_for(n, sgd_batch)
        if needed > dataset.size:
            raise ValueError(f"batch size {n} needs batches of {needed} samples, more than the data set "
                             f"{dataset.name!r} holds ({int(dataset.size)} samples); "
                             f"use smaller --batch-sizes")


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_batch_norm(m)]


def _unit_generator(seed: int, group_size: int) -> torch.Generator:
    # The same stream for every method at (n, seed): common random numbers.
    return torch.Generator().manual_seed(1_000_003 * seed + group_size)


class Probe:
    """Runs the units of one setup and state; :meth:`run` returns tidy rows (without the environment)."""

    def __init__(self, config: ProbeConfig, progress=None):
        config.validate()
        self.config = config
        self.methods = resolve(config.methods)
        self.progress = progress  # a tqdm bar (one step per unit), or None
        self.skipped: list[dict] = []
        self.training: list[dict] = []
        self.timings: dict[str, float] = {}

    # -- work list (for the progress bar) -------------------------------------------------
    def units(self) -> list[tuple]:
        """``(data, network, state, method, n, seed)`` of every unit, in run order."""
        out = []
        for data, network in self.config.setups:
            for state in self._states(data):
                for method in self._unit_methods(data):
                    for n in self.config.batch_sizes:
                        for seed in self.config.seeds:
                            out.append((data, network, state, method.name, n, seed))
        return out

    def _states(self, data: str) -> list[str]:
        # The chain's weights define its truth: it has no trained state, only "init".
        return ["init"] if data == "synthetic" else list(self.config.states)

    def _unit_methods(self, data: str) -> list[Method]:
        """Methods that run units: batch methods cover their ``-ema`` twins in the same unit."""
        names = {m.name for m in self.methods}
        out = []
        for m in METHODS.values():
            if m.kind == "batch" and (m.name in names or f"{m.name}-ema" in names):
                out.append(m)
            elif m.kind == "per_sample" and m.name in names:
                out.append(m)
            elif m.kind == "floor" and m.name in names and data == "synthetic":
                out.append(m)
        return out

    # -- running ----------------------------------------------------------------------------
    def run(self) -> list[dict]:
        rows: list[dict] = []
        datasets = {}
        for data, network in self.config.setups:  # every check before any work
            datasets[data, network] = setups.load_dataset(data, network)
            check_batch_sizes(datasets[data, network], self.config.batch_sizes, self.config.sgd_batch)
        for (data, network), dataset in datasets.items():
            for state in self._states(data):
                rows += self._run_setup(dataset, network, state)
        return rows

    def _base(self, dataset: setups.Dataset, network: str, state: str) -> nn.Module:
        if state == "init":
            return setups.base_network(network, dataset, self.config.weights_seed)
        model, record = setups.trained_network(network, dataset, self.config.weights_seed, self.config.cache,
                                               progress=self.progress is not None)
        self.training.append(record)
        return model

    def _population(self, dataset: setups.Dataset, model: nn.Module, per_sample: bool) -> dict:
        if dataset.chain is not None:
            return dataset.chain.population_statistics(model, per_sample=per_sample)
        return population_statistics(model, dataset.batches(), per_sample=per_sample)

    def _run_setup(self, dataset: setups.Dataset, network: str, state: str) -> list[dict]:
        cfg = self.config
        self._status(f"{dataset.name}/{network}/{state}: weights")
        base = self._base(dataset, network, state)
        check_network(base, network)
        self._status(f"{dataset.name}/{network}/{state}: population statistics")
        started = time.perf_counter()
        population = self._population(dataset, base, per_sample=False)
        self.timings[f"{dataset.name}/{network}/{state}/population"] = time.perf_counter() - started
        wanted = {m.name for m in self.methods}
        rows = []
        for method in self._unit_methods(dataset.name):
            pop = population
            self._status(f"{dataset.name}/{network}/{state}: {method.name}")
            if method.kind == "per_sample":
                template = setups.method_network(network, base, method, cfg.batch_sizes[0],
                                                 dataset.num_classes)
                started = time.perf_counter()
                try:
                    pop = self._population(dataset, template, per_sample=True)
                    self.timings[f"{dataset.name}/{network}/{state}/population-{method.name}"] = \
                        time.perf_counter() - started
                except ValueError as err:  # e.g. InstanceNorm on a 1x1 feature map
                    self._skip_method(dataset, network, state, method, f"population statistics: {err}")
                    continue
            for n in cfg.batch_sizes:
                for seed in cfg.seeds:
                    key = dict(data=dataset.name, network=network, state=state, batch_size=n, seed=seed)
                    started = time.perf_counter()
                    try:
                        if method.kind == "batch":
                            unit_rows = self._batch_unit(dataset, network, base, method, n, seed, pop, wanted)
                        elif method.kind == "per_sample":
                            unit_rows = self._per_sample_unit(dataset, network, base, method, n, seed, pop)
                        else:
                            unit_rows = self._floor_unit(dataset, base, n, seed, pop)
                    except ValueError as err:  # e.g. BN with one value per channel and group
                        self.skipped.append({**key, "method": method.name, "reason": str(err)})
                        unit_rows = []
                    name = f"{dataset.name}/{network}/{state}/{method.name}"
                    self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started
                    rows += [{**key, **r} for r in unit_rows]
                    if self.progress is not None:
                        self.progress.update(1)
        return rows

    def _skip_method(self, dataset, network: str, state: str, method: Method, reason: str) -> None:
        for n in self.config.batch_sizes:
            for seed in self.config.seeds:
                self.skipped.append(dict(data=dataset.name, network=network, state=state, batch_size=n,
                                         seed=seed, method=method.name, reason=reason))
                if self.progress is not None:
                    self.progress.update(1)

    def _status(self, text: str) -> None:
        if self.progress is not None:
            self.progress.set_description_str(text, refresh=True)

    def _micro_batches(self, dataset: setups.Dataset, n: int, seed: int):
        """The unit's stream of batches: ``burn_in`` then ``steps`` batches of B samples (groups of n)."""
        gen = _unit_generator(seed, n)
        size = sgd_batch_for(n, self.config.sgd_batch)
        for _ in range(self.config.burn_in + self.config.steps):
            yield dataset.sample(size, gen)

    def _batch_unit(self, dataset, network, base, method: Method, n: int, seed: int, population,
                    wanted) -> list[dict]:
        cfg = self.config
        model = setups.method_network(network, base, method, n, dataset.num_classes)
        layers = _batch_norms(model)
        for layer in layers:
            layer.reset_running_stats()
        torch.manual_seed(seed)  # BKN's Monte-Carlo draws
        batches = self._micro_batches(dataset, n, seed)
        rows = []
        with torch.no_grad():
            momenta = [layer.momentum for layer in layers]
            for layer in layers:
                layer.momentum = 1.0  # the first step replaces the reset values entirely
            model(next(batches))
            for layer, momentum in zip(layers, momenta):
                layer.momentum = momentum
            for _ in range(cfg.burn_in - 1):
                model(next(batches))
            with DriftRecorder(model, population, n, mode="train") as recorder:
                for x in batches:
                    model(x)
            if method.name in wanted:
                rows += [{"method": method.name, **r} for r in recorder.rows()]
            ema = f"{method.name}-ema"
            if ema in wanted:
                rows += [{"method": ema, **r} for r in running_estimate_rows(model, population)]
                with eval_mode(model), DriftRecorder(model, population, n, mode="eval") as recorder:
                    model(dataset.sample(sgd_batch_for(n, cfg.sgd_batch), _unit_generator(seed + 7919, n)))
                rows += [{"method": ema, **r} for r in recorder.rows()]
        return rows

    def _per_sample_unit(self, dataset, network, base, method: Method, n: int, seed: int,
                         population) -> list[dict]:
        model = setups.method_network(network, base, method, n, dataset.num_classes)
        batches = self._micro_batches(dataset, n, seed)
        with torch.no_grad():
            for _ in range(self.config.burn_in):
                next(batches)  # drawn, not run: the same measured batches as every other method
            with DriftRecorder(model, population, n, mode="train") as recorder:
                for x in batches:
                    model(x)
        return [{"method": method.name, **r} for r in recorder.rows()]

    def _floor_unit(self, dataset, base, n: int, seed: int, population) -> list[dict]:
        model = use_population_statistics(copy.deepcopy(base), population)
        batches = self._micro_batches(dataset, n, seed)
        with eval_mode(model):
            for _ in range(self.config.burn_in):
                next(batches)
            with DriftRecorder(model, population, n, mode="floor") as recorder:
                for x in batches:
                    model(x)
        return [{"method": "floor", **r} for r in recorder.rows()]


def config_record(config: ProbeConfig) -> dict:
    record = asdict(config)
    record["setups"] = [f"{d}/{n}" for d, n in config.setups]
    record["methods_known"] = list(METHODS)
    record["methods_resolved"] = [m.name for m in resolve(config.methods)]
    record["batch_method_of"] = {m: batch_method(m).name for m in config.methods if METHODS[m].kind == "ema"}
    return record
