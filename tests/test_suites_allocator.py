"""``suites.harness.allocator``: the page-fault counter sees faults a step plants, and ``steady`` removes them.

Run in fresh processes: ``steady`` changes the C allocator of the process for good.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from suites.harness import allocator

# Each call fills a 40 MB block and frees it: above the largest threshold glibc's default
# (dynamic) one reaches, 32 MiB, so the default allocator maps fresh pages every time.
_PLANTED = """
import json, sys, torch
from suites.harness import allocator
if sys.argv[1] == "steady":
    allocator.steady()
def step():
    torch.empty(10_000_000).fill_(1.0)
for _ in range(13):  # (the heap grows to hold the block on the first calls)
    step()
before = allocator.minor_faults()
for _ in range(10):
    step()
print(json.dumps((allocator.minor_faults() - before) / 10))
"""


def _faults_per_step(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", _PLANTED, mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.slow
def test_counter_sees_planted_faults_and_steady_removes_them():
    pages = 40_000_000 // 4096  # 9,766 pages of 4 KiB
    default, steady = _faults_per_step("default"), _faults_per_step("steady")
    assert default > pages / 16  # the counter sees the fresh pages of every call
    assert steady < default / 20  # reused memory: (almost) nothing to fault in


def test_minor_faults_counts_up():
    first = allocator.minor_faults()
    assert isinstance(first, int) and allocator.minor_faults() >= first
