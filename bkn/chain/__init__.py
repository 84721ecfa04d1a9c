"""Prior chains: each BKN layer's prior, computed from the posteriors of earlier layers.

A :class:`PriorChain` is built from a ``torch.fx`` trace of a model, kept as a flat
table of :class:`_Op` (names, kinds and input names: no ``torch.fx`` objects, so a
converted model deep-copies and pickles). For each BKN layer it knows the sub-graph
between the layer and the normalization layers that feed it (convolutions, activations,
pooling, residual sums, channel padding and concatenation, and the structural ops of
:mod:`bkn.transitions.structural`: slices, splits, reshapes, gates, means, upsampling, drop-path).
When a BKN layer runs in training mode it asks the chain for its prior; the chain evaluates that sub-graph on
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

The package, one job a module: :mod:`~bkn.chain.graph` (the traced graph as a flat table),
:mod:`~bkn.chain.plan` (each layer's route and the report rows), :mod:`~bkn.chain.propagate`
(the priors of a training forward), :mod:`~bkn.chain.hooks` (the hooks on the model),
:mod:`~bkn.chain.structural_ops` (which nodes have a structural rule) and
:mod:`~bkn.chain.core` (:class:`PriorChain`, which combines them).
"""

from .core import PriorChain
from .graph import _Op, _Ref  # noqa: F401  (private: kept where pickles of converted models look for them)
from .hooks import _NewForward, _Provider, _Recorder  # noqa: F401  (idem)
from .plan import FIRST_LAYER, NOT_RUN, PART_INPUT, PriorRoute, format_report
from .propagate import _Missing  # noqa: F401  (idem)

__all__ = ["FIRST_LAYER", "NOT_RUN", "PART_INPUT", "PriorChain", "PriorRoute", "format_report"]
