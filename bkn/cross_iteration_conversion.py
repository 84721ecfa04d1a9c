"""What ``bkn.convert`` (and the probes' own networks) do besides swapping the norm, for MABN and CBN.

docs/design.md §16. Both rivals need more than a norm in place of each BatchNorm:

* ``mabn``: MABN does not centre its input; the paper centres the convolutions' weights instead.
  Every ``torch.nn.Conv1d/2d/3d`` becomes a :class:`~bkn.layers.CenteredConv2d` (same class
  family, same weights and state_dict keys), except a convolution whose filters have a single
  weight (one input channel per group and a 1-wide kernel: centring would zero it), which is
  kept and listed with that reason. The BatchNorm's ``running_var + running_mean^2`` (its
  second moment, what MABN's ``running_var`` estimates) is carried over; the iteration count
  starts at 0, so that the warm-up and the burn-in run. Momentum is MABN's own (0.02).
* ``cbn``: each CBN layer is wired to the convolution that feeds it, read from the model's
  ``torch.fx`` graph (the norm's input must be a convolution module's output, with as many
  output channels as the norm has). A layer that cannot be wired (its input is a residual sum,
  a pooling, a concatenation, or the model does not trace) is plain BN on its group, and one
  ``UserWarning`` names every such layer and why; :func:`replacements` lists them too.

:func:`prepare` does both on a model built with the norm already in place (the probes' own
networks); ``bkn.convert`` calls :func:`finish` after replacing the BatchNorms. Either attaches
the listing that :func:`replacements` returns.
"""

from __future__ import annotations

import warnings

import torch
from torch import fx, nn

from .layers.cross_iteration import _CrossIterationBatchNorm
from .layers.mabn import CenteredConv1d, CenteredConv2d, CenteredConv3d, _MovingAverageBatchNorm

NORMS = ("mabn", "cbn")
_CENTERED = {nn.Conv1d: CenteredConv1d, nn.Conv2d: CenteredConv2d, nn.Conv3d: CenteredConv3d}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def layer_options(norm: str, options: dict) -> dict:
    """The options a converted layer gets before the BatchNorm's own (MABN keeps its momentum and
    always tracks its running variance)."""
    options = dict(options)
    if norm == "mabn":
        options.setdefault("momentum", 0.02)
        options.setdefault("track_running_stats", True)
    return options


def after_copy(bn: nn.Module, new: nn.Module) -> None:
    """Fix what the generic copy of a BatchNorm's state means for MABN (see the module docstring)."""
    if isinstance(new, _MovingAverageBatchNorm):
        with torch.no_grad():
            if getattr(bn, "running_mean", None) is not None:
                new.running_var.copy_(bn.running_var + bn.running_mean**2)
            new.running_mean.zero_()
            new.num_batches_tracked.zero_()


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _row(name: str, before: type, after: type, kind: str, note: str = "") -> dict:
    return {"module": name, "before": _qualname(before), "after": _qualname(after), "kind": kind, "note": note}


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[int]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return id(module) in self.leaves or super().is_leaf_module(module, qualified_name)


def _centre_convolutions(model: nn.Module) -> list[dict]:
    rows = []
    for name, module in list(model.named_modules()):
        centred = _CENTERED.get(type(module))
        if centred is None:
            continue
        fan_in = module.weight[0].numel()
        if fan_in == 1:
            kept = "kept: one weight per filter, centring would zero it"
            rows.append(_row(name, type(module), type(module), "conv", kept))
            continue
        module.__class__ = centred  # same parameters, buffers, hooks and state_dict keys
        rows.append(_row(name, _plain(centred), centred, "conv"))
    return rows


def _plain(centred: type) -> type:
    return next(base for base in centred.__mro__[1:] if base in _CONVS)


def _wire(model: nn.Module) -> list[tuple[str, str]]:
    """Wire every CBN layer of ``model`` to its convolution; return ``(layer, why)`` for the unwired ones."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _CrossIterationBatchNorm)}
    if not layers:
        return []
    try:
        graph = _Tracer({id(m) for m in layers.values()}).trace(model)
    except Exception as err:  # data-dependent control flow etc.
        why = f"torch.fx could not trace the model ({type(err).__name__}: {err})"
        for layer in layers.values():
            layer.wire(None, why)
        return [(name, why) for name in layers]
    modules = dict(model.named_modules())
    unwired, seen = [], set()
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in layers or node.target in seen:
            continue
        seen.add(node.target)
        layer, source = layers[node.target], node.args[0] if node.args else None
        conv = modules.get(source.target) if isinstance(source, fx.Node) and source.op == "call_module" else None
        if isinstance(conv, _CONVS) and conv.out_channels == layer.num_features:
            layer.wire(conv, f"wired to {source.target}")
            continue
        what = f"{type(conv).__name__}({source.target})" if conv is not None else _describe(source)
        why = f"its input is {what}, not a convolution with {layer.num_features} output channels"
        layer.wire(None, why)
        unwired.append((node.target, why))
    for name in layers.keys() - seen:
        why = "it is not called in the traced forward"
        layers[name].wire(None, why)
        unwired.append((name, why))
    return unwired


def _describe(source) -> str:
    if not isinstance(source, fx.Node):
        return repr(source)
    if source.op == "placeholder":
        return "the model input"
    return f"{getattr(source.target, '__name__', source.target)}"


def finish(model: nn.Module, norm: str, replaced: list[tuple[str, type]] = ()) -> nn.Module:
    """After ``bkn.convert`` replaced the BatchNorms ``replaced`` (``(name, old class)``) by ``norm``:
    centre the convolutions (mabn) or wire the CBN layers (cbn); attach the listing; warn for unwired
    CBN layers."""
    rows = [_row(name, old, type(model.get_submodule(name)), "norm") for name, old in replaced]
    if norm == "mabn":
        rows += _centre_convolutions(model)
    unwired = dict(_wire(model)) if norm == "cbn" else {}
    listed = {row["module"] for row in rows}
    for name, layer in model.named_modules():  # norms built in place (prepare): listed as themselves
        if isinstance(layer, (_CrossIterationBatchNorm, _MovingAverageBatchNorm)) and name not in listed:
            rows.append(_row(name, type(layer), type(layer), "norm"))
    for row in rows:
        layer = model.get_submodule(row["module"])
        if isinstance(layer, _CrossIterationBatchNorm):
            row["note"] = layer.wiring
    if unwired:
        names = "; ".join(f"{name}: {why}" for name, why in unwired.items())
        warnings.warn(
            f"cbn: {len(unwired)} layer(s) could not be wired to the convolution feeding them and normalize "
            f"with their current group only (plain BN, no cross-iteration statistics): {names}",
            stacklevel=3,
        )
    model._bkn_replacements = rows
    return model


def prepare(model: nn.Module, norm: str) -> nn.Module:
    """A model built with ``norm`` in place (the probes' networks): centre its convolutions (mabn) or wire
    its CBN layers (cbn); other norms: unchanged. Returns ``model``."""
    if norm in NORMS:
        finish(model, norm)
    return model


def replacements(model: nn.Module) -> list[dict]:
    """What the last conversion replaced: rows ``{module, before, after, kind, note}`` (``kind`` "norm" or
    "conv"; ``note``: a CBN layer's wiring, a convolution kept and why). ``ValueError`` for a model that was
    not converted to mabn or cbn."""
    rows = getattr(model, "_bkn_replacements", None)
    if rows is None:
        raise ValueError("replacements: the model was not converted to 'mabn' or 'cbn' (no listing attached)")
    return list(rows)


def summary(model: nn.Module) -> str:
    """:func:`replacements` as a printable table."""
    rows = replacements(model)
    short = [(r["module"], r["before"].rsplit(".", 1)[1], r["after"].rsplit(".", 1)[1], r["note"]) for r in rows]
    width = max((len(s[0]) for s in short), default=6)
    return "\n".join(f"{m:<{width}}  {b} -> {a}" + (f"  ({n})" if n else "") for m, b, a, n in short)
