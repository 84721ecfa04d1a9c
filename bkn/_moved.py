"""Old module names of the lab, kept importable for one release with a DeprecationWarning.

The probes and what only they use moved under :mod:`bkn.probes` (so that ``bkn`` itself
is the library a user imports to normalize and convert networks). ``import bkn.stats``,
``from bkn.results import write_table``, ``python -m bkn.demo`` and the like still work:
a finder placed first on ``sys.meta_path`` maps each old name (and its submodules) to the
module object under the new name, so old and new names share one module, never two copies.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "bkn.stats": "bkn.probes.stats",
    "bkn.data": "bkn.probes.data",
    "bkn.training": "bkn.probes.engine",
    "bkn.results": "bkn.probes.results",
    "bkn.distributed": "bkn.probes.distributed",
    "bkn.demo": "bkn.probes.demo",
}


def new_name(fullname: str) -> str | None:
    """The module's name under :mod:`bkn.probes`, or None when ``fullname`` did not move."""
    for old, new in MOVED.items():
        if fullname == old or fullname.startswith(old + "."):
            return new + fullname[len(old) :]
    return None


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, old: str, new: str):
        self.old, self.new = old, new

    def create_module(self, spec):
        warnings.warn(
            f"{self.old} moved to {self.new}; the old name will be removed in the next release",
            DeprecationWarning,
            stacklevel=3,
        )
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:
        pass  # the module under its new name has run already

    def get_code(self, fullname):
        # `python -m <old name>`: say so, then run the new module as __main__
        message = f"{self.old} moved to {self.new}; run python -m {self.new}"
        source = (
            "import runpy, warnings\n"
            f"warnings.warn({message!r}, DeprecationWarning)\n"
            f"runpy.run_module({self.new!r}, run_name='__main__', alter_sys=True)\n"
        )
        return compile(source, f"<{self.old}, moved to {self.new}>", "exec")


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = new_name(fullname)
        if new is None:
            return None
        real = importlib.util.find_spec(new)
        if real is None:
            return None
        spec = importlib.util.spec_from_loader(
            fullname, _AliasLoader(fullname, new), is_package=real.submodule_search_locations is not None
        )
        return spec


def install() -> None:
    if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
