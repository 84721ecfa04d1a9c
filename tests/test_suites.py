"""The asv suites run: every benchmark body once, on its cheapest runnable parameter set.

A broken benchmark must fail here, in CI, not in the nightly ``asv run``. Nothing is
timed. Also checked: what asv discovers (exactly the benchmarks below, none from the
helper package), the skip rules (what cannot run raises ``NotImplementedError`` in
setup), the parameter names of the results contract (:mod:`bkn.probes.results`), the memory
measure, and the drift probe's closed-form population moments against a Monte-Carlo
estimate.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import math
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from bkn import layers as bkn_layers
from bkn import methods
from bkn.probes.results import COPY_REFERENCE, GROUP_PARAM, LAYER_PARAMS, METHOD_PARAM, TENSOR_PARAMS
from suites.harness import ddp, decode, matrix, memory, process, timing
from suites.harness.block import BlockCase
from suites.harness.layer import LayerCase
from suites.harness.network import NetworkCase
from suites.harness.tensor import TensorCase

SUITES = pathlib.Path(__file__).resolve().parent.parent / "suites"
MODULES = sorted(p.stem for p in SUITES.glob("*.py") if p.stem.startswith(("bench_", "track_")))
HELPERS = sorted(f"suites.harness.{p.stem}" for p in (SUITES / "harness").glob("*.py") if p.stem != "__init__")
PREFIXES = ("time_", "peakmem_", "track_", "mem_", "timeraw_")
DDP_PARAMS = [METHOD_PARAM, GROUP_PARAM, ddp.WORLD_PARAM]
CONTRACT = {
    METHOD_PARAM: set(matrix.METHODS) | set(ddp.METHODS),
    GROUP_PARAM: set(matrix.GROUP_SIZES),
    "shape": None,
    "device": {"cpu", "cuda"},
    "dtype": {"float32", "bfloat16"},
    "memory_format": {"contiguous", "channels_last"},
    ddp.WORLD_PARAM: set(ddp.WORLD_SIZES),
}
# Every benchmark asv finds, by its full name: class and method names are what `nox -s main`
# filters on and what the asv history is keyed by, so a rename must show up here.
BENCHMARKS = {
    COPY_REFERENCE,
    "bench_layers.TimeForwardTrain.time_forward_train",
    "bench_layers.TimeForwardBackward.time_forward_backward",
    "bench_layers.TimeForwardInference.time_forward_inference",
    "bench_layers.TrackThreads.track_threads",
    "bench_memory.PeakMemForwardBackward.peakmem_forward_backward",
    "bench_memory.TrackSavedForBackward.track_saved_bytes",
    "bench_memory.TrackCudaPeakForwardBackward.track_cuda_peak_bytes",
    "bench_network.TimeResNet18TrainStep.time_train_step",
    "bench_network.TimeCifarResNetTrainStep.time_train_step",
    "bench_network.TimeResNet18GroupedStep.time_train_step",
    "bench_network.TimeCifarResNetGroupedStep.time_train_step",
    "bench_blocks.TimeBlockForwardBackward.time_block_forward_backward",
    "bench_distributed.TimeDDPTrainStep.time_train_step",
    "track_drift.TrackMeanError.track_mean_error",
    "track_drift.TrackVarLogRatio.track_var_logratio",
}
# Module-level names asv reads as every benchmark's settings when its class lacks them
# (asv_runner.benchmarks: _get_first_attr / _get_all_attrs over [method, instance, module]).
ASV_SETTINGS = {
    "setup",
    "teardown",
    "setup_cache",
    "timeout",
    "version",
    "params",
    "param_names",
    "skip_params",
    "type",
    "unit",
    "processes",
    "rounds",
    "repeat",
    "min_run_count",
    "number",
    "sample_time",
    "warmup_time",
    "timer",
    "env",
    "pretty_name",
    "benchmark_name",
}


def benchmark_classes():
    for name in MODULES:
        module = importlib.import_module(f"suites.{name}")
        for cls_name, cls in vars(module).items():
            if inspect.isclass(cls) and cls.__module__ == module.__name__ and not cls_name.startswith("_"):
                methods = [m for m in dir(cls) if m.startswith(PREFIXES)]
                if methods:
                    yield pytest.param(cls, methods, id=f"{name}.{cls_name}")


def cost(names: list[str], values: tuple) -> tuple:
    """Sort key: cheapest parameter sets first (cpu, small group, small input, float32, contiguous, one worker)."""
    p = dict(zip(names, values))
    shape = p.get("shape")
    return (
        p.get("device", "cpu") != "cpu",
        p.get(GROUP_PARAM, 0),
        math.prod(decode.parse_shape(shape)) if shape else 0,
        p.get("dtype", "float32") != "float32",
        p.get("memory_format", "contiguous") != "contiguous",
        p.get(ddp.WORLD_PARAM, 1),
    )


def runnable(cls, names: list[str] | None = None, **fixed):
    """The cheapest parameter set whose setup does not skip, and the instance set up with it."""
    params = getattr(cls, "params", None)
    if not params:
        obj = cls()
        if hasattr(obj, "setup"):
            obj.setup()
        return (), obj
    names = cls.param_names
    combos = [c for c in itertools.product(*params) if all(dict(zip(names, c)).get(k) == v for k, v in fixed.items())]
    reasons = set()
    for combo in sorted(combos, key=lambda c: cost(names, c)):
        obj = cls()
        try:
            obj.setup(*combo)
        except NotImplementedError as why:
            reasons.add(str(why))
            continue
        return combo, obj
    if reasons and all("CUDA" in r for r in reasons):
        pytest.skip(f"{cls.__name__} needs CUDA")
    pytest.fail(f"{cls.__name__}: no runnable parameter set (fixed: {fixed})")


def test_every_module_is_collected():
    expected = {"bench_layers", "bench_blocks", "bench_memory", "bench_bandwidth", "bench_network", "bench_distributed"}
    expected.add("track_drift")
    assert expected <= set(MODULES)


def test_asv_discovers_exactly_the_benchmarks_of_the_bench_and_track_modules():
    discovery = pytest.importorskip("asv_runner.discovery")
    found = {b.name: b for b in discovery.disc_benchmarks(str(SUITES))}
    assert set(found) == BENCHMARKS
    # The copy reference the report looks for (bkn.probes.results.COPY_REFERENCE) is the copy benchmark.
    assert found[COPY_REFERENCE].param_names == list(TENSOR_PARAMS)
    for name, bench in found.items():
        assert name.split(".")[0] in MODULES, name  # nothing from suites.harness
        allowed = ([], list(LAYER_PARAMS), list(TENSOR_PARAMS), [METHOD_PARAM, GROUP_PARAM], DDP_PARAMS)
        assert bench.param_names in allowed, name


@pytest.mark.parametrize("module", HELPERS)
def test_helpers_hold_no_benchmark(module):
    # asv imports and scans every module under benchmark_dir, the harness included.
    helper = importlib.import_module(module)
    for name, value in vars(helper).items():
        assert not name.startswith(PREFIXES), (module, name)
        if inspect.isclass(value) and value.__module__ == module:
            assert not [m for m in dir(value) if m.startswith(PREFIXES)], (module, name)


@pytest.mark.parametrize("module", MODULES)
def test_benchmark_modules_bind_no_asv_setting(module):
    names = {name.lower() for name in vars(importlib.import_module(f"suites.{module}"))}
    assert not names & ASV_SETTINGS, (module, names & ASV_SETTINGS)


def test_cases_take_the_contract_parameters_in_order():
    # asv passes parameters by position in param_names order (bkn.probes.results' constants).
    def leading(cls, skip=0):
        return list(inspect.signature(cls).parameters)[skip:]

    assert leading(LayerCase)[: len(LAYER_PARAMS)] == list(LAYER_PARAMS)
    assert leading(BlockCase)[: len(LAYER_PARAMS)] == list(LAYER_PARAMS)
    assert leading(NetworkCase, 1)[: len(LAYER_PARAMS)] == list(LAYER_PARAMS)
    assert leading(TensorCase)[: len(TENSOR_PARAMS)] == list(TENSOR_PARAMS)
    assert matrix.METHODS == ("bn", "bkn-official", "bkn-analytic", "brn", "gn", "ln", "in") + (
        "gn-ws",
        "frn",
        "evonorm-b0",
        "evonorm-s0",
        "mabn",
        "cbn",
    )


@pytest.fixture(autouse=True)
def _close_cases():
    """A DDP case's peer process and process group, and the cached case, end with the test."""
    yield
    ddp.close_open()
    timing._last_case = None


@pytest.mark.parametrize("cls, methods", list(benchmark_classes()))
def test_benchmark_body_runs(cls, methods):
    combo, obj = runnable(cls)
    for method in methods:
        value = getattr(obj, method)(*combo)
        if method.startswith("track_"):
            assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, (method, value)


@pytest.mark.skipif(not ddp.distributed.available(), reason="torch.distributed with gloo is unavailable")
@pytest.mark.slow
def test_ddp_body_runs_with_a_peer_process():
    # The cheapest set above is the one-process baseline; this is the 2-worker path (bounded:
    # the peer's start by READY_TIMEOUT_S, every collective by the process group's TIMEOUT_S).
    from suites.bench_distributed import TimeDDPTrainStep

    combo, obj = runnable(TimeDDPTrainStep, **{ddp.WORLD_PARAM: 2})
    assert combo == ("bn", 2, 2)
    for _ in range(2):  # as asv: setup (cached case, peer checked) before every sample
        obj.setup(*combo)
        obj.time_train_step(*combo)
    assert obj.case.peers[0].is_alive()


@pytest.mark.parametrize("cls, methods", list(benchmark_classes()))
def test_param_names_follow_the_contract(cls, methods):
    for name, values in zip(getattr(cls, "param_names", []), getattr(cls, "params", [])):
        assert name in CONTRACT, f"{cls.__name__}: parameter {name!r} is not a contract name"
        if CONTRACT[name] is not None:
            assert set(values) <= CONTRACT[name], (cls.__name__, name, values)
        if name == "shape":
            assert all(decode.parse_shape(v) for v in values)


# cbn's layer benchmark skips in training (it needs its convolution): tests/test_cross_iteration_suite.py
@pytest.mark.parametrize("method", [m for m in matrix.METHODS if m != "cbn"])
def test_every_method_runs_forward_backward(method):
    from suites.bench_layers import TimeForwardBackward

    combo, obj = runnable(TimeForwardBackward, **{METHOD_PARAM: method})
    grads = obj.case.forward_backward()
    assert grads[0].shape == obj.case.x.shape and torch.isfinite(grads[0].float()).all()
    # The layer is the registry's, built without a group: bn is torch's own BatchNorm.
    expected = type(methods.get(method).build(obj.case.x.shape[1], spatial_dims=obj.case.x.dim() - 2))
    assert type(obj.case.layer) is expected
    if method == "bn":
        assert type(obj.case.layer) is torch.nn.BatchNorm2d


def test_bkn_layer_is_timed_alone_given_a_differentiable_prior():
    # Like for like with BN: the layer benchmark times the norm only; the prior is handed in
    # (leaf tensors), and the backward computes its gradient as a network's would.
    for method in ("bkn-official", "bkn-analytic"):
        case = LayerCase(method, 2, "64x7x7", "cpu", "float32", "contiguous")
        assert [name for name, _ in case.prior.named_parameters()] == ["prior_mean", "prior_var"]
        assert not any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in case.prior.modules())
        grads = dict(zip(map(id, case.inputs), case.forward_backward()))
        for p in case.prior.parameters():
            assert grads[id(p)] is not None and grads[id(p)].abs().sum() > 0, method
        assert case.layer.prior_used


def test_bkn_block_propagates_the_prior_through_its_own_convolution():
    # The block benchmark includes the chain: its backward must reach the previous layer and
    # the block's convolution through the prior. Official: through the surrogate sample
    # z * sqrt(v) + m; analytic: through gamma^2 v / (v + eps) and beta (not m).
    reached = {
        "official": ("posterior_mean", "posterior_var"),
        "analytic": ("posterior_var", "source.weight", "source.bias"),
    }
    for transition, names in reached.items():
        case = BlockCase(f"bkn-{transition}", 2, "64x7x7", "cpu", "float32", "contiguous")
        assert case.prior.link is case.conv
        assert sum(p is case.conv.weight for p in case.inputs) == 1  # shared, differentiated once
        grads = dict(zip(map(id, case.inputs), case.forward_backward()))
        for name in names:
            g = grads[id(case.prior.get_parameter(name))]
            assert g is not None and g.abs().sum() > 0, (transition, name)
        assert case.norm.prior_used
    with pytest.raises(NotImplementedError, match="3-d convolution"):
        BlockCase("bn", 2, "64x8x28x28", "cpu", "float32", "contiguous")


def test_grouped_network_step_normalizes_in_groups():
    from suites import bench_network

    def build(method, group):
        assert group == 4
        return bench_network._resnet18(method, group)

    case = NetworkCase(build, "bkn-analytic", 4, "3x32x32", "cpu", "float32", "contiguous", 1000, batch_size=16)
    assert case.x.shape[0] == 16
    layers = [m for m in case.model.modules() if isinstance(m, bkn_layers._BatchKalmanNorm)]
    assert layers and all(m.group_size == 4 for m in layers)
    case.step()
    assert all(m.posterior[0].shape[0] == 4 for m in layers)  # 16 / 4 groups
    assert sum(m.prior_used for m in layers) == len(layers) - 1  # the first has no prior
    with pytest.raises(ValueError, match="must divide batch_size"):
        NetworkCase(build, "bn", 3, "3x32x32", "cpu", "float32", "contiguous", 10, batch_size=16)


@pytest.mark.parametrize(
    "args, reason",
    [
        (("bn", 1, "512", "cpu", "float32", "contiguous"), "more than one value per channel"),
        (("brn", 1, "512", "cpu", "float32", "contiguous"), "more than one value per channel"),
        (("in", 2, "512", "cpu", "float32", "contiguous"), "spatial positions"),
        (("gn", 2, "512", "cpu", "float32", "channels_last"), "channels_last"),
        (("gn", 64, "64x56x56", "cpu", "float32", "contiguous"), "pruned on cpu"),
        (("gn", 4, "64x7x7", "cpu", "bfloat16", "contiguous"), "pruned on cpu"),
    ],
)
def test_what_cannot_run_is_skipped(args, reason):
    with pytest.raises(NotImplementedError, match=reason):
        LayerCase(*args)


def test_bkn_official_runs_in_bfloat16():
    # Found by the suite's bfloat16 axis: it fails the same way in the CIFAR ResNet and ResNet-18 steps.
    case = LayerCase("bkn-official", 2, "64x7x7", "cpu", "bfloat16", "contiguous")
    assert case.prior.prior_mean.dtype == torch.float32  # as a network's BKN layer hands it on
    assert torch.isfinite(case.forward_backward()[0].float()).all()
    block = BlockCase("bkn-official", 2, "64x7x7", "cpu", "bfloat16", "contiguous")
    assert block.prior.posterior_mean.dtype == torch.float32
    assert torch.isfinite(block.forward_backward()[0].float()).all()


def test_bkn_runs_at_one_value_per_channel():
    # The paper's point: with a prior, a group of 1 of (N, C) features is a valid BKN step.
    case = LayerCase("bkn-analytic", 1, "512", "cpu", "float32", "contiguous")
    assert torch.isfinite(case.forward_backward()[0]).all()
    assert case.layer.prior_used


@pytest.mark.parametrize(
    "group_size, dtype, reason", [(16, "float32", "CPU_MAX_NETWORK_INPUT"), (4, "bfloat16", "only at group sizes")]
)
def test_network_pruning_skips_before_building(group_size, dtype, reason):
    def build(method):
        raise AssertionError("a pruned case must not build its model")

    with pytest.raises(NotImplementedError, match=reason):
        NetworkCase(build, "bn", group_size, "3x224x224", "cpu", dtype, "contiguous", num_classes=10)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_is_skipped_without_a_device():
    with pytest.raises(NotImplementedError, match="CUDA"):
        LayerCase("bn", 2, "64x7x7", "cuda", "float32", "contiguous")


def test_threads_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(process.THREADS_ENV, "2")
    assert process.threads() == 2
    for bad in ("0", "two"):
        monkeypatch.setenv(process.THREADS_ENV, bad)
        with pytest.raises(ValueError, match=process.THREADS_ENV):
            process.threads()


@pytest.mark.parametrize("bad", ["", "64x", "0x7x7", "1x2x3x4x5"])
def test_bad_shape_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="shape must look like"):
        decode.parse_shape(bad)


def test_saved_bytes_of_batchnorm_is_its_input_plus_per_channel_stats():
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    bn = torch.nn.BatchNorm2d(8)
    saved = memory.saved_tensor_bytes(lambda: bn(x))
    assert x.numel() * 4 <= saved <= x.numel() * 4 + 8 * 4 * 8  # x, and a few (C,) vectors


def test_drift_population_moments_match_monte_carlo():
    from suites import track_drift

    rng = np.random.default_rng(0)
    c = 3
    sd, gamma, beta = rng.uniform(0.5, 2, c), rng.uniform(0.5, 1.5, c), rng.uniform(-0.5, 0.5, c)
    weight = rng.normal(size=(c, c, 3, 3)) / 3
    mean, var = track_drift.population_moments(sd, gamma, beta, weight, 1e-5)
    # Independent estimate: sample norm1's population-normalized output, ReLU, convolve.
    n = 200_000
    z = rng.normal(size=(n, c, 3, 3)) * (gamma * sd / np.sqrt(sd**2 + 1e-5))[None, :, None, None]
    out = np.einsum("ncij,ocij->no", np.maximum(z + beta[None, :, None, None], 0), weight)
    np.testing.assert_allclose(mean, out.mean(0), atol=4 * out.std(0).max() / math.sqrt(n))
    np.testing.assert_allclose(var, out.var(0), rtol=0.02)


def test_drift_orders_the_methods_as_expected():
    from suites import track_drift

    assert track_drift.GROUP_METHODS == ("bn", "bkn-official", "bkn-analytic", "brn")
    errors = {method: track_drift._Probe(method, 2).errors["mean"] for method in ("bn", "bkn-analytic")}
    # Analytic BKN's prior is exact on this probe, so p = 0.9 on it beats batch statistics of 2 samples.
    assert errors["bkn-analytic"] < errors["bn"] / 2


@pytest.mark.skipif(shutil.which("git") is None, reason="asv needs git")
@pytest.mark.slow
def test_asv_check_passes():
    pytest.importorskip("asv")
    root = SUITES.parent
    done = subprocess.run(
        [sys.executable, "-m", "asv", "check", "--python=same"], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "No problems found" in done.stdout, done.stdout + done.stderr
