"""A 1-D pre-activation ResNet in the paper's style (the training probe's ``resnet1d``), for any norm.

:class:`bkn.models.CifarResNet` built with ``spatial_dims=1``: the same network and the
same hand-wired BKN priors, with 1-D convolutions (kernel 3), for sequences such as
MNIST-1D's (N, 1, 40)::

    conv0(w) - norm0 - relu - stage1(w, n blocks) - stage2(2w) - stage3(4w) - norm_last - relu - GAP - fc

    block(l):  b1 = l                        (first block of the net: l is already normalized)
               b1 = relu(norm_pre(l))        (every other block)
               c1 = relu(norm1(conv1(b1)))   (conv1 has stride 2 when the width doubles)
               c2 = conv2(c1)
               return c2 + shortcut(l)       (shortcut: identity, or average pool of 2 + zero channel padding)

``6n + 2`` layers: depth 8 has one block per stage and seven norms.

BKN priors run through the residual stream as :mod:`bkn.models.cifar_resnet` wires them
(its docstring has the official code's rules): ``norm1``'s prior comes from the norm that
produced ``b1`` through ReLU and ``conv1``; a block's output carries the statistics of its
input plus those of ``norm1``'s posterior through ReLU and ``conv2``; ``norm_pre`` and
``norm_last`` take the statistics the stream carries. The only change for one spatial
axis: the ``analytic`` transition divides the variance by 2 (not 4) at the down-sampling
shortcut's average of 2 positions, and that pool rounds odd lengths up. So every norm but
``norm0`` normalizes with a prior in a BKN training forward (``layer.prior_used``), and
``bkn.prior_summary(model)`` reports it.
"""

from __future__ import annotations

from .cifar_resnet import CifarResNet


class PreActResNet1d(CifarResNet):
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
        if not isinstance(blocks_per_stage, int) or blocks_per_stage < 1:
            raise ValueError(f"PreActResNet1d: blocks_per_stage must be an int >= 1, got {blocks_per_stage!r}")
        if not isinstance(width, int) or width < 2 or width % 2:
            raise ValueError(f"PreActResNet1d: width must be a positive even int, got {width!r}")
        super().__init__(blocks_per_stage, norm, num_classes, in_channels, width, spatial_dims=1, **norm_options)


def resnet1d(depth: int = 8, norm: str = "bn", **kwargs) -> PreActResNet1d:
    """``PreActResNet1d`` by depth (8, 14, 20, ...: depth = 6n + 2)."""
    if not isinstance(depth, int) or (depth - 2) % 6 or depth < 8:
        raise ValueError(f"resnet1d: depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {depth!r}")
    return PreActResNet1d((depth - 2) // 6, norm, **kwargs)
