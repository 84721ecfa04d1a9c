"""The hooks that connect a converted model to its prior chain (installed by :meth:`~bkn.chain.PriorChain.attach`).

They hold the chain (a :class:`~bkn.chain.PriorChain`) without importing its class: the
chain's module imports this one.
"""

from __future__ import annotations


class _NewForward:
    """Forward pre-hook on the converted model: a new forward forgets the previous one's states."""

    def __init__(self, chain):
        self.chain = chain

    def __call__(self, module, args):
        chain = self.chain
        chain._reset()
        if module.training:
            chain._last, chain._last_order = {}, []


class _Provider:
    """Callable stored on a BKN layer: asks the chain for that layer's prior."""

    def __init__(self, chain, node_name: str):
        self.chain, self.node_name = chain, node_name

    def __call__(self):
        return self.chain.prior(self.node_name)


_NOT_ASKED = object()


class _Recorder:
    """Forward hook on a BKN layer: marks it as run in this forward (its spatial size, the tensor
    it read) and records whether it used a prior, and why not."""

    def __init__(self, chain, node_name: str):
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
