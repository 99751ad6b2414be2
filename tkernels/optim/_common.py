"""What the optimizers share: hyperparameter reading and the two-pass step."""
from __future__ import annotations

from typing import Union

from torch import Tensor


def scalar(value: Union[float, Tensor]) -> float:
    """A hyperparameter as a Python float (torch allows lr, and more, to be a 1-element tensor)."""
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def check_lr(optimizer: str, lr) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"{optimizer}: a Tensor lr must have one element, but it has shape {tuple(lr.shape)}")
