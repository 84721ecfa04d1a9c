"""Memory layouts and autocast on the accelerator path: BKN (with a prior), ghost BN and BRN run
through their Python autograd Functions (the path CUDA tensors take; here with the compiled CPU
kernels switched off), on channels_last, non-contiguous (sliced) and bfloat16-autocast inputs.

A layout is only a different arrangement of the same values, so every result (output, input,
parameter and prior gradients, running estimates, over two steps so that BRN's corrections and
the running statistics take part) must equal the contiguous input's, up to the summation order
of the reductions (float64 here). Under ``torch.autocast(..., dtype=torch.bfloat16)`` the layers
are not autocast ops: the output has the input's dtype (float32 stays float32 and gives exactly the
float32 result; a bfloat16 input, as a convolution under autocast hands them, gives a bfloat16
output), parameters, their gradients and running estimates stay float32, and the bfloat16
output is close to the float32 one at bfloat16 tolerance. tests/test_cuda.py runs these on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from bkn import BatchKalmanNorm2d, BatchKalmanNorm3d, BatchRenorm2d, BatchRenorm3d, GhostBatchNorm2d, GhostBatchNorm3d
from bkn.layers import _native

LAYERS = {
    2: {
        "bkn": lambda c, **kw: BatchKalmanNorm2d(c, p=0.7, group_size=2, **kw),
        "ghost": lambda c, **kw: GhostBatchNorm2d(c, group_size=2, **kw),
        "brn": lambda c, **kw: BatchRenorm2d(c, rmax=1.5, dmax=0.5, group_size=2, **kw),
    },
    3: {
        "bkn": lambda c, **kw: BatchKalmanNorm3d(c, p=0.7, group_size=2, **kw),
        "ghost": lambda c, **kw: GhostBatchNorm3d(c, group_size=2, **kw),
        "brn": lambda c, **kw: BatchRenorm3d(c, rmax=1.5, dmax=0.5, group_size=2, **kw),
    },
}
C = 6


@pytest.fixture(autouse=True)
def python_functions(monkeypatch):
    """The Python autograd Functions, as on a GPU: the compiled CPU kernels report themselves absent."""
    monkeypatch.setattr(_native, "load", lambda: None)


def _layouts(base: torch.Tensor) -> dict[str, torch.Tensor]:
    """The values of ``base[..., 1:]`` in several memory arrangements (all but ``contiguous`` non-contiguous)."""
    sliced = base[..., 1:]
    channels_last = torch.channels_last if base.dim() == 4 else torch.channels_last_3d
    # Every other sample of a batch twice as large: the values of ``base``, strided along N.
    interleaved = torch.stack([base, torch.full_like(base, float("nan"))], 1).flatten(0, 1)[::2]
    return {
        "contiguous": sliced.contiguous(),
        "channels_last": sliced.contiguous(memory_format=channels_last),
        "sliced": sliced,
        "strided-batch": interleaved[..., 1:],
    }


def _steps(name, dims, x, dy, dtype=torch.float64, autocast=False, steps=2):
    """Training steps of a fresh layer on ``x``'s device (weights and priors from fixed seeds); each one's results."""
    gen, device = torch.Generator().manual_seed(1), x.device
    layer = LAYERS[dims][name](C, dtype=dtype, device=device)
    with torch.no_grad():
        layer.weight.copy_(0.5 + torch.rand(C, generator=gen, dtype=dtype))
        layer.bias.copy_(torch.randn(C, generator=gen, dtype=dtype))
    prior_mean = (0.2 * torch.randn(x.shape[0] // 2, C, generator=gen, dtype=dtype)).to(device).requires_grad_()
    prior_var = (1 + torch.rand(x.shape[0] // 2, C, generator=gen, dtype=dtype)).to(device).requires_grad_()
    out = []
    for _ in range(steps):
        xi = x.detach().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            y = layer(xi, prior=(prior_mean, prior_var)) if name == "bkn" else layer(xi)
        y.backward(dy.to(device, y.dtype))
        params = [layer.weight, layer.bias] + ([prior_mean, prior_var] if name == "bkn" else [])
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        buffers = [b.clone() for b in layer.buffers() if b.is_floating_point()]
        out.append((y.detach(), xi.grad, grads, buffers))
    return out


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "strided-batch"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", ["bkn", "ghost", "brn"])
def test_layouts_give_the_contiguous_results(name, dims, layout):
    gen = torch.Generator().manual_seed(0)
    spatial = (4, 5) if dims == 2 else (3, 2, 5)
    base = torch.randn(8, C, *spatial, generator=gen, dtype=torch.float64) * 2 + 0.5
    dy = torch.randn(8, C, *spatial[:-1], spatial[-1] - 1, generator=gen, dtype=torch.float64)
    inputs = _layouts(base)
    x = inputs[layout]
    assert torch.equal(x, inputs["contiguous"]) and not x.is_contiguous()
    got, want = _steps(name, dims, x, dy), _steps(name, dims, inputs["contiguous"], dy)
    for (y, dx, grads, buffers), (y0, dx0, grads0, buffers0) in zip(got, want):
        torch.testing.assert_close(y, y0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dx, dx0, rtol=1e-10, atol=1e-12)
        for a, b in zip(grads + buffers, grads0 + buffers0, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["bkn", "ghost", "brn"])
def test_autocast_bfloat16(name):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, C, 5, 5, generator=gen) * 2 + 0.5
    dy = torch.randn(8, C, 5, 5, generator=gen)
    reference = _steps(name, 2, x, dy, dtype=torch.float32)
    # A float32 input: the layers are not autocast ops, so nothing changes.
    for (y, dx, grads, buffers), (y0, dx0, grads0, buffers0) in zip(
        _steps(name, 2, x, dy, dtype=torch.float32, autocast=True), reference
    ):
        assert y.dtype == torch.float32 and torch.equal(y, y0) and torch.equal(dx, dx0)
    # A bfloat16 input (a convolution's output under autocast): bfloat16 out, float32 state.
    for (y, dx, grads, buffers), (y0, dx0, grads0, buffers0) in zip(
        _steps(name, 2, x.bfloat16(), dy, dtype=torch.float32, autocast=True), reference
    ):
        assert y.dtype == dx.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
        assert all(t.dtype == torch.float32 for t in grads + buffers)
        torch.testing.assert_close(y.float(), y0, rtol=0.05, atol=0.05)
        torch.testing.assert_close(dx.float(), dx0, rtol=0.1, atol=0.1)
        for a, b in zip(grads + buffers, grads0 + buffers0, strict=True):
            torch.testing.assert_close(a, b, rtol=0.05, atol=0.1)
