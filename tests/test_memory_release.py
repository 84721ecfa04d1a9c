"""A forward without a backward frees everything it built once its outputs go.

Autograd frees a node when nothing refers to it; a node that holds one of its own outputs
in a plain reference (a C++ Function's ``saved_data``) is in a reference cycle through that
output's ``grad_fn`` and is never freed, with every tensor it saved. The compiled BKN
Function did that without a prior (its posterior was the observation it kept): a
converted ResNet-18 leaked about 13 MB per training-mode forward without a backward (a
probe, a forward whose loss is dropped). Each test keeps a weak reference to an input that
only the graph holds and checks that it dies with the outputs, on both kernel paths.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torchvision

import bkn
from bkn.layers._function import normalize_with_stats
from bkn.layers._renorm_function import renorm_train

pytestmark = pytest.mark.usefixtures("kernels", "no_cycle_collector")


@pytest.fixture
def no_cycle_collector():
    """Python's cycle collector off for the test: what is freed is freed by reference counts
    (autograd's C++ references are not Python objects, so the collector would not free a cycle
    through them anyway, but it must not free a Python-side cycle and hide it)."""
    gc.disable()
    yield
    gc.enable()


def _freed(make_outputs) -> bool:
    """Whether the input that ``make_outputs(x)`` is given (held by nothing but its graph) is freed
    when the outputs are dropped."""
    x = torch.randn(8, 6, 5, 5, dtype=torch.float64, requires_grad=True) * 1.0  # a non-leaf: saved by the node
    alive = weakref.ref(x)
    outputs = make_outputs(x)
    del x, outputs
    return alive() is None


@pytest.mark.parametrize("with_prior", [False, True])
def test_kalman_function_frees_its_graph(with_prior):
    weight = torch.ones(6, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    prior = (torch.zeros(4, 6, dtype=torch.float64), torch.ones(4, 6, dtype=torch.float64)) if with_prior else None
    assert _freed(lambda x: normalize_with_stats(x, weight, bias, prior=prior, gain=0.5, groups=4))


def test_renorm_function_frees_its_graph():
    state = (torch.zeros(6, dtype=torch.float64), *torch.ones(2, 6, dtype=torch.float64))
    assert _freed(lambda x: renorm_train(x, None, None, *state, torch.tensor(0), 0.1, 3.0, 5.0, 1e-5, 1))


@pytest.mark.parametrize("method", ["bkn-analytic", "bn"])
def test_converted_network_frees_a_forward_without_backward(method):
    """A whole converted network in training mode (BKN: the first norm without a prior, the others
    with the chain's; ghost BN: no prior anywhere): every norm's input, which only the graph keeps,
    is freed once the output is dropped and the next forward has replaced the last statistics."""
    torch.manual_seed(0)
    model = bkn.methods.get(method).convert(torchvision.models.resnet18(num_classes=10), group_size=2).train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()  # a full step first: hooks and pools in place
    inputs = []
    norms = [m for m in model.modules() if isinstance(m, bkn.layers._base.BatchStatNorm)]
    handles = [m.register_forward_pre_hook(lambda m, args: inputs.append(weakref.ref(args[0]))) for m in norms]
    out = model(torch.randn(4, 3, 32, 32))
    for handle in handles:
        handle.remove()
    assert len(inputs) == len(norms) == 20 and all(ref() is not None for ref in inputs)
    del out
    model(torch.randn(4, 3, 32, 32))  # replaces each layer's posterior and the chain's states
    assert [i for i, ref in enumerate(inputs) if ref() is not None] == []
