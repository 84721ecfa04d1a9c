"""Population statistics, estimated statistics and drift metrics (spec section 4).

* :func:`population_statistics` / :func:`use_population_statistics` - the exact population
  statistics of every normalization layer, layer by layer, and writing them into the running
  estimates (PreciseBN-style evaluation).
* :mod:`bkn.stats.metrics` - per-channel drift metrics and their per-layer summaries.
* :mod:`bkn.stats.estimated` - what each method normalizes with, recorded by forward hooks.
* :mod:`bkn.stats.synthetic` - the linear-Gaussian chain with closed-form truth and the floor.
"""
from .estimated import DriftRecorder, running_estimate_rows
from .metrics import METRICS, STATISTICS, channel_metrics, output_discrepancy, summarize
from .population import (
                         eval_mode,
                         is_batch_norm,
                         is_per_sample_norm,
                         normalization_layers,
                         normalize_with,
                         normalizing_with,
                         population_statistics,
                         use_population_statistics,
)
from .synthetic import LinearGaussianChain

__all__ = [
    "population_statistics", "use_population_statistics", "normalization_layers", "normalizing_with",
    "normalize_with", "eval_mode", "is_batch_norm", "is_per_sample_norm",
    "METRICS", "STATISTICS", "channel_metrics", "output_discrepancy", "summarize",
    "DriftRecorder", "running_estimate_rows", "LinearGaussianChain",
]
