"""Whole-network training steps with each method swapped in: where the BKN prior chain's cost shows.

* :class:`TimeResNet18TrainStep`: torchvision's ResNet-18 (random init, 1000 classes,
  224x224 input), every ``BatchNorm2d`` replaced by ``method.convert(model)``; for BKN
  the priors are wired through the network by the converter (``torch.fx`` trace,
  :mod:`bkn.chain`), with the ``official`` or ``analytic`` transition.
* :class:`TimeCifarResNetTrainStep`: the paper's pre-activation CIFAR ResNet-20
  (:func:`bkn.models.cifar_resnet`, 32x32 input, the method's layer options), wired as
  the authors' code wires it.

One step = forward, cross-entropy, backward, SGD update. In these two the step's batch is
one normalization group: ``group_size`` samples, and every norm is built without a group
(``bn`` is torch's own ``BatchNorm2d``). How BKN is used is groups inside a larger batch:

* :class:`TimeResNet18GroupedStep` (torchvision's ResNet-18 at 112x112) and
  :class:`TimeCifarResNetGroupedStep` (the CIFAR ResNet-20): a batch of
  :data:`GROUPED_BATCH` = 16 in normalization groups of ``group_size`` = 2, 4 or 16
  samples (``bn`` is then ghost-batch BN; per-sample norms ignore the groups).

Methods come from :mod:`bkn.methods`. On the CPU
the matrix is pruned by :func:`suites.harness.matrix.check_network_pruned` (ResNet-18 up
to group size 8; bfloat16 and channels_last at the secondary group sizes); CUDA runs all
of it.
"""

from __future__ import annotations

import torchvision

from bkn.methods import Method
from bkn.probes.results import LAYER_PARAMS

from .harness.matrix import values
from .harness.network import NetworkCase, cifar_resnet20
from .harness.process import configure_threads
from .harness.timing import Matrix, cached, synchronize

GROUPED_BATCH = 16  # the batch of the grouped steps
GROUPED_SIZES = [2, 4, 16]  # their normalization groups


def _resnet18(method: Method, group_size: int | None = None):
    return method.convert(torchvision.models.resnet18(), group_size)


class _Network(Matrix):
    param_names = list(LAYER_PARAMS)
    build = None
    num_classes = 10
    batch_size = None  # None: the batch is one group of group_size samples
    repeat = (2, 5, 5.0)

    def setup(self, *params):
        def build():
            case = NetworkCase(type(self).build, *params, num_classes=self.num_classes, batch_size=self.batch_size)
            case.warm_up(f"{type(self).__name__} {params[0]}")
            return case

        configure_threads()
        self.case = cached((type(self).__name__, params), build)


class TimeResNet18TrainStep(_Network):
    """One SGD step of torchvision's ResNet-18 at 224x224."""

    params = values(LAYER_PARAMS, shape=["3x224x224"])
    build = staticmethod(_resnet18)
    num_classes = 1000

    def time_train_step(self, *params):
        self.case.step()
        synchronize(self.case.device)


class TimeCifarResNetTrainStep(_Network):
    """One SGD step of the paper's CIFAR ResNet-20 at 32x32."""

    params = values(LAYER_PARAMS, shape=["3x32x32"])
    build = staticmethod(cifar_resnet20)

    def time_train_step(self, *params):
        self.case.step()
        synchronize(self.case.device)


class TimeResNet18GroupedStep(_Network):
    """One SGD step of torchvision's ResNet-18 at 112x112, a batch of 16 in groups of ``group_size``."""

    params = values(LAYER_PARAMS, group_size=GROUPED_SIZES, shape=["3x112x112"])
    build = staticmethod(_resnet18)
    num_classes = 1000
    batch_size = GROUPED_BATCH

    def time_train_step(self, *params):
        self.case.step()
        synchronize(self.case.device)


class TimeCifarResNetGroupedStep(_Network):
    """One SGD step of the paper's CIFAR ResNet-20 at 32x32, a batch of 16 in groups of ``group_size``."""

    params = values(LAYER_PARAMS, group_size=GROUPED_SIZES, shape=["3x32x32"])
    build = staticmethod(cifar_resnet20)
    batch_size = GROUPED_BATCH

    def time_train_step(self, *params):
        self.case.step()
        synchronize(self.case.device)
