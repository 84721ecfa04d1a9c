"""The compact tables a probe run prints (the HTML page is built by ``analysis.report`` from the same file).

* :func:`real_data_table` - per real-data setup and state: the median mean error and the
  median KL at a few group sizes for the headline methods. A cell is the median over the
  network's layers of the per-layer median, averaged over seeds.
* :func:`floor_table` - synthetic chain: each method's error divided by the floor's (the
  best estimate from the group, same micro-batches), per layer, then the median over
  layers, averaged over seeds. 1 = as good as the floor; below 1 is possible where the
  architecture fixes a statistic (see :mod:`bkn.stats.synthetic`).
"""

from __future__ import annotations

import pandas as pd

from bkn.methods import FLOOR

HEADLINE = ("bn", "bkn-official", "bkn-analytic-adaptive", "brn")
HEADLINE_SIZES = (2, 4, 16)


def _layer_median(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Median over layers of the per-layer medians, then the mean over seeds."""
    per_seed = frame.groupby(keys + ["seed"], observed=True)["value"].median().reset_index()
    return per_seed.groupby(keys, observed=True)["value"].mean().reset_index()


def real_data_table(frame: pd.DataFrame, methods=HEADLINE, sizes=HEADLINE_SIZES) -> pd.DataFrame | None:
    sel = frame[
        (frame["data"] != "synthetic")
        & frame["method"].isin(methods)
        & frame["group_size"].isin(sizes)
        & frame["metric"].isin(["mean_error", "kl"])
        & (frame["statistic"] == "median")
    ]
    if sel.empty:
        return None
    keys = ["data", "network", "state", "method", "metric", "group_size"]
    table = _layer_median(sel, keys).pivot_table(
        index=["data", "network", "state", "method"], columns=["metric", "group_size"], values="value"
    )
    order = {m: i for i, m in enumerate(methods)}
    table = table.sort_index(key=lambda idx: idx.map(order) if idx.name == "method" else idx)
    return table


def floor_table(frame: pd.DataFrame, metrics=("mean_error", "kl")) -> pd.DataFrame | None:
    syn = frame[(frame["data"] == "synthetic") & (frame["statistic"] == "median") & frame["metric"].isin(metrics)]
    floor = syn[syn["method"] == FLOOR]
    if floor.empty:
        return None
    keys = ["group_size", "seed", "layer", "metric", "state", "network"]
    floor = floor[keys + ["value"]].rename(columns={"value": "floor"})
    merged = syn[syn["method"] != "floor"].merge(floor, on=keys)
    if merged.empty:
        return None
    merged = merged.assign(value=merged["value"] / merged["floor"])
    table = _layer_median(merged, ["method", "metric", "group_size"]).pivot_table(
        index="method", columns=["metric", "group_size"], values="value"
    )
    order = list(dict.fromkeys(frame["method"]))
    return table.loc[[m for m in order if m in table.index]]


def format_table(table: pd.DataFrame) -> str:
    return table.to_string(float_format=lambda v: f"{v:.3g}", na_rep="-")
