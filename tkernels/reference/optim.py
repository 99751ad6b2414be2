"""NumPy references of the SGD and AdamW update rules, one parameter at a time, in float64.

Each function is pure: it takes the parameter, its gradient and its state as arrays and returns
the new parameter and the new state, leaving its inputs alone. The formulas are the textbook ones
(Sutskever et al. 2013 for momentum; Loshchilov & Hutter 2019 for AdamW, with Reddi et al. 2018's
AMSGrad), written with the bias-corrected moments m_hat and v_hat.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


def sgd_update(param: np.ndarray, grad: np.ndarray, momentum_buffer: Optional[np.ndarray], *, lr: float,
               momentum: float, dampening: float, weight_decay: float, nesterov: bool,
               maximize: bool) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """One SGD step. ``momentum_buffer`` is None before the first step with momentum.

    d = (-g if maximize else g) + weight_decay * p
    b = d on the first step, else momentum * b + (1 - dampening) * d
    p = p - lr * (d + momentum * b if nesterov else b)      (p - lr * d without momentum)
    Returns (new param, new buffer); the buffer is None when momentum is 0.
    """
    p = np.asarray(param, dtype=np.float64)
    direction = np.asarray(grad, dtype=np.float64) * (-1.0 if maximize else 1.0)
    if weight_decay != 0:
        direction = direction + weight_decay * p
    if momentum == 0:
        return p - lr * direction, None
    if momentum_buffer is None:
        buffer = direction.copy()
    else:
        buffer = momentum * np.asarray(momentum_buffer, dtype=np.float64) + (1.0 - dampening) * direction
    update = direction + momentum * buffer if nesterov else buffer
    return p - lr * update, buffer


def adamw_update(param: np.ndarray, grad: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray,
                 max_exp_avg_sq: Optional[np.ndarray], step: float, *, lr: float, beta1: float, beta2: float,
                 eps: float, weight_decay: float, amsgrad: bool, maximize: bool):
    """One AdamW step; ``step`` is the number of steps taken before this one.

    t = step + 1;  g = -grad if maximize else grad
    m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2;  v_max = max(v_max, v) (AMSGrad)
    m_hat = m / (1 - beta1^t);  v_hat = (v_max if amsgrad else v) / (1 - beta2^t)
    p = p - lr * weight_decay * p - lr * m_hat / (sqrt(v_hat) + eps)
    Returns (param, exp_avg, exp_avg_sq, max_exp_avg_sq or None, t).
    """
    t = float(step) + 1.0
    p = np.asarray(param, dtype=np.float64)
    g = np.asarray(grad, dtype=np.float64) * (-1.0 if maximize else 1.0)
    m = beta1 * np.asarray(exp_avg, dtype=np.float64) + (1.0 - beta1) * g
    v = beta2 * np.asarray(exp_avg_sq, dtype=np.float64) + (1.0 - beta2) * g * g
    v_max = None
    second = v
    if amsgrad:
        previous = np.zeros_like(v) if max_exp_avg_sq is None else np.asarray(max_exp_avg_sq, dtype=np.float64)
        v_max = np.maximum(previous, v)
        second = v_max
    m_hat = m / (1.0 - beta1 ** t)
    v_hat = second / (1.0 - beta2 ** t)
    new_p = p - lr * weight_decay * p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return new_p, m, v, v_max, t


def unscale(grad: np.ndarray, grad_scale: float) -> np.ndarray:
    """A gradient of a loss that torch.amp.GradScaler multiplied by ``grad_scale``, unscaled: g / scale."""
    return np.asarray(grad, dtype=np.float64) / float(grad_scale)
