"""Statistic drift tracked across commits: how far a method's statistics are from the truth.

A two-layer probe with a closed-form answer (docs/design.md §9, the synthetic case), small
enough to run in a second per parameter set, so that ``asv run`` tracks *accuracy*
across commits next to speed (the full study is ``nox -s accuracy``)::

    x ~ N(mu_c, s_c^2) i.i.d. over samples and positions, 16 channels, 4x4
    norm1 -> ReLU -> 3x3 convolution (no padding) -> norm2       (2x2 positions per sample)

built as ``torch.nn`` BatchNorms and converted with ``bkn.methods.get(method).convert(model)``
(so BKN's prior for ``norm2`` is the converter's own chain from ``norm1``'s posterior).
``norm1`` has a fixed, trained-looking affine (gamma, beta). With ``norm1`` normalizing
with its population statistics, ``norm2``'s input at every position is a sum of
independent rectified Gaussians, so its population mean and variance per channel are
exact (:func:`population_moments`: rectified-Gaussian moments through the
convolution, computed here in float64 numpy, independently of the library).

Each parameter set warms the running estimates up (``WARMUP_STEPS`` training batches:
BRN corrects towards them), then draws ``BATCHES`` fresh batches of ``group_size``
samples (one normalization group each: the layers are built without a group) and
records the statistics ``norm2`` normalized with: BN's batch moments (of
its input), BKN's posterior and BRN's effective statistics (``layer.last_stats``).
Reported (median over batches x channels, in the units the drift probe uses):

* ``track_mean_error``: ``|m_hat - m| / sqrt(v)`` (population standard deviations);
* ``track_var_logratio``: ``|log(v_hat / v)|``.

Only the methods whose statistics depend on the group take part (``Method.uses_groups``:
BN, BKN, BRN; not EvoNorm-B0, which replaces ``norm1 -> ReLU`` and centres nothing);
GN/LN/IN normalize each sample with its own statistics (their drift is the drift probe's
output discrepancy).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from bkn import methods
from bkn.probes.results import GROUP_PARAM, METHOD_PARAM

from .harness.matrix import GROUP_SIZES, METHODS
from .harness.process import configure_threads
from .harness.timing import cached

CHANNELS = 16
SIZE = 4
WARMUP_STEPS = 50
BATCHES = 24
SEED = 0
# The matrix's methods whose training statistics depend on the group (no per-sample norms), but not EvoNorm-B0:
# it replaces norm1 -> ReLU (so norm2's input has no closed form here) and estimates no mean. Not MABN and CBN
# (docs/design.md §16): the exact moments below assume the convolution computes with its stored weight (MABN's
# centres it), and the probe runs under no_grad, where CBN is plain BN on the group.
CROSS_ITERATION = ("mabn", "cbn")
GROUP_METHODS = tuple(
    name
    for name in METHODS
    if (m := methods.get(name)).uses_groups and not m.converts and m.norm not in CROSS_ITERATION
)


def population_moments(sd, gamma, beta, weight, eps: float):
    """Exact per-channel mean and variance of ``norm2``'s input (float64 numpy).

    ``norm1`` with population statistics maps channel c to ``N(beta_c, gamma_c^2 s_c^2 / (s_c^2 + eps))``
    (whatever the input mean ``mu_c``);
    ReLU of ``N(a, b^2)`` has mean ``a Phi(a/b) + b phi(a/b)`` and second moment
    ``(a^2 + b^2) Phi(a/b) + a b phi(a/b)``; a convolution without padding of independent
    inputs has mean ``sum W * E`` and variance ``sum W^2 * Var``.
    """
    a = np.asarray(beta, dtype=np.float64)
    b = np.abs(np.asarray(gamma, dtype=np.float64)) * sd / np.sqrt(sd**2 + eps)
    z = a / b
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    first = a * cdf + b * pdf
    second = (a * a + b * b) * cdf + a * b * pdf
    var_in = second - first**2
    w = np.asarray(weight, dtype=np.float64)
    mean = (w.sum(axis=(2, 3)) * first[None, :]).sum(axis=1)
    var = ((w**2).sum(axis=(2, 3)) * var_in[None, :]).sum(axis=1)
    return mean, var


class _Probe:
    def __init__(self, method: str, group_size: int):
        configure_threads()
        gen = torch.Generator().manual_seed(SEED)
        self.mu = torch.empty(CHANNELS).uniform_(-1.0, 1.0, generator=gen)
        self.sd = torch.empty(CHANNELS).uniform_(0.5, 2.0, generator=gen)
        torch.manual_seed(SEED)
        model = nn.Sequential(
            nn.BatchNorm2d(CHANNELS), nn.ReLU(), nn.Conv2d(CHANNELS, CHANNELS, 3, bias=False), nn.BatchNorm2d(CHANNELS)
        )
        with torch.no_grad():
            model[0].weight.copy_(torch.empty(CHANNELS).uniform_(0.5, 1.5, generator=gen))
            model[0].bias.copy_(torch.empty(CHANNELS).uniform_(-0.5, 0.5, generator=gen))
        self.model = methods.get(method).convert(model).train()
        first, conv, second = self.model[0], self.model[2], self.model[3]
        mean, var = population_moments(
            self.sd.numpy(),
            first.weight.detach().numpy(),
            first.bias.detach().numpy(),
            conv.weight.detach().numpy(),
            first.eps,
        )
        self.true_mean, self.true_var = torch.from_numpy(mean), torch.from_numpy(var)
        self.second = second
        self.group_size = group_size
        self.gen = torch.Generator().manual_seed(SEED + 1)
        self.observed = None
        if not hasattr(second, "last_stats"):  # torch's BatchNorm keeps no statistics: observe its input
            second.register_forward_pre_hook(self._observe)
        with torch.no_grad():
            for _ in range(WARMUP_STEPS):
                self.model(self._batch())
        self.errors = self._measure()

    def _batch(self) -> torch.Tensor:
        noise = torch.randn(self.group_size, CHANNELS, SIZE, SIZE, generator=self.gen)
        return noise * self.sd.view(1, -1, 1, 1) + self.mu.view(1, -1, 1, 1)

    def _observe(self, module, args):
        x = args[0].detach().double()
        var, mean = torch.var_mean(x.transpose(0, 1).reshape(x.shape[1], -1), dim=1, correction=0)
        self.observed = (mean, var)

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        stats = getattr(self.second, "last_stats", None)
        if stats is None:
            stats = self.observed
        mean, var = stats
        return mean.double().reshape(-1, CHANNELS), var.double().reshape(-1, CHANNELS)

    def _measure(self) -> dict[str, float]:
        mean_err, var_err = [], []
        with torch.no_grad():
            for _ in range(BATCHES):
                self.model(self._batch())
                mean, var = self._stats()
                mean_err.append(((mean - self.true_mean).abs() / self.true_var.sqrt()).flatten())
                var_err.append(torch.log(var.clamp_min(1e-30) / self.true_var).abs().flatten())
        return {"mean": float(torch.cat(mean_err).median()), "var": float(torch.cat(var_err).median())}


class _Drift:
    params = [list(GROUP_METHODS), list(GROUP_SIZES)]
    param_names = [METHOD_PARAM, GROUP_PARAM]
    timeout = 120.0

    def setup(self, method, group_size):
        self.errors = cached((type(self).__name__, method, group_size), lambda: _Probe(method, group_size).errors)


class TrackMeanError(_Drift):
    """Median |m_hat - m| / sqrt(v) of the statistics the second layer normalized with."""

    unit = "population std"

    def track_mean_error(self, method, group_size):
        return self.errors["mean"]


class TrackVarLogRatio(_Drift):
    """Median |log(v_hat / v)| of the statistics the second layer normalized with."""

    unit = "|log ratio|"

    def track_var_logratio(self, method, group_size):
        return self.errors["var"]
