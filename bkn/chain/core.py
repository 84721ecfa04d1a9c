"""The :class:`PriorChain` itself: built from a trace, attached to a model, reset every forward.

Its parts, one job a module: the flat graph (:mod:`bkn.chain.graph`), the plan and the
report (:mod:`bkn.chain.plan`), the run-time propagation (:mod:`bkn.chain.propagate`) and
the hooks on the model (:mod:`bkn.chain.hooks`).
"""

from __future__ import annotations

from torch import fx, nn

from .. import transitions
from ..layers import _BatchKalmanNorm
from .graph import _GraphTable, _Op
from .hooks import _NewForward, _Provider, _Recorder
from .plan import _Planning
from .propagate import _Propagation


class PriorChain(_GraphTable, _Planning, _Propagation):
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
