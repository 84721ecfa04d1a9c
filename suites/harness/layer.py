"""One normalization layer on one input, ready to time: :class:`LayerCase`."""

from __future__ import annotations

import math

import torch

from bkn import methods
from bkn.methods import Method

from .decode import decode_input
from .matrix import SEED, check_pruned, skip
from .prior import GivenPrior
from .process import configure_threads
from .timing import warm_up_runs


def check_runnable(method: Method, group_size: int, shape: tuple[int, ...], training: bool) -> None:
    """Combinations that cannot run (not pruning): skip them.

    Batch statistics without a prior (BN, BRN) need more than one value per channel in
    training mode (torch raises); BKN with a prior does not, that is the paper's point.
    Instance norm needs spatial positions; the rivals from timm (``method.converts``) run on
    1-d and 2-d positions only. CBN in training needs its convolution (docs/design.md §16).
    """
    if method.norm == "in" and len(shape) == 1:
        skip("instance norm needs spatial positions; (N, C) features have none")
    if method.converts and len(shape) not in (2, 3):
        skip(f"{method.name} is built from timm's 2-d layers: (N, C, L) and (N, C, H, W) inputs only")
    values_per_channel = group_size * math.prod(shape[1:])
    if training and method.norm == "cbn":
        skip(
            "cbn in training differentiates its statistics through the convolution feeding it, which a layer "
            "benchmark lacks (it would time plain BN); its training cost is the network step's (bench_network)"
        )
    if training and method.norm in ("bn", "brn", "evonorm-b0", "mabn") and values_per_channel < 2:
        skip(
            f"{method.name} in training mode needs more than one value per channel (group size {group_size} of {shape})"
        )
    if method.norm == "in" and math.prod(shape[1:]) < 2:
        skip("instance norm needs more than one spatial position")


class LayerCase:
    """One normalization layer on one input, ready to run: ``forward()``, ``forward_backward()``.

    The layer is ``bkn.methods.get(method).build(C)``: built without a group, so it
    normalizes its whole input, ``(group_size, *shape)``, as one group (``bn`` is then
    torch's own ``BatchNorm*d``). A BKN method in training is handed a prior
    (:class:`~suites.harness.prior.GivenPrior`: the norm alone, like for like with BN;
    its propagation is the block benchmark's, :class:`suites.harness.block.BlockCase`).
    Seeded; the input and the output gradient
    are standard normal. ``training=False`` builds the inference case (eval mode, running
    estimates, no autograd, no prior).
    """

    def __init__(
        self,
        method: str,
        group_size: int,
        shape: str,
        device: str,
        dtype: str,
        memory_format: str,
        training: bool = True,
        prune: bool = True,
    ):
        configure_threads()
        method = methods.get(method)
        spec = decode_input(shape, device, dtype, memory_format)
        dims, fmt, self.device, self.dtype = spec.dims, spec.memory_format, spec.device, spec.dtype
        if prune:
            check_pruned(group_size, dims, self.device, dtype, memory_format)
        check_runnable(method, group_size, dims, training)
        self.method = method
        self.training = training
        gen = torch.Generator().manual_seed(SEED)
        channels, spatial = dims[0], dims[1:]
        self.layer = method.build(channels, spatial_dims=len(spatial))
        self.prior = GivenPrior(channels, gen) if method.norm == "bkn" and training else None
        with torch.no_grad():  # a trained-looking affine, so no term is trivially zero
            if getattr(self.layer, "weight", None) is not None:
                self.layer.weight.copy_(1.0 + 0.1 * torch.randn(self.layer.weight.shape, generator=gen))
                self.layer.bias.copy_(0.1 * torch.randn(self.layer.bias.shape, generator=gen))
        modules = [self.layer] + ([self.prior] if self.prior is not None else [])
        for m in modules:
            m.to(device=self.device, dtype=self.dtype)
            if fmt is not torch.contiguous_format:
                m.to(memory_format=fmt)
            m.train(training)
        self.x = spec.randn(group_size, gen)
        self.grad_out = torch.randn_like(self.x).contiguous(memory_format=fmt)
        if self.prior is not None:
            self.prior.match_posterior_dtype(self.layer, self.x)
        if training:
            self.x.requires_grad_(True)
        self.inputs = [self.x] + [p for m in modules for p in m.parameters()]

    def forward(self) -> torch.Tensor:
        if not self.training:
            with torch.no_grad():
                return self.layer(self.x)
        if self.prior is not None:
            return self.layer(self.x, prior=self.prior())
        return self.layer(self.x)

    def forward_backward(self):
        """One training step's share of this layer: forward, then the gradients of x and parameters."""
        return torch.autograd.grad(self.forward(), self.inputs, self.grad_out, allow_unused=True)

    def warm_up(self, fn, what: str) -> None:
        """Run ``fn`` twice before timing (allocator, kernel selection); unsupported kernels skip."""
        warm_up_runs(fn, self.device, what)
