"""Closed-form propagation of per-channel moments (the ``analytic`` transition).

Rules, each exact for independent Gaussian inputs and an approximation otherwise
(the independence across positions and channels is the same assumption the
official Monte-Carlo construction makes):

* after a normalization layer with posterior ``(m, v)``: mean ``beta``,
  variance ``gamma^2 * v / (v + eps)`` (the normalized-and-affine activation);
  at its *input* (a residual stream that a pre-activation block normalizes): ``(m, v)``;
* ReLU of N(mu, s^2): ``E = mu Phi(a) + s phi(a)``, ``E2 = (mu^2 + s^2) Phi(a) + mu s phi(a)``,
  ``a = mu / s`` (rectified Gaussian); ReLU6 and Hardtanh: the clipped Gaussian
  (:func:`clip_moments`);
* other elementwise activations (SiLU, GELU, Mish, Hardswish, ELU, LeakyReLU, sigmoid,
  tanh, ...): the mean and variance of ``f(X)``, ``X ~ N(mu, s^2)``, by Gauss-Hermite
  quadrature through the network's own module (:func:`elementwise_moments`);
* convolution / linear with weights ``W``: mean ``sum_taps(W) @ mean + bias``,
  variance ``sum_taps(W^2) @ var`` (zero-padding at borders ignored);
* average pooling over ``A`` positions: mean kept, variance ``/ A``;
* max pooling over ``A`` positions: Gaussian moment matching, mean ``mu + s e_A``,
  variance ``s^2 d_A`` with ``e_A, d_A`` the mean and variance of the maximum of
  ``A`` standard normals (numerical quadrature);
* residual sums add means and variances; zero channel padding pads with zeros;
  concatenation along the channels concatenates the moments.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..layers import _native
from .state import Moments, NormOutput, NormOutputSum, Sample, affine_output_moments
from .weight_grads import DeferredWeightGrads

_SQRT2 = math.sqrt(2.0)


class Unsupported(Exception):
    """A module or function the transition cannot propagate through."""


def _ntuple(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pooled_spatial(spatial, kernel, stride, padding=0, dilation=1, ceil_mode=False):
    n = len(spatial)
    kernel, stride = _ntuple(kernel, n), _ntuple(stride if stride else kernel, n)
    padding, dilation = _ntuple(padding, n), _ntuple(dilation, n)
    out = []
    for s, k, st, p, d in zip(spatial, kernel, stride, padding, dilation):
        span = s + 2 * p - d * (k - 1) - 1
        out.append((-(-span // st) if ceil_mode else span // st) + 1)
    return tuple(out)


@lru_cache(maxsize=64)
def gaussian_max_moments(count: int) -> tuple[float, float]:
    """Mean and variance of the maximum of ``count`` i.i.d. standard normals (quadrature)."""
    x = torch.linspace(-12.0, 12.0, 48001, dtype=torch.float64)
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(x / _SQRT2))
    density = count * pdf * cdf.pow(count - 1)
    dx = float(x[1] - x[0])
    mean = float((x * density).sum() * dx)
    second = float((x * x * density).sum() * dx)
    return mean, second - mean * mean


_VAR_FLOOR = 1e-20  # the variance a standard deviation is taken of, at least (a point mass has none)


class _ReluMoments(torch.autograd.Function):
    """Mean and variance of ReLU(N(mu, s^2)), with the closed-form gradient as one autograd node.

    Forward is the formula of :func:`relu_moments` op for op (so results are unchanged); on
    CPU float32/float64 the same operations run as one loop each way in
    ``bkn/csrc/analytic_relu_moments.cpp`` (equal up to rounding: the C library's ``erf`` and ``exp``),
    unless ``compiled=False``.
    Backward, with ``a = mu / s``, ``Phi, phi`` the normal cdf and pdf at ``a``, ``E`` the
    output mean and the output variance ``V = E2 - E^2`` (clamped at 0)::

        dE/dmu = Phi                     dE/ds = phi
        dE2/dmu = 2 mu Phi + s phi + v phi / s    (= 2 E when v = s^2)
        dE2/dv = Phi (direct; its s-path is mu phi (1 - v / s^2) ds/dv = 0)
        ds/dv = 1 / (2 s) where v > floor, else 0 (the clamp; and no gradient where V is clamped)

    the same numbers autograd gets through the ~20 elementwise ops of the formula
    (``tests/test_transitions.py`` checks both, and gradcheck), in a handful of ops: the
    chain calls this once per ReLU per step, so the op count is its cost. Its backward is
    not differentiable again (``once_differentiable``: a double backward raises).
    """

    @staticmethod
    def forward(ctx, mean, var, compiled=True):
        first, out_var, saved, ctx.compiled = _relu_moments_forward(mean, var, compiled)
        ctx.save_for_backward(*saved)
        return first, out_var

    @staticmethod
    @once_differentiable
    def backward(ctx, g_first, g_var):
        return (*_relu_moments_backward(ctx.compiled, ctx.saved_tensors, g_first, g_var), None)


def _relu_moments_forward(mean, var, compiled: bool):
    """``(first, var_out, saved tensors, compiled)`` of :class:`_ReluMoments` (see its docstring)."""
    native = _native.load() if compiled else None
    if native is not None:  # the same formula in one loop (bkn/csrc/analytic_relu_moments.cpp), if it takes these
        m, v = mean.contiguous(), var.contiguous()  # a norm's output mean is its bias, expanded
        out = native.relu_moments_forward(m, v)
        if out:
            first, out_var, std, cdf, pdf, raw = out
            return first, out_var, (m, v, std, cdf, pdf, first, raw), True
    std = var.clamp_min(_VAR_FLOOR).sqrt()
    a = mean / std
    cdf = 0.5 * (1 + torch.erf(a / _SQRT2))
    pdf = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    first = mean * cdf + std * pdf
    second = (mean * mean + var) * cdf + mean * std * pdf
    raw = second - first * first
    return first, raw.clamp_min(0), (mean, var, std, cdf, pdf, first, raw), False


def _relu_moments_backward(compiled: bool, saved, g_first, g_var) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d mean, d var)`` of :class:`_ReluMoments` from its saved tensors (see its docstring)."""
    mean, var, std, cdf, pdf, first, raw = saved
    native = _native.load() if compiled else None
    if native is not None:  # (autograd hands zeros, not None, for an unused output)
        grads = native.relu_moments_backward(
            g_first.contiguous(), g_var.contiguous(), mean, var, std, cdf, pdf, first, raw
        )
        if grads:
            return grads[0], grads[1]
    g_var = g_var * (raw > 0)  # torch's clamp_min passes no gradient at the bound itself
    ds_dv = (var > _VAR_FLOOR) / (2 * std)
    d_second_d_mean = 2 * mean * cdf + std * pdf + var * pdf / std
    grad_mean = g_first * cdf + g_var * (d_second_d_mean - 2 * first * cdf)
    grad_var = (g_first - 2 * g_var * first) * pdf * ds_dv + g_var * cdf
    return grad_mean, grad_var


class _NormReluMoments(torch.autograd.Function):
    """Moments of ``relu`` of a norm's affine output (:class:`NormOutput`), plus optionally
    independent moments ``(extra_mean, extra_var)`` added before the ReLU (a residual sum,
    :class:`NormOutputSum`), as one autograd node: the Python path of :func:`norm_relu_moments`.

    Forward: ``mu = beta`` (every group), ``s^2 = gamma^2 n`` with ``n = v / (v + eps)``, plus the
    extra moments where given, then the rectified Gaussian of :class:`_ReluMoments` (the
    tensor ops, with the compiled ReLU moments where those take them). Backward, from that
    node's ``(d mu, d s^2)``::

        d beta = sum_groups d mu     d gamma = 2 gamma sum_groups d s^2 n     d v = d s^2 gamma^2 eps / (v + eps)^2
        d extra_mean = d mu          d extra_var = d s^2

    The numbers are those of the separate nodes (the same operations, in the same order in the
    forward); what goes is six autograd nodes per norm (ten with a residual sum) and their
    dispatch. Not differentiable again (``once_differentiable``, as the ReLU moments).
    """

    @staticmethod
    def forward(ctx, var, weight, bias, eps, compiled, extra_mean=None, extra_var=None):
        ctx.eps = eps
        mean, out_var, normalized = affine_output_moments(var, weight, bias, eps)
        if extra_mean is not None:  # a residual sum: independent summands
            mean, out_var = mean + extra_mean, out_var + extra_var
        first, relu_var, saved, ctx.compiled = _relu_moments_forward(mean, out_var, compiled)
        ctx.save_for_backward(*saved, normalized, var, weight)
        return first, relu_var

    @staticmethod
    @once_differentiable
    def backward(ctx, g_first, g_var):
        saved = ctx.saved_tensors
        relu_saved, (normalized, var, weight) = saved[:7], saved[7:]
        needs = ctx.needs_input_grad
        d_mean, d_out_var = _relu_moments_backward(ctx.compiled, relu_saved, g_first, g_var)
        d_var = d_weight = d_bias = None
        if needs[0]:
            d_var = d_out_var * weight.square() * (ctx.eps / (var + ctx.eps).square())
        if needs[1]:
            d_weight = 2 * weight * (d_out_var * normalized).sum(0)
        if needs[2]:
            d_bias = d_mean.sum(0)
        d_extra_mean = d_mean if needs[5] else None
        d_extra_var = d_out_var if needs[6] else None
        return d_var, d_weight, d_bias, None, None, d_extra_mean, d_extra_var


def norm_relu_moments(state: NormOutput, compiled: bool = True, extra: Moments | None = None):
    """Mean and variance of ``relu`` of a norm's affine output, plus ``extra`` (independent moments
    added before the ReLU) where given, as one autograd node (see :class:`_NormReluMoments`).

    Compiled (``compiled`` and the kernels take these tensors: CPU float32/float64): the node in
    C++ (``NormReluMomentsFn`` in ``bkn/csrc/analytic_relu_moments.cpp``, one loop each way,
    ``norm_relu_moments_forward`` / ``_backward``), else the Python Function."""
    extra_mean, extra_var = (None, None) if extra is None else (extra.mean, extra.var)
    native = _native.load() if compiled else None
    if native is not None:  # [] where the kernels do not take these tensors
        out = native.norm_relu_moments(state.posterior_var, state.weight, state.bias, state.eps, extra_mean, extra_var)
        if out:
            return out[0], out[1]
    return _NormReluMoments.apply(
        state.posterior_var, state.weight, state.bias, state.eps, compiled, extra_mean, extra_var
    )


# Elementwise activations propagated by quadrature (:func:`elementwise_moments`), through the
# network's own module (its slope, alpha or approximation included). ReLU and Hardtanh/ReLU6
# have closed forms above.
ELEMENTWISE = (
    nn.SiLU,
    nn.GELU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.LeakyReLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
)
QUADRATURE_NODES = 64


@lru_cache(maxsize=16)
def _hermite(nodes: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Hermite nodes scaled for a standard normal, ``sqrt(2) x_k``, and weights ``w_k / sqrt(pi)``."""
    x, w = np.polynomial.hermite.hermgauss(nodes)
    return (
        torch.as_tensor(x * math.sqrt(2.0), dtype=dtype, device=device),
        torch.as_tensor(w / math.sqrt(math.pi), dtype=dtype, device=device),
    )


def elementwise_moments(fn, mean: torch.Tensor, var: torch.Tensor, nodes: int = QUADRATURE_NODES):
    """Mean and variance of ``fn(X)``, ``X ~ N(mean, var)`` elementwise, by Gauss-Hermite quadrature.

    ``E g(X) = sum_k w_k g(mean + s z_k)`` with the ``nodes``-point rule for a standard normal
    (``z_k``, ``w_k``) and ``s = sqrt(var)``; the variance is ``E fn^2 - (E fn)^2``, at least 0.
    Exact for polynomials of degree below ``2 * nodes``. At 64 nodes, for means -3..4 and
    variances 0.01..6, within 3e-4 of ``1 + |value|`` for the smooth activations (tanh the
    worst; SiLU, sigmoid, softplus below 2e-6) and 5e-3 for those with a kink (Hardswish,
    LeakyReLU, ELU, SELU: the rule converges slowly across a kink);
    ``tests/test_transitions_elementwise.py`` checks these against a fine-grid integral.
    Differentiable: autograd runs through ``fn`` at the ``nodes`` points.
    """
    z, w = _hermite(nodes, mean.dtype, mean.device)
    std = var.clamp_min(_VAR_FLOOR).sqrt()
    values = fn(mean.unsqueeze(-1) + std.unsqueeze(-1) * z)  # (..., nodes); an in-place fn may reuse the points
    first = (values * w).sum(-1)
    second = (values * values * w).sum(-1)
    return first, (second - first * first).clamp_min(0)


def clip_moments(mean: torch.Tensor, var: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``clamp(X, low, high)``, ``X ~ N(mean, var)`` (ReLU6: low 0, high 6).

    With ``a = (low - mu) / s``, ``b = (high - mu) / s`` and ``P = Phi(b) - Phi(a)``:
    ``E = low Phi(a) + high (1 - Phi(b)) + mu P + s (phi(a) - phi(b))`` and
    ``E2 = low^2 Phi(a) + high^2 (1 - Phi(b)) + mu^2 P + 2 mu s (phi(a) - phi(b)) + s^2 (P + a phi(a) - b phi(b))``.
    """
    std = var.clamp_min(1e-20).sqrt()
    a, b = (low - mean) / std, (high - mean) / std
    cdf_a, cdf_b = 0.5 * (1 + torch.erf(a / _SQRT2)), 0.5 * (1 + torch.erf(b / _SQRT2))
    pdf_a, pdf_b = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi), torch.exp(-0.5 * b * b) / math.sqrt(2 * math.pi)
    inside = cdf_b - cdf_a
    first = low * cdf_a + high * (1 - cdf_b) + mean * inside + std * (pdf_a - pdf_b)
    second = (
        low * low * cdf_a
        + high * high * (1 - cdf_b)
        + mean * mean * inside
        + 2 * mean * std * (pdf_a - pdf_b)
        + var * (inside + a * pdf_a - b * pdf_b)
    )
    return first, (second - first * first).clamp_min(0)


def relu_moments(mean: torch.Tensor, var: torch.Tensor, compiled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ReLU(x), x ~ N(mean, var), elementwise (the rectified Gaussian).

    ``compiled=False`` forces the Python implementation (the reference)."""
    return _ReluMoments.apply(mean, var, compiled)


def _tap_sums_values(weight: torch.Tensor, compiled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_taps W, sum_taps W^2)``, (O, I) each, as plain values (no graph)."""
    native = _native.load() if compiled else None
    if native is not None:
        out = native.tap_sums(weight)
        if out:  # [] when the kernel does not take these tensors (CUDA, float16, a strided weight)
            return out[0], out[1]
    out_c, in_c = weight.shape[:2]
    taps = weight[0, 0].numel()
    if weight.is_contiguous():
        # A matrix-vector product with ones: torch's reduction over an inner dimension of
        # kh * kw = 9 elements runs at a fraction of the memory bandwidth a gemv reaches.
        flat = weight.view(out_c * in_c, taps)
        ones = torch.ones(taps, dtype=weight.dtype, device=weight.device)
        return (flat @ ones).view(out_c, in_c), (flat.square() @ ones).view(out_c, in_c)
    flat = weight.flatten(2)
    return flat.sum(-1), flat.square().sum(-1)


def _tap_sums_grad(weight: torch.Tensor, g_sum: torch.Tensor, g_sq: torch.Tensor, compiled: bool) -> torch.Tensor:
    """``g_sum + 2 W g_sq`` (``g_sum, g_sq`` of shape (O, I) broadcast over the taps).

    The compiled kernel is not differentiable: with grad mode on (a backward with
    create_graph) the addcmul runs, which autograd differentiates again.
    """
    native = _native.load() if compiled and not torch.is_grad_enabled() else None
    if native is not None:
        grad = native.tap_sums_backward(weight, g_sum.contiguous(), g_sq.contiguous())
        if grad is not None:  # None when the kernel does not take these tensors
            return grad
    view = weight.shape[:2] + (1,) * (weight.dim() - 2)
    return torch.addcmul(g_sum.reshape(view), weight, g_sq.reshape(view), value=2.0)


class _TapSums(torch.autograd.Function):
    """``(sum_taps W, sum_taps W^2)`` of a convolution weight (O, I, *k), with a one-pass backward.

    The gradient is ``g1 + 2 W g2`` (``g1, g2`` broadcast over the taps). The weight is the
    network's largest tensor the analytic transition touches, so the passes over it are most
    of that transition's cost in a network step; hence two implementations:

    * compiled (``bkn/csrc/analytic_tap_sums.cpp``, CPU float32/float64, contiguous weight; used
      when ``compiled`` and the extension is available): forward reads the weight once and
      writes both sums; backward reads it once and writes ``dW``;
    * Python (the reference, and the path everywhere else): the sums as matrix-vector
      products with ones (a squared copy of the weight for the second; equal to ``sum`` up to
      the order of additions), the gradient as one ``addcmul`` (the same formula; the
      compiled kernel rounds ``2 W g2 + g1`` without a fused multiply-add).
    """

    @staticmethod
    def forward(ctx, weight, compiled):
        ctx.save_for_backward(weight)
        ctx.compiled = compiled
        return _tap_sums_values(weight, compiled)

    @staticmethod
    def backward(ctx, g_sum, g_sq):
        (weight,) = ctx.saved_tensors
        if g_sq is None:
            view = weight.shape[:2] + (1,) * (weight.dim() - 2)
            return g_sum.reshape(view).expand_as(weight).clone(), None
        if g_sum is None:
            g_sum = torch.zeros_like(g_sq)
        return _tap_sums_grad(weight, g_sum, g_sq, ctx.compiled), None


def tap_sums(weight: torch.Tensor, compiled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight.sum(taps), weight.square().sum(taps))`` for a (O, I, *kernel) convolution weight.

    ``compiled=False`` forces the Python implementation (the reference the compiled one is tested against).
    """
    if weight.dim() == 2:
        return weight, weight.square()
    return _TapSums.apply(weight, compiled)


class _ConvMoments(torch.autograd.Function):
    """The convolution rule for one group, ``(mean @ S1^T, var @ S2^T)`` with ``S1, S2`` the tap
    sums of ``W`` (O, I, *k) and ``mean, var`` of shape (G, I), as one autograd node.

    Backward (``g_mean, g_var`` of shape (G, O))::

        d mean = g_mean @ S1        d var = g_var @ S2
        dW = dS1 + 2 W dS2          dS1 = g_mean^T @ mean,  dS2 = g_var^T @ var  (broadcast over the taps)

    Compiled (``conv_moments_forward`` / ``conv_moments_backward`` in
    ``bkn/csrc/analytic_conv_moments.cpp``, up to 16 groups): one pass over the weight each
    way, an output channel at a time (forward: its tap sums, kept for the backward, and their
    products with ``mean, var`` from cache; backward: ``dS1, dS2``, ``dW`` and the input
    gradients), so no (O, I) product goes to memory and no matrix product is dispatched. Else
    the tap sums, matrix products and the tap sums' gradient.

    ``deferred`` (a :class:`~bkn.transitions.weight_grads.DeferredWeightGrads`, which the
    transition passes): on the compiled path the backward leaves ``dW`` to a hook on the
    weight that adds it to the convolution's own weight gradient in one pass, where that
    registry takes the weight (a leaf, no earlier hooks).
    A backward with create_graph runs the rule as differentiable tensor ops (``S1, S2``
    recomputed from ``W``), so a double backward is exact.
    """

    @staticmethod
    def forward(ctx, weight, mean, var, compiled, deferred=None):
        native = _native.load() if compiled else None
        out = []
        if native is not None:
            mean, var = mean.contiguous(), var.contiguous()  # (G, I): e.g. a norm's bias expanded over groups
            out = native.conv_moments_forward(weight, mean, var)
        ctx.compiled = compiled
        ctx.fused = bool(out)
        ctx.deferred = deferred if out else None
        if out:
            mean_out, var_out, s1, s2 = out
        else:
            s1, s2 = _tap_sums_values(weight, compiled)
            mean_out, var_out = mean @ s1.t(), var @ s2.t()
        ctx.save_for_backward(weight, mean, var, s1, s2)
        return mean_out, var_out

    @staticmethod
    def backward(ctx, g_mean, g_var):
        weight, mean, var, s1, s2 = ctx.saved_tensors
        if g_mean is None:
            g_mean = torch.zeros(mean.shape[0], weight.shape[0], dtype=mean.dtype, device=mean.device)
        if g_var is None:
            g_var = torch.zeros(var.shape[0], weight.shape[0], dtype=var.dtype, device=var.device)
        if torch.is_grad_enabled():  # create_graph: every step differentiable
            s1, s2 = tap_sums(weight, compiled=False)
            grad_w = _tap_sums_grad(weight, g_mean.t() @ mean, g_var.t() @ var, compiled=False)
            return grad_w, g_mean @ s1, g_var @ s2, None, None
        need_w, need_mean, need_var = ctx.needs_input_grad[:3]
        native = _native.load() if ctx.compiled else None
        if native is not None and ctx.fused:
            g_mean, g_var = g_mean.contiguous(), g_var.contiguous()
            if need_w and ctx.deferred is not None and ctx.deferred.defer(weight, (g_mean, mean, g_var, var)):
                need_w = False  # added to the convolution's own dW by the weight's hook (bkn.transitions.weight_grads)
            out = native.conv_moments_backward(weight, g_mean, mean, g_var, var, s1, s2, need_w, need_mean or need_var)
            if out:
                grad_w, grad_mean, grad_var = out
                return grad_w, grad_mean if need_mean else None, grad_var if need_var else None, None, None
        grad_w = grad_mean = grad_var = None
        if need_mean:
            grad_mean = g_mean @ s1
        if need_var:
            grad_var = g_var @ s2
        if need_w:  # the products, then one pass (compiled where _tap_sums_grad's kernel takes them)
            grad_w = _tap_sums_grad(weight, g_mean.t() @ mean, g_var.t() @ var, ctx.compiled)
        return grad_w, grad_mean, grad_var, None, None


def conv_moments(
    weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, compiled: bool = True, deferred=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean @ sum_taps(W)^T, var @ sum_taps(W^2)^T)`` for a one-group (O, I, *kernel) weight and (G, I) moments.

    ``compiled=False`` forces the Python implementation (the reference).
    """
    if weight.dim() == 2:
        return mean @ weight.t(), var @ weight.square().t()
    return _ConvMoments.apply(weight, mean, var, compiled, deferred)


_PROPAGATED = (
    *ELEMENTWISE,
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.Flatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)


class Analytic:
    """The ``analytic`` transition: deterministic moment propagation."""

    name = "analytic"
    shortcut = "activation"  # the CIFAR ResNet's first shortcut: moments of relu(norm0), see bkn.models.cifar_resnet

    @property
    def _weight_grads(self) -> DeferredWeightGrads:
        """This transition's deferred convolution-rule weight gradients (see :mod:`bkn.transitions.weight_grads`)."""
        registry = self.__dict__.get("_deferred")
        if registry is None:
            registry = self.__dict__["_deferred"] = DeferredWeightGrads()
        return registry

    @staticmethod
    def supports(module: nn.Module) -> bool:
        """Whether a state can be propagated through ``module`` (both transitions share the list)."""
        return isinstance(module, _PROPAGATED) and not isinstance(module, nn.modules.conv._ConvTransposeNd)

    def after_norm(self, layer, spatial: tuple[int, ...]) -> Moments:
        mean, var = layer.posterior
        if layer.weight is None:
            return Moments(torch.zeros_like(mean), var / (var + layer.eps), tuple(spatial))
        return NormOutput(var, layer.weight.to(var.dtype), layer.bias.to(mean.dtype), layer.eps, spatial)

    def at_input(self, layer, spatial: tuple[int, ...]) -> Moments:
        """The moments of the *input* of ``layer`` (which ran): its posterior ``(m, v)``."""
        mean, var = layer.posterior
        return Moments(mean, var, tuple(spatial))

    def to_prior(self, state) -> tuple[torch.Tensor, torch.Tensor]:
        m = state.moments() if isinstance(state, Sample) else state
        return m.mean, m.var

    def relu(self, state: Moments) -> Moments:
        if isinstance(state, NormOutput):  # relu right after a norm: one node (see _NormReluMoments)
            return Moments(*norm_relu_moments(state), state.spatial)
        if isinstance(state, NormOutputSum):  # relu of a residual sum with a norm's output: one node too
            return Moments(*norm_relu_moments(state.norm, extra=state.other), state.spatial)
        return Moments(*relu_moments(state.mean, state.var), state.spatial)

    def add(self, a, b) -> Moments:
        a = a.moments() if isinstance(a, Sample) else a
        b = b.moments() if isinstance(b, Sample) else b
        if a.channels != b.channels:
            raise Unsupported(f"residual sum of {a.channels} and {b.channels} channels")
        if isinstance(a, NormOutput) or isinstance(b, NormOutput):  # kept as its parts (see NormOutputSum)
            norm, other = (a, b) if isinstance(a, NormOutput) else (b, a)
            return NormOutputSum(norm, other, a.spatial or b.spatial)
        return a + b

    def cat(self, states: list) -> Moments:
        """Concatenation along the channels (DenseNet): the channels' moments side by side."""
        states = [s.moments() if isinstance(s, Sample) else s for s in states]
        spatial = {s.spatial for s in states if s.spatial}
        if len(spatial) > 1:
            raise Unsupported(f"concatenation of features of different spatial sizes {sorted(spatial)}")
        mean = torch.cat([s.mean for s in states], -1)
        return Moments(mean, torch.cat([s.var for s in states], -1), next(iter(spatial), ()))

    def pad_channels(self, state, before: int, after: int) -> Moments:
        state = state.moments() if isinstance(state, Sample) else state
        return state.pad_channels(before, after)

    def conv(self, conv: nn.modules.conv._ConvNd, state: Moments) -> Moments:
        if isinstance(conv, nn.modules.conv._ConvTransposeNd):
            raise Unsupported("transposed convolution")
        w = conv.weight.to(state.mean.dtype)
        taps = tuple(range(2, w.dim()))
        groups, batch = conv.groups, state.mean.shape[0]
        if groups == 1:  # one node: the tap sums and a matrix product each (see _ConvMoments)
            mean, var = conv_moments(w, state.mean, state.var, deferred=self._weight_grads)
        else:
            w_sum, w2_sum = tap_sums(w)  # (O, I / groups)
            out_c, in_per = w_sum.shape
            mean_in = state.mean.reshape(batch, groups, in_per)
            var_in = state.var.reshape(batch, groups, in_per)
            w_sum = w_sum.reshape(groups, out_c // groups, in_per)
            w2_sum = w2_sum.reshape(groups, out_c // groups, in_per)
            mean = torch.einsum("bgi,goi->bgo", mean_in, w_sum).reshape(batch, out_c)
            var = torch.einsum("bgi,goi->bgo", var_in, w2_sum).reshape(batch, out_c)
        if conv.bias is not None:
            mean = mean + conv.bias.to(mean.dtype)
        n = len(taps)
        if conv.padding == "same":
            spatial = state.spatial
        else:
            padding = (0,) * n if conv.padding == "valid" else _ntuple(conv.padding, n)
            spatial = tuple(
                _conv_out(s, k, st, p, d)
                for s, k, st, p, d in zip(state.spatial, conv.kernel_size, conv.stride, padding, conv.dilation)
            )
        return Moments(mean, var, spatial)

    def linear(self, linear: nn.Linear, state: Moments) -> Moments:
        if state.spatial and math.prod(state.spatial) != 1:
            raise Unsupported("linear layer on spatial features")
        w = linear.weight.to(state.mean.dtype)
        mean = state.mean @ w.t()
        if linear.bias is not None:
            mean = mean + linear.bias.to(mean.dtype)
        return Moments(mean, state.var @ w.square().t(), ())

    def avg_pool(self, state: Moments, kernel, stride, padding=0, ceil_mode=False) -> Moments:
        n = len(state.spatial)
        area = math.prod(_ntuple(kernel, n))
        spatial = pooled_spatial(state.spatial, kernel, stride, padding, 1, ceil_mode)
        return Moments(state.mean, state.var / area, spatial)

    def adaptive_avg_pool(self, state: Moments, output_size) -> Moments:
        n = len(state.spatial)
        out = tuple(s if o is None else o for s, o in zip(state.spatial, _ntuple(output_size, n)))
        area = math.prod(s / o for s, o in zip(state.spatial, out))
        return Moments(state.mean, state.var / max(area, 1.0), out)

    def max_pool(self, state: Moments, kernel, stride, padding=0, dilation=1, ceil_mode=False) -> Moments:
        n = len(state.spatial)
        area = math.prod(_ntuple(kernel, n))
        e, d = gaussian_max_moments(area)
        std = state.var.clamp_min(0).sqrt()
        return Moments(
            state.mean + std * e,
            state.var * d,
            pooled_spatial(state.spatial, kernel, stride, padding, dilation, ceil_mode),
        )

    def flatten(self, state: Moments) -> Moments:
        if state.spatial and math.prod(state.spatial) != 1:
            raise Unsupported("flatten of spatial features (channels would mix with positions)")
        return Moments(state.mean, state.var, ())

    # -- dispatch on torch modules, shared with the Monte-Carlo transition ------------------
    def module(self, module: nn.Module, state):
        if isinstance(state, Sample):
            state = state.moments()
        if isinstance(module, nn.ReLU):
            return self.relu(state)
        if isinstance(module, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
            return Moments(*clip_moments(state.mean, state.var, module.min_val, module.max_val), state.spatial)
        if isinstance(module, ELEMENTWISE):
            return Moments(*elementwise_moments(module, state.mean, state.var), state.spatial)
        if isinstance(module, nn.modules.conv._ConvNd):
            return self.conv(module, state)
        if isinstance(module, nn.Linear):
            return self.linear(module, state)
        if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            return self.avg_pool(state, module.kernel_size, module.stride, module.padding, module.ceil_mode)
        if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
            return self.adaptive_avg_pool(state, module.output_size)
        if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            return self.max_pool(
                state, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode
            )
        if isinstance(module, nn.Flatten):
            return self.flatten(state)
        if isinstance(module, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)):
            return state
        raise Unsupported(type(module).__name__)
