"""``python -m bkn.kernels``: build (or load from the cache) the compiled kernels and say where they are.

The layers build them on first use anyway (see :mod:`bkn.layers._native`); this command
does it up front (the asv install step uses it, so that no benchmark waits for the
compiler) and shows the compiler's output with ``--verbose`` when a build fails.
Exit status 1 if they could not be built (the layers then use the Python Functions).
"""

from __future__ import annotations

import argparse
import sys

from ..layers import _native


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bkn.kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    args = parser.parse_args(argv)
    if not _native.enabled():
        print(f"bkn: compiled kernels switched off ({_native.ENV_SWITCH}=0); the layers use the Python Functions")
        return 0
    try:
        module = _native.build(verbose=args.verbose)
    except Exception as error:  # report, do not crash: the layers fall back
        print(
            f"bkn: the compiled kernels could not be built: {type(error).__name__}: {error}\n"
            f"The layers will use the Python Functions (same results, slower at small shapes); "
            f"--verbose shows the compiler's output.",
            file=sys.stderr,
        )
        return 1
    print(f"bkn: compiled kernels ready: {module.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
