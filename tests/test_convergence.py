"""The training probe: seeded training loop (bkn.training) and its command (bkn.probes.convergence)."""
from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest
import torch

from bkn import training
from bkn.data import load_digits
from bkn.layers.renorm import RenormSchedule
from bkn.probes import convergence

# Tiny configuration: 8x8 digits (the original resolution), ResNet-8 of width 8.
TINY = {"image_size": 8, "width": 8, "depth": 8, "batch_size": 64}


@pytest.fixture(scope="module")
def digits8():
    train = training.Dataset(*load_digits("train", 8, 1, 0))
    test = training.Dataset(*load_digits("test", 8, 1, 0))
    return train, test


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _subset(data: training.Dataset, n: int) -> training.Dataset:
    return training.Dataset(data.images[:n], data.labels[:n])


def _values(rows, metric):
    return [r["value"] for r in rows if r["metric"] == metric]


# -- reproducibility ---------------------------------------------------------------------

@pytest.mark.parametrize("method,group_size", [("bkn-official", 2), ("brn", 4), ("bkn-analytic-adaptive", 8)])
def test_same_seed_is_bit_for_bit_identical(digits8, one_thread, method, group_size):
    """Two runs with one seed: identical weights, buffers, losses and accuracies (the Monte-Carlo
    draws of the official transition included), whatever the global RNG state before the call."""
    train, test = _subset(digits8[0], 256), _subset(digits8[1], 128)
    config = training.TrainConfig(method=method, group_size=group_size, seed=3, epochs=2, precise="none",
                                  **TINY)
    model_a, rows_a = training.train_model(config, train, test)
    torch.randn(1000)  # move the global RNG: the run must seed it itself
    model_b, rows_b = training.train_model(config, train, test)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    strip = [{k: v for k, v in r.items()} for r in rows_a if r["metric"] != "step_time_s"]
    assert strip == [r for r in rows_b if r["metric"] != "step_time_s"]


def test_different_seeds_give_different_runs(digits8, one_thread):
    train, test = _subset(digits8[0], 256), _subset(digits8[1], 128)
    runs = [training.train_model(training.TrainConfig(method="bkn-official", group_size=2, seed=s, epochs=1,
                                                      precise="none", **TINY), train, test)
            for s in (0, 1)]
    assert not torch.equal(runs[0][0].fc.weight, runs[1][0].fc.weight)
    assert _values(runs[0][1], "train_loss") != _values(runs[1][1], "train_loss")


def test_evaluation_does_not_shift_training_draws(digits8, one_thread):
    """Precise evaluation every epoch must leave the training trajectory unchanged."""
    pytest.importorskip("bkn.stats")
    train, test = _subset(digits8[0], 256), _subset(digits8[1], 128)
    base = dict(method="bkn-official", group_size=2, seed=5, epochs=2, **TINY)
    model_a, _ = training.train_model(training.TrainConfig(precise="none", **base), train, test)
    model_b, _ = training.train_model(training.TrainConfig(precise="every", **base), train, test)
    for (key, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), key


# -- end to end --------------------------------------------------------------------------

def test_tiny_configuration_trains_and_beats_chance(digits8, one_thread):
    """Ghost BN with groups of 4, three epochs over the digits at 8x8: far above 10% (chance)."""
    train, test = digits8
    config = training.TrainConfig(method="bn", group_size=4, seed=0, epochs=3, precise="none", **TINY)
    rows = training.train_run(config, train, test)
    acc = _values(rows, "test_acc")
    losses = _values(rows, "train_loss")
    assert len(acc) == len(losses) == 3
    assert acc[-1] > 0.5, acc
    assert losses[-1] < losses[0] < math.log(10) + 0.5
    assert all(0 < t < 5 for t in _values(rows, "step_time_s"))


def test_rows_are_tidy_and_methods_without_groups_use_the_batch(digits8, one_thread):
    train, test = _subset(digits8[0], 128), _subset(digits8[1], 64)
    rows = training.train_run(training.TrainConfig(method="gn", group_size=64, epochs=2, **TINY), train, test)
    frame = pd.DataFrame(rows)
    assert list(frame.columns) == ["method", "group_size", "seed", "epoch", "metric", "value"]
    assert set(frame.group_size) == {64} and set(frame.method) == {"gn"}
    counts = frame.groupby("metric").size().to_dict()
    assert counts == {"train_loss": 2, "test_acc": 2, "step_time_s": 2, "test_acc_precise": 1}
    # GN has no batch statistics: its precise accuracy is its own.
    last = frame[frame.epoch == 2].set_index("metric").value
    assert last["test_acc_precise"] == last["test_acc"]


def test_precise_accuracy_uses_population_statistics_on_a_copy(digits8):
    stats = pytest.importorskip("bkn.stats")
    train, test = _subset(digits8[0], 256), _subset(digits8[1], 128)
    config = training.TrainConfig(method="bn", group_size=2, epochs=1, precise="none", **TINY)
    model, _ = training.train_model(config, train, test)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    precise = training.precise_accuracy(model, train, test)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed: the model itself must not be touched"
    # Another route: the statistics of the whole training set as one batch, written into a copy.
    other = copy.deepcopy(model)
    population = stats.population_statistics(other, [train.images])
    assert set(population) == {name for name, m in model.named_modules() if stats.is_batch_norm(m)}
    stats.use_population_statistics(other, population)
    assert abs(precise - training.accuracy(other, test)) <= 1 / len(test)  # equal up to float-rounding ties
    # ... which differ from the running estimates the model kept.
    assert not torch.allclose(model.norm0.running_mean, other.norm0.running_mean.float())


# -- recipe ------------------------------------------------------------------------------

def test_brn_schedule_is_the_paper_schedule_scaled_to_the_run():
    config = training.TrainConfig(method="brn", group_size=4, epochs=3, **TINY)
    model = training.make_model(config, in_channels=1, num_classes=10, total_steps=400)
    schedule = model.norm0.schedule
    assert schedule == RenormSchedule().scaled(400)
    assert (schedule.warmup_steps, schedule.dmax_steps, schedule.rmax_steps) == (50, 250, 400)
    assert schedule(50) == (1.0, 0.0) and schedule(400) == (3.0, 5.0)


def test_models_use_the_requested_norm_and_group():
    for method, expected in [("bn", "GhostBatchNorm2d"), ("bkn-official", "BatchKalmanNorm2d"),
                             ("brn", "BatchRenorm2d"), ("gn", "GroupNorm"), ("ln", "GroupNorm")]:
        config = training.TrainConfig(method=method, group_size=8, **TINY)
        model = training.make_model(config, 1, 10, 100)
        norms = model.norm_layers()
        assert {type(n).__name__ for n in norms} == {expected}, method
        if training.uses_groups(method):
            assert {n.group_size for n in norms} == {8}
    adaptive = training.make_model(training.TrainConfig(method="bkn-analytic-adaptive", group_size=2, **TINY),
                                   1, 10, 100)
    assert {(n.transition, n.gain_kind) for n in adaptive.norm_layers()} == {("analytic", "adaptive")}
    official = training.make_model(training.TrainConfig(method="bkn-official", group_size=2, **TINY),
                                   1, 10, 100)
    expected = {("official", "fixed", 0.9)}
    assert {(n.transition, n.gain_kind, n.gain.p) for n in official.norm_layers()} == expected


@pytest.mark.parametrize("options,match", [
    ({"method": "xn"}, "unknown method 'xn'"),
    ({"method": "bn", "group_size": 3}, "group_size=3 must divide the SGD batch size 64"),
    ({"epochs": 0}, "epochs must be a positive int"),
    ({"precise": "sometimes"}, "precise must be one of"),
    ({"lr": -1.0}, "lr > 0"),
])
def test_config_errors_name_what_is_wrong(options, match):
    with pytest.raises(ValueError, match=match):
        training.TrainConfig(**options)


def test_data_of_another_size_is_refused(digits8):
    config = training.TrainConfig(method="bn", group_size=4, image_size=16, width=8)
    with pytest.raises(ValueError, match="image_size=16"):
        training.train_run(config, *digits8)


# -- the command -------------------------------------------------------------------------

def test_help_works(capsys):
    with pytest.raises(SystemExit) as exit_:
        convergence.main(["--help"])
    assert exit_.value.code == 0
    assert "--quick" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--methods", "bn,xn"], "unknown method(s) xn"),
    (["--group-sizes", "3"], "must divide the SGD batch size 64"),
    (["--group-sizes", "two"], "comma-separated integers"),
    (["--depth", "10"], "6n+2"),
    (["--epochs", "0"], "--epochs must be >= 1"),
])
def test_bad_arguments_exit_with_a_clear_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        convergence.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_probe_writes_tidy_results_and_prints_a_summary(tmp_path, capsys, one_thread):
    out = tmp_path / "conv"
    argv = ["--methods", "bn,gn", "--group-sizes", "4,64", "--seeds", "0,1", "--epochs", "1",
            "--image-size", "8", "--width", "8", "--threads", "1", "--no-progress", "--out", str(out)]
    assert convergence.main(argv) == 0
    frame = pd.read_parquet(out / "convergence.parquet")
    assert list(frame.columns) == convergence.COLUMNS
    assert frame.dtypes["group_size"] == "int64" and frame.dtypes["value"] == "float64"
    runs = frame[["method", "group_size", "seed"]].drop_duplicates()
    assert len(runs) == 2 * 2 + 2  # bn at 4 and 64, gn once, two seeds each
    assert set(frame.metric) == {"train_loss", "test_acc", "step_time_s", "test_acc_precise"}
    precise = frame[frame.metric == "test_acc_precise"]
    assert len(precise) == 6 and precise.value.between(0, 1).all()
    assert set(frame.threads) == {1} and set(frame.device) == {"cpu"}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["runs"] == 6 and meta["arguments"]["group_sizes"] == [4, 64] and meta["duration_s"] >= 0
    assert meta["recipe"]["epochs"] == 1 and "commit" in meta and meta["threads"] == 1
    printed = capsys.readouterr().out
    assert "Final test accuracy" in printed and "g=4" in printed and "per sample" in printed
    assert str(out / "convergence.parquet") in printed
    # The printed accuracy is the mean over seeds of the recorded values.
    acc = frame[(frame.method == "bn") & (frame.group_size == 4) & (frame.metric == "test_acc")].value
    assert f"{100 * acc.mean():.1f} ± {100 * acc.std():.1f}" in printed


def test_quick_defaults_and_explicit_options():
    args = convergence.resolve(convergence.parser().parse_args(["--quick"]))
    assert args.group_sizes == convergence.QUICK["group_sizes"] and args.seeds == (0,) and args.epochs == 2
    args = convergence.resolve(convergence.parser().parse_args(["--quick", "--epochs", "5"]))
    assert args.epochs == 5
    runs = convergence.configs(convergence.resolve(convergence.parser().parse_args([])))
    assert len(runs) == (4 * 5 + 2) * 3  # 66 runs: four batch-dependent norms x five groups, GN, LN; 3 seeds
