"""What the optimizers share: hyperparameter reading and the two-pass step."""
from __future__ import annotations

from typing import Optional, Tuple, Union

from torch import Tensor


def scalar(value: Union[float, Tensor]) -> float:
    """A hyperparameter as a Python float (torch allows lr, and more, to be a 1-element tensor)."""
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def lr_arguments(lr: Union[float, Tensor]) -> Tuple[float, Optional[Tensor]]:
    """(lr, lr_tensor) for a fused step op: a tensor lr goes to the kernels unread, so a step never
    waits for the device to learn it (the float is then unused)."""
    return (0.0, lr) if isinstance(lr, Tensor) else (float(lr), None)


def check_lr(optimizer: str, lr) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"{optimizer}: a Tensor lr must have one element, but it has shape {tuple(lr.shape)}")
