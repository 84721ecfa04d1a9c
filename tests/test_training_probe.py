"""The training probe (bkn.probes.training) and the training engine both probes use (bkn.probes.engine)."""

from __future__ import annotations

import copy
import json
import math
import re

import pandas as pd
import pytest
import torch

from bkn import methods as registry
from bkn.layers.renorm import RenormSchedule
from bkn.probes import engine as training
from bkn.probes import training as probe
from bkn.probes.data import Dataset, digits_dataset
from bkn.probes.results import TRAINING
from bkn.probes.training import TrainConfig, make_model, train_model, train_run
from bkn.probes.training.__main__ import main, parser, resolve

# Tiny configuration: 8x8 digits (the original resolution), CIFAR ResNet-8 of width 8.
TINY = {"data": "digits", "network": "cifar-resnet", "image_size": 8, "width": 8, "depth": 8, "batch_size": 64}
DIGITS_ARGS = ["--data", "digits", "--image-size", "8", "--width", "8", "--batch-size", "64", "--jobs", "1"]


@pytest.fixture(scope="module")
def digits8():
    return digits_dataset("train", 8, 1, 0), digits_dataset("test", 8, 1, 0)


def _subset(data: Dataset, n: int) -> Dataset:
    return data.head(n)


def _values(rows, metric):
    return [r["value"] for r in rows if r["metric"] == metric]


# -- reproducibility ---------------------------------------------------------------------


@pytest.mark.parametrize("method,group_size", [("bkn-official", 2), ("brn-scheduled", 4), ("bkn-analytic-adaptive", 8)])
def test_same_seed_is_bit_for_bit_identical(digits8, one_thread, method, group_size):
    """Two runs with one seed: identical weights, buffers, losses and accuracies (the Monte-Carlo
    draws of the official transition included), whatever the global RNG state before the call."""
    train, test = _subset(digits8[0], 256), _subset(digits8[1], 128)
    config = TrainConfig(method=method, group_size=group_size, seed=3, epochs=2, precise="none", **TINY)
    model_a, rows_a = train_model(config, train, test)
    torch.randn(1000)  # move the global RNG: the run must seed it itself
    model_b, rows_b = train_model(config, train, test)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    strip = [{k: v for k, v in r.items()} for r in rows_a if r["metric"] != "step_time_s"]
    assert strip == [r for r in rows_b if r["metric"] != "step_time_s"]


def test_different_seeds_give_different_runs(digits8, one_thread):
    train, test = _subset(digits8[0], 256), _subset(digits8[1], 128)
    runs = [
        train_model(
            TrainConfig(method="bkn-official", group_size=2, seed=s, epochs=1, precise="none", **TINY), train, test
        )
        for s in (0, 1)
    ]
    assert not torch.equal(runs[0][0].fc.weight, runs[1][0].fc.weight)
    assert _values(runs[0][1], "train_loss") != _values(runs[1][1], "train_loss")


def test_evaluation_does_not_shift_training_draws(digits8, one_thread):
    """Precise evaluation every epoch must leave the training trajectory unchanged."""
    pytest.importorskip("bkn.probes.stats")
    train, test = _subset(digits8[0], 256), _subset(digits8[1], 128)
    base = dict(method="bkn-official", group_size=2, seed=5, epochs=2, **TINY)
    model_a, _ = train_model(TrainConfig(precise="none", **base), train, test)
    model_b, _ = train_model(TrainConfig(precise="every", **base), train, test)
    for (key, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), key


# -- end to end --------------------------------------------------------------------------


def test_tiny_configuration_trains_and_beats_chance(digits8, one_thread):
    """Ghost BN with groups of 4, three epochs over the digits at 8x8: far above 10% (chance)."""
    train, test = digits8
    config = TrainConfig(method="bn", group_size=4, seed=0, epochs=3, precise="none", **TINY)
    rows = train_run(config, train, test)
    acc = _values(rows, "test_acc")
    losses = _values(rows, "train_loss")
    assert len(acc) == len(losses) == 3
    assert acc[-1] > 0.5, acc
    assert losses[-1] < losses[0] < math.log(10) + 0.5
    assert all(0 < t < 5 for t in _values(rows, "step_time_s"))


def test_rows_are_tidy_and_methods_without_groups_use_the_batch(digits8, one_thread):
    train, test = _subset(digits8[0], 128), _subset(digits8[1], 64)
    rows = train_run(TrainConfig(method="gn", group_size=64, epochs=2, **TINY), train, test)
    frame = pd.DataFrame(rows)
    assert list(frame.columns) == list(TRAINING.columns)  # the schema's own columns; the probe adds the environment
    assert set(frame.batch_size) == {64} and set(frame.data) == {"digits"} and set(frame.network) == {"cifar-resnet"}
    assert set(frame.group_size) == {64} and set(frame.method) == {"gn"}
    counts = frame.groupby(["evaluation", "metric"]).size().to_dict()
    assert counts == {
        ("training", "train_loss"): 2,
        ("training", "step_time_s"): 2,
        ("running", "test_acc"): 2,
        ("population", "test_acc"): 1,
    }
    # GN has no batch statistics: its population accuracy is its own.
    last = frame[(frame.epoch == 2) & (frame.metric == "test_acc")].set_index("evaluation").value
    assert last["population"] == last["running"]


def test_precise_accuracy_uses_population_statistics_on_a_copy(digits8):
    stats = pytest.importorskip("bkn.probes.stats")
    train, test = _subset(digits8[0], 256), _subset(digits8[1], 128)
    config = TrainConfig(method="bn", group_size=2, epochs=1, precise="none", **TINY)
    model, _ = train_model(config, train, test)
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
    config = TrainConfig(method="brn-scheduled", group_size=4, epochs=3, **TINY)
    model = make_model(config, in_channels=1, num_classes=10, total_steps=400)
    schedule = model.norm0.schedule
    assert schedule == RenormSchedule().scaled(400)
    assert (schedule.warmup_steps, schedule.dmax_steps, schedule.rmax_steps) == (50, 250, 400)
    assert schedule(50) == (1.0, 0.0) and schedule(400) == (3.0, 5.0)


def test_models_use_the_requested_norm_and_group():
    for method, expected in [
        ("bn", "GhostBatchNorm2d"),
        ("bkn-official", "BatchKalmanNorm2d"),
        ("brn-scheduled", "BatchRenorm2d"),
        ("gn", "GroupNorm"),
        ("ln", "GroupNorm"),
    ]:
        config = TrainConfig(method=method, group_size=8, **TINY)
        model = make_model(config, 1, 10, 100)
        norms = model.norm_layers()
        assert {type(n).__name__ for n in norms} == {expected}, method
        if config.uses_groups:
            assert {n.group_size for n in norms} == {8}
    adaptive = make_model(TrainConfig(method="bkn-analytic-adaptive", group_size=2, **TINY), 1, 10, 100)
    assert {(n.transition, n.gain_kind) for n in adaptive.norm_layers()} == {("analytic", "adaptive")}
    official = make_model(TrainConfig(method="bkn-official", group_size=2, **TINY), 1, 10, 100)
    expected = {("official", "fixed", 0.9)}
    assert {(n.transition, n.gain_kind, n.gain.p) for n in official.norm_layers()} == expected
    fixed = make_model(TrainConfig(method="brn", group_size=2, **TINY), 1, 10, 100)  # registry brn: fixed limits
    assert {n.schedule(100) for n in fixed.norm_layers()} == {(3.0, 5.0)}


@pytest.mark.parametrize(
    "options,match",
    [
        ({"method": "xn"}, "unknown method 'xn'"),
        ({"method": "bn", "group_size": 3}, "group_size=3 must divide the SGD batch size 32"),
        ({"network": "cifar-resnet"}, "network 'cifar-resnet' trains on digits, not on mnist1d"),
        ({"data": "cifar"}, "unknown data set 'cifar'"),
        ({"network": "resnet1d", "depth": 10}, "depth must be 6n\\+2"),
        ({"epochs": 0}, "epochs must be a positive int"),
        ({"precise": "sometimes"}, "precise must be one of"),
        ({"lr": -1.0}, "lr > 0"),
    ],
)
def test_config_errors_name_what_is_wrong(options, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**options)


def test_data_of_another_size_is_refused(digits8):
    config = TrainConfig(method="bn", group_size=4, data="digits", network="cifar-resnet", image_size=16, width=8)
    with pytest.raises(ValueError, match="image_size=16"):
        train_run(config, *digits8)


# -- the command -------------------------------------------------------------------------


def test_help_works(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "--quick" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--methods", "bn,xn"], "argument --methods: unknown method 'xn'; known methods: bn, bkn-official"),
        (["--group-sizes", "3"], "must divide the SGD batch size 32"),
        (["--networks", "cifar-resnet"], "network 'cifar-resnet' trains on digits, not on mnist1d"),
        (["--data", "digits", "--networks", "convnet"], "network 'convnet' trains on mnist1d, not on digits"),
        (["--samples", "105"], "--samples 105: MNIST-1D generates as many samples per digit"),
        (["--jobs", "2", "--world-size", "2"], "--jobs 2 with --world-size 2: the DDP workers are the processes"),
        (["--group-sizes", "two"], "argument --group-sizes: expected comma-separated integers, got 'two'"),
        (["--seeds", "1,1"], "argument --seeds: 1 given more than once"),
        (["--threads", "0"], "argument --threads: expected a positive integer, got '0'"),
        (["--depth", "10"], "6n+2"),
        (["--epochs", "0"], "argument --epochs: expected a positive integer, got '0'"),
    ],
)
def test_bad_arguments_exit_with_a_clear_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_probe_writes_tidy_results_and_prints_a_summary(tmp_path, capsys, one_thread):
    out = tmp_path / "conv"
    argv = [
        "--methods",
        "bn,gn",
        "--group-sizes",
        "4,64",
        "--seeds",
        "0,1",
        "--epochs",
        "1",
        *DIGITS_ARGS,
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    frame = TRAINING.read(out / "convergence.parquet")  # carries the schema stamp, or read() raises
    assert list(frame.columns) == list(TRAINING.all_columns)
    assert frame.dtypes["group_size"] == "int64" and frame.dtypes["value"] == "float64"
    assert set(frame.batch_size) == {64}  # the SGD batch, beside the group size
    runs = frame[["method", "group_size", "seed"]].drop_duplicates()
    assert len(runs) == 2 * 2 + 2  # bn at 4 and 64, gn once, two seeds each
    assert set(frame.metric) == {"train_loss", "test_acc", "step_time_s"}
    assert set(frame.evaluation) == {"training", "running", "population"}
    precise = frame[frame.evaluation == "population"]
    assert len(precise) == 6 and precise.value.between(0, 1).all() and set(precise.metric) == {"test_acc"}
    assert set(frame.threads) == {1} and set(frame.device) == {"cpu"}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["runs"] == 6 and meta["arguments"]["group_sizes"] == [4, 64] and meta["duration_s"] >= 0
    assert meta["recipe"]["epochs"] == 1 and "commit" in meta and meta["threads"] == 1
    assert meta["schema"] == {"name": "training", "version": TRAINING.version}
    printed = capsys.readouterr().out
    assert "digits, cifar-resnet: final test accuracy (%) with the methods' running estimates" in printed
    assert "with population statistics recomputed after training (PreciseBN)" in printed
    assert "g=4" in printed and "per sample" in printed
    assert str(out / "convergence.parquet") in printed
    # The printed accuracy is the mean over seeds of the recorded values.
    acc = frame[(frame.method == "bn") & (frame.group_size == 4) & (frame.evaluation == "running")].value
    assert f"{100 * acc.mean():.1f} ± {100 * acc.std():.1f}" in printed


def test_progress_in_a_log_is_one_line_per_run(tmp_path, capsys, one_thread):
    """Progress on a stream that is not a terminal (a CI log): one line per finished run - runs done/total,
    elapsed, the time left once a run has finished - no bar redraws; a rerun reads both runs back."""
    argv = ["--methods", "bn,gn", "--group-sizes", "8", "--seeds", "0", "--epochs", "1", *DIGITS_ARGS]
    assert main([*argv, "--threads", "1", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("training probe")]
    assert len(lines) == 2, err
    assert re.match(
        r"training probe \[1/2 runs, \d+ s elapsed, about \d+ s left\]: cifar-resnet bn g=8 seed=0: test_acc "
        r"\d+\.\d% \(running estimates\) in \d+ s$",
        lines[0],
    ), lines[0]
    assert re.match(r"training probe \[2/2 runs, \d+ s elapsed\]: cifar-resnet gn g=64 seed=0: ", lines[1]), lines[1]
    assert "\r" not in err
    assert main([*argv, "--threads", "1", "--out", str(tmp_path)]) == 0  # both saved: read back, none trained
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("training probe")]
    assert lines == ["training probe: 2 of 2 runs read back from an earlier run's shards"]


def test_quick_defaults_and_explicit_options():
    args = resolve(parser().parse_args(["--quick"]))
    assert args.group_sizes == (2, 32) and args.seeds == (0,) and args.epochs == probe.QUICK["epochs"]
    assert args.methods == ("bn", "bkn-official", "bkn-analytic", "gn") and args.data == "mnist1d"
    assert args.networks == ("convnet", "resnet1d") and args.jobs == 2 and args.threads == 1
    args = resolve(parser().parse_args(["--quick", "--epochs", "5", "--methods", "brn", "--group-sizes", "4"]))
    assert args.epochs == 5 and args.methods == ("brn",) and args.group_sizes == (4,)
    assert str(args.out) == "results/convergence" and not args.no_progress
    assert resolve(parser().parse_args(["--jobs", "1"])).threads == 2  # one process: both cores
    full = resolve(parser().parse_args([]))
    assert (full.batch_size, full.lr, full.epochs, full.samples) == (32, 0.05, 10, 5000)
    runs = probe.configs(full)
    # every registry method but syncbn, in and the drift probe's transition ablations: the grouped ones x four
    # groups, the others once; every default seed; 2 networks
    ablations = {n for n in registry.names() if n.startswith("bkn-official-") and n != "bkn-official-adaptive"}
    assert {r.method for r in runs} == set(registry.names(tag="training"))
    assert not {"syncbn", "in"} & {r.method for r in runs} and not ablations & {r.method for r in runs}
    grouped = sum(registry.get(m).uses_groups for m in registry.names(tag="training"))
    others = len(registry.names(tag="training")) - grouped
    # BN, BKN x 4, BRN x 2, EvoNorm-B0, MABN, CBN; GN, LN, GN+WS, FRN, EvoNorm-S0
    assert grouped == 10 and others == 5
    assert len(runs) == (grouped * 4 + others) * len(probe.DEFAULT_SEEDS) * 2
    # seed-major (an interrupted sweep holds whole seeds), the networks alternating run by run
    assert [r.seed for r in runs] == sorted(r.seed for r in runs)
    assert [r.network for r in runs[:4]] == ["convnet", "resnet1d"] * 2
    assert full.group_sizes == (2, 4, 8, 32) and full.networks == ("convnet", "resnet1d")
    digits = resolve(parser().parse_args(["--data", "digits", "--quick"]))
    assert digits.networks == ("cifar-resnet",)


# -- the engine both probes train with ----------------------------------------------------


def _tiny_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 10),
    )


def test_engine_is_deterministic_for_a_seed(digits8, one_thread):
    data = _subset(digits8[0], 100)
    recipe = training.Recipe(batch_size=16, lr=0.05)
    runs = []
    for seed in (4, 4, 5):
        model = _tiny_net(0)
        epochs = list(training.train_epochs(model, data, recipe, steps=15, seed=seed))
        runs.append((model.state_dict(), [float(x) for e in epochs for x in e.losses], epochs))
    (a, losses_a, epochs), (b, losses_b, _), (c, losses_c, _) = runs
    assert all(torch.equal(a[k], b[k]) for k in a) and losses_a == losses_b
    assert losses_a != losses_c  # the seed sets the data order
    # 100 samples in batches of 16: 6 full batches per epoch (the tail of 4 dropped), 15 steps = 6 + 6 + 3
    assert [(e.number, len(e.losses)) for e in epochs] == [(1, 6), (2, 6), (3, 3)]


def test_engine_is_the_reshuffle_when_exhausted_loop_the_drift_probe_trained_with(digits8, one_thread):
    """The drift probe's old loop (one permutation, a new one when fewer than a batch remain,
    CosineAnnealingLR stepped per step) and the engine give the same weights bit for bit."""
    data = _subset(digits8[0], 100)
    steps, batch, seed = 20, 16, 7
    old = _tiny_net(0)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(old.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    old.train()
    order, position = torch.randperm(len(data), generator=generator), 0
    for _ in range(steps):
        if position + batch > len(order):
            order, position = torch.randperm(len(data), generator=generator), 0
        index = order[position : position + batch]
        position += batch
        loss = torch.nn.functional.cross_entropy(old(data.images[index]), data.labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    new = _tiny_net(0)
    for _ in training.train_epochs(new, data, training.Recipe(batch_size=batch, lr=0.05), steps, seed):
        pass
    for (key, a), b in zip(old.state_dict().items(), new.state_dict().values()):
        assert torch.equal(a, b), key


def test_both_probes_train_with_the_same_engine_function(digits8, one_thread, monkeypatch):
    from bkn.probes.drift import setups

    real = training.train_epochs
    callers = []

    def spy(model, data, recipe, steps, seed, on_step=None):
        callers.append((data.name, recipe.batch_size, steps))
        return real(model, data, recipe, steps, seed, on_step)

    monkeypatch.setattr(training, "train_epochs", spy)
    monkeypatch.setitem(setups.TRAINING, "steps", 2)
    source = setups.load_source("digits", "cifar-resnet20").head(64)
    setups.train(setups.base_network("cifar-resnet20", source, 0), source, seed=0)
    train_run(
        TrainConfig(method="bn", group_size=8, epochs=1, precise="none", **TINY),
        _subset(digits8[0], 64),
        _subset(digits8[1], 32),
    )
    assert callers == [("digits", 32, 2), ("digits", 64, 1)]
