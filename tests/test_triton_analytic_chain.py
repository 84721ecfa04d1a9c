"""The analytic transition on the Triton kernels inside a prior chain, in Triton's interpreter.

A small conv net (odd channel counts; a strided, padded, dilated convolution with a bias; a
depthwise one) and a CIFAR ResNet (residual sums: the norm-ReLU rule with extra moments, the
zero-padded shortcut) are converted with ``bkn-analytic`` and run one training step (forward,
cross-entropy, backward, SGD, a second forward) under ``BKN_BACKEND=torch`` and
``BKN_BACKEND=triton`` on CPU tensors: outputs, every prior, every gradient and the running
buffers agree to float rounding. Only the transition changes backend here (the norm layers
take their own path, the same in both runs). Also: the transition's launches per norm layer
per step, counted by :func:`bkn.kernels.triton_analytic._launch`.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn
from triton_interpreter import interpreted_kernels

from bkn import methods
from bkn.models.cifar_resnet import cifar_resnet


@pytest.fixture
def kernels(monkeypatch):
    with interpreted_kernels(monkeypatch):
        yield importlib.import_module("bkn.kernels.triton_analytic")


def _small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1, bias=False),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Conv2d(5, 7, 3, stride=2, padding=2, dilation=2),
        nn.BatchNorm2d(7),
        nn.ReLU(),
        nn.Conv2d(7, 7, 3, padding=1, groups=7, bias=False),
        nn.BatchNorm2d(7),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(7, 3),
    )


def _keeper(keep):
    def hook(_, args, kwargs):
        keep(args[1] if len(args) > 1 else kwargs.get("prior"))  # returns None: the arguments unchanged

    return hook


def _step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, backend: str, monkeypatch):
    """One SGD step and a second forward under ``BKN_BACKEND=backend``: what the comparison reads."""
    monkeypatch.setenv("BKN_BACKEND", backend)
    model = copy.deepcopy(model).train()
    priors = []

    def keep(prior):
        priors.append(None if prior is None else tuple(t.detach().clone() for t in prior))
        return prior

    for layer in model.modules():
        if not hasattr(layer, "prior_used"):
            continue
        provider = layer.prior_provider  # the chain of bkn.convert: the layer asks for its prior
        if provider is not None:
            layer.prior_provider = lambda provider=provider: keep(provider())
        else:  # a hand-built chain (the CIFAR ResNet): the prior is forward's argument
            layer.register_forward_pre_hook(_keeper(keep), with_kwargs=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(x)
    nn.functional.cross_entropy(out, target).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    again = model(x)
    buffers = [b.clone() for b in model.buffers() if b.is_floating_point()]
    return out.detach(), again.detach(), priors, grads, buffers


def _compare(model, x, target, monkeypatch, tol):
    want = _step(model, x, target, "torch", monkeypatch)
    got = _step(model, x, target, "triton", monkeypatch)
    assert len(got[2]) == len(want[2]) and sum(p is not None for p in want[2]) >= 2  # priors were made
    for name, a, b in zip(("output", "output after the step", "priors", "grads", "buffers"), got, want):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, pytest.param(torch.float32, marks=pytest.mark.slow)])
def test_small_net_step_triton_equals_torch(kernels, monkeypatch, dtype):
    torch.manual_seed(0)
    model = methods.get("bkn-analytic").convert(_small_net(), group_size=2).to(dtype)
    x, target = torch.randn(4, 3, 8, 8, dtype=dtype), torch.randint(0, 3, (4,))
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    _compare(model, x, target, monkeypatch, tol)


def test_cifar_resnet_step_triton_equals_torch(kernels, monkeypatch):
    method = methods.get("bkn-analytic")
    torch.manual_seed(0)
    model = cifar_resnet(8, method.norm, width=4, **method.layer_options(group_size=2)).double()
    x, target = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    _compare(model, x, target, monkeypatch, dict(rtol=1e-10, atol=1e-12))


def test_transition_launches_per_norm_layer(kernels, monkeypatch):
    """Per prior, one training step launches 2 kernels forward (norm-ReLU, convolution) and 2 backward
    (every input gradient of the two rules in one; the weight gradient, added in the weight's hook)."""
    monkeypatch.setenv("BKN_BACKEND", "triton")
    torch.manual_seed(0)
    model = methods.get("bkn-analytic").convert(_small_net(), group_size=2).train()
    x, target = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    from bkn.kernels import count_launches

    mine = {n for n, v in vars(kernels).items() if type(v).__name__ in ("JITFunction", "InterpretedFunction")}
    with count_launches() as counted:
        nn.functional.cross_entropy(model(x), target).backward()
    launches = sum(n for name, n in counted.items() if name in mine)  # the transition's (the norms launch too)
    with_prior = sum(m.prior_used for m in model.modules() if hasattr(m, "prior_used"))
    assert with_prior == 2 and launches == 4 * with_prior, launches


def test_the_switch_picks_the_implementation(kernels, monkeypatch):
    """BKN_BACKEND=triton runs the Triton Functions, torch the reference Functions (one node each)."""
    from bkn.transitions.analytic import relu_moments

    mean, var = torch.randn(2, 3, requires_grad=True), torch.rand(2, 3) + 0.1
    for backend, node in (("triton", "ReluMomentsBackward"), ("torch", "_ReluMomentsBackward")):
        monkeypatch.setenv("BKN_BACKEND", backend)
        first, _ = relu_moments(mean, var)
        assert type(first.grad_fn).__name__ == node
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("BKN_BACKEND", "triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        relu_moments(mean, var)
