"""``bkn.convert``: swap every BatchNorm of a model for another norm, keeping its state.

Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: modules are replaced in
place (the model's class and module names stay, so state_dicts keep their keys),
and weights, running buffers, ``eps``, ``momentum``, device, dtype and training
flags carry over. For ``"bkn"`` the model is traced with ``torch.fx`` and each BKN
layer's prior is wired from the normalization layers feeding it (see
:mod:`bkn.chain`); ``bkn.prior_summary(model)`` prints which layer got which prior.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from . import norms
from .chain import PriorChain

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_CHAIN_OPTIONS = ("fallback", "draws", "surrogate_scale", "chain")


def _spatial_dims(bn: nn.Module) -> int:
    if isinstance(bn, nn.BatchNorm3d):
        return 3
    if isinstance(bn, nn.BatchNorm1d):
        return 1
    return 2  # BatchNorm2d, and SyncBatchNorm (whose rank is only known at run time)


def _replacement(bn: nn.Module, norm: str, options: dict) -> nn.Module:
    options = dict(options)
    if norms.batch_dependent(norm) or norm == "in":
        options.setdefault("eps", bn.eps)
    if norms.batch_dependent(norm):
        options.setdefault("momentum", bn.momentum)
        options.setdefault("affine", bn.affine)
        options.setdefault("track_running_stats", bn.track_running_stats)
    elif norm in ("gn", "ln"):
        options.setdefault("eps", bn.eps)
        options.setdefault("affine", bn.affine)
    new = norms.create(norm, bn.num_features, spatial_dims=_spatial_dims(bn), **options)
    ref = bn.weight if bn.weight is not None else bn.running_mean
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        if bn.affine and getattr(new, "weight", None) is not None and new.weight.shape == bn.weight.shape:
            new.weight.copy_(bn.weight)
            new.bias.copy_(bn.bias)
        if bn.track_running_stats and getattr(new, "running_mean", None) is not None:
            new.running_mean.copy_(bn.running_mean)
            new.running_var.copy_(bn.running_var)
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
            if hasattr(new, "sync_running_std"):  # Batch Renormalization keeps a moving std too
                new.sync_running_std()
        if bn.affine and getattr(new, "weight", None) is not None:
            new.weight.requires_grad_(bn.weight.requires_grad)
    new.train(bn.training)
    return new


def convert(model: nn.Module, norm: str, **options) -> nn.Module:
    """Replace every BatchNorm in ``model`` by norm ``norm`` (a name of :func:`bkn.norms.names`).

    ``options`` go to :func:`bkn.norms.create` (e.g. ``p=0.9, transition="official",
    group_size=2`` for BKN), except the chain options for ``"bkn"``:
    ``fallback`` (``"none"`` or ``"identity"``: what a layer whose path can't be
    modelled gets), ``draws`` (Monte-Carlo draws per group for the official
    transition), ``surrogate_scale`` (official transition: draw the surrogate with each
    spatial side scaled by it, fewer positions at a known noise cost, see
    :class:`bkn.transitions.MonteCarlo`; default 1, the authors' construction) and
    ``chain`` (``False``: BKN layers without priors).
    Returns the converted model (the same object unless ``model`` itself is a BatchNorm).
    """
    norms.create(norm, 4, **{k: v for k, v in options.items() if k not in _CHAIN_OPTIONS})  # validate early
    layer_options = {k: v for k, v in options.items() if k not in _CHAIN_OPTIONS}
    if isinstance(model, _BATCH_NORMS):
        return _replacement(model, norm, layer_options)
    targets = [name for name, m in model.named_modules() if isinstance(m, _BATCH_NORMS)]
    graph = None
    if norm == "bkn" and options.get("chain", True):
        try:
            graph = fx.Tracer().trace(model)
        except Exception as err:  # data-dependent control flow etc.: no chain, say why
            model._bkn_chain_error = f"torch.fx could not trace the model ({type(err).__name__}: {err})"
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _replacement(getattr(parent, child), norm, layer_options))
    if graph is not None:
        chain = PriorChain(
            model,
            graph,
            transition=options.get("transition", "official"),
            fallback=options.get("fallback", "none"),
            draws=options.get("draws", 1),
            surrogate_scale=options.get("surrogate_scale", 1.0),
        )
        chain.attach(model)
        model._bkn_chain = chain
    return model


def prior_summary(model: nn.Module) -> str:
    """A printable table: for each BKN layer, where its prior comes from and why (or why not)."""
    chain = getattr(model, "_bkn_chain", None)
    if chain is None:
        why = getattr(model, "_bkn_chain_error", "the model was not converted to 'bkn' with a chain")
        return f"no prior chain: {why}"
    return chain.summary()
