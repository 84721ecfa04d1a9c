"""Regression gating (``nox -s continuous``): the tracking subset, the paired-rounds test, the driver's pieces.

The end-to-end check on a real git repository with a planted slowdown is
tests/test_continuous_gate.py (slow).
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess

import analysis_fixtures as af
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import continuous, planted, report, rounds
from analysis.significance import mann_whitney_u
from suites import tracking

# -- the tracking subset ------------------------------------------------------------------------


def _benchmark_class(name: str):
    module, cls, method = name.split(".")
    mod = __import__(f"suites.{module}", fromlist=[cls])
    return getattr(mod, cls), method


def test_tracking_entries_name_existing_parameter_combinations():
    assert len(tracking.TRACKING) == len(set(tracking.TRACKING)) == 31
    for name, params in tracking.TRACKING:
        cls, method = _benchmark_class(name)
        assert hasattr(cls, method), name
        declared = getattr(cls, "params", [])
        if not params:
            assert not declared, f"{name} is parametrized; the entry gives no parameters"
            continue
        assert len(declared) == len(params), name
        for value, allowed in zip(params, declared):
            assert value in allowed, f"{name}: {value!r} is not one of {allowed}"


def test_tracking_covers_every_method_in_each_layer_family():
    from bkn import methods
    from suites.harness.matrix import METHODS as MATRIX

    METHODS = [m for m in MATRIX if m not in methods.names(tag="rival")]  # the rivals are timed, not gated
    assert len(METHODS) == 7 and set(MATRIX) - set(METHODS) == set(methods.names(tag="rival"))
    by_bench = {}
    for name, params in tracking.TRACKING:
        by_bench.setdefault(name, []).append(params)
    fb = by_bench["bench_layers.TimeForwardBackward.time_forward_backward"]
    assert {p[0] for p in fb} == set(METHODS) and {(p[1], p[2]) for p in fb} == {(8, "64x56x56"), (2, "512x7x7")}
    step = by_bench["bench_network.TimeCifarResNetGroupedStep.time_train_step"]
    assert {p[0] for p in step} == set(METHODS) and {p[1] for p in step} == {2}  # groups of 2 inside a batch
    assert "bench_bandwidth.TimeCopy.time_copy" in by_bench


def test_selectors_match_exactly_their_own_combination():
    """Each regex matches its asv name (asv's format: the Python reprs, comma-space) and no other combination."""
    from suites.bench_layers import TimeForwardBackward

    regexes = tracking.selectors()
    names = [
        f"bench_layers.TimeForwardBackward.time_forward_backward({', '.join(repr(v) for v in combo)})"
        for combo in itertools.product(*TimeForwardBackward.params)
    ]
    import re

    matched = [n for n in names if any(re.search(r, n) for r in regexes)]
    want = [tracking.asv_name(b, p) for b, p in tracking.TRACKING if b.endswith("time_forward_backward")]
    assert sorted(matched) == sorted(want) and len(matched) == 14


# -- the paired-rounds test ---------------------------------------------------------------------


def test_paired_test_matches_scipy_ttest_on_log_ratios(rng):
    for n in (3, 5, 12):
        base = np.exp(rng.normal(0, 0.2, n))
        head = base * np.exp(rng.normal(0.1, 0.05, n))
        ratio, low, high, p = rounds.paired_test(base, head, alpha=0.01)
        d = np.log(head / base)
        ref = stats.ttest_1samp(d, 0.0)
        assert p == pytest.approx(ref.pvalue, rel=1e-10)
        assert ratio == pytest.approx(math.exp(d.mean()), rel=1e-12)
        half = stats.t.ppf(0.995, n - 1) * d.std(ddof=1) / math.sqrt(n)
        assert (low, high) == pytest.approx((math.exp(d.mean() - half), math.exp(d.mean() + half)), rel=1e-10)


def test_paired_test_degenerate_and_bad_input():
    assert rounds.paired_test([1, 1, 1], [1, 1, 1], 0.01)[3] == 1.0
    ratio, low, high, p = rounds.paired_test([1, 2, 4], [2, 4, 8], 0.01)  # the same ratio every round
    assert p == 0.0 and ratio == low == high == pytest.approx(2.0)
    assert all(math.isnan(v) for v in rounds.paired_test([1.0], [2.0], 0.01))
    with pytest.raises(ValueError, match="positive"):
        rounds.paired_test([1, 0], [1, 1], 0.01)
    with pytest.raises(ValueError, match="one head value per base value"):
        rounds.paired_test([1, 2], [1], 0.01)


BASE, HEAD = af.commit_hash(0), af.commit_hash(1)


def _rows(per_round, n_rounds=6, benches=("b.T.time_x",), params=("method=bn",)) -> pd.DataFrame:
    """Tidy rounds rows: ``per_round(r, commit, bench, param)`` is the value, in ABBA order."""
    rows = []
    for r in range(n_rounds):
        order = (BASE, HEAD) if r % 2 == 0 else (HEAD, BASE)
        for position, commit in enumerate(order):
            for b, p in itertools.product(benches, params):
                value = per_round(r, position, commit, b, p)
                rows.append(
                    dict(round=r, position=position, commit=commit, benchmark=b, param_key=p, type="time")
                    | dict(unit="seconds", value=value, n_samples=5, machine="m", env_name="e")
                )
    return pd.DataFrame(rows)


def test_planted_slowdown_is_a_regression_and_drift_is_not(rng):
    """A steady 30% slowdown under 5% noise is flagged; a machine drifting 2x across rounds is not."""
    noise = lambda: math.exp(rng.normal(0, 0.05))  # noqa: E731
    slow = _rows(lambda r, pos, c, b, p: (1.3 if c == HEAD else 1.0) * noise())
    table = rounds.paired_verdicts(slow, BASE, HEAD)
    assert table["verdict"].tolist() == ["regression"] and table["ratio"][0] == pytest.approx(1.3, rel=0.1)
    assert table["ci_low"][0] > 1.0 and table["rounds"][0] == 6

    # The machine slows down steadily (x2 over the run), each commit measured 10 samples a round.
    # Pooled samples: head, measured second in round 0 and in every even round, sees more of the drift.
    drift = lambda r, pos: 1.0 + (2 * r + pos) / 12  # noqa: E731
    rows = _rows(lambda r, pos, c, b, p: drift(r, pos) * noise())
    table = rounds.paired_verdicts(rows, BASE, HEAD)
    assert table["verdict"][0] in ("unchanged", "not significant")
    assert not (table["ratio"][0] >= 1.1 and table["p_value"][0] < rounds.DEFAULT_ALPHA)

    # The same drift measured commit after commit (all base rounds, then all head rounds): the pooled
    # Mann-Whitney test calls it significant and 1.5x -- the false alarm the interleaving avoids.
    base_samples = [drift(r, 0) * noise() for r in range(6) for _ in range(10)]
    head_samples = [drift(r + 6, 0) * noise() for r in range(6) for _ in range(10)]
    _, p, _ = mann_whitney_u(base_samples, head_samples)
    assert p < 0.002 and np.median(head_samples) / np.median(base_samples) > 1.1


def test_a_first_stage_regression_stands_only_if_the_confirmation_rounds_repeat_it(rng):
    """Confirmation rounds (stage 1) are a replication: a real slowdown repeats, a burst of load does not."""
    noise = lambda: math.exp(rng.normal(0, 0.02))  # noqa: E731
    # First rounds: head 25% slower in every round (a burst that happened to land on head).
    first = _rows(lambda r, pos, c, b, p: (1.25 if c == HEAD else 1.0) * noise(), benches=("b.T.time_x", "b.T.time_y"))
    assert set(rounds.paired_verdicts(first, BASE, HEAD)["verdict"]) == {"regression"}

    def confirmation(slowdown):
        again = _rows(lambda r, pos, c, b, p: (slowdown if c == HEAD else 1.0) * noise(), benches=("b.T.time_x",))
        return again.assign(round=again["round"] + 6, stage=1)

    # x is timed again: unchanged there -> not confirmed; y had no confirmation rounds -> stays as it was.
    table = rounds.paired_verdicts(pd.concat([first.assign(stage=0), confirmation(1.0)]), BASE, HEAD)
    table = table.set_index("benchmark")
    assert table.loc["b.T.time_x", "verdict"] == "not confirmed"
    assert table.loc["b.T.time_x", "confirm_rounds"] == 6 and table.loc["b.T.time_x", "confirm_ratio"] < 1.05
    assert table.loc["b.T.time_x", "ratio"] == pytest.approx(1.25, rel=0.05)  # the first stage's figures stay
    assert table.loc["b.T.time_y", "verdict"] == "regression" and table.loc["b.T.time_y", "confirm_rounds"] == 0

    # The slowdown repeats in the confirmation rounds -> regression, with the second test's figures.
    table = rounds.paired_verdicts(pd.concat([first.assign(stage=0), confirmation(1.3)]), BASE, HEAD)
    row = table.set_index("benchmark").loc["b.T.time_x"]
    assert row["verdict"] == "regression" and row["confirm_ratio"] == pytest.approx(1.3, rel=0.05)
    assert row["confirm_p_value"] < rounds.DEFAULT_ALPHA

    # Stage-1 rows never create a verdict on their own (they exist only for flagged benchmarks).
    quiet = _rows(lambda r, pos, c, b, p: noise())
    again = confirmation(1.5).assign(benchmark="b.T.time_x")
    assert rounds.paired_verdicts(pd.concat([quiet.assign(stage=0), again]), BASE, HEAD)["verdict"].tolist() == [
        "unchanged"
    ]


def test_rounds_file_keeps_the_stage_and_reads_files_without_it(tmp_path):
    rows = _rows(lambda r, pos, c, b, p: 1.0).drop(columns=["machine", "env_name"])
    path = rounds.rounds_path(tmp_path, BASE, HEAD)
    staged = rows.assign(stage=[0] * (len(rows) - 2) + [1, 1])
    rounds.save(path, base=BASE, head=HEAD, machine="m", env_name="e", rows=staged.to_dict("records"), meta={})
    assert rounds.load(path)[1]["stage"].tolist() == staged["stage"].tolist()
    rounds.save(path, base=BASE, head=HEAD, machine="m", env_name="e", rows=rows.to_dict("records"), meta={})
    assert (rounds.load(path)[1]["stage"] == 0).all()  # written before the field existed: first stage


def test_verdicts_for_missing_values_and_too_few_rounds():
    def value(r, pos, c, b, p):
        if b == "b.T.time_failed" and c == HEAD:
            return math.nan
        if b == "b.T.time_skipped":
            return math.nan
        return 2.0 if c == HEAD else 1.0

    benches = ("b.T.time_failed", "b.T.time_skipped", "b.T.time_ok")
    table = rounds.paired_verdicts(_rows(value, benches=benches), BASE, HEAD).set_index("benchmark")
    assert table.loc["b.T.time_failed", "verdict"] == "failed"
    assert table.loc["b.T.time_skipped", "verdict"] == "skipped"
    assert table.loc["b.T.time_ok", "verdict"] == "regression"
    few = rounds.paired_verdicts(_rows(value, n_rounds=2, benches=("b.T.time_ok",)), BASE, HEAD)
    assert few["verdict"][0] == "slower (untested)" and pd.isna(few["significant"][0])
    with pytest.raises(ValueError, match="expected only base and head"):
        rounds.paired_verdicts(_rows(value), BASE, af.commit_hash(2))


def test_rounds_file_round_trip_and_bad_file(tmp_path):
    rows = _rows(lambda r, pos, c, b, p: 1.0 + c.startswith(HEAD[:1]) * 0).drop(columns=["machine", "env_name"])
    path = rounds.rounds_path(tmp_path, BASE, HEAD)
    rounds.save(path, base=BASE, head=HEAD, machine="m", env_name="e", rows=rows.to_dict("records"), meta={"x": 1})
    header, frame = rounds.load(path)
    assert header["base"] == BASE and header["x"] == 1 and len(frame) == len(rows)
    assert set(frame["machine"]) == {"m"}
    path.write_text(json.dumps({"version": 99}))
    with pytest.raises(ValueError, match="not a rounds file"):
        rounds.load(path)


# -- the driver's pieces ------------------------------------------------------------------------


def test_round_rows_take_the_new_samples_only():
    key = ("m", "e", "b.T.time_x", "method=bn")
    other = ("m", "e", "b.T.time_x", "method=gn")
    before = {key: ([3.0, 4.0], 3.5, "time", "seconds"), other: ([9.0], 9.0, "time", "seconds")}
    after = {key: ([3.0, 4.0, 2.0, 5.0], 3.5, "time", "seconds"), other: ([9.0], 9.0, "time", "seconds")}
    wanted = {("b.T.time_x", "method=bn"), ("b.T.time_x", "method=gn")}
    rows = continuous.round_rows(before, after, wanted, replaced=False, round_index=1, position=0, commit=HEAD)
    assert [(r["param_key"], r["value"], r["n_samples"]) for r in rows] == [("method=bn", 2.0, 2)]
    rows = continuous.round_rows(before, after, {wanted.pop()}, replaced=True, round_index=0, position=0, commit=HEAD)
    assert len(rows) == 1  # only the wanted key, all of its samples
    mem = {("m", "e", "b.P.peakmem_x", ""): ([], 1e8, "peakmemory", "bytes")}
    rows = continuous.round_rows(
        {}, mem, {("b.P.peakmem_x", "")}, replaced=False, round_index=0, position=0, commit=HEAD
    )
    assert rows[0]["value"] == 1e8 and rows[0]["n_samples"] == 0


def _git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def _commit(repo, text):
    (repo / "f.txt").write_text(text)
    _git(repo, "add", "f.txt")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", text)
    return _git(repo, "rev-parse", "HEAD")


def test_default_base_merge_base_parent_or_none(tmp_path):
    repo = tmp_path / "r"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    first = _commit(repo, "one")
    with pytest.raises(continuous.NoBase, match="first commit"):
        continuous.default_base(repo, first)
    second = _commit(repo, "two")
    assert continuous.default_base(repo, second)[0] == first  # on main: the parent
    _git(repo, "checkout", "-qb", "topic")
    _commit(repo, "three")
    fourth = _commit(repo, "four")
    assert continuous.default_base(repo, fourth) == (second, f"merge-base of {fourth[:10]} with main")


def test_no_base_passes_and_the_report_says_why(tmp_path, capsys):
    repo = tmp_path / "r"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _commit(repo, "one")
    out = tmp_path / "report.html"
    code = continuous.main(["--repo", str(repo), "--report", str(out), "--asv-results", str(tmp_path / "none")])
    assert code == 0
    assert "no base commit" in capsys.readouterr().out
    html = out.read_text()
    assert "has no parent in this clone" in html and "nox -s continuous" in html


def test_bad_arguments_are_errors(tmp_path, capsys):
    assert continuous.main(["HEAD", "HEAD", "--no-report"]) == 2
    assert "same commit" in capsys.readouterr().err
    assert continuous.main(["--rounds", "2", "--no-report"]) == 2
    assert "--rounds must be at least 3" in capsys.readouterr().err
    assert continuous.main(["--confirm-rounds", "2", "--no-report"]) == 2
    assert "--confirm-rounds must be 0 (no confirmation) or at least 3" in capsys.readouterr().err
    assert continuous.main(["nosuchrev", "HEAD", "--no-report"]) == 2
    assert "does not know the revision 'nosuchrev'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="matches no entry"):
        continuous.tracking_entries("no-such-benchmark")


def test_report_uses_the_rounds_file_of_the_pair(tmp_path):
    """With a rounds file for (base, head), the section's verdicts are the paired ones (and gate)."""
    asv = tmp_path / "asv"
    hashes = af.write_asv_results(asv, af.method_benches(), lambda c, b, combo: af.method_truth(0, b, combo))
    bench, key = "layers.TimeNorm.time_forward", "method=bn, group_size=2, shape=512x7x7, device=cpu"
    key += ", dtype=float32, memory_format=contiguous"
    rows = _rows(lambda r, pos, c, b, p: 2.0 if c == hashes[1] else 1.0, benches=(bench,), params=(key,))
    rows["commit"] = rows["commit"].map({BASE: hashes[0], HEAD: hashes[1]})
    rows = rows.drop(columns=["machine", "env_name"]).to_dict("records")
    folder = tmp_path / "rounds"
    path = rounds.rounds_path(folder, *hashes)
    rounds.save(path, base=hashes[0], head=hashes[1], machine=af.MACHINE, env_name=af.ENV, rows=rows, meta={})
    out = tmp_path / "r.html"
    argv = ["--asv-results", str(asv), "--results", str(tmp_path / "x"), "--out", str(out), "--quiet"]
    argv += ["--sections", "regressions", "--fail-on-regression"]
    assert report.main([*argv, "--rounds-dir", str(tmp_path / "empty")]) == 0  # pooled samples: no change
    assert report.main([*argv, "--rounds-dir", str(folder)]) == 1
    html = out.read_text()
    assert "interleaved rounds" in html and "paired rounds t-test (n=6)" in html
    assert "2.000 [2.000, 2.000]" in html


# -- the planted repository ---------------------------------------------------------------------


def test_plant_slowdown_goes_inside_the_forward():
    text = "class A:\n    def forward(self, x: torch.Tensor) -> torch.Tensor:\n        return x\n"
    out = planted.plant_slowdown(text, passes=3)
    assert "for _ in range(3):" in out and out.index("range(3)") < out.index("return x")
    namespace = {"torch": None}
    exec(out.replace("torch.Tensor", "object"), namespace)  # still valid Python
    assert namespace["A"]().forward(2.0) == 2.0
    with pytest.raises(ValueError, match="expected exactly one"):
        planted.plant_slowdown("def f(): pass\n")


# -- trends over a history of commits -----------------------------------------------------------


def test_history_of_six_commits_shows_the_one_step(tmp_path):
    """A benchmark 40% slower from commit 3 on is the only step; one outlying commit elsewhere is none."""
    planted_key = {"method": "gn", "group_size": 4, "shape": "512x7x7"}

    def truth(commit, bench, combo):
        named = dict(zip(bench.param_names, combo))
        t = af.method_truth(0, bench, combo)
        if bench.name.endswith("time_forward") and all(named.get(k) == v for k, v in planted_key.items()):
            return t * (1.4 if commit >= 3 else 1.0)
        if bench.name.endswith("time_forward_backward") and named.get("method") == "bn" and commit == 2:
            return t * 2.0  # one bad commit, back to normal after it
        return t

    asv = tmp_path / "asv"
    hashes = af.write_asv_results(asv, af.method_benches(), truth, commits=6, samples=10, outliers=0.0)
    out = tmp_path / "r.html"
    argv = ["--asv-results", str(asv), "--results", str(tmp_path / "x"), "--out", str(out), "--quiet"]
    assert report.main([*argv, "--sections", "regressions"]) == 0
    html = out.read_text()
    assert "Trends over history" in html and "1 step(s) found" in html
    found = pd.read_csv(tmp_path / "r_data" / "regressions_steps.csv")
    assert len(found) == 1
    row = found.iloc[0]
    assert row["benchmark"] == "layers.TimeNorm.time_forward" and row["commit"] == hashes[3]
    assert "method=gn, group_size=4, shape=512x7x7" in row["param_key"] and row["ratio"] == pytest.approx(1.4, rel=0.05)


def test_threshold_is_read_as_a_ratio_or_a_fraction_never_one_as_the_other():
    import argparse

    from analysis.regressions import threshold_arg

    for text in ("1.10", "1.1", "0.1", "10%"):
        assert threshold_arg(text) == pytest.approx(0.10), text
    assert threshold_arg("1.25") == pytest.approx(0.25)
    for bad in ("1", "1.0", "0", "-1", "abc", "0%"):
        with pytest.raises(argparse.ArgumentTypeError, match="ratio"):
            threshold_arg(bad)
