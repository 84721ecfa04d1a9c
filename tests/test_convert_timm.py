"""``bkn.convert`` on timm models (built without pretrained weights: no downloads) and on norm subclasses.

Norm types are matched exactly. timm's norm-activation layers (``BatchNormAct2d``,
``SyncBatchNormAct``) apply an activation and dropout in their own forward: they become
the new norm followed by the same activation and dropout, so a converted model in eval
mode, with the running statistics copied, computes *exactly* what the original did. A
subclass whose forward convert can't reproduce is refused with an error naming the
class; other norms (GroupNormAct, EvoNorm) are left alone.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import bkn
from bkn.layers import _BatchKalmanNorm

timm = pytest.importorskip("timm")
from timm.layers import BatchNormAct2d, GroupNormAct  # noqa: E402

CONVERSIONS = [("bkn", {"group_size": 2}), ("bkn", {"transition": "analytic"}), ("bn", {"group_size": 2}), ("bn", {})]


def _randomise_norms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Running statistics and affine parameters away from their defaults, so copying them matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
    return model


def _timm(name: str) -> nn.Module:
    torch.manual_seed(0)
    return _randomise_norms(timm.create_model(name, pretrained=False, num_classes=10)).eval()


def _assert_eval_output_kept(model: nn.Module, norm: str, options: dict, size: int = 64) -> nn.Module:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
    converted = bkn.convert(copy.deepcopy(model), norm, **options).eval()
    with torch.no_grad():
        out = converted(x)
    assert torch.equal(out, expected), (out - expected).abs().max()
    return converted


@pytest.mark.parametrize("norm,options", CONVERSIONS)
def test_timm_resnet18_eval_output_exactly_kept(norm, options):
    model = _timm("resnet18")
    assert sum(type(m) is nn.BatchNorm2d for m in model.modules()) == 20
    converted = _assert_eval_output_kept(model, norm, options)
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules()) or (norm, options) == ("bn", {})


@pytest.mark.parametrize("norm,options", CONVERSIONS)
def test_timm_mobilenetv3_norm_act_layers_keep_their_activation(norm, options):
    model = _timm("mobilenetv3_small_050")
    originals = {n: m for n, m in model.named_modules() if isinstance(m, BatchNormAct2d)}
    assert len(originals) == 34
    converted = _assert_eval_output_kept(model, norm, options)
    modules = dict(converted.named_modules())
    for name, original in originals.items():
        new = modules[name]
        assert not isinstance(new, BatchNormAct2d)
        assert type(new.act) is type(original.act) and type(new.drop) is type(original.drop), name
    assert set(converted.state_dict()) == set(model.state_dict())  # keys kept (act.*, drop.* included)
    if norm == "bkn" and options.get("group_size"):  # copies keep the activation (a hook): same eval output
        x = torch.randn(2, 3, 32, 32)
        buf = io.BytesIO()
        torch.save(converted, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False).eval()
        with torch.no_grad():
            expected = converted(x)
            assert torch.equal(copy.deepcopy(converted)(x), expected) and torch.equal(loaded(x), expected)


def test_timm_sync_norm_act_converts_too():
    model = timm.layers.convert_sync_batchnorm(_timm("mobilenetv3_small_050")).eval()
    assert sum(type(m).__name__ == "SyncBatchNormAct" for m in model.modules()) == 34
    _assert_eval_output_kept(model, "bkn", {"group_size": 2})


def test_timm_norm_act_chain_follows_the_activation():
    """A converted BatchNormAct2d's activation is part of the chain (ReLU in closed form, Hardswish by
    quadrature); squeeze-and-excitation's gate too (docs/design.md §5); the report matches prior_used."""
    model = bkn.convert(_timm("mobilenetv3_small_050"), "bkn", transition="analytic", group_size=2).train()
    model(torch.randn(4, 3, 64, 64)).sum().backward()
    rows = {r["layer"]: r for r in bkn.prior_report(model)}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, _BatchKalmanNorm)}
    for name, layer in layers.items():
        assert layer.prior_used == (rows[name]["last"] == "prior used"), rows[name]
    assert rows["blocks.0.0.bn1"]["last"] == "prior used"  # after the stem's bn1, whose act is Hardswish
    assert "Hardswish(bn1.act)" in rows["blocks.0.0.bn1"]["path"]
    assert rows["blocks.1.0.bn2"]["last"] == "prior used"
    assert "ReLU(blocks.1.0.bn1.act)" in rows["blocks.1.0.bn2"]["path"]
    assert rows["blocks.0.0.bn2"]["last"] == "prior used"  # after squeeze-and-excitation's x * gate
    assert (
        "mul" in rows["blocks.0.0.bn2"]["path"] and "Hardsigmoid(blocks.0.0.se.gate)" in rows["blocks.0.0.bn2"]["path"]
    )
    assert sum(layer.prior_used for layer in layers.values()) == len(layers) - 1  # all but the stem's


def test_timm_evonorm_model_left_untouched():
    model = _timm("regnetz_b16_evos")
    before = {n: type(m) for n, m in model.named_modules()}
    converted = _assert_eval_output_kept(model, "bkn", {"group_size": 2})
    assert {n: type(m) for n, m in converted.named_modules()} == before


def test_group_norm_act_left_untouched_and_named_in_the_chain():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        BatchNormAct2d(8),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        GroupNormAct(8, num_groups=4),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        BatchNormAct2d(8),
    )
    model = _randomise_norms(model).eval()
    converted = _assert_eval_output_kept(model, "bkn", {"transition": "analytic", "group_size": 2}, size=8)
    assert type(converted[3]) is GroupNormAct and isinstance(converted[5], _BatchKalmanNorm)
    converted.train()(torch.randn(4, 3, 8, 8))
    last = {r["layer"]: r["last"] for r in bkn.prior_report(converted)}
    # torch.fx traces into timm's GroupNormAct: the chain names the function it cannot propagate through.
    assert last["5"] == "no prior: cannot propagate through group_norm (call_function group_norm)"
    assert not converted[5].prior_used


class _ScaledBN(nn.BatchNorm2d):
    """A user's subclass that changes what the forward computes."""

    def forward(self, x):
        return 2 * super().forward(x)


class _NamedBN(nn.BatchNorm2d):
    """A subclass that keeps BatchNorm's forward: converted as a BatchNorm."""


def test_subclass_overriding_forward_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), _ScaledBN(4))
    with pytest.raises(TypeError, match=r"_ScaledBN subclasses torch.nn.BatchNorm2d but overrides forward"):
        bkn.convert(model, "bkn")
    assert type(model[1]) is nn.BatchNorm2d and type(model[3]) is _ScaledBN  # nothing was replaced
    with pytest.raises(TypeError, match="_ScaledBN"):
        bkn.convert(_ScaledBN(4), "bn", group_size=2)


def test_subclass_keeping_the_forward_is_converted():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _NamedBN(4), nn.ReLU(), nn.Conv2d(4, 4, 3), _NamedBN(4))
    converted = bkn.convert(model, "bkn", group_size=2)
    assert all(isinstance(converted[i], _BatchKalmanNorm) for i in (1, 4))
    converted.train()(torch.randn(4, 3, 9, 9))
    assert converted[4].prior_used
