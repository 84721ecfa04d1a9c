"""Prior chains: each BKN layer's prior, computed from the posteriors of earlier layers.

A :class:`PriorChain` is built from a ``torch.fx`` trace of a model. For each BKN
layer it knows the sub-graph between the layer and the normalization layers that
feed it (convolutions, ReLUs, pooling, residual sums). When a BKN layer runs in
training mode it asks the chain for its prior; the chain evaluates that
sub-graph on *states* (a Monte-Carlo surrogate or closed-form moments, see
:mod:`bkn.transitions`) starting from the posteriors the earlier layers produced
in this same forward pass, memoising every node until the next forward.

Where a path can't be modelled (an op the transition does not know, a node that
is not a tensor op, the model input) the layer gets no prior - or, with
``fallback="identity"``, the previous layer's posterior when channels match -
and :meth:`PriorChain.summary` says which layer got which prior and why.
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


@dataclass
class PriorRoute:
    """How one BKN layer gets its prior (a row of the summary)."""

    layer: str
    sources: list[str] = field(default_factory=list)
    path: list[str] = field(default_factory=list)
    status: str = ""


class PriorChain:
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
        official = {"draws": draws, "surrogate_scale": surrogate_scale} if transition == "official" else {}
        if surrogate_scale != 1.0 and transition != "official":
            raise ValueError(f"surrogate_scale applies to the official transition only, not {transition!r}")
        self.transition = transitions.get(transition, **official)
        self.fallback = fallback
        self.nodes = {n.name: n for n in graph.nodes}
        self.modules = dict(root.named_modules())
        self.norm_nodes: dict[str, str] = {}  # node name -> module name, for every BKN layer
        self.order: list[str] = []  # BKN node names in execution order
        for node in graph.nodes:
            if node.op == "call_module" and isinstance(self.modules.get(node.target), _BatchKalmanNorm):
                if node.target in self.norm_nodes.values():
                    continue  # a layer called twice: its second call gets no chain (see summary)
                self.norm_nodes[node.name] = node.target
                self.order.append(node.name)
        self._cache: dict[str, object] = {}
        self._ran: dict[str, tuple[int, ...]] = {}
        self.routes = {name: self._describe(name) for name in self.order}

    # -- wiring -----------------------------------------------------------------------------
    def attach(self, root: nn.Module) -> None:
        """Install the hooks and prior providers on ``root`` and its BKN layers."""
        root.register_forward_pre_hook(self._new_forward)
        for node_name, module_name in self.norm_nodes.items():
            layer = self.modules[module_name]
            layer.prior_provider = _Provider(self, node_name)
            layer._qualified_name = module_name
            layer.register_forward_hook(_Recorder(self, node_name))

    def _new_forward(self, module, args):
        self._cache.clear()
        self._ran.clear()

    # -- static description (for the summary) --------------------------------------------
    def _describe(self, node_name: str) -> PriorRoute:
        route = PriorRoute(self.norm_nodes[node_name])
        problems: list[str] = []
        visited: list[fx.Node] = []
        self._walk(self.nodes[node_name].args[0], route, problems, set(), visited)
        position = {name: i for i, name in enumerate(self.nodes)}
        route.path = [self._op_label(n) for n in sorted(visited, key=lambda n: position[n.name])]
        if self.transition is None:
            route.path = ["identity"]
        if problems:
            route.status = "no prior: " + "; ".join(sorted(set(problems)))
            if self.fallback == "identity":
                route.status += " (fallback: identity)"
        elif not route.sources:
            route.status = "no prior: first normalization layer (its input derives from the model input only)"
        else:
            route.status = f"prior ({self.transition_name})"
        return route

    def _walk(self, node, route: PriorRoute, problems: list[str], seen: set, visited: list) -> None:
        if not isinstance(node, fx.Node) or node.name in seen:
            return
        seen.add(node.name)
        if node.name in self.norm_nodes:
            route.sources.append(self.norm_nodes[node.name])
            return
        label = self._op_label(node)
        if node.op == "placeholder":
            return
        try:
            self._check_supported(node)
        except Unsupported as why:
            problems.append(f"cannot propagate through {label} ({why})")
            return
        visited.append(node)
        for arg in node.all_input_nodes:
            self._walk(arg, route, problems, seen, visited)

    def _op_label(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{type(self.modules[node.target]).__name__}({node.target})"
        if node.op == "call_function":
            return getattr(node.target, "__name__", str(node.target))
        return f"{node.op}:{node.target}"

    def _check_supported(self, node: fx.Node) -> None:
        if node.op == "call_module":
            module = self.modules[node.target]
            if not transitions.Analytic.supports(module):
                raise Unsupported(f"{type(module).__name__} is not modelled")
            return
        if node.op == "call_function" and node.target in _ADD | _RELU | _FLATTEN:
            return
        if node.op == "call_method" and node.target in {"relu", "relu_", "add", "add_", "flatten"} | _PASS_METHODS:
            return
        raise Unsupported(f"{node.op} {getattr(node.target, '__name__', node.target)}")

    # -- evaluation ---------------------------------------------------------------------
    def prior(self, node_name: str):
        """The prior for BKN node ``node_name`` in the current forward, or None."""
        layer = self.modules[self.norm_nodes[node_name]]
        if self.transition is None:
            return self._identity_prior(node_name, layer)
        try:
            state = self._state(self.nodes[node_name].args[0])
        except Unsupported as why:
            self.routes[node_name].status = f"no prior: {why}"
            state = None
        if state is None:
            return self._identity_prior(node_name, layer) if self.fallback == "identity" else None
        mean, var = self.transition.to_prior(state)
        if mean.shape[-1] != layer.num_features:
            return None
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

    def _state(self, node):
        if not isinstance(node, fx.Node):
            raise Unsupported(f"non-tensor argument {node!r}")
        if node.name in self._cache:
            return self._cache[node.name]
        state = self._evaluate(node)
        self._cache[node.name] = state
        return state

    def _evaluate(self, node: fx.Node):
        t = self.transition
        if node.name in self.norm_nodes:
            if node.name not in self._ran:
                return None
            layer = self.modules[self.norm_nodes[node.name]]
            return t.after_norm(layer, self._ran[node.name]) if layer.posterior is not None else None
        if node.op == "placeholder" or node.op == "get_attr":
            return None
        inputs = [self._state(a) for a in node.all_input_nodes]
        if any(s is None for s in inputs):
            return None
        if node.op == "call_module":
            return t.module(self.modules[node.target], inputs[0])
        target = node.target
        if target in _ADD or target in ("add", "add_"):
            if len(inputs) != 2 or node.kwargs.get("alpha", 1) != 1:
                raise Unsupported("add of a tensor and a non-tensor")
            return t.add(inputs[0], inputs[1])
        if target in _RELU or target in ("relu", "relu_"):
            return t.relu(inputs[0])
        if target in _FLATTEN or target == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            if start != 1:
                raise Unsupported("flatten that merges the batch dimension")
            state = inputs[0]
            if isinstance(state, transitions.Sample):
                return transitions.Sample(state.value.flatten(1), state.draws)
            return t.flatten(state)
        if target in _PASS_METHODS:
            return inputs[0]
        raise Unsupported(f"{node.op} {target}")

    def summary(self) -> str:
        rows = [("layer", "prior from", "through", "status")]
        for name in self.order:
            r = self.routes[name]
            rows.append((r.layer, ", ".join(r.sources) or "-", " > ".join(r.path) or "-", r.status))

        def clip(text: str, width: int = 60) -> str:  # keep the end: the ops nearest the layer
            return text if len(text) <= width else "..." + text[-(width - 3) :]

        rows = [(clip(a), clip(b), clip(c), d) for a, b, c, d in rows]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        return "\n".join("  ".join([row[i].ljust(widths[i]) for i in range(3)] + [row[3]]) for row in rows)


class _Provider:
    """Callable stored on a BKN layer: asks the chain for that layer's prior."""

    def __init__(self, chain: PriorChain, node_name: str):
        self.chain, self.node_name = chain, node_name

    def __call__(self):
        return self.chain.prior(self.node_name)


class _Recorder:
    """Forward hook on a BKN layer: marks it as run in this forward, with its spatial size."""

    def __init__(self, chain: PriorChain, node_name: str):
        self.chain, self.node_name = chain, node_name

    def __call__(self, module, args, output):
        if module.training:
            self.chain._ran[self.node_name] = tuple(args[0].shape[2:])
