"""Autograd Functions of the analytic transition on the Triton kernels (:mod:`bkn.kernels.triton_analytic`).

The transition's rules dispatch here when ``bkn.kernels.backend_for`` says ``triton``
(``bkn/transitions/activation_moments.py``, ``convolution.py``, ``weight_grads.py``). Each Function is
one node whose forward is one launch and whose backward is one or two, with the numbers of
the Python reference up to rounding (``tests/test_triton_analytic*.py``):

* :class:`ReluMoments`: forward 1, backward 1 (the rectified Gaussian's parts recomputed, not saved);
* :class:`NormReluMoments`: forward 1, backward 1 (``d var``, ``d gamma``, ``d beta`` and the extra
  moments' gradients in one kernel);
* :class:`ConvMoments` (any ``groups``): forward 1 (one pass over ``W``, the tap sums kept),
  backward 1 for the input gradients (from the tap sums) and 1 for ``dW`` (one pass over ``W``),
  the latter left to the weight's hook where the transition's :class:`DeferredWeightGrads`
  takes it (one group: the hook adds the rule's part to the convolution's own ``dW`` in the
  same single pass, :func:`add_weight_grad`);
* :class:`NormReluConvMoments`: a convolution right after a norm and a ReLU (the usual case), forward 2,
  backward 1 for every input gradient but the weight's and 1 for ``dW`` (deferred as above);
* :class:`TapSums`: forward 1, backward 1.

Importing this module imports triton (and defines the kernels): the transitions import it
lazily, only when they dispatch to it. A backward with ``create_graph`` runs the rule as
differentiable tensor ops (:func:`_grouped_rule_backward`), as the Python reference does.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import triton_analytic_launch as kernels


class ReluMoments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mean, var):
        ctx.save_for_backward(mean, var)
        return kernels.relu_forward(mean, var)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_first, g_var):
        mean, var = ctx.saved_tensors
        return kernels.relu_backward(g_first, g_var, mean, var)


class NormReluMoments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, var, weight, bias, eps, extra_mean=None, extra_var=None):
        ctx.eps = eps
        ctx.save_for_backward(var, weight, bias, extra_mean, extra_var)
        return kernels.norm_relu_forward(var, weight, bias, eps, extra_mean, extra_var)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_first, g_var):
        var, weight, bias, extra_mean, extra_var = ctx.saved_tensors
        d_var, d_weight, d_bias, d_em, d_ev = kernels.norm_relu_backward(
            g_first, g_var, var, weight, bias, ctx.eps, extra_mean, extra_var
        )
        needs = ctx.needs_input_grad
        return (
            d_var if needs[0] else None,
            d_weight if needs[1] else None,
            d_bias if needs[2] else None,
            None,
            d_em if needs[4] else None,
            d_ev if needs[5] else None,
        )


def _grouped_rule_backward(weight, mean, var, g_mean, g_var, groups: int):
    """``(dW, d mean, d var)`` of the grouped convolution rule as differentiable tensor ops (create_graph)."""
    out_c, in_per = weight.shape[:2]
    batch = mean.shape[0]
    flat = weight.flatten(2)
    s1 = flat.sum(-1).reshape(groups, out_c // groups, in_per)
    s2 = flat.square().sum(-1).reshape(groups, out_c // groups, in_per)
    gm = g_mean.reshape(batch, groups, out_c // groups)
    gv = g_var.reshape(batch, groups, out_c // groups)
    m, v = mean.reshape(batch, groups, in_per), var.reshape(batch, groups, in_per)
    d_mean = torch.einsum("bgo,goi->bgi", gm, s1).reshape(batch, groups * in_per)
    d_var = torch.einsum("bgo,goi->bgi", gv, s2).reshape(batch, groups * in_per)
    view = (out_c, in_per) + (1,) * (weight.dim() - 2)
    ds1 = torch.einsum("bgo,bgi->goi", gm, m).reshape(view)
    ds2 = torch.einsum("bgo,bgi->goi", gv, v).reshape(view)
    return torch.addcmul(ds1, weight, ds2, value=2.0), d_mean, d_var


class ConvMoments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, mean, var, groups, deferred=None):
        mean_out, var_out, s1, s2 = kernels.conv_forward(weight, mean, var, groups)
        ctx.groups, ctx.deferred = groups, deferred
        ctx.save_for_backward(weight, mean, var, s1, s2)
        return mean_out, var_out

    @staticmethod
    def backward(ctx, g_mean, g_var):
        weight, mean, var, s1, s2 = ctx.saved_tensors
        groups = ctx.groups
        if torch.is_grad_enabled():  # create_graph: every step differentiable
            return (*_grouped_rule_backward(weight, mean, var, g_mean, g_var, groups), None, None)
        need_w, need_mean, need_var = ctx.needs_input_grad[:3]
        deferred = ctx.deferred
        if need_w and groups == 1 and deferred is not None and deferred.defer(weight, (g_mean, mean, g_var, var)):
            need_w = False  # added to the convolution's own dW by the weight's hook (bkn.transitions.weight_grads)
        grad_w = grad_mean = grad_var = None
        if need_mean or need_var:
            grad_mean, grad_var = kernels.conv_input_grads(s1, s2, g_mean, g_var, groups)
        if need_w:
            grad_w = kernels.weight_grad(weight, factors=(g_mean, mean, g_var, var), groups=groups)
        return grad_w, grad_mean if need_mean else None, grad_var if need_var else None, None, None


class NormReluConvMoments(torch.autograd.Function):
    """A convolution right after ``relu`` of a norm's affine output (plus extra moments): the norm-ReLU rule,
    then the convolution rule, as one node. Forward: the two kernels (the ReLU moments kept for the
    weight gradient); backward: one kernel for every input gradient but the weight's
    (``_conv_norm_relu_grads``) and one pass over ``W`` for that (deferred as in :class:`ConvMoments`)."""

    @staticmethod
    def forward(ctx, var, weight_n, bias_n, eps, extra_mean, extra_var, weight, groups, deferred=None):
        first, relu_var = kernels.norm_relu_forward(var, weight_n, bias_n, eps, extra_mean, extra_var)
        mean_out, var_out, s1, s2 = kernels.conv_forward(weight, first, relu_var, groups)
        ctx.eps, ctx.groups, ctx.deferred = eps, groups, deferred
        ctx.save_for_backward(var, weight_n, bias_n, extra_mean, extra_var, weight, first, relu_var, s1, s2)
        return mean_out, var_out

    @staticmethod
    @once_differentiable  # as the norm-ReLU rule's reference (_NormReluMoments)
    def backward(ctx, g_mean, g_var):
        var, weight_n, bias_n, extra_mean, extra_var, weight, first, relu_var, s1, s2 = ctx.saved_tensors
        needs, groups = ctx.needs_input_grad, ctx.groups
        d_var, d_wn, d_bn, d_em, d_ev = kernels.conv_norm_relu_grads(
            s1, s2, g_mean, g_var, groups, var, weight_n, bias_n, ctx.eps, extra_mean, extra_var
        )
        grad_w = None
        factors = (g_mean, first, g_var, relu_var)
        if needs[6] and not (groups == 1 and ctx.deferred is not None and ctx.deferred.defer(weight, factors)):
            grad_w = kernels.weight_grad(weight, factors=factors, groups=groups)
        return (
            d_var if needs[0] else None,
            d_wn if needs[1] else None,
            d_bn if needs[2] else None,
            None,
            d_em if needs[4] else None,
            d_ev if needs[5] else None,
            grad_w,
            None,
            None,
        )


class TapSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight):
        ctx.save_for_backward(weight)
        return kernels.conv_forward(weight)[2:]

    @staticmethod
    def backward(ctx, g_sum, g_sq):
        (weight,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            view = weight.shape[:2] + (1,) * (weight.dim() - 2)
            return torch.addcmul(g_sum.reshape(view), weight, g_sq.reshape(view), value=2.0)
        return kernels.weight_grad(weight, sums=(g_sum, g_sq))


def relu_moments(mean, var):
    return ReluMoments.apply(mean, var)


def norm_relu_moments(var, weight, bias, eps, extra_mean=None, extra_var=None):
    return NormReluMoments.apply(var, weight, bias, eps, extra_mean, extra_var)


def conv_moments(weight, mean, var, groups: int = 1, deferred=None):
    return ConvMoments.apply(weight, mean, var, groups, deferred)


def norm_relu_conv_moments(var, weight_n, bias_n, eps, extra_mean, extra_var, weight, groups: int = 1, deferred=None):
    return NormReluConvMoments.apply(var, weight_n, bias_n, eps, extra_mean, extra_var, weight, groups, deferred)


def tap_sums(weight):
    return TapSums.apply(weight)


def add_weight_grad(weight, factors, grad, in_place: bool):
    """``grad`` plus the rule's weight gradient of ``factors`` (g_mean, mean, g_var, var): one pass (see
    :func:`bkn.transitions.weight_grads._add_rules`), or None for a gradient the kernel does not take."""
    try:
        return kernels.weight_grad(weight, factors=factors, base=grad, in_place=in_place)
    except ValueError:  # a gradient in another layout than the weight's: the caller's torch ops
        return None
