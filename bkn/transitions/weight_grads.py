"""The convolution rule's weight gradient, added to the convolution's own in one pass.

The analytic transition propagates moments through a convolution with the tap sums of its
weight (``S1 = sum_taps W``, ``S2 = sum_taps W^2``, see :class:`~bkn.transitions.convolution._ConvMoments`),
so the prior's gradient reaches the weight as a second dense gradient,
``dW_rule = dS1 + 2 W dS2`` (broadcast over the taps). Left to autograd, that is two more
passes over every convolution weight each step: the rule writes ``dW_rule``, then
autograd adds the convolution's own ``dW`` into it, reading both. In a ResNet-18 step at
batch 8 that is 45 MB of weights, about a twentieth of the step.

:class:`DeferredWeightGrads` instead keeps the rule's small factors (``g_mean, mean,
g_var, var``: (G, O) and (G, I)) when its backward runs, returns no gradient for the
weight, and adds ``dW_rule`` to the weight's total gradient in a tensor hook on the weight
(``Tensor.register_hook``), reading the convolution's ``dW`` and ``W`` and writing the sum
once. The sum is the one autograd would form (the same operations), so ``.grad`` does not
change.

Why this is safe whatever the order autograd runs the two backwards in: the rule's node
keeps its edge to the weight (it returns ``None`` for it), so the engine runs the weight's
accumulation, and the hook, only after the rule's backward has run. A deferral is tagged
with the backward pass it belongs to (``torch._C._current_graph_task_id``): one left
over by a backward that did not reach the weight (``torch.autograd.grad`` with respect to
something else) is dropped, as autograd would drop that gradient. ``torch.autograd.grad``
with respect to the weight gets the sum too: tensor hooks also run on captured gradients.

Where the sum is written: when the weight has no ``.grad`` yet (``zero_grad(set_to_none=True)``,
torch's default) and its gradient is accumulated (``backward``, not ``torch.autograd.grad``),
the tensor hook leaves the gradient as it is and a post-accumulate-grad hook
(``Tensor.register_post_accumulate_grad_hook``) adds the rule's part into ``.grad`` in
place: autograd makes the convolution's ``dW`` the ``.grad`` itself, so the pass reads ``W``
and ``.grad`` and writes ``.grad`` back, where a new tensor for the sum costs a third stream
of memory. The values are the same (``dW + rule``, the sum autograd forms). Otherwise (a
``.grad`` to accumulate onto, a captured gradient, or another tensor hook registered after
this one, which must see the whole gradient) the tensor hook returns the sum as a new tensor.

Not deferred (the rule's dense gradient, as before): a weight that is not a leaf (a
parametrization, ``.to`` of another dtype), that does not require grad, that had
tensor hooks or post-accumulate-grad hooks before the chain first used it (they would see part
of the gradient), a backward with ``create_graph``, and a torch without ``_current_graph_task_id``. A loss that
reaches a weight *only* through the prior (no gradient from the convolution itself, which
no training loss does) cannot be completed from a hook; that raises an error that says so.
"""

from __future__ import annotations

import weakref

import torch

from .. import kernels
from . import _backend
from .convolution import _tap_sums_grad

_graph_task = getattr(torch._C, "_current_graph_task_id", None)
_will_execute = getattr(torch._C, "_will_engine_execute_node", None)
_gradient_edge = getattr(torch.autograd.graph, "get_gradient_edge", None)


class DeferredWeightGrads:
    """Pending convolution-rule weight gradients of one transition, applied by hooks on the weights.

    :meth:`defer` (from the rule's backward) records ``(g_mean, mean, g_var, var)`` for a
    weight and installs the weight's hook on first use; the hook (:class:`_AddDeferred`)
    calls :meth:`apply` with the weight's total gradient from autograd.
    """

    def __init__(self):
        self._pending: dict[int, tuple[int, list]] = {}  # id(weight) -> (backward pass, factors)
        # id(weight) -> (weak reference, whether its gradients are deferred): a plain dict, where a
        # WeakIdKeyDictionary lookup builds a weak reference per call (it runs per weight per step)
        self._hooked: dict[int, tuple[weakref.ref, bool]] = {}
        # id(weight) -> its gradient accumulator (autograd's node), once asked for: kept, so that
        # autograd keeps using this one node (as DDP keeps them), and found without the view
        # that torch.autograd.graph.get_gradient_edge makes per call
        self._accumulators: dict[int, object] = {}

    def __getstate__(self):
        # Hooks and pending gradients belong to this process's weights: a copy starts afresh.
        return {}

    def __setstate__(self, state):
        self.__init__()

    def accepts(self, weight: torch.Tensor) -> bool:
        """Whether ``weight``'s rule gradient can be deferred (installs the hook on first use)."""
        if _graph_task is None or not weight.is_leaf or not weight.requires_grad:
            return False
        entry = self._hooked.get(id(weight))
        if entry is not None and entry[0]() is weight:
            return entry[1]
        # hooks of others would see part of the gradient
        known = not weight._backward_hooks and not getattr(weight, "_post_accumulate_grad_hooks", None)
        if known:
            weight.register_hook(_AddDeferred(self, weight))
            weight.register_post_accumulate_grad_hook(_AddIntoGrad(self))
        key = id(weight)
        self._hooked[key] = (weakref.ref(weight, lambda _, d=self._hooked, k=key: d.pop(k, None)), known)
        return known

    def defer(self, weight: torch.Tensor, factors: tuple) -> bool:
        """Keep ``factors`` (g_mean, mean, g_var, var) for ``weight``'s hook; False if not deferrable."""
        if torch.is_grad_enabled() or not self.accepts(weight):  # grad enabled: a create_graph backward
            return False
        task = _graph_task()
        entry = self._pending.get(id(weight))
        if entry is None or entry[0] != task:  # none yet in this backward (a stale one is dropped)
            entry = self._pending[id(weight)] = (task, [])
        entry[1].append(factors)
        return True

    def apply(self, weight: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor | None:
        """``grad`` plus the rule gradients deferred for ``weight`` in this backward (None: unchanged,
        also where they are left to :meth:`apply_accumulated`, see :meth:`_into_grad`)."""
        entry = self._pending.get(id(weight))
        if entry is None or entry[0] != _graph_task():
            self._pending.pop(id(weight), None)
            return None
        if grad is not None and self._into_grad(weight):
            return None  # added into .grad once autograd has made grad the .grad (apply_accumulated)
        del self._pending[id(weight)]
        if grad is None:
            raise RuntimeError(
                f"bkn: a convolution weight of shape {tuple(weight.shape)} gets a gradient through a BKN prior "
                "only: the analytic transition adds its part to the convolution's own weight gradient, and no "
                "such gradient reached the weight in this backward. Differentiate a loss of the network's "
                "outputs, or build the prior with detach_prior=True."
            )
        return _add_rules(weight, grad, entry[1], in_place=False)

    def _into_grad(self, weight: torch.Tensor) -> bool:
        """Whether the rule's part of ``weight``'s gradient can wait for the post-accumulate-grad hook:
        no ``.grad`` yet (autograd makes this gradient the ``.grad``, so adding into it gives the sum
        autograd forms, bit for bit), this registry's hook the only tensor hook (a later one must
        see the whole gradient) and the weight's accumulation part of this backward (not a gradient
        that ``torch.autograd.grad`` captures)."""
        if _will_execute is None or _gradient_edge is None:
            return False
        if weight.grad is not None or len(weight._backward_hooks) != 1:
            return False
        node = self._accumulators.get(id(weight))
        if node is None:
            node = self._accumulators[id(weight)] = _gradient_edge(weight).node
        try:
            return _will_execute(node)
        except RuntimeError:  # torch.autograd.grad: torch does not answer for leaves, whose gradients it captures
            return False

    def apply_accumulated(self, weight: torch.Tensor) -> None:
        """Add the rule gradients left by :meth:`apply` into ``weight.grad``, in place."""
        entry = self._pending.pop(id(weight), None)
        if entry is not None and entry[0] == _graph_task():
            _add_rules(weight, weight.grad, entry[1], in_place=True)


def _add_rules(weight: torch.Tensor, grad: torch.Tensor, factors: list, in_place: bool) -> torch.Tensor:
    """``grad`` plus the rule gradient of each ``(g_mean, mean, g_var, var)`` in ``factors``: a new
    tensor, or written into ``grad`` itself with ``in_place``. One pass of the compiled kernel
    each (the C++ one, or the Triton one where ``bkn.kernels.backend_for`` says ``triton``), or the
    same sum in torch ops for a gradient it does not take (not contiguous)."""
    which = _backend.backend(weight)
    native = kernels.native_module(which)
    for g_mean, mean, g_var, var in factors:
        total = None
        if which == "triton":
            total = _backend.triton_functions().add_weight_grad(weight, (g_mean, mean, g_var, var), grad, in_place)
        elif native is not None:
            total = native.conv_moments_weight_grad(weight, g_mean, mean, g_var, var, grad, in_place)
        if total is None:
            rule = _tap_sums_grad(weight, g_mean.t() @ mean, g_var.t() @ var, compiled=False)
            total = grad.add_(rule) if in_place else grad + rule
        grad = total
    return grad


class _AddIntoGrad:
    """Post-accumulate-grad hook on a convolution weight (which autograd passes it): adds the gradients
    :meth:`DeferredWeightGrads.apply` left into ``.grad`` (a weak reference to the registry only)."""

    __torch_unserializable__ = True

    def __init__(self, registry: DeferredWeightGrads):
        self.registry = weakref.ref(registry)

    def __call__(self, weight):
        registry = self.registry()
        if registry is not None:
            registry.apply_accumulated(weight)


class _AddDeferred:
    """Tensor hook on a convolution weight: adds the deferred rule gradients (weak references
    only, so the hook keeps neither the weight nor the chain alive)."""

    __torch_unserializable__ = True  # torch.save drops tensor hooks; the chain reinstalls it

    def __init__(self, registry: DeferredWeightGrads, weight: torch.Tensor):
        self.registry, self.weight = weakref.ref(registry), weakref.ref(weight)

    def __call__(self, grad):
        registry, weight = self.registry(), self.weight()
        if registry is None or weight is None:
            return None
        return registry.apply(weight, grad)
