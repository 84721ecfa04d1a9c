"""A BKN layer's prior in a benchmark: given (the layer alone), or propagated (a block, as a network does)."""

from __future__ import annotations

import torch
from torch import nn

from bkn import transitions
from bkn.methods import Method


def link_module(channels: int, dims: int) -> nn.Module:
    """The module between two normalization layers: a 3x3(x3) convolution, or a linear layer."""
    if dims == 0:
        return nn.Linear(channels, channels, bias=False)
    if dims == 2:
        return nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    if dims == 3:
        return nn.Conv3d(channels, channels, 3, padding=1, bias=False)
    raise ValueError(f"no link module for {dims} spatial dimensions")


def posterior_dtype(layer: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype of the posterior a prior-fed BKN layer returns for ``x``'s dtype.

    In a network a BKN layer's prior comes from another BKN layer's posterior, whose
    statistics are float32 for bfloat16 activations; a benchmark's prior has that dtype.
    """
    with torch.no_grad():
        like = dict(dtype=x.dtype, device=x.device)
        c = layer.num_features
        layer(x.detach(), prior=(torch.zeros(c, **like), torch.ones(c, **like)))
        return layer.posterior[0].dtype


class GivenPrior(nn.Module):
    """A BKN layer's prior handed to it as a network would: a (mean, var) pair of shape (1, C).

    Leaf parameters, so the layer's backward computes their gradient, as it does for a
    prior propagated from the previous layer; what produced the prior is not timed (the
    block benchmark times it). This makes a layer benchmark compare the norm alone, BKN
    against BN like for like.
    """

    def __init__(self, channels: int, generator: torch.Generator):
        super().__init__()
        self.prior_mean = nn.Parameter(0.1 * torch.randn(1, channels, generator=generator))
        self.prior_var = nn.Parameter(1.0 + torch.rand(1, channels, generator=generator))

    def match_posterior_dtype(self, layer: nn.Module, x: torch.Tensor) -> None:
        dtype = posterior_dtype(layer, x)
        for p in (self.prior_mean, self.prior_var):
            p.data = p.data.to(dtype)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prior_mean, self.prior_var


class KalmanPrior(nn.Module):
    """The prior of a BKN layer, propagated from the previous layer's posterior, as a network does.

    In a network a BKN layer's prior is the previous normalization layer's posterior
    pushed through ReLU and the convolution in between (docs/design.md §4), every training step.
    That propagation (the *chain*) is what separates the ``official`` transition (a
    surrogate activation of one sample per group through the *real* convolution) from the
    ``analytic`` one (closed form, O(C^2 k^2)). ``link`` is that convolution: in a block
    benchmark, the block's own (so the propagation shares its weight, and the backward
    reaches it, as in a network); a fresh 3x3 one otherwise. The previous layer is built
    by the same ``method`` (so it has the method's transition); its posterior is a pair of
    leaf tensors of shape (1, C) (one group) in the dtype a prior-fed BKN layer hands on
    (:meth:`match_posterior_dtype`: float32 statistics for bfloat16 activations); the
    propagation is the one :mod:`bkn.models.cifar_resnet` runs
    (``after_norm -> relu -> conv -> to_prior``).
    """

    def __init__(
        self,
        method: Method,
        channels: int,
        spatial: tuple[int, ...],
        generator: torch.Generator,
        link: nn.Module | None = None,
    ):
        super().__init__()
        if method.norm != "bkn":
            raise ValueError(f"KalmanPrior: method {method.name!r} is not a BKN method (its norm is {method.norm!r})")
        self.transition = transitions.get(method.options["transition"])
        self.spatial = tuple(spatial)
        self.source = method.build(channels, spatial_dims=len(spatial))  # the previous layer
        self.link = link if link is not None else link_module(channels, len(spatial))
        mean = 0.1 * torch.randn(1, channels, generator=generator)
        var = 1.0 + torch.rand(1, channels, generator=generator)
        self.posterior_mean = nn.Parameter(mean)
        self.posterior_var = nn.Parameter(var)

    def match_posterior_dtype(self, layer: nn.Module, x: torch.Tensor) -> None:
        """Give the previous posterior the dtype a prior-fed BKN layer returns for ``x``'s dtype."""
        dtype = posterior_dtype(layer, x)
        for p in (self.posterior_mean, self.posterior_var):
            p.data = p.data.to(dtype)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.transition
        self.source.posterior = (self.posterior_mean, self.posterior_var)
        state = t.after_norm(self.source, self.spatial)
        state = t.module(self.link, t.relu(state))
        return t.to_prior(state)
