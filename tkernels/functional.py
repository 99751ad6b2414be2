"""Drop-in twins of ``torch.nn.functional``: same names, signatures and defaults, plus an
optional fused ``activation=`` where the op has an epilogue."""
from __future__ import annotations

from torch import Tensor

from .activations import Activation
from .ops import elementwise as _elementwise
from .ops.linear import linear

__all__ = ["linear", "relu", "leaky_relu", "gelu", "silu", "sigmoid", "tanh"]


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
