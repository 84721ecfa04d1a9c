"""MABN and CBN (docs/design.md §16) in every part of the suite: ``bkn.convert`` with its listing of what
replaced what, the asv benchmarks, the drift probe and the training probe (one fast call each)."""

from __future__ import annotations

import warnings

import pytest
import torch
from drift_fixtures import synthetic_rows
from test_suites import runnable
from torch import nn

import bkn
from bkn import methods
from bkn.layers import CenteredConv2d, CrossIterationBatchNorm2d, MovingAverageBatchNorm2d
from bkn.probes.data import digits_dataset
from bkn.probes.training import TrainConfig, make_model, train_run


def _torchvision(name):
    import torchvision

    return getattr(torchvision.models, name)(num_classes=10)


def _timm_resnet18():
    timm = pytest.importorskip("timm")
    return timm.create_model("resnet18", num_classes=10)


def _step(model, size=32):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):  # the second step uses CBN's window (one past iteration)
        out = model.train()(torch.randn(4, 3, size, size))
        nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(out).all()


def _check_listing(model, norm):
    report = bkn.conversion_report(model)
    assert report.method == norm and report.problems == [] and {r.role for r in report.replaced} <= {"norm", "conv"}
    norms_, convs = report.of("norm"), report.of("conv")
    modules = dict(model.named_modules())
    assert norms_ and all(r.old == "BatchNorm2d" for r in norms_)
    expected = MovingAverageBatchNorm2d if norm == "mabn" else CrossIterationBatchNorm2d
    assert all(type(modules[r.module]) is expected and r.new == expected.__name__ for r in norms_)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    plain_convs = [n for n, m in model.named_modules() if type(m) is nn.Conv2d]
    if norm == "mabn":  # every convolution centred (ResNet-18 and MobileNetV2 have no one-weight filters)
        assert plain_convs == [] and len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
        assert all(r.old == "Conv2d" and r.new == "CenteredConv2d" for r in convs)
    else:  # every CBN wired to the convolution that feeds it, named in the listing
        assert convs == []
        for r in norms_:
            source = modules[r.module].source
            assert r.note.startswith("wired to ") and modules[r.note.removeprefix("wired to ")] is source
    return report.replaced


@pytest.mark.parametrize("norm", ["mabn", "cbn"])
def test_convert_resnet18_lists_what_replaced_what_and_trains(norm):
    model = methods.get(norm).convert(_torchvision("resnet18"), group_size=2)
    rows = _check_listing(model, norm)
    assert (rows[0].module, rows[0].old) == ("bn1", "BatchNorm2d")
    if norm == "cbn":
        assert rows[0].note == "wired to conv1" and model.layer1[0].bn2.source is model.layer1[0].conv2
        assert model.layer2[0].downsample[1].source is model.layer2[0].downsample[0]
    else:
        assert type(model.conv1) is CenteredConv2d and model.bn1.running_var.eq(1).all()
    _step(model, size=16)
    text = str(bkn.conversion_report(model))
    assert "layer4.1.bn2" in text and "->" in text


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["mabn", "cbn"])
@pytest.mark.parametrize("build", [lambda: _torchvision("mobilenet_v2"), _timm_resnet18], ids=["mobilenet_v2", "timm"])
def test_convert_mobilenet_v2_and_timm_resnet18_list_and_train(norm, build):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every CBN wired: no warning
        model = methods.get(norm).convert(build(), group_size=2)
    _check_listing(model, norm)
    _step(model)


def test_unwired_cbn_layers_are_named_in_a_warning_and_the_listing():
    class Residual(nn.Module):  # bn2 normalizes a sum, not a convolution's output
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(4)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            h = self.bn1(self.conv(x))
            return self.bn2(h + self.conv(x))

    with pytest.warns(UserWarning, match=r"1 layer\(s\) could not be wired.*bn2: its input is add"):
        model = methods.get("cbn").convert(Residual(), group_size=2)
    report = bkn.conversion_report(model)
    rows = {r.module: r.note for r in report.replaced}
    assert rows["bn1"] == "wired to conv" and rows["bn2"].startswith("not wired: its input is add")
    assert len(report.problems) == 1 and report.problems[0].startswith("cbn layer 'bn2' not wired: its input is add")
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    model.train()(x)
    seen = []
    model.bn2.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    y = model(x)  # bn2: the current group only, as plain BN
    bn2 = model.bn2
    groups = seen[0].split(2)
    reference = torch.cat([nn.functional.batch_norm(p, None, None, bn2.weight, bn2.bias, True) for p in groups])
    torch.testing.assert_close(y, reference)
    assert model.bn1.last_used == 1 and model.bn2.last_used == 0


def test_mabn_conversion_keeps_one_weight_filters_and_carries_the_second_moment():
    model = nn.Sequential(nn.Conv2d(4, 4, 1, groups=4), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3))
    model[1].running_mean.fill_(2.0)
    model[1].running_var.fill_(3.0)
    model = methods.get("mabn").convert(model, group_size=2)
    report = bkn.conversion_report(model)
    assert [(r.module, r.role, r.new) for r in report.replaced] == [
        ("1", "norm", "MovingAverageBatchNorm2d"),
        ("2", "conv", "CenteredConv2d"),
    ]
    assert report.problems == ["convolution '0' kept as Conv2d: one weight per filter, centring would zero it"]
    assert type(model[0]) is nn.Conv2d
    assert type(model[2]) is CenteredConv2d and set(model.state_dict()) >= {"0.weight", "2.weight", "1.running_var"}
    assert model[1].running_var.eq(7.0).all() and model[1].running_mean.eq(0).all() and model[1].momentum == 0.02
    with pytest.raises(ValueError, match=r"Linear carries no conversion report.*bkn.convert\(model, norm\)"):
        bkn.conversion_report(nn.Linear(2, 2))


def test_asv_layer_and_network_benchmarks_accept_them():
    from suites.bench_layers import TimeForwardBackward
    from suites.bench_network import TimeCifarResNetGroupedStep
    from suites.harness.matrix import METHODS

    assert {"mabn", "cbn"} <= set(METHODS)
    combo, obj = runnable(TimeForwardBackward, **{"method": "mabn"})
    grads = obj.case.forward_backward()
    assert type(obj.case.layer) is MovingAverageBatchNorm2d and torch.isfinite(grads[0]).all()
    with pytest.raises(NotImplementedError, match="cbn in training"):
        TimeForwardBackward().setup("cbn", *combo[1:])
    combo, obj = runnable(TimeCifarResNetGroupedStep, **{"method": "cbn"})
    obj.time_train_step(*combo)
    wired = [m for m in obj.case.model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert wired and any(m.source is not None for m in wired)


def test_drift_probe_measures_them():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the residual chain's norms read the stream: CBN unwired there
        frame = synthetic_rows(["mabn", "mabn-ema", "cbn"], [2], steps=2, burn_in=2)
    assert set(frame["method"]) >= {"mabn", "mabn-ema", "cbn"} and frame["value"].notna().all()


@pytest.mark.parametrize("method", ["mabn", "cbn"])
def test_training_probe_trains_them(method):
    train, test = digits_dataset("train", 8, 1, 0).head(128), digits_dataset("test", 8, 1, 0).head(64)
    config = TrainConfig(
        method=method,
        group_size=4,
        epochs=1,
        data="digits",
        network="cifar-resnet",
        image_size=8,
        width=8,
        depth=8,
        batch_size=32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pre-activation ResNet's first norms read sums: CBN unwired there
        model = make_model(config, 1, 10, total_steps=12)
        rows = train_run(config, train, test)
    accuracy = [r["value"] for r in rows if r["metric"] == "test_acc"]
    assert accuracy and all(0 <= a <= 1 for a in accuracy)
    report = bkn.conversion_report(model)
    if method == "mabn":
        convs = report.of("conv")
        assert convs and all(r.new == "CenteredConv2d" for r in convs)
        assert report.of("norm") and all(r.new == "MovingAverageBatchNorm2d" for r in report.of("norm"))
    else:
        assert any(r.note.startswith("wired to") for r in report.replaced)
        assert report.problems and all(p.startswith("cbn layer ") for p in report.problems)
        assert model.norm0.burnin == 8  # 2/3 of the 12 steps: the authors' 8 of 12 epochs
