"""Git and checkout plumbing of :mod:`analysis.continuous`: which commits, their worktrees, their asv set-up.

It resolves the revisions to compare (:func:`resolve`; :func:`default_base` picks the merge-base
with ``main`` or HEAD's parent, and raises :class:`NoBase` when there is none), writes the asv
config that runs one checkout's ``suites/`` into the shared results folder (:func:`asv_config`),
picks the timer both checkouts can use (:func:`pick_timer`), and checks that a benchmark process
imports the checkout's own ``bkn`` and has its compiled kernels (:func:`check_checkout`). The
environment the benchmark processes get (:data:`MALLOC_ENV`, :data:`TIMER_ENV`) is set here too.
"""

from __future__ import annotations

import json
import pathlib
import subprocess

MAIN_BRANCH = "main"
# glibc's malloc: keep freed memory in the heap (no mmap for big blocks, no trimming). By default a
# tensor of a few MB is mmap'd fresh and page-faulted in on every call in some processes and not in
# others; on the 2-core machine a third of the processes timed GN's forward+backward at 8x64x56x56 5x
# slower (6.3 ms against 1.2 ms CPU time), which no number of rounds averages away. Set for both commits.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**30)}
TIMER_ENV = "BKN_BENCH_TIMER"  # suites.harness.timing.TIMER_ENV (not imported: that module imports torch)


class NoBase(Exception):
    """There is no base commit to compare with (first commit, shallow clone): not an error."""


def git(repo, *args: str, check: bool = True) -> str:
    out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise ValueError(f"git {' '.join(args)} failed in {repo}: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip() if out.returncode == 0 else ""


def resolve(repo, rev: str) -> str:
    """The full hash of ``rev``; ValueError naming it when git does not know it."""
    sha = git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    if not sha:
        raise ValueError(f"git does not know the revision {rev!r} in {repo}")
    return sha


def default_base(repo, head: str) -> tuple[str, str]:
    """(base hash, how it was chosen): the merge-base with main, or HEAD~1 when head is on main.

    NoBase when neither exists (a shallow clone keeps no parent; the first commit has none).
    """
    main = git(repo, "rev-parse", "--verify", "--quiet", f"{MAIN_BRANCH}^{{commit}}", check=False)
    if main:
        merge_base = git(repo, "merge-base", head, main, check=False)
        if merge_base and merge_base != head:
            return merge_base, f"merge-base of {head[:10]} with {MAIN_BRANCH}"
    parent = git(repo, "rev-parse", "--verify", "--quiet", f"{head}~1^{{commit}}", check=False)
    if parent:
        return parent, f"parent of {head[:10]}"
    shallow = git(repo, "rev-parse", "--is-shallow-repository", check=False) == "true"
    raise NoBase(
        f"{head[:10]} has no parent in this clone"
        + (" (a shallow clone: fetch more history, e.g. `git fetch --deepen=1`)" if shallow else " (the first commit)")
        + f" and is not behind {MAIN_BRANCH}; there is nothing to compare it with"
    )


def asv_config(path: pathlib.Path, *, repo: pathlib.Path, checkout: pathlib.Path, results: pathlib.Path, sha: str):
    """An asv config that runs ``checkout``'s suites and writes into the shared ``results`` folder."""
    config = {
        "version": 1,
        "project": "bkn-suite",
        "repo": str(repo),
        "dvcs": "git",
        "branches": [sha],  # asv checks that its branches exist; a detached CI checkout may have none
        "environment_type": "existing",
        "benchmark_dir": str(checkout / "suites"),
        "env_dir": str(path.parent / "env"),
        "results_dir": str(results),
        "html_dir": str(path.parent / "html"),
        "launch_method": "forkserver",
        "default_benchmark_timeout": 300,
    }
    path.write_text(json.dumps(config, indent=2) + "\n")


_CHECK = "import bkn, sys; print(bkn.__file__, flush=True); from bkn import kernels; sys.exit(kernels.main([]))"


def pick_timer(wanted: str, checkouts, log) -> str:
    """``wanted``, or "wall" when a checkout's suites cannot switch timers (both commits must use the same one)."""
    if wanted == "wall":
        return "wall"
    lacking = [c.name for c in checkouts if TIMER_ENV not in _read(c / "suites" / "harness" / "timing.py")]
    if lacking:
        log(f"timer: wall-clock (the suites of {', '.join(lacking)} predate ${TIMER_ENV}; both must use one timer)")
        return "wall"
    log(f"timer: CPU time of the benchmark process (${TIMER_ENV}=cpu)")
    return "cpu"


def _read(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def check_checkout(python: str, checkout: pathlib.Path, env: dict, log) -> None:
    """The benchmark processes must import this checkout's bkn; then build or find its compiled kernels.

    One process (a torch import costs seconds): prints where bkn came from, then runs
    ``python -m bkn.kernels`` (a failed build is reported, not fatal: the layers fall back).
    """
    probe = subprocess.run([python, "-c", _CHECK], env=env, capture_output=True, text=True, cwd=checkout)
    lines = probe.stdout.strip().splitlines()
    where = pathlib.Path(lines[0] if lines else "?").resolve()
    if checkout.resolve() not in where.parents:
        raise ValueError(
            f"the checkout {checkout} is not what Python imports with PYTHONPATH={env.get('PYTHONPATH')}: "
            f"bkn comes from {where} ({probe.stderr.strip()[-300:]})"
        )
    log(f"    {checkout.name}: bkn from {where.parent}; kernels: {lines[-1] if len(lines) > 1 else '(no output)'}")
