"""The GPU check (python -m suites.gpu) on the CPU: its tidy file, its budgets, its report section, its carry.

The run on a GPU cannot happen here; ``--device cpu --quick`` runs the same pipeline on tiny
shapes (graphs and the CUDA-only parts skipped, saying why), which is what these tests check,
together with the pieces that are device-independent: the budgets, the junit reading, the
report section on a GPU-like file, the size of what travels, and (slow) asv installed offline
from the packed wheels, recording a CPU subset.
"""

from __future__ import annotations

import math
import pathlib
import subprocess
import tarfile

import pandas as pd
import pytest
import torch

from analysis import report
from bkn.probes.results import ENVIRONMENT_COLUMNS, GPU
from suites.gpu import carry, checks, cli
from suites.gpu.run import Run

ROOT = pathlib.Path(__file__).resolve().parent.parent
FAST_PARTS = "bandwidth,graph,layer,tests,asv"


def _quick(tmp_path, monkeypatch, *extra) -> pd.DataFrame:
    monkeypatch.setenv("BKN_NATIVE", "0")  # what the script sets for itself; restored after the test
    argv = ["--device", "cpu", "--quick", "--threads", "1", "--methods", "bn", "bkn-analytic"]
    argv += ["--budget", "600", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "out"), *extra]
    assert cli.main(argv) == 0
    return GPU.read(GPU.path(tmp_path / "results"))


def _report(tmp_path) -> str:
    out = tmp_path / "report.html"
    argv = ["--sections", "gpu", "--results", str(tmp_path / "results"), "--asv-results", str(tmp_path / "no-asv")]
    assert report.main([*argv, "--out", str(out), "--quiet"]) == 0
    return out.read_text(encoding="utf-8")


def test_quick_cpu_run_writes_the_tidy_file_and_the_report_shows_it(tmp_path, monkeypatch, one_thread):
    frame = _quick(tmp_path, monkeypatch, "--parts", FAST_PARTS)
    assert list(frame.columns) == list(GPU.all_columns)  # the contract's columns, in order
    assert set(frame["part"]) == set(FAST_PARTS.split(","))
    assert (frame["device"] == "cpu").all() and (frame["backend"] == "torch").all()  # BKN_NATIVE=0: no C++ build
    assert frame["torch"].str.len().gt(0).all() and frame["triton"].str.len().gt(0).all()
    assert set(ENVIRONMENT_COLUMNS) <= set(frame.columns) and (frame["threads"] == 1).all()
    assert not (frame["status"] == "failed").any(), frame[frame["status"] == "failed"]["note"].tolist()

    ratios = frame[(frame["part"] == "layer") & (frame["metric"] == "ratio_to_bn")]
    assert set(ratios["item"]) == {"bn", "bkn-analytic"} and len(ratios) == 2 * 3  # 2 stage shapes + the large one
    assert (ratios["value"] > 0).all() and ratios["value"].map(math.isfinite).all()
    large = ratios[ratios["shape"] == "4x8x16x16"].set_index("item")["target"]
    small = ratios[ratios["shape"] == "4x6x5x5"].set_index("item")["target"]
    assert large.to_dict() == {"bn": 1.1, "bkn-analytic": 1.1} and small.to_dict() == {"bn": 1.2, "bkn-analytic": 1.4}
    fraction = frame[frame["metric"] == "fraction_of_copy"]
    assert len(fraction) == 3 and (fraction["target"] == 0.7).sum() == 2  # torch-bn: no target

    graph = frame[frame["part"] == "graph"]
    syncs = graph[graph["metric"] == "host_syncs"].set_index("item")
    assert syncs["value"].to_dict() == {"bn": 0, "bkn-analytic": 0} and (syncs["target"] == 0).all()
    launches = graph[graph["metric"] == "aten_ops_per_norm"].set_index("item")
    assert (launches["value"] > 2).all() and launches["target"].to_dict() == {"bn": 8, "bkn-analytic": 16}
    skipped = graph[graph["status"] == "skipped"]
    assert len(skipped) == 2 and skipped["note"].str.contains("CUDA graphs need a CUDA device").all()
    for part, why in (("tests", "--quick"), ("asv", "CUDA rows")):
        rows = frame[frame["part"] == part]
        assert (rows["status"] == "skipped").all() and rows["note"].str.contains(why).all()

    copies = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert copies == ["gpu.log", "gpu.parquet", "meta.json"]
    log = (tmp_path / "out" / "gpu.log").read_text()
    assert "-- layer (until" in log and "] wrote " in log and log.startswith("[")

    html = _report(tmp_path)
    assert "<h2>GPU</h2>" in html and "Layer table" in html and "Graph checks" in html
    assert "a `--device cpu` run" in html.replace("<code>", "`").replace("</code>", "`")
    assert "data:image/png;base64," in html  # the ratio figure


def test_parts_out_of_budget_are_recorded_as_skipped(tmp_path, monkeypatch, one_thread):
    frame = _quick(tmp_path, monkeypatch, "--budget", "0.001")
    assert set(frame["part"]) == set(cli.PARTS)
    timed_out = frame[frame["note"].str.contains("out of time")]
    assert set(timed_out["part"]) >= {"bandwidth", "graph", "layer", "network"}
    assert (timed_out["status"] == "skipped").all() and timed_out["value"].isna().all()


def test_a_part_that_raises_is_recorded_and_the_rest_goes_on(tmp_path, monkeypatch):
    from suites.gpu import parts

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(parts, "bandwidth", broken)
    frame = _quick(tmp_path, monkeypatch, "--parts", "bandwidth,tests", "--methods", "bn")
    row = frame[frame["part"] == "bandwidth"].iloc[0]
    assert row["status"] == "failed" and "illegal memory access" in row["note"] and row["item"] == "(the part)"
    assert (frame["part"] == "tests").any() and (tmp_path / "out" / "gpu.parquet").is_file()


def test_each_part_ends_at_its_point_of_the_schedule():
    run = Run(100.0)
    first, second, third = run.part("a", 30), run.part("b", 50), run.part("c", 40)
    assert (first.ends_at, second.ends_at, third.ends_at) == (30, 80, 100)  # capped at the run's budget
    assert 79 < second.left() <= 80 and "the b part had until 80 s" in second.why()
    with pytest.raises(ValueError, match="row status"):
        run.add("layer", "bn", "time_s", 1.0, status="done")


def test_unknown_part_or_method_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("BKN_NATIVE", "0")
    with pytest.raises(SystemExit, match="unknown part.*layers.*choose from"):
        cli.main(["--device", "cpu", "--parts", "layers", "--results", str(tmp_path)])
    with pytest.raises(ValueError, match="bkn-fast"):
        cli.main(["--device", "cpu", "--methods", "bkn-fast", "--results", str(tmp_path)])


def test_report_says_how_to_produce_a_missing_gpu_file(tmp_path):
    html = _report(tmp_path)
    assert "Missing:" in html and "python -m suites.gpu" in html and "docs/gpu.md" in html


def _gpu_like(tmp_path) -> None:
    """A tidy file as a CUDA run would write it (values chosen to fall on both sides of the targets)."""
    run = Run(10.0)
    for shape in ("8x64x56x56", "8x128x256x256"):
        run.add("layer", "torch-bn", "time_s", 1e-4, shape=shape, dtype="float32", mode="fwd+bwd")
        run.add("layer", "bn", "ratio_to_bn", 1.1, target=1.2, shape=shape, dtype="float32", mode="fwd+bwd")
        run.add("layer", "bkn-analytic", "ratio_to_bn", 1.9, target=1.4, shape=shape, dtype="float32", mode="fwd+bwd")
    for item, fraction in (("bn", 0.8), ("bkn-analytic", 0.5)):
        run.add("layer", item, "achieved_Bps", fraction * 3e12, shape="8x128x256x256", dtype="float32")
        run.add("layer", item, "fraction_of_copy", fraction, target=0.7, shape="8x128x256x256", dtype="float32")
    run.add("network", "bkn-official", "ratio_to_bn", 2.2, target=2.5, shape="resnet18-8x3x224x224", mode="eager")
    run.add("network", "bkn-official", "ratio_to_bn", 1.9, target=1.8, shape="resnet18-8x3x224x224", mode="graphed")
    run.add("graph", "brn", "host_syncs", 1, target=0, note="first at _renorm_function.py:80")
    run.fail("graph", "brn", "capture impossible: the step synchronises with the host")
    env = {"commit": "abc", "torch": "2.11.0", "device": "cuda", "threads": 16}
    extra = {"triton": "3.6.0", "device_name": "NVIDIA H200", "backend": "triton"}
    GPU.write(GPU.frame([{**r, **extra} for r in run.rows], env), env, GPU.path(tmp_path / "results").parent)


def test_report_marks_each_ratio_against_its_target(tmp_path):
    _gpu_like(tmp_path)
    html = _report(tmp_path)
    assert "NVIDIA H200" in html and "`triton`" in html.replace("<code>", "`").replace("</code>", "`")
    assert "1.10× ✓ (≤ 1.2)" in html and "1.90× ✗ (≤ 1.4)" in html  # the layer table
    assert "0.80 ✓ (≥ 0.7)" in html and "0.50 ✗ (≥ 0.7)" in html  # fraction of copy bandwidth
    assert "2.20× ✓ (≤ 2.5)" in html and "1.90× ✗ (≤ 1.8)" in html  # the network steps, eager and graphed
    assert "capture impossible" in html and "Skipped and failed" in html
    assert "--device cpu" not in html  # no pipeline-check notice for a GPU file


def test_import_takes_back_what_came_from_the_machine(tmp_path, monkeypatch):
    _gpu_like(tmp_path)
    came_back = tmp_path / "back"
    came_back.mkdir()
    for name in ("gpu.parquet", "meta.json"):
        (came_back / name).write_bytes((GPU.path(tmp_path / "results").parent / name).read_bytes())
    root = tmp_path / "checkout"
    (root / ".asv" / "results" / "m").mkdir(parents=True)
    result = root / ".asv" / "results" / "m" / "abc-existing.json"
    result.write_text("{}")
    with tarfile.open(came_back / carry.ASV_ARCHIVE, "w:gz") as tar:
        tar.add(result, arcname=".asv/results/m/abc-existing.json")
        tar.add(result, arcname="../escape.json")  # a member outside .asv/results is not unpacked
    result.unlink()
    monkeypatch.setattr(carry, "ROOT", root)
    assert cli.main(["--import", str(came_back), "--results", str(tmp_path / "imported")]) == 0
    sent = GPU.read(came_back / "gpu.parquet")
    assert GPU.read(GPU.path(tmp_path / "imported")).equals(sent) and result.exists()
    assert not (tmp_path / "escape.json").exists()
    assert cli.main(["--import", str(tmp_path / "nothing"), "--results", str(tmp_path / "x")]) == 2


def test_read_junit_counts_outcomes_and_names_the_failures(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="tests.test_cuda" name="test_a"/>'
        '<testcase classname="tests.test_cuda" name="test_b"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_cuda" name="test_c"><skipped/></testcase>'
        '<testcase classname="tests.test_cuda" name="test_d"><error message="y"/></testcase></testsuite></testsuites>'
    )
    counts = checks.read_junit(xml)
    assert {k: counts[k] for k in ("passed", "failed", "errors", "skipped")} == {
        "passed": 1,
        "failed": 1,
        "errors": 1,
        "skipped": 1,
    }
    assert counts["failing"] == ["tests.test_cuda::test_b", "tests.test_cuda::test_d"]
    assert checks.read_junit(tmp_path / "missing.xml") is None
    assert "tests/test_cuda.py" in checks.cuda_test_files()


def test_what_travels_stays_well_under_the_device_tools_64_mib():
    """The working tree (tracked and untracked-not-ignored files) plus the carried .gpu/ folder."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    tree = sum((ROOT / p).stat().st_size for p in listed if p and (ROOT / p).is_file())
    packed = sum(p.stat().st_size for p in carry.PACK.rglob("*") if p.is_file()) if carry.PACK.is_dir() else 0
    assert tree + packed < 32 * 2**20, (tree, packed)
    assert ".gpu/" in (ROOT / ".gitignore").read_text().splitlines()  # carried, never committed


@pytest.mark.slow
def test_full_quick_pipeline_includes_the_network_steps(tmp_path, monkeypatch, one_thread):
    frame = _quick(tmp_path, monkeypatch, "--networks", "cifar-resnet20")
    steps = frame[(frame["part"] == "network") & (frame["metric"] == "ratio_to_bn")]
    assert set(steps["item"]) == {"bn", "bkn-analytic"} and (steps["mode"] == "eager").all()
    graphed = frame[(frame["part"] == "network") & (frame["mode"] == "graphed")]
    assert (graphed["status"] == "skipped").all() and len(graphed) == 3  # torch-bn, bn, bkn-analytic
    assert "Network training steps" in _report(tmp_path)


@pytest.mark.slow
def test_asv_installs_offline_from_the_packed_wheels_and_records_a_cpu_subset(tmp_path):
    if not (carry.WHEELS.is_dir() and carry.REPO.is_dir() and carry.packed_commit()):
        pytest.skip("nothing packed: run `python -m suites.gpu --pack` first (needs the package index)")
    run = Run(600.0, tmp_path / "log")
    subset = (("bench_layers.TrackThreads.track_threads", ()),)
    carry.asv_part(run, run.part("asv", 600), tmp_path, subset=subset, results_dir=tmp_path / "results")
    (row,) = run.rows
    assert row["status"] == "ok" and row["value"] == 1, row
    with tarfile.open(tmp_path / carry.ASV_ARCHIVE) as tar:
        names = tar.getnames()
    assert ".asv/results/benchmarks.json" in names and any(n.startswith(".asv/results/gpu-lent/") for n in names)


@pytest.mark.slow
def test_the_tests_part_runs_pytest_with_the_sync_debug_option(tmp_path):
    """On the CPU every CUDA test skips; the run still goes through the option, the junit file and the rows."""
    run = Run(600.0)
    checks.cuda_tests(run, run.part("tests", 600), torch.device("cpu"), tmp_path)
    rows = {r["metric"]: r for r in run.rows}
    assert set(rows) == {"passed", "failed", "errors", "skipped"} and rows["skipped"]["value"] > 100
    assert rows["failed"]["value"] == rows["errors"]["value"] == 0 and rows["passed"]["status"] == "ok"
    assert "--cuda-sync-debug=error" in run.lines[0] and (tmp_path / "pytest.log").is_file()


def test_the_asv_subset_names_real_cuda_combinations():
    """Every entry of suites.gpu.carry.ASV_SUBSET is a benchmark asv finds, with parameter values in its matrix."""
    discovery = pytest.importorskip("asv_runner.discovery")
    found = {b.name: b for b in discovery.disc_benchmarks(str(ROOT / "suites"))}
    for name, params in carry.ASV_SUBSET:
        bench = found[name]
        matrix = bench.params or []  # each value as its repr, as in asv's names
        assert len(params) == len(matrix) and all(repr(p) in values for p, values in zip(params, matrix)), name
        assert not params or "cuda" in params
