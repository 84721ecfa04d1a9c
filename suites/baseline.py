"""Another revision's ``bkn`` package imported beside this one, for before/after timings in one process.

``load(rev)`` extracts the ``bkn/`` directory of git revision ``rev`` (``git archive``) into a
temporary directory as the package ``bkn_baseline`` and imports it: the two versions' models
can then be built and timed interleaved in one process (``python -m suites.chain_cost
--baseline main``), so that a busy machine's slow phases hit both alike. The package's
modules import each other relatively; only the lazy attribute table in ``bkn/__init__.py``
names ``"bkn.<module>"`` and is rewritten to ``"bkn_baseline.<module>"`` (else ``from . import
layers`` inside the copy would resolve to this checkout's modules). The copy's compiled
kernels are built from its own source (their cache name carries its hash).
"""

from __future__ import annotations

import atexit
import importlib
import io
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile

NAME = "bkn_baseline"


def load(rev: str, repo: str | pathlib.Path = "."):
    """The ``bkn`` package of git revision ``rev`` of ``repo``, imported as ``bkn_baseline``."""
    if NAME in sys.modules:
        raise RuntimeError(f"{NAME} is already imported (one baseline per process)")
    try:
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", "--format=tar", rev, "bkn"], check=True, capture_output=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        raise ValueError(
            f"--baseline: cannot read bkn/ at git revision {rev!r} of {repo}: {detail.decode().strip() or error}"
        ) from None
    root = pathlib.Path(tempfile.mkdtemp(prefix="bkn-baseline-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # the imported modules need no files once loaded
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.12, 3.11.4+: refuse links and paths outside root
            tar.extractall(root, filter="data")
        else:  # older Pythons have no filter; the archive is git's own tree of bkn/ (plain files)
            tar.extractall(root)
    (root / "bkn").rename(root / NAME)
    init = root / NAME / "__init__.py"
    init.write_text(init.read_text().replace('"bkn.', f'"{NAME}.'))
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module(NAME)
    finally:
        sys.path.remove(str(root))
