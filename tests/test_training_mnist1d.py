"""MNIST-1D, the 1-D networks of the training probe, and the probe's parallel jobs and evaluation modes."""

from __future__ import annotations

import concurrent.futures
import copy
import random
import socket

import numpy as np
import pandas as pd
import pytest
import torch

from bkn import methods as registry
from bkn.layers import BatchKalmanNorm1d
from bkn.models import ConvNet1d, PreActResNet1d, resnet1d
from bkn.probes import engine as training
from bkn.probes import stats
from bkn.probes.data import load_mnist1d, mnist1d_dataset
from bkn.probes.results import TRAINING
from bkn.probes.training import TrainConfig, networks, train_model
from bkn.probes.training.__main__ import main

pytest.importorskip("mnist1d")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def small():
    """The probe's MNIST-1D split at 1,000 samples: (train 800, test 200)."""
    return networks.datasets("mnist1d", 1000)


# -- the data ----------------------------------------------------------------------------------


def test_mnist1d_is_generated_locally_and_deterministic_for_a_seed(no_network):
    np.random.seed(123)
    random.seed(123)
    before = np.random.get_state()[1].copy(), random.getstate()
    x, y = load_mnist1d("all", 200, seed=7)
    again_x, again_y = load_mnist1d("all", 200, seed=7)
    assert torch.equal(x, again_x) and torch.equal(y, again_y)  # bit for bit, with every socket refused
    other_x, _ = load_mnist1d("all", 200, seed=8)
    assert not torch.equal(x, other_x)  # the seed matters
    # the caller's global generators are left as they were
    assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]
    assert x.shape == (200, 1, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.bincount(y, minlength=10).tolist() == [20] * 10  # the same number per digit
    # the package standardises the whole set
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std(unbiased=False)) - 1) < 1e-4


def test_mnist1d_splits_are_the_package_split(no_network):
    from mnist1d.data import get_dataset_args, make_dataset

    train, test = load_mnist1d("train", 100, 3), load_mnist1d("test", 100, 3)
    args = get_dataset_args()
    args.num_samples, args.seed = 100, 3
    reference = make_dataset(args)
    assert np.allclose(train[0].squeeze(1).numpy(), reference["x"], atol=1e-6)
    assert np.array_equal(test[1].numpy(), reference["y_test"])
    assert len(train[1]) == 80 and len(test[1]) == 20
    probe_train, probe_test = networks.datasets("mnist1d", 100)  # one generation, split 80/20 the same way
    assert len(probe_train) == 80 and torch.equal(probe_test.images, load_mnist1d("test", 100, 0)[0])
    assert mnist1d_dataset("test", 100, 0).name == "mnist1d"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"split": "val"}, "unknown split 'val'"),
        ({"num_samples": 105}, "multiple of 10"),
        ({"seed": -1}, "seed must be a non-negative int"),
    ],
)
def test_mnist1d_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_mnist1d(**kwargs)


# -- the networks --------------------------------------------------------------------------------


def _model(network: str, method: str, group_size: int = 4):
    torch.manual_seed(0)
    config = TrainConfig(method=method, group_size=group_size, network=network)
    from bkn.probes.training import make_model

    return make_model(config, 1, 10, 100)


@pytest.mark.parametrize("network", ["convnet", "resnet1d"])
@pytest.mark.parametrize("method", ["bkn-official", "bkn-analytic", "bkn-analytic-adaptive"])
def test_every_bkn_layer_after_the_first_uses_a_prior_in_training(network, method):
    model = _model(network, method, group_size=2)
    layers = model.norm_layers()
    assert all(isinstance(n, BatchKalmanNorm1d) for n in layers)
    assert len(layers) == (3 if network == "convnet" else 7)
    x = torch.randn(8, 1, 40)
    model.train()
    out = model(x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    assert [n.prior_used for n in layers] == [False] + [True] * (len(layers) - 1)
    for n in layers:
        assert n.posterior[0].shape == (4, n.num_features)  # 8 samples in groups of 2
    model.eval()
    model(x)
    assert not any(n.prior_used for n in layers)  # inference: running estimates, no prior


@pytest.mark.parametrize("network", ["convnet", "resnet1d"])
def test_bkn_with_gain_zero_is_ghost_bn_through_the_wiring(network):
    """p = 0 ignores every prior: the wired BKN network computes what ghost BN computes (outputs and gradients)."""
    torch.manual_seed(1)
    build = ConvNet1d if network == "convnet" else lambda norm, **kw: resnet1d(8, norm, **kw)
    torch.manual_seed(1)
    bkn_net = build("bkn", p=0.0, transition="analytic", group_size=4)
    torch.manual_seed(1)
    bn_net = build("bn", group_size=4)
    x = torch.randn(16, 1, 40)
    a, b = bkn_net(x), bn_net(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    grads = zip(bkn_net.parameters(), bn_net.parameters())
    for pa, pb in grads:
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-4, rtol=1e-4)


def test_convnet_shapes_and_errors():
    model = ConvNet1d("gn")
    assert [type(n).__name__ for n in model.norm_layers()] == ["GroupNorm"] * 3
    assert {n.num_groups for n in model.norm_layers()} == {8}  # 32 channels: groups of 4, not InstanceNorm
    assert model.fc.in_features == 32 * 5  # 40 -> 20 -> 10 -> 5
    assert model(torch.randn(3, 1, 40)).shape == (3, 10)
    with pytest.raises(ValueError, match="kernel_size must be a positive odd int"):
        ConvNet1d("bn", kernel_size=4)
    with pytest.raises(ValueError, match="depth must be 6n\\+2"):
        resnet1d(10)
    assert isinstance(resnet1d(14, "ln"), PreActResNet1d) and len(resnet1d(14).norm_layers()) == 13


# -- evaluation modes ------------------------------------------------------------------------------


def test_population_statistics_of_the_first_layer_are_the_training_set_moments(small, one_thread):
    """The PreciseBN evaluation writes the exact moments of each layer's input over the training set into the
    running buffers (BKN here); for the first layer they are the moments of conv(x), computed directly in
    float64 with numpy."""
    train, _ = small
    config = TrainConfig(method="bkn-analytic", group_size=2, epochs=1, precise="none", network="convnet")
    model, _ = train_model(config, train.head(256), train.head(64))
    population = stats.population_statistics(model, list(train.batches(256)))
    conv = model.convs[0]
    with torch.no_grad():
        z = torch.nn.functional.conv1d(train.images.double(), conv.weight.double(), None, conv.stride, conv.padding)
    z = z.numpy()
    mean = z.mean(axis=(0, 2))
    var = z.var(axis=(0, 2))
    name = next(n for n, m in model.named_modules() if m is model.norms[0])
    np.testing.assert_allclose(population[name][0].numpy(), mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(population[name][1].numpy(), var, rtol=1e-6, atol=1e-9)
    precise = stats.use_population_statistics(copy.deepcopy(model), population)
    np.testing.assert_allclose(precise.norms[0].running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-6)


def test_population_evaluation_catches_planted_bad_running_estimates_and_is_quiet_without(small, one_thread):
    """A planted error in the running estimates (every mean shifted by 3 standard deviations) wrecks the
    running accuracy and leaves the population accuracy as it was; without the plant both agree closely."""
    train, test = small
    config = TrainConfig(method="bn", group_size=32, epochs=3, precise="none", network="convnet")
    model, _ = train_model(config, train, test)
    running = training.accuracy(model, test)
    population = training.precise_accuracy(model, train, test)
    assert running > 0.5 and abs(running - population) <= 0.05  # BN over the whole batch: estimates are fine
    with torch.no_grad():
        for norm in model.norm_layers():
            norm.running_mean += 3 * norm.running_var.sqrt()
    assert training.accuracy(model, test) < running - 0.2
    assert training.precise_accuracy(model, train, test) == population


# -- the probe: jobs, rows, tables -----------------------------------------------------------------

TINY = ["--samples", "400", "--epochs", "2", "--seeds", "0", "--threads", "1"]


def _without_times(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame.metric != "step_time_s"].drop(columns=["commit"]).reset_index(drop=True)


@pytest.mark.slow
def test_jobs_give_the_rows_of_one_process_and_the_tables_per_network(tmp_path, capsys, one_thread):
    """Two jobs (spawned processes) and one process: the same rows bit for bit; a table per network and
    evaluation; progress in a log (not a terminal) one line per run, no carriage returns."""
    argv = [*TINY, "--methods", "bn,bkn-official,gn", "--group-sizes", "2,32"]
    assert main([*argv, "--jobs", "2", "--out", str(tmp_path / "two")]) == 0
    captured = capsys.readouterr()
    printed, err = captured.out, captured.err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("training probe [")]
    assert len(lines) == 10 and all(" runs" in line and " elapsed" in line for line in lines), err
    assert lines[-1].startswith("training probe [10/10 runs")
    assert any("convnet bkn-official g=2 seed=0: test_acc" in line for line in lines)
    assert main([*argv, "--jobs", "1", "--no-progress", "--out", str(tmp_path / "one")]) == 0
    two = TRAINING.read(tmp_path / "two" / TRAINING.file)
    one = TRAINING.read(tmp_path / "one" / TRAINING.file)
    pd.testing.assert_frame_equal(_without_times(two), _without_times(one))  # bit for bit, in the runs' order
    assert set(two.data) == {"mnist1d"} and list(dict.fromkeys(two.network)) == ["convnet", "resnet1d"]
    runs = two[["network", "method", "group_size"]].drop_duplicates()
    assert len(runs) == 2 * (2 + 2 + 1)
    last = two[(two.epoch == 2) & (two.metric == "test_acc")]
    assert last.groupby("evaluation").size().to_dict() == {"population": 10, "running": 10}
    assert set(two[two.epoch == 1].evaluation) == {"training", "running"}  # population: after the last epoch
    for network in ("convnet", "resnet1d"):
        for mode in ("the methods' running estimates", "population statistics recomputed after training"):
            assert f"mnist1d, {network}: final test accuracy (%) with {mode}" in printed
    value = last[(last.network == "resnet1d") & (last.method == "bn") & (last.group_size == 2)]
    assert f"{100 * value[value.evaluation == 'population'].value.iloc[0]:.1f}" in printed
    assert "with 2 jobs x 1 thread(s)" in printed


class _ExecutorInThisProcess(concurrent.futures.Executor):
    """A stand-in for the spawned local pool (``bkn.probes.sweeps.open_executor("local", ...)``): the job
    initializer and the runs in this process, the runs done in reverse order of submission once the sweep
    waits (the order of the rows must come from the runs, not from the executor)."""

    def __init__(self, initializer, initargs):
        initializer(*initargs)
        self.pending: list = []

    def submit(self, fn, *args, **kwargs):
        future = concurrent.futures.Future()
        self.pending.append((future, fn, args, kwargs))
        return future

    def run_pending(self):
        for future, fn, args, kwargs in reversed(self.pending):
            future.set_result(fn(*args, **kwargs))
        self.pending.clear()


def test_jobs_in_this_process_give_the_rows_of_one_process(tmp_path, capsys, one_thread, monkeypatch):
    """The fast stand-in for the test above (slow: it spawns the job processes): ``--jobs 2`` with the
    pool run in this process, the jobs' results coming back out of order, gives the rows of ``--jobs 1``."""
    import contextlib

    from bkn.probes import sweeps

    @contextlib.contextmanager
    def in_this_process(spec, jobs, initializer=None, initargs=()):
        assert spec == "local" and jobs == 2
        executor = _ExecutorInThisProcess(initializer, initargs)
        waiting = concurrent.futures.as_completed

        def run_then_wait(futures, *args, **kwargs):  # the sweep waits: the runs happen now, last one first
            executor.run_pending()
            return waiting(futures, *args, **kwargs)

        monkeypatch.setattr(concurrent.futures, "as_completed", run_then_wait)
        yield executor

    monkeypatch.setattr(sweeps, "open_executor", in_this_process)
    argv = ["--samples", "200", "--epochs", "1", "--seeds", "0", "--threads", "1", "--methods", "bn,gn"]
    argv += ["--group-sizes", "32", "--no-progress"]
    assert main([*argv, "--jobs", "2", "--out", str(tmp_path / "two")]) == 0
    printed = capsys.readouterr().out
    assert main([*argv, "--jobs", "1", "--out", str(tmp_path / "one")]) == 0
    two = TRAINING.read(tmp_path / "two" / TRAINING.file)
    one = TRAINING.read(tmp_path / "one" / TRAINING.file)
    pd.testing.assert_frame_equal(_without_times(two), _without_times(one))  # bit for bit, in the runs' order
    assert list(dict.fromkeys(zip(two.network, two.method))) == [  # the runs' order: the networks alternate
        ("convnet", "bn"),
        ("resnet1d", "bn"),
        ("convnet", "gn"),
        ("resnet1d", "gn"),
    ]
    assert "with 2 jobs x 1 thread(s)" in printed
    for network in ("convnet", "resnet1d"):
        assert f"mnist1d, {network}: final test accuracy (%) with the methods' running estimates" in printed


def test_registry_gn_about_says_the_rule():
    assert "4 channels per group" in registry.get("gn").about


def test_resnet1d_is_the_cifar_resnet_on_one_axis_and_reports_its_priors():
    """One network definition for both (spatial_dims); the 1-D one's priors show in bkn.prior_report."""
    import bkn
    from bkn.models import CifarResNet, resnet1d

    model = resnet1d(8, "bkn", transition="analytic", group_size=2)
    assert isinstance(model, CifarResNet) and model.spatial_dims == 1
    assert bkn.prior_report(model)[0]["last"] != "prior used"  # nothing ran yet
    model(torch.randn(8, 1, 40))
    rows = bkn.prior_report(model)
    assert [r["layer"] for r in rows][0] == "norm0" and len(rows) == 7
    assert [r["last"] == "prior used" for r in rows] == [False] + [True] * 6
