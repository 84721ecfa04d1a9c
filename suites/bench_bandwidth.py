"""Copy-bandwidth reference: ``dst.copy_(src)`` on exactly the tensors the layer suites use.

A copy reads and writes each element once, the least memory traffic any normalization
forward can have (it must read x and write y), so ``time_copy / time_<layer>`` at the
same ``group_size, shape, device, dtype, memory_format`` is the fraction of what the
memory system allows that the layer achieves (a forward + backward moves at least
about 2.5 such copies: read x, write y; read x and dy, write dx). Measured in the same
run as the layers, with the same pruning (:func:`suites.harness.matrix.check_pruned`).

Its asv name, ``bench_bandwidth.TimeCopy.time_copy``, is :data:`bkn.probes.results.COPY_REFERENCE`:
the report finds the reference by that name.
"""

from __future__ import annotations

from bkn.probes.results import TENSOR_PARAMS

from .harness.matrix import TENSOR_VALUES
from .harness.process import configure_threads
from .harness.tensor import TensorCase
from .harness.timing import Matrix, cached, synchronize


class TimeCopy(Matrix):
    """One device-local copy of a (group_size, *shape) tensor into a preallocated one."""

    params = TENSOR_VALUES
    param_names = list(TENSOR_PARAMS)

    def setup(self, *params):
        def build():
            case = TensorCase(*params)
            case.warm_up()
            return case

        configure_threads()
        self.case = cached((type(self).__name__, params), build)

    def time_copy(self, *params):
        self.case.copy()
        synchronize(self.case.device)
