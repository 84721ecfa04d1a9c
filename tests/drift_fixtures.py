"""Shared by the drift-probe tests: the probe's rows on the synthetic residual chain."""

from __future__ import annotations

import pandas as pd

from bkn.probes.drift import Probe, ProbeConfig


def synthetic_rows(names, group_sizes, seeds=(0,), steps=10, burn_in=1, modes=("in-network",)) -> pd.DataFrame:
    """Run the drift probe on ``synthetic/residual-chain`` only; its rows as a frame."""
    config = ProbeConfig(
        setups=[("synthetic", "residual-chain")],
        modes=list(modes),
        methods=list(names),
        group_sizes=list(group_sizes),
        seeds=list(seeds),
        steps=steps,
        burn_in=burn_in,
    )
    return pd.DataFrame(Probe(config).run())
