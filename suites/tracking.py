"""The tracking subset: the benchmark x parameter combinations ``nox -s continuous`` times at two commits.

Chosen for signal per minute on a 2-core CPU machine (see suites/README.md, "Regression
gating"): every method's forward+backward at a large and a small layer (8 samples of
64x56x56, 2 samples of 512x7x7: bandwidth-bound and overhead-bound), inference at one
shape, one CIFAR ResNet-20 training step per method (a batch of 16 in micro-batch groups
of 2: the layers at a group inside a batch, as BKN is used), peak memory of one
case, the copy-bandwidth reference (torch's own ``copy_``: a change there is the
machine, not the code) and the thread count every benchmark used.

:data:`TRACKING` is the one list; :func:`selectors` turns it into asv ``--bench``
regexes, which match asv's name of one parameter combination,
``module.Class.method(param0, param1, ...)`` with every value as its Python repr. This
module defines no benchmark (asv imports it while discovering and finds none).
"""

from __future__ import annotations

import re

from bkn import methods as _registry

from .harness.matrix import METHODS as _MATRIX

# The rivals (tag "rival") are timed by the layer and network suites but not gated: the gate guards this project's
# own code (BKN, BRN, ghost BN and the torch norms they are compared with), and each rival would add 4 entries.
METHODS = tuple(m for m in _MATRIX if "rival" not in _registry.get(m).tags)

_CPU32 = ("cpu", "float32", "contiguous")  # device, dtype, memory format of every tracked case
_LAYER_CASES = ((8, "64x56x56"), (2, "512x7x7"))  # (group_size, shape): large and small

TRACKING: tuple[tuple[str, tuple], ...] = (
    *(
        ("bench_layers.TimeForwardBackward.time_forward_backward", (m, g, s, *_CPU32))
        for g, s in _LAYER_CASES
        for m in METHODS
    ),
    *(("bench_layers.TimeForwardInference.time_forward_inference", (m, 8, "256x14x14", *_CPU32)) for m in METHODS),
    # The network step as BKN is used: a batch of 16 in normalization groups of 2.
    *(("bench_network.TimeCifarResNetGroupedStep.time_train_step", (m, 2, "3x32x32", *_CPU32)) for m in METHODS),
    ("bench_memory.PeakMemForwardBackward.peakmem_forward_backward", ("bkn-analytic", 8, "64x56x56", *_CPU32)),
    ("bench_bandwidth.TimeCopy.time_copy", (8, "64x56x56", *_CPU32)),
    ("bench_layers.TrackThreads.track_threads", ()),
)


def asv_name(benchmark: str, params: tuple) -> str:
    """asv's name of one parameter combination: ``bench.Class.method('bn', 8, ...)``, or the bare name."""
    return f"{benchmark}({', '.join(repr(p) for p in params)})" if params else benchmark


def selectors(entries=TRACKING) -> list[str]:
    """One anchored ``asv run --bench`` regex per entry, matching exactly that combination."""
    return [f"^{re.escape(asv_name(b, p))}$" for b, p in entries]
