"""The parameter matrix of the suites, how a benchmark skips, and the CPU pruning rules.

Parameter names are :mod:`bkn.probes.results`' constants (the report reads the same ones):

=================== ==================================================================
``method``          a :mod:`bkn.methods` name: bn (built without a group, that is
                    ``torch.nn.BatchNorm*d`` itself), bkn-official, bkn-analytic (BKN with
                    p = 0.9 and that transition), brn (fixed rmax = 3, dmax = 5: the
                    correction path is exercised), gn (32 groups), ln, in
``group_size``      samples the norm computes its statistics over. A layer benchmark's
                    input is ``(group_size, *shape)``, normalized as one group; a network
                    step's batch is ``group_size`` samples, one group
``shape``           per-sample shape: the four ResNet stages at 224 input, an (N, C)
                    feature case ``"512"`` and a 3-d (video) case ``"64x8x28x28"``
``device``          cpu, cuda
``dtype``           float32, bfloat16
``memory_format``   contiguous, channels_last (4-d inputs only)
=================== ==================================================================

Skips (``NotImplementedError`` in setup, :func:`skip`: asv records "n/a", never a
failure, never a timing of something else): what cannot run (see
:mod:`suites.harness.decode` and :func:`suites.harness.layer.check_runnable`), and what
is *pruned on the CPU* so that the whole quick matrix fits in 15 minutes on 2 cores, one
constant per rule below. CUDA runs every combination that can run.
"""

from __future__ import annotations

import math

from bkn import methods
from bkn.probes.results import GROUP_PARAM, LAYER_PARAMS, METHOD_PARAM, TENSOR_PARAMS

# -- the values -----------------------------------------------------------------------------------
# The registry's "matrix" methods, in registry order: a method joins the parameter only when tagged.
METHODS = methods.names(tag="matrix")
GROUP_SIZES = (1, 2, 4, 8, 16, 32, 64)
STAGE_SHAPES = ("64x56x56", "128x28x28", "256x14x14", "512x7x7")
SHAPES = STAGE_SHAPES + ("512", "64x8x28x28")
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16")
MEMORY_FORMATS = ("contiguous", "channels_last")
SEED = 0  # of every case's inputs and weights

VALUES = {
    METHOD_PARAM: METHODS,
    GROUP_PARAM: GROUP_SIZES,
    "shape": SHAPES,
    "device": DEVICES,
    "dtype": DTYPES,
    "memory_format": MEMORY_FORMATS,
}
_unknown = set(LAYER_PARAMS) - set(VALUES)
if _unknown:  # bkn.probes.results renamed or added a parameter: the suites must follow
    raise ValueError(f"suites: no values for the asv parameters {sorted(_unknown)} of bkn.probes.results.LAYER_PARAMS")


def values(names, **only) -> list[list]:
    """asv's ``params`` for the parameters ``names``: every value, or ``only[name]`` where given."""
    return [list(only.get(name, VALUES[name])) for name in names]


LAYER_VALUES = values(LAYER_PARAMS)
TENSOR_VALUES = values(TENSOR_PARAMS)  # the copy reference: the same tensors, no method

# -- pruning (CPU only) ---------------------------------------------------------------------------
# Rule 1: no per-call tensor above 2**23 elements (32 MiB in float32) on the CPU. Keeps
# (32, 64, 56, 56) and (64, 128, 28, 28); drops (64, 64, 56, 56) and the 3-d case at
# group size 32 and 64, the largest tensors of the matrix.
CPU_MAX_ELEMENTS = 2**23
# Rule 2: on the CPU, bfloat16 and channels_last are measured at these group sizes only
# (the tiny, the paper's micro-batch and a large one); float32/contiguous at every size.
CPU_SECONDARY_GROUP_SIZES = (2, 8, 32)
# Rule 3 (networks): on the CPU a network step is measured up to this many input
# elements (ResNet-18 at 224: group size <= 8, about a second a step on one thread; the
# CIFAR ResNet at every group size). Rule 2 applies to the networks too.
CPU_MAX_NETWORK_INPUT = 8 * 3 * 224 * 224


def skip(reason: str):
    """Skip this parameter combination (asv records it as not run)."""
    raise NotImplementedError(reason)


def reraise_unsupported(err: RuntimeError, what: str):
    """A kernel that does not exist for this dtype/device is a skip; anything else is a bug."""
    text = str(err)
    if "not implemented for" in text or "Unsupported" in text or "not supported" in text:
        skip(f"{what}: {text.splitlines()[0]}")
    raise err


def check_secondary_pruned(group_size: int, dtype: str, memory_format: str) -> None:
    """Rule 2 (layers and networks): bfloat16 and channels_last only at the secondary group sizes."""
    if (dtype != "float32" or memory_format != "contiguous") and group_size not in CPU_SECONDARY_GROUP_SIZES:
        skip(f"pruned on cpu: {dtype}/{memory_format} only at group sizes {CPU_SECONDARY_GROUP_SIZES}")


def check_pruned(group_size: int, shape: tuple[int, ...], device, dtype: str, memory_format: str) -> None:
    """Rules 1 and 2 of the CPU pruning, for a layer (or a copy) on ``(group_size, *shape)``."""
    if device.type != "cpu":
        return
    elements = group_size * math.prod(shape)
    if elements > CPU_MAX_ELEMENTS:
        skip(f"pruned on cpu: {elements} elements per call > CPU_MAX_ELEMENTS={CPU_MAX_ELEMENTS}")
    check_secondary_pruned(group_size, dtype, memory_format)


def check_network_pruned(
    group_size: int, input_shape: tuple[int, ...], device, dtype: str, memory_format: str, batch: int | None = None
) -> None:
    """Rule 3 of the CPU pruning (a network step on ``batch`` inputs, default ``group_size``), and rule 2."""
    if device.type != "cpu":
        return
    elements = (batch or group_size) * math.prod(input_shape)
    if elements > CPU_MAX_NETWORK_INPUT:
        skip(f"pruned on cpu: {elements} input elements per step > CPU_MAX_NETWORK_INPUT={CPU_MAX_NETWORK_INPUT}")
    check_secondary_pruned(group_size, dtype, memory_format)
