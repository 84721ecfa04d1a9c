"""Rules for the structural ops of real networks: slices, splits, reshapes, gates, means, upsampling, drop-path.

Shared by both transitions (docs/design.md §5). A surrogate (:class:`~bkn.transitions.Sample`,
the ``official`` transitions) goes through the op itself, as the real activations do; a pair
of per-(group, channel) moments (:class:`~bkn.transitions.Moments`, ``analytic``, or a
surrogate that met moments on the way) goes through the closed form below. Every closed
form treats positions as independent draws of the channel's distribution, the assumption
of the rest of the chain.

* ``getitem``, ``split``, ``chunk``: a channel slice keeps the sliced channels' moments; a
  spatial slice keeps the moments and shrinks the spatial size.
* reshapes (``view``, ``reshape``, ``transpose``, ``permute``, ``flatten``, ``unflatten``,
  ``squeeze``, ``unsqueeze``): moments follow a :class:`Layout` (the base moments and a map
  from each element to its channel, to which the same op is applied); where the result is
  read as (batch, channels, positions) again, each new channel must come from one base channel
  (a channel shuffle does), else the rule is refused.
* ``mul`` of two states where one is a gate, one value per sample and channel
  (squeeze-and-excitation's ``x * s``): independent factors,
  ``E = ma mb``, ``Var = va vb + va mb^2 + vb ma^2``; the gate's own moments come from its branch
  (the spatial mean has variance ``v / positions``). ``mul``/``div``/``add`` with a number or a
  per-channel tensor: affine in each channel, exact.
* ``mean`` over positions: mean kept, variance divided by the number of positions averaged.
* ``interpolate`` (nearest, linear, bilinear, trilinear, area): each output position is a
  weighted mean of input positions with weights summing to 1, so the mean is kept and the
  variance is ``v`` times the average over output positions of the sum of squared weights
  (per axis, from the 1-D weights torch itself computes; nearest: 1).
* ``stochastic_depth`` / drop-path in training, ``Y = B X / (1 - p)``, ``B ~ Bernoulli(1 - p)``:
  ``E Y = m``, ``E Y^2 = (v + m^2) / (1 - p)`` (exact); a surrogate is rescaled about its mean to
  that variance (one draw per group would make a random drop all noise).
* functional ``conv1d/2d/3d`` with a weight tensor: the convolution rule of the modules.
* spatial ``pad``: reflect, replicate and circular copy positions (moments kept); a constant
  ``c`` mixes a share ``f`` of constant positions in: ``E = (1 - f) m + f c``,
  ``E2 = (1 - f)(v + m^2) + f c^2``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .analytic import Analytic, Unsupported
from .state import Moments, Sample

LAYOUT = ("view", "reshape", "transpose", "permute", "flatten", "unflatten", "squeeze", "unsqueeze", "swapaxes")
RULES = (*LAYOUT, "getitem", "split", "chunk", "mul", "div", "add_scalar", "mean", "interpolate", "drop_path", "conv")


@dataclass
class Layout:
    """Moments seen through reshapes: ``base`` (G, C) moments, ``index`` (1, ...) the base channel of each element."""

    base: Moments
    index: torch.Tensor

    @property
    def shape(self) -> tuple:
        return (None, *self.index.shape[1:])

    def settle(self) -> Moments:
        """Back to (group, channel) moments: each channel of ``index`` must hold one base channel."""
        index = self.index
        if index.dim() < 2:
            raise Unsupported(f"a reshape to {tuple(self.shape)} (no channel dimension)")
        flat = index.reshape(index.shape[0], index.shape[1], -1)
        if flat.shape[-1] and not bool((flat == flat[..., :1]).all()):
            raise Unsupported("a reshape that mixes channels with positions")
        channels = flat[0, :, 0].to(self.base.mean.device, non_blocking=True)
        mean, var = self.base.mean[..., channels], self.base.var[..., channels]
        return Moments(mean, var, tuple(index.shape[2:]))


def settle(state):
    """A state ready for the other rules: a :class:`Layout` becomes moments again."""
    return state.settle() if isinstance(state, Layout) else state


def _moments(state) -> Moments:
    state = settle(state)
    return state.moments() if isinstance(state, Sample) else state


def _is_state(value) -> bool:
    return isinstance(value, (Sample, Moments, Layout))


def _batch(value, size: int):
    """Shape arguments with the batch (``None``: not a statistic) replaced by ``size``."""
    if value is None:
        return size
    if isinstance(value, (tuple, list)):
        return type(value)(_batch(v, size) for v in value)
    return value


def _layout(rule: str, state, args: tuple, kwargs: dict):
    rule = "reshape" if rule == "view" else rule  # the same result; states need not be contiguous as the real one is
    if isinstance(state, Sample):
        value = getattr(state.value, rule)(*_batch(args, state.value.shape[0]), **kwargs)
        if value.shape[0] != state.value.shape[0]:
            raise Unsupported(f"{rule} that changes the batch dimension")
        return Sample(value, state.draws)
    if not isinstance(state, Layout):
        state = _moments(state)
        shape = (1, state.channels, *state.spatial)
        # On the host whatever the device: a map of shapes, checked without waiting for the accelerator.
        index = torch.arange(state.channels).view(1, -1, *(1,) * len(state.spatial))
        state = Layout(state, index.expand(shape))
    index = getattr(state.index, rule)(*_batch(args, 1), **kwargs)
    if index.dim() == 0 or index.shape[0] != 1:
        raise Unsupported(f"{rule} that changes the batch dimension")
    return Layout(state.base, index)


def _full_index(index, dims: int) -> tuple:
    """``index`` as one entry per dimension (``...`` expanded, missing trailing entries ``:``)."""
    index = index if isinstance(index, tuple) else (index,)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (dims - len(index) + 1) + index[at + 1 :]
    return index + (slice(None),) * (dims - len(index))


def _getitem(state, index):
    if isinstance(state, (tuple, list)):  # an element of a split's or a chunk's result
        return state[index]
    if isinstance(state, Sample) and isinstance(state.value, (tuple, list)):  # a module's tuple of surrogates
        value = state.value[index]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise Unsupported(f"element {index!r} of a module's outputs is not activations")
        return Sample(value, state.draws)
    dims = state.value.dim() if isinstance(state, Sample) else 2 + len(_moments(state).spatial)
    index = _full_index(index, dims)
    if len(index) != dims or index[0] != slice(None) or not all(isinstance(i, slice) for i in index):
        raise Unsupported(f"indexing {index!r} (slices of channels and positions are modelled)")
    if isinstance(state, Sample):
        return Sample(state.value[index], state.draws)
    state = _moments(state)
    spatial = tuple(len(range(n)[s]) for n, s in zip(state.spatial, index[2:]))
    return Moments(state.mean[..., index[1]], state.var[..., index[1]], spatial)


def _split(rule: str, state, sections, dim=0):
    dim = dim if dim >= 0 else dim + 2 + len(_moments(state).spatial if not isinstance(state, Sample) else ())
    if isinstance(state, Sample):
        if dim == 0:
            raise Unsupported(f"{rule} of the batch dimension")
        parts = getattr(state.value, rule)(sections, dim)
        return tuple(Sample(p, state.draws) for p in parts)
    state = _moments(state)
    if dim != 1:
        raise Unsupported(f"{rule} along dim {dim} (channels are modelled)")
    index = torch.arange(state.channels)
    parts = getattr(index, rule)(sections, 0)
    return tuple(Moments(state.mean[..., p], state.var[..., p], state.spatial) for p in parts)


def _per_channel(value, channels: int) -> torch.Tensor | float:
    """A number, or a tensor broadcast over channels only (shape (C, 1, ...), (1, C, 1, ...) or one element)."""
    if isinstance(value, numbers.Number):
        return float(value)
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return value.reshape(())
        shape = [s for s in value.shape]
        while shape and shape[0] == 1 and len(shape) > 1 and shape.count(channels) == 1 and shape[0] != channels:
            shape.pop(0)
        if shape and shape[0] == channels and all(s == 1 for s in shape[1:]):
            return value.reshape(channels)
    raise Unsupported(f"a product with {type(value).__name__} {getattr(value, 'shape', value)} (not per channel)")


def _spatial(a: Moments, b: Moments) -> tuple:
    for s in (a.spatial, b.spatial):
        if s and math.prod(s) != 1:
            return s
    return a.spatial or b.spatial


def _mul(a, b):
    if not _is_state(a):
        a, b = b, a
    if isinstance(a, Sample) and isinstance(b, Sample):
        return Sample(a.value * b.value, a.draws)
    if isinstance(a, Sample) and not _is_state(b):
        return Sample(a.value * b, a.draws)
    a = _moments(a)
    if not _is_state(b):
        c = _per_channel(b, a.channels)
        return Moments(a.mean * c, a.var * c * c, a.spatial)
    b = _moments(b)
    if all(s and math.prod(s) != 1 for s in (a.spatial, b.spatial)):
        raise Unsupported(
            "a product of two activations at the same positions (correlated factors are not modelled in closed "
            "form; a gate of one value per sample and channel is)"
        )
    if a.channels != b.channels and 1 not in (a.channels, b.channels):
        raise Unsupported(f"product of {a.channels} and {b.channels} channels")
    mean = a.mean * b.mean
    var = a.var * b.var + a.var * b.mean.square() + b.var * a.mean.square()
    return Moments(mean, var, _spatial(a, b))


def _affine_scalar(state, add, scale=1.0):
    if isinstance(state, Sample):
        return Sample(state.value * scale + add, state.draws)
    state = _moments(state)
    add = _per_channel(add, state.channels)
    return Moments(state.mean * scale + add, state.var * scale * scale, state.spatial)


def _mean(state, dim=None, keepdim=False, **kwargs):
    if kwargs.get("dtype") is not None:
        raise Unsupported("mean with a dtype")
    if isinstance(state, Sample):
        if dim is None:
            raise Unsupported("mean over the batch")
        return Sample(state.value.mean(dim, keepdim=keepdim), state.draws)
    state = _moments(state)
    rank = 2 + len(state.spatial)
    dims = {d % rank for d in (dim if isinstance(dim, (tuple, list)) else (dim,))} if dim is not None else {0}
    if dims & {0, 1}:
        raise Unsupported(f"mean over dims {sorted(dims)} (means over positions are modelled)")
    area = math.prod(state.spatial[d - 2] for d in dims)
    spatial = tuple(1 if d + 2 in dims else s for d, s in enumerate(state.spatial) if keepdim or d + 2 not in dims)
    return Moments(state.mean, state.var / area, spatial)


_ONE_AXIS = {"nearest": "nearest", "nearest-exact": "nearest-exact", "area": "area"}
_ONE_AXIS.update(dict.fromkeys(("linear", "bilinear", "trilinear"), "linear"))


def interpolation_variance_factor(spatial, size=None, scale_factor=None, mode="nearest", align_corners=None, **kw):
    """(output spatial size, average over output positions of the sum of squared interpolation weights)."""
    if mode not in _ONE_AXIS:
        raise Unsupported(f"{mode} interpolation (nearest, linear, bilinear, trilinear and area are modelled)")
    if kw.get("antialias"):
        raise Unsupported("antialiased interpolation")
    n = len(spatial)
    sizes = size if isinstance(size, (tuple, list)) else (size,) * n
    scales = scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor,) * n
    out, factor = [], 1.0
    for length, s, k in zip(spatial, sizes, scales):
        eye = torch.eye(length, dtype=torch.float64).unsqueeze(1)  # (input position, 1, input position)
        options = {"align_corners": align_corners} if _ONE_AXIS[mode] == "linear" else {}
        weights = F.interpolate(
            eye,
            size=s,
            scale_factor=k,
            mode=_ONE_AXIS[mode],
            recompute_scale_factor=kw.get("recompute_scale_factor"),
            **options,
        )[:, 0]  # (input position, output position): the weights
        out.append(weights.shape[-1])
        factor *= float(weights.square().sum(0).mean())
    return tuple(out), factor


def _interpolate(state, size=None, scale_factor=None, mode="nearest", align_corners=None, **kw):
    if isinstance(state, Sample):
        value = F.interpolate(state.value, size, scale_factor, mode, align_corners, **kw)
        return Sample(value, state.draws)
    state = _moments(state)
    spatial, factor = interpolation_variance_factor(state.spatial, size, scale_factor, mode, align_corners, **kw)
    return Moments(state.mean, state.var * factor, spatial)


def drop_path_moments(mean, var, p: float):
    """Exact moments of ``B X / (1 - p)``, ``B ~ Bernoulli(1 - p)`` independent of ``X ~ (mean, var)``."""
    if p >= 1:
        return torch.zeros_like(mean), torch.zeros_like(var)
    return mean, (var + mean.square()) / (1 - p) - mean.square()


def _drop_path(state, p, mode="row", training=True):
    if not 0 <= p <= 1:
        raise Unsupported(f"drop probability {p}")
    if p == 0:
        return state
    if isinstance(state, Sample):
        m = state.moments()
        target_mean, target_var = drop_path_moments(m.mean, m.var, p)
        if p >= 1:
            return Sample(torch.zeros_like(state.value), state.draws)
        ratio = (target_var / m.var.clamp_min(1e-12)).sqrt()
        view = (m.mean.shape[0], 1, m.mean.shape[1]) + (1,) * (state.value.dim() - 2)
        value = state.value.reshape(m.mean.shape[0], state.draws, *state.value.shape[1:])
        value = (value - m.mean.view(view)) * ratio.view(view) + target_mean.view(view)
        return Sample(value.reshape(state.value.shape), state.draws)
    state = _moments(state)
    return Moments(*drop_path_moments(state.mean, state.var, p), state.spatial)


def _conv(transition, state, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    if not isinstance(weight, torch.Tensor) or (bias is not None and not isinstance(bias, torch.Tensor)):
        raise Unsupported("a convolution whose weight is not a tensor of the model")
    n = weight.dim() - 2
    if isinstance(state, Sample):
        conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
        value = state.value.to(weight.dtype) if weight.is_floating_point() else state.value
        return Sample(conv(value, weight, bias, stride, padding, dilation, groups), state.draws)
    spec = SimpleNamespace(
        weight=weight,
        bias=bias,
        groups=groups,
        kernel_size=tuple(weight.shape[2:]),
        stride=stride if isinstance(stride, (tuple, list)) else (stride,) * n,
        padding=padding if isinstance(padding, (str, tuple, list)) else (padding,) * n,
        dilation=dilation if isinstance(dilation, (tuple, list)) else (dilation,) * n,
    )
    return Analytic.conv(transition, spec, _moments(state))


def pad_spatial(state, pad, mode="constant", value=0.0):
    """Padding of positions only (``pad``: F.pad's amounts, the last dims first)."""
    if isinstance(state, Sample):
        return Sample(F.pad(state.value, pad, mode=mode, value=value if mode == "constant" else None), state.draws)
    state = _moments(state)
    n = len(state.spatial)
    amounts = list(pad) + [0] * (2 * n - len(pad))
    spatial = list(state.spatial)
    for i in range(len(pad) // 2):
        spatial[n - 1 - i] += amounts[2 * i] + amounts[2 * i + 1]
    spatial = tuple(spatial)
    if mode != "constant":
        return Moments(state.mean, state.var, spatial)
    kept = math.prod(state.spatial) / math.prod(spatial)
    c = float(value or 0.0)
    mean = kept * state.mean + (1 - kept) * c
    second = kept * (state.var + state.mean.square()) + (1 - kept) * c * c
    return Moments(mean, (second - mean.square()).clamp_min(0), spatial)


def apply(transition, rule: str, args: tuple, kwargs: dict):
    """The state after structural op ``rule`` (a name of :data:`RULES`) called with ``args``, ``kwargs``
    (states, tensors of the model, numbers; the batch size is ``None``). Arguments the op itself refuses
    raise :class:`Unsupported` naming the error, never the error itself: a prior is not worth a failed step."""
    try:
        return _apply(transition, rule, args, kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise Unsupported(f"{rule} with these arguments ({type(err).__name__}: {str(err).splitlines()[0]})") from None


def _apply(transition, rule: str, args: tuple, kwargs: dict):
    if rule not in LAYOUT:
        args = tuple(settle(a) for a in args)
        kwargs = {k: settle(v) for k, v in kwargs.items()}
    if rule in LAYOUT:
        return _layout(rule, args[0], args[1:], kwargs)
    if rule == "getitem":
        return _getitem(*args)
    if rule in ("split", "chunk"):
        if rule == "split":
            sections = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections", kwargs.get("split_size"))
        else:
            sections = args[1] if len(args) > 1 else kwargs.get("chunks")
        return _split(rule, args[0], sections, args[2] if len(args) > 2 else kwargs.get("dim", 0))
    if rule == "mul":
        return _mul(*args)
    if rule == "div":
        if _is_state(args[1]) or not isinstance(args[1], numbers.Number) or kwargs.get("rounding_mode"):
            raise Unsupported("division by a tensor or with rounding (division by a number is modelled)")
        return _affine_scalar(args[0], 0.0, 1.0 / args[1])
    if rule == "add_scalar":
        state, other = args if _is_state(args[0]) else args[::-1]
        return _affine_scalar(state, other * kwargs.get("alpha", 1) if isinstance(other, numbers.Number) else other)
    if rule == "mean":
        return _mean(*args, **kwargs)
    if rule == "interpolate":
        return _interpolate(*args, **kwargs)
    if rule == "drop_path":
        return _drop_path(*args, **kwargs)
    if rule == "conv":
        return _conv(transition, *args, **kwargs)
    raise Unsupported(f"no rule {rule!r}")
