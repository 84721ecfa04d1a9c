"""A 1-D pre-activation ResNet in the paper's style (the training probe's ``resnet1d``), for any norm.

:mod:`bkn.models.cifar_resnet` with 1-D convolutions (kernel 3), for sequences such
as MNIST-1D's (N, 1, 40)::

    conv0(w) - norm0 - relu - stage1(w, n blocks) - stage2(2w) - stage3(4w) - norm_last - relu - GAP - fc

    block(l):  b1 = l                        (first block of the net: l is already normalized)
               b1 = relu(norm_pre(l))        (every other block)
               c1 = relu(norm1(conv1(b1)))   (conv1 has stride 2 when the width doubles)
               c2 = conv2(c1)
               return c2 + shortcut(l)       (shortcut: identity, or average pool of 2 + zero channel padding)

``6n + 2`` layers: depth 8 has one block per stage and seven norms.

BKN priors through the residual stream, hand-wired as :mod:`bkn.models.cifar_resnet`
wires them (its docstring has the official code's rules): ``norm1``'s prior comes
from the norm that produced ``b1`` through ReLU and ``conv1``; a block's output carries
the statistics of its input plus those of ``norm1``'s posterior through ReLU and
``conv2``; ``norm_pre`` and ``norm_last`` take the statistics the stream carries. The
only change for one spatial axis: the ``analytic`` transition divides the variance by
2 (not 4) at the down-sampling shortcut's average of 2 positions. So every norm but
``norm0`` normalizes with a prior in a BKN training forward (``layer.prior_used``).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import norms
from ..transitions import Moments
from .cifar_resnet import _Chain


class _Chain1d(_Chain):
    """The CIFAR ResNet's statistic propagation, with the 1-D shortcut's pool of 2 positions."""

    def pool_pad(self, stats: Moments, pool: nn.AvgPool1d, pad: int) -> Moments:
        if self.analytic:
            stats = Moments(stats.mean, stats.var / 2)  # analytic: the average of 2 independent positions
        return stats.pad_channels(pad, pad)


class _Block1d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, first: bool, make_norm):
        super().__init__()
        self.first = first
        self.increase = out_channels != in_channels
        self.norm_pre = None if first else make_norm(in_channels)
        self.conv1 = nn.Conv1d(in_channels, out_channels, 3, 2 if self.increase else 1, 1, bias=False)
        self.norm1 = make_norm(out_channels)
        self.conv2 = nn.Conv1d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool1d(2, ceil_mode=True) if self.increase else None

    def _shortcut(self, l: torch.Tensor) -> torch.Tensor:
        if not self.increase:
            return l
        pad = l.shape[1] // 2
        return nn.functional.pad(self.pool(l), (0, 0, pad, pad))

    def forward(self, l: torch.Tensor, carried: Moments | None, source, chain):
        """``carried``: prior statistics of ``l``; ``source``: the last norm run before this block."""
        if self.first:
            b1, b1_norm = l, source
        else:
            b1 = self.relu(_norm(self.norm_pre, l, carried if chain else None))
            b1_norm = self.norm_pre
        prior1 = chain.through_conv(b1_norm, b1, self.conv1) if chain else None
        c1 = self.relu(_norm(self.norm1, self.conv1(b1), prior1))
        c2 = self.conv2(c1)
        out_stats = None
        if chain:
            m3 = chain.through_conv(self.norm1, c1, self.conv2)
            start = chain.block_input(carried, source, l) if self.first else carried
            if start is not None and m3 is not None:
                if self.increase:
                    start = chain.pool_pad(start, self.pool, l.shape[1] // 2)
                out_stats = start + m3
        return c2 + self._shortcut(l), out_stats, self.norm1


def _norm(layer: nn.Module, x: torch.Tensor, prior: Moments | None) -> torch.Tensor:
    return layer(x) if prior is None else layer(x, prior=(prior.mean, prior.var))


class PreActResNet1d(nn.Module):
    """Pre-activation 1-D ResNet with ``6 * blocks_per_stage + 2`` layers.

    Args:
        blocks_per_stage: ``n`` (1: ResNet-8).
        norm: a name of :func:`bkn.norms.names`; ``norm_options`` go to ``bkn.norms.create``.
        num_classes, in_channels, width: classifier size, input channels, first stage width.
    """

    def __init__(
        self,
        blocks_per_stage: int = 1,
        norm: str = "bn",
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 16,
        **norm_options,
    ):
        super().__init__()
        if not isinstance(blocks_per_stage, int) or blocks_per_stage < 1:
            raise ValueError(f"PreActResNet1d: blocks_per_stage must be an int >= 1, got {blocks_per_stage!r}")
        if not isinstance(width, int) or width < 2 or width % 2:
            raise ValueError(f"PreActResNet1d: width must be a positive even int, got {width!r}")
        self.norm_name = norm
        make_norm = lambda c: norms.create(norm, c, spatial_dims=1, **norm_options)  # noqa: E731
        self.conv0 = nn.Conv1d(in_channels, width, 3, 1, 1, bias=False)
        self.norm0 = make_norm(width)
        blocks, channels = [], width
        for stage in range(3):
            out = width * 2**stage
            for k in range(blocks_per_stage):
                blocks.append(_Block1d(channels, out, first=(stage == 0 and k == 0), make_norm=make_norm))
                channels = out
        self.blocks = nn.ModuleList(blocks)
        self.norm_last = make_norm(channels)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(channels, num_classes)
        self.transition = norm_options.get("transition", "official") if norm == "bkn" else None
        self.draws = norm_options.get("draws", 1) if norm == "bkn" else 1
        for m in self.modules():
            if isinstance(m, nn.Conv1d):  # variance_scaling(2.0, fan_out), as the CIFAR ResNet
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def norm_layers(self) -> list[nn.Module]:
        """Normalization layers in execution order."""
        out = [self.norm0]
        for b in self.blocks:
            out += ([b.norm_pre] if b.norm_pre is not None else []) + [b.norm1]
        return out + [self.norm_last]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chain = _Chain1d(self.transition, self.draws) if self.transition and self.training else None
        l = self.relu(self.norm0(self.conv0(x)))
        carried, source = None, self.norm0
        for block in self.blocks:
            l, carried, source = block(l, carried, source, chain)
        l = _norm(self.norm_last, l, carried if chain else None)
        return self.fc(self.relu(l).mean(2))


def resnet1d(depth: int = 8, norm: str = "bn", **kwargs) -> PreActResNet1d:
    """``PreActResNet1d`` by depth (8, 14, 20, ...: depth = 6n + 2)."""
    if not isinstance(depth, int) or (depth - 2) % 6 or depth < 8:
        raise ValueError(f"resnet1d: depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {depth!r}")
    return PreActResNet1d((depth - 2) // 6, norm, **kwargs)
