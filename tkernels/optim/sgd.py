"""SGD with momentum, dampening, Nesterov, weight decay and maximize: torch.optim.SGD's rule, run
as one fused multi-tensor launch per (group, device, dtype)."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from ..ops import optim as optim_ops
from ..ops.optim import validate
from ._common import check_lr, lr_arguments, scalar


class SGD(torch.optim.SGD):
    """``torch.optim.SGD`` (same arguments, defaults, param groups and state: ``momentum_buffer``)
    with a fused step. Params without a gradient are skipped; float16/bfloat16 params keep
    float16/bfloat16 buffers, as torch's do, with float32 math inside the kernel.

    Works with ``torch.amp.GradScaler`` as torch's ``fused=True`` SGD does: the scaler hands the step
    its scale and found-inf tensors, the kernel unscales the gradients and skips the step on inf/NaN,
    and nothing waits for the device. A momentum buffer created on a skipped step is zeros (torch's
    fused SGD leaves it uninitialised), so the next step starts the momentum from d exactly when
    dampening is 0 (with dampening it starts from (1 - dampening) * d).
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr: Union[float, Tensor] = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False):
        check_lr("SGD", lr)
        if lr < 0.0:
            raise ValueError(f"SGD: invalid learning rate lr={lr}; expected lr >= 0")
        if momentum < 0.0:
            raise ValueError(f"SGD: invalid momentum={momentum}; expected momentum >= 0")
        if weight_decay < 0.0:
            raise ValueError(f"SGD: invalid weight_decay={weight_decay}; expected weight_decay >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"SGD: Nesterov momentum requires momentum > 0 and dampening == 0, but got "
                             f"momentum={momentum} and dampening={dampening}")
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """One optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # GradScaler sets these two attributes for the duration of the step
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        new_buffer = torch.empty_like if found_inf is None else torch.zeros_like
        # Pass 1 gathers and checks every group, so a bad one raises before any param moves.
        plans = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            buffers, first = [], []
            if group["momentum"] != 0:
                for p in params:
                    buffer = self.state[p].get("momentum_buffer") if p in self.state else None
                    first.append(buffer is None)
                    buffers.append(new_buffer(p, memory_format=torch.preserve_format) if buffer is None
                                   else buffer)
            if len(self.param_groups) > 1:  # (one group: the step op's own check runs before anything moves)
                validate("SGD", params, grads, {"momentum_buffer": buffers} if group["momentum"] != 0 else {})
            plans.append((group, params, grads, buffers, first))
        for group, params, grads, buffers, first in plans:
            if not params:
                continue
            lr, lr_tensor = lr_arguments(group["lr"])
            optim_ops.sgd_step(params, grads, buffers, first, lr, scalar(group["momentum"]),
                               scalar(group["dampening"]), scalar(group["weight_decay"]),
                               bool(group["nesterov"]), bool(group["maximize"]), grad_scale, found_inf,
                               lr_tensor)
            for p, buffer in zip(params, buffers):
                self.state[p]["momentum_buffer"] = buffer
        return loss
