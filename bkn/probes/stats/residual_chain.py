"""The residual linear-Gaussian chain: truth in closed form, and a floor that is a real bound (docs/design.md §9).

The chain (``width`` channels, ``depth`` blocks, inputs ``(N, C, H, W)``)::

    x[i, :, p] = mu_0 + u_i + e_{i,p},   u_i ~ N(0, rho Sigma_0),   e_{i,p} ~ N(0, (1 - rho) Sigma_0)
    h_0 = x
    block k:   y_k = norm_k(h_k),   h_{k+1} = S_k(h_k + W_k y_k + b_k)

Sample ``i`` shares a random effect ``u_i`` over all its positions ``p`` (a share ``rho``
of each position's covariance, as the pixels of one image are correlated). The norms sit
on the residual branch (``W_k`` a 1x1 convolution with bias ``b_k``), so the stream keeps
the input's mean: beta does not fix it. ``S_k`` keeps every other row and column after
the blocks in ``subsample_after`` (strided subsampling), so deeper layers see fewer values.

Truth. With every norm normalizing with fixed ``(m_k, v_k)`` - its population statistics -
each block is affine and acts on every position alike, so at every position::

    m_{k+1} = m_k + W_k beta_k + b_k                       (E[y_k] = beta_k)
    Cov_{k+1} = (I + W_k D_k) Cov_k (I + W_k D_k)^T,       D_k = diag(gamma_k / sqrt(v_k + eps))

with ``m_0 = mu_0``, ``Cov_0 = Sigma_0`` and ``v_k = diag(Cov_k)`` (subsampling keeps a
position's distribution). :meth:`ResidualGaussianChain.population_statistics` reads the
weights from the model, so it stays the truth for any norm swapped in.

The floor: the best estimate a group of ``n`` samples can give of layer k's statistics is
the maximum-likelihood estimate of the input parameters ``(mu_0, Sigma_0)`` from the
group's whole input (``n`` samples x ``P`` positions, ``rho`` known), pushed through the
exact map above. Per channel, in the units the drift metrics use:

* mean: ``m_k = mu_0 + sum_{j<k} (W_j beta_j + b_j)`` is linear in ``mu_0``, so the ML
  estimate's error is exactly the error of the group's grand mean of the input, an
  efficient (Cramer-Rao) estimate in this balanced design::

      E[(m_hat_k - m_k)^2] / (v_k + eps) = Sigma_0[c, c] (rho + (1 - rho) / P) / n / (v_k + eps)

  (BN at layer 0 computes exactly this grand mean; deeper, its group mean is the grand
  mean of fewer, subsampled positions, which the random effect makes worse);
* variance: ``v_k(Sigma_0)`` is not linear; the delta-method Cramer-Rao bound. With
  ``rho`` known, the within-sample contrasts (``n (P - 1)`` of them) and the between-sample
  ones (``n - 1``) are independent Gaussian vectors with covariances proportional to
  ``Sigma_0``: the information about ``Sigma_0`` is that of ``nP - 1`` i.i.d. draws, and for
  ``G = d v_k[c] / d Sigma_0`` (symmetrized, by :func:`torch.func.jacrev` on the closed form)::

      E[(v_hat_k - v_k)^2] / (v_k + eps)^2 >= 2 tr(G Sigma_0 G Sigma_0) / (nP - 1) / (v_k + eps)^2

The parameters are drawn once from ``seed`` (numpy): ``mu_0 ~ N(0, 1)``,
``Sigma_0 = A A^T / C + 0.1 I`` (``A ~ N(0, 1)``), ``W_k ~ N(0, 0.5^2 / C)``,
``b_k ~ N(0, 0.5^2)``, ``gamma_k ~ U(0.5, 1.5)``, ``beta_k ~ N(0, 0.5^2)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from bkn import norms, transitions
from bkn.layers import _BatchKalmanNorm
from bkn.probes.stats.layer_kinds import is_batch_norm, is_per_sample_norm
from bkn.probes.stats.synthetic import record_norm_input


class ResidualChainNet(nn.Module):
    """``depth`` blocks ``h <- S(h + conv_k(norm_k(h)))``; BKN priors wired through the residual stream.

    With BKN, ``norm_k`` (k >= 1) gets the prior the stream carries, as the official code
    wires a pre-activation ResNet: the stream after block k carries the statistics of the
    block's input (``norm_k``'s posterior: it normalizes the stream itself) plus those of
    the branch, ``norm_k``'s posterior pushed through the layer's transition and ``conv_k``
    (summands taken as independent). ``norm_0`` has no prior.
    """

    def __init__(self, width: int, depth: int, subsample_after=(), norm: str = "bn", **norm_options):
        super().__init__()
        self.subsample_after = tuple(subsample_after)
        for k in range(depth):
            self.add_module(f"norm{k}", norms.create(norm, width, **norm_options))
            self.add_module(f"conv{k}", nn.Conv2d(width, width, 1, bias=True))
        self.depth = depth
        transition = norm_options.get("transition", "official") if norm == "bkn" else None
        self.transition = transition

    def blocks(self) -> list[tuple[nn.Module, nn.Conv2d]]:
        return [(getattr(self, f"norm{k}"), getattr(self, f"conv{k}")) for k in range(self.depth)]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        wired = self.transition is not None and self.training
        t = transitions.get(self.transition) if wired else None
        carried = None
        for k, (norm, conv) in enumerate(self.blocks()):
            if wired and carried is not None and isinstance(norm, _BatchKalmanNorm):
                y = norm(h, prior=(carried.mean, carried.var))
            else:
                y = norm(h)
            out = h + conv(y)
            carried = self._carry(t, norm, conv, tuple(h.shape[2:])) if wired else None
            if k in self.subsample_after:
                out = out[:, :, ::2, ::2]
            h = out
        return h

    def _carry(self, t, norm: nn.Module, conv: nn.Conv2d, spatial) -> transitions.Moments | None:
        if getattr(norm, "posterior", None) is None:
            return None
        start = transitions.Moments(*norm.posterior)
        if t is None:  # identity transition: the stream keeps the block input's statistics
            return start
        branch = t.module(conv, t.after_norm(norm, spatial))
        return start + transitions.Moments(*t.to_prior(branch))


@dataclass
class ResidualGaussianChain:
    """Parameters of the residual chain, its closed-form truth and its floor. ``model()`` builds the network."""

    width: int = 16
    depth: int = 8
    spatial: tuple[int, int] = (8, 8)
    rho: float = 0.2
    subsample_after: tuple[int, ...] = (2, 5)
    seed: int = 0
    eps: float = 1e-5
    params: dict = field(init=False, repr=False)

    def __post_init__(self):
        if self.width < 1 or self.depth < 1:
            raise ValueError(f"ResidualGaussianChain: width and depth must be >= 1, got {self.width}, {self.depth}")
        if not 0 <= self.rho < 1:
            raise ValueError(f"ResidualGaussianChain: rho must be in [0, 1), got {self.rho}")
        side = min(self.spatial)
        if side >> len([k for k in self.subsample_after if k < self.depth - 1]) < 1:
            raise ValueError(f"ResidualGaussianChain: {self.spatial} positions cannot be subsampled that often")
        rng = np.random.default_rng(self.seed)
        c = self.width
        a = rng.standard_normal((c, c))
        self.params = {
            "mu0": rng.standard_normal(c),
            "sigma0": a @ a.T / c + 0.1 * np.eye(c),
            "weights": [0.5 * rng.standard_normal((c, c)) / np.sqrt(c) for _ in range(self.depth)],
            "biases": [0.5 * rng.standard_normal(c) for _ in range(self.depth)],
            "gammas": [rng.uniform(0.5, 1.5, c) for _ in range(self.depth)],
            "betas": [0.5 * rng.standard_normal(c) for _ in range(self.depth)],
        }
        sigma = self.params["sigma0"]
        self._mu0 = torch.from_numpy(self.params["mu0"])
        # u_i and e_{i,p} are drawn as z @ chol^T, scaled by sqrt(rho) and sqrt(1 - rho)
        self._chol = torch.from_numpy(np.linalg.cholesky(sigma))

    @property
    def positions(self) -> int:
        """``P``: positions per sample at the input."""
        return self.spatial[0] * self.spatial[1]

    # -- the network --------------------------------------------------------------------
    def model(self, norm: str = "bn", **norm_options) -> ResidualChainNet:
        """The chain with ``norm`` layers (``bkn.norms`` name and options), the parameters loaded."""
        net = ResidualChainNet(self.width, self.depth, self.subsample_after, norm, eps=self.eps, **norm_options)
        p = self.params
        with torch.no_grad():
            for k, (layer, conv) in enumerate(net.blocks()):
                conv.weight.copy_(torch.from_numpy(p["weights"][k]).view(self.width, self.width, 1, 1))
                conv.bias.copy_(torch.from_numpy(p["biases"][k]))
                if getattr(layer, "weight", None) is not None:
                    layer.weight.copy_(torch.from_numpy(p["gammas"][k]))
                    layer.bias.copy_(torch.from_numpy(p["betas"][k]))
        return net

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
        """``n`` inputs ``(n, C, H, W)``: ``mu_0 + u_i + e_{i,p}`` (see the module docstring)."""
        h, w = self.spatial
        u = torch.randn(n, 1, 1, self.width, generator=generator, dtype=torch.float64)
        e = torch.randn(n, h, w, self.width, generator=generator, dtype=torch.float64)
        z = (self.rho**0.5) * u + ((1 - self.rho) ** 0.5) * e
        x = z @ self._chol.T + self._mu0
        return x.permute(0, 3, 1, 2).to(dtype).contiguous()

    # -- closed-form truth ---------------------------------------------------------------
    def population_statistics(self, model: nn.Module | None = None, per_sample: bool = True) -> dict:
        """Exact population statistics ``{norm name: (mean, var)}`` (float64, per channel) of ``model``.

        Per-sample norms get their group-pooled moments (left out with ``per_sample=False``).
        """
        model = self.model() if model is None else model
        if not isinstance(model, ResidualChainNet):
            raise ValueError(f"ResidualGaussianChain: expected a ResidualChainNet, got {type(model).__name__}")
        mean, cov = self.params["mu0"].copy(), self.params["sigma0"].copy()
        out = {}
        for k, (layer, conv) in enumerate(model.blocks()):
            if not (is_batch_norm(layer) or is_per_sample_norm(layer)):
                raise ValueError(f"ResidualGaussianChain: norm{k} is a {type(layer).__name__}, not a norm")
            m, v = record_norm_input(out, f"norm{k}", layer, mean, cov, per_sample)
            gamma = layer.weight.detach().double().numpy() if layer.weight is not None else np.ones_like(m)
            beta = layer.bias.detach().double().numpy() if layer.bias is not None else np.zeros_like(m)
            w = conv.weight.detach().double().numpy()[:, :, 0, 0]
            b = conv.bias.detach().double().numpy()
            scale = gamma / np.sqrt(v + layer.eps)
            step = np.eye(len(m)) + w * scale[None, :]  # I + W D
            mean = step @ mean - w @ (scale * m) + w @ beta + b
            cov = step @ cov @ step.T
        return out

    def variances(self, sigma0: torch.Tensor) -> torch.Tensor:
        """``v_k`` (depth, C) of the BN chain as a differentiable function of ``Sigma_0`` (float64)."""
        p = self.params
        cov, out = sigma0, []
        for k in range(self.depth):
            v = torch.diagonal(cov)
            out.append(v)
            scale = torch.from_numpy(p["gammas"][k]) / torch.sqrt(v + self.eps)
            step = torch.eye(self.width, dtype=torch.float64) + torch.from_numpy(p["weights"][k]) * scale[None, :]
            cov = step @ cov @ step.T
        return torch.stack(out)

    def floor(self, group_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{norm name: (mean_mse, var_mse)}`` per channel: the floor's mean squared errors for groups of
        ``group_size`` samples, the mean's in population variances ``(m_hat - m)^2 / (v + eps)`` (exact)
        and the variance's relative ``(v_hat - v)^2 / (v + eps)^2`` (the delta-method Cramer-Rao bound)."""
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"ResidualGaussianChain.floor: group_size must be a positive int, got {group_size!r}")
        sigma = torch.from_numpy(self.params["sigma0"])
        v = self.variances(sigma)  # (L, C)
        jac = torch.func.jacrev(self.variances)(sigma)  # (L, C, C, C): d v[k, c] / d Sigma_0
        g = 0.5 * (jac + jac.transpose(-1, -2))
        gs = g @ sigma
        crb = 2.0 * (gs * gs.transpose(-1, -2)).sum((-1, -2)) / (group_size * self.positions - 1)
        grand_mean = torch.diagonal(sigma) * (self.rho + (1 - self.rho) / self.positions) / group_size
        out = {}
        for k in range(self.depth):
            scale = v[k] + self.eps
            out[f"norm{k}"] = (grand_mean / scale, crb[k] / scale.square())
        return out
