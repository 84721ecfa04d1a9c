"""The compact tables a probe run prints (the HTML page is built by ``analysis.report`` from the same file).

:func:`tables` yields ``(title, table)`` pairs; a cell is averaged over seeds.

* real data: the median mean error and KL per method and group size (in network);
* end to end: prediction agreement between the network in training mode and the same
  network with population statistics, per method and group size (in-network mode);
* bias and noise of the mean (population sigma), median over the network's layers, in
  network and in isolation, for the headline methods;
* synthetic chain: each method's rmse divided by the floor's (the best estimate a group
  can give), per layer, then the median over layers; and per layer at group size 2.
  1 = as good as the floor; no method that estimates from its group alone (BN, BKN) can be
  below it beyond Monte-Carlo noise (BRN and running estimates pool earlier batches).
"""

from __future__ import annotations

import pandas as pd

from bkn.methods import FLOOR, names

HEADLINE = names(tag="headline")  # BN, BKN (both transitions, both gains), BRN: as the report's figure
HEADLINE_SIZES = (2, 4, 16)


def _layer_median(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Median over layers of the per-layer values, then the mean over seeds."""
    per_seed = frame.groupby(keys + ["seed"], observed=True)["value"].median().reset_index()
    return per_seed.groupby(keys, observed=True)["value"].mean().reset_index()


def _ordered(table: pd.DataFrame, frame: pd.DataFrame, level: str = "method") -> pd.DataFrame:
    order = {m: i for i, m in enumerate(dict.fromkeys(frame["method"]))}
    return table.sort_index(key=lambda idx: idx.map(lambda v: order.get(v, len(order))) if idx.name == level else idx)


def real_data_table(frame: pd.DataFrame, methods=HEADLINE, sizes=HEADLINE_SIZES) -> pd.DataFrame | None:
    """Real data, in network: the median mean error and the median KL at a few group sizes; a cell is the median
    over the network's layers of the per-layer median, averaged over seeds."""
    sel = frame[
        (frame["data"] != "synthetic")
        & (frame["mode"] == "in-network")
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
    return table.sort_index(key=lambda idx: idx.map(order) if idx.name == "method" else idx)


def end_to_end_table(frame: pd.DataFrame, metric: str = "agreement", sizes=HEADLINE_SIZES) -> pd.DataFrame | None:
    sel = frame[(frame["layer"] == "output") & (frame["metric"] == metric) & (frame["mode"] == "in-network")]
    sel = sel[sel["group_size"].isin(sizes)]
    if sel.empty:
        return None
    table = sel.pivot_table(
        index=["data", "network", "state", "method"], columns="group_size", values="value", aggfunc="mean"
    )
    return _ordered(table, frame)


def bias_noise_table(frame: pd.DataFrame, methods=HEADLINE, sizes=(2, 16)) -> pd.DataFrame | None:
    sel = frame[
        frame["metric"].isin(["mean_bias", "mean_noise"])
        & frame["method"].isin(methods)
        & frame["group_size"].isin(sizes)
        & (frame["data"] != "synthetic")
    ]
    if sel.empty:
        return None
    keys = ["network", "state", "mode", "method", "metric", "group_size"]
    table = _layer_median(sel, keys).pivot_table(
        index=["network", "state", "mode", "method"], columns=["metric", "group_size"], values="value"
    )
    return _ordered(table, frame)


def _floor_ratios(frame: pd.DataFrame, metrics=("mean_rmse", "var_rmse")) -> pd.DataFrame | None:
    syn = frame[(frame["data"] == "synthetic") & frame["metric"].isin(metrics) & (frame["mode"] == "in-network")]
    floor = syn[syn["method"] == FLOOR]
    if floor.empty:
        return None
    keys = ["group_size", "layer", "depth", "metric"]
    floor = floor.groupby(keys, observed=True)["value"].mean().rename("floor").reset_index()
    merged = syn[syn["method"] != FLOOR].merge(floor, on=keys)
    if merged.empty:
        return None
    return merged.assign(value=merged["value"] / merged["floor"])


def floor_table(frame: pd.DataFrame) -> pd.DataFrame | None:
    """Error / floor, median over layers, mean over seeds: methods x (metric, group size)."""
    ratios = _floor_ratios(frame)
    if ratios is None:
        return None
    table = _layer_median(ratios, ["method", "metric", "group_size"]).pivot_table(
        index="method", columns=["metric", "group_size"], values="value"
    )
    return _ordered(table, frame)


def floor_depth_table(frame: pd.DataFrame, group_size: int = 2, metric: str = "mean_rmse") -> pd.DataFrame | None:
    """Error / floor per layer (columns: depth) at one group size, mean over seeds."""
    ratios = _floor_ratios(frame, (metric,))
    if ratios is None:
        return None
    ratios = ratios[ratios["group_size"] == group_size]
    if ratios.empty:
        return None
    table = ratios.pivot_table(index="method", columns="depth", values="value", aggfunc="mean")
    return _ordered(table, frame)


def tables(frame: pd.DataFrame):
    """``(title, table)`` of every summary table the frame supports."""
    agreement = end_to_end_table(frame)
    if agreement is not None:
        yield (
            "End to end: share of predictions the network in training mode (the method's own statistics) "
            "shares with the same network using population statistics, by group size (mean over seeds)",
            agreement,
        )
    discrepancy = end_to_end_table(frame, "logit_discrepancy")
    if discrepancy is not None:
        yield "End to end: relative logit discrepancy ||z_train - z_pop||^2 / ||z_pop||^2", discrepancy
    bias_noise = bias_noise_table(frame)
    if bias_noise is not None:
        yield (
            "Error of the mean in population sigma, split into bias (over groups) and noise (spread across "
            "groups): median over layers, mean over seeds",
            bias_noise,
        )
    floor = floor_table(frame)
    if floor is not None:
        yield (
            "Synthetic residual chain: rmse / floor (the best estimate from the group), median over layers, "
            "mean over seeds, by group size",
            floor,
        )
    depth = floor_depth_table(frame)
    if depth is not None:
        yield "Synthetic residual chain: mean rmse / floor per layer (columns: depth), group size 2", depth


def format_table(table: pd.DataFrame) -> str:
    return table.to_string(float_format=lambda v: f"{v:.3g}", na_rep="-")
