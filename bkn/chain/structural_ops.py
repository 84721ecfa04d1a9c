"""Which ``torch.fx`` nodes are structural ops with a rule in :mod:`bkn.transitions.structural`.

:func:`structural_call` names the rule of a node (a slice, a split, a reshape, a product, a
spatial mean, an upsampling, a drop-path, a functional convolution) and its arguments with
other nodes as :class:`~bkn.chain.graph._Ref`, or returns None; the propagation resolves the
references (states, sizes, the model's tensors) and applies the rule (docs/design.md §5).
"""

from __future__ import annotations

import numbers
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

_FUNCTIONS = {
    operator.getitem: "getitem",
    torch.split: "split",
    torch.chunk: "chunk",
    torch.reshape: "reshape",
    torch.transpose: "transpose",
    torch.swapaxes: "swapaxes",
    torch.permute: "permute",
    torch.squeeze: "squeeze",
    torch.unsqueeze: "unsqueeze",
    torch.flatten: "flatten",
    operator.mul: "mul",
    operator.imul: "mul",
    torch.mul: "mul",
    operator.truediv: "div",
    operator.itruediv: "div",
    torch.div: "div",
    torch.mean: "mean",
    F.interpolate: "interpolate",
    F.conv1d: "conv",
    F.conv2d: "conv",
    F.conv3d: "conv",
}
_METHODS = {
    **{name: name for name in ("view", "reshape", "transpose", "swapaxes", "permute", "flatten", "unflatten")},
    **{name: name for name in ("squeeze", "unsqueeze", "split", "chunk", "mean")},
    "mul": "mul",
    "mul_": "mul",
    "div": "div",
    "div_": "div",
}
_UPSAMPLE = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor")


def _flatten_start(node: fx.Node) -> int:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)


def structural_call(node: fx.Node, modules: dict, kinds: dict, _refs) -> tuple | None:
    """``(rule, args, kwargs)`` for a node with a structural rule, else None.

    ``kinds``: the kind of each node classified so far (a getitem on sizes is arithmetic, not this);
    ``_refs``: the graph's argument converter (nodes to references).
    """
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, nn.Upsample):
            return "interpolate", _refs(node.args), tuple((k, getattr(module, k)) for k in _UPSAMPLE)
        return None
    if node.op not in ("call_function", "call_method"):
        return None
    target = node.target
    if node.op == "call_function" and getattr(target, "__name__", "") == "stochastic_depth":
        if getattr(target, "__module__", "").startswith("torchvision"):  # torchvision.ops.stochastic_depth
            return "drop_path", _refs(node.args), _refs(tuple(node.kwargs.items()))
        return None
    rule = (_METHODS if node.op == "call_method" else _FUNCTIONS).get(target)
    if rule is None:
        return None
    if rule == "flatten" and _flatten_start(node) in (0, 1):
        return None  # start 1: the chain's flatten; start 0 merges the batch
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node) and rule not in ("mul",):
        return None
    tensors = [a for a in node.args if isinstance(a, fx.Node) and kinds.get(a.name) not in ("size", "arith")]
    if rule == "mul" and not tensors:
        return None  # integer arithmetic on sizes
    if rule == "getitem" and kinds.get(first.name) in ("size", "arith"):
        return None
    return rule, _refs(node.args), _refs(tuple(node.kwargs.items()))


def scalar_add(node: fx.Node, kinds: dict, _refs) -> tuple | None:
    """``(rule, args, kwargs)`` for ``x + c`` with ``c`` a number or a tensor of the model (``get_attr``)."""
    args = node.args
    if len(args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    tensors = [a for a in args if isinstance(a, fx.Node) and kinds.get(a.name) not in ("size", "arith", "attr")]
    others = [
        a for a in args if isinstance(a, numbers.Number) or (isinstance(a, fx.Node) and kinds.get(a.name) == "attr")
    ]
    if len(tensors) == 1 and len(others) == 1:
        return "add_scalar", _refs(args), ()
    return None
