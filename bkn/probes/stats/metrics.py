"""Drift metrics: how far an estimate of a layer's statistics is from the population's (docs/design.md §9).

Per channel ``c`` (and per micro-batch group ``g`` for estimates made per group), with
population statistics ``(m, v)`` and an estimate ``(m_hat, v_hat)``:

* ``mean_error``    ``|m_hat - m| / sqrt(v + eps)`` - the mean error in population standard deviations;
* ``var_logratio``  ``|log((v_hat + eps) / (v + eps))|``;
* ``kl``            ``KL(N(m, v + eps) || N(m_hat, v_hat + eps))
  = 1/2 [ (v + eps) / (v_hat + eps) + (m - m_hat)^2 / (v_hat + eps) - 1 + log((v_hat + eps) / (v + eps)) ]``;
* ``output_discrepancy``  ``||y_train - y_pop||^2 / ||y_pop||^2`` over the group's samples and
  positions in channel ``c``: the layer's output as it normalized versus the same layer
  normalizing the same input with the population statistics.

``eps`` is the layer's own ``eps``: the layer divides by ``sqrt(var + eps)``, so these are
the distances between what it normalizes with and what it should normalize with. (The
spec writes the formulas without ``eps``; the two agree wherever ``v >> eps``, and with
``eps`` a dead channel, ``v`` ~ 0, does not produce an infinite error that changes no output.)

A layer's value is the median and the 90th percentile over all its (group, channel)
pairs (:func:`summarize`): the median is the typical drift, the 90th percentile the
bad micro-batches and channels.
"""

from __future__ import annotations

import numpy as np
import torch

# Re-exported: the names the result files and the report use are the results contract's.
from bkn.probes.results import DRIFT_METRICS as METRICS  # noqa: F401
from bkn.probes.results import DRIFT_STATISTICS as STATISTICS  # noqa: F401


def channel_metrics(
    est_mean: torch.Tensor, est_var: torch.Tensor, pop_mean: torch.Tensor, pop_var: torch.Tensor, eps: float = 0.0
) -> dict[str, torch.Tensor]:
    """Per-(group, channel) ``mean_error``, ``var_logratio`` and ``kl`` (float64).

    ``est_mean``/``est_var``: (G, C) or (C,) estimates; ``pop_mean``/``pop_var``: (C,).
    """
    mh, vh = est_mean.detach().to(torch.float64), est_var.detach().to(torch.float64) + eps
    m, v = pop_mean.detach().to(torch.float64), pop_var.detach().to(torch.float64) + eps
    diff2 = (mh - m).square()
    log_ratio = torch.log(vh) - torch.log(v)
    return {
        "mean_error": diff2.sqrt() / v.sqrt(),
        "var_logratio": log_ratio.abs(),
        "kl": 0.5 * (v / vh + diff2 / vh - 1.0 + log_ratio),
    }


def output_discrepancy(y: torch.Tensor, y_pop: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Per-(group, channel) ``||y - y_pop||^2 / ||y_pop||^2`` over the group's samples and positions, (G, C).

    ``y``, ``y_pop``: (N, C, *S) outputs for the same input; ``groups`` consecutive equal
    slices of the batch (the micro-batch groups).
    """
    if y.shape != y_pop.shape:
        raise ValueError(f"output_discrepancy: shapes differ, {tuple(y.shape)} vs {tuple(y_pop.shape)}")
    n = y.shape[0]
    if groups < 1 or n % groups:
        raise ValueError(f"output_discrepancy: {groups} groups must divide the batch of {n}")
    y, y_pop = y.detach().to(torch.float64), y_pop.detach().to(torch.float64)
    dims = [1] + list(range(3, y.dim() + 1))
    num = (y - y_pop).square().unflatten(0, (groups, n // groups)).sum(dims)
    den = y_pop.square().unflatten(0, (groups, n // groups)).sum(dims)
    return num / den


def summarize(values) -> dict[str, float]:
    """``{"median": ..., "p90": ...}`` over all entries of ``values`` (tensors or arrays, concatenated).

    ``inf`` counts as the largest value; any ``nan`` makes both ``nan`` (nothing is dropped silently).
    """
    if isinstance(values, (list, tuple)):
        flat = np.concatenate([_numpy(v).ravel() for v in values]) if values else np.empty(0)
    else:
        flat = _numpy(values).ravel()
    if flat.size == 0:
        raise ValueError("summarize: no values")
    if np.isnan(flat).any():
        return {"median": float("nan"), "p90": float("nan")}
    flat = np.sort(flat)
    return {"median": _quantile(flat, 0.5), "p90": _quantile(flat, 0.9)}


def _quantile(ordered: np.ndarray, q: float) -> float:
    """numpy's default (linear) quantile of sorted values, with ``inf`` where an infinite value takes part."""
    pos = q * (ordered.size - 1)
    lo, hi = int(np.floor(pos)), int(np.ceil(pos))
    a, b = ordered[lo], ordered[hi]
    if np.isinf(b) and (hi != lo or np.isinf(a)):
        return float("inf") if pos > lo or np.isinf(a) else float(a)
    return float(a + (b - a) * (pos - lo))


def _numpy(v) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().to(torch.float64).cpu().numpy()
    return np.asarray(v, dtype=np.float64)


def signed_errors(
    est_mean: torch.Tensor, est_var: torch.Tensor, pop_mean: torch.Tensor, pop_var: torch.Tensor, eps: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(group, channel) signed errors (float64): of the mean in population standard deviations,
    ``(m_hat - m) / sqrt(v + eps)``, and of the variance relative to it, ``(v_hat - v) / (v + eps)``."""
    mh, vh = est_mean.detach().to(torch.float64), est_var.detach().to(torch.float64)
    m, v = pop_mean.detach().to(torch.float64), pop_var.detach().to(torch.float64) + eps
    return (mh - m) / v.sqrt(), (vh + eps - v) / v


def decompose(errors) -> dict[str, float]:
    """Bias and noise of signed per-(group, channel) errors, pooled over a layer's channels.

    ``errors``: (G, C) tensors (the groups of every recorded forward), concatenated over
    groups. Per channel c, over its groups g: ``bias_c = mean_g e_gc`` (signed) and
    ``noise_c^2 = mean_g (e_gc - bias_c)^2`` (the spread across groups), so that
    ``mean_g e_gc^2 = bias_c^2 + noise_c^2`` exactly. The layer's values are root mean
    squares over channels, which keeps the identity::

        rmse^2 = mean_{g,c} e_gc^2 = bias^2 + noise^2,  bias^2 = mean_c bias_c^2,  noise^2 = mean_c noise_c^2

    ``bias_c`` is measured over the recorded groups, so it carries about ``noise_c / sqrt(G)``
    of sampling error: a small bias is an upper bound, not a measurement of zero.

    Returns ``{"bias": ..., "noise": ..., "rmse": ...}``; ``"signed_bias"`` is the plain mean
    of ``bias_c`` over channels (its sign says whether the layer over- or under-estimates).
    """
    e = torch.cat([_tensor(v).reshape(-1, _tensor(v).shape[-1]) for v in errors], 0).to(torch.float64)
    if e.numel() == 0:
        raise ValueError("decompose: no values")
    bias = e.mean(0)
    noise2 = (e - bias).square().mean(0)
    return {
        "bias": float(bias.square().mean().sqrt()),
        "noise": float(noise2.mean().sqrt()),
        "rmse": float(e.square().mean().sqrt()),
        "signed_bias": float(bias.mean()),
    }


def _tensor(v) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v, dtype=np.float64))
