"""bkn.probes.stats: population statistics (the contract), drift metrics, the synthetic chain, the recorder."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats
from torch import nn

import bkn
from bkn.models import cifar_resnet
from bkn.probes.stats import (
    DriftRecorder,
    LinearGaussianChain,
    channel_metrics,
    output_discrepancy,
    population_statistics,
    running_estimate_rows,
    summarize,
    use_population_statistics,
)
from bkn.probes.stats.pooled_moments import PooledMoments, pool_over_groups
from bkn.probes.stats.synthetic import _grouped

pytestmark = pytest.mark.usefixtures("one_thread")


# -- population statistics --------------------------------------------------------------


def _perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affine parameters of every norm, so no layer's population statistics are (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if bkn.probes.stats.is_batch_norm(m) or bkn.probes.stats.is_per_sample_norm(m):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model


def _direct_population(model: nn.Module, layers: list[tuple[str, nn.Module]], x: torch.Tensor) -> dict:
    """Independent computation: the whole data set as ONE batch, in eval mode, layer by layer.

    Layer k's statistics are torch.var_mean of its input over (N, H, W); before measuring
    layer k+1 they are written into the running buffers (no hooks involved).
    """
    model = copy.deepcopy(model).eval()
    modules = dict(model.named_modules())
    out = {}
    for name, _ in layers:
        layer, captured = modules[name], {}
        handle = layer.register_forward_hook(lambda mod, args, output: captured.setdefault("x", args[0]))
        with torch.no_grad():
            model(x)
        handle.remove()
        xin = captured["x"].double()
        var, mean = torch.var_mean(xin, [0] + list(range(2, xin.dim())), correction=0)
        out[name] = (mean, var)
        with torch.no_grad():
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
            if hasattr(layer, "sync_running_std"):
                layer.sync_running_std()
    return out


@pytest.mark.parametrize(
    "norm, options",
    [
        ("bn", {}),
        ("bn", {"group_size": 2}),
        ("bkn", {"group_size": 2, "transition": "official"}),
        ("bkn", {"group_size": 4, "transition": "analytic", "gain": "adaptive"}),
        ("brn", {"rmax": 3.0, "dmax": 5.0}),
    ],
)
def test_population_statistics_equal_a_direct_full_dataset_computation(norm, options):
    model = _perturb(cifar_resnet(8, norm, **options))
    x = torch.randn(40, 3, 12, 12) * 1.5 + 0.7
    names = {m: n for n, m in model.named_modules()}
    layers = [(names[m], m) for m in model.norm_layers()]
    got = population_statistics(model, list(x.split(16)))  # batches of 16, 16, 8
    want = _direct_population(model, layers, x)
    assert list(got) == [n for n, _ in layers]  # every layer, in execution order
    for name in want:
        torch.testing.assert_close(got[name][0], want[name][0], rtol=0, atol=1e-9 * (1 + want[name][1].max()))
        torch.testing.assert_close(got[name][1], want[name][1], rtol=1e-9, atol=1e-12)


def test_population_statistics_of_a_converted_torchvision_style_model():
    torch.manual_seed(1)
    base = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 6),
        nn.BatchNorm1d(6),
    )
    model = _perturb(bkn.convert(base, "bkn", group_size=2, transition="analytic"))
    x = torch.randn(30, 3, 9, 9) - 2.0
    layers = [(n, m) for n, m in model.named_modules() if bkn.probes.stats.is_batch_norm(m)]
    got = population_statistics(model, (b for b in x.split(7)))  # a one-shot generator is fine too
    want = _direct_population(model, layers, x)
    assert list(got) == ["1", "4", "9"]
    for name in want:
        torch.testing.assert_close(got[name][1], want[name][1], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got[name][0], want[name][0], rtol=1e-9, atol=1e-9)


def test_population_statistics_leave_the_model_unchanged():
    model = _perturb(cifar_resnet(8, "brn", rmax=2.0, dmax=1.0)).train()
    model.blocks[0].eval()
    before = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    population_statistics(model, [torch.randn(8, 3, 8, 8), (torch.randn(8, 3, 8, 8), torch.zeros(8))])
    assert [m.training for m in model.modules()] == flags
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_use_population_statistics_makes_eval_mode_normalize_with_them():
    model = _perturb(cifar_resnet(8, "brn", rmax=3.0, dmax=5.0))
    x = torch.randn(24, 3, 8, 8) * 3
    stats = population_statistics(model, [x[:12], x[12:]])
    use_population_statistics(model, stats)
    for name, module in model.named_modules():
        if name in stats:
            torch.testing.assert_close(module.running_mean, stats[name][0].float())
            torch.testing.assert_close(module.running_std**2 - module.eps, stats[name][1].float())
    # Eval mode now reproduces the population-mode network: a second computation from the
    # running estimates (eval mode, no hooks) gives the same statistics.
    again = _direct_population(model, [(n, dict(model.named_modules())[n]) for n in stats], x)
    for name in stats:
        torch.testing.assert_close(again[name][1], stats[name][1], rtol=1e-5, atol=1e-6)


def test_population_statistics_per_sample_norms_match_the_closed_form_on_the_chain():
    chain = LinearGaussianChain(width=8, depth=3, seed=3)
    for norm in ("gn", "ln"):
        model = bkn.convert(chain.model(), norm)
        truth = chain.population_statistics(model)
        g = torch.Generator().manual_seed(0)
        got = population_statistics(model, [chain.sample(4000, g) for _ in range(4)], per_sample=True)
        assert list(got) == list(truth)
        for name in truth:
            z = (got[name][0] - truth[name][0]) / truth[name][1].sqrt()
            assert z.abs().max() < 0.01, (norm, name)
            assert (got[name][1] / truth[name][1]).log().abs().max() < 0.02, (norm, name)
        # and per_sample=False leaves GN/LN out, as the contract says
        with pytest.raises(ValueError, match="no normalization layers with batch statistics"):
            population_statistics(model, [chain.sample(8, g)])


def test_population_statistics_closed_form_chain_matches_a_large_sample():
    chain = LinearGaussianChain(width=16, depth=4, seed=1)
    model = chain.model()
    truth = chain.population_statistics(model)
    g = torch.Generator().manual_seed(0)
    got = population_statistics(model, [chain.sample(4000, g) for _ in range(4)])
    for name in truth:
        assert ((got[name][0] - truth[name][0]) / truth[name][1].sqrt()).abs().max() < 0.01
        assert (got[name][1] / truth[name][1]).log().abs().max() < 0.02


def test_population_statistics_errors():
    with pytest.raises(ValueError, match="has no normalization layers"):
        population_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), [torch.randn(2, 3, 5, 5)])
    model = cifar_resnet(8, "bn")
    with pytest.raises(ValueError, match="no batches"):
        population_statistics(model, [])
    with pytest.raises(ValueError, match="must be a tensor"):
        population_statistics(model, [{"x": torch.randn(2, 3, 8, 8)}])
    stats = population_statistics(model, [torch.randn(4, 3, 8, 8)])
    with pytest.raises(ValueError, match="no module named 'nope'"):
        use_population_statistics(model, {"nope": stats["norm0"]})
    with pytest.raises(ValueError, match="must have shape"):
        use_population_statistics(model, {"norm0": (torch.zeros(3), torch.ones(3))})
    gn = cifar_resnet(8, "gn")
    with pytest.raises(ValueError, match="keeps no running estimates"):
        use_population_statistics(gn, {"norm0": stats["norm0"]})


@pytest.mark.parametrize("shape", [(5, 3, 4, 2), (7, 3)])
def test_pooled_moments_match_numpy_where_a_one_pass_formula_cancels(rng, shape):
    """|mean| = 1e8 >> std = 1: sum(x^2)/n - mean^2 loses every digit; the shifted sums do not."""
    channel_means = 1e8 + np.arange(3) * 1e6
    view = (1, 3) + (1,) * (len(shape) - 2)
    batches = [rng.standard_normal((n,) + shape[1:]) + channel_means.reshape(view) for n in (shape[0], 1, 4)]
    acc = PooledMoments()
    for b in batches:
        acc.add(torch.from_numpy(b))
    mean, var = acc.result()
    # numpy, all values of a channel at once (two passes: mean first, then squared deviations)
    values = np.concatenate([np.moveaxis(b, 1, -1).reshape(-1, 3) for b in batches])
    assert acc.count == values.shape[0]
    np.testing.assert_allclose(mean.numpy(), values.mean(0), rtol=1e-14)
    np.testing.assert_allclose(var.numpy(), values.var(0), rtol=1e-6)
    naive = (values**2).mean(0) - values.mean(0) ** 2
    assert abs(naive - values.var(0)).max() > 1.0  # the data would catch a one-pass accumulator


@pytest.mark.parametrize("norm, groups", [(nn.GroupNorm(3, 6), 3), (nn.GroupNorm(1, 6), 1), (nn.InstanceNorm2d(6), 6)])
def test_pool_over_groups_equals_the_moments_over_each_groups_channels(rng, norm, groups):
    x = torch.from_numpy(
        rng.standard_normal((8, 6, 3, 3)) * rng.uniform(0.5, 2, (1, 6, 1, 1)) + rng.standard_normal((1, 6, 1, 1)) * 3
    )
    var, mean = torch.var_mean(x, [0, 2, 3], correction=0)
    got_mean, got_var = pool_over_groups(norm, mean, var)
    grouped = x.unflatten(1, (groups, 6 // groups))
    want_var, want_mean = torch.var_mean(grouped, [0, 2, 3, 4], correction=0)
    torch.testing.assert_close(got_mean, want_mean.repeat_interleave(6 // groups), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_var, want_var.repeat_interleave(6 // groups), rtol=1e-12, atol=1e-12)
    # the synthetic chain's closed form pools the same way, in numpy
    np_mean, np_var = _grouped(norm, mean.numpy(), var.numpy())
    np.testing.assert_allclose(np_mean, got_mean.numpy(), rtol=1e-14)
    np.testing.assert_allclose(np_var, got_var.numpy(), rtol=1e-14)


# -- metrics ------------------------------------------------------------------------------


def test_channel_metrics_against_numerical_integration():
    m, v, mh, vh = 0.3, 2.0, -0.4, 0.7
    got = channel_metrics(torch.tensor([mh]), torch.tensor([vh]), torch.tensor([m]), torch.tensor([v]))
    p, q = stats.norm(m, math.sqrt(v)), stats.norm(mh, math.sqrt(vh))
    kl, _ = integrate.quad(lambda t: p.pdf(t) * (p.logpdf(t) - q.logpdf(t)), -30, 30)
    assert got["kl"].item() == pytest.approx(kl, rel=1e-7)
    assert got["mean_error"].item() == pytest.approx(0.7 / math.sqrt(2.0))
    assert got["var_logratio"].item() == pytest.approx(abs(math.log(0.7 / 2.0)))
    # eps is added to both variances: a dead channel (v = 0) gives a finite error
    zero = torch.tensor([0.0])
    dead = channel_metrics(zero, zero, zero, zero, 1e-5)
    assert all(float(t) == 0.0 for t in dead.values())


def test_output_discrepancy_and_summarize_against_numpy(rng):
    y, y_pop = rng.standard_normal((6, 3, 4, 5)), rng.standard_normal((6, 3, 4, 5))
    got = output_discrepancy(torch.from_numpy(y), torch.from_numpy(y_pop), groups=3).numpy()
    for g in range(3):
        for c in range(3):
            a, b = y[2 * g : 2 * g + 2, c], y_pop[2 * g : 2 * g + 2, c]
            assert got[g, c] == pytest.approx(((a - b) ** 2).sum() / (b**2).sum())
    values = rng.standard_normal(1001)
    assert summarize(torch.from_numpy(values)) == pytest.approx(
        {"median": np.median(values), "p90": np.quantile(values, 0.9)}
    )
    assert summarize([np.array([1.0, 2.0]), np.array([3.0, np.inf])])["p90"] == math.inf
    assert math.isnan(summarize(np.array([1.0, np.nan]))["median"])
    with pytest.raises(ValueError, match="groups must divide"):
        output_discrepancy(torch.zeros(5, 2), torch.zeros(5, 2), groups=2)


# -- recorder -------------------------------------------------------------------------------


def test_recorder_reads_batch_statistics_of_bn_and_matches_the_floor_at_depth_0():
    """At the first layer, BN's training-mode estimate IS the floor (same input, same groups)."""
    chain = LinearGaussianChain(width=8, depth=3, seed=0)
    truth = chain.population_statistics()
    x = chain.sample(16, torch.Generator().manual_seed(0))
    bn = bkn.convert(chain.model(), "bn", group_size=4).train()
    floor = use_population_statistics(chain.model(), truth).eval()
    with DriftRecorder(bn, truth, group_size=4) as rec_bn, torch.no_grad():
        bn(x)
    with DriftRecorder(floor, truth, group_size=4, mode="floor") as rec_floor, torch.no_grad():
        floor(x)
    for metric in ("mean_error", "var_logratio", "kl", "output_discrepancy"):
        torch.testing.assert_close(
            rec_bn.values["norm0"][metric][0], rec_floor.values["norm0"][metric][0], rtol=1e-4, atol=1e-6
        )
    # depth >= 1 of a linear chain: the group mean after a batch-normalizing layer is W beta + b, exact
    assert rec_bn.values["norm1"]["mean_error"][0].max() < 1e-4
    rows = rec_bn.rows()
    decomposed = {f"{p}_{k}" for p in ("mean", "var") for k in ("rmse", "bias", "noise", "signed_bias")}
    assert {r["metric"] for r in rows} == {"mean_error", "var_logratio", "kl", "output_discrepancy"} | decomposed
    # the decomposition's rmse is the root mean square of the signed errors whose absolute values mean_error holds
    rmse = next(r["value"] for r in rows if r["layer"] == "norm0" and r["metric"] == "mean_rmse")
    assert rmse == pytest.approx(float(rec_bn.values["norm0"]["mean_error"][0].square().mean().sqrt()), rel=1e-9)
    assert {(r["layer"], r["depth"]) for r in rows} == {("norm0", 0), ("norm1", 1), ("norm2", 2)}


def test_running_estimates_with_small_momentum_converge_to_the_population():
    """EMA of batch statistics (momentum 0.01, 3000 steps) -> the population statistics.

    At the first layer the running mean averages unbiased estimates of the population mean,
    and the running variance (torch's n/(n-1) correction) unbiased estimates of its variance.
    """
    chain = LinearGaussianChain(width=8, depth=2, seed=2)
    truth = chain.population_statistics()
    model = bkn.convert(chain.model(), "bn", group_size=8)
    for m in model.modules():
        if bkn.probes.stats.is_batch_norm(m):
            m.momentum = 0.01
    g = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3000):
            model(chain.sample(8, g))
    rows = {(r["layer"], r["metric"], r["statistic"]): r["value"] for r in running_estimate_rows(model, truth)}
    # EMA noise: sd of the mean error ~ sqrt(0.01 / 2 / (8 * 16)) = 0.006; bias 0.99^3000 ~ 0
    assert rows[("norm0", "mean_error", "p90")] < 0.03
    assert rows[("norm0", "var_logratio", "p90")] < 0.05
    # with momentum 0.1 (torch's default) the estimate is an order of magnitude noisier
    assert rows[("norm0", "kl", "median")] < 1e-3


@settings(max_examples=8)
@given(cuts=st.lists(st.integers(1, 29), min_size=0, max_size=4, unique=True), shift=st.floats(-50, 50))
def test_population_statistics_do_not_depend_on_how_the_data_is_batched(cuts, shift):
    """Pooled sums: any split of the evaluation set into batches gives the one-batch statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3))
    _perturb(model).double()  # float64 forwards: in float32 the forward's own rounding (x ~ 50 std) shows
    x = torch.randn(30, 2, 6, 6, dtype=torch.float64) * 0.1 + shift  # |mean| >> std: sums must not cancel
    edges = [0] + sorted(cuts) + [30]
    batches = [x[a:b] for a, b in zip(edges, edges[1:])]
    got = population_statistics(model, batches)
    want = population_statistics(model, [x])
    for name in want:
        torch.testing.assert_close(got[name][0], want[name][0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[name][1], want[name][1], rtol=1e-8, atol=1e-14)
