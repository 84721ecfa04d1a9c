"""The report command line (``python -m analysis.report``): end to end on synthetic and real asv files.

Inputs: tests/analysis_fixtures.py (asv 0.6 result files with known true times, both probes'
result files written through the results contract) and tests/data/asv_toy_results (files
written by asv 0.6.6 itself).
"""

from __future__ import annotations

import base64
import math
import pathlib
import re
import shutil

import analysis_fixtures as af
import pandas as pd
import pytest

from analysis import report
from bkn.probes.results import BLOCK_BENCHMARK, COPY_REFERENCE, GROUP_PARAM, LAYER_BENCHMARK, LAYER_PARAMS, METHOD_PARAM

TOY = pathlib.Path(__file__).parent / "data" / "asv_toy_results"

URL = re.compile(r"(?i)\b(?:https?|ftp|wss?):|//[a-z0-9.-]+\.[a-z]{2,}")


def _check_self_contained(html: str) -> int:
    """No URL anywhere; every image an embedded PNG that decodes; returns the number of images."""
    assert not URL.search(html), URL.search(html).group(0)
    assert "<script" not in html and "<link" not in html
    sources = re.findall(r'<img[^>]*\bsrc="([^"]*)"', html)
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    for href in re.findall(r'\bhref="([^"]*)"', html):
        assert href.startswith("#") or not re.match(r"^[a-z]+:", href), href
    return len(sources)


def _run(tmp_path, *args) -> tuple[int, str, pathlib.Path]:
    out = tmp_path / "out" / "report.html"
    code = report.main(
        [
            "--asv-results",
            str(tmp_path / "asv"),
            "--results",
            str(tmp_path / "results"),
            "--out",
            str(out),
            "--quiet",
            *args,
        ]
    )
    return code, out.read_text(encoding="utf-8") if out.exists() else "", out


@pytest.mark.slow
def test_report_end_to_end(tmp_path, capsys):
    af.write_asv_results(tmp_path / "asv", af.method_benches(), af.planted_truth(), commits=2, samples=10, seed=5)
    af.write_probes(tmp_path / "results")
    code, html, out = _run(tmp_path)
    assert code == 0
    assert f"Report written: {out.resolve()}" in capsys.readouterr().out
    images = _check_self_contained(html)
    assert images >= 12
    for title in ("Environment", "Timing", "Regressions across commits", "Statistic drift", "Training probe", "GPU"):
        assert f"<h2>{title}</h2>" in html
    assert 'class="badge ok"' in html and "badge error" not in html and "badge missing" not in html
    assert "1 significant regression</span>" in html and "Missing:" not in html
    data = out.parent / "report_data"
    names = {p.name for p in data.glob("*.csv")}
    assert {
        "timing_timing.csv",
        "timing_ratio_to_bn.csv",
        "timing_bandwidth.csv",
        "regressions_verdicts.csv",
        "regressions_trends.csv",
        "drift_drift_by_group_size.csv",
        "training_training_final.csv",
        "training_pareto_points.csv",
        "training_ranked_mnist1d_convnet.csv",
    } <= names
    assert "The answer: accuracy against the cost of a step" in html and "at a group of 2" in html
    saved = pd.read_csv(data / "regressions_verdicts.csv")
    assert (saved["verdict"] == "regression").sum() == 1
    ratio = pd.read_csv(data / "timing_ratio_to_bn.csv")
    bkn = ratio[ratio[METHOD_PARAM] == "bkn-official"]["ratio_to_bn"]
    assert bkn.median() == pytest.approx(1.5, rel=0.1)  # synthetic truth: 4.5 / 3.0 (plus the fixed 2 us)
    # Bandwidth: bytes the operation must move over its time, next to the copy's rate (the copy found
    # by its name, bkn.probes.results.COPY_REFERENCE). Synthetic truth at large tensors (the fixed 2 us fades):
    # the copy moves 2 x 4 bytes per element in 1e-9 s (8 GB/s); bn's forward 2 x 4 bytes in 3e-9 s, its
    # forward + backward 5 x 4 bytes in 7.5e-9 s (2.67 GB/s both); so a third of the copy's rate.
    rate = pd.read_csv(data / "timing_bandwidth.csv")
    big = rate[(rate["shape"] == "64x56x56") & (rate[GROUP_PARAM] == 8)]
    for bench, moved in (("layers.TimeNorm.time_forward", 2), ("layers.TimeNorm.time_forward_backward", 5)):
        row = big[(big["benchmark"] == bench) & (big[METHOD_PARAM] == "bn")]
        assert len(row) == 1
        assert row["bytes_moved"].iloc[0] == moved * 4 * 8 * 64 * 56 * 56
        assert row["bytes_per_s"].iloc[0] == pytest.approx(8 / 3 * 1e9, rel=0.1)
        assert row["copy_bytes_per_s"].iloc[0] == pytest.approx(8e9, rel=0.1)
        assert row["fraction_of_copy_rate"].iloc[0] == pytest.approx(1 / 3, rel=0.1)
    assert not (rate["benchmark"] == "layers.PeakMemNorm.peakmem_forward").any()  # memory has no rate
    assert "Bytes the operation must move" in html
    assert "time vs group size, one line per method" in html
    assert not list(out.parent.glob(".*.tmp"))  # no temporary files left behind

    # --fail-on-regression turns the planted slowdown into a failing exit status; the page is still written.
    out.unlink()
    code, html, _ = _run(tmp_path, "--fail-on-regression", "--sections", "regressions")
    assert code == 1 and "1 significant regression</span>" in html


def test_copy_reference_is_found_by_its_name_only(tmp_path):
    # A timed benchmark with the copy's parameters but another name is not the bandwidth reference.
    benches = af.method_benches()
    benches[-1] = af.Bench("elsewhere.TimeCopy.time_copy", benches[-1].param_names, benches[-1].params)
    af.write_asv_results(tmp_path / "asv", benches, af.method_truth, commits=1, samples=3)
    code, html, out = _run(tmp_path, "--sections", "timing")
    assert code == 0 and f"No copy-bandwidth reference (<code>{COPY_REFERENCE}</code>" in html
    rate = pd.read_csv(out.parent / "report_data" / "timing_bandwidth.csv")
    assert rate["bytes_per_s"].notna().all() and rate["copy_bytes_per_s"].isna().all()


def _chain_benches() -> list:
    """The fair pair of the chain-cost figure: the layer alone and the block, as the suites name them."""
    values = [["bn", "bkn-official", "bkn-analytic", "gn"], [2, 8], ["64x56x56", "512x7x7"], ["cpu"]]
    values += [["float32"], ["contiguous"]]
    return [
        af.Bench(LAYER_BENCHMARK, list(LAYER_PARAMS), values),
        af.Bench(BLOCK_BENCHMARK, list(LAYER_PARAMS), values),
    ]


@pytest.mark.parametrize("planted", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_chain_cost_splits_a_planted_chain_from_the_norm(tmp_path, planted):
    # Block time = conv (10 units) + norm + chain; per BN block (10 + 1): official's norm costs 1.2
    # (0.2 over BN's) and its chain 4.4, analytic's chain 1.1. Without a planted chain every BKN chain
    # share must be ~0 while the norm's share stays.
    norm = {"bn": 1.0, "bkn-official": 1.2, "bkn-analytic": 1.2, "gn": 1.5}
    chain = {"bkn-official": 4.4, "bkn-analytic": 1.1} if planted else {}

    def truth(commit, bench, combo):
        p = dict(zip(bench.param_names, combo))
        scale = 1e-4 * p[GROUP_PARAM] * (2.0 if p["shape"] == "64x56x56" else 1.0)
        layer = norm[p[METHOD_PARAM]]
        if bench.name == LAYER_BENCHMARK:
            return scale * layer
        return scale * (10.0 + layer + chain.get(p[METHOD_PARAM], 0.0))

    af.write_asv_results(tmp_path / "asv", _chain_benches(), truth, commits=1, samples=3, sigma=0.001, outliers=0.0)
    code, html, out = _run(tmp_path, "--sections", "timing")
    assert code == 0 and "Chain cost: what BKN" in html
    cost = pd.read_csv(out.parent / "report_data" / "timing_chain_cost.csv")
    assert set(cost[METHOD_PARAM]) == {"bkn-official", "bkn-analytic"}  # BKN methods only
    assert len(cost) == 2 * 2 * 2  # methods x group sizes x shapes
    by = cost.groupby(METHOD_PARAM)[["whole", "norm", "chain"]].median()
    assert by.loc["bkn-official", "norm"] == pytest.approx(0.2 / 11, rel=0.05)
    expect = {"bkn-official": 4.4 / 11, "bkn-analytic": 1.1 / 11} if planted else {}
    for method in ("bkn-official", "bkn-analytic"):
        assert by.loc[method, "chain"] == pytest.approx(expect.get(method, 0.0), abs=0.01)


def test_fail_on_regression_passes_when_nothing_regressed(tmp_path):
    same = lambda commit, bench, combo: af.method_truth(0, bench, combo)  # noqa: E731
    af.write_asv_results(tmp_path / "asv", af.method_benches(), same, commits=2, samples=10)
    code, html, _ = _run(tmp_path, "--fail-on-regression", "--sections", "regressions")
    assert code == 0 and "0 significant regressions</span>" in html


def test_missing_inputs_say_which_command_produces_them(tmp_path):
    code, html, _ = _run(tmp_path)
    assert code == 0
    nav = html.split("<nav>")[1].split("</nav>")[0]
    assert nav.count('class="badge missing"') == 6 and html.count("Missing:") >= 7
    for command in ("nox -s bench", "asv run", "nox -s accuracy", "nox -s convergence", "python -m suites.gpu"):
        assert f"<code>{command}" in html
    _check_self_contained(html)

    # One commit only: the regression section asks for a second one; the timing section is built.
    af.write_asv_results(tmp_path / "asv", af.method_benches(), af.method_truth, commits=1, samples=3)
    code, html, _ = _run(tmp_path, "--sections", "timing,regressions", "--fail-on-regression")
    assert code == 0
    assert "asv results for a second commit" in html and "<h2>Timing</h2>" in html
    assert html.count("<img") >= 3


def test_corrupt_inputs_are_reported_in_the_page(tmp_path):
    hashes = af.write_asv_results(tmp_path / "asv", af.method_benches(), af.method_truth, commits=3, samples=5)
    victim = next((tmp_path / "asv" / af.MACHINE).glob(f"{hashes[2][:8]}-*.json"))
    victim.write_bytes(victim.read_bytes()[:-200])
    af.write_probes(tmp_path / "results")
    drift = tmp_path / "results" / "accuracy" / "drift.parquet"
    drift.write_bytes(drift.read_bytes()[:300])
    code, html, _ = _run(tmp_path, "--sections", "env,regressions,drift")
    assert code == 0
    assert str(victim) in html and str(drift) in html
    assert "warnings while reading the results" in html
    assert "badge error" not in html
    # The two intact commits are still compared; the drift section says what is missing.
    assert f"{hashes[0][:8]} vs head {hashes[1][:8]}" in html
    assert "corrupt or truncated parquet file" in html and "<h2>Environment</h2>" in html


def test_base_and_head_options(tmp_path):
    hashes = af.write_asv_results(tmp_path / "asv", af.method_benches(), af.planted_truth(), commits=3, samples=10)
    # Commit 1 carries the slowdown, commit 2 is back to normal (the fixture plants it at index 1 only).
    code, html, _ = _run(
        tmp_path,
        "--sections",
        "regressions",
        "--base",
        hashes[0][:7],
        "--head",
        hashes[2][:7],
        "--fail-on-regression",
    )
    assert code == 0 and f"Baseline {hashes[0][:8]} vs head {hashes[2][:8]}" in html
    code, html, _ = _run(tmp_path, "--sections", "regressions", "--head", hashes[1][:10], "--fail-on-regression")
    assert code == 1 and f"Baseline {hashes[0][:8]} vs head {hashes[1][:8]}" in html
    code, html, _ = _run(tmp_path, "--sections", "regressions", "--base", "cafe1234")
    assert code == 2 and "no asv results for revision" in html and "badge error" in html


def test_cli_rejects_bad_options(tmp_path, capsys):
    for bad in (["--sections", "timing,bogus"], ["--threshold", "-1"], ["--alpha", "2"]):
        with pytest.raises(SystemExit) as exc:
            report.main(["--out", str(tmp_path / "r.html"), *bad])
        assert exc.value.code == 2
    assert "bogus" in capsys.readouterr().err


def test_a_failed_render_leaves_the_previous_report(tmp_path, monkeypatch):
    out = tmp_path / "out" / "report.html"
    out.parent.mkdir()
    out.write_text("previous report")

    def broken(*args, **kwargs):
        raise RuntimeError("template exploded")

    monkeypatch.setattr(report, "render", broken)
    with pytest.raises(RuntimeError):
        _run(tmp_path, "--sections", "env")
    assert out.read_text() == "previous report"
    assert [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_real_asv_files_make_a_report(tmp_path):
    shutil.copytree(TOY, tmp_path / "asv")
    code, html, out = _run(tmp_path, "--sections", "env,timing,regressions")
    assert code == 0 and "badge error" not in html
    assert "bench_x.TimeNorm.time_forward" in html and "faster (untested)" in html
    _check_self_contained(html)
    assert math.isfinite(pd.read_csv(out.parent / "report_data" / "timing_timing.csv")["value"].max())
