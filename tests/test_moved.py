"""The lab's old module names (before it moved under bkn.probes) still work for one release, with a warning."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

from bkn import _moved


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_an_old_name_is_the_new_module_and_warns(old):
    new = _moved.MOVED[old]
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_a_submodule_under_an_old_name_is_not_a_second_copy():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from bkn.stats import metrics as old_metrics
    from bkn.probes.stats import metrics

    assert old_metrics is metrics
    assert old_metrics.__name__ == "bkn.probes.stats.metrics"


def test_names_that_did_not_move_are_left_to_the_normal_import():
    assert _moved.new_name("bkn.layers") is None
    assert _moved.new_name("bkn.statsx") is None  # a prefix of a word is not a match
    assert _moved.new_name("bkn.stats.metrics") == "bkn.probes.stats.metrics"
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("bkn.stats.no_such_module")


def test_python_dash_m_under_an_old_name_runs_the_new_module():
    done = subprocess.run(
        [sys.executable, "-W", "always::DeprecationWarning", "-m", "bkn.demo", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "bkn.probes.demo" in done.stdout + done.stderr
    assert "moved to bkn.probes.demo" in done.stderr
