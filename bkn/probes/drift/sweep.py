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

import dataclasses
import functools
import pathlib
from dataclasses import asdict, dataclass, field

from bkn import methods as registry
from bkn.probes import sweeps
from bkn.probes.drift import methods, setups, units, worker
from bkn.probes.drift.worker import check_network  # noqa: F401 (where it always was)


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
    """Runs every unit of a :class:`ProbeConfig`; :meth:`run` returns tidy rows (without the environment).

    Each unit is an independent run (:mod:`bkn.probes.drift.worker`): in this process one after
    the other, or on ``executor`` (any ``concurrent.futures.Executor``). With ``out``, each
    unit's rows are saved as a shard the moment it ends and a rerun skips the units saved
    already (:func:`bkn.probes.sweeps.execute`; ``fresh`` starts over).
    """

    def __init__(self, config: ProbeConfig, progress=None, jobs: int = 1, executor=None, out=None, fresh=False):
        config.validate()
        self.config = config
        self.jobs = jobs  # processes for the training runs (bkn.probes.drift.pretrain) when there is no executor
        self.executor, self.out, self.fresh = executor, out, fresh
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

    def runs(self, env: dict | None = None) -> list[sweeps.Run]:
        """The units as :class:`bkn.probes.sweeps.Run`, keyed by what determines their rows and ``env``."""
        import torch

        from bkn.probes.results import DRIFT

        env = env or {}
        config = self.config
        if self.executor is not None:  # workers elsewhere: the weights cache by its absolute path
            config = dataclasses.replace(config, cache=str(pathlib.Path(config.cache).resolve()))
        return [
            sweeps.Run(
                sweeps.run_key(worker.unit_key(self.config, unit, env, DRIFT.version)),
                "/".join(map(str, unit[:3])) + f": {unit[3]}, {unit[4]}, n={unit[5]}, seed {unit[6]}",
                (config, unit, torch.get_num_threads()),
            )
            for unit in self.units()
        ]

    def run(self, env: dict | None = None) -> list[dict]:
        from bkn.probes.results import DRIFT

        for data, network in self.config.setups:  # every check before any work
            source = setups.load_source(data, network)
            check_group_sizes(data, source, self.config.group_sizes, self.config.batch_size)
        runs = self.runs(env)
        if self.out is not None and not self.fresh:
            done = DRIFT.read_shards(self.out, [r.key for r in runs])
            todo = [u for r, u in zip(runs, self.units()) if r.key not in done]
        else:
            todo = self.units()
        if self.jobs > 1 or self.executor is not None:
            self._pretrain({(u[0], u[1], u[2], u[3]) for u in todo})
        task = functools.partial(worker.measure, progress=self.progress)
        if self.executor is not None:  # the bar stays here
            task = worker.measure
        worker.forget()
        try:
            results = sweeps.execute(
                runs, task, schema=DRIFT, out=self.out, executor=self.executor, fresh=self.fresh, on_done=self._done
            )
        finally:
            worker.forget()
        rows: list[dict] = []
        seen = set()
        for unit_rows, record in results:
            rows += unit_rows
            self.skipped += record.get("skipped", [])
            for name, seconds in record.get("timings_s", {}).items():
                self.timings[name] = self.timings.get(name, 0.0) + seconds
            for trained in record.get("training", []):
                key = tuple(trained.pop("key", [trained.get("cache")]))
                if key in seen:
                    continue
                seen.add(key)
                if trained["cached"] and key in self.pretrained:  # trained by this run, in another process
                    trained = {**self.pretrained.pop(key), "process": "pretrain"}
                self.training.append(trained)
        return rows

    def _done(self, run: sweeps.Run, result, resumed: bool) -> None:
        if self.progress is not None:
            self.progress.update(1, resumed=resumed, label=run.label)

    def _pretrain(self, todo: set) -> None:
        """The training runs the cache lacks (for the units still to run), ``jobs`` at a time or on the
        executor, before any unit."""
        from bkn.probes.drift import pretrain

        wanted = []
        for data, network in self.config.setups:
            for state in self._states(data):
                if state == "trained" and any(u[:3] == (data, network, state) for u in todo):
                    wanted.append((network, data, None))
                elif state == setups.OWN:
                    wanted += [
                        (network, data, m.name)
                        for name, m in unit_methods(self.wanted, data)
                        if m is not None and (data, network, state, name) in todo
                    ]
        jobs = pretrain.needed(wanted, self.config.weights_seed, self.config.cache)
        if len(jobs) > 1 or (jobs and self.executor is not None):
            self.pretrained = pretrain.pretrain(jobs, self.jobs, self.progress, self.executor)


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
