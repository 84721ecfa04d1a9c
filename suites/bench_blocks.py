"""Time of one network block, convolution + normalization + ReLU, with BKN's prior propagation.

The layer benchmarks (:mod:`suites.bench_layers`) time the norm alone, BKN handed its
prior. A network also pays for the prior's propagation from the previous layer (the
*chain*): here it is timed with the work it rides on, ``relu(norm(conv(x)))`` with a
3x3 convolution from C to C channels (a linear layer for (N, C) features), for BKN plus
the previous posterior pushed through ReLU and the same convolution by the method's
transition (:class:`suites.harness.block.BlockCase`). A BKN block's time over BN's is
BKN's whole cost per block; the report's chain-cost figure splits it into the norm's
share (from :data:`bkn.probes.results.LAYER_BENCHMARK`) and the chain's.

Matrix: the layer benchmarks' (:mod:`suites.harness.matrix`, same CPU pruning) without
the 3-d case (its convolution dominates the block). Its name is
:data:`bkn.probes.results.BLOCK_BENCHMARK`: the report finds it by that name.
"""

from __future__ import annotations

from bkn.probes.results import LAYER_PARAMS

from .harness.block import BlockCase
from .harness.matrix import LAYER_VALUES
from .harness.process import configure_threads
from .harness.timing import Matrix, cached, synchronize


class TimeBlockForwardBackward(Matrix):
    """conv + norm + ReLU in training mode (BKN with its prior's propagation), then every gradient."""

    params = LAYER_VALUES
    param_names = list(LAYER_PARAMS)

    def setup(self, *params):
        def build():
            case = BlockCase(*params)
            case.warm_up(f"{params[0]} block")
            return case

        configure_threads()
        self.case = cached((type(self).__name__, params), build)

    def time_block_forward_backward(self, *params):
        self.case.forward_backward()
        synchronize(self.case.device)
