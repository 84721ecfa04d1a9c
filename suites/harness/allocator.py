"""The C allocator's page faults, a hidden variable of CPU step timings, counted and optionally removed.

glibc's ``malloc`` serves large blocks (a ResNet-18 activation at batch 8 is megabytes) from
``mmap`` or the top of its heap and gives them back to the kernel when they are freed
(``munmap``, or trimming the heap). The next step's allocation of that size then touches
fresh pages: a minor page fault, and the kernel zeroing 4 KiB, per page. How often this
happens depends on the allocator's dynamic thresholds, which every model in the process
moves: in one process holding torch's ResNet-18 and a BKN-converted copy (issue 13's
measurement, 2 threads), torch-bn's step took 0 to 12,600 minor faults from one round to the
next and was up to a tenth slower in the rounds with many; the converted model, whose
rule gradients come from :mod:`bkn`'s own block pool, took fewer. A step ratio measured
under the default allocator therefore partly measures whose allocations happened to fault.

:func:`steady` (``--allocator steady``) fixes glibc's ``M_MMAP_THRESHOLD`` at 64 MiB (the
largest it takes; a fixed value also stops the dynamic adjustment, whose ceiling is 32 MiB)
and sets ``M_TRIM_THRESHOLD`` to 1 GiB with ``mallopt``, so blocks below 64 MiB come from the
heap and freed memory stays with the process for reuse: after the warm-up neither model
faults (a few hundred stray faults per step remain in some rounds), and the ratio is that of
the work done. The process keeps its peak heap (no memory goes back to the system until it
exits). :func:`minor_faults` counts the faults, so a table can show them next to each time.
``tests/test_suites_allocator.py`` plants a step that faults on every call under the default
allocator (a 40 MB block, above the dynamic threshold's ceiling, so mapped afresh each
time) and checks that the counter sees it and that ``steady`` removes it. The regression gate
does the same for asv's benchmark processes through glibc's environment variables
(``analysis.checkouts.MALLOC_ENV``): those are read when a process starts, this works inside one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

ALLOCATORS = ("steady", "default")
_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3
_MAP_ABOVE = 64 << 20  # blocks of this size or more are mapped (and unmapped when freed); glibc's maximum
_KEEP_BYTES = 1 << 30  # trim the heap only above this much free memory at its top: in effect never


def minor_faults() -> int:
    """This process's minor page faults so far (all threads)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def steady() -> None:
    """Make glibc keep freed memory for reuse (no ``mmap`` blocks, no heap trimming); raises
    RuntimeError where the C library is not glibc (no ``mallopt``) or refuses a setting."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt, version = libc.mallopt, libc.gnu_get_libc_version
    except (OSError, AttributeError, TypeError):
        raise RuntimeError(
            f"--allocator steady needs glibc's mallopt, which this C library ({name or 'none found'}) does not have; "
            "use --allocator default"
        ) from None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = (
        (_M_MMAP_THRESHOLD, _MAP_ABOVE, "M_MMAP_THRESHOLD"),
        (_M_TRIM_THRESHOLD, _KEEP_BYTES, "M_TRIM_THRESHOLD"),
    )
    for option, value, label in settings:
        if mallopt(option, value) != 1:
            version.restype = ctypes.c_char_p
            raise RuntimeError(f"glibc {version().decode()} refused mallopt({label}, {value})")
