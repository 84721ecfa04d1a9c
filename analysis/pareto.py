"""Accuracy against cost: the training probe's final accuracy per method beside the cost of one training step.

For each data set, network and group size, one point per method: x = the cost of one SGD
step relative to BN at the same group size, y = the final test accuracy (mean ± sd over
seeds). Methods without groups (GN, LN and the other per-sample norms; SyncBN) are trained
once, at the SGD batch, and appear at every group size (their accuracy and cost do not
depend on it; their cost is divided by BN's at the panel's group size).

The cost comes from one of two sources, chosen per group size (:func:`relative_cost`):

* ``asv``: the network-step benchmark (``suites/bench_network.py``,
  ``TimeCifarResNetGroupedStep``: the CIFAR ResNet-20, a batch of 16 in groups of
  ``group_size``), when asv results of the training run's own commit hold every method at
  that group size (the benchmark's groups are 2, 4 and 16);
* ``probe``: otherwise the training probe's own ``step_time_s`` (forward, backward and SGD
  update, timed inside each run): per run the median over epochs, then per seed the ratio to
  BN's run of the same network, group and seed, then the geometric mean over seeds
  (``cost_spread``: the geometric standard deviation of the per-seed ratios). Runs train in
  parallel worker processes, not interleaved, so these ratios carry the machine's noise.

The *Pareto frontier* (:func:`frontier`) holds the methods no other method beats on both
axes: none is at most as costly and at least as accurate, better in one.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bkn import methods as registry

BASELINE = "bn"
NETWORK_STEP = "TimeCifarResNetGroupedStep.time_train_step"  # the asv benchmark the cost comes from when it can
COST_COLUMNS = ("data", "network", "group_size", "method", "cost", "source")  # probe_cost adds cost_spread


def has_groups(method: str) -> bool:
    """Whether the method's statistics depend on the group size (unknown names: assumed so)."""
    try:
        return registry.get(method).uses_groups
    except ValueError:
        return True


def final_accuracy(frame: pd.DataFrame, evaluation: str = "running") -> pd.DataFrame:
    """The last epoch's test accuracy, in points, one row per data x network x method x group size x seed
    (columns ``data``, ``network``, ``method``, ``group_size``, ``seed``, ``value``)."""
    rows = frame[(frame["metric"] == "test_acc") & (frame["evaluation"] == evaluation)].dropna(subset=["value"])
    keys = ["data", "network", "method", "group_size", "seed"]
    last = rows.groupby(keys, observed=True)["epoch"].transform("max")
    out = rows[rows["epoch"] == last][keys + ["value"]].copy()
    out["value"] = 100.0 * out["value"].astype(float)
    for column in ("data", "network", "method"):
        out[column] = out[column].astype(str)
    return out.reset_index(drop=True)


def group_sizes(accuracy: pd.DataFrame) -> list[int]:
    """The group sizes the grouped methods were trained at (the panels), ascending."""
    grouped = accuracy[accuracy["method"].map(has_groups)]
    return sorted(int(g) for g in grouped["group_size"].unique())


def at_group(accuracy: pd.DataFrame, group: int) -> pd.DataFrame:
    """The rows that answer "at a group of ``group``": grouped methods at that group, the others at their one (the
    SGD batch; the largest recorded, should there be several)."""
    grouped = accuracy["method"].map(has_groups)
    largest = accuracy.groupby("method")["group_size"].transform("max")
    keep = (grouped & (accuracy["group_size"] == group)) | (~grouped & (accuracy["group_size"] == largest))
    return accuracy[keep].assign(group_size=group)


def _run_times(frame: pd.DataFrame) -> pd.DataFrame:
    """Seconds per SGD step per run: the median over its epochs."""
    times = frame[(frame["metric"] == "step_time_s") & (frame["evaluation"] == "training")].dropna(subset=["value"])
    keys = ["data", "network", "method", "group_size", "seed"]
    out = times.groupby(keys, observed=True)["value"].median().reset_index()
    for column in ("data", "network", "method"):
        out[column] = out[column].astype(str)
    return out


def probe_cost(frame: pd.DataFrame) -> pd.DataFrame:
    """Step time relative to BN from the training probe's own ``step_time_s`` (see the module docstring)."""
    times = _run_times(frame)
    out = []
    for (data, network), part in times.groupby(["data", "network"], sort=False):
        for group in group_sizes(part):
            here = at_group(part, group)
            base = here[here["method"] == BASELINE].set_index("seed")["value"]
            for method, rows in here.groupby("method", sort=False):
                ratios = rows.set_index("seed")["value"] / base
                ratios = ratios[np.isfinite(ratios) & (ratios > 0)]
                logs = np.log(ratios.to_numpy())
                cost = float(np.exp(logs.mean())) if len(logs) else math.nan
                spread = float(np.exp(logs.std(ddof=1))) if len(logs) > 1 else math.nan
                out.append((data, network, group, method, cost, "probe", spread))
    return pd.DataFrame(out, columns=[*COST_COLUMNS, "cost_spread"])


def asv_cost(results: pd.DataFrame, commit: str | None) -> pd.DataFrame:
    """``method``, ``group_size``, ``cost`` (relative to BN) from the network-step benchmark at ``commit``
    (a full hash or a prefix; a dirty tree's ``+dirty`` commit matches nothing), float32, contiguous, CPU
    or whichever device it ran on first. Empty when there is none."""
    empty = pd.DataFrame(columns=["method", "group_size", "cost"])
    if results is None or results.empty or not commit or "+" in commit or "benchmark" not in results:
        return empty
    rows = results[
        results["benchmark"].astype(str).str.endswith(NETWORK_STEP)
        & results["commit"].astype(str).str.startswith(commit[:40])
        & (results["status"] == "ok")
    ]
    for column, value in (("dtype", "float32"), ("memory_format", "contiguous")):
        if column in rows:
            rows = rows[rows[column].astype(str) == value]
    if rows.empty or not {"method", "group_size"} <= set(rows.columns):
        return empty
    if "device" in rows:
        rows = rows[rows["device"].astype(str) == str(rows["device"].iloc[0])]
    medians = rows.groupby(["method", "group_size"])["value"].median().reset_index()
    base = medians[medians["method"] == BASELINE].set_index("group_size")["value"]
    medians["cost"] = medians["value"] / medians["group_size"].map(base)
    medians["group_size"] = medians["group_size"].astype(int)
    return medians.dropna(subset=["cost"])[["method", "group_size", "cost"]]


def relative_cost(frame: pd.DataFrame, asv_results: pd.DataFrame | None = None, commit: str | None = None):
    """One cost per data x network x group size x method (columns :data:`COST_COLUMNS`): the asv network
    step where it holds every method at that group size for ``commit``, the probe's step time otherwise."""
    cost = probe_cost(frame)
    bench = asv_cost(asv_results, commit)
    if bench.empty or cost.empty:
        return cost
    for group, rows in bench.groupby("group_size"):
        here = cost["group_size"] == group
        known = rows.set_index("method")["cost"]
        if here.any() and set(cost.loc[here, "method"]) <= set(known.index):
            cost.loc[here, "cost"] = cost.loc[here, "method"].map(known).to_numpy()
            cost.loc[here, "source"] = "asv"
            cost.loc[here, "cost_spread"] = math.nan
    return cost


def frontier(cost, accuracy) -> np.ndarray:
    """Boolean mask of the points no other point dominates (cost <= and accuracy >=, one of them strictly);
    points with a NaN are never on it."""
    cost, accuracy = np.asarray(cost, dtype=float), np.asarray(accuracy, dtype=float)
    ok = ~(np.isnan(cost) | np.isnan(accuracy))
    mask = np.zeros(len(cost), dtype=bool)
    for i in np.flatnonzero(ok):
        others = ok.copy()
        others[i] = False
        dominated = (
            others & (cost <= cost[i]) & (accuracy >= accuracy[i]) & ((cost < cost[i]) | (accuracy > accuracy[i]))
        )
        mask[i] = not dominated.any()
    return mask


def points(frame: pd.DataFrame, asv_results=None, commit=None, evaluation: str = "running") -> pd.DataFrame:
    """The chart's points: data, network, group_size, method, label, colour, mean, sd, seeds, cost, source,
    on_frontier."""
    accuracy = final_accuracy(frame, evaluation)
    cost = relative_cost(frame, asv_results, commit)
    out = []
    for (data, network), part in accuracy.groupby(["data", "network"], sort=False):
        for group in group_sizes(part):
            stats = at_group(part, group).groupby("method", sort=False)["value"].agg(["mean", "std", "count"])
            for method, row in stats.iterrows():
                out.append(
                    {
                        "data": data,
                        "network": network,
                        "group_size": group,
                        "method": method,
                        "label": registry.label(method),
                        "mean": float(row["mean"]),
                        "sd": float(row["std"]) if row["count"] > 1 else math.nan,
                        "seeds": int(row["count"]),
                    }
                )
    table = pd.DataFrame(out)
    if table.empty:
        return table
    table = table.merge(cost, on=["data", "network", "group_size", "method"], how="left")
    table["on_frontier"] = False
    for _, index in table.groupby(["data", "network", "group_size"]).groups.items():
        table.loc[index, "on_frontier"] = frontier(table.loc[index, "cost"], table.loc[index, "mean"])
    order = {m: i for i, m in enumerate(registry.order(table["method"]))}
    table["_order"] = table["method"].map(order)
    return table.sort_values(["data", "network", "group_size", "_order"]).drop(columns="_order").reset_index(drop=True)
