"""The table the training probe prints: final accuracy per method x group size, and the time per step.

(The HTML page is built by ``analysis.report`` from the same result file.)
"""

from __future__ import annotations

import math

import pandas as pd

from bkn import methods as registry


def _mean_std(values: pd.Series, scale: float, digits: int) -> str:
    mean = values.mean() * scale
    std = values.std(ddof=1) * scale if len(values) > 1 else math.nan
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if math.isfinite(std) else f"{mean:.{digits}f}"


def _uses_groups(method: str) -> bool:
    return registry.get(method).uses_groups


def _table(frame: pd.DataFrame, title: str, metric: str, scale: float, digits: int, reduce=None) -> list[str]:
    """One block: a row per method, a column per group size (``g=n``) and one for per-sample norms."""
    methods = list(dict.fromkeys(frame.method))
    sizes = sorted(frame[frame.method.map(_uses_groups)].group_size.unique())
    columns = [f"g={g}" for g in sizes] + ["per sample"]
    lines = [title, f"{'method':<24}" + "".join(f"{c:>15}" for c in columns)]
    for method in methods:
        grouped = _uses_groups(method)
        cells = []
        for column in columns:
            if (column == "per sample") == grouped:
                cells.append("")
                continue
            rows = frame[(frame.method == method) & (frame.metric == metric)]
            if grouped:
                rows = rows[rows.group_size == int(column[2:])]
            values = rows.value if reduce is None else reduce(rows)
            cells.append(_mean_std(values, scale, digits) if len(values) else "-")
        lines.append(f"{method:<24}" + "".join(f"{c:>15}" for c in cells))
    return lines + [""]


def summary(frame: pd.DataFrame) -> str:
    """Final-epoch accuracy (mean ± std over seeds) per method x group size (``g=``), and ms per step."""
    epoch = int(frame.epoch.max())
    last = frame[frame.epoch == epoch]
    seeds = f"seeds {', '.join(map(str, sorted(frame.seed.unique())))}"
    batch = ", ".join(map(str, sorted(frame.batch_size.unique())))
    lines = []
    lines += _table(
        last,
        f"Final test accuracy (%), own inference statistics, epoch {epoch}, SGD batch {batch}, by group size g: "
        f"mean ± std over {seeds}",
        "test_acc",
        100,
        1,
    )
    lines += _table(
        last,
        f"Final test accuracy (%), population statistics of the training set (PreciseBN-style), epoch {epoch}",
        "test_acc_precise",
        100,
        1,
    )
    lines += _table(last, f"Final training loss, epoch {epoch}", "train_loss", 1, 3)
    # Time per step: each run's mean over its epochs, then mean ± std over seeds.
    lines += _table(
        frame,
        "Time per SGD step (ms), mean over epochs; ± over seeds",
        "step_time_s",
        1e3,
        1,
        reduce=lambda rows: rows.groupby("seed").value.mean(),
    )
    return "\n".join(lines)
