"""A throwaway git repository with a planted slowdown and a comment-only commit: the gate's known effects.

:func:`make_repo` copies a checkout's working tree (tracked and untracked, not ignored files)
into a new repository and makes three commits:

* ``base``: the copy as it is;
* ``slow``: :data:`SLOW_FILE`'s forward starts with :data:`PASSES` extra passes over its
  input (``x = x * 1.0``: each reads and writes the whole tensor, and adds one more pass
  to the backward), so Batch Renormalization (``brn``) and nothing else gets slower;
* ``comment``: one comment line added to the same file, no code change.

``(base, slow)`` must be flagged on ``brn``'s benchmarks only, ``(slow, comment)`` on none:
``tests/test_continuous_gate.py`` checks both and ``.ci/gate_calibration.py`` repeats them to
count detections and false alarms.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess

SLOW_FILE = "bkn/layers/renorm.py"
SLOW_METHOD = "brn"
PASSES = 8
ANCHOR = "    def forward(self, x: torch.Tensor) -> torch.Tensor:\n"
PLANTED = (
    "        for _ in range({passes}):  # planted slowdown (analysis.planted): extra passes over the input\n"
    "            x = x * 1.0\n"
)
COMMENT = "# An edited comment (analysis.planted): no code changed.\n"


def _git(repo: pathlib.Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {repo}: {out.stderr.strip()}")
    return out.stdout.strip()


def _commit(repo: pathlib.Path, message: str) -> str:
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=planted", "-c", "user.email=planted@localhost", "commit", "-q", "-m", message)
    return _git(repo, "rev-parse", "HEAD")


def plant_slowdown(text: str, passes: int = PASSES) -> str:
    """``text`` (SLOW_FILE) with the extra passes at the top of the forward; ValueError if it has no such forward."""
    if text.count(ANCHOR) != 1:
        raise ValueError(f"{SLOW_FILE}: expected exactly one {ANCHOR.strip()!r} to plant the slowdown in")
    head, tail = text.split(ANCHOR)
    lines = tail.split("\n")
    body = 0  # skip the docstring, if any, so the planted lines are code inside the forward
    if lines[0].strip().startswith('"""'):
        body = next(i for i, line in enumerate(lines) if line.rstrip().endswith('"""') and (i or line.count('"""') > 1))
        body += 1
    lines.insert(body, PLANTED.format(passes=passes).rstrip("\n"))
    return head + ANCHOR + "\n".join(lines)


def make_repo(source: str | pathlib.Path, dest: str | pathlib.Path, passes: int = PASSES) -> dict[str, str]:
    """Create the repository in ``dest`` (must not exist) from ``source``'s working tree; {name: hash}."""
    source, dest = pathlib.Path(source).resolve(), pathlib.Path(dest)
    if dest.exists():
        raise ValueError(f"{dest} exists; make_repo needs a new folder")
    files = _git(source, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for name in filter(None, files):
        src = source / name
        if src.is_file():  # deleted-but-tracked files are listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    _git(dest, "init", "-q", "-b", "main")
    commits = {"base": _commit(dest, "base: a copy of the working tree")}
    target = dest / SLOW_FILE
    target.write_text(plant_slowdown(target.read_text(), passes))
    commits["slow"] = _commit(dest, f"slow: {passes} extra passes over the input in {SLOW_METHOD}'s forward")
    with target.open("a") as f:
        f.write(COMMENT)
    commits["comment"] = _commit(dest, "comment: one comment line, no code change")
    return commits
