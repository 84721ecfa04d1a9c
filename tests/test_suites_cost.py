"""``python -m suites.chain_cost``: the ResNet-18 step and layer/block cost measurement runs and says what it did.

Nothing here asserts a speed (the machine is shared); the runs are tiny. What is checked:
every entry is measured and paired with the reference in the same round, the variants
reach the converter, bad input is a clear error, and the result file is written.
"""

from __future__ import annotations

import json

import pytest

from suites import chain_cost


def test_step_measures_every_method_against_torch_bn(tmp_path, capsys):
    out = tmp_path / "step.json"
    result = chain_cost.main(
        [
            *("--methods", "bn,bkn-official"),  # a comma list, as the other probes take it
            *("--variant", "half=bkn-official:surrogate_scale=0.5"),
            *("--size", "32", "--batch", "4", "--rounds", "2", "--steps", "1", "--warmup", "1", "--threads", "1"),
            *("--profile", "--profile-steps", "1", "--out", str(out)),
            *("--allocator", "default"),  # (steady would change this test process's malloc for good)
        ]
    )
    assert set(result["methods"]) == {chain_cost.REFERENCE, "bn", "bkn-official", "half"}
    for name, r in result["methods"].items():
        assert len(r["step_s"]) == 2 and all(t > 0 for t in r["step_s"])
        assert r["ratio_q25"] <= r["ratio_median"] <= r["ratio_q75"]
        assert r["profile"]["conv_calls"] >= 20  # ResNet-18's convolutions at least
        assert len(r["faults_per_step"]) == 2 and all(f >= 0 for f in r["faults_per_step"])
    assert result["methods"][chain_cost.REFERENCE]["ratio_median"] == 1.0
    # The official transition pushes a surrogate through the convolutions: more conv calls than BN.
    assert result["methods"]["bkn-official"]["profile"]["conv_calls"] > result["methods"]["bn"]["profile"]["conv_calls"]
    assert result["entries"]["half"] == {"method": "bkn-official", "options": {"surrogate_scale": 0.5}}
    setting = json.loads(out.read_text())["setting"]
    assert setting["group_size"] == 2 and setting["allocator"] == "default"
    printed = capsys.readouterr().out
    assert "bkn-official" in printed and "faults/step" in printed and "default allocator" in printed


def test_blocks_pair_each_case_with_bn(tmp_path):
    result = chain_cost.main(
        ["--blocks", "--block-inputs", "2x16x8x8", "--rounds", "2", "--steps", "1", "--warmup", "1", "--threads", "1"]
        + ["--allocator", "default"]
    )
    entry = result["inputs"]["2x16x8x8"]
    kinds = {f"{k} {m}" for k in ("layer", "block") for m in chain_cost.BLOCK_METHODS}
    assert set(entry) == kinds
    assert entry["layer bn"]["ratio_median"] == 1.0 and entry["block bn"]["ratio_median"] == 1.0
    assert result["setting"]["allocator"] == "default"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch", "6", "--group-size", "4"], "must divide"),
        (["--rounds", "0"], "--rounds must be >= 1"),
    ],
)
def test_bad_arguments_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        chain_cost.main(argv)
    assert message in capsys.readouterr().err


def test_bad_variant_names_what_was_expected():
    with pytest.raises(ValueError, match="NAME=METHOD:key=value"):
        chain_cost._parse_variant("no-equals-sign")
    with pytest.raises(ValueError, match="unknown method"):
        chain_cost._parse_variant("x=not-a-method:draws=2")
    assert chain_cost._parse_variant("a=bkn-official:draws=2,surrogate_scale=0.5") == (
        "a",
        "bkn-official",
        {"draws": 2, "surrogate_scale": 0.5},
    )


@pytest.mark.slow
def test_baseline_revision_is_timed_beside_this_checkout(tmp_path):
    """``--baseline REV``: each method also as REV's bkn converts it (a second package in the same process).

    In a subprocess: a process imports one baseline at most."""
    import subprocess
    import sys

    out = tmp_path / "ab.json"
    argv = ["--methods", "bn", "bkn-analytic", "--baseline", "HEAD", "--size", "32", "--batch", "4"]
    argv += ["--rounds", "2", "--steps", "1", "--warmup", "1", "--threads", "1", "--out", str(out)]
    check = (
        "import sys, bkn; from suites import chain_cost; chain_cost.main(sys.argv[1:]); "
        "old = sys.modules['bkn_baseline']; assert old.layers is not bkn.layers and old.__file__ != bkn.__file__"
    )
    done = subprocess.run([sys.executable, "-c", check, *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["methods"]) == {chain_cost.REFERENCE, "bn", "bkn-analytic", "bn@HEAD", "bkn-analytic@HEAD"}
    assert result["entries"]["bkn-analytic@HEAD"]["method"] == "bkn-analytic" and result["baseline"] == "HEAD"


def test_bad_baseline_revision_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        chain_cost.main(["--baseline", "no-such-revision-4b1d", "--size", "32", "--batch", "4"])
    assert "cannot read bkn/ at git revision 'no-such-revision-4b1d'" in capsys.readouterr().err


@pytest.mark.slow
def test_processes_alternate_this_checkout_and_the_baseline(tmp_path, capsys):
    """``--processes N --baseline REV``: N fresh processes, even ones this checkout's methods, odd
    ones only REV's, each beside torch-bn; the spread is taken over processes."""
    out = tmp_path / "spread.json"
    argv = ["--processes", "3", "--methods", "bn", "--baseline", "HEAD", "--size", "32", "--batch", "4"]
    argv += ["--rounds", "2", "--steps", "1", "--warmup", "1", "--threads", "1", "--out", str(out)]
    result = chain_cost.main(argv)
    spread = result["spread"]
    assert list(spread) == [chain_cost.REFERENCE, "bn", "bn@HEAD"]
    assert spread[chain_cost.REFERENCE]["ratio"]["n"] == 3
    assert spread["bn"]["ratio"]["n"] == 2 and spread["bn@HEAD"]["ratio"]["n"] == 1
    assert [set(r["methods"]) for r in result["runs"]] == [
        {chain_cost.REFERENCE, "bn"},
        {chain_cost.REFERENCE, "bn@HEAD"},
        {chain_cost.REFERENCE, "bn"},
    ]
    q = spread["bn"]["ratio"]
    assert q["min"] <= q["q25"] <= q["median"] <= q["q75"] <= q["max"]
    assert json.loads(out.read_text())["processes"] == 3
    assert all(r["setting"]["allocator"] == "steady" for r in result["runs"])  # the default, set in each child
    assert spread["bn"]["faults_per_step_median"] >= 0
    printed = capsys.readouterr().out
    assert "3 processes" in printed and "steady allocator" in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--processes", "2", "--blocks"], "--processes measures the step only"),
        (["--processes", "0"], "--processes must be >= 1"),
        (["--skip-current"], "--skip-current needs --baseline"),
    ],
)
def test_bad_process_arguments_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        chain_cost.main(argv)
    assert message in capsys.readouterr().err


def test_spread_and_tables_do_not_import_chain_cost():
    # chain_cost imports chain_cost_spread (for --processes); the shared pieces live below both.
    import subprocess
    import sys

    code = "import sys, suites.chain_cost_spread; assert 'suites.chain_cost' not in sys.modules, 'import cycle'"
    subprocess.run([sys.executable, "-c", code], check=True)
    from suites import chain_cost_tables

    assert chain_cost.step_setting is chain_cost_tables.step_setting and chain_cost.REFERENCE == "torch-bn"
