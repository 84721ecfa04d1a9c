"""Shared set-up for the asv suites: the parameter matrix, skip and pruning rules, cases.

Nothing here is a benchmark (no attribute is named ``time_``/``peakmem_``/``track_``/
``mem_``): the suite modules import from here.

Parameter matrix (names fixed by the report contract)
-----------------------------------------------------
``norm``           bn (``torch.nn.BatchNorm*d`` itself), bkn-official, bkn-analytic (BKN with
                   p = 0.9 and that transition), brn (rmax = 3, dmax = 5: the correction
                   path is exercised), gn (32 groups), ln, in
``batch_size``     the normalization batch: the layer sees ``(batch_size, *shape)`` and
                   normalizes it as one group (no ``group_size``)
``shape``          per-sample shape: the four ResNet stages at 224 input, an (N, C)
                   feature case ``"512"`` and a 3-d (video) case ``"64x8x28x28"``
``device``         cpu, cuda
``dtype``          float32, bfloat16
``memory_format``  contiguous, channels_last (4-d inputs only)

Skips (``NotImplementedError`` in setup: asv records "n/a", never a failure, never a
timing of something else):

* *cannot run*: cuda without a CUDA device; bfloat16 where the device has none;
  channels_last on a non-4-d input; BN/BRN in training mode with one value per channel
  (torch raises; BKN with a prior does not, that is the point of the paper); instance
  norm on (N, C) features; a layer that raises "not implemented for 'BFloat16'".
* *pruned on CPU* so that the whole quick matrix fits in 15 minutes on 2 cores
  (:func:`check_pruned`, each rule below has a constant): per-call tensors above
  ``CPU_MAX_ELEMENTS``; the secondary axes (bfloat16, channels_last) only at the
  batch sizes ``CPU_SECONDARY_BATCHES``; network steps (:func:`check_network_pruned`)
  up to ``CPU_MAX_NETWORK_INPUT`` input elements. CUDA runs every combination that
  can run.

Threads: ``torch.set_num_threads(threads())`` at import and in every setup; the count
is ``$BKN_BENCH_THREADS`` or 1 (the default makes a shared 2-core CI machine and a
laptop comparable), and is recorded by the ``track_threads`` benchmark.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os

import torch
from torch import nn

from bkn import norms, transitions

# asv forks every benchmark process from one server that has imported the suites. What torch
# imports lazily on first use (sympy for autograd's shape checks, torch._dynamo for torch.optim,
# torchvision's models) would otherwise be imported again in each of those thousands of processes,
# 0.3 to 1.5 s each, longer than most benchmarks. Imports only: nothing may touch a GPU before the
# fork, and NVML-based CUDA checks keep torch.cuda.is_available() from initialising CUDA anywhere.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
for _module in ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torchvision.models"):
    with contextlib.suppress(ImportError):
        importlib.import_module(_module)

# -- the matrix ---------------------------------------------------------------------------------
NORMS = ("bn", "bkn-official", "bkn-analytic", "brn", "gn", "ln", "in")
BATCH_NORMS = ("bn", "bkn-official", "bkn-analytic", "brn")  # statistics over the batch
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
STAGE_SHAPES = ("64x56x56", "128x28x28", "256x14x14", "512x7x7")
SHAPES = STAGE_SHAPES + ("512", "64x8x28x28")
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16")
MEMORY_FORMATS = ("contiguous", "channels_last")

LAYER_PARAM_NAMES = ["norm", "batch_size", "shape", "device", "dtype", "memory_format"]
LAYER_PARAMS = [list(NORMS), list(BATCH_SIZES), list(SHAPES), list(DEVICES), list(DTYPES),
                list(MEMORY_FORMATS)]
TENSOR_PARAM_NAMES = LAYER_PARAM_NAMES[1:]  # the copy reference: the same tensors, no norm
TENSOR_PARAMS = LAYER_PARAMS[1:]

# -- pruning (CPU only) ---------------------------------------------------------------------------
# Rule 1: no per-call tensor above 2**23 elements (32 MiB in float32) on the CPU. Keeps
# (32, 64, 56, 56) and (64, 128, 28, 28); drops (64, 64, 56, 56) and the 3-d case at
# batch 32 and 64, the largest tensors of the matrix.
CPU_MAX_ELEMENTS = 2 ** 23
# Rule 2: on the CPU, bfloat16 and channels_last are measured at these batch sizes only
# (the tiny, the paper's micro-batch and a large one); float32/contiguous at every size.
CPU_SECONDARY_BATCHES = (2, 8, 32)
# Rule 3 (networks): on the CPU a network step is measured up to this many input
# elements (ResNet-18 at 224: batch <= 8, about a second a step on one thread; the
# CIFAR ResNet at every batch size). Rule 2 applies to the networks too.
CPU_MAX_NETWORK_INPUT = 8 * 3 * 224 * 224

THREADS_ENV = "BKN_BENCH_THREADS"
DEFAULT_THREADS = 1
SEED = 0


def threads() -> int:
    """The fixed torch thread count for every benchmark: ``$BKN_BENCH_THREADS`` or 1."""
    value = os.environ.get(THREADS_ENV, str(DEFAULT_THREADS))
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"{THREADS_ENV} must be a positive integer, got {value!r}") from None
    if count < 1:
        raise ValueError(f"{THREADS_ENV} must be a positive integer, got {value!r}")
    return count


def configure_threads() -> int:
    torch.set_num_threads(threads())
    return torch.get_num_threads()


configure_threads()


def skip(reason: str):
    """Skip this parameter combination (asv records it as not run)."""
    raise NotImplementedError(reason)


# -- parameter decoding -------------------------------------------------------------------------
def parse_shape(shape: str) -> tuple[int, ...]:
    """``"64x56x56"`` -> ``(64, 56, 56)``; ``"512"`` -> ``(512,)``."""
    try:
        dims = tuple(int(d) for d in shape.split("x"))
    except ValueError:
        raise ValueError(f"shape must look like 'CxHxW', 'C' or 'CxDxHxW', got {shape!r}") from None
    if not dims or any(d < 1 for d in dims) or len(dims) > 4:
        raise ValueError(f"shape must look like 'CxHxW', 'C' or 'CxDxHxW', got {shape!r}")
    return dims


def torch_device(device: str) -> torch.device:
    """The device, or a skip when it is not on this machine.

    CUDA is only touched here, in setup (a forked benchmark process), never at import:
    asv's fork server imports the suites once and a CUDA context must not be forked.
    """
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            skip("CUDA is not available on this machine")
        return torch.device("cuda")
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def torch_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "float32":
        return torch.float32
    if dtype == "bfloat16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            skip("this CUDA device has no bfloat16 support")
        return torch.bfloat16
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")


def torch_memory_format(memory_format: str, rank: int) -> torch.memory_format:
    if memory_format == "contiguous":
        return torch.contiguous_format
    if memory_format == "channels_last":
        if rank != 4:
            skip(f"channels_last is defined for 4-d tensors only (this input is {rank}-d)")
        return torch.channels_last
    raise ValueError(f"memory_format must be 'contiguous' or 'channels_last', got {memory_format!r}")


def _check_secondary_pruned(batch_size: int, dtype: str, memory_format: str) -> None:
    """Rule 2: bfloat16 and channels_last only at the secondary batch sizes."""
    if (dtype != "float32" or memory_format != "contiguous") and batch_size not in CPU_SECONDARY_BATCHES:
        skip(f"pruned on cpu: {dtype}/{memory_format} only at batch sizes {CPU_SECONDARY_BATCHES}")


def check_pruned(batch_size: int, shape: tuple[int, ...], device: torch.device, dtype: str,
                 memory_format: str) -> None:
    """Rules 1 and 2 of the CPU pruning (see the module docstring)."""
    if device.type != "cpu":
        return
    elements = batch_size * math.prod(shape)
    if elements > CPU_MAX_ELEMENTS:
        skip(f"pruned on cpu: {elements} elements per call > CPU_MAX_ELEMENTS={CPU_MAX_ELEMENTS}")
    _check_secondary_pruned(batch_size, dtype, memory_format)


def check_network_pruned(batch_size: int, input_shape: tuple[int, ...], device: torch.device, dtype: str,
                         memory_format: str) -> None:
    """Rule 3 of the CPU pruning (networks), and rule 2 as for the layers."""
    if device.type != "cpu":
        return
    elements = batch_size * math.prod(input_shape)
    if elements > CPU_MAX_NETWORK_INPUT:
        skip(f"pruned on cpu: {elements} input elements per step > "
             f"CPU_MAX_NETWORK_INPUT={CPU_MAX_NETWORK_INPUT}")
    _check_secondary_pruned(batch_size, dtype, memory_format)


def synchronize(device: torch.device) -> None:
    """Wait for the device: a CUDA timing must include the kernels, not just their launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reraise_unsupported(err: RuntimeError, what: str):
    """A kernel that does not exist for this dtype/device is a skip; anything else is a bug."""
    text = str(err)
    if "not implemented for" in text or "Unsupported" in text or "not supported" in text:
        skip(f"{what}: {text.splitlines()[0]}")
    raise err


# -- norms ---------------------------------------------------------------------------------------
def norm_options(norm: str) -> tuple[str, dict]:
    """Registry name and options for a benchmark ``norm`` value."""
    if norm == "bn":
        return "bn", {}
    if norm in ("bkn-official", "bkn-analytic"):
        return "bkn", {"p": 0.9, "transition": norm.split("-", 1)[1]}
    if norm == "brn":
        return "brn", {"rmax": 3.0, "dmax": 5.0}
    if norm in ("gn", "ln", "in"):
        return norm, {}
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")


def make_norm(norm: str, channels: int, dims: int) -> nn.Module:
    name, options = norm_options(norm)
    return norms.create(name, channels, spatial_dims=dims, **options)


def check_runnable(norm: str, batch_size: int, shape: tuple[int, ...], training: bool) -> None:
    """Combinations that cannot run (not pruning): skip them."""
    if norm == "in" and len(shape) == 1:
        skip("instance norm needs spatial positions; (N, C) features have none")
    values_per_channel = batch_size * math.prod(shape[1:])
    if training and norm in ("bn", "brn") and values_per_channel < 2:
        skip(f"{norm} in training mode needs more than one value per channel (batch {batch_size} of {shape})")
    if norm == "in" and math.prod(shape[1:]) < 2:
        skip("instance norm needs more than one spatial position")


def _link(channels: int, dims: int) -> nn.Module:
    """The module between two normalization layers: a 3x3(x3) convolution, or a linear layer."""
    if dims == 0:
        return nn.Linear(channels, channels, bias=False)
    if dims == 2:
        return nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    if dims == 3:
        return nn.Conv3d(channels, channels, 3, padding=1, bias=False)
    raise ValueError(f"no link module for {dims} spatial dimensions")


class KalmanPrior(nn.Module):
    """The prior of a BKN layer, propagated from the previous layer's posterior, as a network does.

    In a network a BKN layer's prior is the previous normalization layer's posterior
    pushed through ReLU and the convolution in between (spec 1.2), every training step.
    That propagation is part of what BKN costs, and it is what separates the
    ``official`` transition (a surrogate activation of one sample per group through the
    *real* convolution) from the ``analytic`` one (closed form, O(C^2 k^2)). So a
    ``bkn-*`` benchmark times ``prior = KalmanPrior(); y = bkn(x, prior=prior)`` and its
    backward, which reaches the previous posterior and the convolution's weight, as the
    network's would. The convolution of the *real* activations is not timed: every norm
    shares it. The previous posterior is a pair of leaf tensors of shape (1, C)
    (one group) in the dtype a prior-fed BKN layer hands on (:meth:`match_posterior_dtype`:
    float32 statistics for bfloat16 activations); the propagation is the one
    :mod:`bkn.models.cifar_resnet` runs (``after_norm -> relu -> conv -> to_prior``).
    """

    def __init__(self, channels: int, spatial: tuple[int, ...], transition: str, generator: torch.Generator):
        super().__init__()
        self.transition = transitions.get(transition)
        self.spatial = tuple(spatial)
        self.source = norms.create("bkn", channels, spatial_dims=len(spatial))  # the previous layer
        self.link = _link(channels, len(spatial))
        mean = 0.1 * torch.randn(1, channels, generator=generator)
        var = 1.0 + torch.rand(1, channels, generator=generator)
        self.posterior_mean = nn.Parameter(mean)
        self.posterior_var = nn.Parameter(var)

    def match_posterior_dtype(self, layer: nn.Module, x: torch.Tensor) -> None:
        """Give the previous posterior the dtype a prior-fed BKN layer returns for ``x``'s dtype.

        In a network the previous layer is itself a BKN layer with a prior, whose posterior
        statistics are float32 for bfloat16 activations; the propagation starts from those.
        """
        with torch.no_grad():
            like = dict(dtype=x.dtype, device=x.device)
            c = layer.num_features
            layer(x.detach(), prior=(torch.zeros(c, **like), torch.ones(c, **like)))
            dtype = layer.posterior[0].dtype
        for p in (self.posterior_mean, self.posterior_var):
            p.data = p.data.to(dtype)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.transition
        self.source.posterior = (self.posterior_mean, self.posterior_var)
        state = t.after_norm(self.source, self.spatial)
        state = t.module(self.link, t.relu(state))
        return t.to_prior(state)


class LayerCase:
    """One normalization layer on one input, ready to run: ``forward()``, ``forward_backward()``.

    Seeded; the input and the output gradient are standard normal. ``training=False``
    builds the inference case (eval mode, running estimates, no autograd).
    """

    def __init__(self, norm: str, batch_size: int, shape: str, device: str, dtype: str, memory_format: str,
                 training: bool = True, prune: bool = True):
        configure_threads()
        dims = parse_shape(shape)
        self.device = torch_device(device)
        self.dtype = torch_dtype(dtype, self.device)
        fmt = torch_memory_format(memory_format, 1 + len(dims))
        if prune:
            check_pruned(batch_size, dims, self.device, dtype, memory_format)
        check_runnable(norm, batch_size, dims, training)
        self.training = training
        gen = torch.Generator().manual_seed(SEED)
        channels, spatial = dims[0], dims[1:]
        self.layer = make_norm(norm, channels, len(spatial))
        self.prior = None
        if norm.startswith("bkn") and training:
            self.prior = KalmanPrior(channels, spatial, norm.split("-", 1)[1], gen)
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
        x = torch.randn((batch_size, *dims), generator=gen)
        self.x = x.to(device=self.device, dtype=self.dtype).contiguous(memory_format=fmt)
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
        try:
            for _ in range(2):
                fn()
            synchronize(self.device)
        except RuntimeError as err:
            reraise_unsupported(err, what)


# -- one case per benchmark process ------------------------------------------------------------
_last_case: tuple[tuple, object] | None = None


def cached(key: tuple, build):
    """``build()`` once per key: asv re-runs setup before every timed sample (asv#966), and a
    case (tensors, layers, warm-up) is the same each time. Only the last case is kept."""
    global _last_case
    if _last_case is not None and _last_case[0] == key:
        return _last_case[1]
    _last_case = None  # free the previous case before building the next
    value = build()
    _last_case = (key, value)
    return value


class Matrix:
    """Base of the benchmark classes: asv timing settings shared by every family.

    The quick run (``--quick``) ignores them; a full run takes up to ``repeat[1]`` samples
    of one call each (asv re-runs setup between calls), within ``repeat[2]`` seconds.
    Warm-up happens in setup (``LayerCase.warm_up``), so asv's own is off.
    """

    warmup_time = 0.0
    repeat = (3, 10, 2.0)
    rounds = 2
    timeout = 300.0


# -- memory measures -----------------------------------------------------------------------------
def saved_tensor_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs.

    This is the activation memory a layer adds to a training step (what stays alive from
    the forward until the backward), counted exactly, independent of allocator and
    process baseline. A saved view counts its whole storage, since that stays alive.
    """
    storages: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[(t.device.type, storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


class TensorCase:
    """A source and a destination tensor of one benchmark input's size, for the copy reference."""

    def __init__(self, batch_size: int, shape: str, device: str, dtype: str, memory_format: str,
                 prune: bool = True):
        configure_threads()
        dims = parse_shape(shape)
        self.device = torch_device(device)
        self.dtype = torch_dtype(dtype, self.device)
        fmt = torch_memory_format(memory_format, 1 + len(dims))
        if prune:
            check_pruned(batch_size, dims, self.device, dtype, memory_format)
        gen = torch.Generator().manual_seed(SEED)
        x = torch.randn((batch_size, *dims), generator=gen)
        self.src = x.to(device=self.device, dtype=self.dtype).contiguous(memory_format=fmt)
        self.dst = torch.empty_like(self.src)
        self.nbytes = self.src.numel() * self.src.element_size()

    def copy(self) -> torch.Tensor:
        return self.dst.copy_(self.src)

    def warm_up(self) -> None:
        for _ in range(2):
            self.copy()
        synchronize(self.device)


# -- whole networks ------------------------------------------------------------------------------
class NetworkCase:
    """One SGD training step of a whole network with every normalization layer of kind ``norm``.

    ``build(name, options)`` returns the model; ``norm`` is decoded by :func:`norm_options`
    (BKN's priors are wired by the model or by ``bkn.convert``). The step is forward,
    cross-entropy, backward and an SGD update with momentum, on a fixed seeded batch of
    ``batch_size`` samples that is also the normalization batch (one group).
    """

    def __init__(self, build, norm: str, batch_size: int, shape: str, device: str, dtype: str,
                 memory_format: str, num_classes: int, prune: bool = True):
        configure_threads()
        dims = parse_shape(shape)
        self.device = torch_device(device)
        self.dtype = torch_dtype(dtype, self.device)
        fmt = torch_memory_format(memory_format, 1 + len(dims))
        if prune:
            check_network_pruned(batch_size, dims, self.device, dtype, memory_format)
        name, options = norm_options(norm)
        torch.manual_seed(SEED)
        model = build(name, options)
        self.model = model.to(device=self.device, dtype=self.dtype, memory_format=fmt).train()
        gen = torch.Generator().manual_seed(SEED)
        x = torch.randn((batch_size, *dims), generator=gen)
        self.x = x.to(device=self.device, dtype=self.dtype).contiguous(memory_format=fmt)
        self.y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)

    def step(self) -> torch.Tensor:
        loss = nn.functional.cross_entropy(self.model(self.x).float(), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def warm_up(self, what: str) -> None:
        try:
            for _ in range(2):
                self.step()
            synchronize(self.device)
        except RuntimeError as err:
            reraise_unsupported(err, what)
        except ValueError as err:  # BN/BRN with one value per channel somewhere in the network
            if "value per channel" in str(err) or "more than 1 value" in str(err):
                skip(f"{what}: {err}")
            raise
