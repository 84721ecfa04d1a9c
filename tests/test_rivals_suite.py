"""The rivals from timm (gn-ws, frn, evonorm-b0, evonorm-s0) in every part of the suite: the registry, the asv
benchmarks (a layer and a network step), the training probe and the drift probe (docs/design.md §15)."""

from __future__ import annotations

import pytest
import torch
from drift_fixtures import synthetic_rows
from timm.layers import StdConv2d

import bkn
from bkn import methods
from bkn.probes.data import digits_dataset
from bkn.probes.training import TrainConfig, make_model, train_run
from bkn.rivals.layers import EvoNormB0, StdConv1d
from suites.harness.layer import LayerCase
from suites.harness.network import NetworkCase, cifar_resnet20

RIVALS = ("gn-ws", "frn", "evonorm-b0", "evonorm-s0")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_entries_and_subsets():
    for name in RIVALS:
        m = methods.get(name)
        assert m.converts and m.label and m.about and methods.colour(name) == m.colour
        assert {"matrix", "training"} <= m.tags and not {"speed", "core", "quick"} & m.tags
    assert [n for n in RIVALS if methods.get(n).uses_groups] == ["evonorm-b0"]  # the only one with batch statistics
    assert [n for n in RIVALS if "drift" in methods.get(n).tags] == ["evonorm-b0"]
    assert len({methods.colour(n) for n in methods.names()}) == len(methods.names())


@pytest.mark.parametrize("name", RIVALS)
def test_layer_benchmark_runs_and_features_are_skipped(name):
    case = LayerCase(name, 2, "64x7x7", "cpu", "float32", "contiguous")
    grads = case.forward_backward()
    assert grads[0].shape == case.x.shape and torch.isfinite(grads[0]).all()
    with pytest.raises(NotImplementedError, match="timm's 2-d layers"):
        LayerCase(name, 2, "512", "cpu", "float32", "contiguous")


@pytest.mark.parametrize("name", RIVALS)
def test_network_step_benchmark_converts_the_network(name):
    case = NetworkCase(cifar_resnet20, name, 2, "3x16x16", "cpu", "float32", "contiguous", 10, batch_size=4)
    report = bkn.conversion_report(case.model)
    assert report.counts()[("norm", "BatchNorm2d", "GroupNorm" if name == "gn-ws" else type_name(name))] == 19
    if name == "gn-ws":
        assert sum(type(m) is StdConv2d for m in case.model.modules()) == 19  # every conv of CIFAR ResNet-20
    if name == "evonorm-b0":
        assert all(m.group_size == 2 for m in case.model.modules() if isinstance(m, EvoNormB0))
    case.step()


def type_name(name):
    return {"frn": "FilterResponseNorm", "evonorm-b0": "EvoNormB0", "evonorm-s0": "EvoNormS0"}[name]


@pytest.fixture(scope="module")
def digits():
    return digits_dataset("train", 8, 1, 0).head(128), digits_dataset("test", 8, 1, 0).head(64)


@pytest.mark.parametrize("name", RIVALS)
def test_training_probe_unit(digits, name):
    tiny = {"data": "digits", "network": "cifar-resnet", "image_size": 8, "width": 8, "depth": 8, "batch_size": 32}
    config = TrainConfig(method=name, group_size=4, epochs=1, precise="last", **tiny)
    rows = train_run(config, *digits)
    by_metric = {(r["evaluation"], r["metric"]): r["value"] for r in rows}
    assert 0.0 <= by_metric[("running", "test_acc")] <= 1.0 and by_metric[("training", "train_loss")] > 0
    assert {r["group_size"] for r in rows} == {4 if name == "evonorm-b0" else 32}
    one_d = make_model(TrainConfig(method=name, group_size=2, network="convnet"), 1, 10, 100)
    if name == "gn-ws":
        assert sum(type(m) is StdConv1d for m in one_d.modules()) == 3
    else:  # the convnet's one ReLU module is called after each of its three norms: all absorbed
        assert bkn.conversion_report(one_d).counts()[("activation", "ReLU", "Identity")] == 3


def test_drift_probe_unit():
    frame = synthetic_rows(["evonorm-b0", "evonorm-b0-ema", "frn"], [2], steps=2, burn_in=1)
    metrics = {m: set(frame[frame["method"] == m]["metric"]) for m in ("evonorm-b0", "evonorm-b0-ema", "frn")}
    assert {"output_discrepancy", "input_var_drift", "logit_discrepancy"} <= metrics["evonorm-b0"]
    assert "mean_error" not in metrics["evonorm-b0"]  # it divides by a batch std without centring: no mean estimate
    assert {"output_discrepancy", "logit_discrepancy"} <= metrics["evonorm-b0-ema"]
    assert "output_discrepancy" in metrics["frn"]
    assert frame["value"].notna().all()
