"""The analytic transition's convolution-rule weight gradient, added by a hook on the weight
(:mod:`bkn.transitions.weight_grads`): the gradients are the ones autograd forms without it.

Each test compares a converted model whose rule gradients are deferred with the same model
where they are not (``DeferredWeightGrads.defer`` refusing: the rule's dense gradient goes
through autograd as before), bit for bit.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import resnet18

import bkn
from bkn.layers import _native
from bkn.transitions import weight_grads
from bkn.transitions.weight_grads import DeferredWeightGrads

pytestmark = pytest.mark.skipif(
    _native.load() is None or weight_grads._graph_task is None,
    reason="needs the compiled kernels and torch._C._current_graph_task_id",
)


def _model(seed=0):
    torch.manual_seed(seed)
    return bkn.convert(resnet18(num_classes=10), "bkn", transition="analytic", group_size=2).train()


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)


def _loss(model, seed=1):
    x, y = _batch(seed)
    return F.cross_entropy(model(x), y)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def counted(monkeypatch):
    """Records, per weight the hooks added a rule gradient to, where: ``"new"`` (the tensor hook
    returned the sum) or ``"into .grad"`` (the post-accumulate-grad hook added it in place)."""
    applied = []
    apply, apply_accumulated = DeferredWeightGrads.apply, DeferredWeightGrads.apply_accumulated

    def counting(self, weight, grad):
        out = apply(self, weight, grad)
        if out is not None:
            applied.append("new")
        return out

    def counting_accumulated(self, weight):
        entry = self._pending.get(id(weight))
        if entry is not None and entry[0] == weight_grads._graph_task():
            applied.append("into .grad")
        apply_accumulated(self, weight)

    monkeypatch.setattr(DeferredWeightGrads, "apply", counting)
    monkeypatch.setattr(DeferredWeightGrads, "apply_accumulated", counting_accumulated)
    return applied


def _dense_reference(model_fn, loss_fn, monkeypatch):
    """The gradients with every rule gradient through autograd (nothing deferred)."""
    with monkeypatch.context() as m:
        m.setattr(DeferredWeightGrads, "defer", lambda self, weight, factors: False)
        model = model_fn()
        loss_fn(model).backward()
        return _grads(model)


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_backward_gives_the_dense_gradients_bit_for_bit(monkeypatch, counted):
    expected = _dense_reference(_model, _loss, monkeypatch)
    assert not counted  # nothing deferred in the reference
    model = _model()
    _loss(model).backward()
    _assert_same(_grads(model), expected)
    # every convolution whose moments feed a prior had its rule gradient added into its fresh .grad
    assert counted == ["into .grad"] * (len(model._bkn_chain.norm_nodes) - 1)


def test_two_steps_accumulate_and_zero_grad_as_without_hooks(monkeypatch, counted):
    def two(model):
        loss = _loss(model, 1)
        loss.backward()
        return _loss(model, 2)  # backward of the caller: accumulated onto the first step's .grad

    expected = _dense_reference(_model, two, monkeypatch)
    model = _model()
    two(model).backward()
    _assert_same(_grads(model), expected)
    # the first backward adds into the fresh .grad; the second returns the sum, which autograd
    # then adds onto .grad as it adds the dense path's (old + (dW + rule), the same rounding)
    rules = len(model._bkn_chain.norm_nodes) - 1
    assert counted == ["into .grad"] * rules + ["new"] * rules


def test_a_hook_registered_after_the_chains_sees_the_whole_gradient(monkeypatch, counted):
    seen = []

    def build():
        model = _model()
        _loss(model).backward()  # the chain's hooks are installed now
        model.zero_grad(set_to_none=True)
        model.layer2[1].conv2.weight.register_hook(lambda g: seen.append(g.clone()))
        return model

    expected = _dense_reference(build, _loss, monkeypatch)
    (dense_seen,) = seen
    model = build()
    counted.clear()
    _loss(model).backward()
    _assert_same(_grads(model), expected)
    assert torch.equal(seen[1], dense_seen)  # the later hook saw dW + rule, not dW alone
    assert sorted(counted) == ["into .grad"] * (len(model._bkn_chain.norm_nodes) - 2) + ["new"]


def test_autograd_grad_with_respect_to_weights_gets_the_sum(monkeypatch):
    model = _model()
    weights = [p for n, p in model.named_parameters() if n.endswith("conv2.weight")]
    hooked = torch.autograd.grad(_loss(model), weights)
    assert all(p.grad is None for p in model.parameters())  # captured, not accumulated
    with monkeypatch.context() as m:
        m.setattr(DeferredWeightGrads, "defer", lambda self, weight, factors: False)
        dense = torch.autograd.grad(_loss(model), weights)
    for a, b in zip(hooked, dense):
        assert torch.equal(a, b)


def test_a_backward_that_skips_the_weights_leaves_nothing_behind(monkeypatch, counted):
    """autograd.grad with respect to the input runs the rule's backward but not the weights'
    accumulation: its deferred gradients must not reach the next backward's .grad."""
    model = _model()
    x, y = _batch()
    x.requires_grad_(True)
    torch.autograd.grad(F.cross_entropy(model(x), y), x)
    assert not any(counted) and all(p.grad is None for p in model.parameters())
    _loss(model).backward()
    _assert_same(_grads(model), _dense_reference(_model, _loss, monkeypatch))


def test_a_weight_with_an_earlier_hook_is_not_deferred(monkeypatch):
    """A hook installed before the chain's sees the whole gradient: that weight keeps the dense path."""
    seen = {}

    def build():
        model = _model()
        weight = model.layer1[0].conv2.weight
        weight.register_hook(lambda g: seen.__setitem__(len(seen), g.clone()))
        return model

    expected = _dense_reference(build, _loss, monkeypatch)
    dense_seen = seen.pop(0)
    model = build()
    _loss(model).backward()
    _assert_same(_grads(model), expected)
    assert torch.equal(seen[0], dense_seen)
    registry = model._bkn_chain.transition._weight_grads
    assert registry.accepts(model.layer1[0].conv2.weight) is False
    assert registry.accepts(model.layer1[1].conv2.weight) is True


def test_copies_and_pickles_install_their_own_hooks(monkeypatch):
    model = _model()
    _loss(model).backward()  # the original's weights have hooks now
    model.zero_grad(set_to_none=True)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    expected = _dense_reference(_model, _loss, monkeypatch)
    for other in (copy.deepcopy(model), loaded):
        registry = other._bkn_chain.transition._weight_grads
        assert registry is not model._bkn_chain.transition._weight_grads and not registry._pending
        _loss(other).backward()
        _assert_same(_grads(other), expected)


def test_a_loss_through_the_prior_alone_says_why_it_cannot_be_completed():
    model = _model()
    layer = model.layer1[0].bn2  # its prior comes through conv2, whose output it then normalizes
    provider, priors = layer.prior_provider, []
    layer.prior_provider = lambda: priors.append(provider()) or priors[-1]
    model(_batch()[0])
    assert layer.prior_used
    mean, var = priors[0]  # conv2's weight reaches these through the chain only, not through conv2's output
    with pytest.raises(RuntimeError, match="through a BKN prior only.*detach_prior=True"):
        (mean.sum() + var.sum()).backward()


def test_create_graph_backward_stays_differentiable_through_the_weights():
    """A double backward (create_graph) takes the dense path: its weight gradient is a graph."""
    model = _model()
    weight = model.layer1[0].conv2.weight
    (grad,) = torch.autograd.grad(_loss(model), weight, create_graph=True)
    assert grad.requires_grad
    (second,) = torch.autograd.grad(grad.square().sum(), weight)
    assert torch.isfinite(second).all() and second.abs().sum() > 0


def test_a_gradient_the_kernel_does_not_take_gets_the_same_sum_in_torch_ops():
    weight = torch.nn.Parameter(torch.randn(6, 5, 3, 3, dtype=torch.float64))
    g_mean, mean = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    g_var, var = torch.randn(2, 6, dtype=torch.float64), torch.rand(2, 5, dtype=torch.float64)
    base = torch.randn(3, 3, 5, 6, dtype=torch.float64).permute(3, 2, 0, 1)  # W's shape, not contiguous
    expected = base + (g_mean.t() @ mean)[..., None, None] + 2 * weight.detach() * (g_var.t() @ var)[..., None, None]
    registry = DeferredWeightGrads()
    with torch.no_grad():  # outside a backward both calls see the same (no) graph task
        assert registry.defer(weight, (g_mean, mean, g_var, var))
        torch.testing.assert_close(registry.apply(weight, base), expected)
        assert registry.apply(weight, base) is None  # applied once
        contiguous = base.contiguous()
        registry.defer(weight, (g_mean, mean, g_var, var))
        torch.testing.assert_close(registry.apply(weight, contiguous), expected)  # the compiled kernel


@pytest.mark.parametrize("in_channels", [5, 8, 13])  # the vector loops take 8 rows at a time: the rest, and none
def test_the_hook_pass_equals_the_formula_in_float32(in_channels):
    gen = torch.Generator().manual_seed(in_channels)
    weight = torch.nn.Parameter(torch.randn(3, in_channels, 3, 3, generator=gen))
    g_mean, g_var = torch.randn(2, 3, generator=gen), torch.randn(2, 3, generator=gen)
    mean, var = torch.randn(2, in_channels, generator=gen), torch.rand(2, in_channels, generator=gen)
    base = torch.randn(weight.shape, generator=gen)
    d_sum, d_sq = (g_mean.t() @ mean)[..., None, None], (g_var.t() @ var)[..., None, None]
    registry = DeferredWeightGrads()
    with torch.no_grad():
        registry.defer(weight, (g_mean, mean, g_var, var))
        got = registry.apply(weight, base)
    torch.testing.assert_close(got, base + (d_sum + 2 * weight.detach() * d_sq), rtol=1e-6, atol=1e-6)
