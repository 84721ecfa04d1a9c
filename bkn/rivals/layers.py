"""The rivals' layers: timm's, wrapped for what this suite needs (docs/design.md §15).

* ``frn``: :class:`FilterResponseNorm` is timm's ``FilterResponseNormTlu2d`` (``apply_act``:
  with TLU, the pair norm -> ReLU; without: FRN alone).
* ``evonorm-s0``: :class:`EvoNormS0` is timm's ``EvoNorm2dS0`` with this suite's GN group rule
  (:func:`bkn.norms.gn_groups`); without its activation it divides by the group std (timm's
  ``group_std``) instead of timm's ``apply_act=False``, which skips the normalization too.
* ``evonorm-b0``: :class:`EvoNormB0` is timm's ``EvoNorm2dB0`` with its batch variance per group
  of ``group_size`` samples (timm's forward runs on the groups laid side by side as channels);
  without its activation its ``v`` is a zero buffer, so it divides by
  ``max(batch std, instance std)`` (timm's ``apply_act=False`` would skip the normalization).
* ``gn-ws``: GroupNorm here; :class:`StdConv1d` is timm's ``StdConv2d`` for ``Conv1d`` (the
  convolutions themselves are swapped by :mod:`bkn.rivals.conversion`).

Every layer takes ``(N, C, H, W)`` and ``(N, C, L)`` (run as ``(N, C, L, 1)``, which computes the
same statistics); ``(N, C)`` features have no positions and raise ``ValueError``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import EvoNorm2dB0, EvoNorm2dS0, FilterResponseNormTlu2d, StdConv2d
from timm.layers.evo_norm import group_std
from torch import nn


def _as_4d(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``x`` as (N, C, H, W) (a 1-d input gets a trailing position axis of 1) and whether it was 1-d."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{type(layer).__name__}: expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() == 3:
        return x.unsqueeze(-1), True
    if x.dim() != 4:
        raise ValueError(
            f"{type(layer).__name__}: expected (N, C, L) or (N, C, H, W) input, got {x.dim()}-d input of shape "
            f"{tuple(x.shape)} (these rivals normalize over spatial positions; (N, C) features have none)"
        )
    return x, False


class FilterResponseNorm(FilterResponseNormTlu2d):
    """FRN (+ TLU with ``apply_act``): timm's ``FilterResponseNormTlu2d``, also on (N, C, L)."""

    bkn_statistics = "per_sample"  # how the lab's drift probe reads it (bkn.probes.stats.layer_kinds)

    def __init__(self, num_features: int, apply_act: bool = True, eps: float = 1e-5, device=None, dtype=None):
        super().__init__(num_features, apply_act=apply_act, eps=eps, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, apply_act={self.tau is not None}, eps={self.eps}"

    def forward(self, x):
        x4, one_d = _as_4d(self, x)
        y = super().forward(x4)
        return y.squeeze(-1) if one_d else y

    def normalize_with(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """The output had the mean square over positions been ``var + mean^2`` (per channel, the drift probe's)."""
        shape = (1, -1) + (1,) * (x.dim() - 2)
        nu2 = (var + mean.square()).to(x.dtype).view(shape)
        y = x * (nu2 + self.eps).rsqrt() * self.weight.view(shape) + self.bias.view(shape)
        return torch.maximum(y, self.tau.view(shape)) if self.tau is not None else y


class EvoNormS0(EvoNorm2dS0):
    """EvoNorm-S0: timm's ``EvoNorm2dS0`` (``bkn.norms.create`` gives it GN's group rule, ``gn_groups``)."""

    bkn_statistics = "per_sample"

    def __init__(
        self, num_features: int, groups: int = 32, apply_act: bool = True, eps: float = 1e-5, device=None, dtype=None
    ):
        if not isinstance(groups, int) or groups < 1 or num_features % groups:
            raise ValueError(
                f"EvoNormS0: groups must be a positive int dividing num_features={num_features}, got {groups!r}"
            )
        super().__init__(num_features, groups=groups, apply_act=apply_act, eps=eps, device=device, dtype=dtype)

    def forward(self, x):
        x4, one_d = _as_4d(self, x)
        if self.v is not None:
            y = super().forward(x4)
        else:  # the normalization without the activation (timm's apply_act=False would skip both)
            shape = (1, -1, 1, 1)
            y = x4 / group_std(x4, self.groups, self.eps) * self.weight.view(shape) + self.bias.view(shape)
        return y.squeeze(-1) if one_d else y

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, groups={self.groups}, apply_act={self.v is not None}, eps={self.eps}"

    def normalize_with(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """The output with the group std replaced by ``sqrt(var + eps)`` per channel (``mean`` unused: no centring)."""
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = x / (var.to(x.dtype).view(shape) + self.eps).sqrt()
        if self.v is not None:
            y = y * (x * self.v.view(shape)).sigmoid()
        return y * self.weight.view(shape) + self.bias.view(shape)


class _GroupedView:
    """What timm's ``EvoNorm2dB0.forward`` reads, for G groups laid side by side as G * C channels: in
    eval mode it divides by ``sqrt(running_var + eps)``, so ``running_var`` here is the groups' batch var."""

    training = False

    def __init__(self, layer: "EvoNormB0", var: torch.Tensor, groups: int):
        self.eps = layer.eps
        self.running_var = var.reshape(-1)
        self.v = layer.v.repeat(groups)
        self.weight = layer.weight.repeat(groups)
        self.bias = layer.bias.repeat(groups)


class EvoNormB0(EvoNorm2dB0):
    """EvoNorm-B0: timm's ``EvoNorm2dB0`` with its batch variance per group of ``group_size`` samples.

    ``group_size=None``: one group, the whole batch (timm's layer exactly). With groups, the training
    forward computes each group's variance over (its samples, positions) and runs timm's forward on
    the groups side by side as channels with that variance; the running variance moves once per step
    towards the mean over groups of the unbiased group variances (as the ghost-batch BN here).
    ``apply_act=False``: ``v`` is a zero buffer, ``y = x / max(sqrt(batch var + eps),
    sqrt(instance var + eps)) * weight + bias`` (timm's ``apply_act=False`` is an affine map only).
    """

    def __init__(
        self,
        num_features: int,
        group_size: int | None = None,
        apply_act: bool = True,
        momentum: float = 0.1,
        eps: float = 1e-3,
        device=None,
        dtype=None,
    ):
        if group_size is not None and (
            not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1
        ):
            raise ValueError(f"EvoNormB0: group_size must be a positive int or None, got {group_size!r}")
        super().__init__(num_features, apply_act=True, momentum=momentum, eps=eps, device=device, dtype=dtype)
        self.group_size = group_size
        self.apply_act = apply_act
        if not apply_act:
            del self.v
            self.register_buffer("v", torch.zeros(num_features, device=self.weight.device, dtype=self.weight.dtype))

    bkn_statistics = "batch"

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, group_size={self.group_size}, apply_act={self.apply_act}, eps={self.eps}"

    def reset_running_stats(self) -> None:
        """The running variance back to ones (as at construction; torch's BatchNorm has the same method)."""
        self.running_var.fill_(1.0)

    def normalize_with(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """The output with the batch variance replaced by ``var`` (timm's eval formula; ``mean`` unused)."""
        x4, one_d = _as_4d(self, x)
        y = EvoNorm2dB0.forward(_GroupedView(self, var.to(x4.dtype), 1), x4)
        return y.squeeze(-1) if one_d else y

    def forward(self, x):
        x4, one_d = _as_4d(self, x)
        n = x4.shape[0]
        g = n if self.group_size is None else self.group_size
        if not self.training or g == n:
            if self.training and n * x4.shape[2] * x4.shape[3] < 2:
                raise ValueError(
                    f"EvoNormB0: a training batch needs more than one value per channel, got {tuple(x.shape)}"
                )
            y = super().forward(x4)
        else:
            y = self._grouped(x4, g)
        return y.squeeze(-1) if one_d else y

    def _grouped(self, x: torch.Tensor, g: int) -> torch.Tensor:
        n, c, h, w = x.shape
        if n % g:
            raise ValueError(f"EvoNormB0: group_size={g} must divide the batch size {n} (input {tuple(x.shape)})")
        if g * h * w < 2:
            raise ValueError(f"EvoNormB0: a group needs more than one value per channel (group_size={g}, {h}x{w})")
        groups = n // g
        side = x.reshape(groups, g, c, h, w).transpose(0, 1).reshape(g, groups * c, h, w)  # group k's channels k*C...
        # timm computes the variance in float32 (x.float()); float64 stays float64 (gradcheck)
        var = side.to(torch.promote_types(x.dtype, torch.float32)).var(dim=(0, 2, 3), unbiased=False).view(groups, c)
        with torch.no_grad():
            count = g * h * w
            self.running_var.mul_(1 - self.momentum).add_(var.mean(0) * (self.momentum * count / (count - 1)))
        y = EvoNorm2dB0.forward(_GroupedView(self, var, groups), side)  # timm's forward, eval branch, on the groups
        return y.reshape(g, groups, c, h, w).transpose(0, 1).reshape(n, c, h, w)


class StdConv1d(nn.Conv1d):
    """``Conv1d`` with weight standardization, computed as timm's ``StdConv2d`` does (``eps`` 1e-6)."""

    def __init__(self, *args, eps: float = 1e-6, **kw):
        super().__init__(*args, **kw)
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=self.eps
        ).reshape_as(self.weight)
        return self._conv_forward(x, weight, self.bias)


STD_CONVS = {nn.Conv2d: StdConv2d, nn.Conv1d: StdConv1d}
NORMS = {"frn": FilterResponseNorm, "evonorm-b0": EvoNormB0, "evonorm-s0": EvoNormS0}
