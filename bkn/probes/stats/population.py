"""Population statistics of a network's normalization layers (docs/design.md §9), exactly.

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
sums free of cancellation even where ``|mean| >> std`` (:class:`PooledMoments`).

Layers with batch statistics (``torch.nn.BatchNorm*``, ``SyncBatchNorm`` and every
:class:`bkn.layers.BatchStatNorm`: ghost BN, BRN, BKN) get per-channel statistics.
Per-sample norms (GroupNorm, LayerNorm as GroupNorm(1, C) or ``nn.LayerNorm`` over
(N, C) features, InstanceNorm) have no batch statistics; by default they are left
alone (they normalize each sample as usual and nothing is returned for them). With
``per_sample=True`` they get the statistics that play the same role: the moments over
the axes each of their groups normalizes over (channels of the group and positions),
pooled over the whole data set, returned per channel (equal within a group); the
drift probe uses these for the output discrepancy of GN and LN.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn

from bkn.probes.stats.layer_kinds import is_per_sample_norm, normalization_layers
from bkn.probes.stats.normalizing import Stats, eval_mode, normalizing_with
from bkn.probes.stats.pooled_moments import PooledMoments, pool_over_groups


def population_statistics(
    model: nn.Module, batches: Iterable, progress: bool = False, per_sample: bool = False
) -> Stats:
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
    layers = _layers_to_measure(model, per_sample)
    batches = _materialize(batches)
    device = _device_of(model)
    done: Stats = {}
    bar_context = _progress_bar(batches, len(layers)) if progress else contextlib.nullcontext()
    with _NextLayerProbe(layers, done) as probe, bar_context as bar:
        while len(done) < len(layers):
            seen = _one_pass(model, batches, device, probe, bar)
            if probe.target is None:
                if seen == 0 and not done:
                    raise ValueError("population_statistics: got no batches (an empty evaluation set)")
                break
            mean, var = probe.moments.result()
            module = layers[probe.target]
            if is_per_sample_norm(module):
                mean, var = pool_over_groups(module, mean, var)
            done[probe.target] = (mean, var)
    return done


class _Stop(Exception):
    """Raised by the pre-hook of the layer being measured: the rest of the forward is not needed."""


class _NextLayerProbe:
    """Forward pre-hooks on every layer to measure: the first one without statistics that a pass reaches
    becomes the ``target``; its inputs go into ``moments`` and the forward stops there.

    A context manager: the hooks are registered on entry and removed on exit.
    """

    def __init__(self, layers: dict[str, nn.Module], done: Stats):
        self.layers, self.done = layers, done  # ``done`` grows between passes; measured layers are skipped
        self.target: str | None = None
        self.moments: PooledMoments | None = None
        self._handles: list = []

    def __enter__(self) -> "_NextLayerProbe":
        self._handles = [
            m.register_forward_pre_hook(lambda mod, args, n=name: self._pre_hook(mod, args, n))
            for name, m in self.layers.items()
        ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self) -> None:
        """Before a pass: no target yet."""
        self.target, self.moments = None, None

    def _pre_hook(self, module: nn.Module, args: tuple, name: str) -> None:
        if name in self.done:
            return None
        x = args[0]
        if self.target is None:
            self.target, self.moments = name, PooledMoments()
            _check_input(name, module, x)
        elif self.target != name:
            raise ValueError(
                f"population_statistics: the normalization layers do not run in the same order "
                f"for every batch ({name!r} ran before {self.target!r} in a later batch); "
                f"data-dependent control flow is not supported"
            )
        self.moments.add(x)
        raise _Stop


def _one_pass(model: nn.Module, batches: Iterable, device, probe: _NextLayerProbe, bar) -> int:
    """One pass over ``batches``, the layers measured so far normalizing with their statistics.

    Returns the number of batches that reached the probe's target (0 with no target: the
    forward reaches no layer that is left to measure). ``bar``: a tqdm bar or ``None``.
    """
    probe.reset()
    seen = 0
    with eval_mode(model), normalizing_with(model, dict(probe.done)):
        for batch in batches:
            x = _input_of(batch)
            if device is not None:
                x = x.to(device)
            try:
                model(x)
            except _Stop:
                pass
            else:
                if probe.target is None:
                    break  # the forward reaches no layer without statistics: the rest never run
                raise ValueError(
                    f"population_statistics: layer {probe.target!r} ran for some "
                    f"batches but not for others; data-dependent control flow is not "
                    f"supported"
                )
            seen += 1
            if bar is not None:
                bar.update(1)
    return seen


def _layers_to_measure(model: nn.Module, per_sample: bool) -> dict[str, nn.Module]:
    layers = normalization_layers(model, per_sample=per_sample)
    if not layers:
        kinds = (
            "normalization layers"
            if per_sample
            else "normalization layers with batch statistics (BatchNorm, ghost BN, BRN, BKN)"
        )
        raise ValueError(f"population_statistics: {type(model).__name__} has no {kinds}; nothing to compute")
    return layers


def _check_input(name: str, module: nn.Module, x: torch.Tensor) -> None:
    if isinstance(module, nn.LayerNorm) and (x.dim() != 2 or tuple(module.normalized_shape) != (x.shape[1],)):
        raise ValueError(
            f"population statistics: LayerNorm {name!r} is supported over (N, C) features "
            f"only (normalized_shape == (C,)); got input of shape {tuple(x.shape)} and "
            f"normalized_shape {tuple(module.normalized_shape)} (use GroupNorm(1, C) for "
            f"conv features)"
        )
    if x.dim() < 2:
        raise ValueError(f"population statistics: layer {name!r} got a {x.dim()}-d input; expected (N, C, ...)")


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
    raise ValueError(
        f"population_statistics: each batch must be a tensor or a (inputs, ...) tuple/list, got {type(batch).__name__}"
    )


def _device_of(model: nn.Module) -> torch.device | None:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return None


def _progress_bar(batches: Iterable, passes: int):
    """A tqdm bar over passes x batches (no total where ``batches`` has no length)."""
    from tqdm.auto import tqdm

    try:
        total_batches = len(batches)  # type: ignore[arg-type]
    except TypeError:
        total_batches = None
    return tqdm(
        total=None if total_batches is None else total_batches * passes,
        desc="population statistics",
        unit="batch",
        leave=False,
    )


__all__ = ["population_statistics"]
