"""AdamW (decoupled weight decay, optional AMSGrad, maximize): torch.optim.AdamW's rule, run as a
fused multi-tensor prologue + update per (group, device, dtype)."""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from ..ops import optim as optim_ops
from ..ops.optim import validate
from ._common import check_lr, lr_arguments, scalar


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (same arguments, defaults, param groups and state: ``step``,
    ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) with a fused step.

    ``step`` is a float32 0-d tensor on the param's device: on CPU that is torch's default layout, on
    CUDA torch's ``fused=True`` layout (so the counter never leaves the GPU). A step loaded from
    elsewhere (a CPU or float64 counter) is moved there on the next step. Params without a gradient
    are skipped; float16/bfloat16 params keep float16/bfloat16 state, as torch's do.

    Works with ``torch.amp.GradScaler`` as torch's ``fused=True`` AdamW does: the kernel unscales the
    gradients by the scaler's scale and, on inf/NaN, skips the update and leaves ``step`` as it was
    (the state of a first step is created either way), with no wait for the device.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr: Union[float, Tensor] = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False):
        check_lr("AdamW", lr)
        if not 0.0 <= lr:
            raise ValueError(f"AdamW: invalid learning rate lr={lr}; expected lr >= 0")
        if not 0.0 <= eps:
            raise ValueError(f"AdamW: invalid eps={eps}; expected eps >= 0")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"AdamW: invalid betas[{i}]={beta}; expected 0 <= beta < 1")
        if not 0.0 <= weight_decay:
            raise ValueError(f"AdamW: invalid weight_decay={weight_decay}; expected weight_decay >= 0")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """One optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # GradScaler sets these two attributes for the duration of the step
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        # Pass 1 gathers, creates missing state (not yet stored) and checks every group, so a bad
        # group raises before any param or state moves.
        plans = []
        for group in self.param_groups:
            amsgrad = bool(group["amsgrad"])
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            states = [self._state_for(p, amsgrad) for p in params]
            lists = {key: [s[key] for s in states] for key in ("exp_avg", "exp_avg_sq")}
            lists["max_exp_avg_sq"] = [s["max_exp_avg_sq"] for s in states] if amsgrad else []
            steps = [s["step"] for s in states]
            if len(self.param_groups) > 1:  # (one group: the step op's own check runs before anything moves)
                validate("AdamW", params, grads, lists if amsgrad else dict(list(lists.items())[:2]), steps)
            plans.append((group, params, grads, states, lists, steps))
        for group, params, grads, states, lists, steps in plans:
            if not params:
                continue
            beta1, beta2 = (scalar(b) for b in group["betas"])
            lr, lr_tensor = lr_arguments(group["lr"])
            optim_ops.adamw_step(
                params, grads, lists["exp_avg"], lists["exp_avg_sq"], lists["max_exp_avg_sq"], steps, lr, beta1,
                beta2, scalar(group["eps"]), scalar(group["weight_decay"]), bool(group["amsgrad"]),
                bool(group["maximize"]), grad_scale, found_inf, lr_tensor)
            for p, state in zip(params, states):
                if self.state.get(p) is not state:
                    self.state[p].update(state)
        return loss

    def _state_for(self, p: Tensor, amsgrad: bool) -> dict:
        """This param's state as the kernel needs it: the stored dict itself when it is ready, else a
        completed copy, which the step stores once every group has passed its checks."""
        current = self.state.get(p)
        step = current.get("step") if current else None
        if (isinstance(step, Tensor) and step.dtype == torch.float32 and step.device == p.device
                and (not amsgrad or "max_exp_avg_sq" in current)):
            return current
        state = dict(current or {})
        if step is None:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif not isinstance(step, Tensor) or step.dtype != torch.float32 or step.device != p.device:
            state["step"] = torch.tensor(scalar(step), dtype=torch.float32, device=p.device)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state
