"""``bkn.convert``: swap every BatchNorm of a model for another norm, keeping its state.

Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: modules are replaced in
place (the model's class and module names stay, so state_dicts keep their keys),
and weights, running buffers, ``eps``, ``momentum``, device, dtype and training
flags carry over. For ``"bkn"`` the model is traced with ``torch.fx`` and each BKN
layer's prior is wired from the normalization layers feeding it (see
:mod:`bkn.chain`); ``bkn.prior_summary(model)`` prints which layer got which prior, as
planned and as it happened in the last training forward.

Norm types are matched exactly: ``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and subclasses
that keep their forward. A subclass that overrides ``forward`` computes something else,
so it is either converted into an equivalent - timm's norm-activation layers
(``BatchNormAct2d``, ``SyncBatchNormAct``: the norm, then ``self.drop``, then
``self.act``) become the new norm with the same ``drop`` and ``act`` applied after it
(a forward hook; state_dict keys unchanged), as timm's own ``convert_sync_batchnorm``
does - or rejected with a ``TypeError`` naming the class, before anything is replaced.
Other normalization layers (``GroupNorm``, timm's ``GroupNormAct``, EvoNorm...) are left
untouched. The rivals ``gn-ws``, ``frn``, ``evonorm-b0`` and ``evonorm-s0`` also swap convolutions
or absorb the activation after a norm: :mod:`bkn.rivals.conversion`. Every conversion attaches a
:class:`bkn.replacements.ConversionReport` (``bkn.conversion_report(model)``): which module
became which class (for BKN, each layer's planned prior as the note) and what could not be done.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from . import cross_iteration_conversion, norms
from .chain import PriorChain, format_report
from .layers import SyncBatchNorm
from .norm_kinds import RIVAL_NORMS
from .replacements import ConversionReport, attach

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_CHAIN_OPTIONS = ("fallback", "surrogate_scale", "chain")
# Forwards that compute plain batch normalization (a subclass keeping one of them is converted as its base).
_PLAIN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward, SyncBatchNorm.forward)
# Subclasses whose forward is: the norm, then self.drop, then self.act (timm's norm-activation layers).
_NORM_ACT = {
    f"{package}.norm_act.{name}"
    for package in ("timm.layers", "timm.models.layers")
    for name in ("BatchNormAct2d", "SyncBatchNormAct")
}


def _norm_kind(module: nn.Module) -> str | None:
    """``"plain"``, ``"norm-act"``, or None for a module that is no BatchNorm.

    ``TypeError`` naming the class for a BatchNorm subclass whose own forward can't be reproduced.
    """
    if not isinstance(module, _BATCH_NORMS):
        return None
    cls = type(module)
    if cls.forward in _PLAIN_FORWARDS:
        return "plain"
    qualname = f"{cls.__module__}.{cls.__qualname__}"
    if qualname in _NORM_ACT:
        return "norm-act"
    base = next(b for b in cls.__mro__ if b in _BATCH_NORMS)
    raise TypeError(
        f"bkn.convert: {qualname} subclasses torch.nn.{base.__name__} but overrides forward, so replacing it by "
        f"a plain norm would drop whatever its forward adds; convert can reproduce plain BatchNorm subclasses and "
        f"the norm-activation layers {', '.join(sorted(n.rsplit('.', 1)[1] for n in _NORM_ACT))} (norm, then "
        f"self.drop, then self.act). Replace {cls.__name__} by a torch.nn BatchNorm (plus its extra ops) first"
    )


class _ThenDropAndAct:
    """Forward hook of a converted norm-activation layer: its output through ``drop`` then ``act``, as
    timm's ``BatchNormAct2d.forward`` does after normalizing."""

    def __call__(self, module, args, output):
        return module.act(module.drop(output))


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping the norms about to be replaced as leaves (timm's norm-activation layers
    would otherwise be traced into: the chain must see each norm as one call)."""

    def __init__(self, leaves: set[int]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return id(module) in self.leaves or super().is_leaf_module(module, qualified_name)


def _spatial_dims(bn: nn.Module) -> int:
    if isinstance(bn, nn.BatchNorm3d):
        return 3
    if isinstance(bn, nn.BatchNorm1d):
        return 1
    return 2  # BatchNorm2d, and SyncBatchNorm (whose rank is only known at run time)


def _replacement(bn: nn.Module, norm: str, options: dict) -> nn.Module:
    options = dict(options)
    if norm in cross_iteration_conversion.NORMS:  # MABN keeps its own momentum
        options = cross_iteration_conversion.layer_options(norm, options)
    if norms.batch_dependent(norm) or norm == "in":
        options.setdefault("eps", bn.eps)
    if norms.batch_dependent(norm):
        options.setdefault("momentum", bn.momentum)
        options.setdefault("affine", bn.affine)
        options.setdefault("track_running_stats", bn.track_running_stats)
    elif norm in ("gn", "ln"):
        options.setdefault("eps", bn.eps)
        options.setdefault("affine", bn.affine)
    new = norms.create(norm, bn.num_features, spatial_dims=_spatial_dims(bn), **options)
    ref = bn.weight if bn.weight is not None else bn.running_mean
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        if bn.affine and getattr(new, "weight", None) is not None and new.weight.shape == bn.weight.shape:
            new.weight.copy_(bn.weight)
            new.bias.copy_(bn.bias)
        if bn.track_running_stats and getattr(new, "running_mean", None) is not None:
            new.running_mean.copy_(bn.running_mean)
            new.running_var.copy_(bn.running_var)
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
            if hasattr(new, "sync_running_std"):  # Batch Renormalization keeps a moving std too
                new.sync_running_std()
        if bn.affine and getattr(new, "weight", None) is not None:
            new.weight.requires_grad_(bn.weight.requires_grad)
    cross_iteration_conversion.after_copy(bn, new)  # MABN: the second moment, a fresh iteration count
    new.train(bn.training)
    if _norm_kind(bn) == "norm-act":
        new.drop, new.act = bn.drop, bn.act  # same modules, same state_dict keys (drop.*, act.*)
        new._bkn_post = ("drop", "act")  # read by the chain: the state goes through them too
        new.register_forward_hook(_ThenDropAndAct())
    return new


def convert(model: nn.Module, norm: str, **options) -> nn.Module:
    """Replace every BatchNorm in ``model`` by norm ``norm`` (a name of :func:`bkn.norms.names`).

    ``options`` go to :func:`bkn.norms.create` (e.g. ``p=0.9, transition="official",
    group_size=2`` for BKN), except the chain options for ``"bkn"``:
    ``fallback`` (``"none"`` or ``"identity"``: what a layer whose path can't be
    modelled gets), ``surrogate_scale`` (official transitions: draw the surrogate with each
    spatial side scaled by it, fewer positions at a known noise cost, see
    :class:`bkn.transitions.MonteCarlo`; default 1, the authors' construction) and ``chain``
    (``False``: BKN layers without priors). ``draws`` (Monte-Carlo draws per group of the
    ``official*`` transitions) is a layer option that the chain reads too.
    Returns the converted model (the same object unless ``model`` itself is a BatchNorm).
    ``TypeError`` (before anything changes) for a BatchNorm subclass whose forward can't be reproduced.
    """
    norms.create(norm, 4, **{k: v for k, v in options.items() if k not in _CHAIN_OPTIONS})  # validate early
    layer_options = {k: v for k, v in options.items() if k not in _CHAIN_OPTIONS}
    if norm in RIVAL_NORMS:  # GN+WS, FRN, EvoNorm: they swap convolutions or absorb activations (docs/design.md §16)
        from .rivals import conversion as rivals

        return rivals.convert(
            model, norm, layer_options, norm_kind=_norm_kind, tracer_cls=_Tracer, replace=_replacement
        )
    if _norm_kind(model) is not None:  # a lone BatchNorm
        new = _replacement(model, norm, layer_options)
        report = ConversionReport(norm)
        report.add("", "norm", type(model), type(new), "no prior chain: a lone layer" if norm == "bkn" else "")
        return attach(new, report)
    targets = [name for name, m in model.named_modules() if _norm_kind(m) is not None]
    graph = None
    if norm == "bkn" and options.get("chain", True):
        try:
            graph = _Tracer({id(model.get_submodule(name)) for name in targets}).trace(model)
        except Exception as err:  # data-dependent control flow etc.: no chain, say why
            model._bkn_chain_error = f"torch.fx could not trace the model ({type(err).__name__}: {err})"
    replaced = [(name, type(model.get_submodule(name))) for name in targets]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _replacement(getattr(parent, child), norm, layer_options))
    if graph is not None:
        chain = PriorChain(
            model,
            graph,
            transition=options.get("transition", "official"),
            fallback=options.get("fallback", "none"),
            draws=options.get("draws", 1),
            surrogate_scale=options.get("surrogate_scale", 1.0),
        )
        chain.attach(model)
        model._bkn_chain = chain
    if norm in cross_iteration_conversion.NORMS:  # centred convolutions (mabn), wiring (cbn): docs/design.md §16
        return cross_iteration_conversion.finish(model, norm, replaced)
    return attach(model, _plain_report(model, norm, replaced, options))


def _plain_report(model: nn.Module, norm: str, replaced: list[tuple[str, type]], options: dict) -> ConversionReport:
    """Each BatchNorm and its new class; a BKN layer's note is its prior's plan (or why there is no chain)."""
    notes = {}
    if norm == "bkn":
        chain = getattr(model, "_bkn_chain", None)
        if chain is not None:
            notes = {row["layer"]: row["plan"] for row in chain.report()}
        else:
            why = "chain=False" if not options.get("chain", True) else model._bkn_chain_error
            notes = {name: f"no prior chain: {why}" for name, _ in replaced}
    report = ConversionReport(norm)
    for name, old in replaced:
        report.add(name, "norm", old, type(model.get_submodule(name)), notes.get(name, ""))
    return report


def _report(model: nn.Module) -> tuple[list[dict] | None, str]:
    """The model's prior report (its chain's, or its own for a model that wires its priors itself, as
    :class:`bkn.models.CifarResNet` does), or None and why there is none."""
    chain = getattr(model, "_bkn_chain", None)
    if chain is not None:
        return chain.report(), ""
    own = model.prior_report() if callable(getattr(model, "prior_report", None)) else None
    if own is not None:
        return own, ""
    why = getattr(model, "_bkn_chain_error", "the model was not converted to 'bkn' with a chain")
    return None, f"no prior chain: {why}"


def prior_summary(model: nn.Module) -> str:
    """A printable table: for each BKN layer, where its prior comes from, through which ops, what the
    plan says (``prior (<transition>)`` or ``no prior: <reason>``) and what happened in the last
    training forward (``prior used``, or ``no prior: <reason>``, or that it did not run)."""
    report, why = _report(model)
    return why if report is None else format_report(report)


def prior_report(model: nn.Module) -> list[dict]:
    """The rows of :func:`prior_summary` as dicts (``layer``, ``sources``, ``path``, ``plan``, ``last``);
    ``ValueError`` saying why for a model without a prior chain."""
    report, why = _report(model)
    if report is None:
        raise ValueError(f"prior_report: {why}")
    return report
