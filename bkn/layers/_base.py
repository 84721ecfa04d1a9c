"""Shared base of the batch-statistic norms (ghost-batch BN, BRN, BKN).

Holds what ``torch.nn.modules.batchnorm._NormBase`` holds (affine parameters,
running buffers, momentum) plus the micro-batch ``group_size`` of docs/design.md §3, and
the input checks, so that every subclass raises the same clear errors.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._function import native_batch_norm_train, normalize_with_stats


class BatchStatNorm(nn.Module):
    """Base class: parameters, buffers, group bookkeeping and input checks.

    Args:
        num_features: number of channels ``C`` of the (N, C, ...) input.
        eps: added to the variance for numerical stability.
        momentum: running-estimate factor (torch convention: ``new = (1 - m) old + m stat``);
            ``None`` gives a cumulative average as in torch.
        affine: learnable ``weight`` (gamma) and ``bias`` (beta).
        track_running_stats: keep running estimates for inference.
        group_size: samples per normalization group (ghost batch); ``None`` = the whole batch.
    """

    _valid_dims: tuple[int, ...] = (4,)
    _dims_text = "4-d (N, C, H, W)"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        group_size: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int, got {num_features!r}")
        if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
            raise ValueError(f"{type(self).__name__}: group_size must be a positive int or None, got {group_size!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.group_size = group_size
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, group_size={self.group_size}"
        )

    # -- checks -------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """Name used in error messages: the module path when known (set by ``bkn.convert``)."""
        name = getattr(self, "_qualified_name", None)
        return f"{type(self).__name__} '{name}'" if name else type(self).__name__

    def _uses_batch_stats(self) -> bool:
        return self.training or self.running_mean is None

    def _check_input(self, x: torch.Tensor) -> int:
        """Validate ``x``; return the number of normalization groups G."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.label}: expected a torch.Tensor input, got {type(x).__name__}")
        if x.dim() not in self._valid_dims:
            raise ValueError(
                f"{self.label}: expected {self._dims_text} input, got {x.dim()}-d input of shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{self.label}: expected {self.num_features} channels (dim 1), "
                f"got {x.shape[1]} channels in input of shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"{self.label}: expected a floating-point input, got dtype {x.dtype}")
        if not self._uses_batch_stats():
            return 1
        n = x.shape[0]
        size = self.group_size or n
        if n == 0 or n % size:
            raise ValueError(
                f"{self.label}: group_size={self.group_size} must divide the batch size, "
                f"got batch size {n} (input shape {tuple(x.shape)})"
            )
        return n // size

    def _values_per_channel(self, x: torch.Tensor, groups: int) -> int:
        return x.numel() // (groups * x.shape[1])

    def _check_enough_values(self, x: torch.Tensor, groups: int) -> None:
        if self._values_per_channel(x, groups) < 2:
            raise ValueError(
                f"{self.label}: expected more than 1 value per channel and group in training mode, "
                f"got input of shape {tuple(x.shape)} with group_size={self.group_size or x.shape[0]} "
                f"(batch statistics of a single value have zero variance)"
            )

    # -- running estimates ----------------------------------------------------------------
    def _ema_factor(self) -> float:
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _running_args(self):
        """``(running_mean, running_var, num_batches_tracked, momentum)`` for the fused Function, or None.

        The Function counts the step in ``num_batches_tracked`` and derives the EMA factor
        (``momentum``, or ``1 / steps`` for ``momentum=None``), as :meth:`_ema_factor` does.
        """
        if not (self.training and self.track_running_stats):
            return None
        b = self._buffers
        return b["running_mean"], b["running_var"], b["num_batches_tracked"], self.momentum

    def _train_without_prior(self, x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Plain batch normalization in training mode; returns ``(y, mean, var)`` with (G, C) stats.

        One group: torch's own kernel, so the result equals ``torch.nn.BatchNorm`` bit for
        bit (outputs, gradients, running estimates). Several groups: the fused Function.
        """
        self._check_enough_values(x, groups)
        if groups == 1:
            factor = 0.0
            if self.training and self.track_running_stats:
                self.num_batches_tracked.add_(1)
                factor = self._ema_factor()
            return native_batch_norm_train(
                x,
                self.weight,
                self.bias,
                self.running_mean if self.training else None,
                self.running_var if self.training else None,
                factor,
                self.eps,
            )
        y, mean, var, _, _ = normalize_with_stats(
            x, self.weight, self.bias, groups=groups, eps=self.eps, running=self._running_args()
        )
        return y, mean, var

    def _normalize_eval(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class Dims1d:
    _valid_dims = (2, 3)
    _dims_text = "2-d (N, C) or 3-d (N, C, L)"


class Dims2d:
    _valid_dims = (4,)
    _dims_text = "4-d (N, C, H, W)"


class Dims3d:
    _valid_dims = (5,)
    _dims_text = "5-d (N, C, D, H, W)"


def logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))
