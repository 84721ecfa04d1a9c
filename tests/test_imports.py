"""Guards on the project's imports: no import cycles, and a library that loads none of the lab.

* The import graph of ``bkn/``, ``analysis/`` and ``suites/``, read from the sources with ``ast``
  (``tests/import_graph.py``: module- and function-level imports alike), has no cycle; a
  planted pair of modules importing each other shows the checker sees one.
* ``import bkn`` and its library modules (layers, conversion, methods), building a layer and
  converting a small model, load no module of the lab (``bkn.probes``) and none of its
  dependencies (pandas, scikit-learn, mnist1d, matplotlib, seaborn, scipy, tqdm); ``bkn.methods``
  and ``bkn.probes.results`` load no torch (the report reads them without it). Each check runs in
  a fresh interpreter, and is shown to fail where the modules do get loaded.

This file imports no torch itself (the checks run in subprocesses; ``conftest.py`` may load it).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import import_graph  # tests/import_graph.py (tests import their helpers by name, as conftest does)
import pytest

ROOT = Path(__file__).resolve().parents[1]

# The lab's modules and dependencies the library must not load (prefixes of sys.modules names).
LAB = ("bkn.probes", "pandas", "sklearn", "mnist1d", "matplotlib", "seaborn", "scipy", "tqdm")


def _format(cycles: list[list[str]]) -> str:
    return "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def test_no_import_cycle_in_bkn_suites_analysis():
    edges = import_graph.graph(ROOT, ["bkn", "analysis", "suites"])
    assert len(edges) > 50 and {"bkn.chain.core", "suites.chain_cost", "analysis.report"} <= set(edges)  # it found them
    found = import_graph.cycles(edges)
    assert not found, _format(found)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_finds_a_planted_cycle(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from . import b\n",
            "pkg/b.py": "def f():\n    from pkg.a import g  # lazy, still a cycle\n",
            "pkg/c.py": "import pkg.a\n",  # imports into the cycle: not part of it
        },
    )
    found = import_graph.cycles(import_graph.graph(tmp_path, ["pkg"]))
    assert found == [["pkg.a", "pkg.b", "pkg.a"]]
    assert "pkg.a -> pkg.b -> pkg.a" in _format(found)


def test_the_checker_reads_package_names_and_relative_levels(tmp_path):
    _write(
        tmp_path,
        {
            # A submodule taking a name defined in its package's __init__, which imports it: a cycle.
            "pkg/__init__.py": "from .sub import thing\nVALUE = 1\n",
            "pkg/sub/__init__.py": "from .leaf import thing\n",
            "pkg/sub/leaf.py": "from .. import VALUE\nthing = VALUE\n",
            # `from . import sibling` names the submodule, not the package: no cycle.
            "other/__init__.py": "from . import one\n",
            "other/one.py": "from . import two\n",
            "other/two.py": "",
        },
    )
    edges = import_graph.graph(tmp_path, ["pkg", "other"])
    assert edges["pkg.sub.leaf"] == {"pkg"} and edges["pkg.sub"] == {"pkg.sub.leaf"}
    assert edges["other.one"] == {"other.two"}
    assert import_graph.cycles(edges) == [["pkg", "pkg.sub", "pkg.sub.leaf", "pkg"]]


def _loaded_after(code: str) -> list[str]:
    """The ``sys.modules`` names a fresh interpreter holds after running ``code`` (from the repository root)."""
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _matching(loaded: list[str], prefixes: tuple[str, ...]) -> list[str]:
    return [m for m in loaded if any(m == p or m.startswith(p + ".") for p in prefixes)]


LIBRARY_USE = """
import bkn, bkn.layers, bkn.conversion, bkn.methods, bkn.norms, bkn.transitions, bkn.chain
import torch
bkn.methods.get("bkn-analytic").build(8, group_size=2)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                            torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8))
bkn.convert(model, "bkn", group_size=2, transition="analytic")
model.train()(torch.randn(4, 3, 8, 8))
bkn.prior_summary(model)
bkn.conversion_report(model)
"""


# What torch itself loads (torch.hub imports tqdm): not the library's doing, so not held against it.
TORCH_ALONE = "import torch, torch.fx, torch.nn.functional"


@functools.lru_cache(maxsize=1)
def _torch_alone() -> frozenset[str]:
    return frozenset(_loaded_after(TORCH_ALONE))


def _lab_loaded_by(code: str) -> list[str]:
    """The lab's modules and dependencies that ``code`` loads beyond what importing torch loads."""
    baseline = _torch_alone()
    return [m for m in _matching(_loaded_after(code), LAB) if m not in baseline]


def test_the_library_loads_none_of_the_lab():
    loaded = _loaded_after(LIBRARY_USE)
    assert "bkn.chain.core" in loaded and "torch" in loaded  # it did run
    assert _lab_loaded_by(LIBRARY_USE) == []
    # timm: only the rivals' layers need it (bkn.rivals.layers, loaded when one is built)
    assert _matching(loaded, ("timm", "bkn.rivals.layers")) == []


@pytest.mark.parametrize("module", ["bkn.methods", "bkn.probes.results", "bkn.replacements"])
def test_registry_and_results_load_no_torch(module):
    loaded = _loaded_after(f"import {module}")
    assert module in loaded
    assert _matching(loaded, ("torch",)) == []


def test_the_checks_see_what_the_lab_loads():
    """The checks above can fail: the lab's summaries load pandas, and the library loads torch."""
    assert {"bkn.probes.training.summary", "pandas"} <= set(_lab_loaded_by("import bkn.probes.training.summary"))
    assert "torch" in _matching(_loaded_after("import bkn.norms"), ("torch",))
