"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021, arXiv 2002.05712), docs/design.md §16.

CBN averages the current group's statistics with those of the last ``k`` iterations, each
compensated to the current weights ``W_t`` of the convolution that feeds the layer by a
first-order Taylor step::

    mu_{t-tau}(W_t) = mu_{t-tau} + rho * <d mu_{t-tau} / d W, W_t - W_{t-tau}>      (per channel)
    nu_{t-tau}(W_t) = nu_{t-tau} + rho * <d nu_{t-tau} / d W, W_t - W_{t-tau}>      (nu = E[x^2])
    mu  = mean over the valid tau in 0..k of mu_{t-tau}(W_t)          (tau = 0: the current group)
    var = mean over the valid tau of nu_{t-tau}(W_t) - mu^2
    y   = gamma * (x - mu) / sqrt(var + eps) + beta

Only the current statistics carry a gradient (the past ones and the derivatives are constants),
as in the authors' ``CBN.py`` (Howal/Cross-iterationBatchNorm). A window whose compensated
variance ``nu - mu^2`` is negative is left out (``invalid="drop"``, the authors' code); the paper
instead clamps ``nu`` to at least ``mu^2`` (``invalid="clamp"``). Burn-in: for the first
``burnin`` training iterations the layer is plain BN on the current group and keeps no history.
``window`` is the authors' ``buffer_num`` (past iterations; the average has ``window + 1`` terms).

The derivatives ``d mu / d W`` and ``d nu / d W`` come from autograd through the convolution, so the
layer must know that convolution: ``bkn.convert`` wires it (docs/design.md §16), or pass
``weight=`` to ``forward`` (the authors' signature ``forward(input, weight)``). An unwired layer,
and any forward whose input carries no gradient (``torch.no_grad``, a frozen convolution), is plain
BN on the current group, as the authors' code is for inputs that do not require grad; it warns
once, naming itself, the first time it trains unwired.

Groups: each group of ``group_size`` samples keeps its own history (one device's micro-batch, as
MABN here); a change in the number of groups restarts the histories. The histories are Python
state (not in the state dict), as in the authors' code. Running estimates are BN's: the current
group's mean and unbiased variance, averaged over groups.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ._base import BatchStatNorm, Dims1d, Dims2d, Dims3d
from ._groups import check_window, group_mean, grouped

__all__ = ["CrossIterationBatchNorm1d", "CrossIterationBatchNorm2d", "CrossIterationBatchNorm3d"]

INVALID = ("drop", "clamp")


def _per_sample(stat: torch.Tensor, like: torch.Tensor, groups: int) -> torch.Tensor:
    rows = stat.repeat_interleave(like.shape[0] // groups, 0)
    return rows.view(rows.shape[0], rows.shape[1], *([1] * (like.dim() - 2)))


def weight_gradients(stat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``d stat[j, c] / d weight[c]`` for a (G, C) statistic: shape (G, *weight.shape), detached.

    One autograd pass per group, through the convolution only (``weight`` is its leaf); channel ``c``
    of the statistic depends on output channel ``c`` of the convolution only, so summing over channels
    separates them. (``is_grads_batched`` would do the groups in one pass, but breaks on tensor hooks
    such as ``retain_grad`` in the graph.)
    """
    rows = []
    for j in range(stat.shape[0]):
        select = torch.zeros_like(stat)
        select[j] = 1
        rows.append(torch.autograd.grad(stat, weight, select, retain_graph=True)[0])
    return torch.stack(rows)


_CONV_WEIGHT_GRAD = {3: torch.nn.grad.conv1d_weight, 4: torch.nn.grad.conv2d_weight, 5: torch.nn.grad.conv3d_weight}


def _fold(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(G * g, C, ...) as (g, G * C, ...): the groups side by side as channel blocks."""
    return t.unflatten(0, (groups, t.shape[0] // groups)).transpose(0, 1).flatten(1, 2)


def conv_weight_gradients(conv: nn.Module, u: torch.Tensor, x: torch.Tensor, groups: int):
    """``(d mu / d W, d nu / d W)`` per group, shape (G, *W.shape) each, for ``x = conv(u)``, in one weight-gradient
    call per statistic: the groups become channel blocks of a grouped convolution (``G * conv.groups`` groups),
    whose weight gradient holds each group's. ``None`` where the convolution is not plain (string padding, a
    padding mode other than zeros): then :func:`weight_gradients` (autograd) is used."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros" or u.dim() not in _CONV_WEIGHT_GRAD:
        return None
    values = (x.shape[0] // groups) * x[0, 0].numel()
    w = conv.weight
    shape = (groups * w.shape[0],) + tuple(w.shape[1:])
    grad = _CONV_WEIGHT_GRAD[u.dim()]
    options = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}
    options["groups"] = groups * conv.groups
    with torch.no_grad():
        uf = _fold(u.detach().to(x.dtype), groups)
        dmu = grad(uf, shape, torch.full_like(_fold(x, groups), 1.0 / values), **options)
        dnu = grad(uf, shape, _fold(x.detach(), groups) * (2.0 / values), **options)
    return dmu.view(groups, *w.shape), dnu.view(groups, *w.shape)


class _KeepInput:
    """Forward hook of a wired convolution: hands its input to the CBN layer it feeds."""

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def __call__(self, module, args, output):
        self.layer.__dict__["_conv_io"] = (args[0], output)


class _CrossIterationBatchNorm(BatchStatNorm):
    """Base of :class:`CrossIterationBatchNorm1d`/``2d``/``3d`` (the module docstring has the math).

    Args (besides those of :class:`BatchStatNorm`):
        window: past iterations averaged with the current one (the authors' ``buffer_num``, default 3).
        burnin: training iterations of plain BN before the window is used (the authors' ``burnin``,
            in iterations; their configs give 8 epochs of a 12-epoch schedule).
        rho: the Taylor step's factor (1: the full first-order compensation; 0: no compensation).
        invalid: ``"drop"`` (the authors' code) or ``"clamp"`` (the paper) for a window whose
            compensated variance is negative.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        group_size: int | None = None,
        window: int = 3,
        burnin: int = 0,
        rho: float = 1.0,
        invalid: str = "drop",
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, group_size, device, dtype)
        name = type(self).__name__
        self.window = check_window(name, "window", window)
        if not isinstance(burnin, int) or isinstance(burnin, bool) or burnin < 0:
            raise ValueError(f"{name}: burnin must be an int >= 0, got {burnin!r}")
        if invalid not in INVALID:
            raise ValueError(f"{name}: invalid must be one of {', '.join(INVALID)}, got {invalid!r}")
        self.burnin, self.rho, self.invalid = burnin, float(rho), invalid
        self.iterations = 0  # training forwards seen (Python state, as the authors' iter_count)
        self.history: list[tuple] = []  # newest first: (mu, nu, dmu/dW, dnu/dW, W), each detached
        self.__dict__["source"] = None  # the convolution feeding the layer (not a submodule: no state_dict keys)
        self.__dict__["_conv_io"] = None  # that convolution's last (input, output), set by its hook, read once
        self.wiring = "not wired (no convolution given)"
        self._warned = False
        self.last_stats = None
        self.last_used = 0  # past windows used in the last training forward

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, window={self.window}, burnin={self.burnin}, rho={self.rho}, "
            f"invalid={self.invalid}"
        )

    def wire(self, conv: nn.Module | None, why: str) -> None:
        """Take ``conv``'s weight as the compensated one (``why``: where it was found), or, with ``conv``
        None, record why the layer has none (it is then plain BN on the current group)."""
        if conv is not None and (getattr(conv, "out_channels", None) != self.num_features):
            raise ValueError(
                f"{self.label}: its convolution must have {self.num_features} output channels, "
                f"got {type(conv).__name__} with {getattr(conv, 'out_channels', None)}"
            )
        previous = self.__dict__["source"]
        if previous is not None:  # no handle kept: a deep copy's handle would point at the original's hooks
            for key, hook in list(previous._forward_hooks.items()):
                if isinstance(hook, _KeepInput) and hook.layer is self:
                    del previous._forward_hooks[key]
        if conv is not None:
            conv.register_forward_hook(_KeepInput(self))
        self.__dict__["_conv_io"] = None
        self.__dict__["source"] = conv
        self.wiring = why if conv is not None else f"not wired: {why}"
        self._warned = conv is None  # conversion already said why

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.num_batches_tracked is not None:
            self.iterations = int(self.num_batches_tracked)
        self.history = []

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        source, io = self.__dict__["source"], self.__dict__["_conv_io"]
        self.__dict__["_conv_io"] = None  # read once: no activation kept past this forward (deep copies work)
        groups = self._check_input(x)
        if not self._uses_batch_stats():
            return self._normalize_eval(x)
        self._check_enough_values(x, groups)
        if self.training:
            self.iterations += 1
        if weight is None and source is not None:
            weight = source.weight
        if weight is None and self.training and not self._warned:
            self._warned = True
            warnings.warn(f"{self.label} trains without a convolution: plain BN on the current group ({self.wiring})")
        acc = torch.promote_types(x.dtype, torch.float32)
        xa = x.to(acc)
        cur_mu = group_mean(xa, groups)
        active = (
            self.training
            and self.iterations > self.burnin
            and weight is not None
            and weight.requires_grad
            and x.requires_grad
            and torch.is_grad_enabled()
        )
        if active:
            mu, var = self._cross_iteration(x, xa, cur_mu, weight, groups, io)
        else:
            mu, var = cur_mu, grouped(xa, groups).var(dim=(1, *range(3, x.dim() + 1)), correction=0)
            self.last_used = 0
        if self.training and self.track_running_stats:  # BN's: the current group's mean and unbiased variance
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self._ema_factor()
                unbiased = grouped(xa, groups).var(dim=(1, *range(3, x.dim() + 1)), correction=1)
                self.running_mean.mul_(1 - factor).add_(factor * cur_mu.detach().mean(0).to(self.running_mean.dtype))
                self.running_var.mul_(1 - factor).add_(factor * unbiased.mean(0).to(self.running_var.dtype))
        self.last_stats = (mu.detach(), var.detach())
        y = (xa - _per_sample(mu, x, groups)) / _per_sample((var + self.eps).sqrt(), x, groups)
        if self.weight is not None:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            y = y * self.weight.to(acc).view(shape) + self.bias.to(acc).view(shape)
        return y.to(x.dtype)

    def _cross_iteration(self, x, xa, cur_mu, weight, groups, io):
        cur_nu = group_mean(xa * xa, groups)
        source = self.__dict__["source"]
        folded = None
        if source is not None and weight is source.weight and io is not None and io[1] is x:
            folded = conv_weight_gradients(source, io[0], xa, groups)  # the convolution's input: one call each
        if folded is not None:
            dmu, dnu = (d.to(weight.dtype) for d in folded)
        else:
            dmu, dnu = weight_gradients(cur_mu, weight), weight_gradients(cur_nu, weight)
        if self.history and self.history[0][0].shape != cur_mu.shape:
            self.history = []  # the number of groups changed: the histories restart
        w_now = weight.detach()
        dims = tuple(range(2, dmu.dim()))
        mus, nus = [cur_mu], [cur_nu]
        for mu_p, nu_p, dmu_p, dnu_p, w_p in self.history:
            delta = (w_now - w_p).to(dmu_p.dtype).unsqueeze(0)
            mus.append(mu_p + self.rho * (dmu_p * delta).sum(dims))
            nus.append(nu_p + self.rho * (dnu_p * delta).sum(dims))
        mu_all, nu_all = torch.stack(mus), torch.stack(nus)  # (1 + k, G, C)
        if self.invalid == "clamp":
            nu_all = torch.maximum(nu_all, mu_all * mu_all)
            count = torch.full_like(cur_mu, mu_all.shape[0])
            mu, nu = mu_all.sum(0) / count, nu_all.sum(0) / count
        else:
            valid = nu_all - mu_all * mu_all >= 0
            valid[0] = True  # the current group always counts (its variance is >= 0 up to rounding)
            count = valid.sum(0).to(cur_mu.dtype)
            mu = torch.where(valid, mu_all, 0).sum(0) / count
            nu = torch.where(valid, nu_all, 0).sum(0) / count
        self.last_used = mu_all.shape[0] - 1
        entry = (cur_mu.detach(), cur_nu.detach(), dmu, dnu, w_now.clone())
        self.history = [entry] + self.history[: self.window - 1]
        return mu, (nu - mu * mu).clamp_min(0)


class CrossIterationBatchNorm1d(Dims1d, _CrossIterationBatchNorm):
    """CBN over (N, C) or (N, C, L) inputs."""


class CrossIterationBatchNorm2d(Dims2d, _CrossIterationBatchNorm):
    """CBN over (N, C, H, W) inputs (the authors' ``CBatchNorm2d``)."""


class CrossIterationBatchNorm3d(Dims3d, _CrossIterationBatchNorm):
    """CBN over (N, C, D, H, W) inputs."""
