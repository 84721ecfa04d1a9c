"""The benchmark process: a fixed torch thread count, and the imports done once before forking.

Threads: ``torch.set_num_threads(threads())`` at import and in every setup; the count is
``$BKN_BENCH_THREADS`` or 1 (the default makes a shared 2-core CI machine and a laptop
comparable), and is recorded by the ``track_threads`` benchmark.

Pre-imports: asv forks every benchmark process from one server that has imported the
suites (``launch_method: forkserver``). What torch imports lazily on first use (sympy for
autograd's shape checks, torch._dynamo for torch.optim, torchvision's models) would
otherwise be imported again in each of those thousands of processes, 0.3 to 1.5 s each,
longer than most benchmarks. Imports only: nothing may touch a GPU before the fork, and
NVML-based CUDA checks keep ``torch.cuda.is_available()`` from initialising CUDA anywhere.
"""

from __future__ import annotations

import contextlib
import importlib
import os

import torch

THREADS_ENV = "BKN_BENCH_THREADS"
DEFAULT_THREADS = 1
PREIMPORTS = ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torchvision.models")

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
for _module in PREIMPORTS:
    with contextlib.suppress(ImportError):
        importlib.import_module(_module)


def threads() -> int:
    """The fixed torch thread count for every benchmark: ``$BKN_BENCH_THREADS`` or 1."""
    value = os.environ.get(THREADS_ENV, str(DEFAULT_THREADS))
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"{THREADS_ENV} must be a positive integer, got {value!r}") from None
    if count < 1:
        raise ValueError(f"{THREADS_ENV} must be a positive integer, got {value!r}")
    return count


def configure_threads() -> int:
    """Set torch's intra-op thread count to :func:`threads` and return what torch reports."""
    torch.set_num_threads(threads())
    return torch.get_num_threads()


configure_threads()
