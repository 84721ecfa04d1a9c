"""Whole training steps as CUDA graphs: capture, replay, and a check that replay equals eager.

A CUDA graph records every kernel of one step once and replays them with one launch: the
host work and the launch gaps of a micro-batch step go away. :class:`GraphedStep` does it the
way torch's documentation does for a whole network (``torch.cuda.graphs``): a few warm-up steps
on a side stream (so that lazily built state, the optimizer's momentum buffers and cuDNN's
algorithm choices exist before the capture), then one step captured into a
:class:`torch.cuda.CUDAGraph` whose inputs and outputs are fixed tensors; :meth:`GraphedStep.replay`
runs it again. The step must be a callable with no arguments (e.g. :class:`bkn.probes.measure.TrainStep`)
that reads its batch from fixed tensors.

Capture is impossible when the step

* touches CPU tensors (a graph records CUDA work only): :func:`check_devices` names them;
* synchronises with the host (``.item()``, ``float(t)``, ``bool(t)``, a tensor in an ``if``,
  a blocking copy): the first warm-up step runs under
  :class:`bkn.probes.dispatch_count.DispatchCounter`, which records the Python stack of every
  ``aten._local_scalar_dense``, and the second under ``torch.cuda.set_sync_debug_mode("error")``,
  which raises on blocking copies; either becomes a :class:`GraphCaptureError` that names the
  line. The stack check runs on any device, so it is tested on the CPU.

:func:`compare_with_eager` runs the same step on two copies of one model, eagerly and as graph
replays, from the same random state, and returns the largest relative difference of the losses,
parameters and buffers (docs/gpu.md).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .dispatch_count import DispatchCounter


class GraphCaptureError(RuntimeError):
    """A step cannot be captured as a CUDA graph; the message says why and where."""


def check_devices(tensors: dict[str, torch.Tensor], what: str = "the step") -> None:
    """GraphCaptureError naming every tensor in ``tensors`` (name -> tensor) that is not on a CUDA device."""
    off = [f"{name} ({t.device})" for name, t in tensors.items() if t.device.type != "cuda"]
    if off:
        shown = ", ".join(off[:5]) + (f" and {len(off) - 5} more" if len(off) > 5 else "")
        raise GraphCaptureError(
            f"{what} cannot be captured as a CUDA graph: a graph records CUDA work only, and these tensors are "
            f"not on a CUDA device: {shown}; move the model and the batch to CUDA first (.cuda())"
        )


def model_tensors(model: nn.Module, *batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers and the batch tensors, by name (for :func:`check_devices`)."""
    named = {f"parameter {n}": p for n, p in model.named_parameters()}
    named.update({f"buffer {n}": b for n, b in model.named_buffers()})
    named.update({f"batch tensor {i}": t for i, t in enumerate(batch)})
    return named


def find_host_syncs(step, what: str = "the step"):
    """Run ``step()`` once under a :class:`DispatchCounter`; GraphCaptureError naming the first host sync's
    stack (innermost frames last) if there is one. Returns the step's result otherwise. Any device."""
    counter = DispatchCounter(stacks=True, depth=6)
    with counter:
        result = step()
    if counter.syncs:
        raise GraphCaptureError(
            f"{what} cannot be captured as a CUDA graph: it synchronises with the host {len(counter.syncs)} "
            f"time(s) per step (a tensor's value read on the CPU: .item(), float(), int(), bool(), a tensor in "
            f"an `if`). The first one, innermost frame last:\n{counter.syncs[0]}"
        )
    return result


def _first_frame_of(exc: BaseException) -> str:
    """The innermost traceback frame outside torch's own files: where in our code ``exc`` started."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    return f"{frames[-1].filename}:{frames[-1].lineno} {frames[-1].name}" if frames else "(no frame outside torch)"


class GraphedStep:
    """``step`` (no arguments, CUDA tensors only) captured as a CUDA graph; :meth:`replay` runs it again.

    ``warmup`` (>= 2) eager steps run first on a side stream: the first under the host-sync
    counter, the second under ``set_sync_debug_mode("error")``. ``tensors`` (name -> tensor):
    what the step reads, checked to be on CUDA before anything runs. ``self.output`` is the
    captured step's return value (the static loss tensor), which each replay overwrites.
    """

    def __init__(self, step, tensors: dict[str, torch.Tensor], warmup: int = 3, what: str = "the step"):
        if warmup < 2:
            raise ValueError(f"GraphedStep: warmup must be >= 2 (one step per check), got {warmup}")
        check_devices(tensors, what)
        if not torch.cuda.is_available():
            raise GraphCaptureError(f"{what} cannot be captured as a CUDA graph: torch sees no CUDA device")
        self.step, self.what = step, what
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            find_host_syncs(step, what)
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
            except RuntimeError as exc:
                raise GraphCaptureError(
                    f"{what} cannot be captured as a CUDA graph: it synchronises with the host (a blocking copy "
                    f"or wait) at {_first_frame_of(exc)}: {str(exc).splitlines()[0]}"
                ) from exc
            finally:
                torch.cuda.set_sync_debug_mode(previous)
            for _ in range(warmup - 2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.output = step()
        except RuntimeError as exc:
            raise GraphCaptureError(
                f"{what}: CUDA graph capture failed at {_first_frame_of(exc)}: {str(exc).splitlines()[0]}"
            ) from exc

    def replay(self):
        self.graph.replay()
        return self.output


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    den = b.norm().item()
    diff = (a - b).norm().item()
    if not math.isfinite(diff):
        return math.inf
    return diff / den if den > 0 else diff


def compare_with_eager(make_step, model: nn.Module, steps: int = 3, warmup: int = 3, seed: int = 0) -> dict:
    """Run ``steps`` replays of the graphed step and the same steps eagerly, from one state; the differences.

    ``make_step(model)`` returns ``(step, tensors)``: the step callable on that model and the
    tensors it reads (name -> tensor, see :class:`GraphedStep`). Two deep copies of ``model``
    each run ``warmup`` steps (eagerly), then one runs ``steps`` more eagerly and the other
    ``steps`` graph replays; the CUDA random state is reset to ``seed`` before each, so random
    draws (the official transition's surrogate) match too. Returns ``{"loss_rel": largest
    relative loss difference over the steps, "state_rel": largest relative difference of a
    parameter or floating buffer at the end, "losses_eager", "losses_graph"}``.
    """
    eager_model, graph_model = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(seed)
    step, _ = make_step(eager_model)
    eager = [float(step()) for _ in range(warmup + steps)][warmup:]
    torch.manual_seed(seed)
    step, tensors = make_step(graph_model)
    graphed = GraphedStep(step, tensors, warmup=warmup)
    replays = [float(graphed.replay()) for _ in range(steps)]
    state_rel = 0.0
    for (name, a), (_, b) in zip(graph_model.state_dict().items(), eager_model.state_dict().items()):
        if a.is_floating_point():
            state_rel = max(state_rel, _relative(a, b))
    loss_rel = max(abs(g - e) / max(abs(e), 1e-30) for g, e in zip(replays, eager))
    return {"loss_rel": loss_rel, "state_rel": state_rel, "losses_eager": eager, "losses_graph": replays}
