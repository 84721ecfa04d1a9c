"""The drift probe's sweep: per setup, the population statistics, then every method x mode x group size x seed.

A setup is data x network x state; a *unit* measures one method at one normalization group
size ``n`` with one seed in one mode (in-network or isolation) on it
(:mod:`bkn.probes.drift.units`). In the ``trained-own`` state each method has its own
weights (trained with it) and so its own population statistics. A method with batch
statistics and its ``-ema`` twin share a unit (one network run). A method that cannot run
at a group size (BN with one value per channel) is skipped and listed in ``meta.json``
under ``skipped``, never silently dropped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from torch import nn

from bkn import methods as registry
from bkn.probes.drift import methods, setups, units
from bkn.probes.stats import is_batch_norm


@dataclass
class ProbeConfig:
    """Everything a probe run depends on (recorded in ``meta.json``)."""

    setups: list[tuple[str, str]] = field(
        default_factory=lambda: [("synthetic", "residual-chain"), ("digits", "cifar-resnet20")]
    )
    states: list[str] = field(default_factory=lambda: ["trained", "trained-own"])  # the chain: always "init"
    modes: list[str] = field(default_factory=lambda: list(units.MODES))
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
        for mode in self.modes:
            if mode not in units.MODES:
                raise ValueError(f"unknown mode {mode!r}; known: {', '.join(units.MODES)}")
        if not self.modes:
            raise ValueError(f"give at least one mode ({', '.join(units.MODES)})")
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

    def __init__(self, config: ProbeConfig, progress=None, jobs: int = 1):
        config.validate()
        self.config = config
        self.jobs = jobs  # processes for the training runs (bkn.probes.drift.pretrain); measuring uses one
        self.pretrained: dict = {}  # (network, data, method name or None) -> the record of a run trained there
        self.wanted = set(methods.resolve(config.methods))
        self.progress = progress  # a bkn.probes.drift.progress.Progress, or None
        self.skipped: list[dict] = []
        self.training: list[dict] = []
        self.timings: dict[str, float] = {}

    def units(self) -> list[tuple]:
        """``(data, network, state, method, mode, n, seed)`` of every unit, in run order (the progress total)."""
        cfg = self.config
        return [
            (data, network, state, name, mode, n, seed)
            for data, network in cfg.setups
            for state in self._states(data)
            for name, _ in unit_methods(self.wanted, data)
            for mode in cfg.modes
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
        if self.jobs > 1:
            self._pretrain()
        rows: list[dict] = []
        for (data, network), source in sources.items():
            for state in self._states(data):
                rows += self._run_setup(data, source, network, state)
        return rows

    def _pretrain(self) -> None:
        """The training runs the cache lacks, ``jobs`` at a time, before any unit."""
        from bkn.probes.drift import pretrain

        wanted = []
        for data, network in self.config.setups:
            for state in self._states(data):
                if state == "trained":
                    wanted.append((network, data, None))
                elif state == setups.OWN:
                    wanted += [(network, data, m.name) for _, m in unit_methods(self.wanted, data) if m is not None]
        jobs = pretrain.needed(wanted, self.config.weights_seed, self.config.cache)
        if len(jobs) > 1:
            self.pretrained = pretrain.pretrain(jobs, self.jobs, self.progress)

    def _trained(self, source, network: str, method=None) -> nn.Module:
        model, record = setups.trained_network(
            network, source, self.config.weights_seed, self.config.cache, self.progress, method=method
        )
        key = (network, source.name, method.name if method is not None else None)
        if record["cached"] and key in self.pretrained:  # trained by this run, in another process
            record = {**self.pretrained.pop(key), "process": "pretrain"}
        self.training.append(record)
        return model

    def _timed(self, name: str, started: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started

    def _population(self, setup: str, key: str, source, model, per_sample: bool) -> dict:
        started = time.perf_counter()
        try:
            return setups.population(source, model, per_sample=per_sample)
        finally:
            self._timed(f"{setup}/{key}", started)

    def _run_setup(self, data: str, source: setups.Source, network: str, state: str) -> list[dict]:
        setup = f"{data}/{network}/{state}"
        own = state == setups.OWN
        shared = shared_population = None
        if not own:
            self._status(f"{setup}: weights")
            shared = (
                setups.base_network(network, source, self.config.weights_seed)
                if state == "init"
                else self._trained(source, network)
            )
            check_network(shared, network)
            self._status(f"{setup}: population statistics")
            shared_population = self._population(setup, "population", source, shared, per_sample=False)
        rows = []
        for name, method in unit_methods(self.wanted, data):
            where = dict(data=data, network=network, state=state)
            base, pop = shared, shared_population
            try:
                if own and method is not None:
                    self._status(f"{setup}: {name}: weights")
                    base = self._trained(source, network, method)
                if method is not None and (own or not method.uses_groups):
                    # per-sample norms: their own statistics; trained-own: the method's own network
                    self._status(f"{setup}: {name}: population statistics")
                    template = base if own else setups.method_network(network, base, method, self.config.group_sizes[0])
                    pop = self._population(setup, f"population-{name}", source, template, not method.uses_groups)
            except ValueError as err:  # e.g. InstanceNorm on a 1x1 feature map
                self._skip_method(where, name, f"population statistics: {err}")
                continue
            for mode in self.config.modes:
                self._status(f"{setup}: {name}, {mode}")
                for n in self.config.group_sizes:
                    for seed in self.config.seeds:
                        key = dict(**where, mode=mode, group_size=n, seed=seed)
                        started = time.perf_counter()
                        try:
                            unit_rows = self._unit(source, network, base, name, method, n, seed, pop, mode)
                        except ValueError as err:  # e.g. BN with one value per channel and group
                            self.skipped.append({**key, "method": name, "reason": str(err)})
                            unit_rows = []
                        self._timed(f"{setup}/{name}/{mode}", started)
                        rows += [{**key, **r} for r in unit_rows]
                        if self.progress is not None:
                            self.progress.update(1)
        return rows

    def _unit(self, source, network: str, base, name: str, method, n: int, seed: int, population, mode) -> list[dict]:
        passes = self.config.passes
        if method is None:
            return units.floor_unit(source, population, n, seed, passes)
        model = setups.method_network(network, base, method, n)
        if method.uses_groups:
            return units.batch_unit(model, name, source, population, n, seed, passes, self.wanted, mode)
        return units.per_sample_unit(model, name, source, population, n, seed, passes, mode)

    def _skip_method(self, setup: dict, name: str, reason: str) -> None:
        for mode in self.config.modes:
            for n in self.config.group_sizes:
                for seed in self.config.seeds:
                    self.skipped.append(
                        {**setup, "mode": mode, "group_size": n, "seed": seed, "method": name, "reason": reason}
                    )
                    if self.progress is not None:
                        self.progress.update(1)

    def _status(self, text: str) -> None:
        if self.progress is not None:
            self.progress.stage(text)


def config_record(config: ProbeConfig) -> dict:
    record = asdict(config)
    record["setups"] = [f"{d}/{n}" for d, n in config.setups]
    record["trained_own_group_size"] = setups.TRAIN_GROUP
    record["notes"] = [
        "population statistics: every earlier layer normalizing with its own population statistics; for BKN "
        "they are the reference, not what it normalizes with at inference (the running average of its "
        "posteriors, measured as '<method>-ema')",
        f"state 'trained': trained with torch BatchNorm; 'trained-own': trained with the measured method at "
        f"normalization group {setups.TRAIN_GROUP}",
    ]
    record["methods_known"] = list(methods.names())
    record["methods_resolved"] = methods.resolve(config.methods)
    record["method_of"] = {}  # result name -> the registry method (norm and options) whose network measures it
    for name in config.methods:
        method = methods.base(name)
        if method is not None:
            record["method_of"][name] = {"method": method.name, "norm": method.norm, **method.layer_options()}
    return record
