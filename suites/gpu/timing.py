"""How the GPU check times: device events around blocks of calls, interleaved rounds, the issue's targets."""

from __future__ import annotations

import math
import time

import torch

from bkn.probes.measure import interleaved, per_call
from bkn.probes.summary_stats import paired_ratios, quartiles


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_for(device: torch.device):
    """``measure(fn, number)`` -> seconds per call: CUDA events around the block on a GPU, the wall clock
    (after a synchronisation) elsewhere."""
    if device.type != "cuda":
        return lambda fn, number: per_call(fn, number, time.perf_counter)

    def measure(fn, number):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number

    return measure


def calls_per_block(fn, device: torch.device, block_s: float, most: int = 200) -> int:
    """How many calls of ``fn`` fill about ``block_s`` seconds (one timed call after the warm-up)."""
    synchronize(device)
    once = measure_for(device)(fn, 1)
    return max(1, min(most, math.ceil(block_s / max(once, 1e-7))))


def timed(entries: dict, device: torch.device, rounds: int, block_s: float, baseline: str) -> dict:
    """Interleaved rounds of every entry (already warmed up); ``{name: {"time_s", "ratio", "q25", "q75"}}``.

    ``time_s`` is the median over rounds of seconds per call; ``ratio`` the median of the
    per-round ratios to ``baseline`` (entries timed in the same round meet the same machine
    state), with its quartiles.
    """
    numbers = {name: calls_per_block(fn, device, block_s) for name, fn in entries.items()}
    samples = interleaved(entries, rounds, numbers, measure=measure_for(device))
    out = {}
    for name in entries:
        _, median, _ = quartiles(samples[name])
        q25, ratio, q75 = quartiles(paired_ratios(samples, name, baseline))
        out[name] = {"time_s": median, "ratio": ratio, "q25": q25, "q75": q75}
    return out


# The targets (issue 24): fp32, batch 8 in groups of 2, ratio to torch's BN.
LAYER_TARGET = {"bn": 1.2, "brn": 1.2, "bkn": 1.4}  # by the method's norm: ghost BN, BRN, BKN given its prior
LARGE_LAYER_TARGET = 1.1  # every one of those at the >= 256 MB shape
COPY_FRACTION_TARGET = 0.7  # bytes the op must move / time, against the copy's rate, at that shape
NETWORK_TARGET = {  # ResNet-18 step: (eager, graphed)
    "bn": (1.3, 1.15),
    "brn": (1.3, 1.15),
    "bkn-analytic": (2.0, 1.4),
    "bkn-official": (2.5, 1.8),
}


def layer_target(norm: str, large: bool, dtype: str) -> float | None:
    if dtype != "float32" or norm not in LAYER_TARGET:
        return None
    return LARGE_LAYER_TARGET if large else LAYER_TARGET[norm]


def network_target(name: str, mode: str, network: str, dtype: str = "float32") -> float | None:
    if network != "resnet18" or dtype != "float32" or name not in NETWORK_TARGET:
        return None
    return NETWORK_TARGET[name][0 if mode == "eager" else 1]
