"""bkn: Batch Kalman Normalization and its rivals, for benchmarking under micro-batches.

* :mod:`bkn.methods` - the registry of named methods (a norm and its options) every part uses.
* :mod:`bkn.layers` - BKN, Batch Renormalization, ghost-batch BN layers.
* :mod:`bkn.transitions` - how a BKN layer's prior is propagated (official and its ablations, analytic, identity).
* :mod:`bkn.norms` - the low-level constructor ``create(name, C, **options)``.
* :func:`bkn.convert` - swap the BatchNorms of any model (torchvision ResNets...) and wire BKN priors;
  :func:`bkn.prior_summary` / :func:`bkn.prior_report` - each layer's planned prior and its last training forward;
  :func:`bkn.conversion_report` - what any conversion replaced (norms, absorbed activations, convolutions).
* :mod:`bkn.models` - the paper's CIFAR ResNet.

The lab built on the library (population statistics, data sets, the training engine, the
drift and training probes, the result files' contract) lives in :mod:`bkn.probes`; importing
``bkn`` loads none of it. Its old names (``bkn.stats``, ``bkn.data``, ``bkn.training``,
``bkn.results``, ``bkn.distributed``, ``bkn.demo``) still import, with a DeprecationWarning,
for one release (:mod:`bkn._moved`).

The names below are loaded on first use, so ``import bkn.methods`` and ``import bkn.probes.results``
do not import torch (the report builder reads results and labels without it).
"""

from __future__ import annotations

import importlib

from . import _moved

_moved.install()

__version__ = "0.1.0"

# public name -> (module, attribute); attribute None means the module itself
_LAZY = {
    "layers": ("bkn.layers", None),
    "norms": ("bkn.norms", None),
    "transitions": ("bkn.transitions", None),
    "methods": ("bkn.methods", None),
    "convert": ("bkn.conversion", "convert"),
    "prior_summary": ("bkn.conversion", "prior_summary"),
    "prior_report": ("bkn.conversion", "prior_report"),
    "conversion_report": ("bkn.replacements", "conversion_report"),
    **{
        f"{stem}{d}d": ("bkn.layers", f"{stem}{d}d")
        for stem in ("BatchKalmanNorm", "BatchRenorm", "GhostBatchNorm")
        for d in (1, 2, 3)
    },
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'bkn' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
