"""``python -m suites.gpu``: see :mod:`suites.gpu` and docs/gpu.md."""

import sys

from .cli import main

if __name__ == "__main__":  # asv imports every module under suites/: importing this one runs nothing
    sys.exit(main())
