"""The method registry (bkn.methods): every name builds, converts a model, and keeps its label and colour."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bkn
from bkn import methods
from bkn.layers import (
    BatchKalmanNorm2d,
    BatchRenorm2d,
    CrossIterationBatchNorm2d,
    GhostBatchNorm2d,
    MovingAverageBatchNorm2d,
    RenormSchedule,
    SyncBatchNorm,
)
from bkn.rivals.layers import EvoNormB0, EvoNormS0, FilterResponseNorm

EXPECTED_TYPES = {
    "bn": GhostBatchNorm2d,
    "bkn": BatchKalmanNorm2d,
    "brn": BatchRenorm2d,
    "syncbn": SyncBatchNorm,
    "gn": nn.GroupNorm,
    "ln": nn.GroupNorm,
    "in": nn.InstanceNorm2d,
    "gn-ws": nn.GroupNorm,  # and its convolutions weight-standardized by convert (tests/test_rivals.py)
    "frn": FilterResponseNorm,
    "evonorm-b0": EvoNormB0,
    "evonorm-s0": EvoNormS0,
    "mabn": MovingAverageBatchNorm2d,
    "cbn": CrossIterationBatchNorm2d,
}


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def test_names_are_unique_and_cover_the_variants():
    names = methods.names()
    assert len(names) == len(set(names))
    assert {"bn", "bkn-official", "bkn-analytic", "brn", "brn-scheduled", "gn", "ln", "in"} <= set(names)


@pytest.mark.parametrize("name", methods.names())
def test_every_name_builds_its_norm_with_its_options(name):
    method = methods.get(name)
    layer = method.build(8, group_size=2)
    assert type(layer) is EXPECTED_TYPES[method.norm]
    for option, value in method.options.items():  # every option shows in the layer's repr
        assert f"{option}={value}" in repr(layer), (name, option)
    if method.norm == "bkn" and method.options.get("gain") == "fixed":
        assert float(layer.gain.p) == pytest.approx(method.options["p"])
    if method.uses_groups:
        assert layer.group_size == 2
    x = torch.randn(4, 8, 5, 5)
    assert layer(x).shape == x.shape


@pytest.mark.parametrize("name", methods.names())
def test_every_name_converts_a_small_model(name):
    method = methods.get(name)
    torch.manual_seed(0)
    model = method.convert(small_net(), group_size=2)
    norms = [m for m in model.modules() if isinstance(m, tuple(EXPECTED_TYPES.values()) + (nn.BatchNorm2d,))]
    assert len(norms) == 2 and all(type(m) is EXPECTED_TYPES[method.norm] for m in norms), name
    out = model.train()(torch.randn(4, 3, 6, 6))
    out.sum().backward()
    assert out.shape == (4, 4) and torch.isfinite(out).all()


def test_bn_without_group_is_torch_batchnorm_itself():
    assert type(methods.get("bn").build(8)) is nn.BatchNorm2d
    assert type(methods.get("bn").build(8, spatial_dims=0)) is nn.BatchNorm1d


@pytest.mark.parametrize("name", methods.names())
def test_label_and_colour_round_trip(name):
    method = methods.get(name)
    assert methods.label(name) == method.label
    assert methods.colour(name) == method.colour
    assert methods.label(name + methods.EMA_SUFFIX) == method.label + " (running estimates)"
    assert methods.colour(name + methods.EMA_SUFFIX) == method.colour


def test_labels_and_colours_tell_every_method_apart():
    table = [methods.get(n) for n in methods.names()]
    assert len({m.label for m in table}) == len(table)
    assert len({m.colour for m in table}) == len(table)
    assert methods.label("brn") != methods.label("brn-scheduled")


def test_order_follows_the_registry_then_references_then_the_rest():
    shuffled = ["zzz", "floor", "gn", "bn-ema", "brn", "bn", "aaa", "gn"]
    assert methods.order(shuffled) == ["bn", "bn-ema", "brn", "gn", "floor", "aaa", "zzz"]
    assert methods.label("unknown-thing") == "unknown-thing" and methods.colour("unknown-thing") is None


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown method 'bkn-magic'; known methods: bn, bkn-official"):
        methods.get("bkn-magic")
    with pytest.raises(ValueError, match="unknown method"):
        methods.resolve(["bn", "nope"])
    with pytest.raises(ValueError, match="no methods given"):
        methods.resolve([])
    assert [m.name for m in methods.resolve(["gn", "bn", "gn"])] == ["bn", "gn"]


def test_bad_group_size_is_named():
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        methods.get("bn").build(8, group_size=0)


def test_per_sample_methods_ignore_the_group():
    for name in ("gn", "ln", "in"):
        method = methods.get(name)
        assert not method.uses_groups and "group_size" not in method.layer_options(group_size=2)


def test_brn_variants_differ_only_in_their_limits():
    fixed = methods.get("brn").build(8, group_size=2)
    scheduled = methods.get("brn-scheduled").build(8, group_size=2)
    assert fixed.current_limits() == (3.0, 5.0)
    assert scheduled.current_limits() == (1.0, 0.0)  # BN for the schedule's first steps
    assert methods.get("brn-scheduled").layer_options(total_steps=800)["schedule"] == RenormSchedule().scaled(800)
    assert methods.get("brn-scheduled").layer_options()["schedule"] == RenormSchedule()


def test_the_top_level_package_still_exposes_its_names():
    assert callable(bkn.convert) and callable(bkn.prior_summary)
    assert bkn.BatchKalmanNorm2d is BatchKalmanNorm2d and bkn.methods is methods
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        bkn.nothing  # noqa: B018
