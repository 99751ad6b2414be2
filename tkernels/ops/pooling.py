"""2-D max pooling, forward and backward, plus what every pooling op shares: argument parsing
with torch's rules and errors, output sizes, memory formats and the flat-index tiling.

Tiling (all pooling kernels): grid (blocks per image, images); each program takes BLOCK
consecutive elements of one image of the tensor being WRITTEN, in its storage order (W fastest
for NCHW, C fastest for channels_last), so stores are coalesced; reads go through the input's
four strides, so any strided view (slices, canaries, permutes) is read in place without a copy.

Backward is a GATHER, never a scatter: each input element visits the few windows whose span
covers it and sums what they send it. Overlapping windows (stride < kernel) therefore need no
atomics, and the sum runs in a fixed order (deterministic).
"""
from __future__ import annotations

import operator
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
import triton
import triton.language as tl

from .. import _backend
from ..reference import pooling as ref
from ._dispatch import custom_op, run_function
from ._common import (ARCHS, KernelSpec, Tuned, cdiv, check_floating, check_triton_dtype, config, from_numpy,
                      product_dtype, register_kernel, suggests_channels_last, to_numpy)

IntPair = List[int]
_EMPTY = (0,)


# ---------------------------------------------------------------------------------------------
# Shared device code and tuning
# ---------------------------------------------------------------------------------------------
@triton.jit
def image_coords(per_image, C, H, W, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """(mask, n, c, h, w) of this program's BLOCK consecutive storage-order elements of image
    n = program_id(1) of an (N, C, H, W) tensor (W fastest, or C fastest for channels_last).

    Indices within one image are int32 (the host refuses images of 2**31 elements) and only
    the plane offsets are int64: the coordinate split then needs no 64-bit division, which is
    a slow subroutine on the GPU whose call spills registers.
    """
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if CHANNELS_LAST:
        c = r % C
        rest = r // C
        w = rest % W
        h = rest // W
    else:
        w = r % W
        rest = r // W
        h = rest % H
        c = rest // H
    return r < per_image, tl.program_id(1), c, h, w


@triton.jit
def plane_offset(n, c, sn, sc):
    """Storage offset of plane (n, c), in int64."""
    return n.to(tl.int64) * sn + c.to(tl.int64) * sc


@triton.jit
def element_offset(n, c, h, w, sn, sc, sh, sw):
    """Storage offset of element (n, c, h, w), in int64 (the coordinates may be int32)."""
    return plane_offset(n, c, sn, sc) + h.to(tl.int64) * sh + w.to(tl.int64) * sw


def pool_configs() -> dict:
    """Memory-bound gather kernels: one or two elements per thread (four spill the backward kernels)."""
    return {arch: [config(BLOCK=128, num_warps=4, num_stages=1), config(BLOCK=256, num_warps=4, num_stages=1),
                   config(BLOCK=512, num_warps=8, num_stages=1)] for arch in ARCHS}


INTERPRETER_CONFIG = config(BLOCK=1024, num_warps=4, num_stages=1)


def strides4(t: Tensor) -> List[int]:
    return list(t.stride())


IMAGE_LIMIT = 2**31 - 2**12  # indices within one image (and the adaptive window products) are int32
MAX_GRID_Y = 65535  # CUDA's limit on grid dimension 1, which carries the batch index


def launch(tuned: Tuned, batch: int, per_image: int, tensors: Sequence[Tensor], *scalars, **constexprs) -> None:
    """Launch a pooling kernel over `batch` images of `per_image` elements each: grid
    (cdiv(per_image, BLOCK), images), in chunks of at most 65535 images (4-D tensors are
    sliced along the batch; other tensors, like an unused placeholder, pass as they are)."""
    if batch == 0 or per_image == 0:
        return
    kernel, meta = tuned.launcher(tensors[0].device)
    for n0 in range(0, batch, MAX_GRID_Y):
        images = min(MAX_GRID_Y, batch - n0)
        chunk = [t[n0:n0 + images] if t.dim() == 4 else t for t in tensors]
        kernel[lambda m: (cdiv(per_image, m["BLOCK"]), images)](*chunk, per_image, *scalars, **constexprs, **meta)


def pool_signature(extra: dict) -> dict:
    """KernelSpec signature: pointers and sizes first, then the op's own scalars."""
    return {"per_image": "i32", "C": "i32", "H": "i32", "W": "i32", "OH": "i32", "OW": "i32", **extra}


def strides_signature(*prefixes: str) -> dict:
    return {f"s{p}{d}": "i32" for p in prefixes for d in "nchw"}


def with_unit_strides(variants: List[dict], *prefixes: str) -> List[dict]:
    """Variants with the example value 1 for each tensor's innermost stride (W, or C when
    channels_last), so `tkernels inspect` specialises them as a dense launch does."""
    return [{**v, **{f"s{p}{'c' if v['CHANNELS_LAST'] else 'w'}": 1 for p in prefixes}} for v in variants]


# ---------------------------------------------------------------------------------------------
# Host-side checks and shapes (torch's rules; clearer messages that keep torch's key phrases)
# ---------------------------------------------------------------------------------------------
def as_pair(op: str, name: str, value, *, default: Optional[IntPair] = None) -> IntPair:
    """int or 1/2-sequence of ints -> [a, b]; `default` stands in for None or an empty sequence."""
    if value is None or (isinstance(value, (tuple, list)) and len(value) == 0 and default is not None):
        if default is None:
            raise TypeError(f"{op}: {name} must be an int or a tuple of two ints, not None")
        return list(default)
    items = list(value) if isinstance(value, (tuple, list, torch.Size)) else [value]
    if len(items) not in (1, 2):
        raise RuntimeError(f"{op}: {name} must either be a single int, or a tuple of two ints, "
                           f"but got {tuple(items)}")
    try:
        pair = [operator.index(v) for v in items]
    except TypeError:
        bad = next(v for v in items if not hasattr(v, "__index__"))
        raise TypeError(f"{op}: {name} must be an int or a tuple of ints, not {type(bad).__name__} "
                        f"({value!r})") from None
    return pair * 2 if len(pair) == 1 else pair


def pooling_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    out = (size + 2 * padding - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # the last window must start inside the input or its left padding
    return out


def check_pool_input(op: str, input: Tensor) -> None:
    check_floating(op, "input", input)
    if input.dim() not in (3, 4):
        raise RuntimeError(f"{op}: expected a 3D (C, H, W) or 4D (N, C, H, W) input, but got shape "
                           f"{tuple(input.shape)}")
    if any(n == 0 for n in input.shape[-3:]):
        raise RuntimeError(f"{op}: expected non-empty channel and spatial dimensions (only the batch may be "
                           f"empty), but got input shape {tuple(input.shape)}")


def check_window(op: str, kernel: IntPair, stride: IntPair, padding: IntPair, dilation: IntPair) -> None:
    if min(kernel) <= 0:
        raise RuntimeError(f"{op}: kernel size should be greater than zero, but got kernel_size={tuple(kernel)}")
    if min(stride) <= 0:
        raise RuntimeError(f"{op}: stride should be greater than zero, but got stride={tuple(stride)}")
    if min(dilation) <= 0:
        raise RuntimeError(f"{op}: dilation should be greater than zero, but got dilation={tuple(dilation)}")
    if min(padding) < 0:
        raise RuntimeError(f"{op}: pad must be non-negative, but got padding={tuple(padding)}")
    for k, p, d in zip(kernel, padding, dilation):
        if p > ((k - 1) * d + 1) // 2:
            raise RuntimeError(f"{op}: pad should be at most half of effective kernel size, but got "
                               f"padding={tuple(padding)} for kernel_size={tuple(kernel)} and "
                               f"dilation={tuple(dilation)} (effective kernel (k-1)*dilation+1)")
    # torch also bounds the padding by half the undilated kernel, whatever the dilation
    if any(p > k // 2 for k, p in zip(kernel, padding)):
        raise RuntimeError(f"{op}: pad should be smaller than or equal to half of kernel size, but got "
                           f"padding={tuple(padding)} for kernel_size={tuple(kernel)}")


def pooled_shape(op: str, input: Tensor, kernel: IntPair, stride: IntPair, padding: IntPair,
                 dilation: IntPair, ceil_mode: bool) -> Tuple[int, int]:
    H, W = input.shape[-2:]
    OH = pooling_output_size(H, kernel[0], stride[0], padding[0], dilation[0], ceil_mode)
    OW = pooling_output_size(W, kernel[1], stride[1], padding[1], dilation[1], ceil_mode)
    if OH < 1 or OW < 1:
        C = input.shape[-3]
        raise RuntimeError(f"{op}: Given input size: ({C}x{H}x{W}). Calculated output size: ({C}x{OH}x{OW}). "
                           f"Output size is too small: kernel_size={tuple(kernel)}, stride={tuple(stride)}, "
                           f"padding={tuple(padding)}, dilation={tuple(dilation)} do not fit the padded input")
    check_image_size(op, input.shape[-3], H, W, OH, OW)
    return OH, OW


def check_image_size(op: str, C: int, H: int, W: int, OH: int, OW: int) -> None:
    """The kernels index within one image in int32 (plane offsets are int64)."""
    if max(C * H * W, C * OH * OW, (OH + 1) * (H + 1), (OW + 1) * (W + 1)) > IMAGE_LIMIT:
        raise RuntimeError(f"{op}: an image of {C}x{H}x{W} pooled to {C}x{OH}x{OW} is too large: indices within "
                           "one image must stay below 2**31")




def new_pooled(like: Tensor, shape: Sequence[int], channels_last: bool, dtype=None) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(tuple(shape), dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


def copy_into(out: Tensor, array) -> Tensor:
    out.copy_(from_numpy(array, out))
    return out


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def max_pool2d_kernel(x_ptr, y_ptr, idx_ptr, per_image, C, H, W, OH, OW,
                      sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                      KH, KW, SH, SW, PH, PW, DH, DW,
                      CHANNELS_LAST: tl.constexpr, STORE_INDICES: tl.constexpr, BLOCK: tl.constexpr):
    """y[n,c,oh,ow] = max over taps (kh, kw) of x[n, c, oh*SH-PH+kh*DH, ow*SW-PW+kw*DW] (padding
    never wins), idx = h*W + w of the winner. Scan order rows then columns; a tap replaces the
    running best when it is strictly greater (so ties keep the FIRST maximum) or NaN (so NaN
    propagates and the LAST NaN's index is kept), exactly torch's rule. fp32 compare.

    Tile: BLOCK outputs per program, storage order; grid (cdiv(C*OH*OW, BLOCK), N).
    Traffic: KH*KW reads per output (mostly cache hits), one write (+8 bytes for the index).
    Memory-bound.
    """
    mask, n, c, oh, ow = image_coords(per_image, C, OH, OW, CHANNELS_LAST, BLOCK)
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    # torch's index for a window with no finite maximum: its first tap that is not above/left of the input
    h_first = tl.where(h0 < 0, h0 + (-h0 + DH - 1) // DH * DH, h0)
    w_first = tl.where(w0 < 0, w0 + (-w0 + DW - 1) // DW * DW, w0)
    best_idx = h_first * W + w_first
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    x_plane = x_ptr + plane_offset(n, c, sxn, sxc)
    for t in range(0, KH * KW):  # taps in scan order, one flat loop (nested runtime loops make ptxas spill)
        kh = t // KW
        ih = h0 + kh * DH
        iw = w0 + (t - kh * KW) * DW
        ok = mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        v = tl.load(x_plane + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw, mask=ok,
                    other=float("-inf")).to(tl.float32)
        take = (v > best) | (v != v)
        best = tl.where(take, v, best)
        best_idx = tl.where(take, ih * W + iw, best_idx)
    y_offs = element_offset(n, c, oh, ow, syn, syc, syh, syw)
    tl.store(y_ptr + y_offs, best.to(y_ptr.dtype.element_ty), mask=mask)
    if STORE_INDICES:
        tl.store(idx_ptr + y_offs, best_idx.to(tl.int64), mask=mask)


@triton.jit
def max_pool2d_backward_kernel(g_ptr, idx_ptr, dx_ptr, per_image, C, H, W, OH, OW,
                               sgn, sgc, sgh, sgw, sin, sic, sih, siw, sdn, sdc, sdh, sdw,
                               EKH, EKW, SH, SW, PH, PW, DH, DW, NH, NW,
                               DILATED: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """dx[n,c,h,w] = sum of grad[n,c,oh,ow] over the windows whose argmax index is h*W + w.

    Gather: the windows whose dilated span [oh*SH-PH, oh*SH-PH+EKH) covers h are the NH <=
    cdiv(EKH, SH) consecutive oh ending at (h+PH)//SH (same for w); each is checked for
    "h is one of my taps and my index names it". Summed in increasing (oh, ow), fp32.

    Tile: BLOCK input elements per program, storage order of dx; grid (cdiv(C*H*W, BLOCK), N).
    Traffic: NH*NW index reads per input element (cache hits), a grad read only on a hit, one
    write. Memory-bound.
    """
    mask, n, c, ih, iw = image_coords(per_image, C, H, W, CHANNELS_LAST, BLOCK)
    oh_hi = tl.minimum((ih + PH) // SH, OH - 1)
    ow_hi = tl.minimum((iw + PW) // SW, OW - 1)
    oh_lo = (tl.maximum(ih + PH - EKH + 1, 0) + SH - 1) // SH
    ow_lo = (tl.maximum(iw + PW - EKW + 1, 0) + SW - 1) // SW
    target = ih * W + iw
    g_plane = g_ptr + plane_offset(n, c, sgn, sgc)
    i_plane = idx_ptr + plane_offset(n, c, sin, sic)
    acc = tl.zeros((BLOCK,), tl.float32)
    for t in range(0, NH * NW):  # one flat loop: nested runtime loops make ptxas spill in gathers
        j = t // NW
        oh = oh_lo + j
        ow = ow_lo + (t - j * NW)
        ok = mask & (oh <= oh_hi) & (ow <= ow_hi)
        if DILATED:
            # only dilation makes windows whose taps are all padding; their index names none of
            # their taps (it may alias another element), so require (h, w) to be one of the taps
            ok = ok & ((ih + PH - oh * SH) % DH == 0) & ((iw + PW - ow * SW) % DW == 0)
        at = oh.to(tl.int64) * sih + ow.to(tl.int64) * siw
        hit = ok & (tl.load(i_plane + at, mask=ok, other=-1) == target)
        at = oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw
        acc += tl.load(g_plane + at, mask=hit, other=0.0).to(tl.float32)
    dx_offs = element_offset(n, c, ih, iw, sdn, sdc, sdh, sdw)
    tl.store(dx_ptr + dx_offs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


MAX_POOL = Tuned(max_pool2d_kernel, pool_configs(), INTERPRETER_CONFIG, key=["per_image", "KH", "KW"])
MAX_POOL_BACKWARD = Tuned(max_pool2d_backward_kernel, pool_configs(), INTERPRETER_CONFIG,
                          key=["per_image", "NH", "NW"])
_WINDOW_SIG = {name: "i32" for name in ("KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW")}
register_kernel(KernelSpec(
    name="max_pool2d",
    kernel=max_pool2d_kernel,
    signature={"x_ptr": "*{dtype}", "y_ptr": "*{dtype}", "idx_ptr": "*i64",
               **pool_signature({**strides_signature("x", "y"), **_WINDOW_SIG})},
    configs_by_arch=pool_configs(),
    variants=with_unit_strides([dict(CHANNELS_LAST=False, STORE_INDICES=True),
                                dict(CHANNELS_LAST=True, STORE_INDICES=True)], "x", "y"),
))
register_kernel(KernelSpec(
    name="max_pool2d_backward",
    kernel=max_pool2d_backward_kernel,
    signature={"g_ptr": "*{dtype}", "idx_ptr": "*i64", "dx_ptr": "*{dtype}",
               **pool_signature({**strides_signature("g", "i", "d"),
                                 **{k: "i32" for k in ("EKH", "EKW", "SH", "SW", "PH", "PW", "DH", "DW",
                                                       "NH", "NW")}})},
    configs_by_arch=pool_configs(),
    variants=with_unit_strides([dict(DILATED=True, CHANNELS_LAST=False), dict(DILATED=False, CHANNELS_LAST=True)],
                               "g", "i", "d"),
))


# ---------------------------------------------------------------------------------------------
# Custom ops (4-D input; the public function handles unbatched input)
# ---------------------------------------------------------------------------------------------
def _max_out_shape(x: Tensor, kernel, stride, padding, dilation, ceil_mode) -> List[int]:
    N, C, H, W = x.shape
    return [N, C, pooling_output_size(H, kernel[0], stride[0], padding[0], dilation[0], ceil_mode),
            pooling_output_size(W, kernel[1], stride[1], padding[1], dilation[1], ceil_mode)]


@custom_op("tkernels::max_pool2d", mutates_args=())
def max_pool2d_forward(x: Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
                       dilation: List[int], ceil_mode: bool, channels_last: bool,
                       need_indices: bool) -> Tuple[Tensor, Tensor]:
    """(y, indices) in the layout `channels_last` asks for; indices empty unless need_indices."""
    shape = _max_out_shape(x, kernel_size, stride, padding, dilation, ceil_mode)
    y = new_pooled(x, shape, channels_last)
    indices = (new_pooled(x, shape, channels_last, torch.int64) if need_indices
               else x.new_empty(_EMPTY, dtype=torch.int64))
    if _backend.resolve("max_pool2d", x) == "numpy":
        # (float32 input computed in float32: the maximum is exact, and x is not converted)
        y_np, idx_np = ref.max_pool2d_forward(to_numpy(x, product_dtype(x)), kernel_size, stride, padding, dilation,
                                              ceil_mode, compute_dtype=product_dtype(x))
        copy_into(y, y_np)
        if need_indices:
            indices.copy_(torch.from_numpy(idx_np))
        return y, indices
    check_triton_dtype("max_pool2d", x)
    N, C, H, W = x.shape
    launch(MAX_POOL, N, C * shape[2] * shape[3], (x, y, indices), C, H, W, shape[2], shape[3],
           *strides4(x), *strides4(y), *kernel_size, *stride, *padding, *dilation,
           CHANNELS_LAST=channels_last, STORE_INDICES=need_indices)
    return y, indices


@max_pool2d_forward.register_fake
def _(x, kernel_size, stride, padding, dilation, ceil_mode, channels_last, need_indices):
    shape = _max_out_shape(x, kernel_size, stride, padding, dilation, ceil_mode)
    indices = (new_pooled(x, shape, channels_last, torch.int64) if need_indices
               else x.new_empty(_EMPTY, dtype=torch.int64))
    return new_pooled(x, shape, channels_last), indices


@custom_op("tkernels::max_pool2d_backward", mutates_args=())
def max_pool2d_backward(grad_y: Tensor, indices: Tensor, input_size: List[int], kernel_size: List[int],
                        stride: List[int], padding: List[int], dilation: List[int], channels_last: bool) -> Tensor:
    dx = new_pooled(grad_y, input_size, channels_last)
    if _backend.resolve("max_pool2d", grad_y) == "numpy":
        return copy_into(dx, ref.max_pool2d_backward(to_numpy(grad_y), indices.numpy(), input_size,
                                                     kernel_size, stride, padding, dilation))
    N, C, H, W = input_size
    OH, OW = grad_y.shape[2:]
    ekh, ekw = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
    launch(MAX_POOL_BACKWARD, N, C * H * W, (grad_y, indices, dx), C, H, W, OH, OW,
           *strides4(grad_y), *strides4(indices), *strides4(dx), ekh, ekw, *stride, *padding, *dilation,
           cdiv(ekh, stride[0]), cdiv(ekw, stride[1]), DILATED=max(dilation) > 1, CHANNELS_LAST=channels_last)
    return dx


@max_pool2d_backward.register_fake
def _(grad_y, indices, input_size, kernel_size, stride, padding, dilation, channels_last):
    return new_pooled(grad_y, input_size, channels_last)


class MaxPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, kernel_size: IntPair, stride: IntPair, padding: IntPair, dilation: IntPair,
                ceil_mode: bool, channels_last: bool, return_indices: bool):
        need_indices = return_indices or ctx.needs_input_grad[0]
        y, indices = max_pool2d_forward.in_forward(x, kernel_size, stride, padding, dilation, ceil_mode,
                                                   channels_last, need_indices)
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(indices)
        ctx.args = (list(x.shape), kernel_size, stride, padding, dilation, channels_last)
        return y, indices

    @staticmethod
    def backward(ctx, grad_y: Tensor, grad_indices: Optional[Tensor]):
        (indices,) = ctx.saved_tensors
        dx = max_pool2d_backward(grad_y, indices, *ctx.args)
        return dx, None, None, None, None, None, None, None


def max_pool2d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False):
    """``torch.nn.functional.max_pool2d``: NaN propagates, ties go to the first maximum in scan
    order, and ``indices`` are flat h*W + w positions within each input plane."""
    op = "max_pool2d"
    kernel = as_pair(op, "kernel_size", kernel_size)
    stride_ = as_pair(op, "stride", stride, default=kernel)
    padding_ = as_pair(op, "padding", padding)
    dilation_ = as_pair(op, "dilation", dilation)
    check_window(op, kernel, stride_, padding_, dilation_)
    check_pool_input(op, input)
    pooled_shape(op, input, kernel, stride_, padding_, dilation_, ceil_mode)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    y, indices = run_function(MaxPool2dFunction, x, kernel, stride_, padding_, dilation_, bool(ceil_mode),
                              suggests_channels_last(input), bool(return_indices))
    if unbatched:
        y = y.squeeze(0)
        indices = indices.squeeze(0) if return_indices else indices
    return (y, indices) if return_indices else y
