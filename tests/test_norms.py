"""The registry ``bkn.norms``: names, create for every name and rank, GroupNorm's group count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bkn
from bkn import layers as L
from bkn import norms

SHAPES = {0: (4, 6), 1: (4, 6, 5), 2: (4, 6, 3, 4), 3: (4, 6, 2, 3, 2)}
EXPECTED = {
    "bn": {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
    "bkn": {0: bkn.BatchKalmanNorm1d, 1: bkn.BatchKalmanNorm1d, 2: bkn.BatchKalmanNorm2d, 3: bkn.BatchKalmanNorm3d},
    "brn": {0: bkn.BatchRenorm1d, 1: bkn.BatchRenorm1d, 2: bkn.BatchRenorm2d, 3: bkn.BatchRenorm3d},
    "syncbn": {d: bkn.layers.SyncBatchNorm for d in (0, 1, 2, 3)},
    "gn": {d: nn.GroupNorm for d in range(4)},
    "ln": {0: nn.LayerNorm, 1: nn.GroupNorm, 2: nn.GroupNorm, 3: nn.GroupNorm},
    "in": {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d},
    "mabn": {0: L.MovingAverageBatchNorm1d, 1: L.MovingAverageBatchNorm1d, 2: L.MovingAverageBatchNorm2d}
    | {3: L.MovingAverageBatchNorm3d},
    "cbn": {0: L.CrossIterationBatchNorm1d, 1: L.CrossIterationBatchNorm1d, 2: L.CrossIterationBatchNorm2d}
    | {3: L.CrossIterationBatchNorm3d},
}


def test_names():
    assert isinstance(norms.names(), tuple)
    rivals = {"gn-ws", "frn", "evonorm-b0", "evonorm-s0"}  # timm's layers: tests/test_rivals.py
    assert set(norms.names()) == {"bn", "bkn", "brn", "syncbn", "gn", "ln", "in", "mabn", "cbn"} | rivals
    assert set(EXPECTED) == set(norms.names()) - rivals
    batch = {"bn", "bkn", "brn", "syncbn", "evonorm-b0", "mabn", "cbn"}
    assert {n for n in norms.names() if norms.batch_dependent(n)} == batch


def _cases():
    for name in ("bn", "bkn", "brn", "gn", "ln", "in"):
        for dims in range(4):
            yield name, dims


@pytest.mark.parametrize("name, dims", list(_cases()))
def test_create_every_name_and_rank(name, dims):
    if dims not in EXPECTED[name]:
        with pytest.raises(ValueError, match="'in'.*spatial"):
            norms.create(name, 6, spatial_dims=dims)
        return
    layer = norms.create(name, 6, spatial_dims=dims)
    assert type(layer) is EXPECTED[name][dims]
    layer.train()
    x = torch.randn(SHAPES[dims]) * 2 + 1
    x.requires_grad_()
    y = layer(x)
    y.pow(2).sum().backward()
    assert y.shape == x.shape and torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    params = {n: p for n, p in layer.named_parameters()}
    assert "weight" in params and "bias" in params  # every registry norm is affine by default
    # What each one computes (at its initial gamma = 1, beta = 0).
    with torch.no_grad():
        if name == "gn":
            # C = 6 < 8: one group of all 6 channels (never fewer than 4 channels per group), so on
            # (N, C) features GN is a LayerNorm over the features, not a degenerate one-value group.
            assert layer.num_groups == 1
            ref = F.group_norm(x, 1, eps=layer.eps)
        elif name == "ln":
            ref = F.layer_norm(x, x.shape[1:], eps=layer.eps)
        elif name == "in":
            ref = F.instance_norm(x, eps=layer.eps)
        else:  # batch statistics over (N, *spatial)
            dims_ = [0] + list(range(2, x.dim()))
            var = x.var(dims_, unbiased=False, keepdim=True)
            ref = (x - x.mean(dims_, keepdim=True)) / torch.sqrt(var + 1e-5)
        torch.testing.assert_close(y.detach(), ref, atol=1e-5, rtol=1e-5)


def test_create_bkn_with_options():
    layer = norms.create("bkn", 64, p=0.9, transition="official", group_size=2)
    assert isinstance(layer, bkn.BatchKalmanNorm2d)
    assert layer.gain.p == 0.9 and layer.transition == "official" and layer.group_size == 2
    assert layer.gain_kind == "fixed" and layer.guard == 100.0 and not layer.detach_prior
    x = torch.randn(4, 64, 3, 3)
    y = layer(x, prior=(torch.randn(2, 64), torch.rand(2, 64) + 0.5))
    assert layer.prior_used and tuple(layer.posterior[0].shape) == (2, 64) and torch.isfinite(y).all()
    analytic = norms.create("bkn", 8, transition="analytic", gain="learned", p=0.3, spatial_dims=0)
    assert isinstance(analytic, bkn.BatchKalmanNorm1d) and analytic.transition == "analytic"
    assert analytic.gain.p == pytest.approx(0.3)
    assert [n for n, _ in analytic.named_parameters()] == ["weight", "bias", "gain.logit"]


def test_create_brn_with_limits():
    layer = norms.create("brn", 64, rmax=3.0, dmax=5.0)
    assert isinstance(layer, bkn.BatchRenorm2d)
    assert layer.rmax == 3.0 and layer.dmax == 5.0
    layer.train()
    y = layer(torch.randn(4, 64, 3, 3))
    assert torch.isfinite(y).all() and y.shape == (4, 64, 3, 3)


def test_create_bn_is_torch_unless_grouped():
    assert type(norms.create("bn", 16)) is nn.BatchNorm2d
    assert type(norms.create("bn", 16, group_size=None)) is nn.BatchNorm2d
    ghost = norms.create("bn", 16, group_size=2)
    assert isinstance(ghost, bkn.GhostBatchNorm2d) and ghost.group_size == 2
    assert isinstance(norms.create("bn", 16, group_size=2, spatial_dims=3), bkn.GhostBatchNorm3d)


def test_create_passes_options_through():
    assert norms.create("gn", 64, eps=1e-3).eps == 1e-3
    assert norms.create("gn", 64, num_groups=4).num_groups == 4
    assert norms.create("bn", 8, momentum=0.01).momentum == 0.01
    assert norms.create("bkn", 8, eps=1e-3, momentum=None).momentum is None
    assert norms.create("in", 8, affine=False).affine is False


@pytest.mark.parametrize(
    "c, expected",
    [
        (1, 1),
        (3, 1),
        (7, 1),
        (8, 2),
        (16, 4),
        (24, 6),
        (32, 8),
        (48, 12),
        (64, 16),
        (100, 25),
        (128, 32),
        (256, 32),
        (2048, 32),
        (31, 1),
        (37, 1),
    ],
)
def test_gn_group_count(c, expected):
    assert norms.gn_groups(c) == expected
    assert norms.create("gn", c).num_groups == expected


def test_gn_group_count_rule():
    """Spec section 3: 32 groups, fewer when C is small, never fewer than 4 channels per group: the largest
    divisor G of C with G <= 32 and C / G >= 4 (one group when there is none), checked by brute force."""
    for c in range(1, 700):
        g = norms.gn_groups(c)
        assert c % g == 0 and g <= 32
        assert c // g >= 4 or g == 1
        assert all(c % k or c // k < 4 for k in range(g + 1, min(32, c) + 1))
        if c % 128 == 0:
            assert g == 32
    with pytest.raises(ValueError, match="num_channels must be a positive int"):
        norms.gn_groups(0)


def test_group_size_rejected_by_per_sample_norms():
    for name in ("gn", "ln", "in"):
        with pytest.raises(ValueError, match="group_size"):
            norms.create(name, 8, group_size=2)
        assert norms.create(name, 8, group_size=None) is not None
