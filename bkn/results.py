"""Writing results reproducibly: the environment record and atomic file writes.

Every result file of the suite records where it came from (:func:`environment`:
commit, torch version, device, thread count...) and is written atomically
(:func:`atomic_path`: a temporary file in the same folder, renamed over the target
only once complete), so an interrupted run never leaves a half-written file and
never destroys the previous one.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import pathlib
import platform
import subprocess
import tempfile
from typing import Iterator

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def git_commit(path: str | os.PathLike = ROOT) -> str:
    """The commit checked out at ``path`` (with ``+dirty`` when the tree has changes), or ``"unknown"``."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        if not commit:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str | torch.device = "cpu") -> str:
    """A readable device description: the CPU model, or the CUDA device's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return name


def environment(device: str | torch.device = "cpu") -> dict:
    """What every result records: commit, versions, device, threads, time."""
    return {
        "commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(torch.device(device)),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside ``target``; on success rename it over ``target``.

    On an exception (or KeyboardInterrupt) the temporary file is removed and
    ``target``, if it existed, is left untouched.
    """
    target = pathlib.Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = pathlib.Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # mkstemp makes the file private; results are ordinary files
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(target: str | os.PathLike, data) -> pathlib.Path:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return pathlib.Path(target)


def write_parquet(target: str | os.PathLike, frame) -> pathlib.Path:
    """Write a pandas DataFrame as parquet (pyarrow), atomically."""
    with atomic_path(target) as tmp:
        frame.to_parquet(tmp, index=False)
    return pathlib.Path(target)
