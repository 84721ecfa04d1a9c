"""The activation rules of the analytic transition: moments of ``f(X)`` for ``X ~ N(mu, s^2)``, per channel.

* ReLU: the rectified Gaussian (:func:`relu_moments`), one autograd node with a closed-form
  backward (:class:`_ReluMoments`), compiled on the CPU (``bkn/csrc/analytic_relu_moments.cpp``);
* ReLU right after a norm (and after a residual sum with a norm's output): the norm's
  affine output and the ReLU as one node (:func:`norm_relu_moments`);
* ReLU6 and Hardtanh: the clipped Gaussian (:func:`clip_moments`);
* the other elementwise activations (:data:`ELEMENTWISE`): Gauss-Hermite quadrature through
  the network's own module (:func:`elementwise_moments`).

Split from :mod:`bkn.transitions.analytic` (which applies these rules to states and
re-exports the public names) so that each file holds one job.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .. import kernels
from ..layers import _native
from . import _backend
from .state import Moments, NormOutput, _LazyMoments, affine_output_moments

_SQRT2 = math.sqrt(2.0)
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
    native = _backend.native(mean, compiled)
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
    native = _native.load() if compiled else None  # compiled: the forward ran the compiled kernel
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

    Where ``bkn.kernels.backend_for`` says ``triton``: the Triton kernels (one launch each way).
    Compiled (``compiled`` and the kernels take these tensors: CPU float32/float64): the node in
    C++ (``NormReluMomentsFn`` in ``bkn/csrc/analytic_relu_moments.cpp``, one loop each way,
    ``norm_relu_moments_forward`` / ``_backward``), else the Python Function."""
    extra_mean, extra_var = (None, None) if extra is None else (extra.mean, extra.var)
    which = _backend.backend(state.posterior_var, compiled)
    if which == "triton":  # one launch each way (bkn/kernels/triton_analytic.py)
        return _backend.triton_functions().norm_relu_moments(
            state.posterior_var, state.weight, state.bias, state.eps, extra_mean, extra_var
        )
    native = kernels.native_module(which)
    if native is not None:  # [] where the kernels do not take these tensors
        out = native.norm_relu_moments(state.posterior_var, state.weight, state.bias, state.eps, extra_mean, extra_var)
        if out:
            return out[0], out[1]
    return _NormReluMoments.apply(
        state.posterior_var, state.weight, state.bias, state.eps, compiled, extra_mean, extra_var
    )


class NormReluOutput(_LazyMoments):
    """``relu`` of a norm's affine output (:class:`NormOutput`) plus ``extra`` moments (or None), kept as
    those parts where the rules run as Triton kernels: a convolution right after it takes the
    norm-ReLU and convolution rules as one node
    (:class:`bkn.kernels.triton_analytic_functions.NormReluConvMoments`); anything else forms the
    moments with :func:`norm_relu_moments` on first use."""

    def __init__(self, norm: NormOutput, extra: Moments | None, spatial=()):
        self.norm, self.extra, self.spatial = norm, extra, tuple(spatial)

    def _form(self) -> tuple[torch.Tensor, torch.Tensor]:
        return norm_relu_moments(self.norm, extra=self.extra)

    @property
    def channels(self) -> int:
        return self.norm.channels

    @property
    def formed(self) -> bool:
        """Whether the moments were formed already (a convolution then uses them)."""
        return self._moments is not None


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

    ``compiled=False`` forces the Python implementation (the reference); where ``bkn.kernels.backend_for``
    says ``triton``, the Triton kernels run it (one launch each way)."""
    if compiled and _backend.backend(mean) == "triton":
        return _backend.triton_functions().relu_moments(mean, var)
    return _ReluMoments.apply(mean, var, compiled)
