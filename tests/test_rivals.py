"""The rivals from timm (bkn.rivals): each layer equals timm's, EvoNorm-B0's groups equal a direct formula, and
bkn.convert swaps what it says on real networks (docs/design.md §15)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from timm.layers import EvoNorm2dB0, EvoNorm2dS0, FilterResponseNormTlu2d, StdConv2d
from torch import nn

import bkn
from bkn import norms
from bkn.rivals.conversion import RivalConversionWarning
from bkn.rivals.layers import EvoNormB0, EvoNormS0, FilterResponseNorm, StdConv1d

timm = pytest.importorskip("timm")
RIVALS = ("gn-ws", "frn", "evonorm-b0", "evonorm-s0")


def _randomize(*layers, seed=0):
    """The same random affine (and v, tau) in every layer, so no term is trivially one or zero."""
    gen = torch.Generator().manual_seed(seed)
    params = {n: torch.randn(p.shape, generator=gen) * 0.3 for n, p in layers[0].named_parameters()}
    for layer in layers:
        with torch.no_grad():
            for n, p in layer.named_parameters():
                p.copy_(params[n] + (1.0 if n == "weight" else 0.0))


def _outputs_and_grads(layer, x):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
    params = layer.named_parameters() if isinstance(layer, nn.Module) else ()
    return y.detach(), x.grad, {n: p.grad for n, p in params}


def _assert_same(ours, theirs, x):
    y1, gx1, gp1 = _outputs_and_grads(ours, x)
    y2, gx2, gp2 = _outputs_and_grads(theirs, x)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-5)
    assert gp1.keys() == gp2.keys()
    for name in gp1:
        torch.testing.assert_close(gp1[name], gp2[name], rtol=1e-5, atol=1e-5)


X = torch.randn(6, 16, 5, 7, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


@pytest.mark.parametrize("apply_act", [True, False])
def test_frn_is_timms_layer(apply_act):
    ours, theirs = norms.create("frn", 16, apply_act=apply_act), FilterResponseNormTlu2d(16, apply_act=apply_act)
    _randomize(ours, theirs)
    _assert_same(ours, theirs, X)


def test_evonorm_s0_is_timms_layer_and_without_act_divides_by_the_group_std():
    ours, theirs = norms.create("evonorm-s0", 16), EvoNorm2dS0(16, groups=norms.gn_groups(16))
    assert ours.groups == 4  # GN's rule: never fewer than 4 channels per group
    _randomize(ours, theirs)
    _assert_same(ours, theirs, X)
    plain = norms.create("evonorm-s0", 16, apply_act=False)
    _randomize(plain)
    xd = X.double()
    groups = xd.view(6, 4, 4, 5, 7)
    std = (groups.var(dim=(2, 3, 4), unbiased=False, keepdim=True) + plain.eps).sqrt().expand_as(groups)
    expected = (groups / std).view_as(xd) * plain.weight.double().view(1, -1, 1, 1) + plain.bias.double().view(
        1, -1, 1, 1
    )
    torch.testing.assert_close(plain.double()(xd), expected)


@pytest.mark.parametrize("group_size", [None, 6])
def test_evonorm_b0_at_one_group_is_timms_layer(group_size):
    ours, theirs = norms.create("evonorm-b0", 16, group_size=group_size), EvoNorm2dB0(16)
    _randomize(ours, theirs)
    _assert_same(ours, theirs, X)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval(), theirs.eval()
    _assert_same(ours, theirs, X)


def _b0_direct(x, weight, bias, v, eps, group_size):
    """EvoNorm-B0 per group, from the paper's formula (float64)."""
    out = []
    for xg in x.split(group_size):
        batch_std = (xg.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + eps).sqrt()
        instance_std = (xg.var(dim=(2, 3), unbiased=False, keepdim=True) + eps).sqrt()
        vv = v.view(1, -1, 1, 1)
        out.append(xg / torch.maximum(batch_std, vv * xg + instance_std))
    return torch.cat(out) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("group_size", [1, 2, 3])
def test_evonorm_b0_grouped_is_the_formula_per_group(group_size):
    layer = norms.create("evonorm-b0", 16, group_size=group_size, momentum=0.2).double()
    _randomize(layer)
    x = X.double()
    y = layer(x)
    expected = _b0_direct(x, layer.weight, layer.bias, layer.v, layer.eps, group_size)
    torch.testing.assert_close(y, expected)
    count = group_size * 5 * 7
    group_vars = torch.stack([g.var(dim=(0, 2, 3), unbiased=False) for g in x.split(group_size)])
    torch.testing.assert_close(layer.running_var, 0.8 + 0.2 * group_vars.mean(0) * count / (count - 1))


def test_evonorm_b0_grouped_gradients_are_the_formulas_and_without_act():
    # timm computes its statistics in float32 (x.float()), so no float64 gradcheck: the gradients of the
    # grouped layer against autograd through the direct formula in float64, to float32 rounding.
    layer = norms.create("evonorm-b0", 16, group_size=2)
    _randomize(layer)
    leaves = {n: p.detach().double().requires_grad_(True) for n, p in layer.named_parameters()}
    y, gx, gp = _outputs_and_grads(layer, X)
    y_ref, gx_ref, _ = _outputs_and_grads(
        lambda t: _b0_direct(t, leaves["weight"], leaves["bias"], leaves["v"], layer.eps, 2), X.double()
    )
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-4, atol=1e-5)
    for name, leaf in leaves.items():
        torch.testing.assert_close(gp[name].double(), leaf.grad, rtol=1e-4, atol=1e-4)
    plain = norms.create("evonorm-b0", 16, group_size=2, apply_act=False).double()
    assert "v" not in dict(plain.named_parameters()) and float(plain.v.abs().sum()) == 0.0
    expected = _b0_direct(X.double(), plain.weight, plain.bias, torch.zeros(16, dtype=torch.float64), plain.eps, 2)
    torch.testing.assert_close(plain(X.double()), expected)
    with pytest.raises(ValueError, match="group_size=4 must divide the batch size 6"):
        norms.create("evonorm-b0", 16, group_size=4)(X)


@pytest.mark.parametrize("name", ["frn", "evonorm-b0", "evonorm-s0"])
def test_one_d_input_is_the_2d_computation_and_features_are_refused(name):
    layer = norms.create(name, 16, spatial_dims=1, **({"group_size": 2} if name == "evonorm-b0" else {}))
    _randomize(layer)
    x = X[..., 0]
    torch.testing.assert_close(layer(x), layer(x.unsqueeze(-1)).squeeze(-1))
    with pytest.raises(ValueError, match=r"\(N, C\) features have none"):
        layer(x[..., 0])
    with pytest.raises(ValueError, match="spatial_dims must be 1 or 2"):
        norms.create(name, 16, spatial_dims=3)


def test_weight_standardized_convs_are_timms_and_the_formula():
    conv = StdConv2d(16, 8, 3, padding=1, bias=True)
    w = conv.weight.double()
    w_std = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (
        w.var(dim=(1, 2, 3), unbiased=False, keepdim=True) + 1e-6
    ).sqrt()
    expected = F.conv2d(X.double(), w_std, conv.bias.double(), padding=1)
    torch.testing.assert_close(conv.double()(X.double()), expected)
    one_d = StdConv1d(16, 8, 3, padding=1, bias=True)
    two_d = StdConv2d(16, 8, (3, 1), padding=(1, 0), bias=True)
    with torch.no_grad():
        two_d.weight.copy_(one_d.weight.unsqueeze(-1)), two_d.bias.copy_(one_d.bias)
    x = X[..., 0]
    torch.testing.assert_close(one_d(x), two_d(x.unsqueeze(-1)).squeeze(-1), rtol=1e-5, atol=1e-5)


# -- bkn.convert ---------------------------------------------------------------------------------------------------

NETWORKS = {
    "torchvision-resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "torchvision-mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "timm-resnet18": lambda: timm.create_model("resnet18", num_classes=10),
}
# (convs swapped, norms replaced, norms with the nonlinearity, activations absorbed, returned as a GraphModule)
EXPECTED = {
    "torchvision-resnet18": (20, 20, 9, {("ReLU", "Identity"): 1, ("ReLU", "removed from graph"): 8}, True),
    "torchvision-mobilenet_v2": (52, 52, 35, {("ReLU6", "Identity"): 35}, False),
    "timm-resnet18": (20, 20, 9, {("ReLU", "Identity"): 9}, False),
}
LAYER = {"frn": FilterResponseNorm, "evonorm-b0": EvoNormB0, "evonorm-s0": EvoNormS0}


@pytest.mark.parametrize(
    "network",
    ["torchvision-resnet18", pytest.param("torchvision-mobilenet_v2", marks=pytest.mark.slow), "timm-resnet18"],
)
@pytest.mark.parametrize("name", RIVALS)
def test_convert_real_networks_lists_what_it_replaced_and_trains(name, network):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RivalConversionWarning)  # nothing it could not do on these
        model = bkn.methods.get(name).convert(NETWORKS[network](), group_size=2)
    report = bkn.conversion_report(model)
    convs, norm_count, activated, activations, graph_module = EXPECTED[network]
    counts = report.counts()
    assert not report.problems
    if name == "gn-ws":
        assert counts == {("conv", "Conv2d", "StdConv2d"): convs, ("norm", "BatchNorm2d", "GroupNorm"): norm_count}
        assert sum(type(m) is StdConv2d for m in model.modules()) == convs
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    else:
        cls = LAYER[name].__name__
        absorbed = {(old, new): n for (role, old, new), n in counts.items() if role == "activation"}
        assert counts[("norm", "BatchNorm2d", cls)] == norm_count and absorbed == activations
        layers = [m for m in model.modules() if isinstance(m, LAYER[name])]
        assert len(layers) == norm_count
        with_act = sum((m.tau if name == "frn" else m.v) is not None and m.apply_act is not False for m in layers)
        assert with_act == activated
        assert report.graph_module == graph_module == isinstance(model, torch.fx.GraphModule)
        if name == "evonorm-b0":
            assert all(m.group_size == 2 for m in layers)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


class Block(nn.Module):
    """conv-bn-relu (a shared ReLU module), conv-bn + shortcut then the same ReLU, a functional relu, a ReLU6."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.conv4, self.bn4, self.act6 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU6()
        self.relu, self.drop = nn.ReLU(), nn.Identity()

    def forward(self, x):
        h = self.relu(self.drop(self.bn1(self.conv1(x))))  # absorbed through the identity
        h = self.relu(self.bn2(self.conv2(h)) + h)  # bn2 feeds the add: kept; the shared relu stays here
        h = F.relu(self.bn3(self.conv3(h)))  # functional: removed from the graph
        return self.act6(self.bn4(self.conv4(h))).mean((2, 3))  # ReLU6 module: Identity


@pytest.mark.parametrize("name", ["frn", "evonorm-b0", "evonorm-s0"])
def test_convert_absorbs_exactly_the_relus_that_follow_a_norm(name):
    torch.manual_seed(0)
    model = bkn.convert(Block(), name, **({"group_size": 2} if name == "evonorm-b0" else {}))
    assert isinstance(model, torch.fx.GraphModule)  # the functional relu and the shared ReLU's first call
    report = bkn.conversion_report(model)
    # a GraphModule's deep copy rebuilds it from the graph, dropping other attributes: the report survives it
    assert bkn.conversion_report(copy.deepcopy(model)) == report
    notes = {r.module: r.note for r in report.replaced if r.role == "norm"}
    assert [m for m, note in notes.items() if note == "with nonlinearity"] == ["bn1", "bn3", "bn4"]
    assert {(r.old, r.new) for r in report.replaced if r.role == "activation"} == {
        ("ReLU", "removed from graph"),
        ("relu", "removed from graph"),
        ("ReLU6", "Identity"),
    }
    m, x = model, torch.randn(4, 3, 6, 6)
    for layer in (m.bn1, m.bn2, m.bn3, m.bn4):
        _randomize(layer, seed=id(layer) % 1000)
    expected = m.bn1(m.conv1(x))  # the rival with its nonlinearity, no ReLU after it
    expected = torch.relu(m.bn2(m.conv2(expected)) + expected)
    expected = m.bn4(m.conv4(m.bn3(m.conv3(expected)))).mean((2, 3))
    torch.testing.assert_close(model(x), expected)
    assert type(m.act6) is nn.Identity and type(m.relu) is nn.ReLU
    model(x).sum().backward()


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = (
            nn.Conv2d(3, 4, 3, padding_mode="reflect", padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
        )

    def forward(self, x):
        h = self.bn(self.conv(x))
        return self.relu(h) if h.sum() > 0 else h  # data-dependent: torch.fx cannot trace it


def test_what_convert_cannot_do_is_said_at_run_time():
    with pytest.warns(RivalConversionWarning, match="could not trace Untraceable.*no activation is absorbed"):
        model = bkn.convert(Untraceable(), "frn")
    assert type(model.relu) is nn.ReLU and model.bn.tau is None  # FRN without TLU, the ReLU kept
    assert bkn.conversion_report(model).problems
    with pytest.warns(RivalConversionWarning, match="convolution 'conv' left without weight standardization"):
        model = bkn.convert(Untraceable(), "gn-ws")
    assert type(model.conv) is nn.Conv2d and type(model.bn) is nn.GroupNorm
    with pytest.raises(ValueError, match=r"cannot replace BatchNorm3d \['1'\]"):
        bkn.convert(nn.Sequential(nn.Conv3d(3, 4, 1), nn.BatchNorm3d(4)), "evonorm-s0")
    with pytest.raises(ValueError, match=r"carries no conversion report.*bkn.convert\(model, norm\)"):
        bkn.conversion_report(nn.Linear(2, 2))


def test_gn_ws_keeps_the_convolution_parameters_themselves():
    net = nn.Sequential(nn.Conv1d(2, 8, 5, bias=True), nn.BatchNorm1d(8), nn.ReLU())
    weight, bias = net[0].weight, net[0].bias
    model = bkn.convert(net, "gn-ws")
    assert type(model[0]) is StdConv1d and model[0].weight is weight and model[0].bias is bias
    assert type(model[1]) is nn.GroupNorm and type(model[2]) is nn.ReLU


def test_timms_norm_act_layers_absorb_their_own_relu_and_keep_another_act():
    from timm.layers import BatchNormAct2d

    net = nn.Sequential(
        nn.Conv2d(3, 8, 1),
        BatchNormAct2d(8, act_layer=nn.ReLU),
        nn.Conv2d(8, 8, 1),
        BatchNormAct2d(8, act_layer=nn.SiLU),
    )
    model = bkn.convert(net, "frn")
    notes = [r.note for r in bkn.conversion_report(model).replaced]
    assert notes == ["ReLU absorbed (1.act)", "its act SiLU kept"]
    assert model[1].tau is not None and model[3].tau is None
    x = torch.randn(2, 3, 4, 4)
    h = model[1](model[0](x))
    torch.testing.assert_close(model(x), F.silu(FilterResponseNormTlu2d.forward(model[3], model[2](h))))
