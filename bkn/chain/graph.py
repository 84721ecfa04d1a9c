"""The traced graph of a model as the prior chain keeps it: a flat table of :class:`_Op`.

Each ``torch.fx`` node becomes an :class:`_Op` (names, kinds and input names: no ``torch.fx``
objects, so a converted model deep-copies and pickles), classified by what the transitions
can do with it (a BKN layer, a module they model, an activation called as a function, a
residual sum, zero channel padding, channel concatenation, size arithmetic, or not modelled
and why). :class:`_GraphTable` is the part of :class:`~bkn.chain.PriorChain` that builds it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import transitions
from .structural_ops import scalar_add, structural_call

_ADD = {operator.add, operator.iadd, torch.add}
_RELU = {F.relu, torch.relu, torch.relu_}
_FLATTEN = {torch.flatten}
_PASS_METHODS = {"contiguous", "clone"}
_ADD_METHODS = {"add", "add_"}
_RELU_METHODS = {"relu", "relu_"}
_PAD = {F.pad, torch.constant_pad_nd}
_CAT = {torch.cat, torch.concat, torch.concatenate}


# Activations called as functions (``F.silu(x)``, ``torch.sigmoid(x)``, ``x.tanh()``): the module
# that computes the same, built from the call's arguments, so both transitions take them as they
# take the modules (the input is argument 0; ``inplace`` does not change the statistics).
def _activation(module_type, *names):
    def build(args: tuple, kwargs: dict) -> nn.Module:
        values = dict(zip(names, args[1:]))
        values.update((k, v) for k, v in kwargs.items() if k in names)
        return module_type(**values)

    return build


_ACTIVATION_FUNCTIONS = {
    F.silu: _activation(nn.SiLU),
    F.gelu: _activation(nn.GELU, "approximate"),
    F.mish: _activation(nn.Mish),
    F.hardswish: _activation(nn.Hardswish),
    F.hardsigmoid: _activation(nn.Hardsigmoid),
    F.elu: _activation(nn.ELU, "alpha"),
    F.celu: _activation(nn.CELU, "alpha"),
    F.selu: _activation(nn.SELU),
    F.leaky_relu: _activation(nn.LeakyReLU, "negative_slope"),
    F.softplus: _activation(nn.Softplus, "beta", "threshold"),
    F.relu6: _activation(nn.ReLU6),
    F.hardtanh: _activation(nn.Hardtanh, "min_val", "max_val"),
    torch.sigmoid: _activation(nn.Sigmoid),
    F.sigmoid: _activation(nn.Sigmoid),
    torch.tanh: _activation(nn.Tanh),
    F.tanh: _activation(nn.Tanh),
}
_ACTIVATION_METHODS = {"sigmoid": _activation(nn.Sigmoid), "tanh": _activation(nn.Tanh)}
# Pooling called as a function (``F.avg_pool2d(x, 5, stride=3)``, torchvision's inception and googlenet): the
# module that computes the same, its arguments named in the function's order.
_AVG_POOL = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_MAX_POOL = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
for _n, (_avg, _max, _adaptive) in enumerate(
    ((nn.AvgPool1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d), (nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d)), 1
):
    _avg_names = _AVG_POOL[:5] if _n == 1 else _AVG_POOL  # AvgPool1d has no divisor_override
    _ACTIVATION_FUNCTIONS[getattr(F, f"avg_pool{_n}d")] = _activation(_avg, *_avg_names)
    _ACTIVATION_FUNCTIONS[getattr(F, f"max_pool{_n}d")] = _activation(_max, *_MAX_POOL[:5])  # no return_indices
    _ACTIVATION_FUNCTIONS[getattr(F, f"adaptive_avg_pool{_n}d")] = _activation(_adaptive, "output_size")
# Integer arithmetic on tensor sizes (``pad = x.shape[1] // 2`` for a zero-padding shortcut).
_ARITH = {operator.getitem, operator.floordiv, operator.mul, operator.add, operator.sub, operator.neg}


@dataclass(frozen=True)
class _Op:
    """One node of the traced graph, as much of it as the chain needs.

    ``kind``: ``input`` (the model input), ``norm`` (a BKN layer's first call), ``module``
    (a module the transitions model), ``activation`` (an activation called as a function:
    ``args`` holds the module that computes the same), ``add``, ``relu``, ``flatten``, ``pad`` (zero
    channel padding), ``cat`` (concatenation of channels), ``pass`` (no change to the
    statistics), ``size`` and ``arith`` (a tensor's size and integer arithmetic on it:
    values, not states), ``output`` or ``unsupported`` (``why`` says what is not modelled).
    """

    name: str
    kind: str
    inputs: tuple[str, ...]
    label: str
    target: str = ""  # module name, for norm and module
    start_dim: int = 0  # flatten
    why: str = ""
    args: tuple = ()  # size, arith, pad: the call's arguments, other nodes as _Ref


@dataclass(frozen=True)
class _Ref:
    """A reference to another node's value inside an :class:`_Op`'s arguments."""

    name: str


def _refs(value):
    """``value`` (a call argument) with every ``fx.Node`` replaced by a picklable :class:`_Ref`."""
    if isinstance(value, fx.Node):
        return _Ref(value.name)
    if isinstance(value, (tuple, list)):
        return tuple(_refs(v) for v in value)
    if isinstance(value, slice):
        return slice(_refs(value.start), _refs(value.stop), _refs(value.step))
    return value


class _Kinds:
    """The kind of each node classified so far, by name (a view of the table, not a copy)."""

    def __init__(self, ops: dict):
        self.ops = ops

    def get(self, name: str, default=None):
        op = self.ops.get(name)
        return default if op is None else op.kind


class _GraphTable:
    """Classification of ``torch.fx`` nodes into :class:`_Op` (a part of :class:`~bkn.chain.PriorChain`:
    uses its ``modules``, ``norm_nodes`` and the ``ops`` classified so far)."""

    def _op(self, node: fx.Node) -> _Op:
        inputs = tuple(a.name for a in node.all_input_nodes)
        label = self._label(node)
        kind, why, start = "unsupported", "", 0
        if node.op == "placeholder":
            kind = "input"
        elif node.op == "output":
            kind = "output"
        elif node.op == "get_attr":  # a tensor of the model (a functional convolution's weight, a scale)
            return _Op(node.name, "attr", inputs, label, target=node.target)
        elif node.name in self.norm_nodes:
            kind = "norm"
            for attr in getattr(self.modules[node.target], "_bkn_post", ()):
                post = getattr(self.modules[node.target], attr)
                if not transitions.Analytic.supports(post):
                    kind, why = "unsupported", f"its {attr} {type(post).__name__} is not modelled"
        elif node.op == "call_module":
            module = self.modules[node.target]
            call = structural_call(node, self.modules, self._kinds(), _refs)
            if call is not None:  # nn.Upsample
                return _Op(node.name, "structural", inputs, label, target=call[0], args=call)
            if transitions.Analytic.supports(module):
                kind = "module"
            else:
                why = f"{type(module).__name__} is not modelled"
        elif node.op in ("call_function", "call_method"):
            target = node.target
            values = [i for i in inputs if self.ops[i].kind in ("size", "arith")]
            on_values = bool(inputs) and len(values) == len(inputs)
            if (target is getattr and node.args[1:] == ("shape",)) or target == "size":
                kind = "size"
                args = (_refs(node.args[1]),) if target == "size" and len(node.args) > 1 else ()
                return _Op(node.name, kind, inputs, label, args=args)
            if target in _ARITH and on_values:
                return _Op(node.name, "arith", inputs, label, target=target.__name__, args=_refs(node.args))
            if target in _PAD:
                value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", 0)
                mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
                pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
                if isinstance(node.args[0], fx.Node) and not isinstance(value, fx.Node) and isinstance(mode, str):
                    args = (_Ref(node.args[0].name), _refs(pad), mode, value or 0.0)
                    return _Op(node.name, "pad", inputs, label, args=args)
                return _Op(node.name, "unsupported", inputs, label, why=f"{mode} padding with value {value}")
            if target in _CAT:
                tensors = node.args[0] if node.args else node.kwargs.get("tensors")
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
                if dim == 1 and isinstance(tensors, (list, tuple)) and all(isinstance(t, fx.Node) for t in tensors):
                    return _Op(node.name, "cat", tuple(t.name for t in tensors), label)  # in order, repeats kept
                return _Op(node.name, "unsupported", inputs, label, why=f"concatenation along dim {dim}, not channels")
            call = structural_call(node, self.modules, self._kinds(), _refs)
            if call is None and (target in _ADD or target in _ADD_METHODS):
                call = scalar_add(node, self._kinds(), _refs)
            if call is not None:
                return _Op(node.name, "structural", inputs, label, target=call[0], args=call)
            build = (_ACTIVATION_METHODS if node.op == "call_method" else _ACTIVATION_FUNCTIONS).get(target)
            if build is not None and len(inputs) == 1 and isinstance(node.args[0], fx.Node):
                try:
                    module = build(node.args, node.kwargs)
                except (TypeError, ValueError) as err:  # arguments that are graph values, or invalid
                    return _Op(node.name, "unsupported", inputs, label, why=f"{label} with these arguments ({err})")
                return _Op(node.name, "activation", inputs, label, args=(module,))
            if target in _ADD or target in _ADD_METHODS:
                if len(inputs) == 2 and not values and node.kwargs.get("alpha", 1) == 1 and len(node.args) == 2:
                    kind = "add"
                else:
                    why = "add of a tensor and a non-tensor"
            elif target in _RELU or target in _RELU_METHODS:
                kind = "relu"
            elif target in _FLATTEN or target == "flatten":
                kind, start = "flatten", node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                if start != 1:
                    kind, why = "unsupported", "flatten that merges the batch dimension"
            elif target in _PASS_METHODS:
                kind = "pass"
            else:
                why = f"{node.op} {getattr(target, '__name__', target)}"
        else:
            why = f"{node.op} {node.target}"
        target = node.target if node.op == "call_module" else ""
        return _Op(node.name, kind, inputs, label, target, start, why)

    def _kinds(self) -> "_Kinds":
        return _Kinds(self.ops)

    def _label(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{type(self.modules[node.target]).__name__}({node.target})"
        if node.op == "call_function":
            return getattr(node.target, "__name__", str(node.target))
        return f"{node.op}:{node.target}"
