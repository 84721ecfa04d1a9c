"""One data-parallel training step at world size 2 (DDP, gloo, CPU) with BN, SyncBN and BKN, and one process.

:class:`TimeDDPTrainStep`: the paper's CIFAR ResNet-20 (32x32 input), each worker on its
own batch of ``group_size`` samples (one normalization group per worker), one step =
forward, cross-entropy, backward (DDP all-reduces the gradients), SGD update.

* ``bn`` and ``bkn-official``/``bkn-analytic`` normalize each worker's batch alone;
  ``syncbn`` (:class:`bkn.layers.sync.SyncBatchNorm`) normalizes over the pooled batch of
  every worker, with one all-reduce of count, sum and sum of squares per layer in the
  forward and one of their gradients in the backward.
* ``world_size`` 2: the benchmark process is rank 0 and one spawned peer is rank 1, both
  stepping in lockstep (:mod:`suites.harness.ddp`); the time is rank 0's step.
  ``world_size`` 1: the same step in one process without DDP (``syncbn`` = plain BN).

So ``time(world_size 2) - time(world_size 1)`` is the per-step cost of data parallelism
on this machine (all-reduces and waiting for the other worker), and ``syncbn - bn`` at
world size 2 the cost of pooling the statistics. Each worker runs ``$BKN_BENCH_THREADS``
torch threads (default 1): 2 workers need 2 free cores. Skipped (``n/a``) where
torch.distributed or its gloo backend is unavailable.
"""

from __future__ import annotations

from bkn.probes.results import GROUP_PARAM, METHOD_PARAM

from .harness import ddp
from .harness.process import configure_threads
from .harness.timing import Matrix, cached


class TimeDDPTrainStep(Matrix):
    """One SGD step of the CIFAR ResNet-20 per worker: DDP at 2 workers (gloo), or one process."""

    params = [list(ddp.METHODS), list(ddp.GROUP_SIZES), list(ddp.WORLD_SIZES)]
    param_names = [METHOD_PARAM, GROUP_PARAM, ddp.WORLD_PARAM]
    repeat = (2, 5, 5.0)

    def setup(self, method, group_size, world_size):
        configure_threads()
        key = (type(self).__name__, method, group_size, world_size)
        self.case = cached(key, lambda: ddp.DDPCase(method, group_size, world_size))
        self.case.check()  # a dead peer fails here, with its error, before any timing

    def time_train_step(self, method, group_size, world_size):
        self.case.step()
