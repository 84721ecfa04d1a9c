"""What every section shares: its inputs, the Section container, formatting helpers."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd

from bkn.probes.results import DEFAULT_VARIANT, VARIANT_PARAMS  # torch-free: the asv vocabulary the suites declare

from ..asv_results import AsvResults
from ..messages import Messages
from ..probes import ProbeResults
from ..regressions import DEFAULT_ALPHA, DEFAULT_THRESHOLD
from ..rounds import DEFAULT_ALPHA as ROUNDS_ALPHA

SECTIONS = ["env", "timing", "regressions", "drift", "training", "gpu"]
BASELINE = "bn"  # the method the timing figures divide by (timing, chain_cost, distributed)
GROUP_LABEL = "group size"  # axis label of GROUP_PARAM in the timing figures and tables
MAX_TABLE_ROWS = 400  # longer tables are cut in the page (the saved CSV has every row)
BENCH_COMMANDS = (
    "`nox -s bench` (a quick run of the working tree) or `asv run` (commits tracked over time; "
    "add `--record-samples` so changes can be tested for significance)"
)


@dataclasses.dataclass
class Inputs:
    """Everything a section may draw from, and the options of this report."""

    asv: AsvResults
    drift: ProbeResults
    training: ProbeResults
    messages: Messages
    base: str | None = None
    head: str | None = None
    threshold: float = DEFAULT_THRESHOLD
    alpha: float = DEFAULT_ALPHA
    repo: str | None = "."
    rounds_dir: str | None = None  # rounds files of `nox -s continuous` (analysis.rounds); None: not looked for
    rounds_alpha: float = ROUNDS_ALPHA
    no_base: str | None = None  # why there is no baseline to compare with (the section says it)
    regressions_found: int = 0
    gpu: ProbeResults | None = None  # the GPU check's tidy file (python -m suites.gpu); None: not looked for
    errors: list[str] = dataclasses.field(default_factory=list)  # requested comparisons that were impossible


@dataclasses.dataclass
class Section:
    id: str
    title: str
    blocks: list[dict] = dataclasses.field(default_factory=list)
    data: dict[str, pd.DataFrame] = dataclasses.field(default_factory=dict)
    status: str = "ok"  # ok | missing | error
    summary: str = ""  # one line for the report's "at a glance" list

    def heading(self, text: str) -> None:
        self.blocks.append({"kind": "heading", "text": text})

    def text(self, text: str) -> None:
        self.blocks.append({"kind": "text", "text": text})

    def figure(self, src: str, caption: str) -> None:
        self.blocks.append({"kind": "figure", "src": src, "caption": caption})

    def table(
        self,
        frame: pd.DataFrame,
        caption: str,
        collapsed: bool = False,
        index: bool = False,
        max_rows: int = MAX_TABLE_ROWS,
    ) -> None:
        if len(frame) > max_rows:  # the page stays light; every row is in the saved data
            caption += f" First {max_rows} of {len(frame)} rows; all of them in the saved data."
        html = frame.head(max_rows).to_html(index=index, escape=True, na_rep="–", border=0, classes="data")
        self.blocks.append(
            {
                "kind": "table",
                "html": html,
                "caption": caption,
                "collapsed": collapsed,
                "rows": min(len(frame), max_rows),
            }
        )

    def missing(self, what: str, command: str) -> None:
        self.status = "missing" if self.status == "ok" else self.status
        self.summary = self.summary or f"missing {what}; produced by {command}"
        self.blocks.append({"kind": "missing", "what": what, "command": command})

    def error(self, text: str) -> None:
        self.status = "error"
        self.summary = text
        self.blocks.append({"kind": "error", "text": text})


# ---------------------------------------------------------------- formatting


def human(value, unit: str | None) -> str:
    """A value with a readable unit: 1.23 ms, 45.6 MiB; '–' when missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or pd.isna(value):
        return "–"
    value = float(value)
    if unit == "seconds":
        for scale, suffix in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns")):
            if abs(value) >= scale or scale == 1e-9:
                return f"{value / scale:.3g} {suffix}"
    if unit == "bytes":
        for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "B")):
            if abs(value) >= scale or scale == 1:
                return f"{value / scale:.3g} {suffix}"
    return f"{value:.4g}" + (f" {unit}" if unit and unit not in ("unit", "unknown") else "")


def short_commit(commit: str | None) -> str:
    return (commit or "?")[:8]


def present_columns(frame: pd.DataFrame, columns: list[str]) -> list[str]:
    return [c for c in columns if c in frame.columns and frame[c].notna().any()]


def label_rows(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    """One text label per row from several columns ("64x56x56 · float32"); '' when no columns."""
    if not columns:
        return pd.Series([""] * len(frame), index=frame.index, dtype=object)
    return frame[columns].astype(str).agg(" · ".join, axis=1)


def default_variant(frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Rows of the usual variant (float32, contiguous) when present, else of the most common one."""
    chosen = {}
    for column in present_columns(frame, VARIANT_PARAMS):
        values = frame[column].dropna().astype(str)
        preferred = DEFAULT_VARIANT[column]
        chosen[column] = preferred if (values == preferred).any() else values.mode().iloc[0]
    mask = pd.Series(True, index=frame.index)
    for column, value in chosen.items():
        mask &= frame[column].astype(str) == value
    return frame[mask], ", ".join(f"{k}={v}" for k, v in chosen.items())


def provenance(probe: ProbeResults) -> str:
    meta, frame = probe.meta, probe.frame
    parts = []
    for key in ("commit", "torch", "device", "threads"):
        value = meta.get(key)
        if value is None and frame is not None and key in frame.columns:
            value = ", ".join(frame[key].dropna().astype(str).unique()[:3]) or None
        if value is not None:
            parts.append(f"{key} {value}")
    if "duration_s" in meta:
        parts.append(f"took {float(meta['duration_s']):.0f} s")
    yours = f" Your model and data: {', '.join(str(p) for p in probe.yours)}." if probe.yours else ""
    return f"From {probe.path} ({'; '.join(parts) or 'no environment recorded'}).{yours}"
