"""Drop-in twins of ``torch.nn`` modules. Each subclasses its torch class, so isinstance,
state_dict keys, initialisation and repr stay those of torch."""
from .activation import GELU, LeakyReLU, ReLU, SiLU, Sigmoid, Tanh
from .batchnorm import BatchNorm1d, BatchNorm2d, SyncBatchNorm
from .conv import Conv2d
from .dropout import Dropout
from .linear import Linear
from .loss import CrossEntropyLoss, MSELoss
from .pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from .softmax import LogSoftmax, Softmax
from . import parallel
from .convert import ConversionReport, convert  # last: it looks the twins up by name in this module

__all__ = [
    "Linear", "Conv2d", "BatchNorm1d", "BatchNorm2d", "SyncBatchNorm",
    "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d",
    "ReLU", "LeakyReLU", "GELU", "SiLU", "Sigmoid", "Tanh",
    "Softmax", "LogSoftmax", "CrossEntropyLoss", "MSELoss", "Dropout",
    "convert", "ConversionReport", "parallel",
]
