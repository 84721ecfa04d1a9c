"""``bkn.conversion_report``: one report for every ``bkn.convert`` (bkn.replacements); the rivals' and
MABN/CBN's own listings are tested with them (tests/test_rivals.py, tests/test_cross_iteration_suite.py)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import bkn
from bkn.replacements import ATTRIBUTE, ConversionReport, Replacement


def _batch_norms(model):
    return [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("norm", ["gn", "brn", "bkn"])
def test_plain_conversion_lists_every_batch_norm_and_its_new_class(norm):
    model = torchvision.models.resnet18(num_classes=10)
    before = _batch_norms(model)
    model = bkn.convert(model, norm)
    report = bkn.conversion_report(model)
    assert isinstance(report, ConversionReport) and report.method == norm and report.problems == []
    assert [r.module for r in report.replaced] == before and len(before) == 20
    modules = dict(model.named_modules())
    assert all(r.role == "norm" and r.old == "BatchNorm2d" for r in report.replaced)
    assert all(r.new == type(modules[r.module]).__name__ != "BatchNorm2d" for r in report.replaced)
    if norm == "bkn":  # the note is the chain's plan for that layer
        plans = {row["layer"]: row["plan"] for row in bkn.prior_report(model)}
        assert {r.module: r.note for r in report.replaced} == plans
        assert report.replaced[0].note.startswith("no prior") and report.replaced[1].note == "prior (official)"
    else:
        assert all(r.note == "" for r in report.replaced)
    text = str(report)
    assert text.startswith(f"bkn.convert to {norm!r}: 20 replacements") and "layer4.1.bn2" in text


def test_bkn_without_a_chain_says_so_in_the_note():
    model = bkn.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "bkn", chain=False)
    assert bkn.conversion_report(model).replaced == [
        Replacement("1", "norm", "BatchNorm2d", "BatchKalmanNorm2d", "no prior chain: chain=False")
    ]
    lone = bkn.convert(nn.BatchNorm1d(4), "gn")
    assert bkn.conversion_report(lone).replaced == [Replacement("", "norm", "BatchNorm1d", "GroupNorm")]
    assert "(the model)" in str(bkn.conversion_report(lone))


def test_every_conversion_attaches_the_same_report_under_one_name():
    for norm in ("bn", "frn", "mabn"):
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        model = bkn.methods.get(norm).convert(net, group_size=2)
        assert type(getattr(model, ATTRIBUTE)) is ConversionReport and bkn.conversion_report(model).method == norm
        model.train()(torch.randn(2, 3, 6, 6))


def test_an_unconverted_model_and_a_bad_role_are_errors():
    with pytest.raises(ValueError, match=r"Sequential carries no conversion report.*bkn.convert\(model, norm\)"):
        bkn.conversion_report(nn.Sequential(nn.BatchNorm2d(4)))
    with pytest.raises(ValueError, match="role 'act' is not one of"):
        Replacement("x", "act", "ReLU", "Identity")
