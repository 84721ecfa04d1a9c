"""The report's data-parallel table: a DDP step at K workers against one process, SyncBN over BN.

Inputs are synthetic asv 0.6 result files (tests/analysis_fixtures.py) with the DDP
benchmark's parameters beside a layer benchmark's, so the table must pick its rows out of
a mixed frame.
"""

from __future__ import annotations

import analysis_fixtures as af
import pandas as pd
import pytest

from analysis import report
from bkn.probes.results import GROUP_PARAM, METHOD_PARAM

DDP = "bench_distributed.TimeDDPTrainStep.time_train_step"
# Synthetic truth (seconds): one process, and what 2 workers add (SyncBN's statistics all-reduces on top).
ONE_PROCESS = {"bn": 8e-3, "syncbn": 8e-3, "bkn-official": 18e-3}
ADDED = {"bn": 6e-3, "syncbn": 56e-3, "bkn-official": 9e-3}


def truth(commit, bench, combo):
    named = dict(zip(bench.param_names, combo))
    if bench.name != DDP:
        return af.method_truth(commit, bench, combo)
    method, workers = named[METHOD_PARAM], named["world_size"]
    return ONE_PROCESS[method] + (ADDED[method] if workers == 2 else 0.0)


def test_the_report_shows_what_two_workers_add_per_step(tmp_path):
    ddp = af.Bench(DDP, [METHOD_PARAM, GROUP_PARAM, "world_size"], [list(ONE_PROCESS), [2], [1, 2]])
    af.write_asv_results(
        tmp_path / "asv", [*af.method_benches(), ddp], truth, commits=1, samples=5, sigma=1e-4, outliers=0
    )
    out = tmp_path / "out" / "report.html"
    args = ["--asv-results", str(tmp_path / "asv"), "--results", str(tmp_path / "results")]
    assert report.main([*args, "--out", str(out), "--quiet", "--sections", "timing"]) == 0
    html = out.read_text(encoding="utf-8")
    assert "Data-parallel step: what the all-reduce costs" in html and "world size 2" in html

    table = pd.read_csv(out.parent / "report_data" / "timing_distributed.csv").set_index(METHOD_PARAM)
    assert set(table.index) == set(ONE_PROCESS) and (table["workers"] == 2).all()
    for method, added in ADDED.items():
        assert table.loc[method, "added"] == pytest.approx(added, rel=1e-2)
        assert table.loc[method, "ratio"] == pytest.approx(
            (ONE_PROCESS[method] + added) / ONE_PROCESS[method], rel=1e-2
        )
    # SyncBN's pooled statistics: its 2-worker step over BN's 2-worker step.
    assert table.loc["syncbn", "over_bn"] == pytest.approx(50e-3, rel=1e-2)
    assert pd.isna(table.loc["bn", "over_bn"])  # the baseline itself
    assert list(table.index) == ["bn", "bkn-official", "syncbn"]  # the registry's (legend) order


@pytest.mark.slow
def test_no_world_size_means_no_data_parallel_table(tmp_path):
    af.write_asv_results(tmp_path / "asv", af.method_benches(), af.method_truth, commits=1, samples=3)
    out = tmp_path / "out" / "report.html"
    args = ["--asv-results", str(tmp_path / "asv"), "--results", str(tmp_path / "results")]
    assert report.main([*args, "--out", str(out), "--quiet", "--sections", "timing"]) == 0
    assert "Data-parallel step" not in out.read_text(encoding="utf-8")
    assert not (out.parent / "report_data" / "timing_distributed.csv").exists()
