"""Synchronized BatchNorm: training statistics pooled exactly across the workers of a process group.

For a data-parallel job whose workers each see a micro-batch, the layer normalizes with
the moments of the *whole* batch: per channel the count ``n``, ``S1 = sum(x)`` and
``S2 = sum(x^2)`` of every worker are summed with one all-reduce, then

    mean = S1 / n,   var = S2 / n - mean^2   (biased; accumulated in float64 at least)
    y = weight * (x - mean) / sqrt(var + eps) + bias

and the running estimates follow torch's BatchNorm from the pooled moments (unbiased
variance ``var * n / (n - 1)``). Workers may hold different numbers of samples. The
all-reduce is :func:`torch.distributed.nn.functional.all_reduce`, whose backward
all-reduces the gradients of ``S1`` and ``S2``, so every worker's input gradient is
exactly the single-process BatchNorm gradient over the concatenated batch. Parameter
gradients stay per worker (``DistributedDataParallel`` averages them).

:class:`SyncBatchNorm` is a :class:`torch.nn.SyncBatchNorm`: on CUDA it *is* torch's
(its own kernels and NCCL), and ``convert_sync_batchnorm`` and ``isinstance`` checks
treat it as one. torch's refuses CPU tensors; on the CPU this class runs the pooled
update above over the process group's backend (gloo). Without an initialized process
group, with one worker, or in eval mode it is plain BatchNorm.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ._checks import device_check


def _world_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group or dist.group.WORLD)


class SyncBatchNorm(nn.SyncBatchNorm):
    """BatchNorm over the union of every worker's batch (see the module docstring); any input rank >= 2."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.device.type != "cpu":
            return super().forward(input)  # torch's SyncBatchNorm (CUDA kernels, NCCL)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if not self.training or _world_size(self.process_group) == 1:
            return self._local(input)
        return _pooled_batch_norm(self, input)

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        """Plain BatchNorm (torch's functional), as torch's SyncBatchNorm does without a group."""
        factor = self._ema_factor()
        use_batch = self.training or self.running_mean is None
        tracked = not self.training or self.track_running_stats
        mean = self.running_mean if tracked else None
        var = self.running_var if tracked else None
        return F.batch_norm(x, mean, var, self.weight, self.bias, use_batch, factor, self.eps)

    def _ema_factor(self) -> float:
        """Count the step (training, tracked) and return the running-average factor, as torch's BatchNorm."""
        if not (self.training and self.track_running_stats):
            return 0.0 if self.momentum is None else self.momentum
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum


def _pooled_batch_norm(layer: SyncBatchNorm, x: torch.Tensor) -> torch.Tensor:
    from torch.distributed.nn.functional import all_reduce

    channels = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    acc = torch.promote_types(x.dtype, torch.float64)
    count = torch.full((1,), x.numel() // channels, dtype=acc, device=x.device)
    local = torch.cat([count, x.sum(dims, dtype=acc), x.square().sum(dims, dtype=acc)])
    with warnings.catch_warnings():  # deprecated in favour of a private module; still the public, autograd-aware one
        warnings.simplefilter("ignore", FutureWarning)
        pooled = all_reduce(local, group=layer.process_group or dist.group.WORLD)  # SUM; gradients all-reduced too
    n = pooled[0]  # an exact integer in float64; no gradient flows through it
    mean = pooled[1 : channels + 1] / n
    var = (pooled[channels + 1 :] / n - mean * mean).clamp_min(0)
    factor = layer._ema_factor()
    if layer.training and layer.track_running_stats:
        device_check(
            n.detach() >= 2, "SyncBatchNorm: expected more than 1 value per channel over all workers, got 1 or 0"
        )
        with torch.no_grad():
            unbiased = var * (n / (n - 1))
            layer.running_mean.mul_(1 - factor).add_(mean.to(layer.running_mean.dtype), alpha=factor)
            layer.running_var.mul_(1 - factor).add_(unbiased.to(layer.running_var.dtype), alpha=factor)
    shape = [1, channels] + [1] * (x.dim() - 2)
    scale = torch.rsqrt(var + layer.eps)
    shift = -mean * scale
    if layer.weight is not None:
        scale = scale * layer.weight.to(acc)
        shift = shift * layer.weight.to(acc) + layer.bias.to(acc)
    return (x * scale.to(x.dtype).reshape(shape) + shift.to(x.dtype).reshape(shape)).to(x.dtype)
