"""Shared by the Batch Kalman Normalization tests (tests/test_kalman*.py): an independent numpy
reference of docs/design.md §1 and the builders of inputs, affine parameters and priors.

The numpy functions below are an independent transcription of the spec, written
without looking at how ``bkn`` computes anything: per (group, channel) observed
mean and biased variance, the two-component mixture, the ratio guard, the
normalization and the affine transform.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bkn import BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d

EPS = 1e-5
LAYER_FOR_NDIM = {2: BatchKalmanNorm1d, 3: BatchKalmanNorm1d, 4: BatchKalmanNorm2d, 5: BatchKalmanNorm3d}
BN_FOR_NDIM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
SHAPE_FOR_NDIM = {2: (8, 3), 3: (8, 3, 5), 4: (8, 3, 3, 4), 5: (8, 3, 2, 3, 2)}


# -- independent numpy reference of docs/design.md §1 ------------------------------------------------


def np_observed(x: np.ndarray, groups: int):
    """(G, C) mean and biased variance over (samples of the group, spatial positions)."""
    x = np.asarray(x, dtype=np.float64)
    n, c = x.shape[:2]
    xg = x.reshape(groups, n // groups, c, -1)
    m_o = xg.mean(axis=(1, 3))
    v_o = ((xg - m_o[:, None, :, None]) ** 2).mean(axis=(1, 3))
    return m_o, v_o


def np_bkn(x, gamma, beta, prior, p, groups=1, eps=EPS, guard=100.0):
    """Returns y, posterior (m, v) and observed (m_o, v_o), all float64; stats of shape (G, C)."""
    x = np.asarray(x, dtype=np.float64)
    n, c = x.shape[:2]
    m_o, v_o = np_observed(x, groups)
    values = (n // groups) * int(np.prod(x.shape[2:], dtype=np.int64))
    if prior is None:
        m, v = m_o, v_o
    else:
        m_p = np.broadcast_to(np.asarray(prior[0], dtype=np.float64), (groups, c))
        v_p = np.broadcast_to(np.asarray(prior[1], dtype=np.float64), (groups, c))
        p = np.asarray(p, dtype=np.float64)  # scalar or per channel
        use_prior = True
        if guard is not None and values > 1 and np.mean(v_p / v_o) >= guard:
            use_prior = False
        if use_prior:
            m = p * m_p + (1 - p) * m_o
            v = p * v_p + (1 - p) * v_o + p * (1 - p) * (m_o - m_p) ** 2
        else:
            m, v = m_o, v_o
    xg = x.reshape(groups, n // groups, c, -1)
    y = (xg - m[:, None, :, None]) / np.sqrt(v[:, None, :, None] + eps)
    gamma = np.asarray(gamma, dtype=np.float64)[None, None, :, None]
    y = y * gamma + np.asarray(beta, dtype=np.float64)[None, None, :, None]
    return y.reshape(x.shape), (m, v), (m_o, v_o)


def np_running_update(rm, rv, m, v, values, momentum=0.1):
    """Torch-convention EMA of the posterior averaged over groups, var scaled by n/(n-1)."""
    m_bar, v_bar = m.mean(0), v.mean(0)
    new_mean = (1 - momentum) * rm + momentum * m_bar
    return new_mean, (1 - momentum) * rv + momentum * v_bar * values / (values - 1)


def t2n(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy().copy()  # a copy: buffers change in place


def make_input(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    scale = torch.rand(c, generator=g, dtype=torch.float64) * 2 + 0.5
    shift = torch.randn(c, generator=g, dtype=torch.float64) * 2
    view = (1, c) + (1,) * (len(shape) - 2)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale.view(view) + shift.view(view)
    return x.to(dtype)


def random_affine(layer: nn.Module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=g) * 1.5 + 0.25)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))


def random_prior(groups, c, shape="GC", dtype=torch.float32, seed=2, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    size = (groups, c) if shape == "GC" else (c,)
    m = (torch.randn(size, generator=g, dtype=torch.float64) * 2).to(dtype)
    v = (torch.rand(size, generator=g, dtype=torch.float64) * 3 + 0.3).to(dtype)
    return m.requires_grad_(requires_grad), v.requires_grad_(requires_grad)
