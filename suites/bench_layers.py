"""Time of one normalization layer: forward in training mode, forward+backward, inference forward.

Matrix and skips: :mod:`suites.harness.matrix` (method x group_size x shape x device x
dtype x memory_format; ``NotImplementedError`` in setup for what cannot run or is pruned
on the CPU). The layer is ``bkn.methods.get(method).build(C)`` and normalizes its input,
``(group_size, *shape)``, as one group (``bn`` is torch's own ``BatchNorm*d``).

BKN's prior: a ``bkn-official``/``bkn-analytic`` training benchmark hands the layer a
prior, a (mean, var) pair of shape (1, C) whose gradient the backward computes
(:class:`suites.harness.prior.GivenPrior`), and times the norm alone: BKN against BN like
for like (the two transitions then time the same layer). The prior's propagation from the
previous layer (the chain), where the transitions differ, is timed with the convolution it
rides on by :mod:`suites.bench_blocks`. Inference uses the running estimates and no prior,
as in a network.

Every call is timed alone (asv re-runs setup between samples); the case is built and
warmed up (two calls) once per process, CUDA timings synchronise.
"""

from __future__ import annotations

from bkn.probes.results import LAYER_PARAMS

from .harness.layer import LayerCase
from .harness.matrix import LAYER_VALUES
from .harness.process import configure_threads
from .harness.timing import Matrix, cached, synchronize


class _Layer(Matrix):
    params = LAYER_VALUES
    param_names = list(LAYER_PARAMS)
    training = True
    step = "forward"

    def setup(self, *params):
        def build():
            case = LayerCase(*params, training=self.training)
            case.warm_up(getattr(case, self.step), f"{params[0]} {self.step}")
            return case

        configure_threads()
        self.case = cached((type(self).__name__, params), build)
        self.run = getattr(self.case, self.step)


class TimeForwardTrain(_Layer):
    """Forward in training mode (batch statistics, running-estimate update, autograd graph built)."""

    def time_forward_train(self, *params):
        self.run()
        synchronize(self.case.device)


class TimeForwardBackward(_Layer):
    """Forward in training mode, then the gradients of the input and of every parameter."""

    step = "forward_backward"

    def time_forward_backward(self, *params):
        self.run()
        synchronize(self.case.device)


class TimeForwardInference(_Layer):
    """Forward in eval mode under ``torch.no_grad()`` (running estimates; BKN uses no prior)."""

    training = False

    def time_forward_inference(self, *params):
        self.run()
        synchronize(self.case.device)


class TrackThreads:
    """The torch intra-op thread count every benchmark ran with (``$BKN_BENCH_THREADS``, default 1)."""

    unit = "threads"

    def track_threads(self):
        return configure_threads()
