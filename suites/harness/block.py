"""One network block, convolution + normalization + ReLU, ready to time: :class:`BlockCase`."""

from __future__ import annotations

import torch

from bkn import methods

from .decode import decode_input
from .layer import check_runnable
from .matrix import SEED, check_pruned, skip
from .prior import KalmanPrior, link_module
from .process import configure_threads
from .timing import warm_up_runs


class BlockCase:
    """``relu(norm(conv(x)))`` on ``(group_size, *shape)``, one group; for BKN with its prior's propagation.

    ``conv`` is a 3x3 convolution from C to C channels with zero padding (a linear layer
    for (N, C) features), the work a normalization layer rides on in a network. A BKN
    method's prior is the previous layer's posterior propagated through ReLU and this same
    convolution by the method's transition (:class:`~suites.harness.prior.KalmanPrior`
    with ``link=conv``): the official transition pushes a surrogate of one sample per
    group through it, the analytic one its weight's tap sums. So the block's time over
    BN's block is BKN's whole extra cost per block: the norm's own (the layer benchmark)
    plus the chain's. Seeded; the input and output gradient are standard normal; the
    backward reaches x, every parameter and the previous posterior.
    """

    def __init__(
        self,
        method: str,
        group_size: int,
        shape: str,
        device: str,
        dtype: str,
        memory_format: str,
        prune: bool = True,
    ):
        configure_threads()
        method = methods.get(method)
        spec = decode_input(shape, device, dtype, memory_format)
        dims, fmt, self.device, self.dtype = spec.dims, spec.memory_format, spec.device, spec.dtype
        if len(dims) == 4:
            skip("blocks are measured on (N, C) features and 2-d images; the 3-d convolution dominates a 3-d block")
        if prune:
            check_pruned(group_size, dims, self.device, dtype, memory_format)
        check_runnable(method, group_size, dims, training=True)
        self.method = method
        gen = torch.Generator().manual_seed(SEED)
        channels, spatial = dims[0], dims[1:]
        torch.manual_seed(SEED)  # the convolution's default initialisation
        self.conv = link_module(channels, len(spatial))
        self.norm = method.build(channels, spatial_dims=len(spatial))
        bkn = method.norm == "bkn"
        self.prior = KalmanPrior(method, channels, spatial, gen, link=self.conv) if bkn else None
        with torch.no_grad():  # a trained-looking affine, so no term is trivially zero
            if getattr(self.norm, "weight", None) is not None:
                self.norm.weight.copy_(1.0 + 0.1 * torch.randn(self.norm.weight.shape, generator=gen))
                self.norm.bias.copy_(0.1 * torch.randn(self.norm.bias.shape, generator=gen))
        modules = [self.conv, self.norm] + ([self.prior] if bkn else [])
        for m in modules:
            m.to(device=self.device, dtype=self.dtype)
            if fmt is not torch.contiguous_format:
                m.to(memory_format=fmt)
            m.train(True)
        self.x = spec.randn(group_size, gen)
        self.grad_out = torch.randn_like(self.x).contiguous(memory_format=fmt)
        if self.prior is not None:
            with torch.no_grad():
                h = self.conv(self.x)
            self.prior.match_posterior_dtype(self.norm, h)
        self.x.requires_grad_(True)
        params = {id(p): p for m in modules for p in m.parameters()}  # the shared conv once
        self.inputs = [self.x, *params.values()]

    def forward(self) -> torch.Tensor:
        h = self.conv(self.x)
        y = self.norm(h, prior=self.prior()) if self.prior is not None else self.norm(h)
        return torch.relu(y)

    def forward_backward(self):
        """One training step's share of this block: forward, then the gradients of x and parameters."""
        return torch.autograd.grad(self.forward(), self.inputs, self.grad_out, allow_unused=True)

    def warm_up(self, what: str) -> None:
        """Run twice before timing (allocator, kernel selection); unsupported kernels skip."""
        warm_up_runs(self.forward_backward, self.device, what)
