"""Drop-in twins of ``torch.nn.functional``: same names, signatures and defaults, plus an
optional fused ``activation=`` where the op has an epilogue."""
from __future__ import annotations

from torch import Tensor

from .activations import Activation
from .ops import elementwise as _elementwise
from .ops.avg_pooling import adaptive_avg_pool2d, avg_pool2d
from .ops.batch_norm import batch_norm
from .ops.conv import conv2d
from .ops.dropout import dropout
from .ops.linear import linear
from .ops.losses import cross_entropy
from .ops.mse import mse_loss
from .ops.pooling import max_pool2d
from .ops.softmax import log_softmax, softmax

__all__ = [
    "linear", "conv2d", "batch_norm", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
    "relu", "leaky_relu", "gelu", "silu", "sigmoid", "tanh",
    "softmax", "log_softmax", "cross_entropy", "mse_loss", "dropout",
]


def relu(input: Tensor, inplace: bool = False) -> Tensor:
    return _elementwise.apply(input, Activation("relu"), inplace)


def leaky_relu(input: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    return _elementwise.apply(input, Activation("leaky_relu", float(negative_slope)), inplace)


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', but got {approximate!r}")
    return _elementwise.apply(input, Activation("gelu_tanh" if approximate == "tanh" else "gelu"))


def silu(input: Tensor, inplace: bool = False) -> Tensor:
    return _elementwise.apply(input, Activation("silu"), inplace)


def sigmoid(input: Tensor) -> Tensor:
    return _elementwise.apply(input, Activation("sigmoid"))


def tanh(input: Tensor) -> Tensor:
    return _elementwise.apply(input, Activation("tanh"))
