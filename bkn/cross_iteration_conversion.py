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
  ``UserWarning`` names every such layer and why; the conversion report lists them too.

:func:`prepare` does both on a model built with the norm already in place (the probes' own
networks); ``bkn.convert`` calls :func:`finish` after replacing the BatchNorms. Either attaches
a :class:`bkn.replacements.ConversionReport` (``bkn.conversion_report(model)``): each norm
(role ``"norm"``; a CBN layer's note is its wiring) and each centred convolution (role ``"conv"``);
its ``problems`` name the unwired CBN layers and the convolutions kept uncentred, and why.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import fx, nn

from .layers.cross_iteration import _CrossIterationBatchNorm
from .layers.mabn import CenteredConv1d, CenteredConv2d, CenteredConv3d, _MovingAverageBatchNorm
from .replacements import ConversionReport, attach

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


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[int]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return id(module) in self.leaves or super().is_leaf_module(module, qualified_name)


def _centre_convolutions(model: nn.Module, report: ConversionReport) -> None:
    for name, module in list(model.named_modules()):
        centred = _CENTERED.get(type(module))
        if centred is None:
            continue
        fan_in = module.weight[0].numel()
        if fan_in == 1:
            report.problems.append(
                f"convolution {name!r} kept as {type(module).__name__}: one weight per filter, centring would zero it"
            )
            continue
        module.__class__ = centred  # same parameters, buffers, hooks and state_dict keys
        report.add(name, "conv", _plain(centred), centred)


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
    centre the convolutions (mabn) or wire the CBN layers (cbn); attach the conversion report; warn for
    unwired CBN layers."""
    report, olds = ConversionReport(norm), dict(replaced)
    for name, layer in model.named_modules():  # in module order; norms built in place (prepare): as themselves
        if name in olds or isinstance(layer, (_CrossIterationBatchNorm, _MovingAverageBatchNorm)):
            report.add(name, "norm", olds.get(name, type(layer)), type(layer))
    if norm == "mabn":
        _centre_convolutions(model, report)
    unwired = dict(_wire(model)) if norm == "cbn" else {}
    for i, row in enumerate(report.replaced):  # a CBN layer's note: its wiring
        layer = model.get_submodule(row.module)
        if isinstance(layer, _CrossIterationBatchNorm):
            report.replaced[i] = dataclasses.replace(row, note=layer.wiring)
    report.problems += [f"cbn layer {name!r} not wired: {why}" for name, why in unwired.items()]
    if unwired:
        names = "; ".join(f"{name}: {why}" for name, why in unwired.items())
        warnings.warn(
            f"cbn: {len(unwired)} layer(s) could not be wired to the convolution feeding them and normalize "
            f"with their current group only (plain BN, no cross-iteration statistics): {names}",
            stacklevel=3,
        )
    return attach(model, report)


def prepare(model: nn.Module, norm: str) -> nn.Module:
    """A model built with ``norm`` in place (the probes' networks): centre its convolutions (mabn) or wire
    its CBN layers (cbn); other norms: unchanged. Returns ``model``."""
    if norm in NORMS:
        finish(model, norm)
    return model
