"""What the drift probe measures: the registry's methods, and two estimators derived from them.

A result's ``method`` value is one of

* a :mod:`bkn.methods` name, with that method's options (``brn`` is rmax = 3, dmax = 5).
  Every method with batch statistics is built with ``group_size = n``, so its statistics
  come from groups of ``n`` samples inside one larger batch (docs/design.md §3); ``bn`` with one
  group is ``torch.nn.BatchNorm2d`` bit for bit. Per-sample norms (``gn``, ``ln``, ``in``)
  have only the output discrepancy defined;
* ``<method>-ema`` (a method with batch statistics): the running (EMA) estimates that
  method keeps for inference, after the probe's training-mode passes at the group size;
* ``floor``: the synthetic chain's best achievable estimate (see :mod:`bkn.probes.stats.synthetic`).

``brn-scheduled`` is measured only when named in ``--methods``: the probe runs a few
dozen forwards per unit, and the paper's schedule keeps BRN equal to BN for its first
5000 steps, so by default its rows would repeat ``bn``'s.
"""

from __future__ import annotations

from bkn import methods as registry

EMA = registry.EMA_SUFFIX
FLOOR = registry.FLOOR
ON_REQUEST = ("brn-scheduled", "brn-scheduled" + EMA)  # not in the default or --full lists (see above)

# The unit kinds: one network run measures a batch method and its "-ema" twin together.
BATCH, PER_SAMPLE, FLOOR_KIND = "batch", "per_sample", "floor"


# Methods the probe cannot measure: it runs in one process, where SyncBN is plain BN (measure ``bn``).
MULTI_PROCESS = tuple(m.name for m in registry.resolve(registry.names()) if m.batch_dependent and not m.uses_groups)


def names() -> tuple[str, ...]:
    """Every name the probe measures, in legend order: registry methods, their ``-ema`` twins, ``floor``."""
    batch = [m.name for m in registry.resolve(registry.names()) if m.uses_groups]
    single = tuple(n for n in registry.names() if n not in MULTI_PROCESS)
    return single + tuple(name + EMA for name in batch) + (FLOOR,)


# Ablations of BKN's official transition ("official-*" transitions, bkn.transitions): --full or --methods.
ABLATIONS = tuple(
    name
    for method in registry.resolve(registry.names())
    if str(method.options.get("transition", "")).startswith("official-")
    for name in (method.name, method.name + EMA)
)
FULL_METHODS = tuple(name for name in names() if name not in ON_REQUEST)
# The default run's methods: those tagged "drift" in the registry (BN, BKN with each transition at a fixed gain,
# BRN, GN), their running estimates, and the floor. The others (the adaptive gains, LN, IN, the ablations): --full or
# --methods; each method costs the default run a training run, its population statistics and 32 units.
DEFAULT_METHODS = tuple(
    name for name in FULL_METHODS if name.removesuffix(EMA) in registry.names(tag="drift") or name == FLOOR
)


def base(name: str) -> registry.Method | None:
    """The registry method whose network measures ``name`` (itself, or the method of ``<m>-ema``; None for
    ``floor``); ``ValueError`` naming the known names for anything else."""
    if name == FLOOR:
        return None
    if name.endswith(EMA) and name[: -len(EMA)] in registry.names():
        method = registry.get(name[: -len(EMA)])
        if not method.uses_groups:
            raise ValueError(
                f"{name!r}: {method.name} keeps no running estimates (it normalizes each sample "
                f"with its own statistics); '-ema' names exist for methods with batch statistics"
            )
        return method
    if name in MULTI_PROCESS:
        raise ValueError(
            f"{name!r} pools its statistics over the workers of a process group; the drift probe runs in "
            f"one process, where it is plain BN (measure 'bn'); the training probe's --world-size compares it"
        )
    try:
        return registry.get(name)
    except ValueError as err:
        raise ValueError(
            f"{err}; the drift probe also measures '<method>{EMA}' (the running estimates of a method with "
            f"batch statistics) and '{FLOOR}' (synthetic chain)"
        ) from None


def kind(name: str) -> str:
    """``"batch"`` for a method with batch statistics or its ``-ema`` twin, ``"per_sample"``, ``"floor"``."""
    method = base(name)
    if method is None:
        return FLOOR_KIND
    return BATCH if method.uses_groups else PER_SAMPLE


def resolve(requested) -> list[str]:
    """The requested names in legend order, without duplicates; ``ValueError`` for an unknown name or none."""
    requested = list(requested)
    for name in requested:
        base(name)
    if not requested:
        raise ValueError(f"no methods given; known methods: {', '.join(names())}")
    return [name for name in names() if name in set(requested)]
