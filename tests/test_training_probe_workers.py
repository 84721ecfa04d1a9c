"""The training probe on several workers (DistributedDataParallel over gloo, processes spawned by the test).

Every multi-process run is bounded: ``bkn.probes.distributed.run`` stops workers that outlast the
probe's ``--timeout`` (given here), and the torchrun subprocess has a ``timeout``.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import training_workers as workers

from bkn.probes import distributed
from bkn.probes.results import TRAINING
from bkn.probes.training import TrainConfig, launch
from bkn.probes.training.__main__ import main, parser, resolve

pytestmark = pytest.mark.skipif(not distributed.available(), reason="torch.distributed with gloo is not available")

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT = ["--timeout", "240"]
# Two workers sharing an SGD batch of 16 (8 each), ResNet-8 of width 8 on the 8x8 digits, one epoch per run.
TINY_WORKERS = [
    "--data",
    "digits",
    "--world-size",
    "2",
    "--methods",
    "bn,syncbn,bkn-official",
    "--group-sizes",
    "2,8",
    "--seeds",
    "3",
    "--epochs",
    "1",
    "--batch-size",
    "16",
    "--image-size",
    "8",
    "--width",
    "8",
    "--no-progress",
    *TIMEOUT,
]


def _without_times(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame.metric != "step_time_s"].drop(columns=["commit"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """The tiny probe on two spawned workers: (output folder, frame as read back, seconds)."""
    out = tmp_path_factory.mktemp("two_workers")
    started = time.perf_counter()
    assert main([*TINY_WORKERS, "--out", str(out)]) == 0
    return out, TRAINING.read(out / TRAINING.file), time.perf_counter() - started


@pytest.mark.slow
def test_two_workers_write_rows_for_each_method_and_group(two_workers):
    out, frame, _ = two_workers
    assert set(frame.world_size) == {2} and set(frame.batch_size) == {16}
    runs = frame[["method", "group_size", "seed"]].drop_duplicates()
    assert sorted(map(tuple, runs.values.tolist())) == [
        ("bkn-official", 2, 3),
        ("bkn-official", 8, 3),
        ("bn", 2, 3),
        ("bn", 8, 3),
        ("syncbn", 16, 3),  # pooled over both workers: statistics over the SGD batch
    ]
    # one epoch: train_loss, step_time_s, test_acc running and population (SyncBN keeps running estimates too)
    assert frame.groupby(["method", "group_size"]).size().to_dict() == {k: 4 for k in map(tuple, runs.values[:, :2])}
    acc = frame[frame.metric == "test_acc"].value
    assert acc.between(0.2, 1).all(), acc  # one epoch already far above chance (0.1)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["recipe"]["world_size"] == 2
    assert meta["workers"] == {
        "worker_batch_size": 8,
        "threads_per_worker": 1,
        "launcher": "spawn",
        "backend": "gloo",
    }
    assert meta["schema"] == {"name": "training", "version": TRAINING.version}


@pytest.mark.slow
def test_two_workers_are_deterministic_for_a_seed(two_workers, tmp_path, capsys):
    _, first, _ = two_workers
    assert main([*TINY_WORKERS, "--out", str(tmp_path)]) == 0
    again = TRAINING.read(tmp_path / TRAINING.file)
    pd.testing.assert_frame_equal(_without_times(first), _without_times(again))
    printed = capsys.readouterr().out
    assert "SGD batch 16 on 2 workers of 8, by per-worker group size g" in printed
    assert "all workers" in printed and "with 2 workers x 1 thread(s)" in printed


def _state_close(a: dict, b: dict, keys, atol: float) -> float:
    worst = 0.0
    for key in keys:
        assert a[key].shape == b[key].shape, key
        worst = max(worst, float((a[key].double() - b[key].double()).abs().max()))
    assert worst <= atol, worst
    return worst


@pytest.mark.slow
def test_syncbn_on_two_workers_trains_the_weights_of_bn_over_the_whole_batch():
    """SyncBN over 2 workers of 8 = BN over the SGD batch of 16: after 8 SGD steps (float64) the weights and
    running estimates equal those of one process training BN over the whole batch, with the same seed and
    data order, to 1e-10. BN in groups of 4 on two workers trains the weights of one process's ghost BN in
    groups of 4 (the data shards and DDP's gradient average change nothing), but not SyncBN's."""
    common = dict(
        seed=1, epochs=2, batch_size=16, data="digits", network="cifar-resnet", image_size=8, width=8, precise="none"
    )
    samples = 64  # 4 steps per epoch
    on_two = [
        TrainConfig(method="syncbn", group_size=16, world_size=2, **common),
        TrainConfig(method="bn", group_size=4, world_size=2, **common),
    ]
    ranks = distributed.run(workers.train_in_float64, 2, (on_two, samples), timeout_s=240)
    on_one = workers.train_in_float64(
        0,
        1,
        [TrainConfig(method="bn", group_size=16, **common), TrainConfig(method="bn", group_size=4, **common)],
        samples,
    )
    (sync, ghost), (sync_rank1, _), (whole, ghost_one) = ranks[0], ranks[1], on_one
    assert sync["state"]["fc.weight"].dtype == torch.float64
    assert sync["state"].keys() == whole["state"].keys()
    everything = [k for k in whole["state"] if whole["state"][k].is_floating_point()]
    params = [k for k in everything if "running" not in k]
    assert any("running_var" in k for k in everything) and len(params) > 10
    _state_close(sync["state"], whole["state"], everything, atol=1e-10)
    _state_close(sync_rank1["state"], sync["state"], everything, atol=0.0)  # the replicas stay identical
    _state_close(ghost["state"], ghost_one["state"], params, atol=1e-10)
    # the recorded loss is the loss over both workers' samples
    losses = [[r["value"] for r in run["rows"] if r["metric"] == "train_loss"] for run in (sync, whole)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-10, rel=0)
    # ... and the comparison can fail: SyncBN and ghost BN train different weights
    diff = (sync["state"]["fc.weight"] - ghost["state"]["fc.weight"]).abs().max()
    assert diff > 1e-4, diff


@pytest.mark.slow
def test_a_worker_that_dies_mid_training_stops_the_run_and_writes_nothing(tmp_path, monkeypatch, capsys):
    previous = b"the previous results"
    (tmp_path / TRAINING.file).write_bytes(previous)
    monkeypatch.setenv(launch.KILL_VARIABLE, "1:5")  # rank 1 exits abruptly at its 5th step
    started = time.perf_counter()
    assert main([*TINY_WORKERS, "--methods", "syncbn", "--out", str(tmp_path)]) == 1
    assert time.perf_counter() - started < 120
    err = capsys.readouterr().err
    assert "error: the run on 2 workers failed, nothing was written" in err, err
    assert "worker 1 of 2 exited with code 3" in err, err
    assert (tmp_path / TRAINING.file).read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == [TRAINING.file]  # no meta.json, no temporary files


def test_a_failed_run_on_workers_writes_nothing_in_this_process(tmp_path, monkeypatch, capsys):
    """The fast stand-in for the test above (slow: it spawns the workers): the probe's side of a failed
    multi-process run, with the spawning replaced by its WorkerError."""

    def fail(fn, world_size, args, **options):
        assert fn is launch.train_runs and world_size == 2 and options["timeout_s"] == 240
        raise distributed.WorkerError("worker 1 of 2 exited with code 3")

    monkeypatch.setattr(distributed, "run", fail)
    previous = b"the previous results"
    (tmp_path / TRAINING.file).write_bytes(previous)
    assert main([*TINY_WORKERS, "--methods", "syncbn", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "error: the run on 2 workers failed, nothing was written" in err, err
    assert "worker 1 of 2 exited with code 3" in err, err
    assert (tmp_path / TRAINING.file).read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == [TRAINING.file]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--world-size", "3"], "--batch-size 32 does not split evenly over --world-size 3 workers"),
        (["--world-size", "2", "--group-sizes", "2,32"], "--group-sizes 32: every group size must divide the per"),
        (["--methods", "bn,syncbn"], "--methods syncbn: SyncBN pools its statistics over the workers"),
        (["--world-size", "0"], "argument --world-size: expected a positive integer, got '0'"),
        (["--world-size", "2", "--timeout", "-1"], "argument --timeout: expected a positive number of seconds"),
    ],
)
def test_bad_worker_arguments_exit_with_a_clear_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_worker_defaults(monkeypatch):
    quick = resolve(parser().parse_args(["--quick", "--world-size", "2"]))
    assert quick.methods == ("bn", "syncbn", "bkn-official") and quick.group_sizes == (2,)
    assert quick.seeds == (0,) and quick.epochs == 2 and quick.threads == 1 and quick.timeout == 900
    assert quick.networks == ("convnet",) and quick.jobs == 1
    full = resolve(parser().parse_args(["--world-size", "2"]))
    assert full.group_sizes == (2, 4, 8, 16) and "syncbn" in full.methods  # per-worker batch 16
    one = resolve(parser().parse_args(["--quick"]))
    assert one.world_size == 1 and one.jobs == 2 and one.threads == 1 and "syncbn" not in one.methods
    assert resolve(parser().parse_args(["--world-size", "2", "--threads", "2"])).threads == 2
    # launched by torchrun: its WORLD_SIZE, and a different --world-size is refused
    for name, value in {"RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    assert resolve(parser().parse_args([])).world_size == 4
    with pytest.raises(ValueError, match="--world-size 2, but torchrun started 4 workers"):
        resolve(parser().parse_args(["--world-size", "2"]))


def test_a_config_for_two_workers_needs_their_process_group():
    from bkn.probes.training import train_run

    config = TrainConfig(
        method="bn", group_size=2, world_size=2, batch_size=16, data="digits", network="cifar-resnet", image_size=8
    )
    train, test = workers.digits64(32, 16)
    with pytest.raises(ValueError, match="world_size=2 needs an initialized torch.distributed process group"):
        train_run(config, train, test)
    with pytest.raises(ValueError, match="group_size=16 must divide the SGD batch size 8 per worker"):
        TrainConfig(method="bn", group_size=16, world_size=2, batch_size=16)
    with pytest.raises(ValueError, match="batch size 15 must split evenly over world_size=2"):
        TrainConfig(method="bn", group_size=1, world_size=2, batch_size=15)


TORCHRUN = pathlib.Path(sys.executable).parent / "torchrun"


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
@pytest.mark.slow
def test_torchrun_launch_gives_the_spawned_results(two_workers, tmp_path):
    """``torchrun --nproc-per-node 2 -m bkn.probes.training`` (no --world-size): the same rows as the
    spawned workers, written once by rank 0."""
    _, spawned, _ = two_workers
    argv = [a for a in TINY_WORKERS if a not in ("--world-size", "2")]
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "bkn.probes.training", *argv]
    done = subprocess.run([*command, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("final test accuracy") == 2  # rank 0 alone prints (two blocks), once
    frame = TRAINING.read(tmp_path / TRAINING.file)
    pd.testing.assert_frame_equal(_without_times(spawned), _without_times(frame))
    assert json.loads((tmp_path / "meta.json").read_text())["workers"]["launcher"] == "torchrun"
