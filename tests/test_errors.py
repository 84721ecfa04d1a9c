"""Clear errors: a ValueError that names the layer, what was expected and what came."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

import bkn
from bkn import norms, transitions


def raises_with(fragments, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` raises ValueError whose message contains every fragment."""
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


LAYERS = [
    (bkn.BatchKalmanNorm2d, {}, 4),
    (bkn.GhostBatchNorm2d, {"group_size": 2}, 4),
    (bkn.BatchRenorm2d, {"rmax": 3.0, "dmax": 5.0}, 4),
    (bkn.BatchKalmanNorm1d, {}, 2),
    (bkn.BatchKalmanNorm3d, {}, 5),
    (bkn.GhostBatchNorm1d, {}, 3),
    (bkn.BatchRenorm3d, {}, 5),
]


def _input(ndim, n=4, c=4):
    return torch.randn((n, c) + (3,) * (ndim - 2))


@pytest.mark.parametrize("cls, kwargs, ndim", LAYERS, ids=lambda v: getattr(v, "__name__", None))
def test_wrong_channel_count(cls, kwargs, ndim):
    layer = cls(4, **kwargs)
    x = _input(ndim, c=6)
    raises_with([cls.__name__, "expected 4 channels", "got 6 channels", str(tuple(x.shape))], layer, x)
    layer.eval()  # also at inference
    raises_with([cls.__name__, "4", "6"], layer, x)


@pytest.mark.parametrize("cls, kwargs, ndim", LAYERS, ids=lambda v: getattr(v, "__name__", None))
def test_wrong_number_of_dimensions(cls, kwargs, ndim):
    layer = cls(4, **kwargs)
    wrong = 4 if ndim != 4 else 3
    x = _input(wrong)
    expected_text = {2: "2-d", 3: "2-d", 4: "4-d", 5: "5-d"}[ndim]
    raises_with([cls.__name__, expected_text, f"got {wrong}-d", str(tuple(x.shape))], layer, x)


@pytest.mark.parametrize(
    "bad, what",
    [
        ((torch.zeros(5), torch.ones(4)), "(5,)"),
        ((torch.zeros(4), torch.ones(3, 4)), "(3, 4)"),
        ((torch.zeros(2, 4), torch.ones(2, 4)), "(2, 4)"),  # one group only: (1, 4) or (4,)
        ((torch.zeros(4, 1), torch.ones(4)), "(4, 1)"),
    ],
)
def test_prior_of_wrong_size(bad, what):
    layer = bkn.BatchKalmanNorm2d(4)
    raises_with(["BatchKalmanNorm2d", "prior", "(4,)", "(1, 4)", what], layer, _input(4), prior=bad)


def test_prior_of_wrong_size_with_groups():
    layer = bkn.BatchKalmanNorm2d(4, group_size=2)
    raises_with(
        ["BatchKalmanNorm2d", "(2, 4)", "2 group", "(3, 4)"],
        layer,
        _input(4),
        prior=(torch.zeros(3, 4), torch.ones(3, 4)),
    )


@pytest.mark.parametrize("bad", [torch.zeros(4), (torch.zeros(4),), (torch.zeros(4), 1.0)])
def test_prior_not_a_pair_of_tensors(bad):
    raises_with(["BatchKalmanNorm2d", "prior", "(mean, var)"], bkn.BatchKalmanNorm2d(4), _input(4), prior=bad)


@pytest.mark.parametrize("cls, kwargs, ndim", LAYERS[:3], ids=lambda v: getattr(v, "__name__", None))
def test_group_size_not_dividing_the_batch(cls, kwargs, ndim):
    layer = cls(4, **{**kwargs, "group_size": 3})
    raises_with([cls.__name__, "group_size=3", "batch size 4"], layer, _input(ndim, n=4))


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda: bkn.GhostBatchNorm2d(4), torch.randn(1, 4, 1, 1)),
        (lambda: bkn.GhostBatchNorm1d(4), torch.randn(1, 4)),
        (lambda: bkn.GhostBatchNorm1d(4, group_size=1), torch.randn(6, 4)),
        (lambda: bkn.BatchKalmanNorm1d(4), torch.randn(1, 4)),
        (lambda: bkn.BatchKalmanNorm2d(4), torch.randn(1, 4, 1, 1)),
        (lambda: bkn.BatchKalmanNorm2d(4, group_size=1), torch.randn(3, 4, 1, 1)),
        (lambda: bkn.BatchRenorm1d(4, rmax=3.0, dmax=5.0), torch.randn(1, 4)),
    ],
)
def test_one_value_per_channel_in_training_mode(make, x):
    layer = make()
    name = type(layer).__name__
    raises_with([name, "more than 1 value per channel", str(tuple(x.shape))], layer, x)
    layer.eval()  # fine at inference: running statistics
    assert torch.isfinite(layer(x)).all()


def test_non_float_input():
    raises_with(
        ["BatchKalmanNorm2d", "floating-point", "torch.int64"],
        bkn.BatchKalmanNorm2d(4),
        torch.ones(2, 4, 2, 2, dtype=torch.long),
    )


def test_error_names_the_module_path_after_convert():
    model = bkn.convert(resnet18(num_classes=10), "bkn")
    layer = model.layer2[1].bn1
    raises_with(
        ["BatchKalmanNorm2d", "layer2.1.bn1", "expected 128 channels", "got 64"], layer, torch.randn(2, 64, 4, 4)
    )


def test_unknown_norm_name_lists_the_known_ones():
    message = raises_with(["'batchnorm'"], norms.create, "batchnorm", 8)
    for name in norms.names():
        assert name in message
    raises_with(["'batchnorm'"] + list(norms.names()), bkn.convert, nn.Sequential(nn.BatchNorm2d(3)), "batchnorm")


@pytest.mark.parametrize(
    "name, cls_name",
    [("bkn", "BatchKalmanNorm2d"), ("brn", "BatchRenorm2d"), ("gn", "GroupNorm"), ("bn", "BatchNorm2d")],
)
def test_unknown_option_to_create(name, cls_name):
    raises_with([f"'{name}'", cls_name, "frobnicate", "accepts"], norms.create, name, 8, frobnicate=1)


def test_unknown_option_to_convert():
    raises_with(["frobnicate"], bkn.convert, resnet18(num_classes=10), "bkn", frobnicate=True)


def test_bad_spatial_dims():
    raises_with(["spatial_dims", "4"], norms.create, "bkn", 8, spatial_dims=4)


@pytest.mark.parametrize("cls", [bkn.BatchKalmanNorm1d, bkn.BatchKalmanNorm2d, bkn.BatchKalmanNorm3d])
def test_unknown_transition_and_gain(cls):
    raises_with([cls.__name__, "'kalman'", "official", "analytic", "identity"], cls, 4, transition="kalman")
    raises_with([cls.__name__, "'optimal'", "fixed", "learned", "adaptive"], cls, 4, gain="optimal")


def test_unknown_transition_and_gain_through_registry_and_convert():
    raises_with(["'kalman'", "official", "analytic", "identity"], norms.create, "bkn", 8, transition="kalman")
    raises_with(["'optimal'", "fixed", "learned", "adaptive"], norms.create, "bkn", 8, gain="optimal")
    raises_with(["'kalman'", "official"], bkn.convert, resnet18(num_classes=10), "bkn", transition="kalman")
    raises_with(["'kalman'", "official", "analytic", "identity"], transitions.get, "kalman")


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        ({"p": 1.5}, ["p", "[0, 1]", "1.5"]),
        ({"p": -0.1}, ["p", "-0.1"]),
        ({"group_size": 0}, ["group_size", "0"]),
        ({"group_size": 2.5}, ["group_size", "2.5"]),
    ],
)
def test_bad_constructor_arguments(kwargs, fragments):
    raises_with(["BatchKalmanNorm2d"] + fragments, bkn.BatchKalmanNorm2d, 4, **kwargs)


def test_bad_num_features():
    raises_with(["BatchKalmanNorm2d", "num_features", "0"], bkn.BatchKalmanNorm2d, 0)
    raises_with(["GhostBatchNorm2d", "num_features"], bkn.GhostBatchNorm2d, -3)


def test_brn_limits():
    raises_with(["BatchRenorm2d", "rmax", "0.5"], bkn.BatchRenorm2d, 4, rmax=0.5, dmax=1.0)
    raises_with(["BatchRenorm2d", "rmax", "dmax"], bkn.BatchRenorm2d, 4, rmax=2.0)
