"""Estimated statistics: what each layer normalizes with, measured against the population (spec section 4).

:class:`DriftRecorder` puts a forward hook on every normalization layer that has
population statistics. Inside its ``with`` block, each call of a layer adds its
per-(group, channel) drift metrics (:mod:`bkn.stats.metrics`) to the record; the
layer's value is then the median and the 90th percentile over everything recorded.

What "the estimate" is depends on ``mode``:

* ``"train"`` - the model in training mode; the estimate is what the layer normalized
  with, read from the layer after its forward (``layer.last_stats``, shape (G, C)):
  ghost BN its group's batch statistics, BKN its posterior, BRN its effective statistics
  ``(m_o - d sigma_B / r, (sigma_B / r)^2 - eps)``. A ``torch.nn.BatchNorm*`` layer keeps
  no such record; its statistics are recomputed from the hook's input (batch moments
  over the whole batch, which is what it normalizes with). Per-sample norms (GN, LN, IN)
  have no per-channel estimate; only their output discrepancy is recorded.
* ``"eval"`` - the model in eval mode (running estimates); only the output discrepancy.
* ``"floor"`` - the model normalizing with its population statistics (eval mode after
  :func:`bkn.stats.use_population_statistics`): the estimate is the group's sample mean
  and biased variance of the layer's input, i.e. what BN would use if nothing upstream
  had drifted (on the linear-Gaussian chain, the best achievable estimate; see
  :mod:`bkn.stats.synthetic`). Its output discrepancy compares normalizing with them.

In every mode the output discrepancy compares the layer's output (for ``"floor"``:
normalizing with the group moments) with the same layer normalizing the same input
with the population statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers._moments import batch_moments
from .layer_kinds import is_batch_norm
from .metrics import channel_metrics, output_discrepancy, summarize
from .normalizing import normalize_with

MODES = ("train", "eval", "floor")


class DriftRecorder:
    """Forward hooks recording drift metrics per layer; use as a context manager.

    Args:
        model: the network (its layers are found by the names in ``population``).
        population: ``{name: (mean, var)}`` per channel, in execution order (depth = position).
        group_size: samples per micro-batch group; outputs are compared group by group.
        mode: ``"train"``, ``"eval"`` or ``"floor"`` (see the module docstring).
    """

    def __init__(self, model: nn.Module, population: dict, group_size: int, mode: str = "train"):
        if mode not in MODES:
            raise ValueError(f"DriftRecorder: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"DriftRecorder: group_size must be a positive int, got {group_size!r}")
        modules = dict(model.named_modules())
        missing = [name for name in population if name not in modules]
        if missing:
            raise ValueError(f"DriftRecorder: the model has no module(s) {', '.join(map(repr, missing))}")
        self.model, self.population, self.group_size, self.mode = model, population, group_size, mode
        self.layers = {name: modules[name] for name in population}
        self.values: dict[str, dict[str, list[torch.Tensor]]] = {name: {} for name in population}
        self._handles: list = []

    def __enter__(self) -> "DriftRecorder":
        for name, module in self.layers.items():
            self._handles.append(
                module.register_forward_hook(lambda mod, args, out, n=name: self._record(n, mod, args[0], out))
            )
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _add(self, name: str, metric: str, value: torch.Tensor) -> None:
        self.values[name].setdefault(metric, []).append(value.detach().to(torch.float64).cpu())

    @torch.no_grad()
    def _record(self, name: str, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        n = x.shape[0]
        if n % self.group_size:
            raise ValueError(f"DriftRecorder: group_size={self.group_size} must divide the batch of {n}")
        groups = n // self.group_size
        mean, var = self.population[name]
        y_pop = normalize_with(module, x, mean, var)
        eps = getattr(module, "eps", 0.0)
        if self.mode == "floor":
            est_mean, est_var = batch_moments(x.to(torch.float64), groups)
            y = _normalize_groups(module, x, est_mean, est_var)
        else:
            y = out
            if self.mode == "train" and is_batch_norm(module):
                est_mean, est_var = self._training_stats(module, x)
            else:
                est_mean = est_var = None
        if est_mean is not None:
            for metric, value in channel_metrics(est_mean, est_var, mean, var, eps).items():
                self._add(name, metric, value)
        self._add(name, "output_discrepancy", output_discrepancy(y, y_pop, groups))

    @staticmethod
    def _training_stats(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stats = getattr(module, "last_stats", None)
        if stats is not None:
            return stats
        if hasattr(module, "last_stats"):
            raise RuntimeError(f"DriftRecorder: {type(module).__name__} recorded no statistics in training mode")
        return batch_moments(x.to(torch.float64), 1)  # torch.nn.BatchNorm: the whole batch

    def rows(self) -> list[dict]:
        """Tidy rows ``{layer, depth, metric, statistic, value}`` of everything recorded."""
        out = []
        for depth, (name, metrics) in enumerate(self.values.items()):
            for metric, values in metrics.items():
                for statistic, value in summarize(values).items():
                    out.append(
                        {"layer": name, "depth": depth, "metric": metric, "statistic": statistic, "value": value}
                    )
        return out


def _normalize_groups(module: nn.Module, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``module``'s affine applied to ``x`` normalized per group with (G, C) statistics."""
    groups = mean.shape[0]
    xg = x.to(torch.float64).unflatten(0, (groups, x.shape[0] // groups))
    view = [groups, 1, mean.shape[1]] + [1] * (x.dim() - 2)
    y = (xg - mean.view(view)) / (var.view(view) + module.eps).sqrt()
    y = y.flatten(0, 1)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    shape = [1, -1] + [1] * (x.dim() - 2)
    if weight is not None:
        y = y * weight.detach().to(torch.float64).view(shape)
    if bias is not None:
        y = y + bias.detach().to(torch.float64).view(shape)
    return y


def running_estimate_rows(model: nn.Module, population: dict) -> list[dict]:
    """Drift of the running (EMA) estimates ``running_mean``/``running_var`` of each batch-statistic norm.

    One estimate per channel: the layer's values are the median and 90th percentile over
    channels of ``mean_error``, ``var_logratio`` and ``kl``. Layers without running
    estimates are skipped.
    """
    modules = dict(model.named_modules())
    out = []
    for depth, (name, (mean, var)) in enumerate(population.items()):
        module = modules[name]
        if not is_batch_norm(module) or getattr(module, "running_mean", None) is None:
            continue
        metrics = channel_metrics(module.running_mean, module.running_var, mean, var, module.eps)
        for metric, values in metrics.items():
            for statistic, value in summarize(values).items():
                out.append({"layer": name, "depth": depth, "metric": metric, "statistic": statistic, "value": value})
    return out
