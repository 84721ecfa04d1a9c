"""The drift probe's decomposition, isolation mode, end-to-end rows, the residual chain's floor, its progress."""

from __future__ import annotations

import functools
import io

import numpy as np
import pandas as pd
import pytest
import torch
from drift_fixtures import synthetic_rows
from torch import nn

from bkn.probes.data import digits_dataset
from bkn.probes.drift import units
from bkn.probes.drift.progress import Progress
from bkn.probes.stats import population_statistics
from bkn.probes.stats.metrics import decompose, signed_errors
from bkn.probes.stats.residual_chain import ResidualGaussianChain

pytestmark = pytest.mark.usefixtures("one_thread")

GROUP_ONLY = ("bn", "bkn-official", "bkn-official-adaptive", "bkn-analytic", "bkn-analytic-adaptive")


# -- bias + noise -----------------------------------------------------------------------------


def test_bias_and_noise_decompose_the_mean_squared_error():
    """mse = bias^2 + noise^2, against a direct numpy computation on a small case."""
    rng = np.random.default_rng(0)
    steps = [rng.normal(0.3, 0.5, size=(3, 4)) + np.arange(4) * 0.1 for _ in range(5)]  # 5 forwards x (G=3, C=4)
    parts = decompose([torch.from_numpy(e) for e in steps])
    e = np.concatenate(steps)  # (15, 4): every group of every forward
    bias_c = e.mean(0)
    noise_c = e.std(0)  # population std over groups (ddof 0)
    assert parts["bias"] == pytest.approx(np.sqrt(np.mean(bias_c**2)), rel=1e-12)
    assert parts["noise"] == pytest.approx(np.sqrt(np.mean(noise_c**2)), rel=1e-12)
    assert parts["rmse"] == pytest.approx(np.sqrt(np.mean(e**2)), rel=1e-12)
    assert parts["rmse"] ** 2 == pytest.approx(parts["bias"] ** 2 + parts["noise"] ** 2, rel=1e-12)
    assert parts["signed_bias"] == pytest.approx(bias_c.mean(), rel=1e-12)
    # signed errors are in population sigma (mean) and relative (variance), with the layer's eps
    m, v = torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.25])
    em, ev = signed_errors(torch.tensor([[2.0, -2.5]]), torch.tensor([[5.0, 0.5]]), m, v, eps=0.0)
    torch.testing.assert_close(em, torch.tensor([[0.5, -1.0]], dtype=torch.float64))
    torch.testing.assert_close(ev, torch.tensor([[0.25, 1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="no values"):
        decompose([torch.zeros(0, 3)])


# -- the residual chain: truth and floor --------------------------------------------------------


def test_residual_chain_population_statistics_match_a_large_sample():
    chain = ResidualGaussianChain(width=6, depth=4, spatial=(4, 4), subsample_after=(1,), seed=2)
    model = chain.model()
    truth = chain.population_statistics(model)
    gen = torch.Generator().manual_seed(0)
    measured = population_statistics(model, [chain.sample(2048, gen) for _ in range(4)])
    for name, (mean, var) in truth.items():
        m, v = measured[name]
        # 8192 samples; the random effect (rho = 0.2) makes the samples' positions correlated
        assert ((m - mean).abs() / var.sqrt()).max() < 0.04, name
        assert ((v / var) - 1).abs().max() < 0.06, name


def test_residual_chain_floor_against_direct_formulas():
    chain = ResidualGaussianChain(width=5, depth=3, spatial=(4, 4), seed=1)
    sigma = torch.from_numpy(chain.params["sigma0"])
    n, positions = 3, 16
    floor = chain.floor(n)
    v = chain.variances(sigma)
    # mean: the grand mean's variance, Sigma_cc (rho + (1 - rho) / P) / n, in population variances
    expected = torch.diagonal(sigma) * (chain.rho + (1 - chain.rho) / positions) / n
    for k in range(3):
        torch.testing.assert_close(floor[f"norm{k}"][0], expected / (v[k] + chain.eps))
    # variance at layer 0: v_0 = diag(Sigma) -> G = e_c e_c^T -> CRB = 2 Sigma_cc^2 / (nP - 1)
    crb0 = 2 * torch.diagonal(sigma) ** 2 / (n * positions - 1)
    torch.testing.assert_close(floor["norm0"][1], crb0 / (v[0] + chain.eps) ** 2)
    # deeper: the gradient jacrev takes equals a central finite difference of the closed form
    direction = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    direction = direction + direction.T
    h = 1e-6
    fd = (chain.variances(sigma + h * direction) - chain.variances(sigma - h * direction)) / (2 * h)
    jac = torch.func.jacrev(chain.variances)(sigma)
    torch.testing.assert_close((jac * direction).sum((-1, -2)), fd, rtol=1e-6, atol=1e-8)
    # the closed form of the BN model's population variances is what chain.variances computes
    truth = chain.population_statistics()
    torch.testing.assert_close(torch.stack([truth[f"norm{k}"][1] for k in range(3)]), v)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        chain.floor(0)


_synthetic = functools.partial(synthetic_rows, steps=16, burn_in=2)  # more steps: the floor test's tolerance


def test_no_method_beats_the_floor_and_bn_reaches_it_only_at_the_input_layer():
    """Every method whose statistics come from its group alone (BN and every BKN) stays at or above the floor
    at every layer and group size, within Monte-Carlo tolerance; BN's mean error equals the floor's at the
    input layer (same estimate) and grows with depth (fewer, subsampled positions)."""
    frame = _synthetic(list(GROUP_ONLY) + ["brn", "floor"], [2, 8])
    frame = frame[frame["metric"].isin(["mean_rmse", "var_rmse"])]
    floor = frame[frame["method"] == "floor"].set_index(["group_size", "depth", "metric"])["value"]
    ratios = frame[frame["method"] != "floor"].assign(
        ratio=lambda f: (
            f["value"].to_numpy() / floor.loc[list(zip(f["group_size"], f["depth"], f["metric"]))].to_numpy()
        )
    )
    group_only = ratios[ratios["method"].isin(GROUP_ONLY)]
    # mean: the floor is computed on the same micro-batches (common random numbers): tight tolerance;
    # variance: a closed-form bound against a Monte-Carlo rmse over 16-128 groups: looser
    mean, var = group_only[group_only["metric"] == "mean_rmse"], group_only[group_only["metric"] == "var_rmse"]
    assert mean["ratio"].min() > 0.97, mean.nsmallest(3, "ratio")
    assert var["ratio"].min() > 0.8, var.nsmallest(3, "ratio")
    bn = mean[mean["method"] == "bn"].set_index(["group_size", "depth"])["ratio"]
    for n in (2, 8):
        assert bn[(n, 0)] == pytest.approx(1.0, rel=1e-3)
        assert bn[(n, 7)] > 1.2 and bn[(n, 7)] > bn[(n, 3)] > bn[(n, 0)]
    # The floor bounds estimators that see only the group. BRN does not: its effective statistics are its
    # moving averages over earlier batches whenever r and d are not clipped, and at the input layer they
    # beat every one-group estimate. The test says so rather than hiding it.
    brn = ratios[(ratios["method"] == "brn") & (ratios["metric"] == "mean_rmse") & (ratios["depth"] == 0)]
    assert brn["ratio"].max() < 0.9


# -- isolation mode and end-to-end rows ---------------------------------------------------------


class Oracle(nn.BatchNorm2d):
    """A fake method: normalizes with statistics it is handed (population + a planted offset) and reports them."""

    def set(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.fixed = (mean.float(), var.float())

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        mean, var = self.fixed
        self.last_stats = (mean.double().expand(1, -1), var.double().expand(1, -1))
        return nn.functional.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)


def _oracle_chain(offset: float):
    chain = ResidualGaussianChain(width=4, depth=4, spatial=(4, 4), subsample_after=(1,), seed=0)
    model = chain.model()
    truth = chain.population_statistics(model)
    for k in range(4):
        bn = getattr(model, f"norm{k}")
        oracle = Oracle(4)
        oracle.load_state_dict(bn.state_dict())
        mean, var = truth[f"norm{k}"]
        oracle.set(mean + (offset * var.sqrt() if k == 0 else 0.0), var)
        setattr(model, f"norm{k}", oracle)
    return chain, model.train(), truth


def _unit(model, source, truth, mode, n=2):
    rows = units.batch_unit(model, "oracle", source, truth, n, 0, units.Passes(2, 4, 8), {"oracle"}, mode)
    frame = pd.DataFrame(rows)
    return frame.set_index(["layer", "metric", "statistic"])["value"]


def test_isolation_mode_leaves_only_each_layers_own_error():
    """A method whose estimate is the population statistics has zero error at every layer in isolation mode,
    even when an upstream layer is planted with an error; in network, that error reaches the later layers'
    inputs (input drift) and outputs."""
    chain, model, truth = _oracle_chain(offset=0.3)
    isolated = _unit(model, chain, truth, "isolation")
    assert isolated[("norm0", "mean_rmse", "rms")] == pytest.approx(0.3, rel=1e-4)  # the planted error itself
    for k in (1, 2, 3):
        for metric, statistic in (("mean_rmse", "rms"), ("var_rmse", "rms"), ("output_discrepancy", "p90")):
            assert isolated[(f"norm{k}", metric, statistic)] < 1e-6, (k, metric)
    in_network = _unit(model, chain, truth, "in-network")
    assert in_network[("norm0", "input_mean_drift", "median")] == 0.0  # nothing upstream of the first layer
    for k in (1, 2, 3):
        assert in_network[(f"norm{k}", "mean_rmse", "rms")] < 1e-6  # the estimate is still the truth ...
        assert in_network[(f"norm{k}", "input_mean_drift", "median")] > 0.01  # ... but the input has drifted
    assert in_network[("output", "logit_discrepancy", "overall")] > 1e-3
    # no planted error: nothing drifts anywhere
    chain, model, truth = _oracle_chain(offset=0.0)
    clean = _unit(model, chain, truth, "in-network")
    assert clean.drop(index="output", level="layer").abs().max() < 1e-6
    assert clean[("output", "logit_discrepancy", "overall")] < 1e-10


def _classifier(norm: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), norm, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)
    )


def test_end_to_end_agreement_is_full_when_training_statistics_are_the_population_statistics():
    from bkn import norms

    data = digits_dataset("all", size=8, channels=1, seed=0).head(256)
    oracle_net = _classifier(Oracle(4))
    truth = population_statistics(oracle_net, [x for x, _ in data.batches(64)])
    oracle_net[1].set(*truth["1"])
    rows = units.batch_unit(oracle_net.train(), "oracle", data, truth, 2, 0, units.Passes(1, 4, 16), {"oracle"})
    output = pd.DataFrame(rows).query("layer == 'output'").set_index("metric")["value"]
    assert output["agreement"] == 1.0 and output["logit_discrepancy"] < 1e-12
    assert output["accuracy"] == output["accuracy_population"]
    # the instrument catches the known effect: BN normalizing groups of 2 changes the logits
    bn_net = _classifier(norms.create("bn", 4, group_size=2))
    bn_net.load_state_dict(oracle_net.state_dict(), strict=False)
    rows = units.batch_unit(bn_net.train(), "bn", data, truth, 2, 0, units.Passes(1, 4, 16), {"bn"})
    output = pd.DataFrame(rows).query("layer == 'output'").set_index("metric")["value"]
    assert output["logit_discrepancy"] > 1e-3 and 0 <= output["agreement"] <= 1
    # the metric itself, on known logits
    z_pop = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    values = units.end_to_end(torch.tensor([[0.0, 1.0], [0.0, 2.0]]), z_pop, torch.tensor([0, 1]))
    assert values == {"logit_discrepancy": 2 / 5, "agreement": 0.5, "accuracy": 0.5, "accuracy_population": 1.0}


# -- progress in a CI log -----------------------------------------------------------------------


def test_progress_is_one_line_per_stage_off_a_terminal():
    log = io.StringIO()  # not a TTY, as a CI log
    progress = Progress(total=6, stream=log)
    for stage in ("a", "b"):
        progress.stage(f"stage {stage}")
        step = progress.task("training", 100)
        for _ in range(100):
            step()
        progress.end_task()
        for _ in range(3):
            progress.update()
    progress.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 5 and lines[0].startswith("drift probe [0/6 units") and lines[-1].endswith(": done")
    assert "[3/6 units" in lines[2] and "stage b" in lines[2]


def test_isolation_propagates_bkns_prior_from_the_population_statistics():
    """On the residual chain the analytic transition carries the mean exactly (m_{k+1} = m_k + W beta + b), so
    in isolation - the previous layer's posterior replaced by the truth - BKN-analytic's prior mean is the
    population mean and its posterior mean error is (1 - p) = 0.1 times the observed one, which is BN's on the
    same population-mode inputs. In network its prior comes from the group's own estimates instead."""
    frame = _synthetic(["bn", "bkn-analytic"], [2], steps=4, modes=("isolation", "in-network"))
    rmse = frame[frame["metric"] == "mean_rmse"].pivot_table(index=["mode", "depth"], columns="method", values="value")
    ratio = (rmse["bkn-analytic"] / rmse["bn"]).loc["isolation"]
    assert ratio[0] == pytest.approx(1.0, rel=1e-4)  # no prior at the first layer: BKN is BN there
    np.testing.assert_allclose(ratio.loc[1:].to_numpy(), 0.1, rtol=1e-3)
    assert (rmse["bkn-analytic"] / rmse["bn"]).loc["in-network"].loc[1:].min() > 0.5
