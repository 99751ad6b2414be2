"""2-D average pooling and adaptive average pooling, forward and backward.

Same tiling as :mod:`tkernels.ops.pooling` (flat storage-order blocks over the tensor being
written, strided reads) and the same gather-style backward: each input element sums
grad / divisor over the windows that contain it, in increasing window order, without atomics.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor
import triton
import triton.language as tl

from .. import _backend
from ..reference import pooling as ref
from ._dispatch import custom_op, run_function
from ._common import KernelSpec, Tuned, cdiv, check_triton_dtype, register_kernel, suggests_channels_last, to_numpy
from .pooling import (INTERPRETER_CONFIG, IntPair, as_pair, check_image_size, check_pool_input, check_window, copy_into,
                      element_offset, image_coords, launch, new_pooled, plane_offset, pool_configs,
                      pool_signature, pooled_shape, pooling_output_size, strides4, strides_signature,
                      with_unit_strides)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _avg_window(o, size, K, S, P):
    """torch's window along one dim: (first in-bounds, end in-bounds, length clipped to the padded input)."""
    start = o * S - P
    end = tl.minimum(start + K, size + P)
    return tl.maximum(start, 0), tl.minimum(end, size), end - start


@triton.jit
def _avg_divisor(h_lo, h_hi, padded_h, w_lo, w_hi, padded_w, DIVISOR,
                 COUNT_INCLUDE_PAD: tl.constexpr, HAS_DIVISOR: tl.constexpr):
    if HAS_DIVISOR:
        divisor = tl.zeros(h_lo.shape, tl.float32) + DIVISOR
    elif COUNT_INCLUDE_PAD:
        divisor = (padded_h * padded_w).to(tl.float32)
    else:
        divisor = ((h_hi - h_lo) * (w_hi - w_lo)).to(tl.float32)
    return divisor


@triton.jit
def avg_pool2d_kernel(x_ptr, y_ptr, per_image, C, H, W, OH, OW, sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                      KH, KW, SH, SW, PH, PW, DIVISOR,
                      COUNT_INCLUDE_PAD: tl.constexpr, HAS_DIVISOR: tl.constexpr,
                      CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """y = (sum of the in-bounds taps of the window) / divisor, where divisor is divisor_override,
    else the window clipped to the padded input (count_include_pad) or its in-bounds count; a
    window with no in-bounds tap gives 0. fp32 accumulation.

    Tile: BLOCK outputs per program (storage order); grid (cdiv(C*OH*OW, BLOCK), N).
    Traffic: KH*KW reads per output (cache hits when windows overlap), one write. Memory-bound.
    """
    mask, n, c, oh, ow = image_coords(per_image, C, OH, OW, CHANNELS_LAST, BLOCK)
    h_lo, h_hi, padded_h = _avg_window(oh, H, KH, SH, PH)
    w_lo, w_hi, padded_w = _avg_window(ow, W, KW, SW, PW)
    divisor = _avg_divisor(h_lo, h_hi, padded_h, w_lo, w_hi, padded_w, DIVISOR, COUNT_INCLUDE_PAD, HAS_DIVISOR)
    x_plane = x_ptr + plane_offset(n, c, sxn, sxc)
    acc = tl.zeros((BLOCK,), tl.float32)
    for t in range(0, KH * KW):  # one flat loop over the taps (nested runtime loops make ptxas spill)
        kh = t // KW
        ih = oh * SH - PH + kh
        iw = ow * SW - PW + (t - kh * KW)
        ok = mask & (ih >= h_lo) & (ih < h_hi) & (iw >= w_lo) & (iw < w_hi)
        acc += tl.load(x_plane + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw, mask=ok, other=0.0).to(tl.float32)
    touches = (h_hi > h_lo) & (w_hi > w_lo)
    y = tl.where(touches, acc / tl.where(touches, divisor, 1.0), 0.0)
    tl.store(y_ptr + element_offset(n, c, oh, ow, syn, syc, syh, syw), y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def avg_pool2d_backward_kernel(g_ptr, dx_ptr, per_image, C, H, W, OH, OW, sgn, sgc, sgh, sgw, sdn, sdc, sdh, sdw,
                               KH, KW, SH, SW, PH, PW, DIVISOR, NH, NW,
                               COUNT_INCLUDE_PAD: tl.constexpr, HAS_DIVISOR: tl.constexpr,
                               CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """dx[n,c,h,w] = sum over windows (oh, ow) containing (h, w) of grad[n,c,oh,ow] / divisor(oh, ow).

    Gather: the windows containing h are the NH <= cdiv(KH, SH) consecutive oh ending at
    (h+PH)//SH (same for w). Tile: BLOCK input elements per program (storage order of dx);
    grid (cdiv(C*H*W, BLOCK), N). Traffic: NH*NW grad reads per element (cache hits), one
    write. Memory-bound.
    """
    mask, n, c, ih, iw = image_coords(per_image, C, H, W, CHANNELS_LAST, BLOCK)
    oh_hi = tl.minimum((ih + PH) // SH, OH - 1)
    ow_hi = tl.minimum((iw + PW) // SW, OW - 1)
    oh_lo = (tl.maximum(ih + PH - KH + 1, 0) + SH - 1) // SH
    ow_lo = (tl.maximum(iw + PW - KW + 1, 0) + SW - 1) // SW
    g_plane = g_ptr + plane_offset(n, c, sgn, sgc)
    dx_ptrs = dx_ptr + element_offset(n, c, ih, iw, sdn, sdc, sdh, sdw)
    acc = tl.zeros((BLOCK,), tl.float32)
    for t in range(0, NH * NW):  # one flat loop: nested runtime loops make ptxas spill here
        j = t // NW
        oh = oh_lo + j
        ow = ow_lo + (t - j * NW)
        ok = mask & (oh <= oh_hi) & (ow <= ow_hi)
        h_lo, h_hi, padded_h = _avg_window(oh, H, KH, SH, PH)
        w_lo, w_hi, padded_w = _avg_window(ow, W, KW, SW, PW)
        divisor = _avg_divisor(h_lo, h_hi, padded_h, w_lo, w_hi, padded_w, DIVISOR, COUNT_INCLUDE_PAD, HAS_DIVISOR)
        g = tl.load(g_plane + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw, mask=ok, other=0.0).to(tl.float32)
        acc += tl.where(ok, g / tl.where(ok, divisor, 1.0), 0.0)
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adaptive_window(o, size, OUT):
    """[floor(o*size/OUT), ceil((o+1)*size/OUT))."""
    return (o * size) // OUT, ((o + 1) * size + OUT - 1) // OUT


@triton.jit
def adaptive_avg_pool2d_kernel(x_ptr, y_ptr, per_image, C, H, W, OH, OW, sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                               MAX_KH, MAX_KW,
                               CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """y[n,c,oh,ow] = mean of x over rows [floor(oh*H/OH), ceil((oh+1)*H/OH)) and the matching
    columns; windows are at most MAX_KH x MAX_KW (= cdiv(H, OH) + 1 bounded by H). fp32 sum.

    Tile: BLOCK outputs per program (storage order); grid (cdiv(C*OH*OW, BLOCK), N).
    Traffic: each input read about once (windows overlap by at most one row/column), one write.
    Memory-bound.
    """
    mask, n, c, oh, ow = image_coords(per_image, C, OH, OW, CHANNELS_LAST, BLOCK)
    h_lo, h_hi = _adaptive_window(oh, H, OH)
    w_lo, w_hi = _adaptive_window(ow, W, OW)
    x_plane = x_ptr + plane_offset(n, c, sxn, sxc)
    acc = tl.zeros((BLOCK,), tl.float32)
    for t in range(0, MAX_KH * MAX_KW):  # one flat loop over the taps (nested runtime loops make ptxas spill)
        kh = t // MAX_KW
        ih = h_lo + kh
        iw = w_lo + (t - kh * MAX_KW)
        ok = mask & (ih < h_hi) & (iw < w_hi)
        acc += tl.load(x_plane + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw, mask=ok, other=0.0).to(tl.float32)
    y = acc / tl.where(mask, (h_hi - h_lo) * (w_hi - w_lo), 1).to(tl.float32)
    tl.store(y_ptr + element_offset(n, c, oh, ow, syn, syc, syh, syw), y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def adaptive_avg_pool2d_backward_kernel(g_ptr, dx_ptr, per_image, C, H, W, OH, OW,
                                        sgn, sgc, sgh, sgw, sdn, sdc, sdh, sdw, NH, NW,
                                        CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """dx[n,c,h,w] = sum over adaptive windows containing (h, w) of grad / window area.

    The windows containing h are oh in [floor(h*OH/H), ceil((h+1)*OH/H) - 1], at most
    NH = cdiv(OH, H) + 1 of them. Tile: BLOCK input elements per program (storage order of
    dx); grid (cdiv(C*H*W, BLOCK), N). Traffic: about one grad read per window hit, one write.
    Memory-bound.
    """
    mask, n, c, ih, iw = image_coords(per_image, C, H, W, CHANNELS_LAST, BLOCK)
    oh_lo = (ih * OH) // H
    ow_lo = (iw * OW) // W
    oh_hi = ((ih + 1) * OH + H - 1) // H  # exclusive
    ow_hi = ((iw + 1) * OW + W - 1) // W
    g_plane = g_ptr + plane_offset(n, c, sgn, sgc)
    acc = tl.zeros((BLOCK,), tl.float32)
    for t in range(0, NH * NW):  # one flat loop: nested runtime loops make ptxas spill here
        j = t // NW
        oh = oh_lo + j
        ow = ow_lo + (t - j * NW)
        ok = mask & (oh < oh_hi) & (ow < ow_hi)
        h_lo, h_hi = _adaptive_window(oh, H, OH)
        w_lo, w_hi = _adaptive_window(ow, W, OW)
        g = tl.load(g_plane + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw, mask=ok, other=0.0).to(tl.float32)
        area = ((h_hi - h_lo) * (w_hi - w_lo)).to(tl.float32)
        acc += tl.where(ok, g / tl.where(ok, area, 1.0), 0.0)
    tl.store(dx_ptr + element_offset(n, c, ih, iw, sdn, sdc, sdh, sdw), acc.to(dx_ptr.dtype.element_ty),
             mask=mask)


AVG_POOL = Tuned(avg_pool2d_kernel, pool_configs(), INTERPRETER_CONFIG, key=["per_image", "KH", "KW"])
AVG_POOL_BACKWARD = Tuned(avg_pool2d_backward_kernel, pool_configs(), INTERPRETER_CONFIG, key=["per_image", "NH", "NW"])
ADAPTIVE = Tuned(adaptive_avg_pool2d_kernel, pool_configs(), INTERPRETER_CONFIG, key=["per_image", "MAX_KH", "MAX_KW"])
ADAPTIVE_BACKWARD = Tuned(adaptive_avg_pool2d_backward_kernel, pool_configs(), INTERPRETER_CONFIG,
                          key=["per_image", "NH", "NW"])

_AVG_SIG = {**{k: "i32" for k in ("KH", "KW", "SH", "SW", "PH", "PW")}, "DIVISOR": "fp32"}
_AVG_VARIANTS = [dict(COUNT_INCLUDE_PAD=False, HAS_DIVISOR=False, CHANNELS_LAST=False),
                 dict(COUNT_INCLUDE_PAD=True, HAS_DIVISOR=False, CHANNELS_LAST=True),
                 dict(COUNT_INCLUDE_PAD=True, HAS_DIVISOR=True, CHANNELS_LAST=False)]
_LAYOUT_VARIANTS = [dict(CHANNELS_LAST=False), dict(CHANNELS_LAST=True)]
for _name, _kernel, _sig, _variants in (
        ("avg_pool2d", avg_pool2d_kernel,
         {"x_ptr": "*{dtype}", "y_ptr": "*{dtype}",
          **pool_signature({**strides_signature("x", "y"), **_AVG_SIG})},
         with_unit_strides(_AVG_VARIANTS, "x", "y")),
        ("avg_pool2d_backward", avg_pool2d_backward_kernel,
         {"g_ptr": "*{dtype}", "dx_ptr": "*{dtype}",
          **pool_signature({**strides_signature("g", "d"), **_AVG_SIG, "NH": "i32", "NW": "i32"})},
         with_unit_strides(_AVG_VARIANTS, "g", "d")),
        ("adaptive_avg_pool2d", adaptive_avg_pool2d_kernel,
         {"x_ptr": "*{dtype}", "y_ptr": "*{dtype}",
          **pool_signature({**strides_signature("x", "y"), "MAX_KH": "i32", "MAX_KW": "i32"})},
         with_unit_strides(_LAYOUT_VARIANTS, "x", "y")),
        ("adaptive_avg_pool2d_backward", adaptive_avg_pool2d_backward_kernel,
         {"g_ptr": "*{dtype}", "dx_ptr": "*{dtype}",
          **pool_signature({**strides_signature("g", "d"), "NH": "i32", "NW": "i32"})},
         with_unit_strides(_LAYOUT_VARIANTS, "g", "d"))):
    register_kernel(KernelSpec(name=_name, kernel=_kernel, signature=_sig, configs_by_arch=pool_configs(),
                               variants=_variants))


# ---------------------------------------------------------------------------------------------
# Average pooling: custom ops, autograd, public function
# ---------------------------------------------------------------------------------------------
def _avg_out_shape(x: Tensor, kernel, stride, padding, ceil_mode) -> List[int]:
    N, C, H, W = x.shape
    return [N, C, pooling_output_size(H, kernel[0], stride[0], padding[0], 1, ceil_mode),
            pooling_output_size(W, kernel[1], stride[1], padding[1], 1, ceil_mode)]


@custom_op("tkernels::avg_pool2d", mutates_args=())
def avg_pool2d_forward(x: Tensor, kernel_size: List[int], stride: List[int], padding: List[int], ceil_mode: bool,
                       count_include_pad: bool, divisor_override: Optional[int], channels_last: bool) -> Tensor:
    shape = _avg_out_shape(x, kernel_size, stride, padding, ceil_mode)
    y = new_pooled(x, shape, channels_last)
    if _backend.resolve("avg_pool2d", x) == "numpy":
        return copy_into(y, ref.avg_pool2d_forward(to_numpy(x), kernel_size, stride, padding, ceil_mode,
                                                   count_include_pad, divisor_override))
    check_triton_dtype("avg_pool2d", x)
    N, C, H, W = x.shape
    launch(AVG_POOL, N, C * shape[2] * shape[3], (x, y), C, H, W, shape[2], shape[3], *strides4(x), *strides4(y),
           *kernel_size, *stride, *padding, float(divisor_override or 1),
           COUNT_INCLUDE_PAD=count_include_pad, HAS_DIVISOR=bool(divisor_override), CHANNELS_LAST=channels_last)
    return y


@avg_pool2d_forward.register_fake
def _(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, channels_last):
    return new_pooled(x, _avg_out_shape(x, kernel_size, stride, padding, ceil_mode), channels_last)


@custom_op("tkernels::avg_pool2d_backward", mutates_args=())
def avg_pool2d_backward(grad_y: Tensor, input_size: List[int], kernel_size: List[int], stride: List[int],
                        padding: List[int], ceil_mode: bool, count_include_pad: bool,
                        divisor_override: Optional[int], channels_last: bool) -> Tensor:
    dx = new_pooled(grad_y, input_size, channels_last)
    if _backend.resolve("avg_pool2d", grad_y) == "numpy":
        return copy_into(dx, ref.avg_pool2d_backward(to_numpy(grad_y), input_size, kernel_size, stride, padding,
                                                     ceil_mode, count_include_pad, divisor_override))
    N, C, H, W = input_size
    OH, OW = grad_y.shape[2:]
    launch(AVG_POOL_BACKWARD, N, C * H * W, (grad_y, dx), C, H, W, OH, OW, *strides4(grad_y),
           *strides4(dx), *kernel_size, *stride, *padding, float(divisor_override or 1),
           cdiv(kernel_size[0], stride[0]), cdiv(kernel_size[1], stride[1]),
           COUNT_INCLUDE_PAD=count_include_pad, HAS_DIVISOR=bool(divisor_override), CHANNELS_LAST=channels_last)
    return dx


@avg_pool2d_backward.register_fake
def _(grad_y, input_size, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override,
      channels_last):
    return new_pooled(grad_y, input_size, channels_last)


class AvgPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, kernel_size: IntPair, stride: IntPair, padding: IntPair, ceil_mode: bool,
                count_include_pad: bool, divisor_override: Optional[int], channels_last: bool):
        ctx.args = (list(x.shape), kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override,
                    channels_last)
        return avg_pool2d_forward.in_forward(x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                                             divisor_override, channels_last)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        return (avg_pool2d_backward(grad_y, *ctx.args),) + (None,) * 7


def avg_pool2d(input: Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True, divisor_override: Optional[int] = None) -> Tensor:
    """``torch.nn.functional.avg_pool2d`` (fp32 accumulation on every dtype)."""
    op = "avg_pool2d"
    kernel = as_pair(op, "kernel_size", kernel_size)
    stride_ = as_pair(op, "stride", stride, default=kernel)
    padding_ = as_pair(op, "padding", padding)
    check_window(op, kernel, stride_, padding_, [1, 1])
    if divisor_override is not None:
        divisor_override = as_pair(op, "divisor_override", divisor_override)[0]
        if divisor_override == 0:
            raise RuntimeError(f"{op}: divisor must be not zero (divisor_override=0); pass None to divide by "
                               "the window size")
    check_pool_input(op, input)
    pooled_shape(op, input, kernel, stride_, padding_, [1, 1], ceil_mode)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    y = run_function(AvgPool2dFunction, x, kernel, stride_, padding_, bool(ceil_mode), bool(count_include_pad),
                     divisor_override, suggests_channels_last(input))
    return y.squeeze(0) if unbatched else y


# ---------------------------------------------------------------------------------------------
# Adaptive average pooling
# ---------------------------------------------------------------------------------------------
@custom_op("tkernels::adaptive_avg_pool2d", mutates_args=())
def adaptive_avg_pool2d_forward(x: Tensor, output_size: List[int], channels_last: bool) -> Tensor:
    N, C, H, W = x.shape
    OH, OW = output_size
    y = new_pooled(x, [N, C, OH, OW], channels_last)
    if _backend.resolve("adaptive_avg_pool2d", x) == "numpy":
        return copy_into(y, ref.adaptive_avg_pool2d_forward(to_numpy(x), output_size))
    check_triton_dtype("adaptive_avg_pool2d", x)
    launch(ADAPTIVE, N, C * OH * OW, (x, y), C, H, W, OH, OW, *strides4(x), *strides4(y),
           min(cdiv(H, max(OH, 1)) + 1, H), min(cdiv(W, max(OW, 1)) + 1, W), CHANNELS_LAST=channels_last)
    return y


@adaptive_avg_pool2d_forward.register_fake
def _(x, output_size, channels_last):
    return new_pooled(x, [*x.shape[:2], *output_size], channels_last)


@custom_op("tkernels::adaptive_avg_pool2d_backward", mutates_args=())
def adaptive_avg_pool2d_backward(grad_y: Tensor, input_size: List[int], channels_last: bool) -> Tensor:
    dx = new_pooled(grad_y, input_size, channels_last)
    if _backend.resolve("adaptive_avg_pool2d", grad_y) == "numpy":
        return copy_into(dx, ref.adaptive_avg_pool2d_backward(to_numpy(grad_y), input_size))
    N, C, H, W = input_size
    OH, OW = grad_y.shape[2:]
    if OH == 0 or OW == 0:  # no window: nothing flows back
        return dx.zero_()
    launch(ADAPTIVE_BACKWARD, N, C * H * W, (grad_y, dx), C, H, W, OH, OW, *strides4(grad_y),
           *strides4(dx), cdiv(OH, H) + 1, cdiv(OW, W) + 1, CHANNELS_LAST=channels_last)
    return dx


@adaptive_avg_pool2d_backward.register_fake
def _(grad_y, input_size, channels_last):
    return new_pooled(grad_y, input_size, channels_last)


class AdaptiveAvgPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, output_size: IntPair, channels_last: bool):
        ctx.args = (list(x.shape), channels_last)
        return adaptive_avg_pool2d_forward.in_forward(x, output_size, channels_last)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        return adaptive_avg_pool2d_backward(grad_y, *ctx.args), None, None


def adaptive_avg_pool2d(input: Tensor, output_size) -> Tensor:
    """``torch.nn.functional.adaptive_avg_pool2d``: output_size is an int or a pair whose
    entries may be None (keep that input size); window o spans [floor(o*In/Out), ceil((o+1)*In/Out))."""
    op = "adaptive_avg_pool2d"
    check_pool_input(op, input)
    if isinstance(output_size, (tuple, list, torch.Size)):
        if len(output_size) != 2:
            raise RuntimeError(f"{op}: output_size must be an int or a pair (OH, OW), but got {tuple(output_size)}")
        size = [input.shape[-2 + i] if v is None else v for i, v in enumerate(output_size)]
    else:
        size = [output_size, output_size]
    size = as_pair(op, "output_size", size)
    if min(size) < 0:
        raise RuntimeError(f"{op}: elements of output_size must be greater than or equal to 0, but got "
                           f"{tuple(size)}")
    check_image_size(op, *input.shape[-3:], *size)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    y = run_function(AdaptiveAvgPool2dFunction, x, size, suggests_channels_last(input))
    return y.squeeze(0) if unbatched else y
