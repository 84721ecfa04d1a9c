"""Ablations of the official transition (docs/design.md §4), each its own transition and registry method name.

* ``official-affine``: the surrogate is drawn from the previous layer's output distribution,
  ``gamma * z * sqrt(v / (v + eps)) + beta``, instead of ``z * sqrt(v) + m``;
* ``official-relu-shortcut``: the CIFAR ResNet's first shortcut adds the moments of the
  surrogate of ``relu(norm0)`` instead of ``norm0``'s pre-normalization posterior;
* ``draws``: Monte-Carlo draws per group, reachable from ``bkn.convert`` and ``cifar_resnet``.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

import bkn
from bkn import methods, norms, transitions
from bkn.layers import kalman
from bkn.models import cifar_resnet
from bkn.models.cifar_resnet import _Chain
from bkn.transitions import Analytic, MonteCarlo
from bkn.transitions.analytic import relu_moments

Z = 5.0  # tolerance in Monte-Carlo standard errors
DRAWS = 4000


def _layer_with_posterior(c=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    layer = bkn.BatchKalmanNorm2d(c, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(0.5 + torch.rand(c, generator=g, dtype=dtype))
        layer.bias.copy_(torch.randn(c, generator=g, dtype=dtype))
    mean = torch.randn(2, c, generator=g, dtype=dtype)
    var = 0.5 + torch.rand(2, c, generator=g, dtype=dtype)
    layer.posterior = (mean, var)
    return layer


def test_transition_names_agree_between_the_layer_and_the_transitions():
    assert transitions.NAMES == kalman.TRANSITIONS
    assert tuple(transitions.MONTE_CARLO) == kalman.MONTE_CARLO_TRANSITIONS
    for name in transitions.MONTE_CARLO:
        t = transitions.get(name, draws=3)
        assert isinstance(t, MonteCarlo) and t.name == name and t.draws == 3


def test_affine_surrogate_is_the_previous_layers_output_distribution():
    layer = _layer_with_posterior()
    mean, var = layer.posterior
    spatial = (4, 5)
    affine = MonteCarlo(draws=2, generator=torch.Generator().manual_seed(7), affine=True)
    official = MonteCarlo(draws=2, generator=torch.Generator().manual_seed(7))
    z = torch.randn((4, 3, *spatial), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    z = z.view(2, 2, 3, *spatial)
    view = (2, 1, 3, 1, 1)
    gamma, beta = layer.weight.view(1, 1, 3, 1, 1), layer.bias.view(1, 1, 3, 1, 1)
    expected_affine = gamma * z * (var / (var + layer.eps)).sqrt().view(view) + beta
    expected_official = z * var.sqrt().view(view) + mean.view(view)
    got = affine.after_norm(layer, spatial)
    torch.testing.assert_close(got.value, expected_affine.reshape(4, 3, *spatial), rtol=1e-12, atol=1e-12)
    got = official.after_norm(layer, spatial)
    torch.testing.assert_close(got.value, expected_official.reshape(4, 3, *spatial), rtol=1e-12, atol=1e-12)
    # The input of a layer (a residual stream it read) is its posterior in every variant.
    at_input = MonteCarlo(draws=2, generator=torch.Generator().manual_seed(7), affine=True).at_input(layer, spatial)
    torch.testing.assert_close(at_input.value, expected_official.reshape(4, 3, *spatial), rtol=1e-12, atol=1e-12)
    moments = Analytic().at_input(layer, spatial)
    assert torch.equal(moments.mean, mean) and torch.equal(moments.var, var)


def test_a_generator_on_the_activations_device_draws_the_surrogate_itself():
    """The CPU behaviour is unchanged: the given CPU generator draws z directly, bit for bit."""
    layer = _layer_with_posterior()
    gen, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    got = MonteCarlo(draws=2, generator=gen).after_norm(layer, (4, 5))
    z = torch.randn((4, 3, 4, 5), generator=ref, dtype=torch.float64)
    mean, var = layer.posterior
    view = (2, 1, 3, 1, 1)
    expected = z.view(2, 2, 3, 4, 5) * var.sqrt().view(view) + mean.view(view)
    torch.testing.assert_close(got.value, expected.reshape(4, 3, 4, 5), rtol=1e-12, atol=1e-12)
    assert torch.equal(gen.get_state(), ref.get_state())


def test_a_generator_on_another_device_seeds_that_devices_draws():
    """A CPU generator with activations elsewhere (``meta`` here, CUDA in tests/test_cuda.py): torch
    refuses to draw on one device with another's generator, so each draw takes one seed from it."""
    layer = _layer_with_posterior().to("meta")
    layer.posterior = tuple(t.to("meta") for t in layer.posterior)
    gen, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    mc = MonteCarlo(draws=2, generator=gen)
    for _ in range(2):
        got = mc.after_norm(layer, (4, 5))
        assert got.value.device.type == "meta" and got.value.shape == (4, 3, 4, 5) and got.draws == 2
        torch.randint(0, 2**62, (), generator=ref)  # one seed per draw, from the given stream
        assert torch.equal(gen.get_state(), ref.get_state())
    # The transition still copies and pickles (chains hold it).
    assert copy.deepcopy(mc).generator.initial_seed() == 3
    assert pickle.loads(pickle.dumps(mc)).draws == 2


def _plain_chain():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=0),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=0),
        nn.BatchNorm2d(5),
    ).double()


def _priors(transition, draws=1, seed=0):
    torch.manual_seed(seed)
    model = bkn.convert(_plain_chain(), "bkn", transition=transition, draws=draws, p=0.5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, bkn.BatchKalmanNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
    seen = {}
    layer = model[4]
    layer.register_forward_pre_hook(lambda m, args: seen.update(prior=m.prior_provider()))
    with torch.no_grad():
        model(torch.randn(4, 3, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    return model, seen["prior"]


def test_chain_official_affine_is_the_monte_carlo_of_the_analytic_rules():
    """With many draws the affine surrogate through ReLU and the convolution gives the analytic prior
    (within Monte-Carlo error); the faithful official prior (gamma/beta skipped) does not."""
    model, (got_m, got_v) = _priors("official-affine", draws=DRAWS)
    a = Analytic()
    expected = a.conv(model[3], a.relu(a.after_norm(model[1], (8, 8))))
    n_eff = DRAWS * math.ceil(6 / 3) ** 2  # 6x6 outputs of a 3x3 conv: about 2x2 independent positions
    se_m = (expected.var / n_eff).sqrt()
    se_v = expected.var * math.sqrt(2 * 2 / n_eff)
    assert torch.all((got_m - expected.mean).abs() < Z * se_m), (got_m, expected.mean)
    assert torch.all((got_v - expected.var).abs() < Z * se_v), (got_v, expected.var)
    _, (official_m, _) = _priors("official", draws=DRAWS)
    assert (official_m - expected.mean).abs().max() > 20 * se_m.max()


def test_draws_reach_the_chain_of_convert_and_the_cifar_resnet(monkeypatch):
    sizes = []
    original = MonteCarlo._draw

    def spy(self, mean, scale, shift, spatial):
        sample = original(self, mean, scale, shift, spatial)
        sizes.append(sample.value.shape[0] // mean.shape[0])  # draws per group
        return sample

    monkeypatch.setattr(MonteCarlo, "_draw", spy)
    model = bkn.convert(_plain_chain(), "bkn", transition="official", draws=3, group_size=2)
    assert model._bkn_chain.transition.draws == 3 and model[1].draws == 3
    model(torch.randn(4, 3, 8, 8, dtype=torch.float64))
    assert sizes and set(sizes) == {3}
    sizes.clear()
    net = cifar_resnet(8, "bkn", transition="official-affine", draws=5, group_size=2)
    net.train()(torch.randn(4, 3, 8, 8))
    assert sizes and set(sizes) == {5}
    assert "draws=5" in repr(net.norm0)


@pytest.mark.parametrize("transition", ["analytic", "identity"])
def test_draws_without_monte_carlo_is_refused(transition):
    with pytest.raises(ValueError, match="draws=4 needs a Monte-Carlo transition"):
        norms.create("bkn", 4, transition=transition, draws=4)
    with pytest.raises(ValueError, match="draws=4 needs a Monte-Carlo transition"):
        bkn.convert(_plain_chain(), "bkn", transition=transition, draws=4)
    with pytest.raises(ValueError, match="draws=4 needs a Monte-Carlo transition"):
        cifar_resnet(8, "bkn", transition=transition, draws=4)
    with pytest.raises(ValueError, match="draws must be an int >= 1"):
        norms.create("bkn", 4, draws=0)


def test_first_shortcut_source_per_transition():
    """official: norm0's pre-normalization posterior, exactly; official-relu-shortcut: the moments of the
    surrogate relu(z * sqrt(v) + m) (rectified-Gaussian moments of the posterior, within Monte-Carlo
    error); analytic: the rectified moments of norm0's normalized-and-affine output."""
    layer = _layer_with_posterior()
    mean, var = layer.posterior
    l = torch.zeros(4, 3, 6, 6, dtype=torch.float64)
    official = _Chain("official").block_input(None, layer, l)
    assert torch.equal(official.mean, mean) and torch.equal(official.var, var)
    torch.manual_seed(0)
    relu = _Chain("official-relu-shortcut", draws=DRAWS).block_input(None, layer, l)
    exp_m, exp_v = relu_moments(mean, var)
    n = DRAWS * 36
    assert torch.all((relu.mean - exp_m).abs() < Z * (exp_v / n).sqrt())
    assert torch.all((relu.var - exp_v).abs() < Z * exp_v * math.sqrt(3 / n))
    assert (relu.mean - mean).abs().max() > 0.05  # a different source than the official one
    a = Analytic()
    analytic = _Chain("analytic").block_input(None, layer, l)
    expected = a.relu(a.after_norm(layer, (6, 6)))
    torch.testing.assert_close(analytic.mean, expected.mean)
    torch.testing.assert_close(analytic.var, expected.var)


def test_relu_shortcut_changes_only_the_cifar_resnet_and_equals_official_in_converted_models():
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    outs = {}
    for transition in ("official", "official-relu-shortcut"):
        torch.manual_seed(0)
        model = bkn.convert(cifar_resnet(8, "bn"), "bkn", transition=transition, group_size=2)
        torch.manual_seed(1)
        outs[transition] = model.train()(x)
    assert torch.equal(outs["official"], outs["official-relu-shortcut"])  # the traced graph decides there
    for transition in ("official", "official-relu-shortcut"):
        torch.manual_seed(0)
        model = cifar_resnet(8, "bkn", transition=transition, group_size=2)
        torch.manual_seed(1)
        outs[transition] = model.train()(x)
    assert not torch.equal(outs["official"], outs["official-relu-shortcut"])


@pytest.mark.parametrize("name", ["bkn-official-affine", "bkn-official-relu-shortcut"])
def test_ablation_methods_flow_through_the_registry_and_the_probes(name):
    from bkn.probes.drift import methods as drift_methods
    from bkn.probes.training.runs import TrainConfig, make_model

    method = methods.get(name)
    assert method.options["transition"] == name.removeprefix("bkn-")
    names = methods.names()
    assert names.index(name) == names.index("bkn-official") + 1 + ["-adaptive", "-affine", "-relu-shortcut"].index(
        name.removeprefix("bkn-official")
    )
    assert drift_methods.resolve([name, name + "-ema"]) == [name, name + "-ema"]
    config = TrainConfig(
        method=name, group_size=2, batch_size=4, data="digits", network="cifar-resnet", depth=8, width=4
    )
    model = make_model(config, in_channels=1, num_classes=3, total_steps=10)
    assert model.transition == name.removeprefix("bkn-")
    out = model.train()(torch.randn(4, 1, 8, 8))
    assert all(layer.prior_used for layer in model.norm_layers()[1:])
    assert out.shape == (4, 3)
