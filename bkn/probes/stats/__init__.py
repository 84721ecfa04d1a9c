"""Population statistics, estimated statistics and drift metrics (docs/design.md §9).

* :mod:`bkn.probes.stats.population` - :func:`population_statistics`, the exact population
  statistics of every normalization layer, measured layer by layer.
* :mod:`bkn.probes.stats.running_estimates` - :func:`use_population_statistics`, writing them into
  the layers' running estimates (PreciseBN-style evaluation).
* :mod:`bkn.probes.stats.normalizing` - :func:`normalize_with` (one layer's output with given
  statistics), :func:`normalizing_with` (a model normalizing with them in a ``with`` block)
  and :func:`eval_mode`.
* :mod:`bkn.probes.stats.layer_kinds` - :func:`normalization_layers`, :func:`is_batch_norm`,
  :func:`is_per_sample_norm`: which modules are normalization layers, and of which kind.
* :mod:`bkn.probes.stats.pooled_moments` - per-channel moments pooled over a data set in float64,
  and their pooling over a per-sample norm's groups.
* :mod:`bkn.probes.stats.metrics` - per-channel drift metrics and their per-layer summaries.
* :mod:`bkn.probes.stats.estimated` - what each method normalizes with, recorded by forward hooks.
* :mod:`bkn.probes.stats.synthetic` - the plain linear-Gaussian chain with closed-form truth.
* :mod:`bkn.probes.stats.residual_chain` - the residual linear-Gaussian chain, its truth and its floor
  (the drift probe's).
"""

from bkn.probes.stats.estimated import DriftRecorder, running_estimate_rows
from bkn.probes.stats.layer_kinds import is_batch_norm, is_per_sample_norm, normalization_layers
from bkn.probes.stats.metrics import METRICS, STATISTICS, channel_metrics, output_discrepancy, summarize
from bkn.probes.stats.normalizing import eval_mode, normalize_with, normalizing_with
from bkn.probes.stats.population import population_statistics
from bkn.probes.stats.residual_chain import ResidualGaussianChain
from bkn.probes.stats.running_estimates import use_population_statistics
from bkn.probes.stats.synthetic import LinearGaussianChain

__all__ = [
    "population_statistics",
    "use_population_statistics",
    "normalization_layers",
    "normalizing_with",
    "normalize_with",
    "eval_mode",
    "is_batch_norm",
    "is_per_sample_norm",
    "METRICS",
    "STATISTICS",
    "channel_metrics",
    "output_discrepancy",
    "summarize",
    "DriftRecorder",
    "running_estimate_rows",
    "LinearGaussianChain",
    "ResidualGaussianChain",
]
