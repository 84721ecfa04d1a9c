"""The drift probe's sweep: per setup, the population statistics, then every method x group size x seed.

A setup is data x network x state; a *unit* measures one method at one normalization group
size ``n`` with one seed on it (:mod:`bkn.probes.drift.units`). A method with batch
statistics and its ``-ema`` twin share a unit (one network run). A method that cannot run
at a group size (BN with one value per channel) is skipped and listed in ``meta.json``
under ``skipped``, never silently dropped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from torch import nn

from bkn import methods as registry
from bkn.stats import is_batch_norm

from . import methods, setups, units


@dataclass
class ProbeConfig:
    """Everything a probe run depends on (recorded in ``meta.json``)."""

    setups: list[tuple[str, str]] = field(
        default_factory=lambda: [("synthetic", "linear-chain"), ("digits", "cifar-resnet20")]
    )
    states: list[str] = field(default_factory=lambda: ["trained"])  # the synthetic chain: always "init"
    methods: list[str] = field(default_factory=lambda: list(methods.DEFAULT_METHODS))
    group_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    batch_size: int = 16  # samples per forward; the groups live in it
    burn_in: int = 20
    steps: int = 10
    weights_seed: int = 0
    cache: str = "results/cache"

    def validate(self) -> None:
        methods.resolve(self.methods)
        for data, network in self.setups:
            setups.check_pair(data, network)
        for state in self.states:
            if state not in setups.STATES:
                raise ValueError(f"unknown state {state!r}; known: {', '.join(setups.STATES)}")
        if not self.group_sizes or any(not isinstance(n, int) or n < 1 for n in self.group_sizes):
            raise ValueError(f"group sizes must be positive ints, got {self.group_sizes}")
        if not self.seeds:
            raise ValueError("give at least one seed")
        for name in ("batch_size", "burn_in", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def passes(self) -> units.Passes:
        return units.Passes(self.burn_in, self.steps, self.batch_size)


def check_network(model: nn.Module, name: str = "network") -> None:
    """``ValueError`` unless ``model`` has a normalization layer with batch statistics."""
    if not any(is_batch_norm(m) for m in model.modules()):
        raise ValueError(
            f"{name} ({type(model).__name__}) has no normalization layers with batch statistics "
            f"(BatchNorm, ghost BN, BRN, BKN): there is nothing for the drift probe to measure"
        )


def check_group_sizes(data: str, source: setups.Source, group_sizes, batch_size: int) -> None:
    for n in group_sizes:
        needed = units.batch_for(n, batch_size)
        if needed > setups.size(source):
            raise ValueError(
                f"group size {n} needs batches of {needed} samples, more than the data set {data!r} holds "
                f"({int(setups.size(source))} samples); use smaller --group-sizes"
            )


def unit_methods(wanted, data: str) -> list[tuple[str, registry.Method | None]]:
    """``(name, registry method)`` of the units to run, in legend order: a method with batch statistics
    covers its ``-ema`` twin; ``floor`` (no registry method) runs on the synthetic chain only."""
    wanted = set(wanted)
    out = []
    for name in methods.names():
        if name.endswith(methods.EMA):
            continue
        kind = methods.kind(name)
        if name in wanted or (kind == methods.BATCH and name + methods.EMA in wanted):
            if kind != methods.FLOOR_KIND or data == "synthetic":
                out.append((name, methods.base(name)))
    return out


class Probe:
    """Runs every unit of a :class:`ProbeConfig`; :meth:`run` returns tidy rows (without the environment)."""

    def __init__(self, config: ProbeConfig, progress=None):
        config.validate()
        self.config = config
        self.wanted = set(methods.resolve(config.methods))
        self.progress = progress  # a tqdm bar (one step per unit), or None
        self.skipped: list[dict] = []
        self.training: list[dict] = []
        self.timings: dict[str, float] = {}

    def units(self) -> list[tuple]:
        """``(data, network, state, method, n, seed)`` of every unit, in run order (for the progress bar)."""
        cfg = self.config
        return [
            (data, network, state, name, n, seed)
            for data, network in cfg.setups
            for state in self._states(data)
            for name, _ in unit_methods(self.wanted, data)
            for n in cfg.group_sizes
            for seed in cfg.seeds
        ]

    def _states(self, data: str) -> list[str]:
        # The chain's weights define its truth: it has no trained state, only "init".
        return ["init"] if data == "synthetic" else list(self.config.states)

    def run(self) -> list[dict]:
        sources = {}
        for data, network in self.config.setups:  # every check before any work
            sources[data, network] = setups.load_source(data, network)
            check_group_sizes(data, sources[data, network], self.config.group_sizes, self.config.batch_size)
        rows: list[dict] = []
        for (data, network), source in sources.items():
            for state in self._states(data):
                rows += self._run_setup(data, source, network, state)
        return rows

    def _base(self, source: setups.Source, network: str, state: str) -> nn.Module:
        if state == "init":
            return setups.base_network(network, source, self.config.weights_seed)
        model, record = setups.trained_network(
            network, source, self.config.weights_seed, self.config.cache, progress=self.progress is not None
        )
        self.training.append(record)
        return model

    def _timed(self, name: str, started: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started

    def _run_setup(self, data: str, source: setups.Source, network: str, state: str) -> list[dict]:
        setup = f"{data}/{network}/{state}"
        self._status(f"{setup}: weights")
        base = self._base(source, network, state)
        check_network(base, network)
        self._status(f"{setup}: population statistics")
        started = time.perf_counter()
        population = setups.population(source, base, per_sample=False)
        self._timed(f"{setup}/population", started)
        rows = []
        for name, method in unit_methods(self.wanted, data):
            self._status(f"{setup}: {name}")
            pop = population
            if method is not None and not method.uses_groups:  # per-sample norms: their own statistics
                template = setups.method_network(network, base, method, self.config.group_sizes[0])
                started = time.perf_counter()
                try:
                    pop = setups.population(source, template, per_sample=True)
                except ValueError as err:  # e.g. InstanceNorm on a 1x1 feature map
                    self._skip_method(
                        dict(data=data, network=network, state=state), name, f"population statistics: {err}"
                    )
                    continue
                self._timed(f"{setup}/population-{name}", started)
            for n in self.config.group_sizes:
                for seed in self.config.seeds:
                    key = dict(data=data, network=network, state=state, group_size=n, seed=seed)
                    started = time.perf_counter()
                    try:
                        unit_rows = self._unit(source, network, base, name, method, n, seed, pop)
                    except ValueError as err:  # e.g. BN with one value per channel and group
                        self.skipped.append({**key, "method": name, "reason": str(err)})
                        unit_rows = []
                    self._timed(f"{setup}/{name}", started)
                    rows += [{**key, **r} for r in unit_rows]
                    if self.progress is not None:
                        self.progress.update(1)
        return rows

    def _unit(self, source, network: str, base, name: str, method, n: int, seed: int, population) -> list[dict]:
        passes = self.config.passes
        if method is None:
            return units.floor_unit(base, source, population, n, seed, passes)
        model = setups.method_network(network, base, method, n)
        if method.uses_groups:
            return units.batch_unit(model, name, source, population, n, seed, passes, self.wanted)
        return units.per_sample_unit(model, name, source, population, n, seed, passes)

    def _skip_method(self, setup: dict, name: str, reason: str) -> None:
        for n in self.config.group_sizes:
            for seed in self.config.seeds:
                self.skipped.append({**setup, "group_size": n, "seed": seed, "method": name, "reason": reason})
                if self.progress is not None:
                    self.progress.update(1)

    def _status(self, text: str) -> None:
        if self.progress is not None:
            self.progress.set_description_str(text, refresh=True)


def config_record(config: ProbeConfig) -> dict:
    record = asdict(config)
    record["setups"] = [f"{d}/{n}" for d, n in config.setups]
    record["methods_known"] = list(methods.names())
    record["methods_resolved"] = methods.resolve(config.methods)
    record["method_of"] = {}  # result name -> the registry method (norm and options) whose network measures it
    for name in config.methods:
        method = methods.base(name)
        if method is not None:
            record["method_of"][name] = {"method": method.name, "norm": method.norm, **method.layer_options()}
    return record
