"""Sweeps (bkn.probes.sweeps): runs saved as shards when they end, resumed after a kill, on any executor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from bkn.probes import sweeps
from bkn.probes.drift.__main__ import main as drift_main
from bkn.probes.results import DRIFT, ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

# 2 group sizes x 2 seeds x 2 modes x 3 names = 24 units on the synthetic chain, a second or two in all
DRIFT_TINY = "--data synthetic --methods bn,gn,floor --group-sizes 2,4 --seeds 0,1 --steps 2 --burn-in 2"
DRIFT_TINY = DRIFT_TINY.split() + ["--threads", "1", "--no-progress"]


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


def test_killed_drift_sweep_resumes_to_the_uninterrupted_results(tmp_path):
    """A drift sweep SIGKILLed after its first unit is saved: no results file, the saved units kept, and the
    same command again runs only the rest and gives exactly the rows of an uninterrupted run."""
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    saved = _kill_after_first_shard(_start("bkn.probes.drift", DRIFT_TINY + ["--out", str(killed)], 30), killed, DRIFT)
    assert 1 <= saved < 24 and not (killed / "drift.parquet").exists()
    assert not list(DRIFT.shard_folder(killed).glob(".*"))  # no half-written shard left behind
    first = {p.name: p.stat().st_mtime_ns for p in _shards(killed)}

    assert drift_main(DRIFT_TINY + ["--out", str(killed)]) == 0
    assert len(_shards(killed)) == 24
    assert {p.name: p.stat().st_mtime_ns for p in _shards(killed) if p.name in first} == first  # not run again
    assert drift_main(DRIFT_TINY + ["--out", str(whole)]) == 0
    resumed, uninterrupted = DRIFT.read(killed / "drift.parquet"), DRIFT.read(whole / "drift.parquet")
    pd.testing.assert_frame_equal(resumed, uninterrupted)


def test_rerun_skips_saved_units_and_fresh_starts_over(tmp_path, capsys):
    out = tmp_path / "out"
    assert drift_main(DRIFT_TINY + ["--out", str(out)]) == 0
    first = {p.name: p.stat().st_mtime_ns for p in _shards(out)}
    assert len(first) == 24
    assert drift_main(DRIFT_TINY + ["--out", str(out)]) == 0  # everything saved: nothing run again
    assert {p.name: p.stat().st_mtime_ns for p in _shards(out)} == first
    # another setting (steps) is another run: its units are not the saved ones
    assert drift_main(DRIFT_TINY + ["--steps", "3", "--out", str(out)]) == 0  # the last --steps wins
    assert len(_shards(out)) == 48
    assert drift_main(DRIFT_TINY + ["--out", str(out), "--fresh"]) == 0  # the saved units deleted, all run again
    again = {p.name: p.stat().st_mtime_ns for p in _shards(out)}
    assert again.keys() == first.keys() and all(again[k] != first[k] for k in first)
