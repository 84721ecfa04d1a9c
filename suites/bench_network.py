"""Whole-network training steps with each norm swapped in: where the BKN prior chain's cost shows.

* :class:`TimeResNet18TrainStep`: torchvision's ResNet-18 (random init, 1000 classes,
  224x224 input), every ``BatchNorm2d`` replaced by ``bkn.convert(model, norm, ...)``;
  for BKN the priors are wired through the network by the converter (``torch.fx``
  trace, :mod:`bkn.chain`), with the ``official`` or ``analytic`` transition.
* :class:`TimeCifarResNetTrainStep`: the paper's pre-activation CIFAR ResNet-20
  (:func:`bkn.models.cifar_resnet`, 32x32 input), wired as the authors' code wires it.

One step = forward, cross-entropy, backward, SGD update; the batch is the normalization
batch (``batch_size`` samples, one group). ``norm`` values and options as in
:func:`suites.common.norm_options` (bn is torch's own ``BatchNorm2d``). On the CPU the
matrix is pruned by :func:`suites.common.check_network_pruned` (ResNet-18 up to batch 8;
bfloat16 and channels_last at the secondary batch sizes); CUDA runs all of it.
"""
from __future__ import annotations

import torchvision

import bkn
from bkn.models import cifar_resnet

from .common import (
    BATCH_SIZES,
    DEVICES,
    DTYPES,
    MEMORY_FORMATS,
    NORMS,
    Matrix,
    NetworkCase,
    cached,
    configure_threads,
    synchronize,
)

NETWORK_PARAM_NAMES = ["norm", "batch_size", "shape", "device", "dtype", "memory_format"]


def network_params(input_shape: str) -> list[list]:
    return [list(NORMS), list(BATCH_SIZES), [input_shape], list(DEVICES), list(DTYPES), list(MEMORY_FORMATS)]


def _resnet18(name: str, options: dict):
    return bkn.convert(torchvision.models.resnet18(), name, **options)


def _cifar_resnet20(name: str, options: dict):
    return cifar_resnet(20, name, **options)


class _Network(Matrix):
    param_names = NETWORK_PARAM_NAMES
    build = None
    num_classes = 10
    repeat = (2, 5, 5.0)

    def setup(self, *params):
        def build():
            case = NetworkCase(type(self).build, *params, num_classes=self.num_classes)
            case.warm_up(f"{type(self).__name__} {params[0]}")
            return case
        configure_threads()
        self.case = cached((type(self).__name__, params), build)


class TimeResNet18TrainStep(_Network):
    """One SGD step of torchvision's ResNet-18 at 224x224."""

    params = network_params("3x224x224")
    build = staticmethod(_resnet18)
    num_classes = 1000

    def time_train_step(self, *params):
        self.case.step()
        synchronize(self.case.device)


class TimeCifarResNetTrainStep(_Network):
    """One SGD step of the paper's CIFAR ResNet-20 at 32x32."""

    params = network_params("3x32x32")
    build = staticmethod(_cifar_resnet20)

    def time_train_step(self, *params):
        self.case.step()
        synchronize(self.case.device)
