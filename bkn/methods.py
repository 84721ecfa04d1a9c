"""The method registry: one table of named normalization methods, used by every part of the suite.

A *method* is a norm with its options, under one name that means the same thing in the
asv suites, the drift probe, the training probe and the report (its label, colour and
place in every legend). A variant is its own name: ``brn`` (fixed limits rmax = 3,
dmax = 5) and ``brn-scheduled`` (the paper's rmax/dmax schedule) never share a label.

    >>> from bkn import methods
    >>> methods.names()[:3]
    ('bn', 'bkn-official', 'bkn-official-adaptive')
    >>> m = methods.get("bkn-analytic")
    >>> layer = m.build(64, group_size=2)           # a BatchKalmanNorm2d, p = 0.9, analytic transition
    >>> model = m.convert(torchvision_model, group_size=2)  # every BatchNorm swapped, priors wired

:func:`bkn.norms.create` stays the low-level constructor (a norm name and explicit
options); this module names the combinations the suite measures. Importing it does not
import torch (the report reads labels and colours from here); building does.

Vocabulary: ``group_size`` is the number of samples a norm computes its statistics over
(ghost batches inside a larger batch, docs/design.md §3); ``batch_size`` is what one step sees.
Per-sample norms (GN, LN, IN) have no groups: they accept ``group_size`` and ignore it,
since it cannot change what they compute. ``syncbn`` has no groups either: it normalizes
with the moments of every worker's batch in its process group (one worker: plain BN).
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Mapping

# Which norms are grouped and which batch-dependent: kept in bkn.norm_kinds (torch-free, below both
# this module and bkn.norms), re-exported here where they always were.
from .norm_kinds import BATCH_DEPENDENT_NORMS, CONVERTED_NORMS, GROUPED_NORMS


@dataclasses.dataclass(frozen=True)
class Method:
    """A named normalization method: the norm it builds, its options and how reports show it."""

    name: str
    norm: str  # a bkn.norms name
    options: Mapping[str, Any]
    label: str  # legends and table headers
    colour: str  # one colour per method in every plot (hex)
    about: str  # one sentence for docs and the report
    scheduled: bool = False  # BRN's rmax/dmax schedule (see layer_options)
    burnin_share: float | None = None  # CBN: burn-in as a share of the run's steps (see layer_options)
    tags: frozenset = frozenset()  # the subsets it belongs to (TAGS; names(tag=...))

    @property
    def uses_groups(self) -> bool:
        """Whether the method computes its statistics per normalization group (takes ``group_size``)."""
        return self.norm in GROUPED_NORMS

    @property
    def batch_dependent(self) -> bool:
        """Whether a sample's output depends on the other samples (grouped norms and SyncBN)."""
        return self.norm in BATCH_DEPENDENT_NORMS

    @property
    def converts(self) -> bool:
        """Whether a network gets this method only through :meth:`convert` (it also swaps convolutions or absorbs
        activations): builders make the network with BatchNorm, then convert it (:meth:`network`)."""
        return self.norm in CONVERTED_NORMS

    def network(self, builder, group_size: int | None = None, *, total_steps=None):
        """``builder(norm, **options)`` (a network constructor taking a bkn.norms name) with this method:
        built with it, or, for a method that :attr:`converts`, built with torch's BN and converted."""
        if self.converts:
            return self.convert(builder("bn"), group_size, total_steps=total_steps)
        return builder(self.norm, **self.layer_options(group_size, total_steps))

    def layer_options(self, group_size: int | None = None, total_steps: int | None = None) -> dict:
        """The keyword options of :func:`bkn.norms.create` for this method.

        ``group_size``: statistics per group of that many samples (ignored by per-sample
        norms). ``total_steps``: for a scheduled method, the length of the training run the
        paper's schedule is scaled to (BN for the first 1/8 of the steps, limits fully
        relaxed at the end); without it the paper's own step counts (5k, 25k, 40k) apply.
        For a method with a ``burnin_share`` (CBN) it sets the burn-in to that share of
        ``total_steps``; without it the layer's own (no burn-in).
        """
        options = dict(self.options)
        if self.uses_groups and group_size is not None:
            if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
                raise ValueError(f"method {self.name!r}: group_size must be a positive int or None, got {group_size!r}")
            options["group_size"] = group_size
        if self.scheduled:
            from .layers.renorm import RenormSchedule

            schedule = RenormSchedule()
            options["schedule"] = schedule.scaled(total_steps) if total_steps is not None else schedule
        if self.burnin_share is not None and total_steps is not None:
            options["burnin"] = round(self.burnin_share * total_steps)
        return options

    def build(
        self, num_features: int, group_size: int | None = None, *, spatial_dims: int = 2, total_steps=None, **overrides
    ):
        """One layer for ``num_features`` channels (``spatial_dims``: 0 for (N, C) ... 3 for video)."""
        from . import norms

        options = {**self.layer_options(group_size, total_steps), **overrides}
        return norms.create(self.norm, num_features, spatial_dims=spatial_dims, **options)

    def convert(self, model, group_size: int | None = None, *, total_steps=None, **overrides):
        """``model`` with every BatchNorm replaced by this method (in place; see :func:`bkn.convert`)."""
        from .conversion import convert

        options = {**self.layer_options(group_size, total_steps), **overrides}
        return convert(model, self.norm, **options)


# The named subsets of the registry: each part of the suite asks for its methods by tag
# (:func:`names`), in registry order, instead of keeping its own list of names.
TAGS = {
    "core": "BN and BKN with either transition at the paper's gain: the layer and block cost (suites.chain_cost)",
    "quick": "the training probe's CI run (--quick)",
    "speed": "the speed comparisons' methods: the demo's network table, suites.chain_cost's default",
    "matrix": "the asv layer and network benchmarks' method parameter (suites.harness.matrix)",
    "distributed": "the asv DDP step benchmark's methods (suites.harness.ddp)",
    "training": "the training probe's default methods (not syncbn: it needs --world-size; not in; no ablations)",
    "headline": "the drift probe's headline tables and figures (bias vs noise, real data)",
    "rival": "the methods published since 2018 for small batches (GN+WS, FRN, EvoNorm, MABN, CBN; docs/design.md §15, "
    "§16); timed by the asv suites and the report, left out of the regression gate's tracking subset (suites.tracking)",
    "drift": "the drift probe's default run (each costs it a training run per seed; the rest: --full or --methods)",
}


def _method(name, norm, label, colour, about, options=None, tags=(), **kw) -> Method:
    unknown = set(tags) - set(TAGS)
    if unknown:
        raise ValueError(f"method {name!r}: unknown tags {sorted(unknown)}; known tags: {', '.join(TAGS)}")
    return Method(name, norm, MappingProxyType(dict(options or {})), label, colour, about, tags=frozenset(tags), **kw)


# The order here is the order of every legend and table. Colours: matplotlib's tab10, then Dark2, then tab20b.
_TABLE = (
    _method(
        "bn",
        "bn",
        "BN",
        "#1f77b4",
        "BatchNorm: the group's batch statistics (torch's BatchNorm2d when one group)",
        tags=("core", "quick", "speed", "matrix", "distributed", "training", "headline", "drift"),
    ),
    _method(
        "bkn-official",
        "bkn",
        "BKN official",
        "#ff7f0e",
        "BKN, Monte-Carlo transition, fixed gain p = 0.9 (the authors' code)",
        {"p": 0.9, "gain": "fixed", "transition": "official"},
        tags=("core", "quick", "speed", "matrix", "distributed", "training", "headline", "drift"),
    ),
    _method(
        "bkn-official-adaptive",
        "bkn",
        "BKN official, adaptive gain",
        "#2ca02c",
        "BKN, Monte-Carlo transition, adaptive per-channel gain (this project's extension)",
        {"gain": "adaptive", "transition": "official"},
        tags=("training", "headline"),
    ),
    _method(
        "bkn-official-affine",
        "bkn",
        "BKN official, affine surrogate",
        "#d95f02",
        "Ablation of BKN official: the surrogate is drawn from the previous layer's output "
        "gamma * z * sqrt(v / (v + eps)) + beta (as the analytic transition) instead of z * sqrt(v) + m",
        {"p": 0.9, "gain": "fixed", "transition": "official-affine"},
    ),
    _method(
        "bkn-official-relu-shortcut",
        "bkn",
        "BKN official, ReLU shortcut",
        "#e6ab02",
        "Ablation of BKN official: the CIFAR ResNet's first shortcut adds the statistics of relu(norm0) "
        "instead of norm0's pre-normalization posterior (same as official in converted models)",
        {"p": 0.9, "gain": "fixed", "transition": "official-relu-shortcut"},
    ),
    _method(
        "bkn-analytic",
        "bkn",
        "BKN analytic",
        "#d62728",
        "BKN, closed-form transition, fixed gain p = 0.9",
        {"p": 0.9, "gain": "fixed", "transition": "analytic"},
        tags=("core", "quick", "speed", "matrix", "distributed", "training", "headline", "drift"),
    ),
    _method(
        "bkn-analytic-adaptive",
        "bkn",
        "BKN analytic, adaptive gain",
        "#9467bd",
        "BKN, closed-form transition, adaptive per-channel gain (this project's extension)",
        {"gain": "adaptive", "transition": "analytic"},
        tags=("training", "headline"),
    ),
    _method(
        "brn",
        "brn",
        "BRN (rmax 3, dmax 5)",
        "#8c564b",
        "Batch Renormalization with fixed limits rmax = 3, dmax = 5 (the paper's final values)",
        {"rmax": 3.0, "dmax": 5.0},
        tags=("speed", "matrix", "training", "headline", "drift"),
    ),
    _method(
        "brn-scheduled",
        "brn",
        "BRN, scheduled limits",
        "#e377c2",
        "Batch Renormalization with the paper's schedule: BN first, then rmax -> 3, dmax -> 5",
        scheduled=True,
        tags=("training",),
    ),
    _method(
        "syncbn",
        "syncbn",
        "SyncBN",
        "#1b9e77",
        "BatchNorm with statistics pooled over the workers of a torch.distributed process group "
        "(torch.nn.SyncBatchNorm on CUDA, gloo collectives on the CPU; plain BN with one worker)",
        tags=("distributed",),
    ),
    _method(
        "gn",
        "gn",
        "GN",
        "#7f7f7f",
        "GroupNorm: 32 groups, fewer when C is small, never fewer than 4 channels per group (C = 32: 8 groups)",
        tags=("quick", "speed", "matrix", "training", "drift"),
    ),
    _method(
        "ln",
        "ln",
        "LN",
        "#bcbd22",
        "LayerNorm: GroupNorm(1, C) on conv features, LayerNorm on (N, C)",
        tags=("matrix", "training"),
    ),
    _method("in", "in", "IN", "#17becf", "InstanceNorm with affine parameters", tags=("matrix",)),
    # The micro-batch rivals from timm's layers (bkn.rivals, docs/design.md §15); networks get them by bkn.convert.
    # matrix + training: the step cost and accuracy the comparison needs. Only evonorm-b0 has batch statistics, so
    # only it joins the drift probe's default run (the per-sample ones would each cost it a training run per seed
    # for an output discrepancy only: --full or --methods). Not speed/core: those are BN vs BKN comparisons.
    _method(
        "gn-ws",
        "gn-ws",
        "GN+WS",
        "#637939",
        "GroupNorm (GN's group rule) with Weight Standardization on every convolution (timm's StdConv2d; BiT)",
        tags=("matrix", "training", "rival"),
    ),
    _method(
        "frn",
        "frn",
        "FRN+TLU",
        "#7b4173",
        "Filter Response Normalization: x / rms over positions, affine, then TLU max(y, tau) in place of the ReLU "
        "after it (timm's FilterResponseNormTlu2d; no TLU where no ReLU follows)",
        tags=("matrix", "training", "rival"),
    ),
    _method(
        "evonorm-b0",
        "evonorm-b0",
        "EvoNorm-B0",
        "#393b79",
        "EvoNorm-B0: x / max(sqrt(group batch var + eps), v * x + instance std), affine, in place of norm -> ReLU "
        "(timm's EvoNorm2dB0, batch variance per group of group_size)",
        tags=("matrix", "training", "drift", "rival"),
    ),
    _method(
        "evonorm-s0",
        "evonorm-s0",
        "EvoNorm-S0",
        "#843c39",
        "EvoNorm-S0: x * sigmoid(v * x) / group std, affine, in place of norm -> ReLU (timm's EvoNorm2dS0, per sample)",
        tags=("matrix", "training", "rival"),
    ),
    # The cross-iteration rivals (docs/design.md §16): the authors' defaults, said in the about.
    _method(
        "mabn",
        "mabn",
        "MABN",
        "#e7ba52",
        "Moving Average BN (Yan et al. 2020): no centring, E[x^2] and the backward's E[g z] averaged over the last "
        "32 / group_size iterations (the authors' real_B / B with real_B = 32), warm-up 100 iterations, renorm "
        "factor 1 for 1000 iterations then clipped to [1/5, 5], momentum 0.98 (theirs); convolutions centre "
        "their weights",
        {"real_batch_size": 32, "warmup_iters": 100},
        tags=("matrix", "training", "rival"),
    ),
    _method(
        "cbn",
        "cbn",
        "CBN",
        "#ad494a",
        "Cross-Iteration BN (Yao et al. 2021): the group's mean and E[x^2] averaged with those of the last 3 "
        "iterations (the authors' buffer_num), compensated to the current weights of the convolution feeding "
        "it by a Taylor step; burn-in the first 2/3 of the run (the authors' 8 of 12 epochs)",
        {"window": 3},
        burnin_share=8 / 12,
        tags=("matrix", "training", "rival"),
    ),
)
_METHODS: dict[str, Method] = {m.name: m for m in _TABLE}

# Result rows that are not registry methods but sit beside them in the same plots.
EMA_SUFFIX = "-ema"  # "<method>-ema": the running (EMA) estimates that method keeps for inference
FLOOR = "floor"  # the synthetic chain's best achievable estimate (the drift probe's reference)
REFERENCES = {FLOOR: ("floor (best estimate)", "#000000")}


def names(tag: str | None = None) -> tuple[str, ...]:
    """Every method name, or those tagged ``tag`` (see :data:`TAGS`), in the registry's (legend) order;
    ``ValueError`` listing the known tags for an unknown one."""
    if tag is None:
        return tuple(_METHODS)
    if tag not in TAGS:
        raise ValueError(f"unknown method tag {tag!r}; known tags: {', '.join(TAGS)}")
    return tuple(m.name for m in _TABLE if tag in m.tags)


def get(name: str) -> Method:
    """The method called ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(_METHODS)}") from None


def resolve(requested) -> list[Method]:
    """Methods by name, in the registry's order, without duplicates (``ValueError`` for unknown or none)."""
    requested = list(requested)
    for name in requested:
        get(name)
    if not requested:
        raise ValueError(f"no methods given; known methods: {', '.join(_METHODS)}")
    return [m for m in _TABLE if m.name in set(requested)]


def _base(name: str) -> tuple[str, bool]:
    """``("bn", True)`` for ``"bn-ema"``; ``(name, False)`` otherwise."""
    if name.endswith(EMA_SUFFIX) and name[: -len(EMA_SUFFIX)] in _METHODS:
        return name[: -len(EMA_SUFFIX)], True
    return name, False


def label(name: str) -> str:
    """How a result's ``method`` value is shown: the registry label, ``... (running estimates)``, or itself."""
    base, ema = _base(name)
    if base in _METHODS:
        return _METHODS[base].label + (" (running estimates)" if ema else "")
    if name in REFERENCES:
        return REFERENCES[name][0]
    return name


def colour(name: str) -> str | None:
    """The method's colour (``<m>-ema`` shares its method's); ``None`` for a name the registry lacks."""
    base, _ = _base(name)
    if base in _METHODS:
        return _METHODS[base].colour
    if name in REFERENCES:
        return REFERENCES[name][1]
    return None


def order(result_names) -> list[str]:
    """Distinct result ``method`` values in legend order: registry order (each ``-ema`` after its
    method), then the references, then unknown names alphabetically."""
    position = {n: i for i, n in enumerate(_METHODS)}

    def key(name: str):
        base, ema = _base(name)
        if base in position:
            return (0, position[base], ema, name)
        if name in REFERENCES:
            return (1, list(REFERENCES).index(name), False, name)
        return (2, 0, False, name)

    return sorted(set(result_names), key=key)
