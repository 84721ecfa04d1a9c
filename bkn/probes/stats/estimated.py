"""Estimated statistics: what each layer normalizes with, measured against the population (docs/design.md §9).

:class:`DriftRecorder` puts a forward hook on every normalization layer that has
population statistics. Inside its ``with`` block, each call of a layer adds its
per-(group, channel) drift metrics (:mod:`bkn.probes.stats.metrics`) to the record; the
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
  :func:`bkn.probes.stats.use_population_statistics`): the estimate is the group's sample mean
  and biased variance of the layer's input, i.e. what BN would use if nothing upstream
  had drifted (on the linear-Gaussian chain, the best achievable estimate; see
  :mod:`bkn.probes.stats.synthetic`). Its output discrepancy compares normalizing with them.

In every mode the output discrepancy compares the layer's output (for ``"floor"``:
normalizing with the group moments) with the same layer normalizing the same input
with the population statistics.

Where a layer has an estimate, its signed errors (:func:`bkn.probes.stats.metrics.signed_errors`)
are kept too and split into bias and noise over groups (:func:`bkn.probes.stats.metrics.decompose`):
``mean_bias``, ``mean_noise``, ``mean_rmse`` (mean in population sigma), ``var_bias``,
``var_noise``, ``var_rmse`` (variance relative to the population's), statistic ``rms``;
``mean_signed_bias`` (statistic ``mean``).

Two options of ``"train"`` mode:

* ``isolate=True`` - *isolation mode*: after recording, the hook replaces the layer's
  output by its output normalized with the population statistics, and a BKN layer's
  posterior (what the next layer's prior is propagated from) by the population
  statistics. Every layer then sees the population-mode input and a prior propagated
  from the truth: what is left is its own estimation error (for BKN, its transition's).
* :attr:`DriftRecorder.reference` - the layers' inputs for the same batch in population
  mode (``{name: tensor}``, set by the caller before each forward, e.g. with
  :func:`capture_inputs`): the *input drift*, how far the group's moments of the
  layer's own input are from the moments the same samples give in population mode,
  ``input_mean_drift`` = ``|m_o - m_o,pop| / sqrt(v + eps)`` and ``input_var_drift`` =
  ``|log((v_o + eps) / (v_o,pop + eps))|`` per (group, channel): what upstream
  mis-normalization did to this layer's input.
"""

from __future__ import annotations

import torch
from torch import nn

from bkn.layers._moments import batch_moments
from bkn.probes.stats.layer_kinds import has_estimates
from bkn.probes.stats.metrics import channel_metrics, decompose, output_discrepancy, signed_errors, summarize
from bkn.probes.stats.normalizing import normalize_with

MODES = ("train", "eval", "floor")
SIGNED_MEAN, SIGNED_VAR = "_mean_signed", "_var_signed"  # kept per (group, channel), reported as bias/noise


class DriftRecorder:
    """Forward hooks recording drift metrics per layer; use as a context manager.

    Args:
        model: the network (its layers are found by the names in ``population``).
        population: ``{name: (mean, var)}`` per channel, in execution order (depth = position).
        group_size: samples per micro-batch group; outputs are compared group by group.
        mode: ``"train"``, ``"eval"`` or ``"floor"`` (see the module docstring).
    """

    def __init__(self, model: nn.Module, population: dict, group_size: int, mode: str = "train", isolate: bool = False):
        if mode not in MODES:
            raise ValueError(f"DriftRecorder: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"DriftRecorder: group_size must be a positive int, got {group_size!r}")
        modules = dict(model.named_modules())
        missing = [name for name in population if name not in modules]
        if missing:
            raise ValueError(f"DriftRecorder: the model has no module(s) {', '.join(map(repr, missing))}")
        if isolate and mode != "train":
            raise ValueError(f"DriftRecorder: isolation applies to mode 'train' only, not {mode!r}")
        self.model, self.population, self.group_size, self.mode = model, population, group_size, mode
        self.isolate = isolate
        self.reference: dict[str, torch.Tensor] | None = None  # population-mode inputs of the next forward
        self.paused = False  # True: forwards pass unrecorded (e.g. the population-mode reference forward)
        self.layers = {name: modules[name] for name in population}
        self.values: dict[str, dict[str, list[torch.Tensor]]] = {name: {} for name in population}
        self._handles: list = []

    def __enter__(self) -> "DriftRecorder":
        for name, module in self.layers.items():
            self._handles.append(
                module.register_forward_hook(
                    lambda mod, args, out, n=name: self._record(n, mod, args[0], out), prepend=True
                )
            )
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _add(self, name: str, metric: str, value: torch.Tensor) -> None:
        self.values[name].setdefault(metric, []).append(value.detach().to(torch.float64).cpu())

    @torch.no_grad()
    def _record(self, name: str, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        if self.paused:
            return None
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
            if self.mode == "train" and has_estimates(module):
                est_mean, est_var = self._training_stats(module, x)
            else:
                est_mean = est_var = None
        if est_mean is not None:
            for metric, value in channel_metrics(est_mean, est_var, mean, var, eps).items():
                self._add(name, metric, value)
            mean_error, var_error = signed_errors(est_mean, est_var, mean, var, eps)
            self._add(name, SIGNED_MEAN, mean_error.expand(groups, -1))
            self._add(name, SIGNED_VAR, var_error.expand(groups, -1))
        self._add(name, "output_discrepancy", output_discrepancy(y, y_pop, groups))
        if self.reference is not None and name in self.reference:
            self._input_drift(name, x, self.reference[name], groups, mean, var, eps)
        if self.isolate:
            posterior = module.__dict__.get("posterior")
            if isinstance(posterior, tuple):  # BKN: the next prior is propagated from the truth
                g, c = posterior[0].shape
                module.__dict__["posterior"] = (
                    mean.to(posterior[0].dtype).expand(g, c),
                    var.to(posterior[1].dtype).expand(g, c),
                )
            return y_pop.to(out.dtype)
        return None

    def _input_drift(self, name, x, x_pop, groups, mean, var, eps) -> None:
        if x_pop.shape != x.shape:
            raise ValueError(
                f"DriftRecorder: reference input of {name!r} has shape {tuple(x_pop.shape)}, not {tuple(x.shape)}"
            )
        m_o, v_o = batch_moments(x.to(torch.float64), groups)
        m_p, v_p = batch_moments(x_pop.to(torch.float64), groups)
        scale = (var.to(torch.float64) + eps).sqrt()
        self._add(name, "input_mean_drift", (m_o - m_p).abs() / scale)
        self._add(name, "input_var_drift", (torch.log(v_o + eps) - torch.log(v_p + eps)).abs())

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
                if metric in (SIGNED_MEAN, SIGNED_VAR):
                    parts = decompose(values)
                    prefix = metric[1:].split("_")[0]  # "mean" or "var"
                    summary = [(f"{prefix}_{k}", "rms", parts[k]) for k in ("bias", "noise", "rmse")]
                    summary.append((f"{prefix}_signed_bias", "mean", parts["signed_bias"]))
                else:
                    summary = [(metric, statistic, value) for statistic, value in summarize(values).items()]
                for metric_name, statistic, value in summary:
                    out.append(
                        {"layer": name, "depth": depth, "metric": metric_name, "statistic": statistic, "value": value}
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
        if not has_estimates(module) or getattr(module, "running_mean", None) is None:
            continue
        metrics = channel_metrics(module.running_mean, module.running_var, mean, var, module.eps)
        for metric, values in metrics.items():
            for statistic, value in summarize(values).items():
                out.append({"layer": name, "depth": depth, "metric": metric, "statistic": statistic, "value": value})
    return out


class capture_inputs:
    """Forward pre-hooks keeping the input of each named layer of the next forward: ``with capture_inputs(model,
    names) as seen: model(x)``; then ``seen[name]`` is that layer's input (detached)."""

    def __init__(self, model: nn.Module, names):
        modules = dict(model.named_modules())
        self.layers = {name: modules[name] for name in names}
        self.seen: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> dict[str, torch.Tensor]:
        for name, module in self.layers.items():
            self._handles.append(
                module.register_forward_pre_hook(lambda mod, args, n=name: self.seen.__setitem__(n, args[0].detach()))
            )
        return self.seen

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
