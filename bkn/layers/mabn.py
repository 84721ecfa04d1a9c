"""Moving Average Batch Normalization (Yan et al., ICLR 2020, "Towards Stabilizing Batch Statistics in
Backward Propagation of Batch Normalization"), docs/design.md §16.

MABN normalizes without centring (the convolutions centre their weights instead,
:class:`CenteredConv2d`) and replaces the two batch statistics of BN's forward and
backward by simple moving averages over the last ``m`` iterations::

    forward   x2_t = E_group[x^2]                       per (group, channel)
              v    = mean(x2_t, x2_{t-1}, ..., x2_{t-m+1})    (x2_t alone during burn-in)
              z    = x / sqrt(v + eps)
              r    = clip(sqrt(v + eps) / sqrt(running_var + eps), 1/rmax, rmax)
                     (r = 1 for the first max(renorm_after, warmup_iters) iterations)
              y    = gamma * r * z + beta
              running_var <- (1 - momentum) running_var + momentum v
    backward  g    = dL/dy * gamma * r
              gz_t = E_group[g z]
              dL/dx = (g - z * mean(gz_t, ..., gz_{t-m+1})) / sqrt(v + eps)
                     (gz_t alone during burn-in; r is a constant for the gradient)
    inference y = gamma * x / sqrt(running_var + eps) + beta

Burn-in: the moving averages are used once more than ``m`` iterations have been seen and
the iteration is at least ``warmup_iters``. The histories are ring buffers indexed by the
iteration modulo ``m``, as in the authors' ``MABN.py`` (megvii-model/MABN), which this layer
follows line by line (tests/test_mabn.py checks it against the paper's equations). Momentum
is torch's convention: the authors' ``momentum=0.98`` on the old value is ``momentum=0.02`` here.

Micro-batch groups: each group of ``group_size`` samples is one device's micro-batch with its
own history (slot ``j`` of the ring buffers holds group ``j``'s past statistics), so the
window reaches back ``m`` iterations with the weights of those iterations, as on ``G`` devices
each running MABN. The window ``m`` is ``window`` or ``real_batch_size // group_size`` (the
batch MABN simulates, the authors' ``real_B / B``). If the number of groups changes (a
different batch size) the histories restart, with a new burn-in.

``running_mean`` exists (always zero) so that inference is ``F.batch_norm`` and the suite's
probes read MABN like any batch-statistic norm; ``last_stats`` holds the effective statistics
``(0, (v + eps) / r^2 - eps)`` of the last training forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import BatchStatNorm, Dims1d, Dims2d, Dims3d
from ._groups import check_window, group_mean

__all__ = [
    "MovingAverageBatchNorm1d",
    "MovingAverageBatchNorm2d",
    "MovingAverageBatchNorm3d",
    "CenteredConv1d",
    "CenteredConv2d",
    "CenteredConv3d",
]


class _MABNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, groups, step):
        acc = torch.promote_types(x.dtype, torch.float32)
        xa = x.to(acc)
        x2 = group_mean(xa * xa, groups)  # (G, C)
        slot = (step % layer.buffer_x2.shape[0]).view(1)
        layer.buffer_x2.index_copy_(0, slot, x2.unsqueeze(0).to(layer.buffer_x2.dtype))
        use_window = (step - layer.history_start > layer.buffer_x2.shape[0]) & (step >= layer.warmup_iters)
        var = torch.where(use_window, layer.buffer_x2.mean(0).to(acc), x2)
        std = (var + layer.eps).sqrt()
        z = xa / _per_sample(std, x, groups)
        running_std = (layer.running_var.to(acc) + layer.eps).sqrt()
        r = torch.where(
            step <= max(layer.renorm_after, layer.warmup_iters),
            torch.ones_like(std),
            (std / running_std).clamp(1.0 / layer.rmax, layer.rmax),
        )
        if layer.track_running_stats:
            factor = layer._ema_factor_tensor(step)
            layer.running_var.mul_(1 - factor).add_(factor * var.mean(0).to(layer.running_var.dtype))
        layer.last_stats = (torch.zeros_like(var), ((var + layer.eps) / (r * r) - layer.eps))
        rz = _per_sample(r, x, groups) * z
        y = rz
        if weight is not None:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            y = y * weight.to(acc).view(shape) + bias.to(acc).view(shape)
        ctx.save_for_backward(z, std, r, weight)
        ctx.layer, ctx.groups, ctx.slot, ctx.use_window = layer, groups, slot, use_window
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        z, std, r, weight = ctx.saved_tensors
        layer, groups = ctx.layer, ctx.groups
        acc = z.dtype
        dy = grad_out.to(acc)
        shape = (1, -1) + (1,) * (dy.dim() - 2)
        g = dy if weight is None else dy * weight.to(acc).view(shape)
        r_full = _per_sample(r, dy, groups)
        g = g * r_full
        gz = group_mean(g * z, groups)  # (G, C)
        layer.buffer_gz.index_copy_(0, ctx.slot, gz.unsqueeze(0).to(layer.buffer_gz.dtype))
        mean_gz = torch.where(ctx.use_window, layer.buffer_gz.mean(0).to(acc), gz)
        dx = (g - z * _per_sample(mean_gz, dy, groups)) / _per_sample(std, dy, groups)
        dweight = dbias = None
        if weight is not None:
            dims = (0,) + tuple(range(2, dy.dim()))
            dweight = (dy * r_full * z).sum(dims).to(weight.dtype)
            dbias = dy.sum(dims).to(weight.dtype)
        return dx.to(grad_out.dtype), dweight, dbias, None, None, None


def _per_sample(stat: torch.Tensor, like: torch.Tensor, groups: int) -> torch.Tensor:
    """A (G, C) statistic broadcastable over ``like`` (N, C, ...): each sample gets its group's row."""
    rows = stat.repeat_interleave(like.shape[0] // groups, 0)
    return rows.view(rows.shape[0], rows.shape[1], *([1] * (like.dim() - 2)))


class _MovingAverageBatchNorm(BatchStatNorm):
    """Base of :class:`MovingAverageBatchNorm1d`/``2d``/``3d`` (the module docstring has the math).

    Args (besides ``num_features``, ``eps``, ``affine``, ``group_size`` of :class:`BatchStatNorm`):
        momentum: running-variance factor, torch's convention (default 0.02: the authors' 0.98).
        real_batch_size: the batch the window simulates; the window is ``real_batch_size //
            group_size`` iterations (at least 1; the whole input is one group without ``group_size``).
        window: the window ``m`` itself, instead of deriving it from ``real_batch_size``.
        warmup_iters: iterations before the moving averages are used (the authors' default 100).
        renorm_after: ``r`` is 1 for the first ``max(renorm_after, warmup_iters)`` iterations
            (the authors' constant 1000), then clipped to ``[1 / rmax, rmax]`` (``rmax`` 5).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.02,
        affine: bool = True,
        group_size: int | None = None,
        real_batch_size: int = 32,
        window: int | None = None,
        warmup_iters: int = 100,
        renorm_after: int = 1000,
        rmax: float = 5.0,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ):
        name = type(self).__name__
        if not track_running_stats:
            raise ValueError(
                f"{name}: MABN needs its running variance (r and inference use it); got track_running_stats=False"
            )
        super().__init__(num_features, eps, momentum, affine, True, group_size, device, dtype)
        self.real_batch_size = check_window(name, "real_batch_size", real_batch_size)
        self.window = None if window is None else check_window(name, "window", window)
        for option, value in (("warmup_iters", warmup_iters), ("renorm_after", renorm_after)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: {option} must be an int >= 0, got {value!r}")
        if not float(rmax) >= 1.0:
            raise ValueError(f"{name}: rmax must be >= 1, got {rmax!r}")
        self.warmup_iters, self.renorm_after, self.rmax = warmup_iters, renorm_after, float(rmax)
        m = self.window or 1
        self.register_buffer("buffer_x2", torch.zeros(m, 0, num_features, device=device, dtype=torch.float32))
        self.register_buffer("buffer_gz", torch.zeros(m, 0, num_features, device=device, dtype=torch.float32))
        self.register_buffer("history_start", torch.tensor(0, dtype=torch.long, device=device))
        self.last_stats = None

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, real_batch_size={self.real_batch_size}, window={self.window}, "
            f"warmup_iters={self.warmup_iters}, renorm_after={self.renorm_after}, rmax={self.rmax}"
        )

    def window_for(self, batch: int) -> int:
        """The window ``m`` for a training input of ``batch`` samples."""
        if self.window is not None:
            return self.window
        return max(1, self.real_batch_size // (self.group_size or batch))

    def _ema_factor_tensor(self, step: torch.Tensor):
        return 1.0 / step.double().clamp_min(1) if self.momentum is None else self.momentum

    def _prepare_history(self, groups: int, batch: int) -> None:
        m = self.window_for(batch)
        if self.buffer_x2.shape[:2] == (m, groups):
            return
        like = {"device": self.buffer_x2.device, "dtype": self.buffer_x2.dtype}
        self.buffer_x2 = torch.zeros(m, groups, self.num_features, **like)
        self.buffer_gz = torch.zeros(m, groups, self.num_features, **like)
        self.history_start.copy_(self.num_batches_tracked)  # a new burn-in: the histories are empty

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in ("buffer_x2", "buffer_gz"):  # the histories' shape is the saved layer's
            if prefix + key in state_dict:
                setattr(self, key, torch.empty_like(state_dict[prefix + key], device=self.buffer_x2.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self._check_input(x)
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        self._check_enough_values(x, groups)
        self._prepare_history(groups, x.shape[0])
        self.num_batches_tracked.add_(1)
        step = self.num_batches_tracked.clone()
        return _MABNFunction.apply(x, self.weight, self.bias, self, groups, step)


class MovingAverageBatchNorm1d(Dims1d, _MovingAverageBatchNorm):
    """MABN over (N, C) or (N, C, L) inputs."""


class MovingAverageBatchNorm2d(Dims2d, _MovingAverageBatchNorm):
    """MABN over (N, C, H, W) inputs (the authors' ``MABN2d``)."""


class MovingAverageBatchNorm3d(Dims3d, _MovingAverageBatchNorm):
    """MABN over (N, C, D, H, W) inputs."""


class _Centered:
    """Weight centralization: the convolution uses ``W - mean(W)`` over (in, *kernel) per output channel
    (the authors' ``CenConv2d``); the stored weight is unchanged, so a swapped convolution keeps its state."""

    def _conv_forward(self, x, weight, bias):
        dims = tuple(range(1, weight.dim()))
        return super()._conv_forward(x, weight - weight.mean(dims, keepdim=True), bias)


class CenteredConv1d(_Centered, nn.Conv1d):
    """``torch.nn.Conv1d`` with weight centralization."""


class CenteredConv2d(_Centered, nn.Conv2d):
    """``torch.nn.Conv2d`` with weight centralization (the authors' ``CenConv2d``)."""


class CenteredConv3d(_Centered, nn.Conv3d):
    """``torch.nn.Conv3d`` with weight centralization."""
