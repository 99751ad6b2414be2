"""Standalone activations (relu, leaky_relu, gelu, silu, sigmoid, tanh) on any shape and stride.

Forward: y = act(x); backward: dx = dy * act'(saved), with `saved` = y for relu/sigmoid/tanh
and x otherwise (see the registry in :mod:`tkernels.activations`).

Tiling: a 1-D grid of BLOCK-element programs over the logical elements. Dense tensors of
any memory format (contiguous, channels_last, permuted) are walked in storage order, with
output allocated in the same layout; other strided views are indexed through up to 4
collapsed dimensions. Traffic: one read and one write per element (two reads in backward);
memory-bound.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor
import triton
import triton.language as tl

from .. import _backend
from ..activations import Activation, activation_grad, apply_activation, resolve_activation
from ..reference import activations as ref
from ._dispatch import custom_op, run_function
from ._common import (KernelSpec, cdiv, check_floating, check_triton_dtype, config, from_numpy,
                      register_kernel, to_numpy)

MAX_DIMS = 4
BLOCK = 1024


@triton.jit
def _strided_offsets(offs, size1, size2, size3, stride0, stride1, stride2, stride3):
    """Storage offsets of the logical (row-major) element indices `offs` in a <=4-D view."""
    i3 = offs % size3
    rest = offs // size3
    i2 = rest % size2
    rest = rest // size2
    i1 = rest % size1
    i0 = rest // size1
    return i0 * stride0 + i1 * stride1 + i2 * stride2 + i3 * stride3


@triton.jit
def activation_kernel(x_ptr, y_ptr, n, size1, size2, size3, sx0, sx1, sx2, sx3, sy0, sy1, sy2, sy3, param,
                      ACT: tl.constexpr, DENSE: tl.constexpr, BLOCK: tl.constexpr):
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = offs < n
    if DENSE:
        x_offs = offs
        y_offs = offs
    else:
        x_offs = _strided_offsets(offs, size1, size2, size3, sx0, sx1, sx2, sx3)
        y_offs = _strided_offsets(offs, size1, size2, size3, sy0, sy1, sy2, sy3)
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + y_offs, apply_activation(x, ACT, param).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def activation_backward_kernel(g_ptr, s_ptr, dx_ptr, n, size1, size2, size3, sg0, sg1, sg2, sg3,
                               ss0, ss1, ss2, ss3, sd0, sd1, sd2, sd3, param,
                               ACT: tl.constexpr, DENSE: tl.constexpr, BLOCK: tl.constexpr):
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = offs < n
    if DENSE:
        g_offs = offs
        s_offs = offs
        d_offs = offs
    else:
        g_offs = _strided_offsets(offs, size1, size2, size3, sg0, sg1, sg2, sg3)
        s_offs = _strided_offsets(offs, size1, size2, size3, ss0, ss1, ss2, ss3)
        d_offs = _strided_offsets(offs, size1, size2, size3, sd0, sd1, sd2, sd3)
    g = tl.load(g_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + s_offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + d_offs, (g * activation_grad(s, ACT, param)).to(dx_ptr.dtype.element_ty), mask=mask)


_SIG_STRIDES = {f"{p}{i}": "i32" for p in ("sx", "sy") for i in range(4)}
register_kernel(KernelSpec(
    name="activation",
    kernel=activation_kernel,
    signature={"x_ptr": "*{dtype}", "y_ptr": "*{dtype}", "n": "i32", "size1": "i32", "size2": "i32",
               "size3": "i32", **_SIG_STRIDES, "param": "fp32"},
    configs_by_arch={a: [config(BLOCK=BLOCK, num_warps=4, num_stages=1)] for a in ("sm_80", "sm_90")},
    variants=[dict(ACT=3, DENSE=True), dict(ACT=4, DENSE=False)],
))


# ---------------------------------------------------------------------------------------------
# Layout helpers
# ---------------------------------------------------------------------------------------------
def _is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill a contiguous storage range in some order."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return True
    sizes_strides = sorted((s, n) for n, s in zip(t.shape, t.stride()) if n != 1)
    expected = 1
    for stride, size in sizes_strides:
        if stride != expected:
            return False
        expected *= size
    return True


def _collapse(shape, *strides_list) -> Tuple[List[int], List[List[int]]]:
    """Merge adjacent dims that are contiguous with each other in every tensor; drop size-1 dims."""
    dims = [(n, [s[i] for s in strides_list]) for i, n in enumerate(shape) if n != 1]
    merged: List[Tuple[int, List[int]]] = []
    for n, st in dims:
        if merged and all(prev == cur * n for prev, cur in zip(merged[-1][1], st)):
            merged[-1] = (merged[-1][0] * n, st)
        else:
            merged.append((n, st))
    if len(merged) > MAX_DIMS:
        raise NotImplementedError("strided view with more than 4 non-collapsible dims")
    while len(merged) < MAX_DIMS:
        merged.insert(0, (1, [0] * len(strides_list)))
    sizes = [n for n, _ in merged]
    return sizes, [[st[k] for _, st in merged] for k in range(len(strides_list))]


def _launch_args(*tensors: Tensor):
    """(DENSE, sizes, per-tensor strides) for tensors of one shape."""
    ref_t = tensors[0]
    if all(_is_dense(t) and t.stride() == ref_t.stride() for t in tensors):
        return True, [1] * MAX_DIMS, [[0] * MAX_DIMS for _ in tensors]
    sizes, strides = _collapse(ref_t.shape, *[t.stride() for t in tensors])
    return False, sizes, strides


def _needs_restride(t: Tensor) -> bool:
    try:
        _collapse(t.shape, t.stride())
        return False
    except NotImplementedError:
        return True


def _run_forward(x: Tensor, out: Tensor, act: Activation) -> None:
    n = x.numel()
    if n == 0:
        return
    dense, sizes, (sx, sy) = _launch_args(x, out)
    activation_kernel[(cdiv(n, BLOCK),)](x, out, n, *sizes[1:], *sx, *sy, float(act.param),
                                         ACT=act.code, DENSE=dense, BLOCK=BLOCK)


def _as_kernel_input(t: Tensor) -> Tensor:
    # >4 non-collapsible strided dims are rare (e.g. a 5-D slice); a copy is the honest fallback
    return t.contiguous() if _needs_restride(t) else t


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------
@custom_op("tkernels::activation", mutates_args=())
def activation_forward(x: Tensor, activation: str, param: float) -> Tensor:
    if _backend.resolve(activation, x) == "numpy":
        return _numpy_like(ref.activation_forward(activation, to_numpy(x), param), x)
    check_triton_dtype(activation, x)
    x = _as_kernel_input(x)
    out = torch.empty_like(x)
    _run_forward(x, out, Activation(activation, param))
    return out


@activation_forward.register_fake
def _(x, activation, param):
    return torch.empty_like(x)


@custom_op("tkernels::activation_", mutates_args=("x",))
def activation_forward_inplace(x: Tensor, activation: str, param: float) -> None:
    if _backend.resolve(activation, x) == "numpy":
        x.copy_(from_numpy(ref.activation_forward(activation, to_numpy(x), param), x))
        return
    check_triton_dtype(activation, x)
    if _needs_restride(x):
        tmp = x.contiguous()
        _run_forward(tmp, tmp, Activation(activation, param))
        x.copy_(tmp)
    else:
        _run_forward(x, x, Activation(activation, param))


@activation_forward_inplace.register_fake
def _(x, activation, param):
    return None


@custom_op("tkernels::activation_backward", mutates_args=())
def activation_backward(grad: Tensor, saved: Tensor, activation: str, param: float, saved_is_output: bool) -> Tensor:
    if _backend.resolve(activation, grad) == "numpy":
        g, s = to_numpy(grad), to_numpy(saved)
        if saved_is_output:
            local = _numpy_grad_from_output(activation, s)
        else:
            local = ref.ACTIVATIONS[activation][1](s, param)
        return _numpy_like(g * local, saved)
    grad, saved = _as_kernel_input(grad), _as_kernel_input(saved)
    dx = torch.empty_like(saved)
    n = dx.numel()
    if n:
        dense, sizes, (sg, ss, sd) = _launch_args(grad, saved, dx)
        activation_backward_kernel[(cdiv(n, BLOCK),)](grad, saved, dx, n, *sizes[1:], *sg, *ss, *sd, float(param),
                                                      ACT=resolve_activation(activation).code, DENSE=dense,
                                                      BLOCK=BLOCK)
    return dx


@activation_backward.register_fake
def _(grad, saved, activation, param, saved_is_output):
    return torch.empty_like(saved)


def _numpy_grad_from_output(name, y):
    return {"relu": ref.relu_grad_from_output, "sigmoid": ref.sigmoid_grad_from_output,
            "tanh": ref.tanh_grad_from_output, "identity": ref.identity_grad}[name](y)


def _numpy_like(a, like: Tensor) -> Tensor:
    out = torch.empty_like(like)
    out.copy_(from_numpy(a, like))
    return out


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------
class ActivationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, name: str, param: float, inplace: bool):
        act = resolve_activation(Activation(name, param))
        ctx.name, ctx.param, ctx.from_output = act.name, act.param, act.grad_from_output
        if inplace:
            # the derivative of silu/gelu/leaky_relu needs x, which the in-place write destroys
            keep = None if act.grad_from_output or not ctx.needs_input_grad[0] else x.clone()
            activation_forward_inplace.in_forward(x, act.name, act.param)
            ctx.mark_dirty(x)
            ctx.save_for_backward(x if act.grad_from_output else keep)
            return x
        y = activation_forward.in_forward(x, act.name, act.param)
        ctx.save_for_backward(y if act.grad_from_output else x)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        (saved,) = ctx.saved_tensors
        dx = activation_backward(grad, saved, ctx.name, ctx.param, ctx.from_output)
        return dx, None, None, None


def apply(input: Tensor, activation: Activation, inplace: bool = False) -> Tensor:
    check_floating(activation.name, "input", input)
    return run_function(ActivationFunction, input, activation.name, float(activation.param), bool(inplace))
