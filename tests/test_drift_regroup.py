"""The drift probe's trained-own networks at other group sizes: regrouped, never converted twice.

``setups.method_network`` gets, in the trained-own state, a network that already holds the method's
layers (built at ``setups.TRAIN_GROUP``). Converting it again found no BatchNorm to replace, so it
stayed at the training group (every grouped method on ResNet-18, EvoNorm-B0 on the CIFAR ResNet),
and torch.fx's trace of the rivals' layers warned. Checked here: no warning on that path, every
norm layer at the requested group, the output that of a network built at that group directly and
given the same weights and buffers (an independent construction), and the same module types.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from torch import fx, nn

from bkn import methods as registry
from bkn.probes.drift import setups
from bkn.probes.stats import is_batch_norm
from bkn.rivals.conversion import RivalConversionWarning

TEN_CLASSES = types.SimpleNamespace(num_classes=10)  # what base_network reads of a source
SIDE = {"cifar-resnet20": 16, "resnet18": 32, "tiny": 8}
STEPS = setups.TRAINING["steps"]


class Tiny(nn.Module):
    """A small torchvision-style ResNet: one ReLU module shared after both norms and after the residual sum
    (so frn and evonorm-* remove its calls from the graph: a torch.fx GraphModule, as ResNet-18 becomes)."""

    def __init__(self):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu, self.fc = nn.ReLU(), nn.Linear(8, 10)

    def forward(self, x):
        x = self.relu(self.bn0(self.conv0(x)))
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(self.relu(x + y).mean((2, 3)))


def _base(network: str) -> nn.Module:
    """The BN network; "tiny" (not a built-in name) takes method_network's conversion path, as --model does."""
    if network == "tiny":
        torch.manual_seed(0)
        return Tiny()
    return setups.base_network(network, TEN_CLASSES, seed=0)


def _own(network: str, name: str) -> nn.Module:
    """The trained-own network's construction (as ``setups.trained_network``), its state moved off the BN
    network's: weights perturbed, running estimates after two training forwards at the training group."""
    method = registry.get(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # cbn on the CIFAR ResNet: layers after a sum are unwired
        own = setups.method_network(network, _base(network), method, setups.TRAIN_GROUP, total_steps=STEPS)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in own.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for _ in range(2):
            own(torch.randn(8, 3, SIDE[network], SIDE[network]))
    return own


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(7)  # BKN's Monte-Carlo draws
    with torch.no_grad():
        return model(x)


def _types(model: nn.Module) -> list[tuple[str, type]]:
    """Every submodule's name and class (the root's class: a GraphModule's deep copy renames it)."""
    return [(name, type(m)) for name, m in model.named_modules() if name]


# (network, method): every grouped method and frn (a GraphModule) converted, the CIFAR ResNet with
# EvoNorm-B0 (the path that warned), MABN (prepared: not converted) and FRN (per-sample).
GROUPED = ("bn", "bkn-official", "bkn-analytic", "brn", "evonorm-b0", "mabn", "cbn")
CASES = [("tiny", m) for m in (*GROUPED, "gn-ws", "frn", "evonorm-s0")] + [
    ("cifar-resnet20", m) for m in ("evonorm-b0", "mabn", "frn")
]
SLOW_CASES = [("resnet18", m) for m in (*GROUPED, "frn")] + [("cifar-resnet20", m) for m in GROUPED]


@pytest.mark.parametrize("network,name", CASES)
def test_trained_own_network_is_regrouped_not_converted_again(network, name):
    _check_regrouped(network, name)


@pytest.mark.slow
@pytest.mark.parametrize("network,name", SLOW_CASES)
def test_trained_own_probe_networks_are_regrouped(network, name):
    _check_regrouped(network, name)


def _check_regrouped(network: str, name: str) -> None:
    method, n = registry.get(name), 2
    own = _own(network, name)
    before = _types(own)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RivalConversionWarning)
        warnings.simplefilter("error", UserWarning)  # cbn's unwired-layer warning would mean a second prepare
        regrouped = setups.method_network(network, own, method, n)
    assert _types(regrouped) == before  # no double conversion: the same modules, none replaced
    assert isinstance(regrouped, fx.GraphModule) == isinstance(own, fx.GraphModule)
    assert regrouped.training
    layers = [m for m in regrouped.modules() if is_batch_norm(m)]
    x = torch.randn(8, 3, SIDE[network], SIDE[network])
    if not method.uses_groups:  # gn-ws, frn, evonorm-s0: per-sample, nothing to regroup
        assert not layers
        assert torch.equal(_out(regrouped, x), _out(own, x))
        return
    assert layers and {m.group_size for m in layers} == {n}
    assert {m.group_size for m in own.modules() if is_batch_norm(m)} == {setups.TRAIN_GROUP}  # base untouched
    # independently: the network built at group n from the BN network, given the trained-own state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fresh = setups.method_network(network, _base(network), method, n, total_steps=STEPS)
    fresh.load_state_dict(own.state_dict())
    expected = _out(fresh, x)
    torch.testing.assert_close(_out(regrouped, x), expected, rtol=0, atol=0)
    assert not torch.allclose(_out(own, x), expected)  # the group matters: the training group's output differs


def test_regroup_names_a_layer_it_cannot_regroup():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    method = registry.get("evonorm-b0")
    own = method.convert(model, 4)
    assert setups.holds(own, method) and not setups.holds(own, registry.get("bn"))
    own[1] = nn.Identity()  # a listed norm layer that has no group
    with pytest.raises(ValueError, match=r"layer '1' \(Identity\) has no group_size"):
        setups.regroup(own, method, 2)
    own = registry.get("bn").convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), 4)
    own.append(nn.BatchNorm2d(8))  # a batch-statistic layer the conversion did not make
    with pytest.raises(ValueError, match=r"layers '2' \(BatchNorm2d\) are not bn's"):
        setups.regroup(own, registry.get("bn"), 2)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        setups.regroup(own, registry.get("bn"), 0)
