"""Normalizing with given statistics: one layer's output, and a whole model inside a ``with`` block."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""``{module name: (mean, var)}``, per-channel statistics of normalization layers."""


def normalize_with(module: nn.Module, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``module``'s output had it normalized ``x`` with per-channel ``(mean, var)``.

    That is ``gamma (x - m) / sqrt(v + eps) + beta`` with the module's affine and ``eps``; a layer with its
    own formula (the rivals of :mod:`bkn.rivals.layers`: FRN, EvoNorm) says it by its ``normalize_with``.
    """
    if callable(getattr(module, "normalize_with", None)):
        return module.normalize_with(x, mean, var)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), weight, bias, False, 0.0, module.eps)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode under ``no_grad``; every module's training flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def normalizing_with(model: nn.Module, stats: Stats) -> Iterator[nn.Module]:
    """Within the block, each layer named in ``stats`` normalizes with those statistics (forward hooks).

    Works for any normalization layer, including ones without running estimates and
    per-sample norms (whose statistics are then used as per-channel constants).
    """
    modules = dict(model.named_modules())
    handles = []
    try:
        for name, (mean, var) in stats.items():
            module = modules.get(name)
            if module is None:
                raise ValueError(f"normalizing_with: the model has no module named {name!r}")
            handles.append(
                module.register_forward_hook(lambda mod, args, out, m=mean, v=var: normalize_with(mod, args[0], m, v))
            )
        yield model
    finally:
        for h in handles:
            h.remove()
