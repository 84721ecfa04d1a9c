"""Models used by the suites and probes."""

from .cifar_resnet import CifarResNet, cifar_resnet
from .conv1d_net import ConvNet1d
from .resnet1d import PreActResNet1d, resnet1d

__all__ = ["CifarResNet", "cifar_resnet", "ConvNet1d", "PreActResNet1d", "resnet1d"]
