"""Activations called as functions (``F.silu(x)``, ``torch.sigmoid(x)``, ``x.tanh()``) carry the
prior chain as their modules do: the same priors as a twin network written with modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bkn

# (functional call, the module that computes the same)
CASES = [
    (lambda x: F.silu(x), nn.SiLU()),
    (lambda x: F.gelu(x, approximate="tanh"), nn.GELU(approximate="tanh")),
    (lambda x: F.leaky_relu(x, 0.2), nn.LeakyReLU(0.2)),
    (lambda x: F.elu(x, alpha=0.5), nn.ELU(alpha=0.5)),
    (lambda x: F.hardtanh(x, -2.0, 3.0), nn.Hardtanh(-2.0, 3.0)),
    (lambda x: F.relu6(x), nn.ReLU6()),
    (lambda x: F.hardswish(x), nn.Hardswish()),
    (lambda x: F.softplus(x, beta=2.0), nn.Softplus(beta=2.0)),
    (lambda x: torch.sigmoid(x), nn.Sigmoid()),
    (lambda x: x.tanh(), nn.Tanh()),
]


class Net(nn.Module):
    """conv - bn - act - conv - bn - act - pool - linear, the activation a module or a function."""

    def __init__(self, act_module: nn.Module | None, act_function=None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act = act_module
        self.fn = act_function
        self.head = nn.Linear(8, 4)

    def activation(self, x):
        return self.act(x) if self.act is not None else self.fn(x)

    def forward(self, x):
        x = self.activation(self.bn1(self.conv1(x)))
        x = self.activation(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def _priors(model, transition):
    torch.manual_seed(0)
    converted = bkn.convert(model, "bkn", transition=transition, group_size=2).train()
    captured = []
    layer = converted.bn2
    provider = layer.prior_provider
    layer.prior_provider = lambda: captured.append(provider()) or captured[-1]
    torch.manual_seed(1)  # the official transition's draws
    converted(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2)))
    return captured[0], bkn.prior_report(converted)


@pytest.mark.parametrize("transition", ["analytic", "official"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: type(CASES[i][1]).__name__)
def test_a_functional_activation_gives_the_prior_its_module_gives(case, transition):
    function, module = CASES[case]
    torch.manual_seed(3)
    with_module = Net(module)
    torch.manual_seed(3)
    with_function = Net(None, function)
    expected, _ = _priors(with_module, transition)
    got, report = _priors(with_function, transition)
    assert expected is not None and got is not None
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
    row = report[1]
    assert row["last"] == "prior used" and row["plan"] == f"prior ({transition})"


def test_a_functional_activation_with_a_tensor_argument_says_why_not():
    class Gated(Net):
        def activation(self, x):
            return F.leaky_relu(x, 0.1) * torch.sigmoid(x)  # the product is not modelled

    report = _priors(Gated(nn.Identity()), "analytic")[1]
    assert report[1]["last"].startswith("no prior: cannot propagate through mul")
