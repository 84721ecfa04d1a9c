"""The transitions' fast paths give the numbers of their direct formulas (values and gradients).

The analytic transition's ReLU rule and convolution tap sums are autograd Functions with
hand-written backwards (fewer ops per step, see ``bkn/transitions/activation_moments.py``
and ``bkn/transitions/convolution.py``); here
they are checked against the plain formula differentiated by autograd, and by gradcheck
in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import bkn
from bkn.transitions import Analytic, Moments, MonteCarlo
from bkn.transitions.analytic import conv_moments, norm_relu_moments, relu_moments, tap_sums
from bkn.transitions.state import NormOutput


def _relu_moments_direct(mean, var):
    """The rectified-Gaussian moments as plain tensor ops (what autograd differentiates)."""
    std = var.clamp_min(1e-20).sqrt()
    a = mean / std
    cdf = 0.5 * (1 + torch.erf(a / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    first = mean * cdf + std * pdf
    second = (mean * mean + var) * cdf + mean * std * pdf
    return first, (second - first * first).clamp_min(0)


def _values_and_grads(fn, mean, var, weights):
    mean, var = mean.clone().requires_grad_(), var.clone().requires_grad_()
    first, second = fn(mean, var)
    (first * weights[0] + second * weights[1]).sum().backward()
    return first.detach(), second.detach(), mean.grad, var.grad


@given(
    seed=st.integers(0, 2**31 - 1),
    size=st.integers(1, 64),
    scale=st.floats(0.01, 10.0),
    zeros=st.integers(0, 3),
)
def test_relu_moments_gradient_equals_the_direct_formula(seed, size, scale, zeros):
    gen = torch.Generator().manual_seed(seed)
    mean = scale * torch.randn(size, generator=gen, dtype=torch.float64)
    var = scale * torch.rand(size, generator=gen, dtype=torch.float64)
    var[: min(zeros, size)] = 0.0  # a point mass: the clamped branch
    weights = torch.randn(2, size, generator=gen, dtype=torch.float64)
    fast = _values_and_grads(relu_moments, mean, var, weights)
    direct = _values_and_grads(_relu_moments_direct, mean, var, weights)
    for a, b in zip(fast, direct):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_relu_moments_gradcheck_and_no_silent_double_backward():
    gen = torch.Generator().manual_seed(0)
    mean = (2 * torch.randn(12, generator=gen, dtype=torch.float64)).requires_grad_()
    var = (0.1 + torch.rand(12, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(relu_moments, (mean, var))
    first, _ = relu_moments(mean, var)
    (g,) = torch.autograd.grad(first.sum(), mean, create_graph=True)
    with pytest.raises(RuntimeError):  # once_differentiable: an error, not a wrong second derivative
        g.sum().backward()


@pytest.mark.parametrize("shape", [(5, 3, 3, 3), (4, 2, 1, 1), (3, 2, 5), (2, 3, 2, 2, 2), (6, 4)])
def test_tap_sums_values_gradients_and_gradcheck(shape):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    taps = tuple(range(2, w.dim()))
    s1, s2 = tap_sums(w)
    d1, d2 = (w.sum(taps), w.square().sum(taps)) if taps else (w, w.square())
    torch.testing.assert_close(s1, d1)
    torch.testing.assert_close(s2, d2)
    g1, g2 = torch.randn(s1.shape, generator=gen, dtype=torch.float64), torch.randn(s1.shape, generator=gen).double()
    (fast,) = torch.autograd.grad((s1 * g1 + s2 * g2).sum(), w)
    (direct,) = torch.autograd.grad((d1 * g1 + d2 * g2).sum(), w)
    torch.testing.assert_close(fast, direct)
    assert torch.autograd.gradcheck(tap_sums, (w,))
    assert torch.autograd.gradgradcheck(tap_sums, (w,))
    (only_first,) = torch.autograd.grad(tap_sums(w)[0].sum(), w)  # one output unused
    torch.testing.assert_close(only_first, torch.ones_like(w))


@pytest.mark.parametrize("groups", [1, 2])
def test_analytic_conv_equals_the_einsum_rule(groups):
    """The ungrouped fast path (two matrix products) against the rule as written in the docstring."""
    gen = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups, bias=True).double()
    mean = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    var = torch.rand(3, 4, generator=gen, dtype=torch.float64)
    out = Analytic().conv(conv, Moments(mean, var, (5, 5)))
    w = conv.weight.detach()
    per = 4 // groups
    expect_mean = torch.zeros(3, 6, dtype=torch.float64)
    expect_var = torch.zeros(3, 6, dtype=torch.float64)
    for o in range(6):
        g = o // (6 // groups)
        cols = slice(g * per, (g + 1) * per)
        expect_mean[:, o] = mean[:, cols] @ w[o].sum((1, 2)) + conv.bias.detach()[o]
        expect_var[:, o] = var[:, cols] @ w[o].square().sum((1, 2))
    torch.testing.assert_close(out.mean.detach(), expect_mean)
    torch.testing.assert_close(out.var.detach(), expect_var)
    assert out.spatial == (5, 5)


def test_tap_sums_of_a_channels_last_weight():
    # Converted to channels_last, a convolution's weight is not contiguous: the general path.
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w.requires_grad_(True)
    assert not w.is_contiguous()
    s1, s2 = tap_sums(w)
    torch.testing.assert_close(s1, w.sum((2, 3)))
    torch.testing.assert_close(s2, w.square().sum((2, 3)))
    assert torch.autograd.gradcheck(tap_sums, (w,))


# -- the compiled tap sums (bkn/csrc/analytic_tap_sums.cpp) against the Python path ---------------------


def _native_off() -> bool:
    from bkn.layers import _native

    return _native.load() is None


def _native_or_skip():
    from bkn.layers import _native

    native = _native.load()
    if native is None:
        pytest.skip("the compiled kernels are not available here (BKN_NATIVE=0 or the build failed)")
    return native


def _sums_and_grad(w, g1, g2, compiled):
    w = w.detach().clone().requires_grad_(True)
    s1, s2 = tap_sums(w, compiled=compiled)
    (grad,) = torch.autograd.grad((s1 * g1 + s2 * g2).sum(), w)
    return s1.detach(), s2.detach(), grad


@given(
    seed=st.integers(0, 2**31 - 1),
    out_c=st.integers(1, 9),
    in_c=st.integers(1, 7),
    kernel=st.sampled_from([(1, 1), (3, 3), (5, 5), (3,), (2, 3), (3, 3, 3)]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_compiled_tap_sums_equal_the_python_path(seed, out_c, in_c, kernel, dtype):
    """Values and gradient of the compiled kernel (the float32 3x3 one vectorized 4 rows at a
    time with SSE2, 8 with AVX2: row counts that are not multiples of 8 exercise the tails)
    against the Python path."""
    native = _native_or_skip()
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_c, in_c, *kernel, generator=gen, dtype=dtype)
    assert native.tap_sums(w), "the compiled path must take a contiguous CPU float32/float64 weight"
    g1 = torch.randn(out_c, in_c, generator=gen, dtype=dtype)
    g2 = torch.randn(out_c, in_c, generator=gen, dtype=dtype)
    fast = _sums_and_grad(w, g1, g2, compiled=True)
    python = _sums_and_grad(w, g1, g2, compiled=False)
    exact = _sums_and_grad(w.double(), g1.double(), g2.double(), compiled=False)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for a, b, c in zip(fast, python, exact):
        torch.testing.assert_close(a, b, **tol)
        torch.testing.assert_close(a.double(), c, **tol)


def test_compiled_tap_sums_gradcheck_and_fallbacks():
    native = _native_or_skip()
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(7, 5, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert native.tap_sums(w.detach())
    assert torch.autograd.gradcheck(lambda x: tap_sums(x, compiled=True), (w,))
    # A double backward runs the differentiable (Python) backward: the compiled one is not.
    assert torch.autograd.gradgradcheck(lambda x: tap_sums(x, compiled=True), (w,))
    # What the kernel does not take it says so (an empty list, None), and the Python path runs.
    strided = w.detach().contiguous(memory_format=torch.channels_last)
    assert native.tap_sums(strided) == [] and native.tap_sums(w.detach().half()) == []
    g = torch.ones(7, 5, dtype=torch.float64)
    assert native.tap_sums_backward(w.detach(), g, g.float()) is None
    assert native.tap_sums_backward(strided, g, g) is None


@given(
    seed=st.integers(0, 2**31 - 1),
    size=st.integers(1, 40),
    scale=st.floats(0.01, 10.0),
    zeros=st.integers(0, 3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_compiled_relu_moments_equal_the_python_path(seed, size, scale, zeros, dtype):
    native = _native_or_skip()
    gen = torch.Generator().manual_seed(seed)
    mean = scale * torch.randn(2, size, generator=gen, dtype=dtype)
    var = scale * torch.rand(2, size, generator=gen, dtype=dtype)
    var[0, : min(zeros, size)] = 0.0  # a point mass: the clamped branches
    assert native.relu_moments_forward(mean, var), "the compiled path must take contiguous CPU float32/float64"
    weights = torch.randn(2, 2, size, generator=gen, dtype=dtype)
    fast = _values_and_grads(lambda m, v: relu_moments(m, v, compiled=True), mean, var, weights)
    python = _values_and_grads(lambda m, v: relu_moments(m, v, compiled=False), mean, var, weights)
    tol = {"rtol": 1e-5, "atol": 1e-5 * scale} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12 * scale}
    for a, b in zip(fast, python):
        torch.testing.assert_close(a, b, **tol)


def test_compiled_relu_moments_take_an_expanded_mean_and_gradcheck():
    _native_or_skip()
    gen = torch.Generator().manual_seed(5)
    bias = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    var = (0.1 + torch.rand(3, 6, generator=gen, dtype=torch.float64)).requires_grad_()
    # A norm's output mean is its bias expanded over the groups (stride 0), as after_norm gives it.
    assert torch.autograd.gradcheck(lambda b, v: relu_moments(b.expand(3, 6), v, compiled=True), (bias, var))
    fast = relu_moments(bias.expand(3, 6), var, compiled=True)
    python = relu_moments(bias.expand(3, 6), var, compiled=False)
    for a, b in zip(fast, python):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _norm_relu_direct(var, weight, bias, eps):
    """ReLU moments of a norm's affine output, every step a tensor op (what autograd differentiates)."""
    out_var = weight.square() * (var / (var + eps))
    return _relu_moments_direct(bias.expand_as(var), out_var)


@given(
    seed=st.integers(0, 2**31 - 1),
    groups=st.integers(1, 5),
    channels=st.integers(1, 9),
    eps=st.sampled_from([1e-5, 1e-3, 0.5]),
    compiled=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_norm_relu_moments_equal_the_separate_ops(seed, groups, channels, eps, compiled, dtype):
    gen = torch.Generator().manual_seed(seed)
    var = (0.01 + 3 * torch.rand(groups, channels, generator=gen, dtype=dtype)).requires_grad_()
    weight = torch.randn(channels, generator=gen, dtype=dtype).requires_grad_()
    bias = torch.randn(channels, generator=gen, dtype=dtype).requires_grad_()
    g = torch.randn(2, groups, channels, generator=gen, dtype=dtype)
    fused = norm_relu_moments(NormOutput(var, weight, bias, eps), compiled=compiled)
    direct = _norm_relu_direct(var, weight, bias, eps)
    tol = {"rtol": 2e-5, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 1e-11, "atol": 1e-11}
    grads = [
        torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, g)), (var, weight, bias)) for out in (fused, direct)
    ]
    for a, b in zip((*fused, *grads[0]), (*direct, *grads[1])):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("compiled", [True, False])
def test_norm_relu_moments_gradcheck_and_the_lazy_moments(compiled):
    gen = torch.Generator().manual_seed(2)
    var = (0.1 + torch.rand(3, 4, generator=gen, dtype=torch.float64)).requires_grad_()
    weight = torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_()
    bias = torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_()
    fn = lambda v, w, b: norm_relu_moments(NormOutput(v, w, b, 1e-3), compiled=compiled)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (var, weight, bias))
    if compiled:  # one C++ autograd node (NormReluMomentsFn), not the Python Function
        assert "NormReluMomentsFn" in fn(var, weight, bias)[0].grad_fn.name() or _native_off()
    # differentiable once: a create_graph backward works, a double backward raises, not a wrong answer
    first, _ = fn(var, weight, bias)
    (g,) = torch.autograd.grad(first.square().sum(), var, create_graph=True)  # a gradient that requires grad
    torch.testing.assert_close(g, torch.autograd.grad(fn(var, weight, bias)[0].square().sum(), var)[0])
    with pytest.raises(RuntimeError, match="differentiable once|differentiate twice"):
        g.sum().backward()
    state = NormOutput(var, weight, bias, 1e-3, (5, 5))  # read as plain moments (e.g. by a conv): formed on use
    torch.testing.assert_close(state.mean, bias.expand(3, 4))
    torch.testing.assert_close(state.var, weight.square() * var / (var + 1e-3))
    assert state.channels == 4 and state.spatial == (5, 5)
    # Analytic.relu takes the one-node path for a norm's output and the plain rule otherwise: same numbers.
    plain = Moments(state.mean, state.var, state.spatial)
    for a, b in zip((Analytic().relu(state).mean, Analytic().relu(state).var), relu_moments(plain.mean, plain.var)):
        torch.testing.assert_close(a, b)


@given(
    seed=st.integers(0, 2**31 - 1),
    groups=st.integers(1, 4),
    channels=st.integers(1, 7),
    compiled=st.booleans(),
    shared=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_relu_of_a_residual_sum_with_a_norm_output_is_one_node_with_the_same_numbers(
    seed, groups, channels, compiled, shared, dtype
):
    """relu(bn(x) + identity): the moments of the sum, then the rectified Gaussian, and every gradient
    (the norm's posterior variance, gamma, beta and the other summand's moments) as the separate ops."""
    gen = torch.Generator().manual_seed(seed)
    var = (0.01 + 3 * torch.rand(groups, channels, generator=gen, dtype=dtype)).requires_grad_()
    weight = torch.randn(channels, generator=gen, dtype=dtype).requires_grad_()
    bias = torch.randn(channels, generator=gen, dtype=dtype).requires_grad_()
    rows = 1 if shared else groups  # the other summand's moments may be shared by the groups
    other_mean = torch.randn(rows, channels, generator=gen, dtype=dtype).requires_grad_()
    other_var = (0.01 + torch.rand(rows, channels, generator=gen, dtype=dtype)).requires_grad_()
    g = torch.randn(2, groups, channels, generator=gen, dtype=dtype)
    total = Analytic().add(Moments(other_mean, other_var, (4, 4)), NormOutput(var, weight, bias, 1e-3, (4, 4)))
    assert total.channels == channels and total.spatial == (4, 4)
    # the transition's path (compiled where the kernels are), or the Python one
    fused = Analytic().relu(total) if compiled else Moments(*norm_relu_moments(total.norm, False, total.other))
    direct_var = weight.square() * (var / (var + 1e-3)) + other_var
    direct = _relu_moments_direct(bias.expand_as(var) + other_mean, direct_var)
    tol = {"rtol": 2e-5, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 1e-11, "atol": 1e-11}
    inputs = (var, weight, bias, other_mean, other_var)
    grads = [
        torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, g)), inputs)
        for out in ((fused.mean, fused.var), direct)
    ]
    for a, b in zip((fused.mean, fused.var, *grads[0]), (*direct, *grads[1])):
        torch.testing.assert_close(a, b, **tol)
    # read as plain moments (e.g. by a convolution): the sum, formed on use
    torch.testing.assert_close(total.var, direct_var)


@pytest.mark.parametrize("compiled", [True, False])
def test_relu_of_a_residual_sum_gradcheck(compiled):
    gen = torch.Generator().manual_seed(3)
    f64 = {"generator": gen, "dtype": torch.float64}
    var = (0.1 + torch.rand(2, 3, **f64)).requires_grad_()
    weight, bias = torch.randn(3, **f64).requires_grad_(), torch.randn(3, **f64).requires_grad_()
    other_mean, other_var = torch.randn(2, 3, **f64).requires_grad_(), (0.1 + torch.rand(2, 3, **f64)).requires_grad_()

    def fn(v, w, b, m, s):
        return norm_relu_moments(NormOutput(v, w, b, 1e-3), compiled=compiled, extra=Moments(m, s))

    assert torch.autograd.gradcheck(fn, (var, weight, bias, other_mean, other_var))


def test_compiled_norm_relu_moments_take_shared_extras_and_equal_the_python_path():
    native = _native_or_skip()
    gen = torch.Generator().manual_seed(4)
    f64 = {"generator": gen, "dtype": torch.float64}
    var, weight, bias = 0.1 + torch.rand(3, 5, **f64), torch.randn(5, **f64), torch.randn(5, **f64)
    g_first, g_var = torch.randn(3, 5, **f64), torch.randn(3, 5, **f64)
    for extra in (None, (torch.randn(5, **f64), torch.rand(5, **f64))) + tuple(
        (torch.randn(rows, 5, **f64), torch.rand(rows, 5, **f64)) for rows in (1, 3)
    ):
        out = native.norm_relu_moments_forward(var, weight, bias, 1e-3, *(extra or (None, None)))
        assert out, "the compiled kernel did not take these tensors"
        leaves = [t.clone().requires_grad_() for t in (var, weight, bias, *(extra or ()))]
        state = NormOutput(*leaves[:3], 1e-3)
        python = norm_relu_moments(state, False, None if extra is None else Moments(*leaves[3:]))
        torch.testing.assert_close(out[0], python[0], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(out[1], python[1], rtol=1e-13, atol=1e-13)
        saved = [out[i] for i in (2, 3, 4, 5, 6, 0, 7, 8)]  # mean_in, var_in, std, cdf, pdf, first, raw, n
        grads = native.norm_relu_moments_backward(g_first, g_var, saved, var, weight, 1e-3)
        expected = torch.autograd.grad(python, leaves, (g_first, g_var))
        for got, want in zip(grads, expected):  # d var, d gamma, d beta (, the added moments': per group)
            torch.testing.assert_close(got.sum_to_size(want.shape), want, rtol=1e-12, atol=1e-12)
    # a dtype the kernel does not take: the Python path
    assert native.norm_relu_moments_forward(var.float(), weight, bias, 1e-3, None, None) == []


def _conv_moments_direct(w, mean, var):
    """The rule as written: tap sums by ``sum``, then matrix products (what autograd differentiates)."""
    taps = tuple(range(2, w.dim()))
    return mean @ w.sum(taps).t(), var @ w.square().sum(taps).t()


def _moments_and_grads(fn, w, mean, var, g_mean, g_var):
    w, mean, var = (t.detach().clone().requires_grad_(True) for t in (w, mean, var))
    out_mean, out_var = fn(w, mean, var)
    grads = torch.autograd.grad((out_mean * g_mean + out_var * g_var).sum(), (w, mean, var))
    return (out_mean.detach(), out_var.detach(), *grads)


@given(
    seed=st.integers(0, 2**31 - 1),
    # 6: a sweep of 4 groups and one of 2 in the AVX2 loops; 17: more than the fused kernel takes
    groups=st.sampled_from([1, 2, 3, 4, 6, 17]),
    out_c=st.integers(1, 9),
    in_c=st.integers(1, 21),  # 8 inputs at a time with AVX2 (float32), and a tail
    kernel=st.sampled_from([(1, 1), (3, 3), (5, 5), (3,)]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_conv_moments_compiled_python_and_direct_agree(seed, groups, out_c, in_c, kernel, dtype):
    _native_or_skip()
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_c, in_c, *kernel, generator=gen, dtype=dtype)
    mean = torch.randn(groups, in_c, generator=gen, dtype=dtype)
    var = torch.rand(groups, in_c, generator=gen, dtype=dtype)
    g_mean = torch.randn(groups, out_c, generator=gen, dtype=dtype)
    g_var = torch.randn(groups, out_c, generator=gen, dtype=dtype)
    args = (w, mean, var, g_mean, g_var)
    fast = _moments_and_grads(lambda *a: conv_moments(*a, compiled=True), *args)
    python = _moments_and_grads(lambda *a: conv_moments(*a, compiled=False), *args)
    exact = _moments_and_grads(_conv_moments_direct, *(t.double() for t in args))
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for a, b, c in zip(fast, python, exact):
        torch.testing.assert_close(a, b, **tol)
        torch.testing.assert_close(a.double(), c, **tol)


@pytest.mark.parametrize("compiled", [True, False])
def test_conv_moments_gradcheck_gradgradcheck_and_unused_outputs(compiled):
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(5, 3, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    mean = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    var = torch.rand(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    fn = lambda *a: conv_moments(*a, compiled=compiled)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (w, mean, var))
    assert torch.autograd.gradgradcheck(fn, (w, mean, var))  # create_graph: the differentiable ops
    direct = _conv_moments_direct(w, mean, var)
    for used in (0, 1):  # one output unused: its gradient is None inside backward
        got = torch.autograd.grad(fn(w, mean, var)[used].sum(), (w, mean, var), allow_unused=True)
        expect = torch.autograd.grad(direct[used].sum(), (w, mean, var), retain_graph=True, allow_unused=True)
        for a, b in zip(got, expect):
            if b is None:
                assert a is None or not a.any()
            else:
                torch.testing.assert_close(a, b)
    frozen = w.detach()  # a frozen weight: no weight gradient is formed
    (g,) = torch.autograd.grad(fn(frozen, mean, var)[1].sum(), var)
    torch.testing.assert_close(g, frozen.square().sum((2, 3)).sum(0).expand(2, 3))


def test_compiled_conv_moments_do_not_depend_on_the_thread_count():
    """Forward, input gradients and weight gradient, float32 3x3 (the vector loops): bit for bit
    the same at 1 and 2 threads, at sizes the kernels split over threads."""
    _native_or_skip()
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(64, 203, 3, 3, generator=gen)
    mean, var = torch.randn(6, 203, generator=gen), torch.rand(6, 203, generator=gen)
    g_mean, g_var = torch.randn(6, 64, generator=gen), torch.randn(6, 64, generator=gen)
    threads, outs = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(_moments_and_grads(lambda *a: conv_moments(*a, compiled=True), w, mean, var, g_mean, g_var))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# -- the official transition's smaller surrogate (an option; the default is the authors') -------


def _conv() -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(8, 8, 3, padding=1, bias=False).double()


POSTERIOR = (0.3, 2.0)  # the previous layer's pre-normalization mean and variance, every channel


def _official_prior(scale: float, seed: int, size: int = 32) -> torch.Tensor:
    """The prior mean of a 3x3 conv layer fed by ReLU of a posterior-drawn surrogate of side ``size``."""
    conv = _conv()
    layer = bkn.norms.create("bkn", 8)
    layer.posterior = tuple(torch.full((1, 8), v, dtype=torch.float64) for v in POSTERIOR)
    gen = torch.Generator().manual_seed(seed)
    t = MonteCarlo(generator=gen, surrogate_scale=scale)
    state = t.after_norm(layer, (size, size))
    assert state.value.shape[-2:] == (math.ceil(size * scale),) * 2
    mean, _ = t.to_prior(t.module(conv, t.relu(state)))
    return mean.detach()[0]


def _expected_prior_mean(side: int) -> torch.Tensor:
    """E[spatial mean of conv(relu(x))] on a side x side map with zero padding, x ~ N(POSTERIOR) i.i.d.

    A tap at offset (dy, dx) sees the map at a share (side - |dy|)(side - |dx|) / side^2 of the
    output positions (zero padding elsewhere): the border share is what a smaller map pays.
    """
    relu_mean, _ = relu_moments(*(torch.tensor(v, dtype=torch.float64) for v in POSTERIOR))
    w = _conv().weight.detach()
    share = torch.tensor([(side - abs(d)) / side for d in (-1, 0, 1)], dtype=torch.float64)
    return relu_mean * (w * share[:, None] * share[None, :]).sum((1, 2, 3))


def test_smaller_surrogate_costs_the_expected_noise_and_border_bias():
    # The prior is a spatial mean over i.i.d. positions: a quarter of the positions (scale 0.5
    # in 2-d) doubles its sampling noise. Its expectation is the padded convolution's, with the
    # border share of the map drawn (derived above): checked at both sizes, so the option's bias
    # is the known one and nothing else. Seeds are the repeats.
    full = torch.stack([_official_prior(1.0, s) for s in range(200)])
    half = torch.stack([_official_prior(0.5, s) for s in range(200)])
    ratio = (half.std(0) / full.std(0)).median().item()
    assert 1.7 < ratio < 2.4, ratio
    for draws, side in ((full, 32), (half, 16)):
        se = draws.std(0) / math.sqrt(len(draws))
        assert ((draws.mean(0) - _expected_prior_mean(side)).abs() < 5 * se).all(), side
    # The instrument sees the bias: the half-size prior is not centred on the full-size expectation.
    assert ((half.mean(0) - _expected_prior_mean(32)).abs() > 5 * half.std(0) / math.sqrt(200)).any()


def test_surrogate_scale_is_an_official_option_reachable_from_convert():
    import torchvision

    with pytest.raises(ValueError, match="surrogate_scale"):
        MonteCarlo(surrogate_scale=0.0)
    with pytest.raises(ValueError, match="official transition only"):
        bkn.convert(torchvision.models.resnet18(), "bkn", transition="analytic", surrogate_scale=0.5)
    model = bkn.convert(torchvision.models.resnet18(), "bkn", transition="official", group_size=2, surrogate_scale=0.5)
    assert model._bkn_chain.transition.surrogate_scale == 0.5
    default = bkn.convert(torchvision.models.resnet18(), "bkn", group_size=2)
    assert default._bkn_chain.transition.surrogate_scale == 1.0  # the faithful construction by default
    model.train()(torch.randn(4, 3, 64, 64)).sum().backward()
    assert sum(m.prior_used for m in model.modules() if hasattr(m, "prior_used")) == 19
