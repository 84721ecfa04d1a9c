"""The measurement kit: bkn.probes.measure (interleaved timer, training step) and bkn.probes.summary_stats.

No real timing is asserted: the timer runs on a fake clock that each callable advances.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

from bkn.probes import measure, summary_stats


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_interleaved_rotates_the_order_and_returns_per_round_samples():
    clock, calls = FakeClock(), []
    cost = {"a": 1.0, "b": 2.0, "c": 4.0}

    def entry(name):
        def fn():
            calls.append(name)
            clock.now += cost[name]

        return fn

    rounds_seen = []
    samples = measure.interleaved(
        {n: entry(n) for n in cost},
        rounds=3,
        per_round={"a": 2, "b": 1, "c": 1},
        clock=clock,
        on_round=lambda r, times: rounds_seen.append((r, {n: len(t) for n, t in times.items()})),
    )
    assert samples == {"a": [1.0] * 3, "b": [2.0] * 3, "c": [4.0] * 3}  # seconds per call, one per round
    assert calls == ["a", "a", "b", "c"] + ["b", "c", "a", "a"] + ["c", "a", "a", "b"]
    assert rounds_seen == [(r, dict.fromkeys(cost, r + 1)) for r in range(3)]


def test_interleaved_without_rotation_keeps_the_order_and_takes_a_measure():
    order = []
    samples = measure.interleaved(
        {"x": "X", "y": "Y"}, 2, 5, rotate=False, measure=lambda entry, n: order.append((entry, n)) or n / 10
    )
    assert order == [("X", 5), ("Y", 5), ("X", 5), ("Y", 5)] and samples == {"x": [0.5, 0.5], "y": [0.5, 0.5]}


def test_interleaved_counts_a_counter_per_call():
    clock, count = FakeClock(), [0]

    def fn():
        count[0] += 3
        clock.now += 1

    counted = {}
    measure.interleaved({"f": fn}, 2, 4, clock=clock, counter=lambda: count[0], counted=counted)
    assert counted == {"f": [3.0, 3.0]}
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        measure.interleaved({"f": fn}, 0, 1)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 11])
def test_quartiles_match_numpy(n):
    values = list(np.random.default_rng(n).lognormal(size=n))
    inclusive = summary_stats.quartiles(values)
    exclusive = summary_stats.quartiles(values, method="exclusive")
    assert inclusive == pytest.approx(np.quantile(values, [0.25, 0.5, 0.75]), rel=1e-12)
    if n > 2:  # (with 2 values statistics.quantiles extrapolates the outer quartiles; numpy clamps them)
        assert exclusive == pytest.approx(np.quantile(values, [0.25, 0.5, 0.75], method="weibull"), rel=1e-12)
    assert inclusive[1] == exclusive[1] == pytest.approx(np.median(values), rel=1e-12)
    s = summary_stats.spread(values)
    assert (s["q25"], s["median"], s["q75"]) == inclusive
    assert (s["min"], s["max"], s["n"]) == (min(values), max(values), n)


def test_summary_errors_and_ratios():
    with pytest.raises(ValueError, match="no values"):
        summary_stats.quartiles([])
    with pytest.raises(ValueError, match="method must be one of"):
        summary_stats.quartiles([1.0, 2.0], method="linear")
    assert summary_stats.paired_ratios({"a": [2.0, 3.0], "b": [1.0, 6.0]}, "a", "b") == [2.0, 0.5]


def test_summary_stats_needs_no_torch():
    import subprocess

    code = "import sys; import bkn.probes.summary_stats; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_step_is_one_sgd_step_with_momentum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    twin = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    step = measure.TrainStep(model, x, y, lr=0.1, momentum=0.9)
    buffers = [torch.zeros_like(p) for p in twin.parameters()]
    for _ in range(2):  # the second step uses the momentum buffer
        loss = step()
        expected = nn.functional.cross_entropy(twin(x), y)
        grads = torch.autograd.grad(expected, list(twin.parameters()))
        with torch.no_grad():
            for p, g, b in zip(twin.parameters(), grads, buffers):
                b.mul_(0.9).add_(g) if b.any() else b.copy_(g)
                p.sub_(0.1 * b)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q)
    assert all(p.grad is not None for p in model.parameters())
