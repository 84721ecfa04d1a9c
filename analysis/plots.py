"""Seaborn figures on tidy frames, returned as PNG ``data:`` URIs for a self-contained page.

Every function takes a tidy frame (one row per observation) and column names, draws
with seaborn's figure-level functions where they fit, and returns the PNG as a data
URI (:func:`to_data_uri`); nothing here knows where the frames came from. Colours are
fixed per normalization method (:func:`palette`) so "bkn-official" has the same colour
in every figure of a report.
"""

from __future__ import annotations

import base64
import io
import math
import warnings

import matplotlib

matplotlib.use("Agg")  # no display: figures are only ever written to PNG

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from bkn import methods as registry  # noqa: E402  (torch-free: labels, colours, order)

DPI = 96
MAX_FACETS = 12

sns.set_theme(context="notebook", style="whitegrid", font_scale=0.9)


def palette(names) -> dict:
    """A stable colour per result ``method`` value, in legend order (:func:`bkn.methods.order`).

    Registry methods and references use the registry's colours (``<m>-ema`` shares its
    method's); names the registry does not know get the remaining palette colours in turn.
    """
    ordered = hue_order(names)
    spare = iter(c for c in sns.color_palette("Dark2", 8) + sns.color_palette("Set1", 9))
    return {m: registry.colour(m) or next(spare) for m in ordered}


def hue_order(names) -> list[str]:
    """Distinct names in the registry's legend order."""
    return registry.order(str(m) for m in names)


def _relabel_legend(grid) -> None:
    """Legend entries that are method names show the registry's labels."""
    legend = getattr(grid, "_legend", None) or getattr(grid, "legend", None)
    for text in legend.texts if legend is not None else ():
        text.set_text(registry.label(text.get_text()))


def to_data_uri(fig) -> str:
    """Render a matplotlib (or seaborn grid) figure to a base64 PNG data URI and close it."""
    fig = getattr(fig, "figure", fig)
    buffer = io.BytesIO()
    # No Software metadata: the page must not contain any URL, not even inside a PNG chunk.
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _positive(values) -> bool:
    values = pd.to_numeric(pd.Series(values), errors="coerce").dropna()
    return len(values) > 0 and bool((values > 0).all())


def _log2_x(ax, ticks) -> None:
    ticks = sorted({int(t) for t in ticks if pd.notna(t) and t > 0})
    if not ticks:
        return
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.minorticks_off()


def _plain_log_y(ax) -> None:
    """Log y axis labelled 0.5, 2, 300 rather than 5x10^-1 (minor ticks labelled when the span is short)."""
    ax.set_yscale("log")
    plain = mticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_locator(mticker.LogLocator(base=10, subs=(2.0, 5.0)))
    lo, hi = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if hi / max(lo, 1e-300) < 30 else mticker.NullFormatter())


def display_scale(values, unit: str | None) -> tuple[float, str]:
    """(factor, unit label) that bring seconds or bytes to a readable unit: ms, µs, MiB..."""
    values = pd.to_numeric(pd.Series(values), errors="coerce").dropna()
    typical = float(values.abs().median()) if len(values) else 1.0
    if unit == "seconds":
        for factor, label in ((1.0, "s"), (1e3, "ms"), (1e6, "µs"), (1e9, "ns")):
            if typical * factor >= 1 or label == "ns":
                return factor, label
    if unit == "bytes":
        for factor, label in ((2.0**-30, "GiB"), (2.0**-20, "MiB"), (2.0**-10, "KiB"), (1.0, "B")):
            if typical * factor >= 1 or label == "B":
                return factor, label
    return 1.0, unit or ""


def _col_wrap(n: int) -> int | None:
    return None if n <= 1 else min(4, n)


def lines_vs(
    frame: pd.DataFrame,
    x: str,
    y: str,
    *,
    hue: str,
    col: str | None = None,
    style: str | None = None,
    xlabel: str,
    ylabel: str,
    title: str,
    logx2: bool = True,
    logy: bool | None = None,
    errorbar=("pi", 50),
    reference: float | None = None,
) -> str:
    """y against x, one line per ``hue`` value, small multiples over ``col``; spread over repeats as a band.

    Returns the PNG data URI.
    """
    frame = frame.dropna(subset=[x, y])
    if col is not None:
        cols = list(dict.fromkeys(frame[col]))[:MAX_FACETS]
        frame = frame[frame[col].isin(cols)]
    else:
        cols = [None]
    hues = hue_order(frame[hue])
    grid = sns.relplot(
        data=frame,
        x=x,
        y=y,
        hue=hue,
        hue_order=hues,
        palette=palette(hues),
        style=style,
        col=col,
        col_wrap=_col_wrap(len(cols)) if col else None,
        kind="line",
        marker="o",
        markersize=5,
        errorbar=errorbar,
        height=2.8 if len(cols) > 1 else 3.4,
        aspect=1.25 if len(cols) > 1 else 1.6,
        facet_kws={"sharey": False, "sharex": False},
    )
    if logy is None:
        logy = _positive(frame[y]) and frame[y].max() / max(frame[y].min(), 1e-300) > 20
    for ax in grid.axes.flat:
        if logx2:
            _log2_x(ax, frame[x].unique())
        if logy:
            _plain_log_y(ax)
        if not logx2 and pd.api.types.is_integer_dtype(frame[x]):
            ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
        if reference is not None:
            ax.axhline(reference, color="0.3", lw=0.8, ls="--")
    _relabel_legend(grid)
    grid.set_axis_labels(xlabel, ylabel)
    if col is not None and len(cols) > 1:
        grid.set_titles("{col_name}")
        grid.figure.suptitle(title, y=1.03)
    else:  # one panel: its own title, so the legend beside it cannot cover a figure title
        grid.set_titles(title + ("\n{col_name}" if col is not None else ""))
    if grid.legend is not None:  # below the panels: beside them it covered the last panel's axis
        sns.move_legend(grid, "upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, frameon=False, title=None)
        grid.figure.subplots_adjust(right=0.97)
    return to_data_uri(grid)


def ratio_heatmaps(
    frame: pd.DataFrame,
    *,
    value: str,
    row: str,
    column: str,
    facet: str,
    title: str,
    center: float = 1.0,
    fmt: str = ".2f",
    label: str = "",
) -> str:
    """One heatmap per ``facet`` value (rows ``row``, columns ``column``), diverging around ``center``."""
    facets = list(dict.fromkeys(frame[facet]))[:MAX_FACETS]
    ncols = min(3, len(facets))
    nrows = math.ceil(len(facets) / ncols)
    rows_all = hue_order(frame[row])
    width = max(3.2, 0.55 * frame[column].nunique() + 1.6)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, 0.42 * len(rows_all) * nrows + 1.2 * nrows), squeeze=False
    )
    finite = frame[value].replace([np.inf, -np.inf], np.nan).dropna()
    positive = finite[finite > 0]
    spread = float(np.nanmax(np.abs(np.log2(positive)))) if len(positive) else 1.0
    spread = max(spread, 0.1)
    for ax, name in zip(axes.flat, facets):
        table = (
            frame[frame[facet] == name]
            .pivot_table(index=row, columns=column, values=value, aggfunc="median")
            .reindex([r for r in rows_all if r in set(frame.loc[frame[facet] == name, row])])
        )
        shown = np.log2(table.where(table > 0))
        with warnings.catch_warnings():  # seaborn 0.13 calls a colormap method matplotlib 3.11 deprecates
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            sns.heatmap(
                shown,
                ax=ax,
                annot=table,
                fmt=fmt,
                cmap="vlag",
                center=np.log2(center),
                vmin=-spread,
                vmax=spread,
                cbar=False,
                linewidths=0.5,
                annot_kws={"fontsize": 7},
            )
        ax.set_title(str(name))
        ax.set_yticklabels([registry.label(t.get_text()) for t in ax.get_yticklabels()])
        ax.tick_params(axis="y", rotation=0)
        ax.set_xlabel(column)
        ax.set_ylabel(row)
    for ax in list(axes.flat)[len(facets) :]:
        ax.set_visible(False)
    fig.suptitle(f"{title}{' (' + label + ')' if label else ''}", y=1.0)
    fig.tight_layout()
    return to_data_uri(fig)


def trend_grid(frame: pd.DataFrame, keys: list[tuple], *, labels: dict, base: str, head: str, title: str) -> str:
    """Value at every commit (median with its interquartile range) for a few benchmarks, one panel each."""
    keys = keys[:MAX_FACETS]
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 2.9 * nrows), squeeze=False)
    group = ["machine", "env_name", "benchmark", "param_key"]
    for ax, key in zip(axes.flat, keys):
        sub = frame[(frame[group] == pd.Series(dict(zip(group, key)))).all(axis=1)].sort_values("order")
        ax.plot(sub["order"], sub["value"], marker="o", color="C0")
        if sub["q_25"].notna().any():
            ax.fill_between(sub["order"], sub["q_25"], sub["q_75"], color="C0", alpha=0.2, lw=0)
        for commit, colour in ((base, "0.4"), (head, "C3")):
            at = sub[sub["commit"] == commit]
            if len(at):
                ax.axvline(at["order"].iloc[0], color=colour, ls="--", lw=0.9)
        ax.set_xticks(sub["order"])
        ax.set_xticklabels(sub["commit_short"], rotation=45, ha="right", fontsize=7)
        ax.set_title(labels.get(key, str(key)), fontsize=8)
        ax.set_ylabel(sub["unit"].iloc[0] if "unit" in sub and len(sub) else "value")
        ax.set_ylim(bottom=0)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    fig.suptitle(title, y=1.0)
    fig.tight_layout()
    return to_data_uri(fig)


def pareto(points: pd.DataFrame, *, title: str, xlabel: str, ylabel: str) -> str:
    """Accuracy (``mean`` ± ``sd``) against ``cost``, one point per method in its registry colour, one panel per
    ``panel`` value; the frontier (``on_frontier``) drawn as a staircase and its points labelled."""
    points = points.dropna(subset=["cost", "mean"])
    panels = list(dict.fromkeys(points["panel"]))[:MAX_FACETS]
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.1 * nrows), squeeze=False)
    colours = palette(points["method"])
    for ax, name in zip(axes.flat, panels):
        part = points[points["panel"] == name]
        for row in part.itertuples(index=False):
            ax.errorbar(
                row.cost,
                row.mean,
                yerr=0.0 if pd.isna(row.sd) else row.sd,
                fmt="o",
                ms=5,
                capsize=2,
                color=colours[row.method],
                label=row.method,
                zorder=3,
            )
        best = part[part["on_frontier"]].sort_values("cost")
        if len(best):
            ax.step(best["cost"], best["mean"], where="post", color="0.25", lw=1.0, ls="--", zorder=2)
            for row in best.itertuples(index=False):
                ax.annotate(
                    registry.label(row.method),
                    (row.cost, row.mean),
                    xytext=(4, 4),
                    textcoords="offset points",
                    fontsize=6.5,
                    color=colours[row.method],
                )
        ax.axvline(1.0, color="0.6", lw=0.8, ls=":")
        ax.set_title(str(name), fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    handles = {}
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, handle)
    ordered = [m for m in hue_order(handles) if m in handles]
    fig.legend(
        [handles[m] for m in ordered],
        [registry.label(m) for m in ordered],
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=min(4, max(1, len(ordered))),
        frameon=False,
        fontsize=8,
    )
    fig.suptitle(title, y=1.0)
    fig.tight_layout()
    return to_data_uri(fig)
