"""Distributed part of the Timing section: what a data-parallel step costs over the same step in one process.

For the benchmarks with a ``world_size`` parameter (:data:`WORLD_PARAM`, suites/bench_distributed.py:
one training step timed on rank 0 of K worker processes, DDP over gloo), a table of each method's
step at K workers against the same step in one process (the difference: DDP's gradient
all-reduce and the wait for the slower worker), and its extra time over BN's at the same K; for
SyncBN (:data:`SYNC`) that extra time is the cost of all-reducing every norm layer's statistics.
"""

from __future__ import annotations

import pandas as pd

from bkn import methods as registry  # torch-free: the legend order of the methods
from bkn.probes.results import GROUP_PARAM, METHOD_PARAM

from .base import BASELINE, GROUP_LABEL, Section, human

SYNC = "syncbn"  # its extra time over BASELINE at K workers is the cost of pooling the statistics
# Workers of a data-parallel step (suites/bench_distributed.py; 1 = one process, no DDP). Not
# (yet) a bkn.probes.results constant: the suites declare the same name in suites/harness/ddp.py.
WORLD_PARAM = "world_size"


def distributed_part(section: Section, rows: pd.DataFrame) -> pd.DataFrame | None:
    """Data-parallel steps: each method at K workers against the same step in one process, and SyncBN over BN."""
    if WORLD_PARAM not in rows.columns or METHOD_PARAM not in rows.columns or GROUP_PARAM not in rows.columns:
        return None
    timed = rows[(rows["type"] == "time") & rows[WORLD_PARAM].notna() & rows[METHOD_PARAM].notna()]
    timed = timed.assign(workers=timed[WORLD_PARAM].astype(int), **{METHOD_PARAM: timed[METHOD_PARAM].astype(str)})
    keys = ["where", "benchmark", GROUP_PARAM, METHOD_PARAM]
    single = timed[timed["workers"] == 1][keys + ["value"]].rename(columns={"value": "one_process"})
    multi = timed[timed["workers"] > 1][keys + ["workers", "value"]]
    if multi.empty:
        return None
    pair = ["where", "benchmark", GROUP_PARAM, "workers"]
    bn = multi[multi[METHOD_PARAM] == BASELINE][pair + ["value"]].rename(columns={"value": "bn_step"})
    table = multi.merge(single, on=keys, how="left").merge(bn, on=pair, how="left")
    table = table.assign(
        added=table["value"] - table["one_process"],
        ratio=table["value"] / table["one_process"],
        over_bn=(table["value"] - table["bn_step"]).where(table[METHOD_PARAM] != BASELINE),
    )
    rank = {name: i for i, name in enumerate(registry.order(table[METHOD_PARAM]))}
    table = table.assign(_rank=table[METHOD_PARAM].map(rank))
    table = table.sort_values(["where", "benchmark", GROUP_PARAM, "workers", "_rank"]).drop(columns="_rank")
    section.heading("Data-parallel step: what the all-reduce costs")
    section.text(
        f"Benchmarks with a `{WORLD_PARAM}`: one training step timed on rank 0 of K worker processes "
        "(DDP over gloo, each worker on its own batch of `group_size` samples), against the same step in one "
        "process without DDP. The difference is what data parallelism adds per step on that machine: DDP's "
        f"gradient all-reduce and the wait for the slower worker. `{SYNC}` also all-reduces every norm "
        f"layer's statistics, forward and backward: its time over `{BASELINE}`'s at the same K is that cost."
    )
    shown = pd.DataFrame(
        {
            "where": table["where"],
            "benchmark": table["benchmark"],
            GROUP_LABEL: table[GROUP_PARAM],
            METHOD_PARAM: table[METHOD_PARAM],
            "workers": table["workers"],
            "step, 1 process": [human(v, "seconds") for v in table["one_process"]],
            "step, K workers": [human(v, "seconds") for v in table["value"]],
            "added by K workers": [human(v, "seconds") for v in table["added"]],
            "K workers / 1 process": [f"{v:.2f}" if pd.notna(v) else "–" for v in table["ratio"]],
            f"over {BASELINE} at K workers": [human(v, "seconds") for v in table["over_bn"]],
        }
    )
    section.table(
        shown,
        "Per-step time of each method at K workers and in one process; 'added by K workers' is the "
        f"difference (all-reduces and waiting), 'over {BASELINE}' the extra time of the method at the same K "
        f"(for {SYNC}: its statistics all-reduces).",
    )
    return table
