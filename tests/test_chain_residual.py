"""Prior chains of ``bkn.convert`` in residual networks, and the runtime prior report.

Every BKN layer's input state comes from the latest normalization posterior on every path
reaching it, residual streams included; ``bkn.prior_report`` says, per layer, what the
plan predicted and what happened in the last training forward, and the two must agree
with the layers' own ``prior_used`` flags.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

import bkn
from bkn.layers import _BatchKalmanNorm
from bkn.models import cifar_resnet
from bkn.transitions.analytic import relu_moments

TRANSITIONS = ("official", "official-affine", "analytic")


class PreActBlock(nn.Module):
    """``x + conv2(relu(bn2(conv1(relu(bn1(x))))))``, in 1-D or 2-D."""

    def __init__(self, channels: int, dims: int = 2):
        super().__init__()
        conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self.bn1, self.bn2 = bn(channels), bn(channels)
        self.conv1 = conv(channels, channels, 3, padding=1, bias=False)
        self.conv2 = conv(channels, channels, 3, padding=1, bias=False)

    def forward(self, x):
        return x + self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))


class PreActNet(nn.Module):
    """A user's own pre-activation ResNet: stem conv (no norm), blocks, final norm, head."""

    def __init__(self, channels: int = 6, blocks: int = 3, dims: int = 2):
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.stem = conv(3, channels, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(*[PreActBlock(channels, dims) for _ in range(blocks)])
        self.bn = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(channels)
        self.fc = nn.Linear(channels, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(x.flatten(2).mean(-1))


class WithUnsupportedOp(nn.Module):
    """conv - bn - relu - cumulative sum over the channels - conv - bn: the cumulative sum is not modelled
    (it was ``x * sigmoid(x)``, which the official transition now takes through its surrogate)."""

    def __init__(self, c: int = 5):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = torch.cumsum(x, 1)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.conv3(x))


def _bkn_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, _BatchKalmanNorm)}


def _train_forward(model, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    model.train()
    out = model(torch.randn(*shape, generator=g))
    out.float().sum().backward()
    return out


def _assert_report_matches_layers(model) -> dict:
    """The report's last-forward column, its plan and every layer's prior_used agree; returns rows by layer."""
    rows = {r["layer"]: r for r in bkn.prior_report(model)}
    layers = _bkn_layers(model)
    assert set(rows) == set(layers)
    for name, layer in layers.items():
        row = rows[name]
        used = row["last"] == "prior used"
        assert used == layer.prior_used, (name, row)
        assert used == row["plan"].startswith("prior ("), (name, row)  # the plan was fulfilled
        if not used:
            assert row["last"].startswith("no prior: "), row
    return rows


@pytest.mark.parametrize("transition", TRANSITIONS)
@pytest.mark.parametrize("dims", [1, 2])
def test_pre_activation_resnet_gets_priors_on_the_residual_stream(transition, dims):
    torch.manual_seed(0)
    model = bkn.convert(PreActNet(dims=dims), "bkn", transition=transition, group_size=2)
    summary = bkn.prior_summary(model)
    assert summary.count("not run in training mode yet") == 7  # before any forward: the plan only
    _train_forward(model, (4, 3, 10) if dims == 1 else (4, 3, 6, 6))
    rows = _assert_report_matches_layers(model)
    unused = [name for name, layer in _bkn_layers(model).items() if not layer.prior_used]
    assert unused == ["blocks.0.bn1"]  # only the first norm (the stem has none) runs without a prior
    assert "first normalization layer" in rows["blocks.0.bn1"]["last"]
    # The stream's state: the posterior of the block's first norm (it read the stream), plus the branch.
    assert rows["blocks.2.bn1"]["sources"] == ["blocks.1.bn1 (input)", "blocks.1.bn2"]
    assert rows["bn"]["sources"] == ["blocks.2.bn1 (input)", "blocks.2.bn2"]
    assert f"prior ({transition})" in bkn.prior_summary(model)


def test_residual_stream_prior_is_the_sum_of_stream_posterior_and_branch_moments():
    """analytic: prior(block 2's bn1) = posterior of block 1's bn1 (the stream it read) + the moments of
    conv2(relu(bn2 output)), computed here from the closed-form rules directly."""
    torch.manual_seed(1)
    model = bkn.convert(PreActNet(channels=4, blocks=2), "bkn", transition="analytic", group_size=2, p=0.5)
    seen = {}
    target = model.blocks[1].bn1
    target.register_forward_pre_hook(lambda m, args: seen.update(prior=m.prior_provider()))
    _train_forward(model, (4, 3, 5, 5), seed=3)
    b0 = model.blocks[0]
    with torch.no_grad():
        m_stream, v_stream = (t.detach() for t in b0.bn1.posterior)
        m2, v2 = (t.detach() for t in b0.bn2.posterior)
        mean = b0.bn2.bias.expand_as(m2)
        var = b0.bn2.weight.square() * v2 / (v2 + b0.bn2.eps)
        rm, rv = relu_moments(mean, var)
        w = b0.conv2.weight
        expected_mean = m_stream + rm @ w.sum((2, 3)).t()
        expected_var = v_stream + rv @ w.square().sum((2, 3)).t()
    mean, var = seen["prior"]
    torch.testing.assert_close(mean.detach(), expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.detach(), expected_var, rtol=1e-5, atol=1e-6)
    assert target.prior_used


@pytest.mark.parametrize("transition", ["official", "analytic"])
def test_post_activation_torchvision_resnet_report_matches(transition):
    torch.manual_seed(0)
    model = bkn.convert(resnet18(num_classes=10), "bkn", transition=transition, group_size=2)
    _train_forward(model, (4, 3, 32, 32))
    rows = _assert_report_matches_layers(model)
    assert [n for n, layer in _bkn_layers(model).items() if not layer.prior_used] == ["bn1"]
    assert rows["layer1.0.bn2"]["sources"] == ["layer1.0.bn1"]


@pytest.mark.parametrize("transition", ["official", "analytic"])
def test_converted_cifar_resnet_keeps_priors_across_stages(transition):
    """The paper's CIFAR ResNet written as a user would (pre-activation, average-pool + zero channel
    padding shortcuts), converted: every norm but the first gets a prior, through the padding too."""
    torch.manual_seed(0)
    model = bkn.convert(cifar_resnet(20, "bn"), "bkn", transition=transition, group_size=2)
    _train_forward(model, (4, 3, 16, 16))
    rows = _assert_report_matches_layers(model)
    assert [n for n, layer in _bkn_layers(model).items() if not layer.prior_used] == ["norm0"]
    path = rows["blocks.4.norm_pre"]["path"]  # block 3 doubles the width: its shortcut pools and pads
    assert "pad" in path and "AvgPool2d(blocks.3.pool)" in path


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_hand_wired_cifar_resnet_report_matches(transition):
    """bkn.models.cifar_resnet wires its priors itself (as the official code); its report says so."""
    torch.manual_seed(0)
    model = cifar_resnet(14, "bkn", transition=transition, group_size=2)
    assert all(r["last"] == "not run in training mode yet" for r in bkn.prior_report(model))
    _train_forward(model, (4, 3, 8, 8))
    rows = _assert_report_matches_layers(model)
    assert [m.prior_used for m in model.norm_layers()] == [False] + [True] * (len(model.norm_layers()) - 1)
    assert rows["blocks.1.norm_pre"]["sources"] == ["norm0", "blocks.0.norm1"]  # the official first shortcut
    assert rows["norm_last"]["sources"] == ["blocks.5.norm_pre (its prior)", "blocks.5.norm1"]  # depth 14: 6 blocks
    model.blocks[2].norm1.gain.p = 0.0  # planted: the plan's prior is not used
    _train_forward(model, (4, 3, 8, 8))
    assert {r["layer"]: r["last"] for r in bkn.prior_report(model)}["blocks.2.norm1"].startswith("no prior")
    assert bkn.prior_summary(cifar_resnet(8, "bn")).startswith("no prior chain")


def test_unsupported_op_says_no_prior_with_its_reason():
    torch.manual_seed(0)
    model = bkn.convert(WithUnsupportedOp(), "bkn", transition="analytic", group_size=2)
    plan = {r["layer"]: r["plan"] for r in bkn.prior_report(model)}
    assert plan["bn2"].startswith("no prior: cannot propagate through cumsum")
    _train_forward(model, (4, 3, 6, 6))
    rows = _assert_report_matches_layers(model)
    assert rows["bn2"]["last"] == "no prior: cannot propagate through cumsum (call_function cumsum)"
    assert rows["bn3"]["last"] == "prior used"
    summary = bkn.prior_summary(model)
    assert "no prior: cannot propagate through cumsum" in summary


def test_report_shows_a_planned_prior_that_did_not_happen():
    """Planted: the plan gives bn2 a prior, but with p = 0 the layer ignores it, and a source layer that is
    skipped at run time leaves the next one without: the last-forward column says so, not the plan."""
    torch.manual_seed(0)

    class Skippable(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = WithUnsupportedOp()
            self.skip = False

        def forward(self, x):
            n = self.net
            x = F.relu(n.bn1(n.conv1(x)))
            x = F.relu((n.conv2(x) if self.skip else n.bn2(n.conv2(x))))
            return n.bn3(n.conv3(x))

    model = bkn.convert(Skippable(), "bkn", transition="analytic", group_size=2)
    rows = {r["layer"]: r for r in bkn.prior_report(model)}
    assert rows["net.bn2"]["plan"] == rows["net.bn3"]["plan"] == "prior (analytic)"
    model.net.bn2.gain.p = 0.0
    _train_forward(model, (4, 3, 6, 6))
    rows = {r["layer"]: r for r in bkn.prior_report(model)}
    assert rows["net.bn2"]["last"] == "no prior: the layer ignored the prior it was given (p = 0)"
    assert not model.net.bn2.prior_used and model.net.bn3.prior_used
    model.skip = True  # the traced graph still has bn2; at run time it does not run
    _train_forward(model, (4, 3, 6, 6))
    rows = {r["layer"]: r for r in bkn.prior_report(model)}
    assert rows["net.bn2"]["last"] == "did not run in the last training forward"
    assert rows["net.bn3"]["last"] == "no prior: net.bn2 did not run before it in this forward"
    assert not model.net.bn3.prior_used
    model.eval()(torch.randn(2, 3, 6, 6))  # an eval forward does not overwrite the last training forward
    assert {r["layer"]: r for r in bkn.prior_report(model)}["net.bn3"]["last"] == rows["net.bn3"]["last"]


def test_prior_report_without_chain_says_why():
    with pytest.raises(ValueError, match="not converted to 'bkn' with a chain"):
        bkn.prior_report(nn.Sequential(nn.Conv2d(3, 3, 1)))


@pytest.mark.parametrize("transition", ["official", "analytic"])
def test_densenet_concatenations_carry_priors(transition):
    """torchvision's DenseNet (pre-activation, features concatenated along the channels)."""
    from torchvision.models import DenseNet

    torch.manual_seed(0)
    net = DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=10)
    model = bkn.convert(net, "bkn", transition=transition, group_size=2)
    _train_forward(model, (4, 3, 32, 32))
    rows = _assert_report_matches_layers(model)
    assert [n for n, layer in _bkn_layers(model).items() if not layer.prior_used] == ["features.norm0"]
    assert "cat" in rows["features.denseblock1.denselayer2.norm1"]["path"]


def test_channel_concatenation_rules():
    from bkn.transitions import Analytic, Moments, MonteCarlo, Sample
    from bkn.transitions.analytic import Unsupported

    a = Moments(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]]), (5, 5))
    b = Moments(torch.tensor([[5.0]]), torch.tensor([[6.0]]), (5, 5))
    c = Analytic().cat([a, b])
    assert torch.equal(c.mean, torch.tensor([[1.0, 2.0, 5.0]])) and torch.equal(c.var, torch.tensor([[3.0, 4.0, 6.0]]))
    s1, s2 = Sample(torch.randn(2, 2, 4, 4)), Sample(torch.randn(2, 3, 4, 4))
    joined = MonteCarlo().cat([s1, s2])
    assert isinstance(joined, Sample) and torch.equal(joined.value, torch.cat([s1.value, s2.value], 1))
    with pytest.raises(Unsupported, match="different spatial sizes"):
        Analytic().cat([a, Moments(b.mean, b.var, (4, 4))])

    class CatBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            y = F.relu(self.bn1(self.conv(x)))
            return self.bn2(torch.cat([y, y], 0))

    model = bkn.convert(CatBatch(), "bkn", transition="analytic")
    _train_forward(model, (4, 3, 5, 5))
    last = {r["layer"]: r["last"] for r in bkn.prior_report(model)}
    assert last["bn2"] == "no prior: cannot propagate through cat (concatenation along dim 0, not channels)"


def test_mobilenet_v2_relu6_carries_priors():
    """torchvision's MobileNetV2: inverted residuals with ReLU6 (the clipped-Gaussian rule)."""
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    model = bkn.convert(mobilenet_v2(num_classes=10, width_mult=0.25), "bkn", transition="analytic", group_size=2)
    _train_forward(model, (4, 3, 32, 32))
    rows = _assert_report_matches_layers(model)
    assert [n for n, layer in _bkn_layers(model).items() if not layer.prior_used] == ["features.0.1"]
    assert "ReLU6(features.0.2)" in rows["features.1.conv.0.1"]["path"]


def test_tensor_plus_a_size_is_an_unsupported_add():
    class AddSize(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            y = F.relu(self.bn1(self.conv(x)))
            return self.bn2(y + y.shape[1])

    model = bkn.convert(AddSize(), "bkn", transition="analytic")
    _train_forward(model, (4, 3, 5, 5))
    rows = _assert_report_matches_layers(model)
    assert rows["bn2"]["last"] == "no prior: cannot propagate through add (add of a tensor and a non-tensor)"
