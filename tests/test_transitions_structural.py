"""The structural rules of the prior chain (:mod:`bkn.transitions.structural`) against Monte-Carlo estimates.

For each op real networks use (slices, splits, channel shuffle, squeeze-and-excitation gates,
spatial means, upsampling, drop-path, functional convolutions, padding, scalar affine maps),
activations ``x ~ N(m, v)`` i.i.d. over samples and positions go through the *real* op, and
the per-channel mean and variance of the result (over samples and positions) are compared
with what the rule gives for the analytic transition (moments) and for the official one (a
surrogate drawn independently of the check's activations). Closed forms are gradchecked.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import stochastic_depth

from bkn import transitions
from bkn.transitions import Moments, Sample, structural
from bkn.transitions.analytic import Unsupported

C, SPATIAL, N = 6, (8, 8), 1000
MEAN = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5, -0.3], dtype=torch.float64)
VAR = torch.tensor([1.0, 0.5, 2.0, 0.2, 1.2, 0.8], dtype=torch.float64)
ANALYTIC, OFFICIAL = transitions.get("analytic"), transitions.get("official")


def _draw(seed: int, n: int = N, spatial=SPATIAL) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    view = (1, C) + (1,) * len(spatial)
    return torch.randn(n, C, *spatial, dtype=torch.float64, generator=g) * VAR.sqrt().view(view) + MEAN.view(view)


def _empirical(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = y.transpose(0, 1).reshape(y.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=False)


def _rules(op, rule: str, extra=(), kwargs=None, spatial=SPATIAL):
    """(Monte-Carlo truth, analytic, official) per-channel (mean, var) for ``op`` and its rule ``rule``."""
    kwargs = kwargs or {}
    truth = _empirical(op(_draw(1, spatial=spatial)))
    moments = structural.settle(
        structural.apply(ANALYTIC, rule, (Moments(MEAN[None], VAR[None], spatial), *extra), kwargs)
    )
    sample = Sample(_draw(2, spatial=spatial), draws=N)
    official = structural.settle(structural.apply(OFFICIAL, rule, (sample, *extra), kwargs))
    return truth, ANALYTIC.to_prior(moments), OFFICIAL.to_prior(official)


def _close(got, truth, tol=0.03):
    mean, var = (t.reshape(-1) for t in got)
    scale = VAR.max().sqrt().item()
    torch.testing.assert_close(mean, truth[0], atol=tol * scale, rtol=0)
    torch.testing.assert_close(var, truth[1], atol=tol * VAR.max().item(), rtol=tol)


def _check(op, rule, extra=(), kwargs=None, tol=0.03, spatial=SPATIAL):
    truth, analytic, official = _rules(op, rule, extra, kwargs, spatial)
    _close(analytic, truth, tol)
    _close(official, truth, tol)
    return truth, analytic


def test_channel_and_spatial_slices():
    truth, _ = _check(lambda x: x[:, 1:5], "getitem", ((slice(None), slice(1, 5)),))
    assert truth[0].shape == (4,)
    _check(lambda x: x[:, :, 2:6, ::2], "getitem", ((slice(None), slice(None), slice(2, 6), slice(None, None, 2)),))
    _check(lambda x: x[..., 1:], "getitem", ((Ellipsis, slice(1, None)),))


@pytest.mark.parametrize(
    "rule,sections,part", [("split", [2, 4], 1), ("split", 3, 0), ("chunk", 2, 1), ("chunk", 3, 2)]
)
def test_split_and_chunk_then_getitem(rule, sections, part):
    op = lambda x: getattr(x, rule)(sections, 1)[part]  # noqa: E731
    truth = _empirical(op(_draw(1)))
    for t, state in ((ANALYTIC, Moments(MEAN[None], VAR[None], SPATIAL)), (OFFICIAL, Sample(_draw(2), N))):
        parts = structural.apply(t, rule, (state, sections, 1), {})
        _close(t.to_prior(structural.apply(t, "getitem", (parts, part), {})), truth)


def test_channel_shuffle_is_a_permutation_of_the_channels():
    def shuffle(x, groups=2, batch=None):
        b = x.shape[0] if batch is None else batch
        return x.view(b, groups, C // groups, *SPATIAL).transpose(1, 2).contiguous().view(b, C, *SPATIAL)

    truth = _empirical(shuffle(_draw(1)))
    for t, state in ((ANALYTIC, Moments(MEAN[None], VAR[None], SPATIAL)), (OFFICIAL, Sample(_draw(2), N))):
        state = structural.apply(t, "view", (state, None, 2, C // 2, *SPATIAL), {})  # None: the batch size
        state = structural.apply(t, "transpose", (state, 1, 2), {})
        state = structural.apply(t, "view", (state, None, C, *SPATIAL), {})
        _close(t.to_prior(structural.settle(state)), truth)
    permuted = shuffle(torch.arange(C).view(1, C, 1, 1).expand(1, C, *SPATIAL), batch=1)[0, :, 0, 0]
    assert permuted.tolist() == [0, 3, 1, 4, 2, 5]
    swapped = structural.apply(ANALYTIC, "transpose", (Moments(MEAN[None], VAR[None], (4, 8)), 1, 2), {})
    with pytest.raises(Unsupported, match="mixes channels with positions"):  # channels and positions swapped
        structural.settle(swapped)


def test_flatten_and_mean_over_positions():
    _check(lambda x: x.mean((2, 3), keepdim=True), "mean", ((2, 3),), {"keepdim": True})
    _check(lambda x: x.mean(-1), "mean", (-1,))
    truth = _empirical(_draw(1).flatten(2).mean(-1))
    state = structural.apply(ANALYTIC, "flatten", (Moments(MEAN[None], VAR[None], SPATIAL), 2), {})
    _close(ANALYTIC.to_prior(structural.apply(ANALYTIC, "mean", (state, -1), {})), truth)
    with pytest.raises(Unsupported, match="over dims"):
        structural.apply(ANALYTIC, "mean", (Moments(MEAN[None], VAR[None], SPATIAL), 1), {})


class _SqueezeExcite(nn.Module):
    """timm's and torchvision's squeeze-and-excitation: ``x * sigmoid(conv2(relu(conv1(mean(x)))))``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv1, self.conv2 = nn.Conv2d(C, 3, 1).double(), nn.Conv2d(3, C, 1).double()
        with torch.no_grad():
            self.conv2.weight.mul_(3)  # a gate that varies with its input, not a constant

    def gate(self, x):
        return torch.sigmoid(self.conv2(torch.relu(self.conv1(x.mean((2, 3), keepdim=True)))))

    def forward(self, x):
        return x * self.gate(x)


@pytest.mark.parametrize("spatial", [(8, 8), (2, 2)])
def test_squeeze_excitation_gate_against_monte_carlo(spatial):
    """The analytic rule takes the gate independent of x, with the moments of its own branch; exact for the
    surrogate. On 8x8 positions it is within 3%; on 2x2 (x's spatial mean varies, the factors correlate) the
    variance error grows (the bound below is measured, not a promise)."""
    se = _SqueezeExcite()
    with torch.no_grad():
        truth = _empirical(se(_draw(1, spatial=spatial)))
        states = []
        for t, state in (
            (ANALYTIC, Moments(MEAN[None], VAR[None], spatial)),
            (OFFICIAL, Sample(_draw(2, spatial=spatial), N)),
        ):
            gate = structural.apply(t, "mean", (state, (2, 3)), {"keepdim": True})
            gate = t.module(nn.Sigmoid(), t.module(se.conv2, t.relu(t.module(se.conv1, gate))))
            states.append(t.to_prior(structural.apply(t, "mul", (state, gate), {})))
    _close(states[1], truth)
    _close(states[0], truth, tol=0.03 if spatial == (8, 8) else 0.12)
    gate_var = _empirical(se.gate(_draw(1, spatial=spatial)))[1]
    assert gate_var.max() > 1e-4  # the gate is not a constant: the rule's variance terms matter


def test_product_of_two_activations_at_the_same_positions_is_refused_in_closed_form():
    x = Moments(MEAN[None], VAR[None], SPATIAL)
    with pytest.raises(Unsupported, match="correlated"):
        structural.apply(ANALYTIC, "mul", (x, ANALYTIC.module(nn.Sigmoid(), x)), {})
    truth = _empirical((lambda x: x * torch.sigmoid(x))(_draw(1)))
    sample = Sample(_draw(2), N)  # the surrogate takes it as the network does
    _close(
        OFFICIAL.to_prior(structural.apply(OFFICIAL, "mul", (sample, OFFICIAL.module(nn.Sigmoid(), sample)), {})), truth
    )


def test_scalar_and_per_channel_affine_maps():
    scale = torch.linspace(0.5, 2.0, C, dtype=torch.float64).view(C, 1, 1)
    _check(lambda x: x * 2.5, "mul", (2.5,))
    _check(lambda x: 2.5 * x, "mul", (2.5,))  # (state, number) either way round
    _check(lambda x: x * scale, "mul", (scale,))
    _check(lambda x: x / 4.0, "div", (4.0,))
    _check(lambda x: x + 3.0, "add_scalar", (3.0,))
    with pytest.raises(Unsupported, match="not per channel"):
        structural.apply(ANALYTIC, "mul", (Moments(MEAN[None], VAR[None], SPATIAL), torch.ones(8, 8)), {})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scale_factor": 2, "mode": "nearest"},
        {"size": (11, 13), "mode": "nearest"},
        {"scale_factor": 2, "mode": "bilinear", "align_corners": False},
        {"scale_factor": 3, "mode": "bilinear", "align_corners": True},
        {"size": (5, 6), "mode": "area"},
    ],
)
def test_upsampling_against_monte_carlo(kwargs):
    truth, analytic = _check(lambda x: F.interpolate(x, **kwargs), "interpolate", (), kwargs)
    if kwargs["mode"] == "bilinear":
        assert (analytic[1].reshape(-1) < VAR * 0.8).all()  # averaging neighbours shrinks the variance


def test_upsample_module_and_the_output_size():
    up = nn.Upsample(scale_factor=2, mode="bilinear")
    kwargs = {k: getattr(up, k) for k in ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor")}
    state = structural.apply(ANALYTIC, "interpolate", (Moments(MEAN[None], VAR[None], SPATIAL),), kwargs)
    assert state.spatial == (16, 16)
    with pytest.raises(Unsupported, match="bicubic"):
        structural.apply(
            ANALYTIC, "interpolate", (Moments(MEAN[None], VAR[None], SPATIAL),), {"size": 9, "mode": "bicubic"}
        )


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_stochastic_depth_in_training_has_exact_moments(p):
    torch.manual_seed(4)
    _check(lambda x: stochastic_depth(x, p, "row", True), "drop_path", (p, "row", True), tol=0.04)
    mean, var = structural.drop_path_moments(MEAN, VAR, p)
    torch.testing.assert_close(var, (VAR + MEAN**2) / (1 - p) - MEAN**2)
    # "batch" mode drops the whole batch at once: the same marginal moments
    x = Moments(MEAN[None], VAR[None], SPATIAL)
    batch = structural.apply(ANALYTIC, "drop_path", (x, p, "batch", True), {})
    torch.testing.assert_close(batch.var[0], var)
    assert structural.apply(ANALYTIC, "drop_path", (x, 0.0, "row", True), {}) is x


def test_functional_convolution_with_a_weight_tensor():
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(4, C // 2, 3, 3, dtype=torch.float64, generator=g) / 3
    bias = torch.randn(4, dtype=torch.float64, generator=g)
    op = lambda x: F.conv2d(x, weight, bias, stride=2, groups=2)  # noqa: E731  (no padding: the rule is exact)
    truth, analytic, official = _rules(op, "conv", (weight, bias), {"stride": 2, "groups": 2})
    _close(official, truth)
    assert analytic[0].reshape(-1).shape == truth[0].shape == (4,)
    _close(analytic, truth)
    state = structural.apply(
        ANALYTIC, "conv", (Moments(MEAN[None], VAR[None], SPATIAL), weight, bias), {"stride": 2, "groups": 2}
    )
    assert state.spatial == (3, 3)


@pytest.mark.parametrize("mode,value", [("reflect", 0.0), ("replicate", 0.0), ("constant", 0.0), ("constant", 1.5)])
def test_spatial_padding(mode, value):
    pad = (1, 2, 3, 0)
    truth = _empirical(F.pad(_draw(1), pad, mode=mode, value=value if mode == "constant" else None))
    for t, state in ((ANALYTIC, Moments(MEAN[None], VAR[None], SPATIAL)), (OFFICIAL, Sample(_draw(2), N))):
        out = structural.pad_spatial(state, pad, mode, value)
        _close(t.to_prior(out), truth)
    assert structural.pad_spatial(Moments(MEAN[None], VAR[None], SPATIAL), pad, mode, value).spatial == (11, 11)


def test_gradcheck_of_the_closed_forms():
    g = torch.Generator().manual_seed(7)
    mean = torch.randn(2, C, dtype=torch.float64, generator=g, requires_grad=True)
    var = (0.1 + torch.rand(2, C, dtype=torch.float64, generator=g)).requires_grad_()
    gm = torch.randn(2, C, dtype=torch.float64, generator=g, requires_grad=True)
    gv = (0.1 + torch.rand(2, C, dtype=torch.float64, generator=g)).requires_grad_()

    def product(m, v, a, b):
        out = structural.apply(ANALYTIC, "mul", (Moments(m, v, (4, 4)), Moments(a, b, (1, 1))), {})
        return out.mean, out.var

    def others(m, v):
        x = Moments(m, v, (4, 4))
        up = structural.apply(ANALYTIC, "interpolate", (x,), {"scale_factor": 2, "mode": "bilinear"})
        pad = structural.pad_spatial(x, (1, 1, 1, 1), "constant", 0.5)
        return (*structural.drop_path_moments(m, v, 0.3), up.var, pad.mean, pad.var)

    assert torch.autograd.gradcheck(product, (mean, var, gm, gv))
    assert torch.autograd.gradcheck(others, (mean, var))


def test_a_refused_op_raises_unsupported_naming_it():
    x = Moments(MEAN[None], VAR[None], SPATIAL)
    with pytest.raises(Unsupported, match="split along dim 2"):
        structural.apply(ANALYTIC, "split", (x, 4, 2), {})
    with pytest.raises(Unsupported, match="view with these arguments"):
        structural.apply(ANALYTIC, "view", (x, None, 5, 7), {})  # the op itself refuses: a named error, not a crash
