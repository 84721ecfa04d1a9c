"""The measured parts of the GPU check: copy bandwidth, the layer table, the network steps.

Every item runs inside ``try``: a method that fails (a kernel missing for a dtype, an error
in a layer) becomes a ``failed`` row with the error, and the rest goes on; an item that would
start after its part's budget becomes a ``skipped`` row saying so (:mod:`suites.gpu.run`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bkn import methods
from bkn.probes.results import DTYPE_BYTES, TENSOR_PASSES

from .timing import COPY_FRACTION_TARGET, layer_target, network_target, synchronize, timed

GROUP_SIZE = 2  # samples per normalization group (the micro-batch)
BASELINE = "torch-bn"  # torch's own BatchNorm2d over the whole batch: what every ratio divides by
# The stage shapes of ResNet-18 at batch 8 (the last at batch 2: one group) and one of 256 MiB in float32.
STAGE_SHAPES = ((8, 64, 56, 56), (8, 256, 14, 14), (2, 512, 7, 7))
LARGE_SHAPE = (8, 128, 256, 256)
QUICK_STAGE_SHAPES = ((4, 6, 5, 5), (2, 8, 3, 3))
QUICK_LARGE_SHAPE = (4, 8, 16, 16)
DTYPES = ("float32", "bfloat16")
NETWORK_BATCH = 8
PASSES = TENSOR_PASSES["time_forward_backward"]  # forward reads x, writes y; backward reads x, dy, writes dx


def shape_text(shape) -> str:
    return "x".join(str(d) for d in shape)


def _input(shape, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 2 + 0.5).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------ bandwidth
def bandwidth(run, part, device, shapes, dtypes, rounds: int) -> dict:
    """``dst.copy_(src)`` at each shape: bytes read + written per second. Returns ``{(shape, dtype): rate}``."""
    rates = {}
    for shape in shapes:
        for dtype in dtypes:
            where = dict(shape=shape_text(shape), dtype=dtype)
            if part.expired(2.0):
                run.skip("bandwidth", "copy", part.why(), **where)
                continue
            try:
                src = _input(shape, getattr(torch, dtype), device, 0)
                dst = torch.empty_like(src)
                for _ in range(3):
                    dst.copy_(src)
                result = timed({"copy": lambda d=dst, s=src: d.copy_(s)}, device, rounds, 0.01, "copy")["copy"]
                rate = 2 * src.numel() * src.element_size() / result["time_s"]
                rates[(shape_text(shape), dtype)] = rate
                run.add("bandwidth", "copy", "time_s", result["time_s"], **where)
                run.add("bandwidth", "copy", "copy_Bps", rate, note="bytes read + written per second", **where)
                run.say(f"bandwidth: copy {shape_text(shape)} {dtype}: {rate / 1e9:.0f} GB/s")
                del src, dst
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                run.fail("bandwidth", "copy", exc, **where)
    return rates


# ------------------------------------------------------------------------------------ layers
def _layer_entry(name: str, channels: int, x: torch.Tensor, dy: torch.Tensor, params_dtype: torch.dtype):
    """forward + backward of method ``name`` (groups of 2; BKN handed a prior) on ``x``: a callable."""
    from suites.harness.prior import GivenPrior

    device = x.device
    if name == BASELINE:
        layer, method = nn.BatchNorm2d(channels), None
    else:
        method = methods.get(name)
        layer = method.build(channels, group_size=GROUP_SIZE if method.uses_groups else None)
    # Mixed precision: the batch-statistic norms keep float32 parameters for bfloat16 activations
    # (as under autocast); torch's GroupNorm/LayerNorm/InstanceNorm need parameters in the input's dtype.
    keep32 = method is None or method.uses_groups or method.norm == "syncbn"
    layer = layer.to(device=device, dtype=params_dtype if keep32 else x.dtype).train()
    prior = None
    if method is not None and method.norm == "bkn":  # one (mean, var) per group and channel, as a network hands on
        given = GivenPrior(channels, torch.Generator().manual_seed(1)).to(device)
        given.match_posterior_dtype(layer, x)
        groups = x.shape[0] // GROUP_SIZE
        prior = [p.detach().expand(groups, channels).clone().requires_grad_(True) for p in given.parameters()]
    inputs = [x, *layer.parameters(), *(prior or ())]

    def step():
        y = layer(x, prior=tuple(prior)) if prior is not None else layer(x)
        return torch.autograd.grad(y, inputs, dy, allow_unused=True)

    return step, (method.norm if method is not None else "bn")


def layers(run, part, device, shapes, large_shape, dtypes, names, copy_rates: dict, rounds: int, block_s: float):
    """Every method against torch's BN at every shape and dtype, forward + backward, interleaved rounds."""
    configs = [(s, d) for s in (*shapes, large_shape) for d in dtypes]
    for shape, dtype in configs:
        where = dict(shape=shape_text(shape), dtype=dtype, mode="fwd+bwd")
        large = shape == large_shape
        if part.expired(5.0 if large else 2.0):
            run.skip("layer", "(every method)", part.why(), **where)
            continue
        torch_dtype = getattr(torch, dtype)
        x = _input(shape, torch_dtype, device, 0).requires_grad_(True)
        dy = _input(shape, torch_dtype, device, 1)
        entries, norms = {}, {}
        for name in (BASELINE, *names):
            try:
                fn, norms[name] = _layer_entry(name, shape[1], x, dy, torch.float32)
                for _ in range(2):
                    fn()
                synchronize(device)
                entries[name] = fn
            except Exception as exc:  # noqa: BLE001
                run.fail("layer", name, exc, **where)
        if BASELINE not in entries:
            continue
        try:
            results = timed(entries, device, rounds, block_s, BASELINE)
        except Exception as exc:  # noqa: BLE001
            run.fail("layer", "(every method)", exc, **where)
            continue
        nbytes = PASSES * math.prod(shape) * DTYPE_BYTES[dtype]
        copy_rate = copy_rates.get((shape_text(shape), dtype))
        for name, r in results.items():
            run.add("layer", name, "time_s", r["time_s"], **where)
            if name != BASELINE:
                target = layer_target(norms[name], large, dtype)
                note = f"median of per-round ratios, quartiles {r['q25']:.3g}-{r['q75']:.3g}"
                run.add("layer", name, "ratio_to_bn", r["ratio"], target=target, note=note, **where)
            if large:
                achieved = nbytes / r["time_s"]
                run.add("layer", name, "achieved_Bps", achieved, note=f"{PASSES} tensor passes / time", **where)
                if copy_rate:
                    ours = name != BASELINE and layer_target(norms[name], True, dtype) is not None
                    fraction_target = COPY_FRACTION_TARGET if ours else None
                    run.add("layer", name, "fraction_of_copy", achieved / copy_rate, target=fraction_target, **where)
        shown = ", ".join(f"{n} {r['ratio']:.2f}x" for n, r in results.items() if n != BASELINE)
        run.say(f"layer {shape_text(shape)} {dtype}: torch-bn {results[BASELINE]['time_s'] * 1e6:.0f} us; {shown}")
        del x, dy, entries
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ networks
def build_network(network: str, name: str, quick: bool) -> nn.Module:
    """``network`` (resnet18, cifar-resnet20) with method ``name``'s norms in groups of 2, or unconverted."""
    if network == "resnet18":
        import torchvision

        model = torchvision.models.resnet18(num_classes=10 if quick else 1000)
        return model if name == BASELINE else methods.get(name).convert(model, group_size=GROUP_SIZE)
    if network == "cifar-resnet20":
        from bkn.models import cifar_resnet

        if name == BASELINE:
            return cifar_resnet(8 if quick else 20, "bn", width=8) if quick else cifar_resnet(20, "bn")
        method = methods.get(name)
        extra = {"width": 8} if quick else {}
        return cifar_resnet(8 if quick else 20, method.norm, **method.layer_options(GROUP_SIZE), **extra)
    raise ValueError(f"unknown network {network!r}; expected resnet18 or cifar-resnet20")


def network_inputs(network: str, quick: bool) -> tuple[int, ...]:
    if network == "resnet18":
        return (4, 3, 32, 32) if quick else (NETWORK_BATCH, 3, 224, 224)
    return (4, 3, 16, 16) if quick else (NETWORK_BATCH, 3, 32, 32)


def train_step(model: nn.Module, network: str, device, quick: bool, seed: int = 0):
    """(TrainStep on a fixed seeded batch, the tensors it reads by name): what timing and graphs share."""
    from bkn.probes.graphs import model_tensors
    from bkn.probes.measure import TrainStep

    gen = torch.Generator().manual_seed(seed)
    shape = network_inputs(network, quick)
    x = torch.randn(shape, generator=gen).to(device)
    y = torch.randint(0, 10, (shape[0],), generator=gen).to(device)
    model = model.to(device).train()
    return TrainStep(model, x, y), model_tensors(model, x, y)


NETWORKS = ("resnet18", "cifar-resnet20")


def networks(run, part, device, names, rounds: int, block_s: float, quick: bool, graphs: bool, which=NETWORKS):
    """Each network's training step per method, eager and (on CUDA) graphed, with ratios to torch-bn."""
    from bkn.probes.graphs import GraphCaptureError, GraphedStep

    for network in which:
        label = f"{network}-{shape_text(network_inputs(network, quick))}"
        if part.expired(10.0):
            run.skip("network", "(every method)", part.why(), shape=label)
            continue
        steps, tensors = {}, {}
        for name in (BASELINE, *names):
            try:
                torch.manual_seed(0)
                steps[name], tensors[name] = train_step(build_network(network, name, quick), network, device, quick)
                for _ in range(2):
                    steps[name]()
                synchronize(device)
            except Exception as exc:  # noqa: BLE001
                steps.pop(name, None)
                run.fail("network", name, exc, shape=label, mode="eager")
        _time_mode(run, part, device, steps, label, network, "eager", rounds, block_s)
        if not graphs:
            for name in steps:
                run.skip("network", name, "CUDA graphs need a CUDA device", shape=label, mode="graphed")
        else:
            graphed = {}
            for name, step in steps.items():  # captured after the eager timing: replays own their tensors
                if part.expired(5.0):
                    run.skip("network", name, part.why(), shape=label, mode="graphed")
                    continue
                try:
                    graphed[name] = GraphedStep(step, tensors[name], what=f"{name} {network} step").replay
                except (GraphCaptureError, RuntimeError) as exc:
                    run.fail("network", name, exc, shape=label, mode="graphed")
            _time_mode(run, part, device, graphed, label, network, "graphed", rounds, block_s)
        del steps, tensors
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _time_mode(run, part, device, entries: dict, label: str, network: str, mode: str, rounds: int, block_s: float):
    if BASELINE not in entries:
        if entries:
            run.skip("network", "(every method)", f"no {mode} {BASELINE} step to divide by", shape=label, mode=mode)
        return
    if part.expired(3.0):
        run.skip("network", "(every method)", part.why(), shape=label, mode=mode)
        return
    try:
        results = timed(entries, device, rounds, block_s, BASELINE)
    except Exception as exc:  # noqa: BLE001
        run.fail("network", "(every method)", exc, shape=label, mode=mode)
        return
    for name, r in results.items():
        run.add("network", name, "time_s", r["time_s"], shape=label, mode=mode)
        if name != BASELINE:
            target = network_target(name, mode, network)
            note = f"median of per-round ratios, quartiles {r['q25']:.3g}-{r['q75']:.3g}"
            run.add("network", name, "ratio_to_bn", r["ratio"], target=target, note=note, shape=label, mode=mode)
    shown = ", ".join(f"{n} {r['ratio']:.2f}x" for n, r in results.items() if n != BASELINE)
    run.say(f"network {label} {mode}: torch-bn {results[BASELINE]['time_s'] * 1e3:.2f} ms; {shown}")
