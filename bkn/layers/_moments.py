"""Per-(group, channel) moments of a batch, computed with the fewest passes over memory.

Every batch-dependent norm in the project (BN with ghost batches, BRN, BKN) needs
the observed mean ``m_o`` and biased variance ``v_o`` of its input over
(samples of the group, spatial positions). On the CPU ``torch.var_mean`` over
(0, 2, 3) is a slow Welford reduction (about 30x a plain ``sum`` here), so the
single-group case is computed from two fused native kernels instead:

* ``x.mean(dims)``: the per-channel mean;
* the eval-mode ``native_batch_norm_backward`` reduction with ``grad_out = x``,
  ``running_mean = m_o`` and ``running_var = 1`` (eps 0), which returns
  ``sum(x * (x - m_o))`` = ``sum((x - m_o)^2)`` per channel in one pass.

With several groups (ghost batches) the input is viewed as (G, g, C, ...) with
``unflatten`` (a view for any memory format) and reduced over the group's
samples and positions.
"""

from __future__ import annotations

import torch

_bn_backward = torch.ops.aten.native_batch_norm_backward

# The single-pass kernel computes ``S2 = sum(x (x - shift))`` as ``sum(x x) - shift S1`` and
# returns ``S1 = sum(x)`` rounded to the input dtype, so a variance from them has a
# relative rounding error of about 2 float_eps (1 + mean^2 / var), whatever the shift:
# 45% at |mean| = 2000 std in float32. Where ``mean^2 > MOMENT_TOLERANCE * var`` in some
# channel (|mean| > 3 std, error then below ~1e-6) the variance is recomputed from
# ``x - mean`` (two passes, about 1.6x the cost). Ordinary activations never get there.
MOMENT_TOLERANCE = 9.0


def ill_conditioned(mean, var) -> bool:
    """Whether single-pass moments lose precision in some channel."""
    return bool((mean * mean > var * MOMENT_TOLERANCE).any())


def centred_var(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Biased per-channel variance of a single-group ``x`` from ``x - mean`` (no cancellation), shape (C,)."""
    dims = [0] + list(range(2, x.dim()))
    return (x - mean.reshape([1, -1] + [1] * (x.dim() - 2)).to(x.dtype)).square_().mean(dims)


def reduce_dims(ndim: int) -> list[int]:
    """Dimensions of a (G, g, C, *spatial) view that belong to one statistic."""
    return [1] + list(range(3, ndim + 1))


def as_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """View (N, C, *S) as (G, N // G, C, *S) without copying."""
    return x.unflatten(0, (groups, x.shape[0] // groups))


def per_channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Shape a (G, C) statistic to broadcast against the (G, g, C, *S) view."""
    return t.reshape(t.shape[0], 1, t.shape[1], *([1] * (ndim - 2)))


def shifted_sums(x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over a single-group batch: per-channel ``sum(x)`` and ``sum(x * (x - shift))``.

    Then ``mean = S1 / n`` and ``var = S2 / n - mean * (mean - shift)``
    (:func:`moments_from_sums`). The rounding error relative to the variance is
    about ``eps * |mean (mean - shift)| / var``: small when ``shift`` is a good guess
    of the mean (BKN passes its prior mean). On the CPU the two sums come from one native
    pass (batch norm's backward reduction); elsewhere from plain reductions (CUDA's batch
    norm backward insists on saved statistics that do not exist here).
    """
    if x.device.type != "cpu":
        dims = [0] + list(range(2, x.dim()))
        shaped = shift.reshape([1, -1] + [1] * (x.dim() - 2)).to(x.dtype)
        return x.sum(dims), (x * (x - shaped)).sum(dims)
    _, s2, s1 = _bn_backward(x, x, None, shift, torch.ones_like(shift), None, None, False, 0.0, [False, True, True])
    return s1, s2


def moments_from_sums(s1, s2, shift, count: int):
    """Mean and biased variance from :func:`shifted_sums`."""
    mean = s1 * (1.0 / count)
    var = s2 * (1.0 / count) - mean * (mean - shift)
    return mean, var * (var > 0)


def batch_moments(x: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per (group, channel), each of shape (G, C).

    One float group on the CPU: the mean, then ``sum(x (x - mean))`` in one native
    pass, recomputed from ``x - mean`` where that is ill-conditioned (see
    ``MOMENT_TOLERANCE``). On accelerators ``var_mean`` (one fast kernel). Groups and
    low-precision inputs: centred, accumulated in float32 at least (bfloat16/half inputs
    are upcast for the reduction) so they keep precise moments.
    """
    stat_dtype = torch.promote_types(x.dtype, torch.float32)
    if groups == 1 and x.dtype == stat_dtype:
        dims = [0] + list(range(2, x.dim()))
        if x.device.type != "cpu":
            var, mean = torch.var_mean(x, dims, correction=0)
            return mean.unsqueeze(0), var.unsqueeze(0)
        count = x.numel() // x.shape[1]
        mean = x.mean(dims)
        _, sq = shifted_sums(x, mean)
        var = sq / count
        if ill_conditioned(mean, var):
            var = centred_var(x, mean)
        return mean.unsqueeze(0), var.unsqueeze(0)
    xg = as_groups(x, groups).to(stat_dtype)
    dims = reduce_dims(x.dim())
    mean = xg.mean(dims)
    centred = xg - per_channel_view(mean, x.dim())
    return mean, centred.square().mean(dims)


def sample_means(x: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel mean over spatial positions, shape (N, C)."""
    if x.dim() == 2:
        return x.to(torch.promote_types(x.dtype, torch.float32))
    return x.mean(list(range(2, x.dim())), dtype=torch.promote_types(x.dtype, torch.float32))
