"""asv on a machine with no network: what is carried there (``--pack``), and the run there (the ``asv`` part).

``--pack`` (here, with network) fills ``.gpu/`` (git-ignored; the device call names it in ``carry``):

* ``wheels/``: asv and every package it needs (``pip download``, binary wheels for the lent
  machine's Python, 3.12 by docs/gpu.md, and this machine's, so the offline install is tested here);
* ``repo.git``: a bare copy of the repository's history up to HEAD (asv resolves the commit it
  records results for, ``--set-commit-hash``, in a git repository, and the working tree travels
  without its ``.git``);
* ``commit``: HEAD's hash, ``+dirty`` when the tree has changes (what the tidy file records).

On the machine the ``asv`` part makes a venv with ``--system-site-packages`` (the machine's
torch, triton and numpy are used; :func:`install_asv`), installs asv from the wheels with ``pip
install --no-index --find-links``, and runs ``asv run --python=same --quick`` on :data:`ASV_SUBSET` (CUDA rows of
the suites), recording into ``.asv/results``; the new result files go back as one archive.
"""

from __future__ import annotations

import json
import math
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from suites.harness.matrix import METHODS
from suites.tracking import selectors

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACK = ROOT / ".gpu"
WHEELS, REPO, COMMIT = PACK / "wheels", PACK / "repo.git", PACK / "commit"
RESULTS = ROOT / ".asv" / "results"
MACHINE_PYTHON = "3.12"  # the lent machines' python3 (KINDS.md: 3.12.3)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
ASV_ARCHIVE = "asv-results.tar.gz"
MACHINE = "gpu-lent"  # asv's machine name for these results (the device name is in the tidy file)
_CUDA32 = ("cuda", "float32", "contiguous")
NET_METHODS = ("bn", "bkn-analytic")
ASV_SUBSET = (
    ("bench_bandwidth.TimeCopy.time_copy", (8, "64x56x56", *_CUDA32)),
    *(("bench_layers.TimeForwardBackward.time_forward_backward", (m, 8, "64x56x56", *_CUDA32)) for m in METHODS),
    # The network steps are the network part's; asv keeps a history of two of them (each process pays a CUDA start).
    *(("bench_network.TimeCifarResNetGroupedStep.time_train_step", (m, 2, "3x32x32", *_CUDA32)) for m in NET_METHODS),
    ("bench_layers.TrackThreads.track_threads", ()),
)


def asv_version() -> str:
    from importlib.metadata import version as installed

    return installed("asv")


def pack(pythons: list[str] | None = None, say=print) -> dict:
    """Fill ``.gpu/`` (see the module docstring); returns ``{"bytes": total size, "wheels": names}``."""
    from bkn.probes.results import git_commit

    pythons = pythons or sorted({MACHINE_PYTHON, platform.python_version().rsplit(".", 1)[0]})
    WHEELS.mkdir(parents=True, exist_ok=True)
    requirement = f"asv=={asv_version()}"
    for python in pythons:
        command = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "-d", str(WHEELS)]
        command += ["--only-binary=:all:", "--implementation", "cp", "--python-version", python]
        command += [arg for p in PLATFORMS for arg in ("--platform", p)]
        say(f"pack: {requirement} and its needs for Python {python} into {WHEELS.relative_to(ROOT)}")
        subprocess.run([*command, requirement], check=True)
    if REPO.exists():
        shutil.rmtree(REPO)
    subprocess.run(["git", "init", "-q", "--bare", str(REPO)], check=True)
    subprocess.run(["git", "push", "-q", str(REPO), "HEAD:refs/heads/main"], cwd=ROOT, check=True)
    COMMIT.write_text(git_commit() + "\n")
    size = sum(p.stat().st_size for p in PACK.rglob("*") if p.is_file())
    wheels = sorted(p.name for p in WHEELS.glob("*.whl"))
    say(f"pack: {len(wheels)} wheels, a bare repository at HEAD, {size / 2**20:.1f} MiB in {PACK.relative_to(ROOT)}")
    return {"bytes": size, "wheels": wheels}


def packed_commit() -> str | None:
    """The commit ``--pack`` recorded (the lent machine's tree has no .git), or None."""
    try:
        return COMMIT.read_text().strip() or None
    except OSError:
        return None


def install_asv(venv: pathlib.Path, wheels: pathlib.Path = WHEELS, timeout: float = 120) -> pathlib.Path:
    """A venv at ``venv`` that sees this interpreter's packages, with asv installed from ``wheels`` only; its python.

    ``--system-site-packages`` reaches the *base* interpreter's packages; where this interpreter is
    itself a venv (the lent machines' python3 is /opt/torch/.venv/bin/python3, where torch lives),
    a ``.pth`` file in the new venv adds this interpreter's site-packages too. The venv is made
    ``--without-pip`` (no ensurepip needed, which a system Python may lack) and this interpreter's
    pip installs into its site-packages (``--target``, which ignores what is installed elsewhere:
    asv and its needs come from the wheels, ``--no-index``).
    """
    import site
    import sysconfig

    command = [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)]
    subprocess.run(command, check=True, timeout=timeout)
    python = venv / "bin" / "python"
    found = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    target = pathlib.Path(found.stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    (target / "bkn-parent-site.pth").write_text("\n".join(sorted(ours)) + "\n")
    command = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index"]
    command += ["--no-compile", "--target", str(target), "--find-links", str(wheels), f"asv=={asv_version_in(wheels)}"]
    subprocess.run(command, check=True, timeout=timeout)
    return python


def asv_version_in(wheels: pathlib.Path) -> str:
    found = sorted(wheels.glob("asv-*.whl"))
    if not found:
        raise FileNotFoundError(f"no asv wheel in {wheels}: run `python -m suites.gpu --pack` first")
    return found[-1].name.split("-")[1]


def asv_config(tmp: pathlib.Path, results_dir: pathlib.Path = RESULTS) -> pathlib.Path:
    """The repository's asv.conf.json with the carried repository, absolute folders and a temporary env dir."""
    text = (ROOT / "asv.conf.json").read_text(encoding="utf-8")
    conf = json.loads("\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//")))
    conf.update(
        repo=str(REPO),
        benchmark_dir=str(ROOT / "suites"),
        results_dir=str(results_dir),
        env_dir=str(tmp / "env"),
        html_dir=str(tmp / "html"),
    )
    path = tmp / "asv.conf.json"
    path.write_text(json.dumps(conf, indent=2))
    return path


def asv_part(run, part, out_dir: pathlib.Path, subset=ASV_SUBSET, results_dir: pathlib.Path = RESULTS) -> None:
    """Install asv offline and record ``subset`` (benchmark, params) into ``results_dir``; archive the new result
    files in ``out_dir`` (:data:`ASV_ARCHIVE`, paths relative to the checkout)."""
    commit = packed_commit()
    if not WHEELS.is_dir() or not REPO.is_dir() or commit is None:
        run.skip("asv", "asv", "nothing packed: run `python -m suites.gpu --pack` before the call and carry .gpu")
        return
    if shutil.which("git") is None:
        run.skip("asv", "asv", "git is not installed on this machine (asv reads the commit from .gpu/repo.git)")
        return
    if part.expired(20.0):
        run.skip("asv", "asv", part.why())
        return
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        try:
            python = install_asv(tmp / "venv", timeout=max(part.left() - 10, 5))
            config = asv_config(tmp, results_dir)
            env = {"ASV_PYTHONPATH": str(ROOT), "BKN_BENCH_THREADS": "1", "BKN_NATIVE": "0", "PATH": _path(python)}
            asv = [str(python), "-m", "asv"]
            subprocess.run(
                [*asv, "machine", "--yes", "--machine", MACHINE, "--config", str(config)],
                env=_env(env),
                check=True,
                capture_output=True,
                timeout=60,
            )
            sha = commit.split("+")[0]
            command = [*asv, "run", "--config", str(config), "--python=same", "--quick", "--record-samples"]
            command += [f"--set-commit-hash={sha}", "--machine", MACHINE, "--launch-method=forkserver"]
            command += [arg for regex in selectors(subset) for arg in ("--bench", regex)]
            run.say(f"asv: {len(subset)} benchmarks, commit {sha[:8]}")
            with (out_dir / "asv.log").open("w", encoding="utf-8") as log:
                proc = subprocess.run(
                    command, env=_env(env), stdout=log, stderr=subprocess.STDOUT, timeout=max(part.left(), 1)
                )
        except subprocess.TimeoutExpired:
            run.skip("asv", "asv", f"{part.why()} while asv ran (asv.log)")
            proc = None
        except (subprocess.CalledProcessError, OSError, FileNotFoundError) as exc:
            run.fail("asv", "asv", exc)
            return
    new = [p for p in results_dir.rglob("*.json") if p.stat().st_mtime >= started - 1]
    if new:
        with tarfile.open(out_dir / ASV_ARCHIVE, "w:gz") as tar:
            for p in new:
                tar.add(p, arcname=str(pathlib.Path(".asv", "results", p.relative_to(results_dir))))
    if proc is None:
        return
    measured = _measured(new)
    status = "ok" if proc.returncode == 0 and measured else "failed"
    note = f"asv exited {proc.returncode}; {len(new)} result file(s) in {ASV_ARCHIVE}"
    run.add("asv", "asv", "benchmarks_measured", measured, status=status, note=note)
    run.say(f"asv: {measured} benchmark(s) with a result ({status}); {note}")


def _measured(files) -> int:
    """Parameter combinations with a finite number, over the asv result files among ``files`` (asv stores every
    combination of a benchmark's matrix: null where not run, NaN where setup skipped it)."""
    count = 0
    for p in files:
        if p.name in ("machine.json", "benchmarks.json"):
            continue
        try:
            results = json.loads(p.read_text()).get("results", {})
        except (OSError, ValueError):
            continue
        for value in results.values():
            first = value[0] if isinstance(value, list) and value else value
            flat = first if isinstance(first, list) else [first]
            count += sum(1 for v in flat if isinstance(v, (int, float)) and math.isfinite(v))  # n/a is NaN
    return count


def _path(python: pathlib.Path) -> str:
    import os

    return os.pathsep.join([str(python.parent), os.environ.get("PATH", "")])


def _env(extra: dict) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if not re.match(r"PYTHON(PATH|HOME)$", k)}
    return {**env, **extra}
