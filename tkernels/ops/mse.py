"""Mean-squared-error loss, forward and backward, as tkernels custom ops.

One elementwise pass: (x - y)^2 [* w] per element ('none'), or a per-program fp32 partial sum
and the one-program finishing kernel of :mod:`tkernels.ops.losses` ('mean', 'sum'; no atomics,
a fixed order). Backward writes 2 (x - y) w g (scaled) for input and its negation for target in
one pass, and the weight's gradient when asked. Broadcasting is done by the caller with stride-0
views (``torch.broadcast_tensors``), so nothing is materialised and autograd sums each gradient
back to its operand's shape.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor
import triton
import triton.language as tl

from .. import _backend
from ..reference import losses as ref
from ._autocast import cast_inputs
from ._dispatch import custom_op, run_function
from ._common import KernelSpec, cdiv, check_triton_dtype, config, from_numpy, register_kernel, to_numpy
from .elementwise import _collapse, _strided_offsets
from .losses import (FINISH_BLOCK, MEAN, NONE, _EMPTY, _check_device, _check_float, _promote, _reduction_code,
                     _resolve_reduction, loss_finish_kernel)

MSE_BLOCK = 1024


@triton.jit
def mse_forward_kernel(x_ptr, y_ptr, w_ptr, out_ptr, wpart_ptr, n, size1, size2, size3,
                       sx0, sx1, sx2, sx3, sy0, sy1, sy2, sy3, sw0, sw1, sw2, sw3,
                       HAS_WEIGHT: tl.constexpr, REDUCE: tl.constexpr, DENSE: tl.constexpr, BLOCK: tl.constexpr):
    """(x - y)^2 [* w] per element into a contiguous output, or (REDUCE) one fp32 partial sum per
    program (and one of w). 1-D grid of BLOCK elements over the logical (row-major) index; inputs
    by <= 4 collapsed strides (broadcast operands have stride 0). Bytes: 2-3 reads and 1 write per
    element (or 4 bytes a program); memory-bound."""
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = offs < n
    if DENSE:
        x_offs = offs
        y_offs = offs
        w_offs = offs
    else:
        x_offs = _strided_offsets(offs, size1, size2, size3, sx0, sx1, sx2, sx3)
        y_offs = _strided_offsets(offs, size1, size2, size3, sy0, sy1, sy2, sy3)
        w_offs = _strided_offsets(offs, size1, size2, size3, sw0, sw1, sw2, sw3)
    d = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32) - \
        tl.load(y_ptr + y_offs, mask=mask, other=0.0).to(tl.float32)
    sq = d * d
    if HAS_WEIGHT:
        w = tl.load(w_ptr + w_offs, mask=mask, other=0.0).to(tl.float32)
        sq = sq * w
    if REDUCE:
        tl.store(out_ptr + tl.program_id(0), tl.sum(tl.where(mask, sq, 0.0), axis=0))
        if HAS_WEIGHT:
            tl.store(wpart_ptr + tl.program_id(0), tl.sum(w, axis=0))
    else:
        tl.store(out_ptr + offs, sq.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def mse_backward_kernel(g_ptr, x_ptr, y_ptr, w_ptr, loss_ptr, denom_ptr, dx_ptr, dy_ptr, dw_ptr,
                        n, size1, size2, size3, sg0, sg1, sg2, sg3, sx0, sx1, sx2, sx3,
                        sy0, sy1, sy2, sy3, sw0, sw1, sw2, sw3,
                        REDUCTION: tl.constexpr, HAS_WEIGHT: tl.constexpr, NEED_X: tl.constexpr,
                        NEED_Y: tl.constexpr, NEED_W: tl.constexpr, DENSE: tl.constexpr, BLOCK: tl.constexpr):
    """dx = 2 (x - y) w g', dy = -dx, dw = (x - y)^2 g' [- loss g' for 'mean'], with g' the incoming
    gradient (per element for 'none'; divided by the mean's divisor). Outputs are contiguous.
    1-D grid of BLOCK elements; 2-4 reads and 1-3 writes per element; memory-bound."""
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = offs < n
    if DENSE:
        g_offs = offs
        x_offs = offs
        y_offs = offs
        w_offs = offs
    else:
        g_offs = _strided_offsets(offs, size1, size2, size3, sg0, sg1, sg2, sg3)
        x_offs = _strided_offsets(offs, size1, size2, size3, sx0, sx1, sx2, sx3)
        y_offs = _strided_offsets(offs, size1, size2, size3, sy0, sy1, sy2, sy3)
        w_offs = _strided_offsets(offs, size1, size2, size3, sw0, sw1, sw2, sw3)
    if REDUCTION == 0:
        g = tl.load(g_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(g_ptr).to(tl.float32)
        if REDUCTION == 1:
            g = g / tl.load(denom_ptr)
    d = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32) - \
        tl.load(y_ptr + y_offs, mask=mask, other=0.0).to(tl.float32)
    dd = 2.0 * d * g
    if HAS_WEIGHT:
        dd = dd * tl.load(w_ptr + w_offs, mask=mask, other=0.0).to(tl.float32)
    if NEED_X:
        tl.store(dx_ptr + offs, dd.to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_Y:
        tl.store(dy_ptr + offs, (-dd).to(dy_ptr.dtype.element_ty), mask=mask)
    if NEED_W:
        dw = d * d
        if REDUCTION == 1:  # d/dw_j of sum_k w_k sq_k / sum_k w_k
            dw = dw - tl.load(loss_ptr).to(tl.float32)
        tl.store(dw_ptr + offs, (dw * g).to(dw_ptr.dtype.element_ty), mask=mask)


_FLAT_SIG = {"n": "i64", "size1": "i32", "size2": "i32", "size3": "i32"}


def _flat_strides(*prefixes: str) -> dict:
    return {f"{p}{i}": "i64" for p in prefixes for i in range(4)}


register_kernel(KernelSpec(
    name="mse_forward", kernel=mse_forward_kernel,
    signature={"x_ptr": "*{dtype}", "y_ptr": "*{dtype}", "w_ptr": "*{dtype}", "out_ptr": "*fp32",
               "wpart_ptr": "*fp32", **_FLAT_SIG, **_flat_strides("sx", "sy", "sw")},
    configs_by_arch={a: [config(num_warps=4, num_stages=1, BLOCK=MSE_BLOCK)] for a in ("sm_80", "sm_90")},
    variants=[dict(HAS_WEIGHT=True, REDUCE=True, DENSE=False), dict(HAS_WEIGHT=False, REDUCE=False, DENSE=True)],
))
register_kernel(KernelSpec(
    name="mse_backward", kernel=mse_backward_kernel,
    signature={"g_ptr": "*{dtype}", "x_ptr": "*{dtype}", "y_ptr": "*{dtype}", "w_ptr": "*{dtype}",
               "loss_ptr": "*{dtype}", "denom_ptr": "*fp32", "dx_ptr": "*{dtype}", "dy_ptr": "*{dtype}",
               "dw_ptr": "*{dtype}", **_FLAT_SIG, **_flat_strides("sg", "sx", "sy", "sw")},
    configs_by_arch={a: [config(num_warps=4, num_stages=1, BLOCK=MSE_BLOCK)] for a in ("sm_80", "sm_90")},
    variants=[dict(REDUCTION=MEAN, HAS_WEIGHT=True, NEED_X=True, NEED_Y=True, NEED_W=True, DENSE=False),
              dict(REDUCTION=NONE, HAS_WEIGHT=False, NEED_X=True, NEED_Y=False, NEED_W=False, DENSE=True)],
))


# ---------------------------------------------------------------------------------------------
# MSE: launchers and custom ops (x and y already broadcast to one shape)
# ---------------------------------------------------------------------------------------------
def _flat_layout(inputs: List[Tensor]):
    """(DENSE, sizes[1:], strides per input, inputs) over the logical index; copies only when the
    strides do not collapse to 4 dims."""
    if all(t.is_contiguous() for t in inputs):
        return True, [1, 1, 1], [[0] * 4 for _ in inputs], inputs
    try:
        sizes, strides = _collapse(tuple(inputs[0].shape), *[t.stride() for t in inputs])
    except NotImplementedError:
        return _flat_layout([t.contiguous() for t in inputs])
    return False, sizes[1:], strides, inputs


@custom_op("tkernels::mse_loss", mutates_args=())
def mse_forward(x: Tensor, y: Tensor, weight: Optional[Tensor], reduction: str) -> Tuple[Tensor, Tensor]:
    """(loss, divisor () fp32: numel, or sum of weights)."""
    denom = x.new_ones((), dtype=torch.float32)  # 'none' has no divisor; keep the output defined
    if _backend.resolve("mse_loss", x) == "numpy":
        loss = ref.mse_loss(to_numpy(x), to_numpy(y), reduction, to_numpy(weight))
        denom.fill_(float(to_numpy(weight).sum()) if weight is not None else float(x.numel()))
        return from_numpy(loss, x).reshape(x.shape if reduction == "none" else ()), denom
    check_triton_dtype("mse_loss", x)
    n = x.numel()
    reduce = reduction != "none"
    inputs = [x, y] + ([weight] if weight is not None else [])
    dense, sizes, strides, inputs = _flat_layout(inputs)
    w_strides = strides[2] if weight is not None else strides[0]
    out = torch.empty(() if reduce else x.shape, device=x.device, dtype=x.dtype)
    n_parts = cdiv(n, MSE_BLOCK)
    parts = [x.new_empty((n_parts,), dtype=torch.float32) for _ in range(2)] if reduce else [out, out]
    if n:
        mse_forward_kernel[(n_parts,)](inputs[0], inputs[1], inputs[-1], parts[0], parts[1], n, *sizes,
                                       *strides[0], *strides[1], *w_strides, HAS_WEIGHT=weight is not None,
                                       REDUCE=reduce, DENSE=dense, BLOCK=MSE_BLOCK)
    if reduce:
        loss_finish_kernel[(1,)](parts[0], parts[1], parts[0], out, denom, denom, n_parts, float(n),
                                 MEAN=reduction == "mean", HAS_DEN=weight is not None, LOSS=True, CHECK=False,
                                 BLOCK=FINISH_BLOCK)
    return out, denom


@mse_forward.register_fake
def _(x, y, weight, reduction):
    return x.new_empty(x.shape if reduction == "none" else ()), x.new_empty((), dtype=torch.float32)


@custom_op("tkernels::mse_loss_backward", mutates_args=())
def mse_backward(grad: Tensor, x: Tensor, y: Tensor, weight: Optional[Tensor], loss: Tensor, denom: Tensor,
                 reduction: str, need_x: bool, need_y: bool, need_weight: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dy, dweight) on the broadcast shape; the ones not asked for are empty tensors."""
    if _backend.resolve("mse_loss", x) == "numpy":
        grads = ref.mse_loss_backward(to_numpy(grad), to_numpy(x), to_numpy(y), reduction, to_numpy(weight))
        return tuple(from_numpy(g, x).reshape(x.shape) if need else x.new_empty(_EMPTY)
                     for g, need in zip(grads, (need_x, need_y, need_weight)))
    n = x.numel()
    dx, dy, dw = [torch.empty(x.shape, device=x.device, dtype=x.dtype) if need else x.new_empty(_EMPTY)
                  for need in (need_x, need_y, need_weight)]
    if n == 0:
        return dx, dy, dw
    per_elem = reduction == "none"
    inputs = [x, y] + ([weight] if weight is not None else []) + ([grad] if per_elem else [])
    dense, sizes, strides, inputs = _flat_layout(inputs)
    x, y = inputs[0], inputs[1]
    w = inputs[2] if weight is not None else x
    sw = strides[2] if weight is not None else strides[0]
    g = inputs[-1] if per_elem else grad
    sg = strides[-1] if per_elem else [0] * 4
    mse_backward_kernel[(cdiv(n, MSE_BLOCK),)](
        g, x, y, w, loss, denom, dx if need_x else x, dy if need_y else x, dw if need_weight else x,
        n, *sizes, *sg, *strides[0], *strides[1], *sw, REDUCTION=_reduction_code(reduction),
        HAS_WEIGHT=weight is not None, NEED_X=need_x, NEED_Y=need_y, NEED_W=need_weight, DENSE=dense,
        BLOCK=MSE_BLOCK)
    return dx, dy, dw


@mse_backward.register_fake
def _(grad, x, y, weight, loss, denom, reduction, need_x, need_y, need_weight):
    return tuple(x.new_empty(x.shape if need else _EMPTY) for need in (need_x, need_y, need_weight))


class MSELossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, weight: Optional[Tensor], reduction: str):
        loss, denom = mse_forward.in_forward(x, y, weight, reduction)
        ctx.save_for_backward(x, y, weight, loss if weight is not None else None, denom)
        ctx.reduction = reduction
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, y, weight, loss, denom = ctx.saved_tensors
        need_x, need_y, need_w = ctx.needs_input_grad[:3]
        need_w = need_w and weight is not None
        dx, dy, dw = mse_backward(grad, x, y, weight, loss if loss is not None else denom,
                                  denom, ctx.reduction, need_x, need_y, need_w)
        return (dx if need_x else None), (dy if need_y else None), (dw if need_w else None), None


# ---------------------------------------------------------------------------------------------
# Public function (torch.nn.functional signature)
# ---------------------------------------------------------------------------------------------
def mse_loss(input: Tensor, target: Tensor, size_average: Optional[bool] = None, reduce: Optional[bool] = None,
             reduction: str = "mean", weight: Optional[Tensor] = None) -> Tensor:
    """``torch.nn.functional.mse_loss``: mean/sum/none of (input - target)^2, optionally times ``weight``
    (torch >= 2.6; 'mean' then divides by sum(weight)). Shapes broadcast with torch's warning."""
    op = "mse_loss"
    input, target, weight = cast_inputs(op, input, target, weight)
    _check_float(op, "input", input)
    _check_float(op, "target", target)
    _check_device(op, input, target=target, weight=weight)
    if target.size() != input.size():
        warnings.warn(f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
                      "This will likely lead to incorrect results due to broadcasting. "
                      "Please ensure they have the same size.", stacklevel=2)
    reduction = _resolve_reduction(op, size_average, reduce, reduction)
    try:
        shape = torch.broadcast_shapes(input.shape, target.shape)
    except RuntimeError:
        raise RuntimeError(f"{op}: input {tuple(input.shape)} and target {tuple(target.shape)} do not broadcast "
                           "to one shape") from None
    if input.dtype != target.dtype:
        input, target = _promote(input, target)
    if weight is not None:
        _check_float(op, "weight", weight)
        if weight.size() != input.size():
            raise ValueError(f"{op}: Weights and input must have the same size: weight {tuple(weight.shape)}, "
                             f"input {tuple(input.shape)}")
        weight = weight.to(input.dtype).broadcast_to(shape)
    x, y = torch.broadcast_tensors(input, target)
    return run_function(MSELossFunction, x, y, weight, reduction)
