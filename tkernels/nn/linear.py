import torch

from .. import functional as F
from ..activations import ActivationLike, resolve_activation


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` whose forward is the fused tkernels kernel, with an optional activation."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 activation: ActivationLike = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = resolve_activation(activation)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight, self.bias, activation=self.activation)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.activation.is_identity else f"{text}, activation={self.activation}"
