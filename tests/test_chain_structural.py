"""Prior chains through the structural ops of real networks, in converted models, for both transitions.

Small networks that hold each op the way torchvision and timm write it (``torch.split``,
``chunk``, channel slices, a channel shuffle, squeeze-and-excitation, spatial means,
``nn.Upsample`` and ``F.interpolate``, torchvision's ``StochasticDepth``, a blur pool's reflect
padding and functional ``conv2d``): the layer after the op uses a prior, the report agrees with
the layers' flags, and (analytic) the prior equals the rules applied by hand. The zoo of real
models (:mod:`bkn.probes.zoo`): its fast subset here, every model in the slow run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

import bkn
from bkn.layers import _BatchKalmanNorm
from bkn.probes import zoo
from bkn.transitions.analytic import relu_moments

C = 8


def _conv(cin=C, cout=C, k=3, **kw):
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=False, **kw)


class Splits(nn.Module):
    """res2net / mixnet / cspnet / ghostnet: split, chunk and slice the channels, work per part, concatenate."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = _conv(3), nn.BatchNorm2d(C)
        self.a, self.b = _conv(4, 4), _conv(4, 4)
        self.bn1 = nn.BatchNorm2d(C)
        self.c, self.bn2 = _conv(C, 2 * C, 1), nn.BatchNorm2d(C)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        xa, xb = torch.split(x, 4, dim=1)
        x = F.relu(self.bn1(torch.cat([self.a(xa), self.b(xb)], 1)))
        left, right = x.chunk(2, dim=1)
        x = torch.cat([right, left], 1)
        return self.bn2(self.c(x)[:, :C])


class Shuffle(nn.Module):
    """shufflenet: ``view`` + ``transpose`` + ``contiguous`` + ``view`` over the channels."""

    def __init__(self, groups: int = 2):
        super().__init__()
        self.groups = groups
        self.stem, self.bn0, self.bn1 = _conv(3), nn.BatchNorm2d(C), nn.BatchNorm2d(C)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        b, c, h, w = x.size()
        x = x.view(b, self.groups, c // self.groups, h, w)
        x = torch.transpose(x, 1, 2).contiguous().view(b, -1, h, w)
        return self.bn1(x)


class SqueezeExcite(nn.Module):
    """efficientnet / regnety / mobilenetv3: ``x * gate(mean(x))``, then a convolution and a norm."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = _conv(3), nn.BatchNorm2d(C)
        self.reduce, self.expand = nn.Conv2d(C, 4, 1), nn.Conv2d(4, C, 1)
        self.conv, self.bn1 = _conv(), nn.BatchNorm2d(C)

    def forward(self, x):
        x = F.silu(self.bn0(self.stem(x)))
        s = self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        return self.bn1(self.conv(x * torch.sigmoid(s)))


class Upsampling(nn.Module):
    """hrnet: a low-resolution branch upsampled (module, nearest) and a function (bilinear), summed."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = _conv(3), nn.BatchNorm2d(C)
        self.down, self.bn1 = _conv(stride=2), nn.BatchNorm2d(C)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.bn2, self.bn3 = nn.BatchNorm2d(C), nn.BatchNorm2d(C)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        low = F.relu(self.bn1(self.down(x)))
        y = self.bn2(x + self.up(low))
        return self.bn3(F.interpolate(low, size=y.shape[-2:], mode="bilinear", align_corners=False) + y)


class DropPathAndBlur(nn.Module):
    """torchvision's efficientnet (``StochasticDepth``) and timm's blur pool (reflect pad, ``F.conv2d``),
    then a spatial mean and a linear head with a BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = _conv(3), nn.BatchNorm2d(C)
        self.conv, self.bn1 = _conv(), nn.BatchNorm2d(C)
        self.drop = StochasticDepth(0.3, "row")
        self.register_buffer(
            "filt",
            torch.tensor([1.0, 2.0, 1.0]).outer(torch.tensor([1.0, 2.0, 1.0])).div(16).expand(C, 1, 3, 3).clone(),
        )
        self.bn2 = nn.BatchNorm2d(C)
        self.fc, self.bn3 = nn.Linear(C, C), nn.BatchNorm1d(C)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = self.bn1(x + self.drop(self.conv(x)))
        x = self.bn2(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=C))
        return self.bn3(self.fc(x.mean((2, 3))))


NETS = {
    "splits": (Splits, ["bn1", "bn2"]),
    "shuffle": (Shuffle, ["bn1"]),
    "squeeze-excite": (SqueezeExcite, ["bn1"]),
    "upsampling": (Upsampling, ["bn2", "bn3"]),
    "drop-path-and-blur": (DropPathAndBlur, ["bn1", "bn2", "bn3"]),
}


def _step(model: nn.Module, seed: int = 0) -> nn.Module:
    out = model.train()(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed)))
    out.square().mean().backward()
    return model


def _trained(net: nn.Module, transition: str, seed: int = 0) -> nn.Module:
    return _step(bkn.convert(net, "bkn", transition=transition, group_size=2), seed)


@pytest.mark.parametrize("transition", ["official", "analytic"])
@pytest.mark.parametrize("name", list(NETS))
def test_the_layers_after_each_op_use_a_prior(name, transition):
    torch.manual_seed(0)
    cls, after = NETS[name]
    model = _trained(cls(), transition)
    rows = {r["layer"]: r for r in bkn.prior_report(model)}
    for layer in after:
        assert rows[layer]["last"] == "prior used", rows[layer]
        assert rows[layer]["plan"] == f"prior ({transition})", rows[layer]
    for layer_name, layer in model.named_modules():
        if isinstance(layer, _BatchKalmanNorm):
            assert layer.prior_used == (rows[layer_name]["last"] == "prior used")
    assert model.bn0.posterior[0].requires_grad  # the prior's source is in the autograd graph


class SelfGated(nn.Module):
    """``x * sigmoid(x)`` written out: both factors at the same positions."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = _conv(3), nn.BatchNorm2d(C)
        self.conv, self.bn1 = _conv(), nn.BatchNorm2d(C)

    def forward(self, x):
        x = self.bn0(self.stem(x))
        return self.bn1(self.conv(x * torch.sigmoid(x)))


def test_a_product_of_correlated_factors_official_only():
    """The surrogate goes through the product as the activations do; the closed form refuses it and says why."""
    torch.manual_seed(0)
    rows = {r["layer"]: r["last"] for r in bkn.prior_report(_trained(SelfGated(), "official"))}
    assert rows["bn1"] == "prior used"
    rows = {r["layer"]: r["last"] for r in bkn.prior_report(_trained(SelfGated(), "analytic"))}
    assert rows["bn1"].startswith("no prior: cannot propagate through mul (a product of two activations at the same")


def test_analytic_prior_through_a_channel_shuffle_is_the_permuted_relu_moments():
    torch.manual_seed(1)
    model = bkn.convert(Shuffle(groups=4), "bkn", transition="analytic", group_size=2, p=0.5)
    seen = {}
    model.bn1.register_forward_pre_hook(lambda m, args: seen.update(prior=m.prior_provider()))
    _step(model)
    with torch.no_grad():
        m0, v0 = (t.detach() for t in model.bn0.posterior)
        mean, var = relu_moments(model.bn0.bias.expand_as(m0), model.bn0.weight.square() * v0 / (v0 + model.bn0.eps))
    order = torch.arange(C).view(4, C // 4).t().reshape(-1)  # channel j of the output is channel order[j]
    torch.testing.assert_close(seen["prior"][0].detach(), mean[:, order])
    torch.testing.assert_close(seen["prior"][1].detach(), var[:, order])


def test_the_zoo_counts_norms_with_normalization_upstream():
    torch.manual_seed(0)
    model = _trained(Splits(), "analytic")
    upstream = zoo.upstream_of(model._bkn_chain)
    assert upstream == {"bn0": False, "bn1": True, "bn2": True}


def _check_coverage(results):
    for r in results:
        assert r["norms"] >= r["upstream"] > 0, r
        assert sum(r["reasons"].values()) == r["upstream"] - r["used"], r  # each one without a prior says why
        assert all(reason.startswith("no prior: ") or reason.startswith("did not run") for reason in r["reasons"]), r
    used, upstream = sum(r["used"] for r in results), sum(r["upstream"] for r in results)
    assert used / upstream >= 0.95, zoo.table(results)


@pytest.mark.parametrize("source,name", zoo.FAST)
def test_zoo_fast_subset_reaches_the_target(source, name):
    pytest.importorskip(source)
    _check_coverage([zoo.measure(source, name)])


def test_zoo_compare_table_and_model_list_errors():
    def run(used, reasons):
        return {
            "models": [{"source": "timm", "model": "m", "norms": 5, "upstream": 4, "used": used, "reasons": reasons}]
        }

    table = zoo.compare(run(2, {"no prior: cannot propagate through mul (x)": 2}), run(4, {}))
    assert "| timm:m | 5 | 4 | 2 (50%) | 4 (100%) | mul (x) (2) | - |" in table
    assert "| all 1 models | 5 | 4 | 2 (50.0%; 40.0% of all norms) | 4 (100.0%; 80.0% of all norms) |" in table
    with pytest.raises(ValueError, match="timm:m is missing or different"):
        zoo.compare({"models": []}, run(4, {}))
    with pytest.raises(SystemExit):
        zoo.main(["--models", "resnet18"])  # no source: argparse names the expected form


@pytest.mark.slow
def test_zoo_reaches_the_target_on_every_model():
    assert len(zoo.ZOO) >= 30
    _check_coverage([zoo.measure(source, name) for source, name in zoo.ZOO])


def test_docs_zoo_table_is_the_compare_output_of_the_stored_runs():
    """docs/zoo.md's table is what ``python -m bkn.probes.zoo --compare`` prints for docs/zoo/*.json."""
    import json
    import pathlib

    docs = pathlib.Path(__file__).resolve().parents[1] / "docs"
    runs = [json.loads((docs / "zoo" / f"{name}.json").read_text()) for name in ("before", "after")]
    assert zoo.compare(*runs) in (docs / "zoo.md").read_text()
    assert len(runs[1]["models"]) == len(zoo.ZOO)


class PoolWithIndices(nn.Module):
    """A module that returns a tuple (values, indices), and the getitem of its values."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = _conv(3), nn.BatchNorm2d(C)
        self.pool, self.bn1 = nn.MaxPool2d(2, return_indices=True), nn.BatchNorm2d(C)

    def forward(self, x):
        values, _ = self.pool(F.relu(self.bn0(self.stem(x))))
        return self.bn1(values)


def test_an_element_of_a_modules_tuple_output_never_breaks_the_step():
    torch.manual_seed(0)
    assert bkn.prior_report(_trained(PoolWithIndices(), "official"))[1]["last"] == "prior used"
    last = bkn.prior_report(_trained(PoolWithIndices(), "analytic"))[1]["last"]  # moments: no tuple to index
    assert last.startswith("no prior: cannot propagate through getitem (indexing (0,")
