"""The analytic transition's Triton kernels (``bkn/kernels/triton_analytic.py``) in Triton's interpreter,
against the Python reference (``bkn/transitions/``), float64 and float32, forward and backward.

The reference is the rules' ``compiled=False`` path: the ReLU moments' and norm-ReLU moments'
closed forms, the convolution rule's tap sums and matrix products (``einsum`` per group). Each
Triton Function's outputs and gradients (``torch.autograd.grad`` with random output gradients)
are compared with the reference's; gradcheck in float64 runs on both. Shapes are small (the
interpreter runs a program at a time) with odd channel counts; the broad matrix is marked slow.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from triton_interpreter import compile_for_gpu, interpreted_kernels

from bkn.transitions import convolution
from bkn.transitions.activation_moments import _NormReluMoments, relu_moments

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-13), torch.float32: dict(rtol=2e-5, atol=2e-6)}


@pytest.fixture
def fns(monkeypatch):
    with interpreted_kernels(monkeypatch):
        yield importlib.import_module("bkn.kernels.triton_analytic_functions")


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _close(got, want, dtype):
    """Equal to float rounding: ``rtol``, and ``atol`` relative to the tensor's largest value (a gradient
    that is a difference of larger terms keeps their absolute rounding error, not its own relative one)."""
    tol = TOL[dtype]
    scale = max(1.0, float(want.detach().abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * scale)


def _compare(run_triton, run_reference, inputs, dtype, n_outputs=2):
    """Outputs and input gradients (for the same random output gradients) of both, to float rounding."""
    a, b = _leaves(*inputs), _leaves(*inputs)
    out_t, out_r = run_triton(*a), run_reference(*b)
    grads = [torch.randn_like(o) for o in out_r[:n_outputs]]
    for o_t, o_r in zip(out_t, out_r):
        _close(o_t, o_r, dtype)
    d_t = torch.autograd.grad(out_t, a, grads)
    d_r = torch.autograd.grad(out_r, b, grads)
    for x, y in zip(d_t, d_r):
        _close(x, y, dtype)


def _moments(groups, channels, dtype, spread=1.0):
    mean = torch.randn(groups, channels, dtype=dtype) * spread
    var = torch.rand(groups, channels, dtype=dtype) * 2 + 0.05
    return mean, var


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_relu_moments(fns, dtype):
    mean, var = _moments(3, 7, dtype, spread=3)
    var[0, :3] = torch.tensor([0.0, 1e-30, 1e-12], dtype=dtype)  # at and below the variance floor
    _compare(fns.relu_moments, lambda m, v: relu_moments(m, v, compiled=False), (mean, var), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("extra", [False, True])
def test_norm_relu_moments(fns, dtype, extra):
    groups, channels, eps = 3, 5, 1e-5
    var = torch.rand(groups, channels, dtype=dtype) + 1e-4
    weight, bias = torch.randn(channels, dtype=dtype), torch.randn(channels, dtype=dtype)
    inputs = [var, weight, bias]
    if extra:
        inputs += list(_moments(groups, channels, dtype))

    def reference(v, w, b, *more):
        return _NormReluMoments.apply(v, w, b, eps, False, *(more or (None, None)))

    def triton(v, w, b, *more):
        return fns.norm_relu_moments(v, w, b, eps, *more)

    _compare(triton, reference, inputs, dtype)


def test_norm_relu_moments_takes_an_expanded_extra(fns):
    """Strided (stride-0) moments read in place: a norm's bias expanded over the groups as the extra mean."""
    var = torch.rand(4, 3, dtype=torch.float64) + 0.1
    w, b, e = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64), torch.randn(3).double()
    extra_mean, extra_var = e.expand(4, 3), var.t().contiguous().t()  # stride 0; column-major
    got = fns.norm_relu_moments(var, w, b, 1e-5, extra_mean, extra_var)
    want = _NormReluMoments.apply(var, w, b, 1e-5, False, extra_mean.contiguous(), extra_var.contiguous())
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-13)


# (out channels, in channels, kernel, groups): odd counts, 1x1, 3x3, a 1-d and a depthwise kernel
CONVS = [(5, 3, (3, 3), 1), (6, 4, (3, 3), 2), (3, 3, (3,), 3), (7, 9, (1, 1), 1)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", CONVS, ids=str)
def test_conv_moments(fns, dtype, shape):
    out_c, in_c, kernel, groups = shape
    weight = torch.randn(out_c, in_c // groups, *kernel, dtype=dtype)
    mean, var = _moments(3, in_c, dtype)

    def reference(w, m, v):
        return convolution.conv_moments(w, m, v, compiled=False, groups=groups)

    _compare(lambda w, m, v: fns.conv_moments(w, m, v, groups), reference, (weight, mean, var), dtype)


def test_conv_moments_channels_last_weight(fns):
    """A channels_last weight is read through its strides (its taps are one strided run)."""
    weight = torch.randn(5, 6, 3, 3, dtype=torch.float64).to(memory_format=torch.channels_last)
    mean, var = _moments(2, 6, torch.float64)
    _compare(
        lambda w, m, v: fns.conv_moments(w, m, v),
        lambda w, m, v: convolution.conv_moments(w, m, v, compiled=False),
        (weight, mean, var),
        torch.float64,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups,extra", [(1, False), (2, True)])
def test_norm_relu_then_conv_as_one_node(fns, dtype, groups, extra):
    """The fused node (a convolution right after a norm and a ReLU) equals the two reference rules in turn."""
    batch, channels, out_c, eps = 3, 6, 5 * groups, 1e-5
    var = torch.rand(batch, channels, dtype=dtype) + 1e-3
    w_n, b_n = torch.randn(channels, dtype=dtype), torch.randn(channels, dtype=dtype)
    weight = torch.randn(out_c, channels // groups, 3, 3, dtype=dtype)
    more = list(_moments(batch, channels, dtype)) if extra else []

    def reference(v, w, b, conv_w, *more):
        first, relu_var = _NormReluMoments.apply(v, w, b, eps, False, *(more or (None, None)))
        return convolution.conv_moments(conv_w, first, relu_var, compiled=False, groups=groups)

    def triton(v, w, b, conv_w, *more):
        return fns.norm_relu_conv_moments(v, w, b, eps, *(more or (None, None)), conv_w, groups)

    _compare(triton, reference, [var, w_n, b_n, weight, *more], dtype)


@pytest.mark.parametrize("in_place", [False, True])
def test_deferred_weight_grad_adds_the_rule_to_a_gradient(fns, in_place):
    """The deferred weight gradient: ``grad + dS1 + 2 W dS2`` in one pass, in place or not."""
    weight = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    g_mean, g_var = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    mean, var = _moments(4, 3, torch.float64)
    grad = torch.randn_like(weight)
    want = grad + convolution._tap_sums_grad(weight, g_mean.t() @ mean, g_var.t() @ var, compiled=False)
    base = grad.clone()
    got = fns.add_weight_grad(weight, (g_mean, mean, g_var, var), base, in_place)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    assert (got is base) == in_place and (in_place or torch.equal(base, grad))
    assert fns.add_weight_grad(weight, (g_mean, mean, g_var, var), grad.transpose(0, 1), in_place) is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tap_sums(fns, dtype):
    weight = torch.randn(5, 3, 3, 3, dtype=dtype)

    def reference(w):
        return convolution.tap_sums(w, compiled=False)

    _compare(fns.tap_sums, reference, (weight,), dtype)


def _gradchecks(fns):
    d = torch.float64
    mean, var = _moments(2, 3, d)
    w, b = torch.randn(3, dtype=d), torch.randn(3, dtype=d)
    weight = torch.randn(4, 3, 2, 2, dtype=d)
    grouped = torch.randn(3, 1, 2, dtype=d)
    return {
        "grouped reference": (
            lambda w, m, v: convolution.conv_moments(w, m, v, compiled=False, groups=3),
            (grouped, mean, var),
        ),
        "grouped": (lambda w, m, v: fns.conv_moments(w, m, v, 3), (grouped, mean, var)),
        "relu": (fns.relu_moments, (mean, var)),
        "norm relu": (lambda v, w, b, m, e: fns.norm_relu_moments(v, w, b, 1e-3, m, e), (var, w, b, mean, var + 1)),
        "conv": (lambda w, m, v: fns.conv_moments(w, m, v), (weight, mean, var)),
    }


def test_gradcheck_in_float64(fns):
    """gradcheck of the grouped rule, reference (which einsum alone covered before) and Triton Function."""
    for name in ("grouped reference", "grouped"):
        fn, inputs = _gradchecks(fns)[name]
        assert torch.autograd.gradcheck(fn, tuple(_leaves(*inputs)), eps=1e-6, atol=1e-7), name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["relu", "norm relu", "conv"])
def test_gradcheck_of_each_triton_function(fns, name):
    fn, inputs = _gradchecks(fns)[name]
    assert torch.autograd.gradcheck(fn, tuple(_leaves(*inputs)), eps=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("out_per,in_per,kernel", [(3, 5, (3, 3)), (1, 1, (3, 3)), (9, 7, (5,)), (17, 33, (1, 1))])
def test_conv_moments_matrix(fns, dtype, groups, out_per, in_per, kernel):
    weight = torch.randn(out_per * groups, in_per, *kernel, dtype=dtype)
    for batch in (1, 4, 5):
        mean, var = _moments(batch, in_per * groups, dtype)

        def reference(w, m, v):
            return convolution.conv_moments(w, m, v, compiled=False, groups=groups)

        _compare(lambda w, m, v: fns.conv_moments(w, m, v, groups), reference, (weight, mean, var), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups,channels", [(1, 1), (2, 33), (4, 129), (5, 300)])
def test_relu_and_norm_relu_matrix(fns, dtype, groups, channels):
    mean, var = _moments(groups, channels, dtype, spread=4)
    _compare(fns.relu_moments, lambda m, v: relu_moments(m, v, compiled=False), (mean, var), dtype)
    w, b = torch.randn(channels, dtype=dtype), torch.randn(channels, dtype=dtype)
    _compare(
        lambda v, w, b, m, e: fns.norm_relu_moments(v, w, b, 1e-5, m, e),
        lambda v, w, b, m, e: _NormReluMoments.apply(v, w, b, 1e-5, False, m, e),
        (var, w, b, mean, var),
        dtype,
    )


@pytest.mark.slow
def test_double_backward_of_the_conv_rule(fns):
    """A backward with create_graph runs the rule as tensor ops: gradgradcheck holds."""
    d = torch.float64
    mean, var = _moments(2, 4, d)
    weight = torch.randn(6, 2, 3, dtype=d)
    assert torch.autograd.gradgradcheck(lambda w, m, v: fns.conv_moments(w, m, v, 2), tuple(_leaves(weight, mean, var)))


@pytest.mark.slow
def test_kernels_compile_for_a_gpu_target():
    """The kernels go through triton's compiler for CUDA sm_90 (no GPU needed), in a fresh process
    without the interpreter: ``tests/triton_compile.py``."""
    assert compile_for_gpu("analytic").count("ok ") == 16
