"""``bkn.convert(model, "gn-ws" | "frn" | "evonorm-b0" | "evonorm-s0")``: the rivals in any network.

* ``gn-ws``: every BatchNorm becomes GroupNorm (as ``"gn"``) and every ``nn.Conv2d`` timm's
  ``StdConv2d`` (``nn.Conv1d``: :class:`bkn.rivals.layers.StdConv1d`), keeping the weight and bias
  Parameters themselves (an optimizer built before still holds them).
* ``frn``, ``evonorm-b0``, ``evonorm-s0`` replace the pair norm -> activation. The model is traced
  with ``torch.fx`` (as BKN's prior chain reads it, the norms as leaves); a BatchNorm whose only user
  is a ReLU or ReLU6, possibly through ``nn.Identity`` modules (a module, ``F.relu``/``torch.relu``/
  ``F.relu6`` or ``.relu()``) gets the rival
  *with* its nonlinearity (FRN+TLU, EvoNorm's own) and that activation goes: a ReLU module called only
  after absorbed norms becomes ``nn.Identity``; otherwise (a functional relu, a ReLU module also called
  elsewhere, as torchvision's ResNet blocks share one) its calls are removed from the graph and the
  returned model is a ``torch.fx.GraphModule`` with the same submodule names (same state_dict keys).
  A norm followed by anything else gets the rival without its nonlinearity. ReLU6 is absorbed too: the
  rival's nonlinearity replaces the pair, so MobileNetV2's cap at 6 goes (docs/design.md §15).

Every replacement is listed in a :class:`bkn.replacements.ConversionReport` (``bkn.conversion_report(model)``);
what could not be done is a ``RivalConversionWarning`` naming the module (an untraceable model: no
activation absorbed; a convolution left unstandardized), or an error before anything changes (a 3-d
BatchNorm, which timm's 2-d layers can't replace).
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import norms
from ..replacements import ConversionReport, Replacement, attach, conversion_report

ACTIVATED = ("frn", "evonorm-b0", "evonorm-s0")  # rivals that replace norm -> activation
_RELU_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6"}
_RELU_METHODS = {"relu": "relu", "relu_": "relu"}


class RivalConversionWarning(UserWarning):
    """Something ``bkn.convert`` could not do for a rival (the message names the module and why)."""


def _problem(report: ConversionReport, message: str) -> None:
    report.problems.append(message)
    warnings.warn(f"bkn.convert to {report.method!r}: {message}", RivalConversionWarning, stacklevel=4)


def _activation(node: fx.Node, modules: dict) -> str | None:
    """``"ReLU"``/``"ReLU6"`` (a module), ``"relu"``/``"relu6"`` (a call) when ``node`` is one, else None."""
    if node.op == "call_module" and type(modules.get(node.target)) in (nn.ReLU, nn.ReLU6):
        return type(modules[node.target]).__name__
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return _RELU_FUNCTIONS[node.target]
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return _RELU_METHODS[node.target]
    return None


def _absorbable(model: nn.Module, targets: list, tracer_cls, report: ConversionReport):
    """The traced graph and ``{norm name: the activation node after it}``; (None, {}) if untraceable."""
    try:
        graph = tracer_cls({id(m) for _, m in targets}).trace(model)
    except Exception as err:  # data-dependent control flow etc.
        _problem(
            report,
            f"torch.fx could not trace {type(model).__name__} ({type(err).__name__}: {err}); no activation is "
            f"absorbed: every norm gets the rival without its nonlinearity and the activations stay",
        )
        return None, {}
    names = {name for name, _ in targets}
    modules = dict(model.named_modules())
    found = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in names:
            source = node
            while len(source.users) == 1:  # through identities (timm's drop_block when off) to the activation
                (user,) = source.users
                if _activation(user, modules) and user.args and user.args[0] is source:
                    found[node.target] = user
                    break
                if not (user.op == "call_module" and type(modules.get(user.target)) is nn.Identity):
                    break
                source = user
    return graph, found


def _rival_layer(bn: nn.Module, norm: str, options: dict, apply_act: bool) -> nn.Module:
    options = {**options, "apply_act": apply_act}
    if norm == "evonorm-b0" and bn.momentum is not None:
        options.setdefault("momentum", bn.momentum)
    spatial = 1 if isinstance(bn, nn.BatchNorm1d) else 2
    new = norms.create(norm, bn.num_features, spatial_dims=spatial, **options)
    ref = bn.weight if bn.weight is not None else bn.running_var
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight)
            new.bias.copy_(bn.bias)
            new.weight.requires_grad_(bn.weight.requires_grad)
        if hasattr(new, "running_var") and getattr(bn, "running_var", None) is not None:
            new.running_var.copy_(bn.running_var)
    return new.train(bn.training)


class _ThenDropAndAct:
    """Forward hook of a converted timm norm-activation layer whose act was not absorbed: drop, then act."""

    def __call__(self, module, args, output):
        return module.act(module.drop(output))


def _swap_convs(model: nn.Module, report: ConversionReport) -> None:
    from .layers import STD_CONVS

    for name, conv in list(model.named_modules()):
        if not isinstance(conv, nn.modules.conv._ConvNd) or type(conv).__name__.startswith("StdConv"):
            continue
        std = STD_CONVS.get(type(conv))
        if std is None or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            why = (
                f"padding_mode={conv.padding_mode!r}, padding={conv.padding!r} (timm's StdConv2d pads with zeros by "
                f"a number)"
                if std is not None
                else f"{type(conv).__name__} is not nn.Conv1d/nn.Conv2d"
            )
            _problem(report, f"convolution {name!r} left without weight standardization: {why}")
            continue
        new = std(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            device="meta",
        )
        new.weight, new.bias = conv.weight, conv.bias  # the same Parameters
        new.train(conv.training)
        _set(model, name, new)
        report.replaced.append(Replacement(name, "conv", type(conv).__name__, type(new).__name__))


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def convert(model: nn.Module, norm: str, options: dict, *, norm_kind, tracer_cls, replace) -> nn.Module:
    """Convert ``model``'s BatchNorms to rival ``norm`` (see the module docstring); called by ``bkn.convert``
    with its BatchNorm test ``norm_kind``, its fx tracer class and its norm ``replace``-ment (for gn-ws's GN)."""
    report = ConversionReport(norm)
    if norm_kind(model) is not None:  # a lone BatchNorm: no activation to absorb, no convolution
        if norm == "gn-ws":
            new = replace(model, "gn", options)
        else:
            new = _rival_layer(model, norm, options, apply_act=False)
        report.replaced.append(Replacement("", "norm", type(model).__name__, type(new).__name__, "no activation"))
        return attach(new, report)
    targets = [(name, m) for name, m in model.named_modules() if norm_kind(m) is not None]
    three_d = [name for name, m in targets if isinstance(m, nn.BatchNorm3d)]
    if three_d:
        raise ValueError(f"bkn.convert to {norm!r}: timm's rivals are 2-d layers; cannot replace BatchNorm3d {three_d}")
    if norm == "gn-ws":
        _swap_convs(model, report)
        for name, bn in targets:
            new = replace(bn, "gn", options)
            _set(model, name, new)
            report.replaced.append(Replacement(name, "norm", type(bn).__name__, "GroupNorm"))
        return attach(model, report)
    graph, absorb = _absorbable(model, targets, tracer_cls, report)
    for name, bn in targets:
        if norm_kind(bn) == "norm-act":  # timm's BatchNormAct2d: its own act may be absorbed
            own = isinstance(bn.act, (nn.ReLU, nn.ReLU6)) and isinstance(bn.drop, nn.Identity)
            new = _rival_layer(bn, norm, options, apply_act=own)
            if own:
                note = f"{type(bn.act).__name__} absorbed ({name}.act)"
            else:
                new.drop, new.act = bn.drop, bn.act
                new.register_forward_hook(_ThenDropAndAct())
                note = f"its act {type(bn.act).__name__} kept"
        else:
            new = _rival_layer(bn, norm, options, apply_act=name in absorb)
            note = "with nonlinearity" if name in absorb else "no ReLU follows: without nonlinearity"
        _set(model, name, new)
        report.replaced.append(Replacement(name, "norm", type(bn).__name__, type(new).__name__, note))
    if not absorb:
        return attach(model, report)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    absorbed = Counter(n.target for n in absorb.values() if n.op == "call_module")
    in_place = {target for target, count in absorbed.items() if count == calls[target]}
    rewrite, modules = False, dict(model.named_modules())
    for norm_name, node in absorb.items():
        kind = _activation(node, modules)
        if node.op == "call_module" and node.target in in_place:  # one row per absorbed call, one module swap
            _set(model, node.target, nn.Identity())
            report.replaced.append(Replacement(node.target, "activation", kind, "Identity", f"after {norm_name}"))
            continue
        where = node.target if node.op == "call_module" else f"{node.name} ({kind})"
        report.replaced.append(Replacement(where, "activation", kind, "removed from graph", f"after {norm_name}"))
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
        rewrite = True
    if not rewrite:
        return attach(model, report)
    graph.lint()
    new_model = fx.GraphModule(model, graph, class_name=type(model).__name__)
    new_model.train(model.training)
    report.graph_module = True
    return attach(new_model, report)


__all__ = ["ConversionReport", "Replacement", "RivalConversionWarning", "conversion_report", "convert"]
