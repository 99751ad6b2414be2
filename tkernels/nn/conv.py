"""Conv2d module: torch's class (same constructor, parameters, init and state_dict) running the
tkernels conv kernels, with an optional fused activation."""
from typing import Optional

import torch
from torch import Tensor

from .. import functional as F
from ..activations import ActivationLike, resolve_activation


class Conv2d(torch.nn.Conv2d):
    """``torch.nn.Conv2d`` whose forward is the fused tkernels kernel: act(conv2d(x) + bias).

    The padding modes 'reflect', 'replicate' and 'circular' pad the input explicitly (with
    ``torch.nn.functional.pad``, as torch does) and then run the kernel unpadded.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None,
                 activation: ActivationLike = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        self.activation = resolve_activation(activation)

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if self.padding_mode != "zeros":
            padded = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(padded, weight, bias, self.stride, 0, self.dilation, self.groups,
                            activation=self.activation)
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups,
                        activation=self.activation)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.activation.is_identity else f"{text}, activation={self.activation}"
