"""``bkn.convert`` on torchvision ResNets and on models torch.fx cannot trace."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

import bkn
from bkn import norms
from bkn.layers import _BatchKalmanNorm
from bkn.norm_kinds import RIVAL_NORMS

NUM_BN_RESNET18 = 20  # stem + 2 per basic block x 8 + 3 down-sampling shortcuts


def _resnet(seed=0):
    torch.manual_seed(seed)
    return resnet18(num_classes=10)


def _bkn_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchKalmanNorm)]


def _sgd_step(model, batch, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    target = torch.randint(0, 10, (batch,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt.zero_grad()
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    opt.step()
    return loss, before


@pytest.mark.parametrize("batch", [1, 2, 8])
def test_resnet18_bkn_trains_at_small_batches(batch):
    model = bkn.convert(_resnet(), "bkn")
    model.train()
    loss, before = _sgd_step(model, batch)
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        assert torch.isfinite(p.grad).all(), name
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "conv1.weight" in changed and "fc.weight" in changed and "layer4.1.bn2.weight" in changed
    layers = _bkn_layers(model)
    assert len(layers) == NUM_BN_RESNET18
    for name, layer in layers:
        # Every BKN layer but the stem's has a prior (at batch 1 the last stage sees one value
        # per channel: only the prior makes that trainable).
        assert layer.prior_used == (name != "bn1"), name
        assert tuple(layer.posterior[0].shape) == (1, layer.num_features)


def test_prior_summary_lists_every_layer():
    model = bkn.convert(_resnet(), "bkn")
    text = bkn.prior_summary(model)
    lines = text.splitlines()
    names = [n for n, _ in _bkn_layers(model)]
    assert len(lines) == 1 + len(names)  # header + one row per BKN layer
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == set(names)
    assert "no prior" in rows["bn1"] and "first normalization layer" in rows["bn1"]
    for name in names:
        if name != "bn1":
            assert "prior (official)" in rows[name] and "no prior" not in rows[name], rows[name]
    # The residual block's second layer names where its prior comes from.
    assert "layer1.0.bn1" in rows["layer1.0.bn2"]
    analytic = bkn.prior_summary(bkn.convert(_resnet(), "bkn", transition="analytic"))
    assert analytic.count("prior (analytic)") == NUM_BN_RESNET18 - 1


def test_state_dict_round_trip_and_keys():
    plain_keys = set(_resnet().state_dict())
    model = bkn.convert(_resnet(seed=1), "bkn", p=0.9)
    model.train()
    _sgd_step(model, 4)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    assert set(state) == plain_keys  # module names (and so keys) are kept
    fresh = bkn.convert(_resnet(seed=2), "bkn", p=0.9)
    fresh.load_state_dict(state)
    model.eval()
    fresh.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), fresh(x)
        assert torch.equal(a, b)
        assert torch.equal(model(x), a)  # eval is deterministic
    assert not torch.equal(fresh.layer1[0].bn1.running_mean, torch.zeros(64))


def test_eval_deterministic_after_training():
    model = bkn.convert(_resnet(), "bkn")
    model.train()
    for seed in range(2):
        _sgd_step(model, 2, seed=seed)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y1, y2 = model(x), model(x)
        y_single = model(x[:1])
    assert torch.equal(y1, y2)
    torch.testing.assert_close(y_single, y1[:1], atol=1e-5, rtol=1e-5)  # no batch dependence at eval
    assert all(not layer.prior_used for _, layer in _bkn_layers(model))


def test_state_and_flags_carry_over():
    model = _resnet()
    g = torch.Generator().manual_seed(3)
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for i, (_, bn) in enumerate(bns):
            c = bn.num_features
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=g))
            bn.running_mean.copy_(torch.randn(c, generator=g))
            bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            bn.num_batches_tracked.fill_(100 + i)
    model.train()
    bns[3][1].eval()  # a frozen BN (as in fine-tuning)
    bns[5][1].weight.requires_grad_(False)
    bns[7][1].momentum = 0.01
    bns[8][1].eps = 1e-3
    reference = copy.deepcopy(model)
    conv_before = model.layer1[0].conv1
    converted = bkn.convert(model, "bkn")
    assert converted is model and model.layer1[0].conv1 is conv_before
    new = dict(model.named_modules())
    for name, bn in bns:
        layer = new[name]
        assert isinstance(layer, bkn.BatchKalmanNorm2d), name
        for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(layer, attr), getattr(bn, attr)), (name, attr)
        assert layer.training == bn.training, name
        assert layer.weight.requires_grad == bn.weight.requires_grad, name
        assert layer.momentum == bn.momentum and layer.eps == bn.eps, name
    assert not new[bns[3][0]].training and not new[bns[5][0]].weight.requires_grad
    # In eval mode the converted network computes what the original one did.
    model.eval()
    reference.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


def test_convert_keeps_dtype():
    model = bkn.convert(_resnet().double(), "bkn")
    assert model.bn1.weight.dtype == torch.float64 and model.bn1.running_var.dtype == torch.float64
    model.train()
    y = model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert y.dtype == torch.float64 and torch.isfinite(y).all()


EXPECTED_TYPE = {
    "bn": nn.BatchNorm2d,
    "bkn": bkn.BatchKalmanNorm2d,
    "brn": bkn.BatchRenorm2d,
    "syncbn": bkn.layers.SyncBatchNorm,
    "gn": nn.GroupNorm,
    "ln": nn.GroupNorm,
    "in": nn.InstanceNorm2d,
    "mabn": bkn.layers.MovingAverageBatchNorm2d,
    "cbn": bkn.layers.CrossIterationBatchNorm2d,
}


# The rivals from timm (gn-ws, frn, evonorm-*) convert more than the norms: tests/test_rivals.py, on this ResNet-18 too.
@pytest.mark.parametrize("name", [n for n in norms.names() if n not in RIVAL_NORMS])
def test_convert_every_norm(name):
    model = bkn.convert(_resnet(), name)
    replaced = [m for m in model.modules() if isinstance(m, EXPECTED_TYPE[name])]
    assert len(replaced) == NUM_BN_RESNET18
    if name not in ("bn", "syncbn"):  # SyncBatchNorm is a torch _BatchNorm (as torch's own is)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for m in replaced:
        if name == "gn":
            assert m.num_groups == norms.gn_groups(m.num_channels) == min(32, m.num_channels // 4)  # >= 4 per group
        if name == "ln":
            assert m.num_groups == 1
        if name == "in":
            assert m.affine
    model.train()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    y = model(x)
    y.square().mean().backward()
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("transition", ["analytic", "identity", "official"])
def test_convert_transitions_run(transition):
    model = bkn.convert(_resnet(), "bkn", transition=transition)
    assert all(layer.transition == transition for _, layer in _bkn_layers(model))
    model.train()
    loss, _ = _sgd_step(model, 2)
    assert torch.isfinite(loss)
    used = {name: layer.prior_used for name, layer in _bkn_layers(model)}
    assert not used["bn1"]
    if transition == "identity":
        # The previous layer's posterior, wherever the channel count matches.
        assert used["layer1.0.bn2"] and used["layer2.0.bn2"]
    else:
        assert all(v for k, v in used.items() if k != "bn1")


@pytest.mark.parametrize("name", ["bkn", "bn", "brn"])
def test_convert_group_size_resnet18(name):
    model = bkn.convert(_resnet(), name, group_size=2)
    model.train()
    loss, _ = _sgd_step(model, 8)
    assert torch.isfinite(loss)
    for lname, layer in _bkn_layers(model):
        assert layer.group_size == 2
        assert tuple(layer.posterior[0].shape) == (4, layer.num_features), lname
        assert layer.prior_used == (lname != "bn1")


class SmallResNet(nn.Module):
    """Residual blocks without in-place ops, and a down-sampling shortcut."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        x = self.stem(x)
        out = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(out)) + x)
        return self.head(F.relu(self.down(x)))


def test_convert_group_size():
    torch.manual_seed(0)
    model = bkn.convert(SmallResNet(), "bkn", group_size=2, p=0.9)
    model.train()
    loss, before = _sgd_step(model, 8, size=8)
    assert torch.isfinite(loss)
    names = [n for n, _ in _bkn_layers(model)]
    assert names == ["stem.1", "bn1", "bn2", "down.1"]
    for name, layer in _bkn_layers(model):
        assert layer.group_size == 2
        assert tuple(layer.posterior[0].shape) == (4, layer.num_features), name
        assert layer.prior_used == (name != "stem.1"), name
        assert not torch.equal(layer.weight.detach(), before[name + ".weight"]), name
    with pytest.raises(ValueError, match="group_size"):
        model(torch.randn(3, 3, 8, 8))  # 2 does not divide 3


class Untraceable(nn.Module):
    """Data-dependent Python control flow: torch.fx cannot trace this."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        if x.sum() > 0:
            x = x * 2
        return self.bn2(self.conv2(x))


def test_untraceable_model_converts_without_priors():
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(Untraceable())  # the premise of the test
    model = bkn.convert(Untraceable(), "bkn", p=0.9)
    assert isinstance(model.bn1, bkn.BatchKalmanNorm2d) and isinstance(model.bn2, bkn.BatchKalmanNorm2d)
    model.train()
    y = model(torch.randn(2, 3, 8, 8))
    y.sum().backward()
    assert torch.isfinite(y).all()
    assert not model.bn1.prior_used and not model.bn2.prior_used
    assert model.bn1.prior_provider is None and model.bn2.prior_provider is None
    text = bkn.prior_summary(model)
    assert "no prior chain" in text and "torch.fx" in text and "trace" in text
    # Without a prior, p = 0.9 or not, a BKN layer is plain BN.
    ref = Untraceable()
    ref.load_state_dict(model.state_dict())
    ref.train()
    x = torch.randn(2, 3, 8, 8)
    model.load_state_dict(ref.state_dict())
    torch.testing.assert_close(model(x), ref(x), atol=1e-6, rtol=0)


def test_prior_summary_of_unconverted_model():
    assert "no prior chain" in bkn.prior_summary(_resnet())
    assert "no prior chain" in bkn.prior_summary(bkn.convert(_resnet(), "gn"))
