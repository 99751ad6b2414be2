"""Fused 2-D convolution: y = act(conv2d(x, W) + b), forward kernels, custom ops and autograd.

The forward is an implicit GEMM: no im2col buffer is ever written.

    z[m, co] = sum_k X[m, k] * Wt[k, co] (+ bias[co]),   y = act(z)
    m = (n, oh, ow) over N*OH*OW rows,  co over C_out/groups columns (one group per grid column),
    k = (kh, kw, ci) over KH*KW*C_in/groups,
    X[m, k] = x[n, g*C_in_g + ci, oh*sh - pt + kh*dh, ow*sw - pl + kw*dw]  (0 in the padding).

Tiles of X are gathered straight from the input with bounds masks, so any strides work. The
fast path (``FAST``) is channels_last with 8-aligned channel runs (C_in/groups and C_out/groups
multiples of 8, checked on the host): the kernel then knows the channel stride is 1 and the
other strides are multiples of 8, so X, W (re-laid tap-major, a small copy) and y move as
16-byte vectors and larger tiles fit in registers. Two reduction orders:
  * per tap (C_in/groups >= 16): one flattened loop over (kernel position, channel block) pairs,
    so loads stay in flight across kernel positions;
  * flat (C_in/groups < 16, e.g. an RGB stem): walk the flattened (kh, kw, ci) axis, so the
    BLOCK_K >= 16 that ``tl.dot`` needs is filled instead of padded with zeros.
Depthwise-like convs (one input channel per group) are not GEMMs at all; a direct kernel
accumulates per-channel products on the CUDA cores, its tap loop software-pipelined by cp.async
(the weight runs always; the input tiles too when channels_last makes them aligned channel runs). 1x1 stride-1 unpadded convs whose pixels
form a 2-D (pixels, channels) view (channels_last, or a batch of one) are a plain GEMM and go to
:func:`tkernels.ops.matmul.matmul`.

On sm_90 the FAST forward (fp16/bf16) takes its weight tiles through a tensor descriptor (TMA,
``W_TMA``) while the gathered input tiles stay on cp.async (see the kernel docstring for why);
the gate, ``use_tma``, is shared with the backward kernels.

Bias, the optional pre-activation store (kept for backward when act' needs z) and the activation
run in the epilogue on the fp32 accumulator. Conv kernels use num_warps <= 4 (Triton miscompiles
non-1x1 convs at 8: pytorch issue 173068). The backward kernels, the device helpers shared with
them and the tile configs are in ``conv_backward.py``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
import triton
import triton.language as tl

from .. import _backend
from ..activations import Activation, ActivationLike, apply_activation, resolve_activation
from ..reference import conv as ref
from ._autocast import cast_inputs
from ._dispatch import custom_op, run_function
from ._common import (grouped_tile, cdiv, check_floating, check_same, check_triton_dtype, config,
                      from_numpy, operand_class, product_dtype, suggests_channels_last,
                      tl_input_precision, to_numpy)
from . import conv_backward as bwd
from .conv_backward import (aligned8, aligned_channels_last, as_channels_last, channels_last_pays, check_pixel_count,
                            depthwise_family, gather_k_major, is_pointwise, load_channel_run, register_family,
                            register_fast_tma, rows_view, tap_major_depthwise, tuned_family, use_tma)
from .matmul import matmul

_EMPTY = (0,)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _epilogue(acc, bias_ptr, y_ptr, z_ptr, out_offs, co, mask, mask_c, act_param,
              HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PREACT: tl.constexpr):
    """bias, pre-activation store, activation, cast and store of an fp32 [pixels, channels] tile.
    y and z share one layout, so one offset tile serves both."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if STORE_PREACT:
        tl.store(z_ptr + out_offs, acc.to(z_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + out_offs, apply_activation(acc, ACT, act_param).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def conv2d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, z_ptr,
    H, W, C_in_g, C_out_g, OH, OW, KH, KW, M,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxn, sxc, sxh, sxw, swo, swi, swh, sww, syn, syc, syh, syw,
    act_param,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PREACT: tl.constexpr, FLAT_K: tl.constexpr,
    FAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    W_TMA: tl.constexpr = False,
):
    """Implicit-GEMM forward. Tile: BLOCK_M output pixels x BLOCK_N output channels of one group,
    reduction in BLOCK_K steps (>= 16, padded by masks, never the tensor).
    FAST: channels_last x and y and a tap-major weight (KH, KW, C_in_g, C_out), every channel run
    8-aligned (host-checked), so A, B and the output move as 16-byte vectors.
    Grid: (cdiv(M, BLOCK_M) * cdiv(C_out_g, BLOCK_N), groups), tiles in GROUP_M-row bands so
    neighbouring programs reuse the same input rows from L2.
    Traffic: x read C_out_g/BLOCK_N times (x KH*KW gathered from cache), W read M/BLOCK_M times,
    y (and z) written once. Compute-bound for ResNet/VGG layer shapes.
    W_TMA (sm_90, FAST, per-tap path): weight tiles come through a tensor descriptor over the
    contiguous tap-major weight as (KH*KW, C_in_g, C_out), i.e. TMA boxes whose rows past C_in_g
    zero-fill (columns past C_out_g, the next group's, are masked on store). The x tile stays on
    cp.async: its rows are output pixels shifted by the tap (strided by the conv's stride) and cut
    by the padding, which no box of a (pixels, channels) descriptor is; a 4-D (N, H, W, C) one
    would need tiles of whole output rows instead of flat pixels (and strided boxes for stride > 1)."""
    if FAST:
        sxc = 1
        syc = 1
        swo = 1
        sxn, sxh, sxw = aligned8(sxn), aligned8(sxh), aligned8(sxw)
        syn, syh, syw = aligned8(syn), aligned8(syh), aligned8(syw)
        swi, swh, sww = aligned8(swi), aligned8(swh), aligned8(sww)
        C_in_g, C_out_g = aligned8(C_in_g), aligned8(C_out_g)
    pid = tl.program_id(0)
    g = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(C_out_g, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)

    # indices are int32 (M, C and K are < 2**31); every index is widened to int64 before it
    # meets a stride, so offsets into tensors of more than 2**31 elements are exact
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    n = offs_m // (OH * OW)
    ohw = offs_m % (OH * OW)
    oh = ohw // OW
    ow = ohw % OW
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_rows = n.to(tl.int64) * sxn + (g * C_in_g).to(tl.int64) * sxc  # [BLOCK_M] offsets
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C_out_g
    co = g * C_out_g + offs_n
    w_cols = co.to(tl.int64) * swo  # [BLOCK_N] offsets

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        # (kh, kw, ci) flattened, ci fastest; tiles built K-major, see gather_k_major
        K = C_in_g * KH * KW
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            ci = offs_k % C_in_g
            kpos = offs_k // C_in_g
            kh = kpos // KW
            kw = kpos % KW
            ih = ih0[None, :] + (kh * dil_h)[:, None]
            iw = iw0[None, :] + (kw * dil_w)[:, None]
            a_mask = mask_k[:, None] & mask_m[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_offs = x_rows[None, :] + (ci.to(tl.int64) * sxc)[:, None] + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            a = tl.trans(tl.load(x_ptr + a_offs, mask=a_mask, other=0.0))
            b_offs = ci.to(tl.int64) * swi + kh.to(tl.int64) * swh + kw.to(tl.int64) * sww
            b = tl.load(w_ptr + w_cols[None, :] + b_offs[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        # one flattened loop over (kernel position, channel block) pairs: the software pipeline
        # then keeps loads in flight across kernel positions (a nested loop drains it at each one,
        # and with C_in/groups <= BLOCK_K nothing would overlap at all)
        c_blocks = tl.cdiv(C_in_g, BLOCK_K)
        if W_TMA:
            # a tap's stride is C_in_g rows (contiguous weight), whatever stride a size-1 KW dim has
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[KH * KW, C_in_g, C_out_g * tl.num_programs(1)],
                                               strides=[C_in_g * swi, swi, 1], block_shape=[1, BLOCK_K, BLOCK_N])
        for step in range(0, KH * KW * c_blocks):
            kpos = step // c_blocks
            c0 = (step % c_blocks) * BLOCK_K
            kh = kpos // KW
            kw = kpos % KW
            ih = ih0 + kh * dil_h
            iw = iw0 + kw * dil_w
            row_ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_rows = x_rows + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            b_cols = w_cols + kh.to(tl.int64) * swh + kw.to(tl.int64) * sww
            offs_c = c0 + tl.arange(0, BLOCK_K)
            mask_c = offs_c < C_in_g
            a = gather_k_major(x_ptr, a_rows, offs_c.to(tl.int64) * sxc, row_ok, mask_c, FAST)
            if W_TMA:
                b = tl.reshape(w_desc.load([kpos, c0, g * C_out_g + pid_n * BLOCK_N]), [BLOCK_K, BLOCK_N])
            else:
                b = tl.load(w_ptr + b_cols[None, :] + (offs_c.to(tl.int64) * swi)[:, None],
                            mask=mask_c[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    out_rows = n.to(tl.int64) * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw
    out_offs = out_rows[:, None] + (co.to(tl.int64) * syc)[None, :]
    _epilogue(acc, bias_ptr, y_ptr, z_ptr, out_offs, co, mask_m[:, None] & mask_n[None, :], mask_n, act_param,
              HAS_BIAS, ACT, STORE_PREACT)


@triton.jit
def conv2d_depthwise_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, z_ptr,
    H, W, C_out, MULT, OH, OW, KH, KW, M, W_ROW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    act_param,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PREACT: tl.constexpr, FAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr,
):
    """Direct forward for one input channel per group (depthwise, channel multiplier MULT):
    z[m, co] = sum_{kh,kw} x[n, co // MULT, ih, iw] * W[co, 0, kh, kw]. A GEMM would pad K and N
    to 16 for 1 useful lane, so this runs elementwise FMAs on the CUDA cores.
    The weight comes tap-major, (KH*KW, W_ROW) with W_ROW = C_out rounded up to 8 (zero-filled),
    so each tap's BLOCK_C weights are one aligned run that moves by cp.async on every layout.
    FAST: channels_last x and y, C_out 8-aligned and MULT == 1 (host-checked): x's tile is then
    BLOCK_C-contiguous runs at 8-aligned offsets, so it too moves as 16-byte cp.async vectors.
    The tap loop is a ``tl.range`` with STAGES stages: with no tl.dot in it, Triton software-
    pipelines only loops that ask for it, and only loads of >= 4 contiguous aligned bytes.
    Tile: BLOCK_C channels x BLOCK_M pixels, channel-major so the per-pixel index vectors stay
    small in registers. Grid: (cdiv(M, BLOCK_M), cdiv(C_out, BLOCK_C)).
    Traffic: x read about once (the KH*KW taps hit cache), y written once; memory-bound."""
    if FAST:
        sxc = 1
        syc = 1
        sxn, sxh, sxw = aligned8(sxn), aligned8(sxh), aligned8(sxw)
        syn, syh, syw = aligned8(syn), aligned8(syh), aligned8(syw)
        C_out = aligned8(C_out)
    W_ROW = aligned8(W_ROW)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # int32 indices, int64 offsets
    mask_m = offs_m < M
    n = offs_m // (OH * OW)
    ohw = offs_m % (OH * OW)
    oh = ohw // OW
    ow = ohw % OW
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = co < C_out
    if FAST:
        x_chan = co.to(tl.int64)
    else:
        x_chan = (co // MULT).to(tl.int64) * sxc
    x_pix = n.to(tl.int64) * sxn
    acc = tl.zeros((BLOCK_C, BLOCK_M), dtype=tl.float32)
    for kpos in tl.range(0, KH * KW, num_stages=STAGES):
        kh = kpos // KW
        kw = kpos % KW
        ih = ih0 + kh * dil_h
        iw = iw0 + kw * dil_w
        row_ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pix = x_pix + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        xv = tl.load(x_ptr + x_chan[:, None] + pix[None, :], mask=mask_c[:, None] & row_ok[None, :], other=0.0)
        wv = load_channel_run(w_ptr, kpos * W_ROW + tl.program_id(1) * BLOCK_C, (kpos + 1) * W_ROW, BLOCK_C)
        acc += xv.to(tl.float32) * wv.to(tl.float32)[:, None]
    if HAS_BIAS:  # added here: the shared epilogue adds bias along a tile's second axis
        acc += tl.load(bias_ptr + co, mask=mask_c, other=0.0).to(tl.float32)[:, None]
    out_pix = n.to(tl.int64) * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw
    out_offs = (co.to(tl.int64) * syc)[:, None] + out_pix[None, :]
    _epilogue(acc, bias_ptr, y_ptr, z_ptr, out_offs, co, mask_c[:, None] & mask_m[None, :], mask_c, act_param,
              False, ACT, STORE_PREACT)


# ---------------------------------------------------------------------------------------------
# Configs and `tkernels inspect` registrations
# ---------------------------------------------------------------------------------------------
# (the TMA flag is in the key: the TMA and cp.async builds of a tile are tuned apart)
TUNED_FWD = tuned_family(conv2d_fwd_kernel, ["M", "C_in_g", "C_out_g", "KH", "KW", "W_TMA"],
                         interpreter=config(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=4))
_SHAPE_SIG = {name: "i32" for name in ("H", "W", "OH", "OW", "KH", "KW", "M", "stride_h", "stride_w", "pad_h",
                                       "pad_w", "dil_h", "dil_w")}
_FWD_SIG = {"x_ptr": "*{dtype}", "w_ptr": "*{dtype}", "bias_ptr": "*{dtype}", "y_ptr": "*{dtype}",
            "z_ptr": "*{dtype}", **_SHAPE_SIG, "C_in_g": "i32", "C_out_g": "i32",
            **{s: "i32" for s in ("sxn", "sxc", "sxh", "sxw", "swo", "swi", "swh", "sww", "syn", "syc", "syh", "syw")},
            "act_param": "fp32"}
# the heaviest epilogue (gelu_tanh + pre-activation store) on the nested path, and the flat-K path
# (FAST never runs with flat K: it needs C_in/groups >= 16)
_HEAVY = dict(HAS_BIAS=True, ACT=4, STORE_PREACT=True, FLAT_K=False)
# the generic path's tap-major weight as launched for 8-aligned C_out (64 here; the JIT marks
# its strides 16-divisible): unit C_out stride
_TAP_MAJOR = dict(swo=1, swi=64, swh=64 * 3 * 3, sww=64 * 3, C_out_g=64)
register_family("conv2d_fwd", conv2d_fwd_kernel, _FWD_SIG,
                [dict(_HEAVY, **_TAP_MAJOR), dict(HAS_BIAS=True, ACT=1, STORE_PREACT=False, FLAT_K=True, **_TAP_MAJOR)],
                fast_variants=[_HEAVY])
# sm_90's FAST half-precision forward as launched there: weight tiles by TMA (W_TMA)
register_fast_tma("conv2d_fwd_fast_tma", conv2d_fwd_kernel, _FWD_SIG, dict(_HEAVY, W_TMA=True))
# STAGES: the tap loop's software-pipeline depth (cp.async buffers in shared memory); gathered
# (NCHW) tiles keep their int64 addresses per element in registers, so no 128-channel tile
TUNED_DW_FWD = depthwise_family(
    conv2d_depthwise_fwd_kernel, "conv2d_depthwise_fwd",
    {"x_ptr": "*{dtype}", "w_ptr": "*{dtype}", "bias_ptr": "*{dtype}", "y_ptr": "*{dtype}", "z_ptr": "*{dtype}",
     **_SHAPE_SIG, "C_out": "i32", "MULT": "i32", "W_ROW": "i32",
     **{s: "i32" for s in ("sxn", "sxc", "sxh", "sxw", "syn", "syc", "syh", "syw")}, "act_param": "fp32"},
    {True: [config(BLOCK_M=32, BLOCK_C=128, STAGES=3, num_warps=4, num_stages=3),
            config(BLOCK_M=64, BLOCK_C=32, STAGES=3, num_warps=4, num_stages=3),
            config(BLOCK_M=32, BLOCK_C=64, STAGES=3, num_warps=4, num_stages=3)],
     False: [config(BLOCK_M=64, BLOCK_C=16, STAGES=3, num_warps=4, num_stages=3),
             config(BLOCK_M=32, BLOCK_C=32, STAGES=3, num_warps=4, num_stages=3)]},
    ["M", "C_out", "KH", "KW"], config(BLOCK_M=64, BLOCK_C=32, STAGES=2),
    dict(HAS_BIAS=True, ACT=4, STORE_PREACT=True), "C_out", "x", "y")


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def output_size(h: int, w: int, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int]) -> Tuple[int, int]:
    """(OH, OW) for padding = (top, bottom, left, right)."""
    oh = (h + padding[0] + padding[1] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (w + padding[2] + padding[3] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    return oh, ow


def _empty_output(x: Tensor, shape, channels_last: bool) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=fmt)


def _forward_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], y: Tensor, z: Optional[Tensor],
                    stride, padding, dilation, groups: int, act: Activation) -> None:
    n, c_in, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    oh, ow = y.shape[2:]
    m = n * oh * ow
    if m == 0:
        return
    check_pixel_count(x.shape, y.shape)
    if is_pointwise(weight, stride, padding, groups):
        x2d, y2d = rows_view(x), rows_view(y)
        z2d = rows_view(z) if z is not None else None
        if x2d is not None and y2d is not None and (z is None or z2d is not None):
            matmul(x2d, weight[:, :, 0, 0].t(), y2d, bias=bias, activation_code=act.code,
                   activation_param=act.param, preact_out=z2d, precision_of="conv")
            return
    dummy = y
    z_t = z if z is not None else dummy
    bias_t = bias if bias is not None else dummy
    geometry = (*stride, padding[0], padding[2], *dilation)
    common = dict(HAS_BIAS=bias is not None, ACT=act.code, STORE_PREACT=z is not None)
    if c_in_g == 1:
        mult = c_out // c_in
        fast = mult == 1 and c_out % 8 == 0 and aligned_channels_last(x, y)
        kernel, meta = TUNED_DW_FWD[fast].launcher(x.device)
        grid = lambda cfg: (cdiv(m, cfg["BLOCK_M"]), cdiv(c_out, cfg["BLOCK_C"]))  # noqa: E731
        w_taps = tap_major_depthwise(weight.reshape(c_out, kh * kw))
        kernel[grid](x, w_taps, bias_t, y, z_t, h, w, c_out, mult, oh, ow, kh, kw, m, w_taps.shape[1], *geometry,
                     *x.stride(), *y.stride(), float(act.param), **common, FAST=fast, **meta)
        return
    c_out_g = c_out // groups
    if channels_last_pays(c_in_g, c_out_g, x, y):  # e.g. NCHW: run the FAST kernel on channels_last copies
        y_cl = torch.empty_like(y, memory_format=torch.channels_last)
        z_cl = torch.empty_like(z, memory_format=torch.channels_last) if z is not None else None
        _forward_triton(as_channels_last(x), weight, bias, y_cl, z_cl, stride, padding, dilation, groups, act)
        y.copy_(y_cl)
        if z is not None:
            z.copy_(z_cl)
        return
    fast = c_in_g >= 16 and c_in_g % 8 == 0 and c_out_g % 8 == 0 and aligned_channels_last(x, y)
    # tap-major weight (KH, KW, C_in_g, C_out), a small copy: each (tap, ci) row of C_out is one
    # contiguous run, so B tiles load as vectors through cp.async (whenever C_out is 8-aligned) on
    # every path, the generic one (e.g. an RGB stem, whose input is gathered) included
    w_t = weight.permute(2, 3, 1, 0).contiguous()
    w_strides = (w_t.stride(3), w_t.stride(2), w_t.stride(0), w_t.stride(1))
    precision = tl_input_precision(x.dtype, "conv")
    # the descriptor's (tap, ci) strides: C_in_g * C_out and C_out (8-aligned)
    w_tma = fast and use_tma(w_t, (c_in_g * c_out, c_out))
    kernel, meta = TUNED_FWD[fast, operand_class(x.dtype, precision)].launcher(x.device)
    grid = lambda cfg: (cdiv(m, cfg["BLOCK_M"]) * cdiv(c_out_g, cfg["BLOCK_N"]), groups)  # noqa: E731
    kernel[grid](x, w_t, bias_t, y, z_t, h, w, c_in_g, c_out_g, oh, ow, kh, kw, m, *geometry,
                 *x.stride(), *w_strides, *y.stride(), float(act.param),
                 **common, FLAT_K=c_in_g < 16, FAST=fast, INPUT_PRECISION=precision, W_TMA=w_tma, **meta)


# ---------------------------------------------------------------------------------------------
# Custom ops. padding is (top, bottom, left, right): 'same' with an even kernel is asymmetric.
# ---------------------------------------------------------------------------------------------
@custom_op("tkernels::conv2d", mutates_args=())
def conv2d_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int],
                   dilation: List[int], groups: int, activation: str, param: float, save_preact: bool,
                   channels_last: bool) -> Tuple[Tensor, Tensor]:
    """x (N, C_in, H, W) -> (y, z if save_preact else an empty tensor), both (N, C_out, OH, OW)."""
    oh, ow = output_size(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
    shape = (x.shape[0], weight.shape[0], oh, ow)
    if _backend.resolve("conv2d", x) == "numpy":
        dtype = product_dtype(x)
        y, z = ref.conv2d_forward(to_numpy(x, dtype), to_numpy(weight, dtype), to_numpy(bias, dtype), stride, padding,
                                  dilation, groups, activation, param, compute_dtype=dtype)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return (from_numpy(y, x).contiguous(memory_format=fmt),
                from_numpy(z, x).contiguous(memory_format=fmt) if save_preact else x.new_empty(_EMPTY))
    check_triton_dtype("conv2d", x)
    y = _empty_output(x, shape, channels_last)
    z = _empty_output(x, shape, channels_last) if save_preact else None
    _forward_triton(x, weight, bias, y, z, stride, padding, dilation, groups,
                    resolve_activation(Activation(activation, param)))
    return y, (z if z is not None else x.new_empty(_EMPTY))


@conv2d_forward.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, activation, param, save_preact, channels_last):
    oh, ow = output_size(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
    shape = (x.shape[0], weight.shape[0], oh, ow)
    return _empty_output(x, shape, channels_last), (_empty_output(x, shape, channels_last) if save_preact
                                                    else x.new_empty(_EMPTY))


@custom_op("tkernels::conv2d_backward", mutates_args=())
def conv2d_backward(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], saved: Optional[Tensor],
                    stride: List[int], padding: List[int], dilation: List[int], groups: int, activation: str,
                    param: float, need_input: bool, need_weight: bool, need_bias: bool,
                    channels_last: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias); those not asked for come back as empty tensors."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if _backend.resolve("conv2d", x) == "numpy":
        dtype = product_dtype(x)
        dx, dw, db = ref.conv2d_backward(to_numpy(grad_y, dtype), to_numpy(x, dtype), to_numpy(weight, dtype),
                                         to_numpy(bias, dtype), stride, padding, dilation, groups, activation, param,
                                         need_input, compute_dtype=dtype)
        return (from_numpy(dx, x).contiguous(memory_format=fmt) if need_input else x.new_empty(_EMPTY),
                from_numpy(dw, weight) if need_weight else x.new_empty(_EMPTY),
                from_numpy(db, weight) if need_bias else x.new_empty(_EMPTY))
    check_triton_dtype("conv2d", x)
    act = resolve_activation(Activation(activation, param))
    gate = None if act.is_identity else saved
    dx, dw, db = x.new_empty(_EMPTY), x.new_empty(_EMPTY), x.new_empty(_EMPTY)
    if need_input:
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=fmt)
    if need_weight:
        dw = torch.empty(weight.shape, device=x.device, dtype=weight.dtype)
    if need_bias:
        db = torch.empty((weight.shape[0],), device=x.device, dtype=weight.dtype)
    bwd.backward_triton(grad_y, x, weight, gate, act, stride, padding, dilation, groups,
                        dx if need_input else None, dw if need_weight else None, db if need_bias else None)
    return dx, dw, db


@conv2d_backward.register_fake
def _(grad_y, x, weight, bias, saved, stride, padding, dilation, groups, activation, param, need_input,
      need_weight, need_bias, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return (torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=fmt) if need_input
            else x.new_empty(_EMPTY),
            weight.new_empty(weight.shape) if need_weight else x.new_empty(_EMPTY),
            weight.new_empty((weight.shape[0],)) if need_bias else x.new_empty(_EMPTY))


class Conv2dFunction(torch.autograd.Function):
    """Autograd for the fused conv on 4-D input; see :func:`conv2d` for the public entry."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int,
                activation: str, param: float, channels_last: bool):
        act = resolve_activation(Activation(activation, param))
        save_preact = not act.grad_from_output
        y, z = conv2d_forward.in_forward(x, weight, bias, stride, padding, dilation, groups, activation, param,
                              save_preact, channels_last)
        # as for linear: no output kept for identity, so `out += identity` on y stays legal
        ctx.save_for_backward(x, weight, bias, z if save_preact else (None if act.is_identity else y))
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.activation, ctx.param, ctx.channels_last = activation, param, channels_last
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, bias, saved = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        dx, dw, db = conv2d_backward(grad_y, x, weight, bias, saved, *ctx.geometry,
                                     ctx.activation, ctx.param, need_x, need_w, need_b,
                                     ctx.channels_last)
        return (dx if need_x else None, dw if need_w else None, db if need_b else None,
                None, None, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------
# Public entry: torch's argument handling and errors
# ---------------------------------------------------------------------------------------------
IntPair = Union[int, Sequence[int]]


def _pair(op: str, name: str, value: IntPair) -> Tuple[int, int]:
    if isinstance(value, bool) or not isinstance(value, (int, tuple, list, torch.Size)):
        raise TypeError(f"{op}: {name} must be an int or a tuple of 2 ints, but got {type(value).__name__}")
    values = (value, value) if isinstance(value, int) else tuple(value)
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise RuntimeError(f"{op}: expected {name} to be a single integer value or a list of 2 integers to match "
                           f"the convolution dimensions, but got {name}={list(values)}")
    return values


def same_padding(kernel: Sequence[int], dilation: Sequence[int]) -> Tuple[int, int, int, int]:
    """torch's 'same': total = d*(k-1) per side pair, the odd extra pixel on the bottom/right."""
    total_h, total_w = dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1)
    return total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2




def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntPair = 1,
           padding: Union[str, IntPair] = 0, dilation: IntPair = 1, groups: int = 1, *,
           activation: ActivationLike = None) -> Tensor:
    """``torch.nn.functional.conv2d`` with an optional fused activation: act(conv2d(input, weight) + bias).

    Output has the input's dtype and memory format (channels_last in, channels_last out).
    """
    op = "conv2d"
    input, weight, bias = cast_inputs(op, input, weight, bias)
    check_floating(op, "input", input)
    check_floating(op, "weight", weight)
    if bias is not None:
        check_floating(op, "bias", bias)
    check_same(op, "input", input, weight=weight, bias=bias)
    if input.dim() not in (3, 4):
        raise RuntimeError(f"{op}: expected 3-D (unbatched) or 4-D (batched) input, but got input of size "
                           f"{list(input.shape)}")
    if weight.dim() != 4:
        raise RuntimeError(f"{op}: weight must be 4-D (out_channels, in_channels/groups, kH, kW), but got shape "
                           f"{list(weight.shape)}")
    stride = _pair(op, "stride", stride)
    dilation = _pair(op, "dilation", dilation)
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"{op}: groups must be an int, but got {type(groups).__name__}")
    if min(stride) <= 0:
        raise RuntimeError(f"{op}: non-positive stride is not supported, but got stride={list(stride)}")
    if min(dilation) <= 0:
        raise RuntimeError(f"{op}: non-positive dilation is not supported, but got dilation={list(dilation)}")
    if groups <= 0:
        raise RuntimeError(f"{op}: non-positive groups is not supported, but got groups={groups}")
    kernel = tuple(weight.shape[2:])
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0, 0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise RuntimeError(f"{op}: padding='same' is not supported for strided convolutions, "
                                   f"but got stride={list(stride)}")
            pads = same_padding(kernel, dilation)
        else:
            raise RuntimeError(f"{op}: invalid padding string {padding!r}; expected 'valid', 'same' or ints")
    else:
        ph, pw = _pair(op, "padding", padding)
        if min(ph, pw) < 0:
            raise RuntimeError(f"{op}: negative padding is not supported, but got padding={[ph, pw]}")
        pads = (ph, ph, pw, pw)

    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    c_out, c_in_g = weight.shape[:2]
    if c_out == 0 or c_out % groups:
        raise RuntimeError(f"{op}: weight has {c_out} output channels, which must be a positive multiple of "
                           f"groups={groups} (weight of size {list(weight.shape)})")
    if x.shape[1] != c_in_g * groups:
        raise RuntimeError(f"{op}: weight of size {list(weight.shape)} with groups={groups} expects input with "
                           f"{c_in_g * groups} channels, but got input of size {list(input.shape)} with "
                           f"{x.shape[1]} channels")
    padded = (x.shape[2] + pads[0] + pads[1], x.shape[3] + pads[2] + pads[3])
    span = (dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1)
    if padded[0] < span[0] or padded[1] < span[1]:
        raise RuntimeError(f"{op}: the padded input is {padded[0]} x {padded[1]} per channel but the (dilated) "
                           f"kernel is {span[0]} x {span[1]}; the kernel can't be larger than the padded input")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != c_out):
        raise RuntimeError(f"{op}: bias must be 1-D with {c_out} elements to match weight of size "
                           f"{list(weight.shape)}, but got bias of size {list(bias.shape)}")
    act = resolve_activation(activation)
    y = run_function(Conv2dFunction, x, weight, bias, list(stride), list(pads), list(dilation), groups, act.name,
                     float(act.param), suggests_channels_last(x))
    return y.squeeze(0) if unbatched else y
