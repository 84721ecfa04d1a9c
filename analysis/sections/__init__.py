"""The report's sections: each turns the loaded frames into text, tables and figures.

A section is a :class:`Section` holding an ordered list of blocks (headings, text,
figures as PNG data URIs, HTML tables, and "missing input" notices that say what is
missing and which command produces it) plus the tidy frames it drew from, which the
report saves beside the HTML. A section never raises on missing inputs: it says so.
"""

from __future__ import annotations

from .base import SECTIONS, Inputs, Section, human
from .comparison import build_regressions
from .drift import build_drift
from .environment import build_env
from .gpu import build_gpu
from .timing import build_timing
from .training import build_training

__all__ = ["SECTIONS", "Inputs", "Section", "build", "human"]

BUILDERS = {
    "env": build_env,
    "timing": build_timing,
    "regressions": build_regressions,
    "drift": build_drift,
    "training": build_training,
    "gpu": build_gpu,
}


def build(inputs: Inputs, names: list[str]) -> list[Section]:
    """The requested sections, in the report's order; one that fails unexpectedly becomes an error block."""
    sections = []
    for name in SECTIONS:
        if name not in names:
            continue
        try:
            sections.append(BUILDERS[name](inputs))
        except Exception as exc:  # one broken section must not cost the whole report
            failed = Section(name, name)
            failed.error(f"This section could not be built: {type(exc).__name__}: {exc}")
            inputs.messages.warn(f"section {name!r} failed: {type(exc).__name__}: {exc}")
            sections.append(failed)
    return sections
