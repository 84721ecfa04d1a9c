"""``nox --install-only`` prepares the shared torch venv and runs nothing else (noxfile.py's ``torch_env``).

A real torch venv costs gigabytes and minutes, so the shared venv here is a fake one: ``<envdir>/torch/bin/python``
is a shell script that logs its arguments and exits 0. nox itself runs for real, on this repository's noxfile.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAKE_PYTHON = """#!/bin/sh
echo "$@" >> "{log}"
exit 0
"""


def _nox() -> list[str]:
    found = shutil.which("nox")
    if found:
        return [found]
    try:
        import nox  # noqa: F401
    except ImportError:
        pytest.skip("nox is not installed here (.ci/run puts it on PATH)")
    return [sys.executable, "-m", "nox"]


@pytest.fixture
def fake_env(tmp_path):
    """An envdir whose ``torch`` venv is a logging stub; returns (envdir, log file, stamp file)."""
    if os.name == "nt":
        pytest.skip("the stub interpreter is a POSIX shell script")
    bindir = tmp_path / "envs" / "torch" / "bin"
    bindir.mkdir(parents=True)
    log = tmp_path / "python-calls.log"
    python = bindir / "python"
    python.write_text(FAKE_PYTHON.format(log=log))
    python.chmod(0o755)
    return tmp_path / "envs", log, tmp_path / "envs" / "torch" / "bkn-install.json"


def _run(envdir: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*_nox(), "-f", str(ROOT / "noxfile.py"), "--envdir", str(envdir), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _calls(log: pathlib.Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("session", ["convergence", "main", "accuracy"])
def test_install_only_installs_and_runs_nothing(fake_env, session):
    envdir, log, stamp = fake_env
    done = _run(envdir, "-s", session, "--install-only")
    assert done.returncode == 0, done.stdout + done.stderr
    calls = _calls(log)
    installs = [c for c in calls if c.startswith("-m pip install")]
    assert len(installs) == 1, calls  # installed once (main's queued sessions then find the stamp)
    assert installs[0].endswith("-e .[all]")
    # after the install, the kernels are compiled for the new venv; no probe, no report
    assert [c for c in calls if c.startswith("-m ") and not c.startswith("-m pip")] == ["-m bkn.kernels"], calls
    assert json.loads(stamp.read_text()) == _valid_stamp()


def _valid_stamp() -> dict:
    """The stamp of a venv that holds ``.[all]`` installed from this pyproject.toml."""
    return {"pyproject": hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest(), "extras": ["all"]}


def test_install_only_with_a_valid_stamp_runs_nothing(fake_env):
    envdir, log, stamp = fake_env
    stamp.write_text(json.dumps(_valid_stamp()))
    done = _run(envdir, "-s", "convergence", "tests", "--install-only")
    assert done.returncode == 0, done.stdout + done.stderr
    assert [c for c in _calls(log) if c != "-c import sys"] == []  # neither pip nor the sessions' commands
    assert "Reusing the shared torch venv" in done.stdout + done.stderr


def test_a_stale_stamp_reinstalls(fake_env):
    envdir, log, stamp = fake_env
    stamp.write_text(json.dumps({"pyproject": "an older pyproject.toml", "extras": ["all"]}))
    done = _run(envdir, "-s", "report", "--install-only")
    assert done.returncode == 0, done.stdout + done.stderr
    assert [c for c in _calls(log) if c.startswith("-m pip install")] != []
    assert json.loads(stamp.read_text())["pyproject"] != "an older pyproject.toml"


def test_the_main_job_runs_bench_both_probes_then_the_report(fake_env):
    """The report comes last, after every result it shows: timings, drift and training (the quick probe)."""
    envdir, log, stamp = fake_env
    stamp.write_text(json.dumps(_valid_stamp()))
    done = _run(envdir, "-s", "main", "--", "--fail-on-regression")
    assert done.returncode == 0, done.stdout + done.stderr
    calls = [c for c in _calls(log) if c.startswith("-m ") and not c.startswith("-m asv machine")]
    modules = [c.split()[1] for c in calls]
    # bench; the drift probe and its page; the training probe and its page; the main report
    assert modules == ["asv", "bkn.probes.drift"] + ["analysis.report", "bkn.probes.training"] + 2 * ["analysis.report"]
    assert "-m bkn.probes.training --quick" in calls
    assert calls[-1] == "-m analysis.report --fail-on-regression"


def _main_benchmarks() -> tuple[str, ...]:
    """noxfile's ``MAIN_BENCHMARKS``, evaluated from its own assignments (nox itself need not be installed)."""
    import ast

    tree = ast.parse((ROOT / "noxfile.py").read_text())
    wanted = {"_DEFAULT_VARIANT", "MAIN_BENCHMARKS"}
    body = [n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) in wanted]
    namespace: dict = {}
    exec(compile(ast.Module(body=body, type_ignores=[]), "noxfile.py", "exec"), namespace)
    return namespace["MAIN_BENCHMARKS"]


def test_the_main_jobs_benchmark_filter_selects_float32_contiguous_forward_backward_and_the_copy():
    """asv matches a parametrized benchmark's regex against ``name(repr(param), ...)`` (asv.benchmarks.Benchmarks):
    the main job must select every method, group size and shape in float32/contiguous, and nothing else."""
    import itertools
    import re

    from suites import bench_bandwidth, bench_layers

    patterns = _main_benchmarks()

    def selected(name: str, params) -> list[tuple]:
        combos = itertools.product(*params)
        return [c for c in combos if any(re.search(p, f"{name}({', '.join(map(repr, c))})") for p in patterns)]

    layer = bench_layers.TimeForwardBackward
    chosen = selected("bench_layers.TimeForwardBackward.time_forward_backward", layer.params)
    every = list(itertools.product(*layer.params))
    assert chosen == [c for c in every if c[-2:] == ("float32", "contiguous")]
    assert {c[0] for c in chosen} == set(layer.params[0])  # every method, rivals included
    copy = selected("bench_bandwidth.TimeCopy.time_copy", bench_bandwidth.TimeCopy.params)
    assert copy and all(c[-2:] == ("float32", "contiguous") for c in copy)
    assert not selected("bench_layers.TimeForwardTrain.time_forward_train", bench_layers.TimeForwardTrain.params)
    assert any(re.search(p, "bench_layers.TrackThreads.track_threads") for p in patterns)
