"""The tables the training probe prints: final test accuracy per method x group size, and the time per step.

One block per data set, network and evaluation: the methods' running estimates
(``running``), then population statistics recomputed after training (``population``,
PreciseBN); then the final training loss and the time per SGD step per network.

With several workers the title says how they share the SGD batch; ``g`` is then the
group size inside each worker's share, and SyncBN (pooled over every worker) has a
column of its own.

(The HTML page is built by ``analysis.report`` from the same result file.)
"""

from __future__ import annotations

import math

import pandas as pd

from bkn import methods as registry
from bkn.probes import sources


def _mean_std(values: pd.Series, scale: float, digits: int) -> str:
    mean = values.mean() * scale
    std = values.std(ddof=1) * scale if len(values) > 1 else math.nan
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if math.isfinite(std) else f"{mean:.{digits}f}"


POOLED = "all workers"  # the column of norms pooled over every worker's samples (syncbn)
PER_SAMPLE = "per sample"


def _column(method: str) -> str | None:
    """Where a method's single value goes: ``None`` for grouped norms (a column per group size)."""
    entry = registry.get(method)
    if entry.uses_groups:
        return None
    return POOLED if entry.batch_dependent else PER_SAMPLE


def _table(frame: pd.DataFrame, title: str, metric: str, scale: float, digits: int, reduce=None) -> list[str]:
    """One block: a row per method, a column per group size (``g=n``), one for norms pooled over every worker
    (when there is one) and one for per-sample norms."""
    methods = list(dict.fromkeys(frame.method))
    kinds = {method: _column(method) for method in methods}
    sizes = sorted(frame[frame.method.map(lambda m: kinds[m] is None)].group_size.unique())
    pooled = POOLED in kinds.values()
    extra = ([POOLED] if pooled else []) + ([PER_SAMPLE] if PER_SAMPLE in kinds.values() or not pooled else [])
    columns = [f"g={g}" for g in sizes] + extra
    lines = [title, f"{'method':<24}" + "".join(f"{c:>15}" for c in columns)]
    for method in methods:
        cells = []
        for column in columns:
            own = column.startswith("g=") if kinds[method] is None else column == kinds[method]
            if not own:
                cells.append("")
                continue
            rows = frame[(frame.method == method) & (frame.metric == metric)]
            if kinds[method] is None:
                rows = rows[rows.group_size == int(column[2:])]
            values = rows.value if reduce is None else reduce(rows)
            cells.append(_mean_std(values, scale, digits) if len(values) else "-")
        lines.append(f"{method:<24}" + "".join(f"{c:>15}" for c in cells))
    return lines + [""]


def _batch(frame: pd.DataFrame) -> str:
    """The SGD batch, and how the workers share it when there are several."""
    batch = ", ".join(map(str, sorted(frame.batch_size.unique())))
    sizes = sorted(frame.world_size.unique())
    if sizes == [1]:
        return f"SGD batch {batch}, by group size g"
    shares = sorted({(int(b), int(k)) for b, k in zip(frame.batch_size, frame.world_size)})
    workers = ", ".join(f"{k} workers of {b // k}" for b, k in shares)
    return f"SGD batch {batch} on {workers}, by per-worker group size g ({POOLED}: SyncBN over the SGD batch)"


def summary(frame: pd.DataFrame) -> str:
    """Final-epoch test accuracy (mean ± std over seeds) per method x group size (``g=``), per data set, network
    and evaluation; the final training loss and ms per step per network."""
    lines = []
    for (data, network), part in frame.groupby(["data", "network"], sort=False):
        epoch = int(part.epoch.max())
        last = part[part.epoch == epoch]
        seeds = f"seeds {', '.join(map(str, sorted(part.seed.unique())))}"
        where = f"{sources.label(data)}, {network}"
        for evaluation, about in (
            ("running", "the methods' running estimates (GN, LN: per-sample statistics)"),
            ("population", "population statistics recomputed after training (PreciseBN)"),
        ):
            rows = last[last.evaluation == evaluation]
            if rows.empty:
                continue
            lines += _table(
                rows,
                f"{where}: final test accuracy (%) with {about}, epoch {epoch}, {_batch(part)}: "
                f"mean ± std over {seeds}",
                "test_acc",
                100,
                1,
            )
        lines += _table(last, f"{where}: final training loss, epoch {epoch}", "train_loss", 1, 3)
        # Time per step: each run's mean over its epochs, then mean ± std over seeds.
        lines += _table(
            part,
            f"{where}: time per SGD step (ms), mean over epochs; ± over seeds",
            "step_time_s",
            1e3,
            1,
            reduce=lambda rows: rows.groupby("seed").value.mean(),
        )
    return "\n".join(lines)
