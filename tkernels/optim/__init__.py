"""Drop-in twins of ``torch.optim.SGD`` and ``torch.optim.AdamW`` whose step is one fused
multi-tensor Triton launch per parameter group (see :mod:`tkernels.ops.optim`). They subclass
their torch class, so param groups, state and state_dict are torch's and load both ways."""
from .adamw import AdamW
from .sgd import SGD

__all__ = ["SGD", "AdamW"]
