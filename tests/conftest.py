"""Shared test configuration: determinism, thread count, hypothesis profile."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from renorm_reference import PATHS, use_path

try:
    import os

    from hypothesis import HealthCheck, settings

    # Deterministic (derandomized) and bounded: the property tests must not make the
    # suite flaky or slow. HYPOTHESIS_PROFILE=thorough runs more examples.
    settings.register_profile(
        "default",
        derandomize=True,
        deadline=None,
        max_examples=40,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile(
        "thorough",
        derandomize=True,
        deadline=None,
        max_examples=500,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass


def pytest_addoption(parser):
    parser.addoption(
        "--cuda-sync-debug",
        choices=("default", "warn", "error"),
        default=None,
        help="run the CUDA tests' training steps under torch.cuda.set_sync_debug_mode (tests/cuda_sync.py)",
    )


def pytest_configure(config):
    import os

    from cuda_sync import ENV

    chosen = config.getoption("--cuda-sync-debug")
    if chosen is not None:
        os.environ[ENV] = chosen  # read by cuda_sync.no_host_sync (and inherited by pytest-xdist workers)


# Results must not depend on how many cores the test machine has.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same random state (torch, numpy, random)."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def one_thread():
    """One torch thread (the probes' default: their many small ops crawl with 2 threads on a busy
    machine), restored afterwards, since a probe's ``main(["--threads", ...])`` sets it process-wide."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["compiled", "python"])
def kernels(request, monkeypatch):
    """Run a test on the compiled kernels (bkn/csrc, the CPU default) and on the
    Python autograd Functions (the reference, and the path on GPUs and for other dtypes)."""
    from bkn.layers import _native

    if request.param == "compiled":
        if _native.load() is None:
            pytest.skip("the compiled kernels are off (BKN_NATIVE=0) or could not be built")
    else:
        monkeypatch.setattr(_native, "load", lambda: None)
    return request.param


@pytest.fixture(params=PATHS)
def path(request):
    """The Batch Renormalization tests' twin of ``kernels`` (ids ``compiled`` and ``torch``): the test runs
    inside ``renorm_reference.use_path``, which their property test also uses, one path per example."""
    with use_path(request.param) as name:
        yield name
