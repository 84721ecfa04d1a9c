"""Copies of converted models: deepcopy, pickling the whole model, state_dict, AveragedModel.

A copy must be a working model of its own: its BKN layers get their priors from *its* chain
(not the original's), and the statistics of the last forward (non-leaf tensors) are not copied.
"""

from __future__ import annotations

import copy
import io
import time

import pytest
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from torchvision.models import resnet18, resnet50

import bkn
from bkn.layers import _BatchKalmanNorm


def _layers(model):
    return [m for m in model.modules() if isinstance(m, _BatchKalmanNorm)]


def _step(model, seed=0, batch=4, size=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    model.train()
    loss = F.cross_entropy(model(x), torch.randint(0, 10, (batch,), generator=g))
    loss.backward()
    return loss


def _assert_independent_copy(original, clone):
    """The clone trains with its own chain: its layers use priors, the original's stay untouched."""
    for layer in _layers(original):
        layer.__dict__["posterior"] = None
    assert all(a is not b for a, b in zip(_layers(original), _layers(clone)))
    torch.manual_seed(5)
    _step(clone)
    assert all(layer.posterior is None for layer in _layers(original))  # the clone's hooks are its own
    used = [layer.prior_used for layer in _layers(clone)]
    assert used[0] is False and all(used[1:])
    assert all(row["last"] in ("prior used",) or "first" in row["last"] for row in bkn.prior_report(clone))


def _same_training_output(a, b):
    """Same weights and chain: the same training-mode output for the same Monte-Carlo draws."""
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    outs = []
    for model in (a, b):
        torch.manual_seed(11)
        outs.append(model.train()(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_deepcopy_of_converted_resnet50_after_a_step():
    """The issue's case: RecursionError before (the chain kept torch.fx nodes)."""
    torch.manual_seed(0)
    model = bkn.convert(resnet50(num_classes=10), "bkn", group_size=2)
    _step(model, size=32)  # posteriors are non-leaf tensors now: deepcopy must not try to copy them
    start = time.perf_counter()
    clone = copy.deepcopy(model)
    assert time.perf_counter() - start < 20
    assert clone._bkn_chain is not model._bkn_chain
    assert all(layer.posterior is None for layer in _layers(clone))
    _same_training_output(model, clone)
    _assert_independent_copy(model, clone)


@pytest.mark.parametrize("transition", ["official", "analytic"])
def test_torch_save_of_the_whole_model_and_load(transition):
    torch.manual_seed(0)
    model = bkn.convert(resnet18(num_classes=10), "bkn", transition=transition, group_size=2)
    _step(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    _same_training_output(model, loaded)
    model.eval(), loaded.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    _assert_independent_copy(model, loaded)
    assert "prior (" + transition + ")" in bkn.prior_summary(loaded)


def test_state_dict_round_trip_keeps_training_behaviour():
    torch.manual_seed(0)
    model = bkn.convert(resnet18(num_classes=10), "bkn", transition="analytic", group_size=2)
    _step(model)
    fresh = bkn.convert(resnet18(num_classes=10), "bkn", transition="analytic", group_size=2)
    fresh.load_state_dict(model.state_dict())
    _same_training_output(model, fresh)


def test_averaged_model_of_a_converted_model():
    torch.manual_seed(0)
    model = bkn.convert(resnet18(num_classes=10), "bkn", transition="analytic", group_size=2)
    _step(model)
    swa = AveragedModel(model)  # deep-copies the model
    swa.update_parameters(model)  # the first update copies the weights
    for p in model.parameters():
        p.data.add_(0.01)
    swa.update_parameters(model)
    avg = dict(swa.module.named_parameters())
    for name, p in model.named_parameters():  # two models averaged: the first copy and the shifted one
        torch.testing.assert_close(avg[name], p.detach() - 0.005, rtol=1e-5, atol=1e-6)
    _assert_independent_copy(model, swa.module)
