"""The methods the accuracy probe measures, by the names used in its results.

Every batch-statistic method (``bn``, the four BKN variants, ``brn``) is built with
``group_size = n``, the normalization batch size, so that its statistics come from
groups of ``n`` samples inside one larger batch (spec 1.3). ``bn`` with a group size
is ghost-batch BN, which for one group is ``torch.nn.BatchNorm2d`` bit for bit, and
which records the statistics it normalized with (``last_stats``).

* ``bkn-official``: the authors' construction - Monte-Carlo transition, fixed gain
  ``p = 0.9`` (the official scripts' value for micro-batches; kept at every group size:
  a fixed gain is what this variant is).
* ``bkn-analytic``: the closed-form transition, same fixed gain.
* ``bkn-*-adaptive``: the per-channel Kalman gain (this project's extension, not the
  paper's; see :mod:`bkn.layers.gain`).
* ``brn``: Batch Renormalization with the paper's final, relaxed limits ``rmax = 3,
  dmax = 5`` (before the relaxation BRN is BN); its effective statistics depend on its
  moving averages, which the probe warms up at the same group size first.
* ``gn``, ``ln``, ``in``: per-sample norms; only their output discrepancy is defined.
* ``<method>-ema``: the running (EMA, momentum 0.1) estimates that method keeps for
  inference, after the probe's training-mode passes at the group size.
* ``floor``: the synthetic chain's best achievable estimate (see :mod:`bkn.stats.synthetic`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("batch", "per_sample", "ema", "floor")


@dataclass(frozen=True)
class Method:
    name: str
    kind: str
    norm: str | None = None
    options: dict = field(default_factory=dict)
    base: str | None = None  # for "ema": the method whose running estimates these are
    about: str = ""

    @property
    def uses_groups(self) -> bool:
        return self.kind == "batch"


_BATCH = [
    Method("bn", "batch", "bn", {}, about="BatchNorm: the group's batch statistics"),
    Method("bkn-official", "batch", "bkn", {"p": 0.9, "gain": "fixed", "transition": "official"},
           about="BKN posterior, Monte-Carlo transition, fixed p=0.9 (the authors' code)"),
    Method("bkn-official-adaptive", "batch", "bkn", {"gain": "adaptive", "transition": "official"},
           about="BKN posterior, Monte-Carlo transition, adaptive gain (project extension)"),
    Method("bkn-analytic", "batch", "bkn", {"p": 0.9, "gain": "fixed", "transition": "analytic"},
           about="BKN posterior, closed-form transition, fixed p=0.9"),
    Method("bkn-analytic-adaptive", "batch", "bkn", {"gain": "adaptive", "transition": "analytic"},
           about="BKN posterior, closed-form transition, adaptive gain (project extension)"),
    Method("brn", "batch", "brn", {"rmax": 3.0, "dmax": 5.0},
           about="Batch Renormalization effective statistics, rmax=3, dmax=5"),
]
_PER_SAMPLE = [
    Method("gn", "per_sample", "gn", about="GroupNorm (output discrepancy only)"),
    Method("ln", "per_sample", "ln", about="LayerNorm = GroupNorm(1, C) (output discrepancy only)"),
    Method("in", "per_sample", "in", about="InstanceNorm (output discrepancy only)"),
]
_EMA = [Method(f"{m.name}-ema", "ema", m.norm, m.options, base=m.name,
               about=f"running (EMA) estimates of {m.name}") for m in _BATCH]
_FLOOR = [Method("floor", "floor", about="best achievable estimate from the group (synthetic chain only)")]

METHODS: dict[str, Method] = {m.name: m for m in _BATCH + _PER_SAMPLE + _EMA + _FLOOR}

DEFAULT_METHODS = tuple(name for name in METHODS if name != "in")  # IN: --full or --methods
FULL_METHODS = tuple(METHODS)


def resolve(names) -> list[Method]:
    """Methods by name, in the registry's order, without duplicates; ``ValueError`` for an unknown name."""
    names = list(names)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; "
                         f"known methods: {', '.join(METHODS)}")
    if not names:
        raise ValueError(f"no methods given; known methods: {', '.join(METHODS)}")
    wanted = set(names)
    return [m for name, m in METHODS.items() if name in wanted]


def batch_method(name: str) -> Method:
    """The batch-statistic method behind ``name`` (itself, or the method an ``-ema`` name refers to)."""
    m = METHODS[name]
    return METHODS[m.base] if m.kind == "ema" else m
