"""The plain linear-Gaussian chain: ground truth in closed form (docs/design.md §9).

A chain of ``depth`` blocks ``linear_k -> norm_k`` on (N, C, H, W) inputs, where
``linear_k`` is a 1x1 convolution (a linear map of the channels, with bias, applied at
every position) and ``norm_k`` a normalization layer. The input is Gaussian, i.i.d.
over samples and positions, with a random mean and a random full covariance across
channels::

    x ~ N(mu_0, Sigma_0) at every position,   h_k = W_k y_{k-1} + b_k,   y_0 = x

With every normalization layer normalizing with fixed statistics ``(m, v)`` (its
population statistics) the whole chain is affine, so the input of every layer is
exactly Gaussian and its moments follow in closed form::

    E[h_k] = W_k E[y_{k-1}] + b_k,           Cov[h_k] = W_k Cov[y_{k-1}] W_k^T
    y_k = D_k (h_k - m_k) + beta_k,  D_k = diag(gamma_k / sqrt(v_k + eps))
    E[y_k] = D_k (E[h_k] - m_k) + beta_k,     Cov[y_k] = D_k Cov[h_k] D_k

with ``m_k, v_k`` the diagonal moments of ``h_k`` for batch-statistic norms (BN, BRN,
BKN), and for per-sample norms (GN, LN, IN) those moments pooled over the channels of
each group (law of total variance; the same convention as
:func:`bkn.probes.stats.population_statistics` with ``per_sample=True``).
:meth:`LinearGaussianChain.population_statistics` reads the weights from the model
itself, so it stays the truth for any norm swapped in with ``bkn.convert``.

What this chain cannot do: serve as the drift probe's floor. On a plain linear chain BN
*is* the best estimator (the plug-in estimate of the input parameters from the group,
pushed through the map, equals BN's statistics; after a layer that normalizes with its
own batch statistics the next group mean is exactly ``W beta + b``), so no method can show
an advantage on it. The probe uses :mod:`bkn.probes.stats.residual_chain` instead; this chain
remains the closed-form reference of the population-statistics tests.

The parameters are drawn once from ``seed`` (numpy): ``mu_0 ~ N(0, 1)``,
``Sigma_0 = A A^T / C + 0.1 I`` with ``A ~ N(0, 1)`` (correlated channels),
``W_k ~ N(0, 1 / C)``, ``b_k ~ N(0, 1)``, ``gamma_k ~ U(0.5, 1.5)``, ``beta_k ~ N(0, 0.5^2)``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from bkn.probes.stats.layer_kinds import groups_of, is_batch_norm, is_per_sample_norm


@dataclass
class LinearGaussianChain:
    """Parameters of the chain and its closed-form truth. ``model()`` builds it with torch BatchNorm2d."""

    width: int = 32
    depth: int = 8
    spatial: tuple[int, int] = (4, 4)
    seed: int = 0
    eps: float = 1e-5
    params: dict = field(init=False, repr=False)

    def __post_init__(self):
        if self.width < 1 or self.depth < 1:
            raise ValueError(f"LinearGaussianChain: width and depth must be >= 1, got {self.width}, {self.depth}")
        rng = np.random.default_rng(self.seed)
        c = self.width
        a = rng.standard_normal((c, c))
        self.params = {
            "mu0": rng.standard_normal(c),
            "sigma0": a @ a.T / c + 0.1 * np.eye(c),
            "weights": [rng.standard_normal((c, c)) / np.sqrt(c) for _ in range(self.depth)],
            "biases": [rng.standard_normal(c) for _ in range(self.depth)],
            "gammas": [rng.uniform(0.5, 1.5, c) for _ in range(self.depth)],
            "betas": [0.5 * rng.standard_normal(c) for _ in range(self.depth)],
        }
        self._chol = torch.from_numpy(np.linalg.cholesky(self.params["sigma0"]))
        self._mu0 = torch.from_numpy(self.params["mu0"])

    # -- the network --------------------------------------------------------------------
    def model(self) -> nn.Sequential:
        """``linear0, norm0, ..., linear{L-1}, norm{L-1}``: 1x1 convolutions and ``nn.BatchNorm2d``."""
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        p = self.params
        for k in range(self.depth):
            conv = nn.Conv2d(self.width, self.width, 1, bias=True)
            norm = nn.BatchNorm2d(self.width, eps=self.eps)
            with torch.no_grad():
                conv.weight.copy_(torch.from_numpy(p["weights"][k]).view(self.width, self.width, 1, 1))
                conv.bias.copy_(torch.from_numpy(p["biases"][k]))
                norm.weight.copy_(torch.from_numpy(p["gammas"][k]))
                norm.bias.copy_(torch.from_numpy(p["betas"][k]))
            layers[f"linear{k}"] = conv
            layers[f"norm{k}"] = norm
        return nn.Sequential(layers)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
        """``n`` inputs ``(n, C, H, W)``, i.i.d. ``N(mu_0, Sigma_0)`` over samples and positions."""
        h, w = self.spatial
        z = torch.randn(n, h, w, self.width, generator=generator, dtype=torch.float64)
        x = z @ self._chol.T + self._mu0
        return x.permute(0, 3, 1, 2).to(dtype).contiguous()

    # -- closed-form truth ---------------------------------------------------------------
    def input_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (C,) and covariance (C, C) of the input at one position."""
        return self.params["mu0"].copy(), self.params["sigma0"].copy()

    def population_statistics(
        self, model: nn.Module | None = None, per_sample: bool = True
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Exact population statistics ``{norm name: (mean, var)}`` (float64, per channel) of ``model``.

        ``model`` defaults to :meth:`model`; any norm swapped in by ``bkn.convert`` keeps
        the truth exact, since the weights are read from the model. Per-sample norms get
        their group-pooled moments (``per_sample=False`` leaves them out, as
        :func:`bkn.probes.stats.population_statistics` does by default).
        """
        model = self.model() if model is None else model
        mean, cov = self.input_moments()
        out = {}
        for name, module in model.named_children():
            if isinstance(module, nn.Conv2d):
                w = module.weight.detach().to(torch.float64).numpy()
                if w.shape[2:] != (1, 1) or module.groups != 1:
                    raise ValueError(f"LinearGaussianChain: {name!r} must be a dense 1x1 convolution")
                w = w[:, :, 0, 0]
                mean = w @ mean + (module.bias.detach().double().numpy() if module.bias is not None else 0.0)
                cov = w @ cov @ w.T
            elif is_batch_norm(module) or is_per_sample_norm(module):
                m, v = record_norm_input(out, name, module, mean, cov, per_sample)
                gamma = module.weight.detach().double().numpy() if module.weight is not None else 1.0
                beta = module.bias.detach().double().numpy() if module.bias is not None else 0.0
                scale = gamma / np.sqrt(v + module.eps)
                mean = scale * (mean - m) + beta
                cov = cov * np.outer(scale, scale)
            else:
                raise ValueError(
                    f"LinearGaussianChain: cannot propagate moments through {name!r} "
                    f"({type(module).__name__}); expected 1x1 convolutions and norms"
                )
        return out


def record_norm_input(out: dict, name: str, module: nn.Module, mean, cov, per_sample: bool):
    """A norm's input moments ``(m, v)`` from the closed-form ``(mean, cov)`` (pooled over its groups for a
    per-sample norm), stored in ``out[name]`` as tensors unless a per-sample norm is left out; returns them."""
    m, v = mean.copy(), np.diag(cov).copy()
    if is_per_sample_norm(module):
        m, v = _grouped(module, m, v)
    if is_batch_norm(module) or per_sample:
        out[name] = (torch.from_numpy(m), torch.from_numpy(v))
    return m, v


def _grouped(module: nn.Module, mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel moments -> moments pooled over each group's channels, repeated per channel.

    The numpy twin of :func:`bkn.probes.stats.pooled_moments.pool_over_groups` (the closed-form truth
    is computed in numpy).
    """
    groups = groups_of(module, mean.size)
    m = mean.reshape(groups, -1)
    gm = m.mean(1, keepdims=True)
    gv = var.reshape(groups, -1).mean(1, keepdims=True) + ((m - gm) ** 2).mean(1, keepdims=True)
    return np.broadcast_to(gm, m.shape).ravel().copy(), np.broadcast_to(gv, m.shape).ravel().copy()
