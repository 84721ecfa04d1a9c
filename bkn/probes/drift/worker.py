"""One drift-probe unit as an independent run: what any process (this one, a local pool's, a Dask or SLURM
worker) does to measure it, and the key that names its shard.

:func:`measure` takes ``(config, unit, threads)`` and returns ``(rows, record)``: the unit's
rows and what ``meta.json`` gathers about it (``skipped``, ``training``, ``timings_s``). The
setup's source, weights (from the weights cache, or trained and cached) and population
statistics are computed on a process's first unit of a setup and kept for its next units
(:data:`_MEMO`, one setup at a time), so running units one after the other in one process
costs what the single-process probe always did, and a worker that gets units of several
setups recomputes only what it lacks. Every unit seeds its own draws
(:func:`bkn.probes.drift.units.unit_generator`, ``torch.manual_seed``), so its rows do not
depend on which process ran it or what ran before.
"""

from __future__ import annotations

import dataclasses
import json
import time

from torch import nn

from bkn.probes.drift import methods, setups, units
from bkn.probes.stats import is_batch_norm

Unit = tuple  # (data, network, state, method, mode, group_size, seed)
_MEMO: dict = {"key": None}


def check_network(model: nn.Module, name: str = "network") -> None:
    """``ValueError`` unless ``model`` has a normalization layer with batch statistics."""
    if not any(is_batch_norm(m) for m in model.modules()):
        raise ValueError(
            f"{name} ({type(model).__name__}) has no normalization layers with batch statistics "
            f"(BatchNorm, ghost BN, BRN, BKN): there is nothing for the drift probe to measure"
        )


def forget() -> None:
    """Drop this process's setup (its weights and population statistics)."""
    _MEMO.clear()
    _MEMO["key"] = None


def unit_key(config, unit: Unit, env: dict, schema_version: int) -> dict:
    """Everything that determines a unit's rows (hashed into its shard's name by :func:`bkn.probes.sweeps.run_key`):
    the unit, the names it writes rows for, its method's norm and options, the passes, the weights (seed and
    training recipe), the code and environment (commit, torch, device, threads) and the schema version."""
    data, network, state, name, mode, n, seed = unit
    wanted = set(methods.resolve(config.methods))
    method = methods.base(name)
    fields = {
        "unit": dict(data=data, network=network, state=state, method=name, mode=mode, group_size=n, seed=seed),
        "writes": [x for x in (name, name + methods.EMA) if x in wanted],
        "method": None if method is None else {"name": method.name, "norm": method.norm, **method.options},
        "passes": dataclasses.asdict(config.passes),
        "weights": {"seed": config.weights_seed, "training": setups.TRAINING, "own_group": setups.TRAIN_GROUP},
        "environment": {k: env.get(k) for k in ("commit", "torch", "device", "threads")},
        "schema": schema_version,
    }
    if method is not None and not method.uses_groups:
        fields["population_group"] = config.group_sizes[0]  # the template network's group (per-sample norms)
    return fields


def measure(payload: tuple, progress=None) -> tuple[list[dict], dict]:
    """``(rows, record)`` of one unit; ``progress`` (this process only) hears its stages."""
    config, unit, threads = payload
    data, network, state, name, mode, n, seed = unit
    _threads(threads)
    setup = f"{data}/{network}/{state}"
    record: dict = {"skipped": [], "training": [], "timings_s": {}}
    where = dict(data=data, network=network, state=state)
    key = dict(**where, mode=mode, group_size=n, seed=seed)
    method = methods.base(name)
    memo = _setup(config, data, network, state, record, progress)
    try:
        base, population = _method_weights(config, memo, where, name, method, record, progress)
    except ValueError as err:  # e.g. InstanceNorm on a 1x1 feature map
        record["skipped"].append({**key, "method": name, "reason": f"population statistics: {err}"})
        return [], record
    started = time.perf_counter()
    try:
        rows = _unit(config, memo["source"], network, base, name, method, n, seed, population, mode)
    except ValueError as err:  # e.g. BN with one value per channel and group
        record["skipped"].append({**key, "method": name, "reason": str(err)})
        rows = []
    record["timings_s"][f"{setup}/{name}/{mode}"] = time.perf_counter() - started
    return [{**key, **r} for r in rows], record


def _setup(config, data: str, network: str, state: str, record: dict, progress) -> dict:
    """This process's memo of the setup: source, shared weights and population statistics."""
    key = json.dumps([dataclasses.asdict(config), setups.TRAINING, data, network, state], default=str)
    if _MEMO["key"] == key:
        return _MEMO
    forget()
    source = setups.load_source(data, network)
    _MEMO.update(key=key, source=source, methods={}, shared=None, population=None)
    if state != setups.OWN:
        setup = f"{data}/{network}/{state}"
        _stage(progress, f"{setup}: weights")
        if state == "init":
            shared = setups.base_network(network, source, config.weights_seed)
        else:
            shared = _trained(config, source, network, None, record, progress)
        check_network(shared, network)
        _stage(progress, f"{setup}: population statistics")
        _MEMO["shared"] = shared
        _MEMO["population"] = _timed(record, f"{setup}/population", setups.population, source, shared, False)
    return _MEMO


def _method_weights(config, memo: dict, where: dict, name: str, method, record: dict, progress):
    """``(base network, population statistics)`` the unit of ``name`` measures with (memoized; errors too)."""
    own = where["state"] == setups.OWN
    if method is None or not (own or not method.uses_groups):
        return memo["shared"], memo["population"]
    if name not in memo["methods"]:
        setup, network = "/".join(where.values()), where["network"]
        try:
            base = memo["shared"]
            if own:
                _stage(progress, f"{setup}: {name}: weights")
                base = _trained(config, memo["source"], network, method, record, progress)
            # per-sample norms: their own statistics; trained-own: the method's own network
            _stage(progress, f"{setup}: {name}: population statistics")
            template = base if own else setups.method_network(network, base, method, config.group_sizes[0])
            per_sample = not method.uses_groups
            population = _timed(
                record, f"{setup}/population-{name}", setups.population, memo["source"], template, per_sample
            )
            memo["methods"][name] = (base, population)
        except ValueError as err:
            memo["methods"][name] = err
    found = memo["methods"][name]
    if isinstance(found, ValueError):
        raise found
    return found


def _trained(config, source, network: str, method, record: dict, progress):
    model, trained = setups.trained_network(network, source, config.weights_seed, config.cache, progress, method=method)
    record["training"].append({**trained, "key": [network, source.name, method.name if method else None]})
    return model


def _unit(config, source, network: str, base, name: str, method, n: int, seed: int, population, mode) -> list[dict]:
    passes = config.passes
    if method is None:
        return units.floor_unit(source, population, n, seed, passes)
    model = setups.method_network(network, base, method, n)
    if method.uses_groups:
        wanted = set(methods.resolve(config.methods))
        return units.batch_unit(model, name, source, population, n, seed, passes, wanted, mode)
    return units.per_sample_unit(model, name, source, population, n, seed, passes, mode)


def _timed(record: dict, key: str, fn, *args):
    started = time.perf_counter()
    try:
        return fn(*args)
    finally:
        record["timings_s"][key] = record["timings_s"].get(key, 0.0) + time.perf_counter() - started


def _stage(progress, text: str) -> None:
    if progress is not None:
        progress.stage(text)


def _threads(threads: int | None) -> None:
    """One-time preparation of a worker process: its torch threads and BKN's and BRN's compiled kernels."""
    import torch

    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if not _MEMO.get("kernels"):
        from bkn.layers import _native

        _native.load()
        _MEMO["kernels"] = True
