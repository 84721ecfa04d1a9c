"""Sweeps (bkn.probes.sweeps): runs saved as shards when they end, resumed after a kill, on any executor."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from bkn.probes import sweeps
from bkn.probes.drift.__main__ import main as drift_main
from bkn.probes.results import DRIFT, ROOT, TRAINING
from bkn.probes.training.__main__ import main as training_main

pytestmark = pytest.mark.usefixtures("one_thread")

# 2 group sizes x 2 seeds x 2 modes x 2 methods = 16 units on the synthetic chain, about a second in all
DRIFT_TINY = "--data synthetic --methods bn,gn --group-sizes 2,4 --seeds 0,1 --steps 2 --burn-in 2"
DRIFT_TINY = DRIFT_TINY.split() + ["--threads", "1", "--no-progress"]
# 4 runs of one epoch: BN at group sizes 4 and 8, 2 seeds, on 8x8 digits
TRAINING_TINY = "--data digits --image-size 8 --width 8 --batch-size 64 --methods bn --group-sizes 4,8 --seeds 0,1"
TRAINING_TINY = TRAINING_TINY.split() + ["--epochs", "1", "--jobs", "1", "--threads", "1", "--no-progress"]


def _shards(out, schema=DRIFT) -> list:
    folder = schema.shard_folder(out)
    return sorted(folder.glob("*.parquet")) if folder.exists() else []


def _start(module: str, argv: list[str], pause: float) -> subprocess.Popen:
    env = {**os.environ, sweeps.PAUSE_VARIABLE: str(pause), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", module, *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _kill_after_first_shard(process: subprocess.Popen, out, schema, timeout: float = 120.0) -> int:
    """SIGKILL ``process`` as soon as its first shard is on disk; the number of shards saved by then."""
    deadline = time.monotonic() + timeout
    while not _shards(out, schema):
        if process.poll() is not None:
            pytest.fail(f"the sweep ended before saving a shard: {process.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("no shard appeared in time")
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    return len(_shards(out, schema))


@pytest.mark.slow
def test_killed_drift_sweep_resumes_to_the_uninterrupted_results(tmp_path):
    """A drift sweep SIGKILLed after its first unit is saved: no results file, the saved units kept, and the
    same command again runs only the rest and gives exactly the rows of an uninterrupted run."""
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    saved = _kill_after_first_shard(_start("bkn.probes.drift", DRIFT_TINY + ["--out", str(killed)], 30), killed, DRIFT)
    _resume_and_compare(saved, killed, whole, drift_main, DRIFT_TINY, DRIFT, 16)


@pytest.mark.slow
def test_killed_training_sweep_resumes_to_the_uninterrupted_results(tmp_path):
    """The same for the training probe: 4 tiny runs, SIGKILLed after the first is saved."""
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    process = _start("bkn.probes.training", TRAINING_TINY + ["--out", str(killed)], 60)
    saved = _kill_after_first_shard(process, killed, TRAINING)
    _resume_and_compare(saved, killed, whole, training_main, TRAINING_TINY, TRAINING, 4)


def test_interrupted_drift_sweep_resumes_to_the_uninterrupted_results(tmp_path, monkeypatch, capsys):
    """Fast stand-in of the kill tests above, in this process: Ctrl-C right after the 5th unit is saved."""
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    write_shard = type(DRIFT).write_shard

    def interrupted_after_five(self, out, key, rows, record):
        path = write_shard(self, out, key, rows, record)
        if len(_shards(out)) == 5:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(type(DRIFT), "write_shard", interrupted_after_five)
    assert drift_main(DRIFT_TINY + ["--out", str(killed)]) == 130
    err = capsys.readouterr().err
    assert "drift.parquet not written" in err and "run the same command again" in err, err
    monkeypatch.undo()
    _resume_and_compare(5, killed, whole, drift_main, DRIFT_TINY, DRIFT, 16)


def _no_times(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["metric"] != "step_time_s"].reset_index(drop=True)  # wall times differ from run to run


def _resume_and_compare(saved: int, killed, whole, main, argv, schema, total: int) -> None:
    assert 1 <= saved < total and not (killed / schema.file).exists()
    assert not list(schema.shard_folder(killed).glob(".*"))  # no half-written shard left behind
    first = {p.name: p.stat().st_mtime_ns for p in _shards(killed, schema)}
    assert main(argv + ["--out", str(killed)]) == 0
    assert len(_shards(killed, schema)) == total
    assert {p.name: p.stat().st_mtime_ns for p in _shards(killed, schema) if p.name in first} == first  # not rerun
    assert main(argv + ["--out", str(whole)]) == 0
    resumed, uninterrupted = schema.read(killed / schema.file), schema.read(whole / schema.file)
    if schema is TRAINING:
        resumed, uninterrupted = (
            f[f["metric"] != "step_time_s"].reset_index(drop=True) for f in (resumed, uninterrupted)
        )
    pd.testing.assert_frame_equal(resumed, uninterrupted)


def test_rerun_skips_saved_units_and_fresh_starts_over(tmp_path):
    out, argv = tmp_path / "out", DRIFT_TINY + ["--modes", "in-network", "--seeds", "0"]
    assert drift_main(argv + ["--out", str(out)]) == 0
    first = {p.name: p.stat().st_mtime_ns for p in _shards(out)}
    assert len(first) == 4
    (out / DRIFT.file).unlink()
    assert drift_main(argv + ["--out", str(out)]) == 0  # everything saved: nothing run again, the file rewritten
    assert {p.name: p.stat().st_mtime_ns for p in _shards(out)} == first and (out / DRIFT.file).exists()
    assert drift_main(argv + ["--out", str(out), "--fresh"]) == 0  # the saved units deleted, all run again
    again = {p.name: p.stat().st_mtime_ns for p in _shards(out)}
    assert again.keys() == first.keys() and all(again[k] != first[k] for k in first)
    # another setting is another sweep: once it is complete, the shards beside its results file are its own
    assert drift_main(argv + ["--out", str(out), "--steps", "3"]) == 0
    assert len(_shards(out)) == 4 and not {p.name for p in _shards(out)} & set(first)


# -- the shards in the results contract --------------------------------------------------------


def test_shards_round_trip_and_foreign_or_damaged_shards_count_as_not_done(tmp_path):
    rows = [
        dict(
            data="synthetic",
            network="residual-chain",
            state="init",
            method="bn",
            group_size=2,
            mode="isolation",
            layer="n1",
            depth=0,
            metric="kl",
            statistic="median",
            seed=0,
            value=0.25,
        ),
    ]
    path = DRIFT.write_shard(tmp_path, "abc", rows, {"skipped": [{"reason": "x"}]})
    assert path == tmp_path / "shards" / "drift" / "abc.parquet"
    ((frame, record),) = DRIFT.read_shards(tmp_path).values()
    assert frame.to_dict("records") == rows and record == {"skipped": [{"reason": "x"}]}
    assert list(frame.dtypes.astype(str)) == [str(pd.Series(dtype=d).dtype) for d in DRIFT.columns.values()]
    (path.parent / "damaged.parquet").write_bytes(b"PAR1 half")
    path.rename(path.parent / "renamed.parquet")  # a shard under another run's name is not that run
    assert DRIFT.read_shards(tmp_path) == {} and TRAINING.read_shards(tmp_path) == {}
    empty = DRIFT.write_shard(tmp_path, "skipped", [], {})
    assert DRIFT.read_shards(tmp_path, ["skipped", "absent"])["skipped"][0].empty and empty.exists()
    with pytest.raises(ValueError, match="column 'value' is missing"):
        DRIFT.write_shard(tmp_path, "bad", [{k: v for k, v in rows[0].items() if k != "value"}], {})


def test_run_keys_change_with_what_determines_the_run():
    from bkn.probes.drift import ProbeConfig, worker

    config = ProbeConfig(setups=[("synthetic", "residual-chain")], methods=["bn", "bn-ema"], group_sizes=[2])
    unit = ("synthetic", "residual-chain", "init", "bn", "in-network", 2, 0)
    env = {"commit": "a", "torch": "2", "device": "cpu", "threads": 1}
    key = sweeps.run_key(worker.unit_key(config, unit, env, 3))
    assert key == sweeps.run_key(worker.unit_key(config, unit, dict(env), 3))
    others = [
        worker.unit_key(config, unit[:5] + (4, 0), env, 3),  # group size
        worker.unit_key(config, unit[:6] + (1,), env, 3),  # seed
        worker.unit_key(config, unit, {**env, "commit": "b"}, 3),  # code version
        worker.unit_key(config, unit, env, 4),  # schema
        worker.unit_key(ProbeConfig(**{**config.__dict__, "steps": 3}), unit, env, 3),  # passes
        worker.unit_key(ProbeConfig(**{**config.__dict__, "methods": ["bn"]}), unit, env, 3),  # no -ema rows
    ]
    assert len({key, *map(sweeps.run_key, others)}) == 1 + len(others)


# -- executors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,message",
    [
        ("slurm", "unknown executor 'slurm'; expected one of local, dask:ADDRESS"),
        ("dask", "unknown executor 'dask'"),
        ("local:4", "unknown executor 'local:4'"),
        ("submitit:logs,timeout_min", "submitit parameter 'timeout_min': expected key=value"),
    ],
)
def test_bad_executor_is_a_clear_error(capsys, spec, message):
    with pytest.raises(SystemExit):
        drift_main(DRIFT_TINY + ["--executor", spec])
    assert message in capsys.readouterr().err


def test_missing_executor_package_names_what_to_install(monkeypatch, capsys):
    real = sweeps.importlib.util.find_spec
    monkeypatch.setattr(sweeps.importlib.util, "find_spec", lambda name: None if name == "submitit" else real(name))
    with pytest.raises(SystemExit):
        training_main(TRAINING_TINY + ["--executor", "submitit:/tmp/logs"])
    err = capsys.readouterr().err
    assert "needs the 'submitit' package, which is not installed: pip install submitit" in err, err
    assert sweeps.check_executor("dask:tcp://10.0.0.1:8786") == "dask:tcp://10.0.0.1:8786"  # installed: the extra
    assert sweeps._submitit_spec("logs,timeout_min=240,slurm_partition=gpu") == (
        "logs",
        {"timeout_min": 240, "slurm_partition": "gpu"},
    )


def test_executor_path_gives_the_rows_of_this_process(tmp_path):
    """Units handed to a concurrent.futures executor (one thread here: fast) give this process's rows."""
    from concurrent.futures import ThreadPoolExecutor

    from bkn.probes.drift import ProbeConfig, run

    config = ProbeConfig(
        setups=[("synthetic", "residual-chain")], methods=["bn", "gn"], group_sizes=[2], seeds=[0], steps=2, burn_in=2
    )
    here, _ = run(config, out=tmp_path / "here")
    with ThreadPoolExecutor(1) as pool:
        there, record = run(config, out=tmp_path / "there", executor=pool)
    pd.testing.assert_frame_equal(here, there)
    assert record["units"] == 4 and len(_shards(tmp_path / "there")) == 4


@pytest.mark.slow
def test_dask_local_cluster_gives_the_rows_of_a_local_run(tmp_path):
    """Two Dask worker processes (a LocalCluster): the drift and training probes' rows equal a local run's."""
    pytest.importorskip("distributed")
    dask = ["--executor", "dask:local", "--jobs", "2"]
    assert drift_main(DRIFT_TINY + ["--out", str(tmp_path / "local")]) == 0
    assert drift_main(DRIFT_TINY + dask + ["--out", str(tmp_path / "dask")]) == 0
    pd.testing.assert_frame_equal(
        DRIFT.read(tmp_path / "local" / DRIFT.file), DRIFT.read(tmp_path / "dask" / DRIFT.file)
    )
    assert training_main(TRAINING_TINY + ["--out", str(tmp_path / "tlocal")]) == 0
    assert training_main(TRAINING_TINY + dask + ["--out", str(tmp_path / "tdask")]) == 0
    a, b = (TRAINING.read(tmp_path / d / TRAINING.file) for d in ("tlocal", "tdask"))
    pd.testing.assert_frame_equal(_no_times(a), _no_times(b))
    assert len(_shards(tmp_path / "tdask", TRAINING)) == 4


# -- progress -------------------------------------------------------------------------------------


def test_drift_progress_in_a_log_is_plain_lines_with_the_time_left():
    from bkn.probes.drift.progress import Progress

    stream = io.StringIO()
    progress = Progress(4, stream=stream, interval=0)
    progress.update(1, resumed=True, label="a")  # read back from a shard: counted, no line
    progress.stage("synthetic/residual-chain/init: weights")
    progress.update(1, label="synthetic: bn, n=2, seed 0")
    progress.update(2, label="synthetic: bn, n=4, seed 1")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 4, lines
    assert re.fullmatch(
        r"drift probe \[1/4 units \(1 from earlier\), \d+ s elapsed\]: synthetic/residual-chain/init: "
        r"weights",
        lines[0],
    ), lines[0]
    assert re.fullmatch(
        r"drift probe \[2/4 units \(1 from earlier\), \d+ s elapsed, about \d+ s left\]: done "
        r"synthetic: bn, n=2, seed 0",
        lines[1],
    ), lines[1]
    assert lines[2].startswith("drift probe [4/4 units (1 from earlier), ") and "left" not in lines[2]
    assert lines[3].endswith(": done")


def test_status_estimates_the_time_left_from_this_sessions_pace(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(sweeps.time, "perf_counter", lambda: now[0])
    assert sweeps.status(0, 10, 0, 40.0) == "0/10 runs, 60 s elapsed"  # nothing run yet: no estimate
    # 6 done, 4 read back from shards: 2 ran in 60 s, so 4 more take 120 s
    assert sweeps.status(6, 10, 4, 40.0) == "6/10 runs (4 from earlier), 60 s elapsed, about 2.0 min left"
    now[0] = 40.0 + 7200
    assert sweeps.status(9, 10, 0, 40.0, "units") == "9/10 units, 2.0 h elapsed, about 13.3 min left"


@pytest.mark.slow
def test_executor_trains_the_missing_networks_first(tmp_path, monkeypatch):
    """With an executor the training runs the weights cache lacks go to it before the units (a thread here,
    so the shortened training reaches it), and the units then read the weights from the cache."""
    from concurrent.futures import ThreadPoolExecutor

    from bkn.probes.drift import ProbeConfig, run, setups

    monkeypatch.setitem(setups.TRAINING, "steps", 2)
    real_load = setups.load_source
    monkeypatch.setattr(setups, "load_source", lambda data, network: real_load(data, network).head(32))
    config = ProbeConfig(
        setups=[("digits", "cifar-resnet20")],
        states=["trained-own"],
        modes=["in-network"],
        methods=["bn"],
        group_sizes=[4],
        seeds=[0],
        steps=1,
        burn_in=1,
        cache=str(tmp_path / "cache"),
    )
    with ThreadPoolExecutor(1) as pool:
        there, record = run(config, out=tmp_path / "there", executor=pool)
    assert [(r["cached"], r.get("process")) for r in record["training"]] == [(False, "pretrain")]
    here, record = run(config, out=tmp_path / "here")
    assert [r["cached"] for r in record["training"]] == [True]
    pd.testing.assert_frame_equal(here, there)
