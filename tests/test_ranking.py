"""The ranked table's statistics (analysis.ranking) against scipy and planted data, and the Pareto frontier and
costs (analysis.pareto) on synthetic results."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from analysis import pareto, ranking


def _planted(gap: float, seeds: int = 10, methods: int = 6, noise: float = 0.5, rng_seed: int = 0) -> pd.DataFrame:
    """Accuracies (points) of ``methods`` methods over ``seeds`` seeds: m0 is ``gap`` above the rest, which are
    equal; every seed shifts all methods alike (the shared initialization and data order), plus noise."""
    rng = np.random.default_rng(rng_seed)
    seed_effect = rng.normal(0, 1.0, seeds)
    rows = []
    for m in range(methods):
        for s in range(seeds):
            value = 92.0 + (gap if m == 0 else 0.0) + seed_effect[s] + rng.normal(0, noise)
            rows.append({"method": f"m{m}", "seed": s, "value": value})
    return pd.DataFrame(rows)


def test_paired_t_is_scipys_ttest_rel():
    rng = np.random.default_rng(1)
    for n in (2, 3, 5, 10, 30):
        a, b = rng.normal(0, 1, n), rng.normal(0.3, 1, n)
        diff, t, p, count = ranking.paired_t(a, b)
        want = stats.ttest_rel(a, b)
        assert count == n and diff == pytest.approx(np.mean(a - b))
        assert t == pytest.approx(want.statistic, rel=1e-10) and p == pytest.approx(want.pvalue, rel=1e-10)


def test_paired_t_edge_cases():
    assert ranking.paired_t([1.0, 2.0], [1.0, 2.0])[2] == 1.0  # identical: no evidence
    assert ranking.paired_t([2.0, 3.0], [1.0, 2.0])[2] == 0.0  # the same gap every seed
    assert math.isnan(ranking.paired_t([1.0], [0.0])[2])  # one pair: no test
    assert ranking.paired_t([1.0, np.nan, 3.0, 4.0], [0.0, 5.0, 2.5, 2.0])[3] == 3  # NaN pairs dropped
    with pytest.raises(ValueError, match="same length"):
        ranking.paired_t([1.0, 2.0], [1.0])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(1e-6, 1.0), min_size=1, max_size=12), st.floats(0.001, 0.2))
def test_holm_rejects_what_the_step_down_rule_rejects(p_values, alpha):
    """Holm by its definition: reject the i-th smallest p while every p_(j), j <= i, is <= alpha / (K - j + 1)."""
    p = np.array(p_values)
    order = np.argsort(p, kind="mergesort")
    rejected = np.zeros(len(p), dtype=bool)
    for j, index in enumerate(order):
        if p[index] > alpha / (len(p) - j):
            break
        rejected[index] = True
    adjusted = ranking.holm(p)
    assert ((adjusted <= alpha) == rejected).all()
    assert (adjusted >= p).all() and (adjusted <= 1).all()


def test_holm_leaves_untested_pairs_out():
    adjusted = ranking.holm([0.01, math.nan, 0.04])
    assert math.isnan(adjusted[1])
    assert adjusted[0] == pytest.approx(0.02) and adjusted[2] == pytest.approx(0.04)  # K = 2, not 3


def test_a_planted_two_point_gap_over_ten_seeds_is_found():
    table, tests = ranking.ranked(_planted(gap=2.0))
    assert table["method"].iloc[0] == "m0"
    assert table["resolved_next"].iloc[0] is True
    assert table["above"].iloc[0] == [2, 3, 4, 5, 6]
    assert len(tests) == 15  # every pair of 6 methods is one family


@pytest.mark.parametrize("rng_seed", range(5))
def test_equal_methods_are_not_called_different(rng_seed):
    table, tests = ranking.ranked(_planted(gap=0.0, rng_seed=rng_seed))
    assert not tests["significant"].any()
    assert (table["resolved_next"].iloc[:-1] == False).all()  # noqa: E712
    assert table["above"].map(len).sum() == 0


def test_ranked_checks_its_input():
    frame = _planted(gap=1.0)
    with pytest.raises(ValueError, match="duplicates"):
        ranking.ranked(pd.concat([frame, frame]))
    with pytest.raises(ValueError, match="missing"):
        ranking.ranked(frame.drop(columns="seed"))


def test_power_and_seeds_needed():
    # Textbook value: a paired t-test for an effect of one standard deviation at 0.05 with power 0.8 needs 10 pairs.
    assert ranking.seeds_needed(1.0, 1.0, 0.05, 0.8) == 10
    assert ranking.seeds_needed(1.0, 0.5, 0.05, 0.8) > ranking.seeds_needed(1.0, 1.0, 0.05, 0.8)
    assert ranking.seeds_needed(1.0, 1.0, 0.005, 0.8) > 10
    # The noncentral-t power against a simulation of the test itself.
    rng = np.random.default_rng(3)
    n, sd, gap = 6, 0.7, 0.8
    d = rng.normal(gap, sd, (40_000, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    simulated = float((np.abs(t) > stats.t.ppf(0.975, n - 1)).mean())
    assert ranking.power(n, sd, gap, 0.05) == pytest.approx(simulated, abs=0.01)
    smallest = ranking.smallest_gap(n, sd, 0.05)
    assert ranking.power(n, sd, smallest, 0.05) == pytest.approx(ranking.DEFAULT_POWER, abs=1e-6)
    with pytest.raises(ValueError, match="sd > 0"):
        ranking.seeds_needed(0.0)


def test_paired_sd_is_the_pooled_spread_of_differences():
    frame = _planted(gap=0.0, noise=0.5, seeds=40)
    sd, dof = ranking.paired_sd(frame)
    assert dof == 15 * 39
    assert sd == pytest.approx(0.5 * math.sqrt(2), rel=0.1)  # the seed effect cancels in the pairs


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(80, 99)), min_size=1, max_size=10))
def test_frontier_is_what_no_other_point_dominates(points):
    cost = np.array([c for c, _ in points], dtype=float)
    acc = np.array([a for _, a in points], dtype=float)
    mask = pareto.frontier(cost, acc)
    for i, j in itertools.product(range(len(points)), repeat=2):
        if mask[i] and mask[j]:  # frontier points never dominate one another
            assert not (cost[j] <= cost[i] and acc[j] >= acc[i] and (cost[j] < cost[i] or acc[j] > acc[i]))
    for i in np.flatnonzero(~mask):  # every other point is dominated by some point
        assert any(
            cost[j] <= cost[i] and acc[j] >= acc[i] and (cost[j] < cost[i] or acc[j] > acc[i])
            for j in range(len(points))
        )
    cheapest = np.lexsort((-acc, cost))[0]  # the cheapest point (the most accurate of equally cheap ones)
    assert mask[cheapest]


def training_rows(times: dict, accuracy: dict, groups=(2, 32), seeds=(0, 1, 2), batch: int = 32) -> pd.DataFrame:
    """A training-probe frame: per method a step time (s) and an accuracy (fraction), both networks; GN at the
    SGD batch only (the probe's contract for methods without groups)."""
    rows = []
    for network, method, seed in itertools.product(("convnet", "resnet1d"), times, seeds):
        sizes = (batch,) if method == "gn" else groups
        for group in sizes:
            base = {"data": "mnist1d", "network": network, "method": method, "group_size": group, "seed": seed}
            slow = 2.0 if (method == "bn" and group == 2) else 1.0  # BN is slower at group 2 here
            for epoch in (1, 2):
                rows.append({**base, "epoch": epoch, "evaluation": "training", "metric": "step_time_s",
                             "value": times[method] * slow * (1 + 0.01 * epoch)})  # fmt: skip
                rows.append({**base, "epoch": epoch, "evaluation": "running", "metric": "test_acc",
                             "value": accuracy[method] - 0.01 * (2 - epoch) + 0.001 * seed})  # fmt: skip
    return pd.DataFrame(rows)


def test_points_cost_and_frontier_from_the_probes_step_times():
    frame = training_rows(
        {"bn": 0.01, "bkn-analytic": 0.015, "gn": 0.012}, {"bn": 0.9, "bkn-analytic": 0.93, "gn": 0.91}
    )
    table = pareto.points(frame)
    assert set(table["source"]) == {"probe"}
    at = table.set_index(["network", "group_size", "method"])
    assert at.loc[("convnet", 32, "bkn-analytic"), "cost"] == pytest.approx(1.5)
    assert at.loc[("convnet", 2, "bkn-analytic"), "cost"] == pytest.approx(0.75)  # BN is twice as slow at 2
    assert at.loc[("convnet", 2, "gn"), "cost"] == pytest.approx(0.6)  # GN's one run, in every panel
    assert at.loc[("convnet", 32, "gn"), "cost"] == pytest.approx(1.2)
    assert at.loc[("convnet", 32, "gn"), "cost_spread"] == pytest.approx(1.0)
    assert at.loc[("convnet", 2, "bkn-analytic"), "mean"] == pytest.approx(93.1)
    assert at.loc[("convnet", 2, "bkn-analytic"), "sd"] == pytest.approx(0.1)
    # At 32: BN cheapest, BKN most accurate, GN dominated by neither (cheaper than BKN, better than BN).
    assert at.loc[("convnet", 32, "bn"), "on_frontier"] and at.loc[("convnet", 32, "gn"), "on_frontier"]
    # At 2: GN is cheaper than BN; BN is dominated (GN cheaper and more accurate).
    assert not at.loc[("convnet", 2, "bn"), "on_frontier"] and at.loc[("convnet", 2, "gn"), "on_frontier"]
    assert list(table[table["group_size"] == 2]["method"].unique()) == ["bn", "bkn-analytic", "gn"]  # registry order


def _asv(commit: str, costs: dict, groups=(2, 4, 16)) -> pd.DataFrame:
    rows = []
    for method, group in itertools.product(costs, groups):
        rows.append({"benchmark": f"network.{pareto.NETWORK_STEP}", "commit": commit, "status": "ok",
                     "method": method, "group_size": group, "dtype": "float32", "memory_format": "contiguous",
                     "device": "cpu", "value": 0.1 * costs[method]})  # fmt: skip
    return pd.DataFrame(rows)


def test_the_asv_network_step_replaces_the_probes_time_at_its_own_commit_only():
    frame = training_rows(
        {"bn": 0.01, "bkn-analytic": 0.015, "gn": 0.012}, {"bn": 0.9, "bkn-analytic": 0.93, "gn": 0.91}
    )
    commit = "a" * 40
    bench = _asv(commit, {"bn": 1.0, "bkn-analytic": 1.08, "gn": 0.95})
    cost = pareto.relative_cost(frame, bench, commit[:8]).set_index(["network", "group_size", "method"])
    assert cost.loc[("resnet1d", 2, "bkn-analytic"), "cost"] == pytest.approx(1.08)
    assert cost.loc[("resnet1d", 2, "bkn-analytic"), "source"] == "asv"
    assert cost.loc[("resnet1d", 32, "bkn-analytic"), "source"] == "probe"  # the benchmark has no group 32
    other = pareto.relative_cost(frame, bench, "b" * 8)
    assert set(other["source"]) == {"probe"}  # another commit's benchmark is not this run's cost
    dirty = pareto.relative_cost(frame, bench, commit + "+dirty")
    assert set(dirty["source"]) == {"probe"}
    partial = _asv(commit, {"bn": 1.0, "gn": 0.95})  # a method missing: the probe's time for the whole panel
    assert set(pareto.relative_cost(frame, partial, commit)["source"]) == {"probe"}


def test_the_answer_renders_a_decodable_chart_and_the_ranked_tables():
    import base64
    import io

    import matplotlib.image as mpimg

    from analysis.sections.answer import add_answer
    from analysis.sections.base import Section

    frame = training_rows(
        {"bn": 0.01, "bkn-analytic": 0.015, "gn": 0.012}, {"bn": 0.9, "bkn-analytic": 0.93, "gn": 0.91}
    )
    section = Section("training", "Training probe")
    add_answer(section, frame, {"commit": "abc123"}, None)
    kinds = [b["kind"] for b in section.blocks]
    assert kinds[:2] == ["heading", "figure"] and kinds.count("table") == 2  # one ranked table per network
    png = base64.b64decode(section.blocks[1]["src"].split(",", 1)[1])
    image = mpimg.imread(io.BytesIO(png), format="png")
    assert image.shape[0] > 200 and image.shape[1] > 600
    assert "the training probe's own step time" in section.blocks[1]["caption"]
    assert "vary by a factor 1.00" in section.blocks[1]["caption"]  # the planted times are the same every seed
    table = next(b for b in section.blocks if b["kind"] == "table")
    assert "at a group of 2" in table["caption"] and "Holm-corrected over all 3 pairs" in table["caption"]
    assert table["html"].index("BKN analytic") < table["html"].index("GN") < table["html"].index("BN</td>")
    ranked = section.data["ranked_mnist1d_convnet"]
    assert list(ranked["method"]) == ["bkn-analytic", "gn", "bn"]
    # Every seed shifts the methods alike (0.1 point per seed): the paired gaps are exact, so all are resolved.
    assert list(ranked["resolved_next"].iloc[:2]) == [True, True]
    assert {"pareto_points", "ranked_mnist1d_resnet1d_pairs"} <= set(section.data)


def test_one_seed_ranks_without_tests():
    from analysis.sections.answer import add_answer
    from analysis.sections.base import Section

    frame = training_rows({"bn": 0.01, "gn": 0.012}, {"bn": 0.9, "gn": 0.91}, seeds=(0,))
    section = Section("training", "Training probe")
    add_answer(section, frame, {}, None)
    texts = " ".join(b.get("text", "") for b in section.blocks)
    assert "no spread of paired differences" in texts
    assert "resolves 0 of 1 adjacent ranks" in next(b for b in section.blocks if b["kind"] == "table")["caption"]


@pytest.mark.parametrize("network", ["convnet", "resnet1d"])
def test_a_seed_gives_every_training_method_the_same_initial_weights(network):
    """The premise of pairing over seeds: the norms draw nothing, so seed s builds the same convolutions and
    linear head for every method (and the engine's data order depends on the seed alone)."""
    import torch

    from bkn import methods
    from bkn.probes.training.runs import TrainConfig, make_model

    weights = {}
    for method in methods.names(tag="training"):
        config = TrainConfig(method=method, group_size=2, seed=3, network=network)
        torch.manual_seed(config.seed)
        model = make_model(config, in_channels=1, num_classes=10, total_steps=100)
        weights[method] = [
            m.weight.detach().clone() for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Linear))
        ]
    first = weights["bn"]
    assert len(first) >= 4
    for method, own in weights.items():
        assert len(own) == len(first) and all(torch.equal(a, b) for a, b in zip(own, first)), method
