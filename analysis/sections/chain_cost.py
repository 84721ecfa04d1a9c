"""Chain cost (part of the Timing section): what BKN's prior propagation adds to each block.

It sets the block benchmark (:data:`bkn.probes.results.BLOCK_BENCHMARK`, conv + norm + ReLU
with BKN's prior propagation) against the layer benchmark
(:data:`bkn.probes.results.LAYER_BENCHMARK`, the norm alone given its prior), both forward +
backward on the same tensors, and shows, per machine and device, one figure of each BKN method's
extra time per block as fractions of BN's block. For a BKN method ``m``::

    whole = (block_m - block_bn) / block_bn        norm = (layer_m - layer_bn) / block_bn
    chain = whole - norm                            (the prior's propagation)
"""

from __future__ import annotations

import pandas as pd

from bkn import methods as registry  # torch-free: which methods are BKN
from bkn.probes.results import BLOCK_BENCHMARK, GROUP_PARAM, LAYER_BENCHMARK, METHOD_PARAM, TENSOR_PARAMS

from .. import plots
from .base import BASELINE, GROUP_LABEL, Section, default_variant


def chain_cost_part(section: Section, rows: pd.DataFrame) -> pd.DataFrame | None:
    """Each BKN method's extra time per block over BN's block: the norm's share and the chain's."""
    keys = ["where", *TENSOR_PARAMS]  # TENSOR_PARAMS includes the device
    if any(c not in rows.columns for c in keys):
        return None
    pick = {}
    for name, bench in (("block", BLOCK_BENCHMARK), ("layer", LAYER_BENCHMARK)):
        b = rows[(rows["benchmark"] == bench) & (rows["type"] == "time")]
        pick[name] = b[keys + [METHOD_PARAM, "value"]]
    if pick["block"].empty or pick["layer"].empty:
        return None
    bn = {k: v[v[METHOD_PARAM] == BASELINE].drop(columns=METHOD_PARAM) for k, v in pick.items()}
    both = (
        pick["block"]
        .merge(pick["layer"], on=keys + [METHOD_PARAM], suffixes=("_block", "_layer"))
        .merge(bn["block"].rename(columns={"value": "bn_block"}), on=keys)
        .merge(bn["layer"].rename(columns={"value": "bn_layer"}), on=keys)
    )
    both = both[both[METHOD_PARAM].map(lambda m: m in registry.names() and registry.get(m).norm == "bkn")]
    if both.empty:
        return None
    both = both.assign(
        whole=(both["value_block"] - both["bn_block"]) / both["bn_block"],
        norm=(both["value_layer"] - both["bn_layer"]) / both["bn_block"],
    )
    both = both.assign(chain=both["whole"] - both["norm"])
    section.heading("Chain cost: what BKN's prior propagation adds per block")
    section.text(
        f"`{BLOCK_BENCHMARK}` times conv + norm + ReLU (forward and backward), for BKN with its prior "
        f"propagated through the block's convolution by the method's transition; `{LAYER_BENCHMARK}` times "
        "the norm alone given its prior. Per block, as a fraction of BN's block time: *whole* is the BKN "
        "block's extra time over BN's, *norm* the BKN layer's extra time over BN's layer, *chain* the rest "
        "(the prior's propagation: for the official transition a surrogate pushed through the convolution, "
        "for the analytic one its weight's tap sums). Single samples of two benchmarks: read the pattern, "
        "not a point."
    )
    for (where, device), sub in both.groupby(["where", "device"], sort=True):
        shown, variant = default_variant(sub)
        parts = shown.melt(
            id_vars=[*keys, METHOD_PARAM],
            value_vars=["whole", "norm", "chain"],
            var_name="part",
            value_name="overhead",
        )
        section.figure(
            plots.lines_vs(
                parts.assign(panel=parts["shape"].astype(str)),
                GROUP_PARAM,
                "overhead",
                hue=METHOD_PARAM,
                col="panel",
                style="part",
                xlabel=GROUP_LABEL,
                ylabel="extra time / BN block time",
                logy=False,
                errorbar=None,
                reference=0.0,
                title=f"chain cost per block on {where}, device {device}" + (f" ({variant})" if variant else ""),
            ),
            "Extra time of each BKN method per block, over BN's block: whole, the norm's share and the "
            "chain's (0 = free; 0.5 = half a BN block more).",
        )
    return both
