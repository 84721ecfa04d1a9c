"""Prior chains: each BKN layer's prior, computed from the posteriors of earlier layers.

A :class:`PriorChain` is built from a ``torch.fx`` trace of a model, kept as a flat
table of :class:`_Op` (names, kinds and input names: no ``torch.fx`` objects, so a
converted model deep-copies and pickles). For each BKN layer it knows the sub-graph
between the layer and the normalization layers that feed it (convolutions, ReLUs,
pooling, residual sums, channel padding and concatenation). When a BKN layer runs in
training mode it asks the chain for its prior; the chain evaluates that sub-graph on
*states* (a Monte-Carlo surrogate or closed-form moments, see :mod:`bkn.transitions`)
starting from the latest normalization posteriors of this same forward pass, memoising
every node until the next forward. The latest posterior of a tensor is

* the posterior of a BKN layer that already *read* it (its input moments): the
  residual stream of a pre-activation ResNet, ``x + f(relu(bn(x)))``, is read by the
  block's first norm, whose posterior then stands for ``x`` (``transition.at_input``);
* otherwise the output of the BKN layers feeding it (``transition.after_norm``),
  propagated through the ops in between.

Where a path can't be modelled (an op the transition does not know, a node that is
not a tensor op, the model input) the layer gets no prior - or, with
``fallback="identity"``, the previous layer's posterior when channels match.
:meth:`PriorChain.report` gives, per layer, the static plan and what happened in the
last training forward (prior used or not, from where, and why not).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import transitions
from .layers import _BatchKalmanNorm
from .transitions.analytic import Unsupported

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
# Integer arithmetic on tensor sizes (``pad = x.shape[1] // 2`` for a zero-padding shortcut).
_ARITH = {operator.getitem, operator.floordiv, operator.mul, operator.add, operator.sub, operator.neg}

FIRST_LAYER = "no prior: first normalization layer (its input derives from the model input only)"
PART_INPUT = "no prior: part of its input derives from the model input only (no statistics to propagate)"
NOT_RUN = "not run in training mode yet"


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
    return value


@dataclass
class PriorRoute:
    """How one BKN layer gets its prior (a row of the summary)."""

    layer: str
    sources: list[str] = field(default_factory=list)
    path: list[str] = field(default_factory=list)
    status: str = ""


@dataclass
class _Missing:
    """No state for a node (the model input, or a layer that did not run); not an error of the graph."""

    why: str
    from_input: bool = False


class PriorChain:
    """The prior chain of a converted model: built from its ``torch.fx`` graph, attached with :meth:`attach`.

    ``transition``: a :data:`bkn.transitions.NAMES` value; ``fallback``: ``"none"`` or
    ``"identity"`` (a layer whose path can't be modelled gets the previous posterior when
    channels match); ``draws``: Monte-Carlo draws per group of the ``official*`` transitions.
    """

    def __init__(
        self,
        root: nn.Module,
        graph: fx.Graph,
        transition: str = "official",
        fallback: str = "none",
        draws: int = 1,
        surrogate_scale: float = 1.0,
    ):
        if fallback not in ("none", "identity"):
            raise ValueError(f"fallback must be 'none' or 'identity', got {fallback!r}")
        self.transition_name = transition
        scaled = {"surrogate_scale": surrogate_scale} if surrogate_scale != 1.0 else {}
        if scaled and transition not in transitions.MONTE_CARLO:
            raise ValueError(
                f"surrogate_scale applies to the official transition only ({', '.join(transitions.MONTE_CARLO)}), "
                f"not {transition!r}"
            )
        self.transition = transitions.get(transition, **({"draws": draws} if draws != 1 else {}), **scaled)
        self.fallback = fallback
        self.modules = dict(root.named_modules())
        self.norm_nodes: dict[str, str] = {}  # node name -> module name, for every BKN layer
        self.order: list[str] = []  # BKN node names in execution order
        for node in graph.nodes:
            if node.op == "call_module" and isinstance(self.modules.get(node.target), _BatchKalmanNorm):
                if node.target in self.norm_nodes.values():
                    continue  # a layer called twice: its second call gets no chain (see summary)
                self.norm_nodes[node.name] = node.target
                self.order.append(node.name)
        self.ops: dict[str, _Op] = {}
        for node in graph.nodes:  # in order: an op's classification may look at its inputs'
            self.ops[node.name] = self._op(node)
        self.input_of: dict[str, str] = {n: self.ops[n].inputs[0] for n in self.order if self.ops[n].inputs}
        self.readers: dict[str, list[str]] = {}  # node -> the BKN layers whose input it is, in order
        for layer, read in self.input_of.items():
            self.readers.setdefault(read, []).append(layer)
        self._reset()
        self._last: dict[str, str] = {}  # BKN node -> what happened in the last training forward
        self._last_order: list[str] = []  # BKN nodes in the order they ran in the last training forward
        self.routes = {
            name: self._trace(name, {n: i for i, n in enumerate(self.order[:k])}) for k, name in enumerate(self.order)
        }

    # -- the graph, flattened -----------------------------------------------------------------
    def _op(self, node: fx.Node) -> _Op:
        inputs = tuple(a.name for a in node.all_input_nodes)
        label = self._label(node)
        kind, why, start = "unsupported", "", 0
        if node.op == "placeholder":
            kind = "input"
        elif node.op == "output":
            kind = "output"
        elif node.name in self.norm_nodes:
            kind = "norm"
            for attr in getattr(self.modules[node.target], "_bkn_post", ()):
                post = getattr(self.modules[node.target], attr)
                if not transitions.Analytic.supports(post):
                    kind, why = "unsupported", f"its {attr} {type(post).__name__} is not modelled"
        elif node.op == "call_module":
            module = self.modules[node.target]
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
                if mode == "constant" and not value and isinstance(node.args[0], fx.Node):
                    return _Op(node.name, "pad", inputs, label, args=(_Ref(node.args[0].name), _refs(pad)))
                return _Op(node.name, "unsupported", inputs, label, why=f"{mode} padding with value {value}")
            if target in _CAT:
                tensors = node.args[0] if node.args else node.kwargs.get("tensors")
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
                if dim == 1 and isinstance(tensors, (list, tuple)) and all(isinstance(t, fx.Node) for t in tensors):
                    return _Op(node.name, "cat", tuple(t.name for t in tensors), label)  # in order, repeats kept
                return _Op(node.name, "unsupported", inputs, label, why=f"concatenation along dim {dim}, not channels")
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

    def _label(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{type(self.modules[node.target]).__name__}({node.target})"
        if node.op == "call_function":
            return getattr(node.target, "__name__", str(node.target))
        return f"{node.op}:{node.target}"

    # -- wiring -----------------------------------------------------------------------------
    def attach(self, root: nn.Module) -> None:
        """Install the hooks and prior providers on ``root`` and its BKN layers."""
        root.register_forward_pre_hook(_NewForward(self))
        for node_name, module_name in self.norm_nodes.items():
            layer = self.modules[module_name]
            layer.prior_provider = _Provider(self, node_name)
            layer._qualified_name = module_name
            layer.register_forward_hook(_Recorder(self, node_name))

    def _reset(self) -> None:
        """Forget the states of the previous forward."""
        self._cache: dict[str, object] = {}
        self._ran: dict[str, tuple[int, ...]] = {}  # BKN node -> spatial size, in the order they ran
        self._read: dict[str, str] = {}  # node -> the latest BKN node that ran with it as input
        self._why: dict[str, str | None] = {}  # BKN node -> why its provider returned no prior

    def __getstate__(self):
        # The states of a forward are transient (non-leaf tensors: deepcopy refuses them).
        state = self.__dict__.copy()
        for key in ("_cache", "_ran", "_read", "_why"):
            state[key] = {}
        return state

    # -- the plan, and the route of the last forward ------------------------------------------
    def _trace(self, node_name: str, earlier: dict[str, int]) -> PriorRoute:
        """The route of BKN node ``node_name``'s prior when the BKN nodes ``earlier`` (name -> rank)
        ran before it: sources, ops in between and the status the plan predicts."""
        route = PriorRoute(self.norm_nodes[node_name])
        problems: list[str] = []
        visited: list[str] = []
        reached_input = [False]
        seen: set[str] = set()
        stack = list(self.ops[node_name].inputs[:1])
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            readers = [r for r in self.readers.get(name, ()) if r in earlier]
            if readers:  # read by a layer that ran: its posterior stands for this tensor
                route.sources.append(self.norm_nodes[max(readers, key=earlier.get)] + " (input)")
                continue
            op = self.ops[name]
            if op.kind == "norm":
                route.sources.append(op.target)
                layer = self.modules[op.target]
                for attr in getattr(layer, "_bkn_post", ()):  # a converted norm-activation: its act is on the path
                    if not isinstance(getattr(layer, attr), nn.Identity):
                        visited.append((name, attr))
                continue
            if op.kind == "input":
                reached_input[0] = True
                continue
            if op.kind == "unsupported":
                problems.append(f"cannot propagate through {op.label} ({op.why})")
                continue
            if op.kind not in ("size", "arith"):  # shape arithmetic: not an op on the statistics
                visited.append(name)
            stack.extend(op.inputs)
        position = {name: i for i, name in enumerate(self.ops)}

        def label(item) -> str:
            if isinstance(item, tuple):  # (norm node, attribute)
                module = getattr(self.modules[self.ops[item[0]].target], item[1])
                return f"{type(module).__name__}({self.ops[item[0]].target}.{item[1]})"
            return self.ops[item].label

        def rank(item) -> float:
            return position[item[0]] + 0.5 if isinstance(item, tuple) else position[item]

        route.path = [label(n) for n in sorted(visited, key=rank)]
        route.sources.sort(key=lambda s: position.get(self._node_of(s), 0))
        if self.transition is None:
            route.path = ["identity"]
        if problems:
            route.status = "no prior: " + "; ".join(sorted(set(problems)))
            if self.fallback == "identity":
                route.status += " (fallback: identity)"
        elif not route.sources:
            route.status = FIRST_LAYER
        elif reached_input[0]:
            route.status = PART_INPUT
        else:
            route.status = f"prior ({self.transition_name})"
        return route

    def _node_of(self, source: str) -> str:
        module = source.removesuffix(" (input)")
        return next((n for n, m in self.norm_nodes.items() if m == module), "")

    def report(self) -> list[dict]:
        """Per BKN layer in execution order: ``layer``, ``sources``, ``path``, ``plan`` (the static
        status) and ``last`` (the last training forward: ``"prior used"``, ``"no prior: <why>"``, or
        that it did not run); ``sources``/``path`` are those of the last training forward where it ran."""
        rows = []
        ran = {n: i for i, n in enumerate(self._last_order)}
        for name in self.order:
            plan = self.routes[name]
            route = plan
            if name in self._last:
                route = self._trace(name, {n: i for n, i in ran.items() if i < ran[name]})
                last = self._last[name]
            else:
                last = "did not run in the last training forward" if self._last_order else NOT_RUN
            rows.append(
                {
                    "layer": plan.layer,
                    "sources": list(route.sources),
                    "path": list(route.path),
                    "plan": plan.status,
                    "last": last,
                }
            )
        return rows

    def summary(self) -> str:
        return format_report(self.report())

    # -- evaluation ---------------------------------------------------------------------
    def prior(self, node_name: str):
        """The prior for BKN node ``node_name`` in the current forward, or None (``_why`` says why)."""
        layer = self.modules[self.norm_nodes[node_name]]
        why = None
        if self.transition is None:
            prior = self._identity_prior(node_name, layer)
            if prior is None:
                why = "no prior: identity transition without a previous layer of the same width that ran"
            self._why[node_name] = why
            return prior
        try:
            state = self._state(self.input_of[node_name])
        except Unsupported as err:
            state, why = None, f"no prior: {err}"
        if isinstance(state, _Missing):
            if state.from_input:
                state, why = None, FIRST_LAYER if not self.routes[node_name].sources else PART_INPUT
            else:
                state, why = None, f"no prior: {state.why}"
        if state is None:
            if self.fallback == "identity":
                prior = self._identity_prior(node_name, layer)
                if prior is not None:
                    self._why[node_name] = None
                    return prior
                why += " (fallback: identity found no previous layer of the same width)"
            self._why[node_name] = why
            return None
        mean, var = self.transition.to_prior(state)
        if mean.shape[-1] != layer.num_features:
            self._why[node_name] = (
                f"no prior: the propagated statistics have {mean.shape[-1]} channels, the layer {layer.num_features}"
            )
            return None
        self._why[node_name] = None
        return mean, var

    def _identity_prior(self, node_name: str, layer):
        index = self.order.index(node_name)
        if index == 0:
            return None
        previous = self.modules[self.norm_nodes[self.order[index - 1]]]
        if previous.posterior is None or self.order[index - 1] not in self._ran:
            return None
        mean, var = previous.posterior
        if mean.shape[-1] != layer.num_features:
            return None
        return mean, var

    def _state(self, name: str):
        cache = self._cache
        if name in cache:
            return cache[name]
        state = self._evaluate(name)
        cache[name] = state
        return state

    def _evaluate(self, name: str):
        t = self.transition
        reader = self._read.get(name)
        if reader is not None:  # the input of a BKN layer that ran: its posterior estimates this tensor
            return t.at_input(self.modules[self.norm_nodes[reader]], self._ran[reader])
        op = self.ops[name]
        kind = op.kind
        if kind == "norm":
            if name not in self._ran:
                return _Missing(f"{op.target} did not run before it in this forward")
            layer = self.modules[op.target]
            state = t.after_norm(layer, self._ran[name])
            for attr in getattr(layer, "_bkn_post", ()):  # a converted norm-activation (timm's BatchNormAct2d)
                state = t.module(getattr(layer, attr), state)
            return state
        if kind == "input":
            return _Missing("its input derives from the model input", from_input=True)
        if kind == "unsupported":
            raise Unsupported(f"cannot propagate through {op.label} ({op.why})")
        if kind in ("size", "arith", "pad"):
            return self._call(op)
        inputs = [self._state(a) for a in op.inputs]
        for state in inputs:
            if isinstance(state, _Missing):
                return state
        try:
            return self._apply(op, inputs)
        except Unsupported as err:
            raise Unsupported(f"cannot propagate through {op.label} ({err})") from None

    def _resolve(self, value):
        if isinstance(value, _Ref):
            return self._state(value.name)
        if isinstance(value, tuple):
            return tuple(self._resolve(v) for v in value)
        return value

    def _call(self, op: _Op):
        """A size, integer arithmetic on sizes, or a zero padding (its amounts may be such values)."""
        args = [self._resolve(a) for a in ((_Ref(op.inputs[0]),) if op.kind == "size" else ()) + op.args]
        for a in args:
            if isinstance(a, _Missing):
                return a
        try:
            if op.kind == "size":
                state, dim = args[0], (args[1] if len(args) > 1 else None)
                if isinstance(state, transitions.Sample):
                    shape = (None, *state.value.shape[1:])
                else:
                    shape = (None, state.channels, *state.spatial)  # the batch is not a statistic
                return shape if dim is None else shape[dim]
            if op.kind == "arith":
                if any(a is None for a in args):
                    raise Unsupported("arithmetic on the batch size")
                return getattr(operator, op.target)(*args)
            state, pad = args
            if not all(isinstance(p, int) for p in pad):
                raise Unsupported(f"padding amounts {pad}")
            rank = 1 + (len(state.value.shape) - 2 if isinstance(state, transitions.Sample) else len(state.spatial))
            if len(pad) % 2 or len(pad) > 2 * rank or any(pad[: 2 * (rank - 1)]) or len(pad) < 2 * rank:
                raise Unsupported(f"padding {tuple(pad)} of spatial positions (only channel padding is modelled)")
            return self.transition.pad_channels(state, pad[-2], pad[-1])
        except Unsupported as err:
            raise Unsupported(f"cannot propagate through {op.label} ({err})") from None

    def _apply(self, op: _Op, inputs: list):
        t = self.transition
        kind = op.kind
        if kind == "module":
            return t.module(self.modules[op.target], inputs[0])
        if kind == "activation":  # an activation called as a function: its module (see _ACTIVATION_FUNCTIONS)
            return t.module(op.args[0], inputs[0])
        if kind == "add":
            return t.add(inputs[0], inputs[1])
        if kind == "cat":
            return t.cat(inputs)
        if kind == "relu":
            return t.relu(inputs[0])
        if kind == "flatten":
            state = inputs[0]
            if isinstance(state, transitions.Sample):
                return transitions.Sample(state.value.flatten(1), state.draws)
            return t.flatten(state)
        if kind == "pass":
            return inputs[0]
        raise Unsupported(f"{kind} {op.label}")


def format_report(report: list[dict]) -> str:
    """The rows of a prior report as a printable table (long cells keep their end: the ops nearest the layer)."""
    rows = [("layer", "prior from", "through", "plan", "last training forward")]
    for r in report:
        rows.append((r["layer"], ", ".join(r["sources"]) or "-", " > ".join(r["path"]) or "-", r["plan"], r["last"]))

    def clip(text: str, width: int = 60) -> str:
        return text if len(text) <= width else "..." + text[-(width - 3) :]

    rows = [(clip(a), clip(b), clip(c), d, e) for a, b, c, d, e in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join([row[i].ljust(widths[i]) for i in range(4)] + [row[4]]) for row in rows)


class _NewForward:
    """Forward pre-hook on the converted model: a new forward forgets the previous one's states."""

    def __init__(self, chain: PriorChain):
        self.chain = chain

    def __call__(self, module, args):
        chain = self.chain
        chain._reset()
        if module.training:
            chain._last, chain._last_order = {}, []


class _Provider:
    """Callable stored on a BKN layer: asks the chain for that layer's prior."""

    def __init__(self, chain: PriorChain, node_name: str):
        self.chain, self.node_name = chain, node_name

    def __call__(self):
        return self.chain.prior(self.node_name)


_NOT_ASKED = object()


class _Recorder:
    """Forward hook on a BKN layer: marks it as run in this forward (its spatial size, the tensor
    it read) and records whether it used a prior, and why not."""

    def __init__(self, chain: PriorChain, node_name: str):
        self.chain, self.node_name = chain, node_name

    def __call__(self, module, args, output):
        if not module.training:
            return
        chain, node = self.chain, self.node_name
        chain._ran[node] = tuple(args[0].shape[2:])
        read = chain.input_of.get(node)
        if read is not None:  # from now on this layer's posterior stands for the tensor it read
            chain._read[read] = node
            chain._cache.pop(read, None)
        why = chain._why.pop(node, _NOT_ASKED)
        if module.prior_used:
            status = "prior used"
        elif why is _NOT_ASKED:
            status = "no prior: the layer did not ask the chain (a prior was given, or no provider)"
        elif why is None:
            status = "no prior: the layer ignored the prior it was given (p = 0)"
        else:
            status = why
        chain._last[node] = status
        chain._last_order.append(node)
