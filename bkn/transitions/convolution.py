"""The convolution rule of the analytic transition and its compiled paths.

A convolution with weight ``W`` (O, I, *k) maps per-channel moments ``(mean, var)`` to
``(mean @ S1^T, var @ S2^T)`` with the tap sums ``S1 = sum_taps W``, ``S2 = sum_taps W^2``
(independence across positions and channels assumed, zero padding at borders ignored):
:func:`tap_sums` and :func:`conv_moments`, each one autograd node with a one-pass backward,
compiled on the CPU (``bkn/csrc/analytic_tap_sums.cpp, analytic_conv_moments.cpp``) where the kernels take the tensors.

This module imports nothing of the transition above it: :mod:`bkn.transitions.weight_grads`
(which finishes deferred weight gradients with :func:`_tap_sums_grad`) and
:mod:`bkn.transitions.analytic` (which applies the rule to states) both import it.
"""

from __future__ import annotations

import torch

from ..layers import _native
from . import _backend


def _tap_sums_values(weight: torch.Tensor, compiled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_taps W, sum_taps W^2)``, (O, I) each, as plain values (no graph)."""
    native = _backend.native(weight, compiled)
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
    native = _backend.native(weight, compiled) if not torch.is_grad_enabled() else None
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

    ``compiled=False`` forces the Python implementation (the reference the compiled one is tested against);
    where ``bkn.kernels.backend_for`` says ``triton``, the Triton kernels run it (one launch each way).
    """
    if weight.dim() == 2:
        return weight, weight.square()
    if compiled and _backend.backend(weight) == "triton":
        return _backend.triton_functions().tap_sums(weight)
    return _TapSums.apply(weight, compiled)


class _ConvMoments(torch.autograd.Function):
    """The convolution rule for one group, ``(mean @ S1^T, var @ S2^T)`` with ``S1, S2`` the tap
    sums of ``W`` (O, I, *k) and ``mean, var`` of shape (G, I), as one autograd node.

    Backward (``g_mean, g_var`` of shape (G, O))::

        d mean = g_mean @ S1        d var = g_var @ S2
        dW = dS1 + 2 W dS2          dS1 = g_mean^T @ mean,  dS2 = g_var^T @ var  (broadcast over the taps)

    Compiled (``conv_moments_*`` in ``bkn/csrc/analytic_conv_moments.cpp``, up to 16 groups): one
    pass over the weight each way, an output channel at a time (forward: its tap sums, kept
    for the backward, and their products with ``mean, var`` from cache; backward: ``dS1, dS2``,
    ``dW`` and the input gradients), so no (O, I) product goes to memory and no matrix
    product is dispatched. Else the tap sums, matrix products and the tap sums' gradient.

    ``deferred`` (a :class:`~bkn.transitions.weight_grads.DeferredWeightGrads`, which the
    transition passes): on the compiled path the backward leaves ``dW`` to a hook on the
    weight that adds it to the convolution's own weight gradient in one pass, where that
    registry takes the weight (a leaf, no earlier hooks).
    A backward with create_graph runs the rule as differentiable tensor ops (``S1, S2``
    recomputed from ``W``), so a double backward is exact.
    """

    @staticmethod
    def forward(ctx, weight, mean, var, compiled, deferred=None):
        native = _backend.native(weight, compiled)
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
    weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, compiled: bool = True, deferred=None, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean @ sum_taps(W)^T, var @ sum_taps(W^2)^T)`` for a (O, I / groups, *kernel) weight and (G, I) moments,
    per convolution group (input channels ``[j I / groups, (j + 1) I / groups)`` feed outputs
    ``[j O / groups, (j + 1) O / groups)``).

    ``compiled=False`` forces the Python implementation (the reference). Where
    ``bkn.kernels.backend_for`` says ``triton``, the Triton kernels run the rule for any
    ``groups`` (:class:`bkn.kernels.triton_analytic_functions.ConvMoments`: one launch forward,
    two backward). Else one group is one node (:class:`_ConvMoments`, compiled on the CPU) and
    several groups are the tap sums and two batched matrix products.
    """
    if weight.dim() > 2 and compiled and _backend.backend(weight) == "triton":
        return _backend.triton_functions().conv_moments(weight, mean, var, groups, deferred)
    if groups != 1:
        return _grouped_conv_moments(weight, mean, var, groups, compiled)
    if weight.dim() == 2:
        return mean @ weight.t(), var @ weight.square().t()
    return _ConvMoments.apply(weight, mean, var, compiled, deferred)


def _grouped_conv_moments(weight, mean, var, groups: int, compiled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The convolution rule for ``groups`` > 1: the tap sums, then a product per group (``einsum``)."""
    w_sum, w2_sum = tap_sums(weight, compiled)  # (O, I / groups)
    out_c, in_per = w_sum.shape
    batch = mean.shape[0]
    mean_in = mean.reshape(batch, groups, in_per)
    var_in = var.reshape(batch, groups, in_per)
    w_sum = w_sum.reshape(groups, out_c // groups, in_per)
    w2_sum = w2_sum.reshape(groups, out_c // groups, in_per)
    mean_out = torch.einsum("bgi,goi->bgo", mean_in, w_sum).reshape(batch, out_c)
    return mean_out, torch.einsum("bgi,goi->bgo", var_in, w2_sum).reshape(batch, out_c)
