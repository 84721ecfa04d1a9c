"""Population statistics of a network's normalization layers (spec section 4), exactly.

The *population statistics* of normalization layer k are the per-channel mean and
(biased) variance of its input over the whole evaluation set, with every earlier
normalization layer normalizing with *its* population statistics. They are what an
ideal BatchNorm would normalize with at inference, and the reference the accuracy
probes measure every method's estimates against.

How they are computed (the same estimator as fvcore's ``update_bn_stats`` / "precise
BN", but exact rather than an average of batch statistics)::

    for each normalization layer k, in execution order:
        one pass over all batches, the model in eval mode, where
          * layers 0..k-1 normalize with the population statistics found so far
            (a forward hook replaces their output by F.batch_norm(x, mean, var, ...)),
          * a forward pre-hook on layer k accumulates, in float64, the pooled
            per-channel sums of (x - shift) and (x - shift)^2 over samples and positions,
            then aborts the rest of the forward (nothing after layer k is needed);
        mean = S1 / n + shift,  var = S2 / n - (S1 / n)^2     (pooled, not a mean of batch variances)

so the cost is about L/2 full passes for L layers. The execution order is discovered
as it goes (the first layer without statistics that the forward reaches is the next
one), so any model works: ``bkn.convert``-ed torchvision models, ``bkn.models``,
nested ``nn.Sequential``. ``shift`` is the first batch's mean, which keeps the float64
sums free of cancellation even where ``|mean| >> std``.

Layers with batch statistics (``torch.nn.BatchNorm*``, ``SyncBatchNorm`` and every
:class:`bkn.layers.BatchStatNorm`: ghost BN, BRN, BKN) get per-channel statistics.
Per-sample norms (GroupNorm, LayerNorm as GroupNorm(1, C) or ``nn.LayerNorm`` over
(N, C) features, InstanceNorm) have no batch statistics; by default they are left
alone (they normalize each sample as usual and nothing is returned for them). With
``per_sample=True`` they get the statistics that play the same role: the moments over
the axes each of their groups normalizes over (channels of the group and positions),
pooled over the whole data set, returned per channel (equal within a group); the
accuracy probes use these for the output discrepancy of GN and LN.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import BatchStatNorm

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]

BATCH_NORMS: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm, BatchStatNorm)
PER_SAMPLE_NORMS: tuple[type, ...] = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def is_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` normalizes with batch statistics in training mode (BN, ghost BN, BRN, BKN)."""
    return isinstance(module, BATCH_NORMS)


def is_per_sample_norm(module: nn.Module) -> bool:
    """Whether ``module`` normalizes each sample on its own (GroupNorm, LayerNorm, InstanceNorm)."""
    return isinstance(module, PER_SAMPLE_NORMS)


def normalization_layers(model: nn.Module, per_sample: bool = True) -> dict[str, nn.Module]:
    """Normalization layers of ``model`` by module name (registration order, not execution order)."""
    return {name: m for name, m in model.named_modules()
            if is_batch_norm(m) or (per_sample and is_per_sample_norm(m))}


class _Stop(Exception):
    """Raised by the pre-hook of the layer being measured: the rest of the forward is not needed."""


class _PooledMoments:
    """Pooled per-channel mean and biased variance of (N, C, *S) tensors, accumulated in float64."""

    def __init__(self):
        self.count = 0
        self.shift = self.s1 = self.s2 = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64)
        dims = [0] + list(range(2, x.dim()))
        if self.shift is None:
            self.shift = x.mean(dims)
            self.s1 = torch.zeros_like(self.shift)
            self.s2 = torch.zeros_like(self.shift)
        centred = x - self.shift.view([1, -1] + [1] * (x.dim() - 2))
        self.s1 += centred.sum(dims)
        self.s2 += centred.square().sum(dims)
        self.count += x.numel() // x.shape[1]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        m1 = self.s1 / self.count
        return m1 + self.shift, (self.s2 / self.count - m1 * m1).clamp_min(0)


def _groups_of(module: nn.Module, channels: int) -> int:
    """How many groups of channels a per-sample norm normalizes together (C for InstanceNorm)."""
    if isinstance(module, nn.GroupNorm):
        return module.num_groups
    if isinstance(module, nn.LayerNorm):
        return 1
    return channels  # InstanceNorm: every channel on its own


def _per_sample_stats(module: nn.Module, mean: torch.Tensor, var: torch.Tensor):
    """Per-channel pooled moments -> the moments over each group's channels, repeated per channel.

    Channels of a group hold equally many values, so by the law of total variance the group's
    variance is the mean of the channel variances plus the variance of the channel means.
    """
    groups = _groups_of(module, mean.numel())
    m = mean.view(groups, -1)
    group_mean = m.mean(1, keepdim=True)
    group_var = var.view(groups, -1).mean(1, keepdim=True) + (m - group_mean).square().mean(1, keepdim=True)
    size = m.shape[1]
    return group_mean.expand(groups, size).reshape(-1), group_var.expand(groups, size).reshape(-1)


def _check_input(name: str, module: nn.Module, x: torch.Tensor) -> None:
    if isinstance(module, nn.LayerNorm) and (x.dim() != 2 or tuple(module.normalized_shape) != (x.shape[1],)):
        raise ValueError(f"population statistics: LayerNorm {name!r} is supported over (N, C) features "
                         f"only (normalized_shape == (C,)); got input of shape {tuple(x.shape)} and "
                         f"normalized_shape {tuple(module.normalized_shape)} (use GroupNorm(1, C) for "
                         f"conv features)")
    if x.dim() < 2:
        raise ValueError(f"population statistics: layer {name!r} got a {x.dim()}-d input; "
                         f"expected (N, C, ...)")


def normalize_with(module: nn.Module, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``module``'s output had it normalized ``x`` with per-channel ``(mean, var)``.

    That is ``gamma (x - m) / sqrt(v + eps) + beta`` with the module's affine and ``eps``.
    """
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), weight, bias, False, 0.0, module.eps)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode under ``no_grad``; every module's training flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def normalizing_with(model: nn.Module, stats: Stats) -> Iterator[nn.Module]:
    """Within the block, each layer named in ``stats`` normalizes with those statistics (forward hooks).

    Works for any normalization layer, including ones without running estimates and
    per-sample norms (whose statistics are then used as per-channel constants).
    """
    modules = dict(model.named_modules())
    handles = []
    try:
        for name, (mean, var) in stats.items():
            module = modules.get(name)
            if module is None:
                raise ValueError(f"normalizing_with: the model has no module named {name!r}")
            handles.append(module.register_forward_hook(
                lambda mod, args, out, m=mean, v=var: normalize_with(mod, args[0], m, v)))
        yield model
    finally:
        for h in handles:
            h.remove()


def _materialize(batches: Iterable) -> Iterable:
    """Batches must be iterated once per layer: a one-shot iterator (generator) is kept in a list."""
    if iter(batches) is batches:
        return list(batches)
    return batches


def _input_of(batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise ValueError(f"population_statistics: each batch must be a tensor or a (inputs, ...) tuple/list, "
                     f"got {type(batch).__name__}")


def _device_of(model: nn.Module) -> torch.device | None:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return None


def population_statistics(model: nn.Module, batches: Iterable, progress: bool = False,
                          per_sample: bool = False) -> Stats:
    """Exact population statistics of every normalization layer of ``model``, layer by layer.

    Args:
        model: any ``nn.Module``; it is run in eval mode under ``no_grad`` and left as it
            was (training flags, running estimates and parameters are not changed).
        batches: the evaluation set, a re-iterable of input tensors or ``(inputs, targets, ...)``
            tuples (a list, a ``DataLoader`` without random augmentation); it is iterated
            once per layer and must yield the same data each time. A one-shot iterator is
            materialised into a list first.
        progress: show a tqdm progress bar (passes x batches).
        per_sample: also return statistics for GroupNorm/LayerNorm/InstanceNorm layers
            (moments over each group's axes pooled over the data set, per channel), and let
            them normalize with those in the later passes; default ``False``, as the
            population-statistics contract has it (per-sample norms are left alone).

    Returns:
        ``{module name: (mean, var)}``, float64 tensors of shape (C,) on the model's
        device: the pooled mean and biased variance of the layer's input, in execution
        order. Layers that the forward never reaches are left out.

    Raises:
        ValueError: the model has no normalization layer (with batch statistics, unless
            ``per_sample``), ``batches`` is empty or not made of tensors, or the layers do
            not run in the same order for every batch.
    """
    layers = normalization_layers(model, per_sample=per_sample)
    if not layers:
        kinds = ("normalization layers" if per_sample
                 else "normalization layers with batch statistics (BatchNorm, ghost BN, BRN, BKN)")
        raise ValueError(f"population_statistics: {type(model).__name__} has no {kinds}; nothing to compute")
    batches = _materialize(batches)
    device = _device_of(model)
    try:
        total_batches = len(batches)  # type: ignore[arg-type]
    except TypeError:
        total_batches = None

    done: Stats = {}
    state = {"target": None, "moments": None}

    def pre_hook(module, args, name):
        if name in done:
            return None
        x = args[0]
        if state["target"] is None:
            state["target"], state["moments"] = name, _PooledMoments()
            _check_input(name, module, x)
        elif state["target"] != name:
            raise ValueError(f"population_statistics: the normalization layers do not run in the same order "
                             f"for every batch ({name!r} ran before {state['target']!r} in a later batch); "
                             f"data-dependent control flow is not supported")
        state["moments"].add(x)
        raise _Stop

    handles = [m.register_forward_pre_hook(lambda mod, args, n=name: pre_hook(mod, args, n))
               for name, m in layers.items()]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=None if total_batches is None else total_batches * len(layers),
                   desc="population statistics", unit="batch", leave=False)
    try:
        while len(done) < len(layers):
            state["target"], state["moments"] = None, None
            seen = 0
            with eval_mode(model), normalizing_with(model, dict(done)):
                for batch in batches:
                    x = _input_of(batch)
                    if device is not None:
                        x = x.to(device)
                    try:
                        model(x)
                    except _Stop:
                        pass
                    else:
                        if state["target"] is None:
                            break  # the forward reaches no layer without statistics: the rest never run
                        raise ValueError(f"population_statistics: layer {state['target']!r} ran for some "
                                         f"batches but not for others; data-dependent control flow is not "
                                         f"supported")
                    seen += 1
                    if bar is not None:
                        bar.update(1)
            if state["target"] is None:
                if seen == 0 and not done:
                    raise ValueError("population_statistics: got no batches (an empty evaluation set)")
                break
            name = state["target"]
            mean, var = state["moments"].result()
            module = layers[name]
            if is_per_sample_norm(module):
                mean, var = _per_sample_stats(module, mean, var)
            done[name] = (mean, var)
    finally:
        for h in handles:
            h.remove()
        if bar is not None:
            bar.close()
    return done


def use_population_statistics(model: nn.Module, stats: Stats) -> nn.Module:
    """Write ``stats`` (from :func:`population_statistics`) into the layers' running estimates.

    ``running_mean``/``running_var`` are overwritten (cast to their dtype); Batch
    Renormalization's moving std is synced from the variance, so eval mode normalizes
    with exactly these statistics. Returns ``model``.

    Raises ``ValueError`` for a name that is not a module of ``model``, a module that is
    not a batch-statistic norm or keeps no running estimates, or statistics of the wrong shape.
    """
    modules = dict(model.named_modules())
    for name, (mean, var) in stats.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"use_population_statistics: the model has no module named {name!r}")
        if not is_batch_norm(module):
            raise ValueError(f"use_population_statistics: {name!r} is a {type(module).__name__}, which "
                             f"keeps no running estimates; expected a batch-statistic norm "
                             f"(BN, ghost BN, BRN, BKN)")
        if getattr(module, "running_mean", None) is None:
            raise ValueError(f"use_population_statistics: {name!r} has no running estimates "
                             f"(track_running_stats=False)")
        expected = tuple(module.running_mean.shape)
        if tuple(mean.shape) != expected or tuple(var.shape) != expected:
            raise ValueError(f"use_population_statistics: statistics for {name!r} must have shape "
                             f"{expected}, got mean {tuple(mean.shape)} and var {tuple(var.shape)}")
        if not bool(torch.isfinite(mean).all() and torch.isfinite(var).all() and (var >= 0).all()):
            raise ValueError(f"use_population_statistics: statistics for {name!r} must be finite "
                             f"with var >= 0")
        with torch.no_grad():
            module.running_mean.copy_(mean)
            module.running_var.copy_(var)
            if hasattr(module, "sync_running_std"):  # BRN: eval normalizes with its moving std
                module.sync_running_std()
    return model


__all__ = ["population_statistics", "use_population_statistics", "normalization_layers", "normalizing_with",
           "normalize_with", "eval_mode", "is_batch_norm", "is_per_sample_norm", "Stats"]
