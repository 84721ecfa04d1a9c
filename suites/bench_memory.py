"""Memory of one normalization layer in a training step (forward + backward).

Three measures, each its own class (same matrix as :mod:`suites.bench_layers`, the
``device`` axis restricted to where the measure means something):

* ``peakmem_forward_backward``: asv's peak resident memory of the benchmark process
  (CPU only: the host RSS says nothing about GPU memory). It includes the process
  baseline (torch imported), so read differences between methods, not absolute values.
* ``track_saved_bytes``: the bytes of the tensors autograd keeps from the forward for
  the backward (:func:`suites.harness.memory.saved_tensor_bytes`), the activation memory
  the layer adds to a network; exact and allocator-independent, counted on the CPU.
* ``track_cuda_peak_bytes``: CUDA allocator peak above the case's own tensors during
  forward + backward (``torch.cuda.max_memory_allocated``); skipped without CUDA.

BKN is handed its prior (:class:`suites.harness.prior.GivenPrior`), as in
:mod:`suites.bench_layers`: the norm alone.
"""

from __future__ import annotations

import torch

from bkn.probes.results import LAYER_PARAMS

from .harness.layer import LayerCase
from .harness.matrix import DEVICES, skip, values
from .harness.memory import saved_tensor_bytes
from .harness.process import configure_threads
from .harness.timing import Matrix, cached, synchronize


class _Memory(Matrix):
    param_names = list(LAYER_PARAMS)

    def setup(self, *params):
        def build():
            case = LayerCase(*params, training=True)
            case.warm_up(case.forward_backward, f"{params[0]} forward_backward")
            return case

        configure_threads()
        self.case = cached((type(self).__name__, params), build)


class PeakMemForwardBackward(_Memory):
    """Peak RSS of the process around one forward + backward (CPU)."""

    params = values(LAYER_PARAMS, device=["cpu"])

    def peakmem_forward_backward(self, *params):
        self.case.forward_backward()


class TrackSavedForBackward(_Memory):
    """Bytes saved by autograd for the backward of one training forward."""

    params = values(LAYER_PARAMS, device=["cpu"])
    unit = "bytes"

    def track_saved_bytes(self, *params):
        return saved_tensor_bytes(self.case.forward)


class TrackCudaPeakForwardBackward(_Memory):
    """CUDA allocator peak of one forward + backward, above the tensors the case holds."""

    params = values(LAYER_PARAMS, device=[d for d in DEVICES if d == "cuda"])
    unit = "bytes"

    def setup(self, *params):
        super().setup(*params)
        if self.case.device.type != "cuda":
            skip("CUDA allocator statistics need a CUDA device")

    def track_cuda_peak_bytes(self, *params):
        device = self.case.device
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        grads = self.case.forward_backward()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del grads
        return peak
