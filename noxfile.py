"""Nox sessions for the bkn suite.

    nox -s main         the main job: quick benchmarks + default drift probe + quick training probe + HTML report
    nox -s tests        pytest (posargs go to pytest: ``nox -s tests -- -k kalman -x``)
    nox -s bench        quick asv run of the working tree (posargs: benchmark filters)
    nox -s accuracy     the drift probe, python -m bkn.probes.drift (``-- --full``), then reports/accuracy.html
    nox -s convergence  the training probe, python -m bkn.probes.training (``-- --quick``), then
                        reports/convergence.html
    nox -s continuous   time BASE and HEAD on the tracking subset in interleaved rounds; exit 1 on a
                        significant slowdown (``-- BASE HEAD --threshold 1.10``), then reports/report.html
    nox -s report       reports/report.html from whatever results exist
    nox -s screenshot   check the report in headless Chromium, save reports/report.png
    nox -s gpu          the GPU check, python -m suites.gpu (``-- --device cpu --quick`` on a machine without one;
                        docs/gpu.md: the device call), then reports/report.html
    nox -s demo         short BKN-vs-BN comparison (posargs go to ``python -m bkn.probes.demo``)
    nox -s lint         ruff check + ruff format --check (its own small venv, no torch)

One venv for everything that needs torch
----------------------------------------
torch + torchvision weigh several GB, so every session that imports them (all but lint)
shares ONE virtual environment, ``.nox/torch``
(under nox's ``--envdir``). Nox itself has no per-session venv location, so these
sessions are declared with ``venv_backend="none"`` and :func:`torch_env` manages the
shared venv explicitly:

* it creates the venv on first use, with the interpreter nox runs under;
* it runs ``pip install -e .[all]`` only when needed: the venv records the sha256 of
  ``pyproject.toml`` and the extras installed so far; when both still cover the request,
  pip is not run at all (the code itself is an editable install, so edits under bkn/ need
  no reinstall). A changed pyproject.toml triggers one ``pip install``, in which pip finds
  torch already satisfied and does not reinstall it;
* ``rm -rf .nox/torch`` starts from scratch.

A new torch session is three lines::

    @nox.session(venv_backend="none")
    def accuracy(session):
        torch_env(session, *EXTRAS).run("-m", "bkn.probes.drift", *session.posargs)
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import nox

nox.needs_version = ">=2024.3.2"
nox.options.reuse_venv = "yes"  # venvs nox itself manages (lint) are reused between runs
nox.options.sessions = ["lint", "tests"]  # what a bare `nox` runs

ROOT = pathlib.Path(__file__).resolve().parent
STAMP = "bkn-install.json"


class TorchEnv:
    """The shared torch venv, as seen from one nox session."""

    def __init__(self, session: nox.Session, location: pathlib.Path):
        self.session = session
        self.location = location
        bindir = location / ("Scripts" if os.name == "nt" else "bin")
        self.python = str(bindir / ("python.exe" if os.name == "nt" else "python"))
        self.env = {
            "VIRTUAL_ENV": str(location),
            "PATH": os.pathsep.join([str(bindir), os.environ.get("PATH", "")]),
        }

    def run(self, *args: str, **kwargs) -> None:
        """``python *args`` with the shared venv's interpreter (and its bin/ first on PATH); skipped under
        ``--install-only``."""
        env = {**self.env, **kwargs.pop("env", {})}
        self.session.run(self.python, *args, env=env, external=True, **kwargs)

    def run_install(self, *args: str, **kwargs) -> None:
        """Like :meth:`run`, but an install step: it runs under ``--install-only`` too."""
        self.session.run_install(self.python, *args, env=self.env, external=True, **kwargs)


def _python_works(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "import sys"], capture_output=True).returncode == 0
    except OSError:
        return False


def torch_env(session: nox.Session, *extras: str) -> TorchEnv:
    """Create or update the one venv shared by all torch sessions; install ``.[extras]`` there."""
    location = (session.cache_dir.parent / "torch").resolve()  # <envdir>/torch, default .nox/torch
    tenv = TorchEnv(session, location)
    stamp_file = location / STAMP

    # Creating and installing use session.run_install, which runs under --install-only too (session.run is
    # skipped there): `nox --install-only` prepares the venv, and the stamp is written only into a venv that exists.
    if not _python_works(tenv.python):
        session.log(f"Creating the shared torch venv in {location}")
        session.run_install(sys.executable, "-m", "venv", "--clear", str(location), external=True)

    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    try:
        stamp = json.loads(stamp_file.read_text())
    except (OSError, ValueError):
        stamp = {}
    have = set(stamp.get("extras", [])) if stamp.get("pyproject") == digest else None
    if have is not None and set(extras) <= have:
        session.log(f"Reusing the shared torch venv {location} (installed: .[{','.join(sorted(have))}])")
        return tenv

    want = sorted(set(extras) | (have or set()))
    target = f".[{','.join(want)}]" if want else "."
    if session._runner.global_config.no_install:  # nox's --no-install (-R): use the venv as it is
        session.log(f"--no-install: not installing {target} into {location} (its stamp does not cover it)")
        return tenv
    stamp_file.unlink(missing_ok=True)  # an interrupted install must not look complete
    tenv.run_install("-m", "pip", "install", "--disable-pip-version-check", "--progress-bar=off", "-e", target)
    stamp_file.write_text(json.dumps({"pyproject": digest, "extras": want}) + "\n")
    # Part of preparing the venv: compile the C++ kernels for it now (about a minute on 2 cores), so that the
    # first test or probe run does not. A failed build is not an install failure: it says so, and the layers
    # fall back to the Python Functions (exit status 1 of python -m bkn.kernels).
    tenv.run_install("-m", "bkn.kernels", success_codes=[0, 1])
    return tenv


EXTRAS = ("all",)  # one install covers every torch session: tests, bench, accuracy, report...


def _render_page(session: nox.Session, tenv: TorchEnv, section: str, probe: str) -> None:
    """A probe session's own HTML page, ``reports/<session>.html`` (not after ``--help``)."""
    if {"-h", "--help"} & set(session.posargs):
        return
    tenv.run(
        "-m",
        "analysis.report",
        "--sections",
        f"env,{section}",
        "--title",
        f"bkn-suite: the {probe}",
        "--out",
        f"reports/{session.name}.html",
    )


# The main job's benchmark subset: one layer family and the copy-bandwidth reference, in float32 and the
# contiguous layout (every method, group size and shape), and the thread record. asv matches a parametrized
# benchmark's regex against ``name(param, ...)``, so the last two parameters (dtype, memory_format) select the
# variant; the other dtypes and layouts are in ``nox -s bench`` and ``asv run`` (halves the main job's bench,
# which the six rivals of issue 25 had doubled).
_DEFAULT_VARIANT = r"'float32', 'contiguous'\)$"
MAIN_BENCHMARKS = (
    rf"TimeForwardBackward\.time_forward_backward\(.*{_DEFAULT_VARIANT}",
    rf"TimeCopy\.time_copy\(.*{_DEFAULT_VARIANT}",
    "TrackThreads",
)


@nox.session(venv_backend="none")
def main(session: nox.Session) -> None:
    """The main job: quick benchmarks, the default drift probe, the quick training probe, then the HTML report.

    Runs the sessions ``bench`` (:data:`MAIN_BENCHMARKS`: forward+backward and the copy reference in
    float32/contiguous, the thread record), ``accuracy``,
    ``convergence -- --quick`` and ``report`` in that order, so the report (its path printed
    last) holds the timing, drift and training sections; posargs go to the report (e.g.
    ``-- --fail-on-regression``).
    """
    torch_env(session, *EXTRAS)  # install once, before the queued sessions
    session.notify("bench", posargs=list(MAIN_BENCHMARKS))
    session.notify("accuracy", posargs=[])
    session.notify("convergence", posargs=["--quick"])
    session.notify("report", posargs=list(session.posargs))


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Run the test suite with pytest (posargs go to pytest): the slow tests are left out (pyproject's addopts),
    ``nox -s tests -- -m slow`` runs only them, ``-- -m ""`` everything."""
    torch_env(session, *EXTRAS).run("-m", "pytest", *session.posargs)


@nox.session(venv_backend="none")
def demo(session: nox.Session) -> None:
    """Print a short BKN-vs-BN comparison measured on this machine."""
    torch_env(session, *EXTRAS).run("-m", "bkn.probes.demo", *session.posargs)


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """Quick asv run of the working tree (posargs: benchmark filter regexes, e.g. ``-- TimeForwardBackward``).

    One sample per parameter set (``--quick``), recorded under ``.asv/results`` for HEAD's
    hash (``--set-commit-hash``: the working tree is measured as HEAD), in the shared torch
    venv (``--python=same``), with ``$BKN_BENCH_THREADS`` torch threads (default 1).
    The full tracked run is plain ``asv run`` (see suites/README.md).
    """
    tenv = torch_env(session, *EXTRAS)
    tenv.run("-m", "asv", "machine", "--yes")  # non-interactive; rewriting it each time is harmless
    filters = [arg for pattern in session.posargs for arg in ("--bench", pattern)]
    tenv.run(
        "-m",
        "asv",
        "run",
        "--python=same",
        "--quick",
        "--record-samples",
        "--set-commit-hash=HEAD",
        "--launch-method=forkserver",
        *filters,
        env={"BKN_BENCH_THREADS": os.environ.get("BKN_BENCH_THREADS", "1")},
    )


@nox.session(venv_backend="none")
def continuous(session: nox.Session) -> None:
    """Regression gate: BASE vs HEAD on the tracking subset (``-- [BASE] [HEAD] [--threshold 1.10] [--rounds 6]``).

    Runs ``python -m analysis.continuous``: both commits checked out into temporary git
    worktrees, timed in interleaved rounds by ``asv run --python=same`` in the shared torch
    venv (the subset is ``suites.tracking.TRACKING``), a paired-rounds test per benchmark,
    a short table, the HTML report with the Regressions section filled. Defaults: BASE is
    the merge-base with main (HEAD~1 on main), HEAD is HEAD. Exit 1 when a benchmark is
    significantly slower by the threshold or more; exit 0, saying why, when there is no
    base (first commit, shallow clone). ``-- --help`` lists the options.
    """
    torch_env(session, *EXTRAS).run("-m", "analysis.continuous", *session.posargs)


@nox.session(venv_backend="none")
def accuracy(session: nox.Session) -> None:
    """The drift probe: statistic drift vs the population statistics (``-- --full`` for the full sweep).

    The default (no posargs) is the main job's: the synthetic chain and the digits network trained with
    each of BN, BKN (both transitions), BRN and GN, group sizes 1, 2, 4, 16, two seeds; its training
    runs are cached under results/cache, so a second run skips them.
    """
    tenv = torch_env(session, *EXTRAS)
    tenv.run("-m", "bkn.probes.drift", *session.posargs)
    _render_page(session, tenv, "drift", "drift probe")


@nox.session(venv_backend="none")
def convergence(session: nox.Session) -> None:
    """Training probe: test accuracy vs normalization group size (``-- --quick`` for CI)."""
    tenv = torch_env(session, *EXTRAS)
    tenv.run("-m", "bkn.probes.training", *session.posargs)
    _render_page(session, tenv, "training", "training probe")


@nox.session(venv_backend="none")
def report(session: nox.Session) -> None:
    """Self-contained HTML report from whatever results exist (posargs: ``python -m analysis.report``).

    Writes reports/report.html (+ reports/report_data/*.csv) and prints its path;
    ``-- --base REV --head REV`` compares two commits, ``-- --fail-on-regression`` exits 1 on a
    significant regression (CI gating), ``-- --help`` lists the rest.
    """
    torch_env(session, *EXTRAS).run("-m", "analysis.report", *session.posargs)


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """The GPU check (posargs go to ``python -m suites.gpu``): bandwidth, graph replay, the layer table, network
    steps, the CUDA tests under sync debug mode, asv's CUDA subset; results/gpu/gpu.parquet, then the report.

    On a machine without a GPU: ``nox -s gpu -- --device cpu --quick`` (the pipeline on tiny shapes). On a lent GPU
    machine there is no nox: docs/gpu.md gives the device call, which runs ``python3 -m suites.gpu`` itself.
    """
    tenv = torch_env(session, *EXTRAS)
    tenv.run("-m", "suites.gpu", *session.posargs)
    if not {"-h", "--help", "--pack"} & set(session.posargs):
        tenv.run("-m", "analysis.report")


@nox.session(venv_backend="none")
def screenshot(session: nox.Session) -> None:
    """Open the report in headless Chromium: check it loads cleanly and save a PNG screenshot.

    ``nox -s screenshot`` checks reports/report.html and writes reports/report.png; posargs go to
    ``python -m analysis.browser`` (``-- reports/other.html --screenshot out.png``). Needs Chromium
    (Debian: ``apt-get install -y chromium``); exits non-zero on console errors or undecodable images.
    """
    torch_env(session, *EXTRAS).run("-m", "analysis.browser", *session.posargs)


@nox.session(reuse_venv=True)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check (no torch needed); ``ruff format .`` fixes the formatting."""
    session.install("ruff>=0.17,<0.18")  # the formatter's style may change between minor versions
    paths = session.posargs or ["."]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", "--diff", *paths)
