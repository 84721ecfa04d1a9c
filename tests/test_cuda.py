"""The CUDA path: the layers' torch autograd Functions, the prior chains and every registry method on a GPU.

On the GPU the layers run their torch autograd Functions (the compiled kernels are CPU
only), so these tests compare each method on CUDA with the same method on the CPU in
float64 (outputs, input and parameter gradients, running statistics), check bfloat16
against float32, and run converted networks with their prior chains. Every test is
marked ``cuda`` and skipped where no CUDA device is present. The training steps run inside
``cuda_sync.no_host_sync``: with ``pytest --cuda-sync-debug=error`` (``python -m suites.gpu``)
any host sync in them is an error.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cuda_sync import no_host_sync
from torch import nn

from bkn import methods
from bkn.models import cifar_resnet

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BATCH_METHODS = [n for n in methods.names() if methods.get(n).uses_groups]


def _prior(channels: int, device, dtype, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    mean = 0.1 * torch.randn(channels, generator=gen, dtype=torch.float64)
    var = 1.0 + torch.rand(channels, generator=gen, dtype=torch.float64)
    return mean.to(device, dtype), var.to(device, dtype)


def _run(layer, x, dy, prior):
    x = x.clone().requires_grad_(True)
    with no_host_sync():
        y = layer(x, prior=prior) if prior is not None else layer(x)
        y.backward(dy)
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    buffers = [b for b in layer.buffers() if b.is_floating_point()]
    return y.detach(), grads, buffers


@pytest.mark.parametrize("name", methods.names())
@pytest.mark.parametrize("shape", [(8, 6, 5, 5), (6, 4, 3, 4, 4), (8, 6)])
@pytest.mark.parametrize("group_size", [2, None], ids=["groups-of-2", "one-group"])
def test_method_on_cuda_equals_cpu_in_float64(name, shape, group_size):
    method = methods.get(name)
    dims = len(shape) - 2
    if name == "in" and dims == 0:
        pytest.skip("instance norm needs spatial positions")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    results = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        layer = method.build(shape[1], group_size=group_size, spatial_dims=dims).to(device, torch.float64).train()
        prior = _prior(shape[1], device, torch.float64) if method.norm == "bkn" else None
        for _ in range(2):  # a second step exercises the running estimates and BRN's corrections
            for p in layer.parameters():
                p.grad = None
            results[device] = _run(layer, x.to(device), dy.to(device), prior)
    (y_cpu, g_cpu, b_cpu), (y_gpu, g_gpu, b_gpu) = results["cpu"], results["cuda"]
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_gpu, g_cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-10)
    for a, b in zip(b_gpu, b_cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", BATCH_METHODS + ["gn", "ln"])
@pytest.mark.parametrize("params", ["float32", "bfloat16"])
@pytest.mark.parametrize("group_size", [2, None], ids=["groups-of-2", "one-group"])
def test_bfloat16_on_cuda_is_close_to_float32(name, params, group_size):
    """bfloat16 activations with float32 parameters (mixed precision) or bfloat16 ones (a bf16 network)."""
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this CUDA device has no bfloat16")
    method = methods.get(name)
    if params == "float32" and not method.uses_groups:
        pytest.skip("torch's GroupNorm needs parameters in the input's dtype")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, 7, 7, generator=gen).cuda()
    dy = torch.randn(8, 16, 7, 7, generator=gen).cuda()
    outputs = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        layer = method.build(16, group_size=group_size).cuda().train()
        if dtype == torch.bfloat16 and params == "bfloat16":
            layer = layer.to(torch.bfloat16)
        prior = _prior(16, "cuda", torch.float32) if method.norm == "bkn" else None
        y, grads, _ = _run(layer, x.to(dtype), dy.to(dtype), prior)
        assert y.dtype == dtype and torch.isfinite(y.float()).all()
        outputs[dtype] = (y.float(), grads[0].float())
    (y32, dx32), (y16, dx16) = outputs[torch.float32], outputs[torch.bfloat16]
    torch.testing.assert_close(y16, y32, rtol=0.05, atol=0.05)
    torch.testing.assert_close(dx16, dx32, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("name", ["bkn-analytic", "bkn-analytic-adaptive"])
def test_cifar_resnet_prior_chain_on_cuda_equals_cpu(name):
    """The deterministic (analytic) chain gives the same network output on both devices."""
    method = methods.get(name)
    torch.manual_seed(0)
    model = cifar_resnet(8, method.norm, width=8, **method.layer_options(group_size=2)).double()
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    out = {}
    for device in ("cpu", "cuda"):
        net = copy.deepcopy(model).to(device).train()
        inputs = x.to(device)
        with no_host_sync():
            y = net(inputs)
            y.sum().backward()
        used = [m.prior_used for m in net.modules() if hasattr(m, "prior_used")]
        first_weight = next(net.parameters())
        out[device] = (y.detach().cpu(), first_weight.grad.cpu(), used)
    torch.testing.assert_close(out["cuda"][0], out["cpu"][0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out["cuda"][1], out["cpu"][1], rtol=1e-8, atol=1e-10)
    assert out["cuda"][2] == out["cpu"][2] and sum(out["cuda"][2]) > 1


@pytest.mark.parametrize("name", ["bkn-official", "bkn-analytic"])
def test_converted_torchvision_resnet_trains_on_cuda(name):
    import torchvision

    torch.manual_seed(0)
    model = methods.get(name).convert(torchvision.models.resnet18(num_classes=10), group_size=2).cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(8, 3, 64, 64, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    for _ in range(2):
        with no_host_sync():
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert torch.isfinite(loss)
    used = [m.prior_used for m in model.modules() if hasattr(m, "prior_used")]
    assert sum(used) >= len(used) - 1  # every BKN layer but the first gets a prior in ResNet-18


def test_syncbn_on_one_gpu_is_torch_syncbatchnorm_and_equals_batchnorm():
    """World size 1 through the real torch.nn.SyncBatchNorm (NCCL process group of one GPU)."""
    import torch.distributed as dist

    from bkn.layers import SyncBatchNorm
    from bkn.probes import distributed

    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    distributed.init_process_group(0, 1, distributed.free_port(), backend="nccl", timeout_s=60)
    try:
        gen = torch.Generator().manual_seed(0)
        x = (torch.randn(8, 6, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1).cuda()
        dy = torch.randn(8, 6, 5, 5, generator=gen, dtype=torch.float64).cuda()
        sync = methods.get("syncbn").build(6).cuda().double().train()
        assert isinstance(sync, nn.SyncBatchNorm) and isinstance(sync, SyncBatchNorm)
        bn = nn.BatchNorm2d(6).cuda().double().train()
        bn.load_state_dict(sync.state_dict())
        for _ in range(2):
            ys, gs, bs = _run(sync, x, dy, None)
            yb, gb, bb = _run(bn, x, dy, None)
        torch.testing.assert_close(ys, yb, rtol=1e-12, atol=1e-12)
        for a, b in zip(gs + bs, gb + bb):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    finally:
        dist.destroy_process_group()


def test_official_transition_draws_on_cuda_with_a_cpu_generator():
    """A CPU generator seeds a CUDA generator at each draw (bkn.transitions.montecarlo): the draws are
    made on the GPU, reproducible from the CPU generator's seed, and differ from draw to draw."""
    import pickle

    from bkn import BatchKalmanNorm2d
    from bkn.transitions import MonteCarlo

    layer = BatchKalmanNorm2d(4, device="cuda", dtype=torch.float64)
    mean, var = (
        torch.zeros(2, 4, device="cuda", dtype=torch.float64),
        torch.ones(2, 4, device="cuda", dtype=torch.float64),
    )
    layer.posterior = (mean, var)
    runs = []
    for _ in range(2):
        mc = MonteCarlo(draws=2, generator=torch.Generator().manual_seed(3))
        runs.append([mc.after_norm(layer, (32, 32)).value for _ in range(2)])
    (a1, a2), (b1, b2) = runs
    assert a1.device.type == "cuda" and a1.shape == (4, 4, 32, 32)
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and not torch.equal(a1, a2)
    z = torch.cat([a1, a2]).flatten()  # N(0, 1): 32768 draws
    assert abs(float(z.mean())) < 5 / z.numel() ** 0.5 and abs(float(z.std()) - 1) < 5 * (0.5 / z.numel()) ** 0.5
    copied = pickle.loads(pickle.dumps(mc))
    assert copied.after_norm(layer, (3, 3)).value.device.type == "cuda"


@pytest.mark.parametrize("gain", ["learned", "adaptive"])
def test_gain_is_built_on_the_layers_device(gain):
    """``device="cuda"`` puts the gain's parameters and buffers on the GPU too, and the layer equals
    the same layer on the CPU over three steps (the adaptive gain initialises on the device)."""
    from bkn import BatchKalmanNorm2d

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, 5, 5, generator=gen, dtype=torch.float64) * 2 + 0.5
    dy = torch.randn(8, 6, 5, 5, generator=gen, dtype=torch.float64)
    results = {}
    for device in ("cpu", "cuda"):
        layer = BatchKalmanNorm2d(6, gain=gain, group_size=2, device=device, dtype=torch.float64)
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            assert t.device.type == device, name
        prior = _prior(6, device, torch.float64)
        for _ in range(3):
            for p in layer.parameters():
                p.grad = None
            results[device] = _run(layer, x.to(device), dy.to(device), prior)
    (y_cpu, g_cpu, b_cpu), (y_gpu, g_gpu, b_gpu) = results["cpu"], results["cuda"]
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_gpu + b_gpu, g_cpu + b_cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "strided-batch"])
@pytest.mark.parametrize("name", ["bkn", "ghost", "brn"])
def test_layouts_on_cuda_equal_cpu_contiguous(name, layout):
    """channels_last and non-contiguous inputs on the GPU (tests/test_accelerator_layouts.py on the CPU)."""
    from test_accelerator_layouts import _layouts, _steps

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(8, 6, 4, 5, generator=gen, dtype=torch.float64) * 2 + 0.5
    dy = torch.randn(8, 6, 4, 4, generator=gen, dtype=torch.float64)
    got = _steps(name, 2, _layouts(base.cuda())[layout], dy)
    want = _steps(name, 2, _layouts(base)["contiguous"], dy)
    for (y, dx, grads, buffers), (y0, dx0, grads0, buffers0) in zip(got, want):
        torch.testing.assert_close(y.cpu(), y0, rtol=1e-10, atol=1e-10)
        for a, b in zip([dx] + grads + buffers, [dx0] + grads0 + buffers0, strict=True):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["bkn", "ghost", "brn"])
def test_autocast_bfloat16_on_cuda(name):
    """Under CUDA autocast a bfloat16 input gives a bfloat16 output close to float32; state stays float32."""
    from test_accelerator_layouts import _steps

    if not torch.cuda.is_bf16_supported():
        pytest.skip("this CUDA device has no bfloat16")
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 6, 5, 5, generator=gen) * 2 + 0.5).cuda()
    dy = torch.randn(8, 6, 5, 5, generator=gen)
    reference = _steps(name, 2, x, dy, dtype=torch.float32)
    for (y, dx, grads, buffers), (y0, dx0, _, _) in zip(
        _steps(name, 2, x.bfloat16(), dy, dtype=torch.float32, autocast=True), reference
    ):
        assert y.dtype == dx.dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in grads + buffers)
        torch.testing.assert_close(y.float(), y0, rtol=0.05, atol=0.05)
        torch.testing.assert_close(dx.float(), dx0, rtol=0.1, atol=0.1)
