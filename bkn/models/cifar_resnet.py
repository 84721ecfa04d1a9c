"""The paper's CIFAR ResNet (6n+2 layers, pre-activation), for any norm.

Built as the authors' ``cifar-kn-microbatch.py`` builds it (He et al. 2016,
"Identity Mappings in Deep Residual Networks" variant)::

    conv0(16) - norm0 - relu - stage1(16, n blocks) - stage2(32) - stage3(64) - norm_last - relu - GAP - fc

    block(l):  b1 = l                        (first block of the net: l is already normalized)
               b1 = relu(norm_pre(l))        (every other block)
               c1 = relu(norm1(conv1(b1)))   (conv1 has stride 2 when the width doubles)
               c2 = conv2(c1)
               return c2 + shortcut(l)       (shortcut: identity, or 2x2 average pool + zero channel padding)

With ``norm="bkn"`` every norm but ``norm0`` gets a prior, wired exactly as the
official code wires it (``transition`` picks how the statistics are propagated):

* ``norm_pre`` of a block: the prior the block *input* carries (the statistics of
  the previous block's sum);
* ``norm1``: from the posterior of the norm that produced ``b1`` (``norm_pre``, or
  ``norm0`` in the first block), through ReLU and ``conv1``;
* the block output carries ``(m + m3, v + v3)``: the prior of the block input (for
  the first block: ``norm0``'s posterior, as in the official code) plus the
  statistics of ``norm1``'s posterior propagated through ReLU and ``conv2``. The
  down-sampling shortcut pads these statistics with zeros. (The official code does
  not reduce the variance for the average pool; the ``analytic`` transition does,
  and starts the first block's shortcut from ``relu(norm0)`` instead.)
* ``norm_last``: the prior carried by the last block's output.

Ablations of ``official`` (``transition=``, docs/design.md §4): ``official-affine`` draws the
surrogates from each norm's output distribution (gamma, beta and the normalization
included); ``official-relu-shortcut`` starts the first block's shortcut from the
moments of the surrogate of ``relu(norm0)`` (the sample the official code pushes into
``conv1``), as ``analytic`` starts it from its moments of ``relu(norm0)``, instead of
``norm0``'s pre-normalization posterior; ``draws=k`` (a BKN option, default 1) pushes
``k`` surrogate samples per group through each convolution.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import norms, transitions
from ..transitions import Moments


def _carry(prior) -> Moments | None:
    return None if prior is None else Moments(prior[0], prior[1])


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
# The 1-D network (bkn.models.resnet1d) pools sequences of any length, the 2-D one as the official code.
_POOL = {1: lambda: nn.AvgPool1d(2, ceil_mode=True), 2: lambda: nn.AvgPool2d(2), 3: lambda: nn.AvgPool3d(2)}


class _Block(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, first: bool, make_norm, spatial_dims: int = 2):
        super().__init__()
        self.first = first
        self.increase = out_channels != in_channels
        self.spatial_dims = spatial_dims
        conv = _CONV[spatial_dims]
        self.norm_pre = None if first else make_norm(in_channels)
        self.conv1 = conv(in_channels, out_channels, 3, 2 if self.increase else 1, 1, bias=False)
        self.norm1 = make_norm(out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.pool = _POOL[spatial_dims]() if self.increase else None

    def _shortcut(self, l: torch.Tensor) -> torch.Tensor:
        if not self.increase:
            return l
        pad = l.shape[1] // 2
        return nn.functional.pad(self.pool(l), (0, 0) * self.spatial_dims + (pad, pad))

    def forward(
        self, l: torch.Tensor, carried: Moments | None, source, chain
    ) -> tuple[torch.Tensor, Moments | None, nn.Module]:
        """``carried``: prior statistics of ``l``; ``source``: the last norm run before this block."""
        if self.first:
            b1, b1_norm = l, source
        else:
            b1 = self.relu(self._norm(self.norm_pre, l, carried if chain else None))
            b1_norm = self.norm_pre
        prior1 = chain.through_conv(b1_norm, b1, self.conv1) if chain else None
        c1 = self.relu(self._norm(self.norm1, self.conv1(b1), prior1))
        c2 = self.conv2(c1)
        out_stats = None
        if chain:
            m3 = chain.through_conv(self.norm1, c1, self.conv2)
            start = chain.block_input(carried, source, l) if self.first else carried
            if start is not None and m3 is not None:
                if self.increase:
                    start = chain.pool_pad(start, 2**self.spatial_dims, l.shape[1] // 2)
                out_stats = start + m3
        return c2 + self._shortcut(l), out_stats, self.norm1

    @staticmethod
    def _norm(layer: nn.Module, x: torch.Tensor, prior: Moments | None) -> torch.Tensor:
        if prior is None:
            return layer(x)
        return layer(x, prior=(prior.mean, prior.var))


class _Chain:
    """The official wiring's statistic propagation, for one transition."""

    def __init__(self, transition: str, draws: int = 1):
        self.name = transition
        self.t = transitions.get(transition, **({"draws": draws} if draws != 1 else {}))
        self.analytic = type(self.t) is transitions.Analytic

    def through_conv(self, norm: nn.Module, activation: torch.Tensor, conv: nn.Conv2d) -> Moments | None:
        if norm.posterior is None:
            return None
        if self.t is None:  # identity: the previous posterior, if channels match
            mean, var = norm.posterior
            return Moments(mean, var) if mean.shape[-1] == conv.out_channels else None
        state = self.t.after_norm(norm, tuple(activation.shape[2:]))
        state = self.t.module(conv, self.t.relu(state))
        return Moments(*self.t.to_prior(state))

    def block_input(self, carried: Moments | None, source: nn.Module, l: torch.Tensor) -> Moments | None:
        """Statistics added at the first block's shortcut."""
        if source.posterior is None:
            return None
        if getattr(self.t, "shortcut", "posterior") == "activation":  # analytic, official-relu-shortcut
            return Moments(*self.t.to_prior(self.t.relu(self.t.after_norm(source, tuple(l.shape[2:])))))
        return Moments(*source.posterior)  # official: norm0's pre-normalization posterior

    def pool_pad(self, stats: Moments, positions: int, pad: int) -> Moments:
        """The down-sampling shortcut: an average of ``positions`` (2x2: 4), then zero channel padding."""
        if self.analytic:
            stats = Moments(stats.mean, stats.var / positions)  # analytic: an average of independent positions
        return stats.pad_channels(pad, pad)


class CifarResNet(nn.Module):
    """Pre-activation CIFAR ResNet with ``6 * blocks_per_stage + 2`` layers.

    Args:
        blocks_per_stage: ``n`` (n=3: ResNet-20, n=5: ResNet-32 as the official scripts).
        norm: a name of :func:`bkn.norms.names`; ``norm_options`` go to ``bkn.norms.create``
            (for ``bkn``: ``p``, ``gain``, ``transition``, ``draws``, ``group_size``...).
        num_classes, in_channels, width: classifier size, input channels, first stage width.
        spatial_dims: 2 (images); 1 builds the same network on sequences (:class:`bkn.models.PreActResNet1d`).
    """

    def __init__(
        self,
        blocks_per_stage: int = 3,
        norm: str = "bn",
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 16,
        spatial_dims: int = 2,
        **norm_options,
    ):
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"CifarResNet: blocks_per_stage must be >= 1, got {blocks_per_stage}")
        if spatial_dims not in _CONV:
            raise ValueError(f"CifarResNet: spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
        self.norm_name = norm
        self.spatial_dims = spatial_dims
        make_norm = lambda c: norms.create(norm, c, spatial_dims=spatial_dims, **norm_options)  # noqa: E731
        self.conv0 = _CONV[spatial_dims](in_channels, width, 3, 1, 1, bias=False)
        self.norm0 = make_norm(width)
        blocks, channels = [], width
        for stage in range(3):
            out = width * 2**stage
            for k in range(blocks_per_stage):
                first = stage == 0 and k == 0
                blocks.append(_Block(channels, out, first, make_norm, spatial_dims))
                channels = out
        self.blocks = nn.ModuleList(blocks)
        self.norm_last = make_norm(channels)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(channels, num_classes)
        self.transition = norm_options.get("transition", "official") if norm == "bkn" else None
        self.draws = norm_options.get("draws", 1) if norm == "bkn" else 1
        for m in self.modules():
            if isinstance(m, nn.modules.conv._ConvNd):  # variance_scaling(2.0, fan_out) as the official script
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def norm_layers(self) -> list[nn.Module]:
        """Normalization layers in execution order (depth on an axis, for the probes)."""
        out = [self.norm0]
        for b in self.blocks:
            out += ([b.norm_pre] if b.norm_pre is not None else []) + [b.norm1]
        return out + [self.norm_last]

    def prior_report(self) -> list[dict] | None:
        """Per normalization layer, as :func:`bkn.prior_report` (``bkn.prior_summary(model)`` prints it): the
        official wiring (the plan) and whether the last training forward used a prior; None without BKN."""
        from ..chain import FIRST_LAYER, NOT_RUN

        names = {id(m): n for n, m in self.named_modules()}
        if self.transition is None:
            return None  # no BKN: nothing to report (bkn.prior_summary says there is no chain)
        used = self.__dict__.get("_prior_last")
        rows, carried, previous = [], [], ""  # carried: the norms whose statistics the block input carries
        for layer in self.norm_layers():
            name = names[id(layer)]
            block = name.rsplit(".", 1)[0] if name.startswith("blocks.") else ""
            if name == "norm0":
                sources, path, carried = [], ["conv0"], ["norm0"]
            elif name.endswith("norm1"):
                sources = ["norm0"] if block == "blocks.0" else [f"{block}.norm_pre"]
                path = ["relu", f"{block}.conv1"]
            else:  # norm_pre, norm_last: the statistics carried by the previous block's sum
                sources, path = list(carried), ["relu", f"{previous}.conv2", "add (+ shortcut)"]
            if name.endswith("norm1"):  # the statistics this block's sum carries on
                carried = (carried if block == "blocks.0" else [f"{block}.norm_pre (its prior)"]) + [name]
                previous = block
            if name == "norm0":
                plan = FIRST_LAYER
            else:
                plan = f"prior ({self.transition}; wired by CifarResNet as the official code)"
            if used is None:
                last = NOT_RUN
            elif used[len(rows)]:
                last = "prior used"
            else:
                last = FIRST_LAYER if name == "norm0" else "no prior: the layer did not use the prior it was given"
            rows.append({"layer": name, "sources": sources, "path": path, "plan": plan, "last": last})
        return rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chain = _Chain(self.transition, self.draws) if self.transition and self.training else None
        l = self.relu(self.norm0(self.conv0(x)))
        carried, source = None, self.norm0
        for block in self.blocks:
            l, carried, source = block(l, carried, source, chain)
        l = _Block._norm(self.norm_last, l, carried if chain else None)
        if chain is not None:  # for prior_report: what this training forward did
            self.__dict__["_prior_last"] = [layer.prior_used for layer in self.norm_layers()]
        l = self.relu(l).mean(tuple(range(2, 2 + self.spatial_dims)))
        return self.fc(l)


def cifar_resnet(depth: int = 20, norm: str = "bn", **kwargs) -> CifarResNet:
    """``CifarResNet`` by depth (20, 32, 44, 56, 110, ...: depth = 6n + 2)."""
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"cifar_resnet: depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
    return CifarResNet((depth - 2) // 6, norm, **kwargs)
