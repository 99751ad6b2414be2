"""Fused Linear: y = act(x @ W^T + b), forward and backward as tkernels custom ops.

Forward is one matmul launch with bias and activation in the epilogue. Backward fuses
dZ = dY * act'(.) into the loads of the two gradient GEMMs and gets the bias gradient as
a by-product of the weight-gradient GEMM (its row sums). What backward keeps: nothing for
identity (x and W only, as torch's linear), the output y for relu/sigmoid/tanh (as torch's
separate activation would), the pre-activation z otherwise.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from ..activations import ActivationLike, resolve_activation
from ..reference import linear as ref
from ._autocast import cast_inputs
from ._dispatch import custom_op, run_function
from ._common import (FLOAT_DTYPES, check_floating, check_same, check_triton_dtype, from_numpy, product_dtype,
                      to_numpy)
from .matmul import linear_matmul, matmul
from .reductions import column_sum

_EMPTY = (0,)


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, param: float,
             save_preact: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """(y, z or None) for x: (M, K); the implementation of both forward ops."""
    if _backend.resolve("linear", x) == "numpy":
        dtype = product_dtype(x)
        y, z = ref.linear_forward(to_numpy(x, dtype), to_numpy(weight, dtype), to_numpy(bias, dtype), activation,
                                  param, compute_dtype=dtype)
        return from_numpy(y, x), (from_numpy(z, x) if save_preact else None)
    check_triton_dtype("linear", x)
    shape = (x.shape[0], weight.shape[0])
    y = x.new_empty(shape)
    z = x.new_empty(shape) if save_preact else None
    linear_matmul(x, weight, y, bias, resolve_activation(activation).code, param, z)
    return y, z


# Two ops rather than one with an optional output: an activation whose gradient needs only y
# (identity, relu, sigmoid, tanh) then allocates nothing it throws away.
@custom_op("tkernels::linear", mutates_args=())
def linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, param: float) -> Tensor:
    """y = act(x @ W^T + b) for x: (M, K)."""
    return _forward(x, weight, bias, activation, param, False)[0]


@linear_forward.register_fake
def _(x, weight, bias, activation, param):
    return x.new_empty((x.shape[0], weight.shape[0]))


@custom_op("tkernels::linear_preact", mutates_args=())
def linear_forward_preact(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
                          param: float) -> Tuple[Tensor, Tensor]:
    """(y, z = x @ W^T + b) for x: (M, K); backward of activations that need z reads it."""
    return _forward(x, weight, bias, activation, param, True)


@linear_forward_preact.register_fake
def _(x, weight, bias, activation, param):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


@custom_op("tkernels::linear_backward", mutates_args=())
def linear_backward(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], saved: Optional[Tensor],
                    activation: str, param: float, need_input: bool, need_weight: bool,
                    need_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (dx, dW, db); the ones not asked for come back as empty tensors."""
    M, K = x.shape
    N = weight.shape[0]
    if _backend.resolve("linear", x) == "numpy":
        dtype = product_dtype(x)
        dx, dw, db = ref.linear_backward(to_numpy(grad_y, dtype), to_numpy(x, dtype), to_numpy(weight, dtype),
                                         to_numpy(bias, dtype), activation, param, compute_dtype=dtype)
        return (from_numpy(dx, x) if need_input else x.new_empty(_EMPTY),
                from_numpy(dw, weight) if need_weight else x.new_empty(_EMPTY),
                from_numpy(db, weight) if need_bias else x.new_empty(_EMPTY))
    act = resolve_activation(activation)
    gate = None if act.is_identity else saved
    # (each gradient tensor allocated once: the ones not asked for as empty tensors)
    dx = x.new_empty((M, K) if need_input else _EMPTY)
    dw = weight.new_empty((N, K)) if need_weight else x.new_empty(_EMPTY)
    db = weight.new_empty((N,)) if need_bias else x.new_empty(_EMPTY)
    if need_input:  # dX = dZ @ W
        matmul(grad_y, weight, dx, gate=gate, gate_activation_code=act.code, activation_param=param)
    if need_weight:  # dW = dZ^T @ X, and db = row sums of dZ^T
        matmul(grad_y, x, dw, gate=gate, gate_activation_code=act.code, activation_param=param,
               rowsum_out=db if need_bias else None, a_transposed=True)
    elif need_bias:
        column_sum(grad_y, db, gate=gate, gate_activation_code=act.code, activation_param=param)
    return dx, dw, db


@linear_backward.register_fake
def _(grad_y, x, weight, bias, saved, activation, param, need_input, need_weight, need_bias):
    return (x.new_empty(x.shape if need_input else _EMPTY),
            weight.new_empty(weight.shape if need_weight else _EMPTY),
            weight.new_empty((weight.shape[0],) if need_bias else _EMPTY))


class LinearFunction(torch.autograd.Function):
    """Autograd for the fused linear on 2-D input; see :func:`linear` for the public entry."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, param: float):
        act = resolve_activation(activation)
        need = ctx.needs_input_grad
        needs_grad = need[0] or need[1] or need[2]
        if act.grad_from_output or not needs_grad:  # (no z when no gradient will read it)
            y = linear_forward.in_forward(x, weight, bias, activation, param)
            # Keep what torch's own ops would keep: nothing of the output for identity (so in-place
            # ops on y, such as `y += residual`, stay legal), y where torch's relu/sigmoid/tanh keep it.
            saved = None if act.is_identity or not needs_grad else y
        else:
            y, saved = linear_forward_preact.in_forward(x, weight, bias, activation, param)
        ctx.options = (activation, param, bias is not None)
        ctx.save_for_backward(x, weight, bias, saved)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, bias, saved = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        activation, param, has_bias = ctx.options
        need_b = need_b and has_bias
        dx, dw, db = linear_backward(grad_y, x, weight, bias, saved, activation, param, need_x, need_w, need_b)
        return dx if need_x else None, dw if need_w else None, db if need_b else None, None, None


def _well_formed(input, weight, bias) -> bool:
    """Whether every check of :func:`_check_inputs` passes, read in one expression (the common case
    costs a few attribute reads, not six calls). False sends the call through the full checks."""
    if not (isinstance(input, Tensor) and isinstance(weight, Tensor)):
        return False
    dtype, device, out_features = input.dtype, input.device, weight.shape[0] if weight.dim() == 2 else -1
    return (dtype in FLOAT_DTYPES and weight.dtype == dtype and weight.device == device and out_features >= 0
            and input.dim() != 0 and input.shape[-1] == weight.shape[1]
            and (bias is None or (isinstance(bias, Tensor) and bias.dtype == dtype and bias.device == device
                                  and bias.dim() == 1 and bias.shape[0] == out_features)))


def _check_inputs(op: str, input, weight, bias) -> None:
    check_floating(op, "input", input)
    check_floating(op, "weight", weight)
    check_same(op, "input", input, weight=weight, bias=bias)
    if weight.dim() != 2:
        raise RuntimeError(f"{op}: weight must be 2-D (out_features, in_features), but got shape {tuple(weight.shape)}")
    if input.dim() == 0:
        raise RuntimeError(f"{op}: input must have at least 1 dimension, but got a scalar")
    if input.shape[-1] != weight.shape[1]:
        raise RuntimeError(f"{op}: input has {input.shape[-1]} features in its last dimension but weight expects "
                           f"in_features={weight.shape[1]} (input {tuple(input.shape)}, weight {tuple(weight.shape)})")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise RuntimeError(f"{op}: bias must have shape ({weight.shape[0]},) to match out_features, "
                           f"but got {tuple(bias.shape)}")


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
           activation: ActivationLike = None) -> Tensor:
    """``torch.nn.functional.linear`` with an optional fused activation: act(input @ weight.T + bias)."""
    op = "linear"
    input, weight, bias = cast_inputs(op, input, weight, bias)
    if not _well_formed(input, weight, bias):
        _check_inputs(op, input, weight, bias)
    act = resolve_activation(activation)
    if input.dim() == 2:
        return run_function(LinearFunction, input, weight, bias, act.name, act.param)
    lead = input.shape[:-1]
    y = run_function(LinearFunction, input.reshape(-1, input.shape[-1]), weight, bias, act.name, act.param)
    return y.reshape(*lead, weight.shape[0])
