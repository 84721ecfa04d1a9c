"""A small 1-D convolutional network for MNIST-1D, for any norm (the training probe's ``convnet``).

The network of issue 12's MNIST-1D protocol::

    x (N, C_in, L) - [conv(k=5, stride 2, padding 2) - norm - relu] x layers - flatten - linear

With ``width = 32`` channels, three layers and MNIST-1D's length 40 the lengths are
40 -> 20 -> 10 -> 5, and the head sees 32 x 5 = 160 features.

With ``norm="bkn"`` every norm after the first gets a prior in training mode, wired
as the official code wires consecutive conv-norm-ReLU layers (and as
:mod:`bkn.models.cifar_resnet` does): norm k's prior is norm k-1's posterior pushed
through ReLU and conv k by the layers' ``transition`` (``official``: one Monte-Carlo
surrogate per group; ``analytic``: closed-form moments). The first norm has no
upstream statistics and normalizes with its observation alone (plain BN). In eval mode
every norm uses its running estimates and no prior.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import norms
from .cifar_resnet import _Chain


class ConvNet1d(nn.Module):
    """``layers`` x (conv - norm - ReLU) with stride 2, then a linear classifier on the flattened features.

    Args:
        norm: a name of :func:`bkn.norms.names`; ``norm_options`` go to ``bkn.norms.create``
            (for ``bkn``: ``p``, ``gain``, ``transition``, ``group_size``...).
        in_channels, length: the input's channels and length (MNIST-1D: 1 x 40).
        num_classes, width, layers, kernel_size: classifier size, channels of every conv, conv-norm-ReLU
            layers, kernel taps (odd: padding ``kernel_size // 2`` keeps the length ``ceil(L / 2)``).
    """

    def __init__(
        self,
        norm: str = "bn",
        in_channels: int = 1,
        length: int = 40,
        num_classes: int = 10,
        width: int = 32,
        layers: int = 3,
        kernel_size: int = 5,
        **norm_options,
    ):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("length", length), ("width", width), ("layers", layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ConvNet1d: {name} must be a positive int, got {value!r}")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"ConvNet1d: kernel_size must be a positive odd int, got {kernel_size!r}")
        self.norm_name = norm
        convs, layer_norms, channels = [], [], in_channels
        for _ in range(layers):
            convs.append(nn.Conv1d(channels, width, kernel_size, 2, kernel_size // 2, bias=False))
            layer_norms.append(norms.create(norm, width, spatial_dims=1, **norm_options))
            channels = width
            length = (length + 1) // 2  # stride 2 with padding k // 2
        self.convs, self.norms = nn.ModuleList(convs), nn.ModuleList(layer_norms)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(width * length, num_classes)
        self.transition = norm_options.get("transition", "official") if norm == "bkn" else None
        self.draws = norm_options.get("draws", 1) if norm == "bkn" else 1
        for m in self.convs:  # He initialisation for ReLU, as the CIFAR ResNet
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def norm_layers(self) -> list[nn.Module]:
        """Normalization layers in execution order."""
        return list(self.norms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chain = _Chain(self.transition, self.draws) if self.transition and self.training else None
        previous = None  # (the norm that produced h, h) for the next layer's prior
        for conv, norm in zip(self.convs, self.norms):
            prior = chain.through_conv(previous[0], previous[1], conv) if chain and previous else None
            z = conv(x)
            x = self.relu(norm(z) if prior is None else norm(z, prior=(prior.mean, prior.var)))
            previous = (norm, x)
        return self.fc(x.flatten(1))
