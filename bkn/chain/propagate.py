"""Run-time propagation of the prior chain: a BKN layer's prior from the states of this forward.

:class:`_Propagation` is the part of :class:`~bkn.chain.PriorChain` that, when a BKN layer
asks for its prior in a training forward, evaluates the layer's sub-graph on transition
states (:mod:`bkn.transitions`) from the latest normalization posteriors, memoising every
node until the next forward.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from .. import transitions
from ..transitions import structural
from ..transitions.analytic import Unsupported
from .graph import _Op, _Ref
from .plan import FIRST_LAYER, PART_INPUT


@dataclass
class _Missing:
    """No state for a node (the model input, or a layer that did not run); not an error of the graph."""

    why: str
    from_input: bool = False


class _Propagation:
    """States and priors (a part of :class:`~bkn.chain.PriorChain`: uses its ``ops``, ``transition``,
    ``fallback``, ``routes`` and the per-forward ``_cache``, ``_ran``, ``_read``, ``_why``)."""

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
        try:
            state = structural.settle(state)
        except Unsupported as err:
            self._why[node_name] = f"no prior: cannot propagate through {err}"
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
        if kind == "attr":  # a tensor of the model
            owner, _, attr = op.target.rpartition(".")
            return getattr(self.modules[owner], attr)
        if kind == "structural":
            return self._structural(op)
        inputs = [self._state(a) for a in op.inputs]
        for state in inputs:
            if isinstance(state, _Missing):
                return state
        try:
            for state in inputs:
                if not isinstance(state, (transitions.Sample, transitions.Moments, structural.Layout)):
                    raise Unsupported(f"an input that is a {type(state).__name__}, not activations")
            if kind == "pass":  # contiguous, clone: a reshaped state stays one
                return inputs[0]
            inputs = [structural.settle(s) for s in inputs]
            return self._apply(op, inputs)
        except Unsupported as err:
            raise Unsupported(f"cannot propagate through {op.label} ({err})") from None

    def _resolve(self, value):
        if isinstance(value, _Ref):
            return self._state(value.name)
        if isinstance(value, tuple):
            return tuple(self._resolve(v) for v in value)
        if isinstance(value, slice):
            return slice(self._resolve(value.start), self._resolve(value.stop), self._resolve(value.step))
        return value

    def _structural(self, op: _Op):
        """A slice, split, reshape, product, mean, upsampling, drop-path or functional convolution
        (:mod:`bkn.transitions.structural`); its arguments may be states, sizes or the model's tensors."""
        rule, args, kwargs = op.args
        args, kwargs = self._resolve(args), {k: self._resolve(v) for k, v in kwargs}
        for value in (*args, *kwargs.values()):
            if isinstance(value, _Missing):
                return value
        try:
            return structural.apply(self.transition, rule, args, kwargs)
        except Unsupported as err:
            raise Unsupported(f"cannot propagate through {op.label} ({err})") from None

    def _call(self, op: _Op):
        """A size, integer arithmetic on sizes, or a zero padding (its amounts may be such values)."""
        args = [self._resolve(a) for a in ((_Ref(op.inputs[0]),) if op.kind == "size" else ()) + op.args]
        for a in args:
            if isinstance(a, _Missing):
                return a
        try:
            if op.kind == "size":
                state, dim = args[0], (args[1] if len(args) > 1 else None)
                if isinstance(state, structural.Layout):
                    shape = state.shape
                elif isinstance(state, transitions.Sample):
                    shape = (None, *state.value.shape[1:])
                else:
                    shape = (None, state.channels, *state.spatial)  # the batch is not a statistic
                return shape if dim is None else shape[dim]
            if op.kind == "arith":
                if any(a is None for a in args):
                    raise Unsupported("arithmetic on the batch size")
                return getattr(operator, op.target)(*args)
            state, pad, mode, value = args
            state = structural.settle(state)
            if not all(isinstance(p, int) for p in pad):
                raise Unsupported(f"padding amounts {pad}")
            rank = 1 + (len(state.value.shape) - 2 if isinstance(state, transitions.Sample) else len(state.spatial))
            if len(pad) % 2 or len(pad) > 2 * rank:
                raise Unsupported(f"padding {tuple(pad)} of a {rank + 1}-d activation")
            if len(pad) <= 2 * (rank - 1):  # positions only
                return structural.pad_spatial(state, tuple(pad), mode, value)
            if any(pad[: 2 * (rank - 1)]) or mode != "constant" or value:
                raise Unsupported(f"{mode} padding {tuple(pad)} with value {value} of channels and positions")
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
