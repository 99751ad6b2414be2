"""Conv2d backward kernels: input, weight and bias gradients.

s is what forward kept for the activation derivative (y for relu/sigmoid/tanh, else the
pre-activation z; see :mod:`tkernels.activations`).

* **dz and the bias gradient**, one memory-bound pass: dz = dy * act'(s) is written once for
  the two GEMMs below, and db[co] = sum_p dz[p, co] is summed on the way (the activation
  derivative fused into the bias gradient). With no activation, dz is dy itself and the pass
  only sums. Recomputing act' inside the GEMM loops instead would redo it KH*KW times per tile
  and load two tiles per step, which costs the GEMMs their registers.
* **Input gradient**, an implicit GEMM of dz with the flipped weight:
      dx[n, ci, ih, iw] = sum_{co, kh, kw} dz[n, co, oh, ow] * W[co, ci, kh, kw],
      oh = (ih + pt - kh*dh) / sh  when that divides exactly and 0 <= oh < OH (same for ow).
  Input pixels are split into the sh*sw stride phases (ih mod sh, iw mod sw). Inside one phase,
  whether kernel row kh reaches an output row is the same for the whole tile: the taps that do
  form an arithmetic progression (``_phase_taps``), so one flattened loop walks (valid tap,
  channel block) pairs with loads pipelined across taps, and ``oh = i + (rh + pt - kh*dh) / sh``
  needs no per-element division. No dilated copy of dz is built.
* **Weight gradient**, an implicit GEMM reducing over the N*OH*OW output pixels p:
      dW[co, (kh, kw, ci)] = sum_p dz[p, co] * x[n, ci, oh*sh - pt + kh*dh, ow*sw - pl + kw*dw].
Long reductions (weight and bias gradients) are split over SPLIT programs when the output has
too few tiles to fill the GPU; they write fp32 partials and a second kernel sums them in a fixed
order (deterministic, no float atomics).

As in the forward, ``FAST`` variants take channels_last tensors with 8-aligned channel runs and
move them as vectors (NCHW tensors with such channel counts are copied to channels_last first:
``channels_last_pays``) (the weight is re-laid tap-major for the input gradient; the weight
gradient is written tap-major and re-laid into dW). 1x1 stride-1 unpadded convs whose pixels
form a 2-D (pixels, channels) view are GEMMs and reuse the matmul kernel with act' fused into
its loads, as Linear does (dx = dz @ W, dW = dz^T @ X with db as its row sums).
One-input-channel-per-group (depthwise) input gradients use a direct CUDA-core kernel, pipelined
like the depthwise forward. All conv
kernels use num_warps <= 4.

**TMA on sm_90** (fp16/bf16, triton with device-side tensor descriptors): like the forward's
weight tiles, one operand tile of each FAST gradient GEMM comes through a tensor descriptor: the
input gradient's weight tiles (``W_TMA``; boxes zero-fill past C_out/groups inside a group) and
the weight gradient's dz tiles (``DZ_TMA``; when dz's pixels form one (pixels, C_out) matrix).
The other tiles (dz in the input gradient, x in the forward and the weight gradient) are rows of
pixels shifted by a kernel tap, strided and cut by the padding or the output's borders inside a
flat pixel tile, which no box of a (pixels, channels) descriptor is; a 4-D (N, H, W, C)
descriptor would need tiles of whole image rows instead of flat pixels. They stay on cp.async.
``use_tma`` is the one gate of all three (sm_90, dtype, TMA's 16-byte rules; ``FORCE_TMA`` for
tests).

This module also holds what the forward shares with it: the device helpers ``aligned8`` and
``gather_k_major``, the layout predicates and the implicit-GEMM tile configs.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor
import triton
import triton.language as tl

from ..activations import Activation, activation_grad
from ._common import (grouped_tile, KernelSpec, Tuned, cdiv, config, device_properties, operand_class,
                      register_kernel, sm_count, tl_input_precision)
from .matmul import SUM_PARTIALS_BLOCK, matmul, sum_partials_kernel
from . import matmul_tma as _tma
from .matmul_tma import HAS_TENSOR_DESCRIPTORS, ensure_scratch_allocator

# Tests set this to exercise the split-reduction path on small (interpreter-sized) shapes.
FORCE_SPLIT: Optional[int] = None
# Tests set this to run the TMA variants of the FAST kernels (forward and input-gradient weight
# tiles, weight-gradient dz tiles) on CPU tensors, in any dtype, under the interpreter (CUDA tensors
# ignore it and take what a user's call takes).
FORCE_TMA: bool = False


# ---------------------------------------------------------------------------------------------
# Device helpers, shared with the forward kernels in conv.py
# ---------------------------------------------------------------------------------------------
@triton.jit
def aligned8(stride):
    """``stride`` (a multiple of 8, checked on the host) in a form whose divisibility the compiler sees."""
    return (stride // 8) * 8


@triton.jit
def gather_k_major(ptr, row_offs, k_offs, row_ok, k_ok, FAST: tl.constexpr):
    """A [rows, K] tile at ptr + row_offs[r] + k_offs[k]. FAST: K is a contiguous, 8-aligned run,
    loaded as vectors. Otherwise nothing is known about the layout, so the tile is gathered K-major
    ([K, rows], threads along the rows) and transposed: the per-row index vectors then take a
    few registers per thread instead of one register per row."""
    if FAST:
        tile = tl.load(ptr + row_offs[:, None] + k_offs[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    else:
        tile = tl.trans(tl.load(ptr + row_offs[None, :] + k_offs[:, None], mask=k_ok[:, None] & row_ok[None, :],
                                other=0.0))
    return tile


@triton.jit
def load_channel_run(ptr, start, limit, BLOCK: tl.constexpr):
    """ptr[start + i] for i < BLOCK, 0 from ``limit`` on; start and limit even (host-aligned rows).
    cp.async copies >= 4 bytes per thread, but Triton gives a short vector broadcast over a tile
    one element per thread, so 2-byte elements are loaded as 32-bit words (two channels each) and
    split in registers: the load then pipelines in any layout. Wider elements load directly."""
    if ptr.dtype.element_ty.primitive_bitwidth == 16:
        words = ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        offs = start // 2 + tl.arange(0, BLOCK // 2)
        word = tl.load(words + offs, mask=offs < limit // 2, other=0)
        low = (word & 0xFFFF).to(tl.int16).to(ptr.dtype.element_ty, bitcast=True)
        high = (word >> 16).to(tl.int16).to(ptr.dtype.element_ty, bitcast=True)
        run = tl.reshape(tl.join(low, high), [BLOCK])
    else:
        offs = start + tl.arange(0, BLOCK)
        run = tl.load(ptr + offs, mask=offs < limit, other=0.0)
    return run


@triton.jit
def _phase_taps(r, pad, dil, stride, KSIZE):
    """(first, step, count): the kernel positions k in [0, KSIZE) with (r + pad - k*dil) divisible by
    stride, i.e. those that reach an output pixel from input pixels of phase r. They are first,
    first + step, ... with step = stride / gcd(stride, dil); found by scalar loops of <= stride
    iterations, so the main loop need not branch per tap."""
    step = stride
    for p in range(1, stride):  # the smallest p >= 1 with p * dil divisible by stride
        if ((p * dil) % stride == 0) & (p < step):
            step = p
    first = KSIZE
    for k in range(0, step):  # the smallest valid k below step (the pattern repeats with step)
        if ((r + pad - k * dil) % stride == 0) & (k < first):
            first = k
    count = tl.maximum(tl.cdiv(KSIZE - first, step), 0)
    return first, step, count


@triton.jit
def conv2d_dgrad_kernel(
    dz_ptr, w_ptr, dx_ptr,
    H, W, C_in_g, C_out_g, OH, OW, KH, KW, HQ, WQ, M,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sdn, sdc, sdh, sdw, swo, swi, swh, sww, sxn, sxc, sxh, sxw,
    FAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    W_TMA: tl.constexpr = False,
):
    """Input gradient as an implicit GEMM. Rows: the N*HQ*WQ input pixels of one stride phase
    (HQ = cdiv(H, sh)); columns: C_in/groups; reduction: C_out/groups per kernel tap, BLOCK_K >= 16.
    FAST: channels_last dz and dx and a tap-major weight (KH, KW, C_out, C_in_g), all 8-aligned.
    Grid: (cdiv(M, BLOCK_M) * cdiv(C_in_g, BLOCK_N), groups * sh * sw).
    Traffic: dz read about C_in_g/BLOCK_N times, W M/BLOCK_M times, dx written once;
    compute-bound at ResNet/VGG shapes.
    W_TMA (sm_90, FAST): the weight tiles come through a tensor descriptor over the contiguous
    tap-major weight as (KH*KW*groups, C_out_g, C_in_g) (a tap's stride is groups times a group's),
    so a box's rows past C_out_g zero-fill inside the group instead of reading the next group's
    weights against the zero-masked dz columns (0 * inf would be NaN). The dz tile stays on
    cp.async: its rows are the pixels (n, oh, ow) that one phase's tap shifts the tile's input
    pixels to, cut by the output's borders, which no box of a (pixels, channels) descriptor is."""
    if FAST:
        sdc = 1
        swi = 1
        sxc = 1
        sdn, sdh, sdw = aligned8(sdn), aligned8(sdh), aligned8(sdw)
        sxn, sxh, sxw = aligned8(sxn), aligned8(sxh), aligned8(sxw)
        swo, swh, sww = aligned8(swo), aligned8(swh), aligned8(sww)
        C_in_g, C_out_g = aligned8(C_in_g), aligned8(C_out_g)
    pid = tl.program_id(0)
    pid_g = tl.program_id(1)
    phases = stride_h * stride_w
    g = pid_g // phases
    rh = (pid_g % phases) // stride_w
    rw = pid_g % stride_w
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(C_in_g, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)

    # int32 indices, widened to int64 where they meet a stride
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = offs_m // (HQ * WQ)
    i = (offs_m % (HQ * WQ)) // WQ
    j = offs_m % WQ
    ih = rh + i * stride_h
    iw = rw + j * stride_w
    mask_m = (offs_m < M) & (ih < H) & (iw < W)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # ci within the group
    mask_n = offs_n < C_in_g
    co_base = g * C_out_g

    # Kernel rows (and columns) that land between output rows for this phase contribute nothing
    # to the whole tile. The ones that do form a progression kh0, kh0 + step_h, ... (step_h =
    # sh / gcd(sh, dh)); find it with scalar loops, then walk (valid tap, channel block) pairs in
    # ONE flattened loop, so the software pipeline keeps loads in flight across taps.
    kh0, step_h, taps_h = _phase_taps(rh, pad_h, dil_h, stride_h, KH)
    kw0, step_w, taps_w = _phase_taps(rw, pad_w, dil_w, stride_w, KW)
    c_blocks = tl.cdiv(C_out_g, BLOCK_K)
    if W_TMA:
        groups = tl.num_programs(1) // phases
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[KH * KW * groups, C_out_g, C_in_g],
                                           strides=[C_out_g * swo, swo, 1], block_shape=[1, BLOCK_K, BLOCK_N])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, taps_h * taps_w * c_blocks):
        tap = step // c_blocks
        c0 = (step % c_blocks) * BLOCK_K
        kh = kh0 + (tap // taps_w) * step_h
        kw = kw0 + (tap % taps_w) * step_w
        oh = i + (rh + pad_h - kh * dil_h) // stride_h  # exact: the tap is valid for this phase
        ow = j + (rw + pad_w - kw * dil_w) // stride_w
        row_ok = mask_m & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        d_rows = n.to(tl.int64) * sdn + oh.to(tl.int64) * sdh + ow.to(tl.int64) * sdw
        offs_c = c0 + tl.arange(0, BLOCK_K)
        mask_c = offs_c < C_out_g
        co = (co_base + offs_c).to(tl.int64)
        a = gather_k_major(dz_ptr, d_rows, co * sdc, row_ok, mask_c, FAST)
        if W_TMA:
            b = tl.reshape(w_desc.load([(kh * KW + kw) * groups + g, c0, pid_n * BLOCK_N]), [BLOCK_K, BLOCK_N])
        else:
            b_cols = offs_n.to(tl.int64) * swi + kh * swh + kw * sww
            b = tl.load(w_ptr + b_cols[None, :] + (co * swo)[:, None], mask=mask_c[:, None] & mask_n[None, :],
                        other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    ci = (g * C_in_g + offs_n).to(tl.int64)
    dx_offs = (n.to(tl.int64) * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None] + (ci * sxc)[None, :]
    tl.store(dx_ptr + dx_offs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def conv2d_depthwise_dgrad_kernel(
    dz_ptr, w_ptr, dx_ptr,
    H, W, C_in, MULT, OH, OW, KH, KW, M, W_ROW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw,
    FAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr,
):
    """Direct input gradient for one input channel per group (depthwise, channel multiplier MULT):
    dx[n, ci, ih, iw] = sum_{j < MULT, kh, kw} dz[n, ci*MULT + j, oh, ow] * W[ci*MULT + j, 0, kh, kw].
    The weight comes as (KH*KW*MULT, W_ROW) rows (tap, j), each C_in channels rounded up to 8
    (zero-filled): one aligned run per step, moved by cp.async. FAST: channels_last dz and dx, C_in
    8-aligned and MULT == 1 (host-checked), so dz tiles are aligned channel runs and move by
    cp.async too. One flattened ``tl.range`` loop over (tap, j) with STAGES stages (see the forward).
    Tile: BLOCK_C channels x BLOCK_M input pixels, channel-major so the per-pixel index vectors
    stay small in registers. Grid: (cdiv(N*H*W, BLOCK_M), cdiv(C_in, BLOCK_C)).
    Traffic: dz read about once per tap from cache, dx written once; memory-bound."""
    if FAST:
        sdc = 1
        sxc = 1
        MULT = 1
        sdn, sdh, sdw = aligned8(sdn), aligned8(sdh), aligned8(sdw)
        sxn, sxh, sxw = aligned8(sxn), aligned8(sxh), aligned8(sxw)
        C_in = aligned8(C_in)
    W_ROW = aligned8(W_ROW)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # int32 indices, int64 offsets
    mask_m = offs_m < M
    n = offs_m // (H * W)
    ih = (offs_m % (H * W)) // W
    iw = offs_m % W
    ci = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = ci < C_in
    dz_pix = n.to(tl.int64) * sdn
    acc = tl.zeros((BLOCK_C, BLOCK_M), dtype=tl.float32)
    for step in tl.range(0, KH * KW * MULT, num_stages=STAGES):
        kpos = step // MULT
        kh = kpos // KW
        kw = kpos % KW
        th = ih + pad_h - kh * dil_h
        tw = iw + pad_w - kw * dil_w
        oh = th // stride_h
        ow = tw // stride_w
        row_ok = (mask_m & (th >= 0) & (tw >= 0) & (oh * stride_h == th) & (ow * stride_w == tw)
                  & (oh < OH) & (ow < OW))
        pix = dz_pix + oh.to(tl.int64) * sdh + ow.to(tl.int64) * sdw
        co = (ci * MULT + step % MULT).to(tl.int64)
        g = tl.load(dz_ptr + (co * sdc)[:, None] + pix[None, :], mask=mask_c[:, None] & row_ok[None, :], other=0.0)
        wv = load_channel_run(w_ptr, step * W_ROW + tl.program_id(1) * BLOCK_C, (step + 1) * W_ROW, BLOCK_C)
        acc += g.to(tl.float32) * wv.to(tl.float32)[:, None]
    dx_pix = n.to(tl.int64) * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
    dx_offs = (ci.to(tl.int64) * sxc)[:, None] + dx_pix[None, :]
    tl.store(dx_ptr + dx_offs, acc.to(dx_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_m[None, :])


@triton.jit
def conv2d_wgrad_kernel(
    dz_ptr, x_ptr, out_ptr,
    H, W, C_in_g, C_out_g, OH, OW, KH, KW, P, J,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw,
    soo, soi, soh, sow, stride_split,
    SPLIT: tl.constexpr, FAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DZ_TMA: tl.constexpr = False,
):
    """Weight gradient as an implicit GEMM. Rows: C_out/groups; reduction: this program's share
    of the P = N*OH*OW output pixels in BLOCK_K steps; columns J:
    * generic: J = KH*KW*C_in/groups flattened with ci fastest (fills the tile for few channels);
    * FAST (channels_last dz and x, 8-aligned): one kernel tap per grid column, J = C_in/groups,
      so the x tile is a contiguous channel run; dW is written tap-major (KH, KW, C_out, C_in_g).
    Writes dW (SPLIT == 1) or fp32 partials at out_ptr + split * stride_split.
    Grid: (cdiv(C_out_g, BLOCK_M) * cdiv(J, BLOCK_N), groups (* KH*KW if FAST), SPLIT).
    Traffic: dz read J/BLOCK_N times, x C_out_g/BLOCK_M times; compute-bound at large P.
    DZ_TMA (sm_90, FAST, dz's pixels one (P, C_out) matrix of row stride sdw, host-checked): the
    dz tile is a [BLOCK_K, BLOCK_M] box of a descriptor over that matrix, transposed. Rows past P
    zero-fill (a split's share is whole BLOCK_K tiles, so only the last tile before P is cut);
    columns past C_out_g read the next group's channels, which only feed accumulator rows that
    are never stored. The x tile stays on cp.async: its rows are output pixels shifted by the tap,
    strided and cut by the input's borders (padding), which no box of a (pixels, channels)
    descriptor is; a 4-D (N, H, W, C) one would need tiles of whole output rows instead of flat
    pixels (and strided boxes for stride > 1)."""
    if FAST:
        sdc = 1
        sxc = 1
        soi = 1
        sdn, sdh, sdw = aligned8(sdn), aligned8(sdh), aligned8(sdw)
        sxn, sxh, sxw = aligned8(sxn), aligned8(sxh), aligned8(sxw)
        soo, soh, sow = aligned8(soo), aligned8(soh), aligned8(sow)
        C_in_g, C_out_g = aligned8(C_in_g), aligned8(C_out_g)
        J = C_in_g  # (one tap per grid column) an 8-aligned mask edge: the x tile's runs can move by cp.async
    pid = tl.program_id(0)
    pid_s = tl.program_id(2)
    num_pid_m = tl.cdiv(C_out_g, BLOCK_M)
    num_pid_n = tl.cdiv(J, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)

    offs_co = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_co < C_out_g
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_j = offs_j < J
    if FAST:
        g = tl.program_id(1) // (KH * KW)
        kpos = tl.program_id(1) % (KH * KW)
        ci = offs_j
    else:
        g = tl.program_id(1)
        ci = offs_j % C_in_g
        kpos = offs_j // C_in_g
    kh = kpos // KW
    kw = kpos % KW
    co = (g * C_out_g + offs_co).to(tl.int64)
    x_cols = (g * C_in_g + ci).to(tl.int64) * sxc  # [BLOCK_N]
    dh = kh * dil_h - pad_h  # scalar if FAST, else [BLOCK_N]
    dw = kw * dil_w - pad_w

    if DZ_TMA:
        groups = tl.num_programs(1) // (KH * KW)
        dz_desc = tl.make_tensor_descriptor(dz_ptr, shape=[P, C_out_g * groups], strides=[sdw, 1],
                                            block_shape=[BLOCK_K, BLOCK_M])
    p_tiles = tl.cdiv(P, BLOCK_K)
    tiles_per_split = tl.cdiv(p_tiles, SPLIT)
    p_lo = pid_s * tiles_per_split * BLOCK_K
    p_hi = tl.minimum(P, p_lo + tiles_per_split * BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(p_lo, p_hi, BLOCK_K):
        offs_p = p0 + tl.arange(0, BLOCK_K)
        mask_p = offs_p < p_hi
        n = offs_p // (OH * OW)
        oh = (offs_p % (OH * OW)) // OW
        ow = offs_p % OW
        n64 = n.to(tl.int64)
        if DZ_TMA:
            a = tl.trans(dz_desc.load([p0, g * C_out_g + pid_m * BLOCK_M]))
        else:
            d_cols = n64 * sdn + oh.to(tl.int64) * sdh + ow.to(tl.int64) * sdw
            a = tl.load(dz_ptr + (co * sdc)[:, None] + d_cols[None, :], mask=mask_m[:, None] & mask_p[None, :],
                        other=0.0)
        if FAST:
            ih = oh * stride_h + dh
            iw = ow * stride_w + dw
            p_ok = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_rows = n64 * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            b = tl.load(x_ptr + x_rows[:, None] + x_cols[None, :], mask=p_ok[:, None] & mask_j[None, :], other=0.0)
        else:
            ih = (oh * stride_h)[:, None] + dh[None, :]
            iw = (ow * stride_w)[:, None] + dw[None, :]
            b_mask = mask_p[:, None] & mask_j[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            b_offs = (n64 * sxn)[:, None] + x_cols[None, :] + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            b = tl.load(x_ptr + b_offs, mask=b_mask, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    out_offs = (co * soo)[:, None] + (ci.to(tl.int64) * soi + kh * soh + kw * sow)[None, :]
    tl.store(out_ptr + pid_s * stride_split + out_offs, acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_j[None, :])


@triton.jit
def _tile_offsets(n, oh, ow, hw, c, sn, sc, sh, sw, PLANES: tl.constexpr):
    """[pixels, channels] element offsets: pixel (n, hw) of a dense plane, or (n, oh, ow) with any strides."""
    if PLANES:
        pix = n * sn + hw
    else:
        pix = n * sn + oh * sh + ow * sw
    return pix[:, None] + (c * sc)[None, :]


@triton.jit
def conv2d_grad_z_kernel(
    dy_ptr, s_ptr, dz_ptr, db_ptr, P, C, OH, OW, HW,
    sdn, sdc, sdh, sdw, ssn, ssc, ssh, ssw, szn, szc, szh, szw,
    act_param,
    HAS_GATE: tl.constexpr, GATE_ACT: tl.constexpr, STORE_DZ: tl.constexpr, SUM: tl.constexpr,
    SPLIT: tl.constexpr, FAST: tl.constexpr, PLANES: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr,
):
    """dz = dy * act'(s) (just dy without HAS_GATE) over this program's share of the P = N*OH*OW
    pixels: stored to dz if STORE_DZ, and if SUM its per-channel fp32 sum (the bias gradient) is
    written to db_ptr + split * C (partials) or to db (SPLIT == 1), in a fixed order.
    Tile: BLOCK_P pixels x BLOCK_C channels. Grid: (cdiv(C, BLOCK_C), SPLIT); each program walks
    its tiles in a ``tl.range`` loop of STAGES stages, so the loads of later tiles are in flight
    (cp.async) while one is processed, wherever a tile is made of aligned runs of >= 4 bytes:
    * FAST: channels_last dy, s and dz with C and every stride 8-aligned (host-checked): tiles
      are runs of BLOCK_C channels;
    * PLANES: dense NCHW planes (h stride OW, w stride 1) with HW = OH*OW and the n and c strides
      8-aligned (host-checked): a tile is BLOCK_P consecutive pixels of one image (tiles are
      (image, pixel block) pairs), an aligned run per channel;
    * otherwise pixels are gathered by (n, oh, ow) with any strides.
    Traffic: dy (and s) read once, dz written once; memory-bound."""
    if FAST:
        sdc = 1
        ssc = 1
        szc = 1
        sdn, sdh, sdw = aligned8(sdn), aligned8(sdh), aligned8(sdw)
        ssn, ssh, ssw = aligned8(ssn), aligned8(ssh), aligned8(ssw)
        szn, szh, szw = aligned8(szn), aligned8(szh), aligned8(szw)
        C = aligned8(C)
    if PLANES:
        sdw = 1
        ssw = 1
        szw = 1
        sdn, sdc, ssn, ssc = aligned8(sdn), aligned8(sdc), aligned8(ssn), aligned8(ssc)
        szn, szc = aligned8(szn), aligned8(szc)
        HW = aligned8(HW)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    c64 = offs_c.to(tl.int64)
    pid_s = tl.program_id(1)
    if PLANES:
        hw_tiles = tl.cdiv(HW, BLOCK_P)
        tiles = (P // HW) * hw_tiles
    else:
        tiles = tl.cdiv(P, BLOCK_P)
    tiles_per_split = tl.cdiv(tiles, SPLIT)
    t_lo = pid_s * tiles_per_split
    t_hi = tl.minimum(tiles, t_lo + tiles_per_split)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    # gathered tiles (neither layout) would move element by element: registers, no pipelining
    for t in tl.range(t_lo, t_hi, num_stages=STAGES if FAST or PLANES else 1):
        if PLANES:
            n = (t // hw_tiles).to(tl.int64)
            hw = (t % hw_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
            mask_p = hw < HW
            oh = hw  # unused: a plane's pixels are at n * s?n + hw
            ow = hw
        else:
            offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
            mask_p = offs_p < P
            n = (offs_p // (OH * OW)).to(tl.int64)
            oh = ((offs_p % (OH * OW)) // OW).to(tl.int64)
            ow = (offs_p % OW).to(tl.int64)
            hw = ow  # unused
        mask = mask_p[:, None] & mask_c[None, :]
        g = tl.load(dy_ptr + _tile_offsets(n, oh, ow, hw, c64, sdn, sdc, sdh, sdw, PLANES), mask=mask, other=0.0)
        g = g.to(tl.float32)
        if HAS_GATE:
            sv = tl.load(s_ptr + _tile_offsets(n, oh, ow, hw, c64, ssn, ssc, ssh, ssw, PLANES), mask=mask, other=0.0)
            g = g * activation_grad(sv.to(tl.float32), GATE_ACT, act_param)
        if STORE_DZ:
            tl.store(dz_ptr + _tile_offsets(n, oh, ow, hw, c64, szn, szc, szh, szw, PLANES),
                     g.to(dz_ptr.dtype.element_ty), mask=mask)
        if SUM:
            acc += tl.where(mask, g, 0.0)
    if SUM:
        tl.store(db_ptr + pid_s * C + offs_c, tl.sum(acc, axis=0).to(db_ptr.dtype.element_ty), mask=mask_c)


def tap_major_depthwise(w_rows: Tensor) -> Tensor:
    """(channels, R) depthwise weights -> (R, channels rounded up to 8), zero-filled: each of the R
    (tap, ...) rows is then one 16-byte-aligned channel run that the kernels load by cp.async."""
    channels = w_rows.shape[0]
    return torch.nn.functional.pad(w_rows.t(), (0, -channels % 8)).contiguous()


def example_strides(channels_last: bool, c: int, h: int, w: int, *names: str) -> Dict[str, int]:
    """(n, c, h, w) strides of dense (N, c, h, w) tensors, as s<name>n, s<name>c, ... for the
    example launches that `tkernels inspect` compiles."""
    strides = (c * h * w, 1, w * c, c) if channels_last else (c * h * w, h * w, w, 1)
    return {f"s{name}{d}": st for name in names for d, st in zip("nchw", strides)}


# ---------------------------------------------------------------------------------------------
# Configs and `tkernels inspect` registrations (num_warps <= 4 throughout)
# ---------------------------------------------------------------------------------------------
def _tile(m: int, n: int, k: int, stages: int = 3) -> triton.Config:
    return config(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, num_warps=4, num_stages=stages)


# Implicit-GEMM tiles per (FAST, operand class), then per arch; num_warps = 4 throughout. FAST
# (vectorised channels_last) tiles go up to 128x64; generic-layout tiles gather every element with
# its own address and stay at 64x64. fp32 operands take twice the registers (BLOCK_K 16 for
# generic tiles); exact fp32 ("ieee") runs on the FMA units with both operand tiles in registers.
# Each list is what `tkernels inspect` compiles without spills on sm_80 and sm_90, under triton 3.6
# (ptxas 12.8, the GPU image) and 3.9 alike: the exact FAST 32x32 tile steps K by 16, as at 32 the
# weight gradient spilled 8 B under 3.6.
_FAST_HALF = [_tile(128, 64, 32, 4), _tile(64, 128, 32, 4), _tile(64, 64, 64), _tile(64, 32, 32, 4),
              _tile(32, 64, 32, 4)]
_FAST_FP32 = [_tile(64, 128, 32, 4), _tile(64, 64, 32), _tile(64, 32, 32, 4)]
_FAST_EXACT = [_tile(64, 32, 16), _tile(32, 32, 16)]
_GENERIC_HALF = [_tile(64, 64, 32), _tile(64, 32, 32), _tile(32, 64, 32), _tile(16, 64, 32)]
_GENERIC_FP32 = [_tile(64, 32, 16), _tile(32, 64, 16)]
_GENERIC_EXACT = [_tile(64, 32, 16), _tile(32, 32, 16)]
GEMM_CONFIGS = {
    (True, "half"): {"sm_80": _FAST_HALF, "sm_90": [_tile(128, 64, 64)] + _FAST_HALF},
    (True, "tf32"): {"sm_80": _FAST_FP32, "sm_90": _FAST_FP32},
    (True, "ieee"): {"sm_80": _FAST_EXACT, "sm_90": _FAST_EXACT},
    (False, "half"): {"sm_80": _GENERIC_HALF, "sm_90": _GENERIC_HALF},
    (False, "tf32"): {"sm_80": _GENERIC_FP32, "sm_90": _GENERIC_FP32},
    (False, "ieee"): {"sm_80": _GENERIC_EXACT, "sm_90": _GENERIC_EXACT},
}


def tuned_family(kernel, key, interpreter: triton.Config) -> Dict[Tuple[bool, str], Tuned]:
    """One Tuned per (FAST, operand class) config family of an implicit-GEMM kernel."""
    return {family: Tuned(kernel, configs, interpreter=interpreter, key=key)
            for family, configs in GEMM_CONFIGS.items()}


def depthwise_family(kernel, name: str, signature: dict, configs: Dict[bool, List[triton.Config]], key,
                     interpreter: triton.Config, variant: dict, channels: str, *tensors: str) -> Dict[bool, Tuned]:
    """One Tuned per FAST flag of a direct depthwise kernel (channels_last runs carry larger tiles
    than gathered ones), registered for `tkernels inspect` as name_fast and name, each compiled as
    launched on 64 channels at 56x56 (channels_last, resp. NCHW)."""
    tuned = {}
    for fast in (True, False):
        by_arch = {arch: configs[fast] for arch in ("sm_80", "sm_90")}
        register_kernel(KernelSpec(
            name=name + ("_fast" if fast else ""), kernel=kernel, signature=signature, configs_by_arch=by_arch,
            variants=[dict(variant, FAST=fast, MULT=1, W_ROW=64, **{channels: 64},
                           **example_strides(fast, 64, 56, 56, *tensors))]))
        tuned[fast] = Tuned(kernel, by_arch, interpreter=interpreter, key=key)
    return tuned


def register_family(name: str, kernel, signature: dict, variants: List[dict],
                    fast_variants: Optional[List[dict]] = None) -> None:
    """Register each FAST x (half, fp32) family for `tkernels inspect` as name[_fast][_fp32]; the
    fp32 spec is built in both input precisions, each with its own tiles."""
    for fast in (True, False):
        chosen = fast_variants if fast and fast_variants is not None else variants
        for fp32 in (False, True):
            register_kernel(KernelSpec(
                name=name + ("_fast" if fast else "") + ("_fp32" if fp32 else ""), kernel=kernel,
                signature=signature, configs_by_arch=GEMM_CONFIGS[fast, "tf32" if fp32 else "half"],
                fp32_configs={p: GEMM_CONFIGS[fast, p] for p in ("tf32", "ieee")},
                variants=[dict(v, FAST=fast) for v in chosen], dtypes=("fp32",) if fp32 else ("fp16", "bf16"),
                input_precision=True, tensor_cores=True,
            ))


def register_fast_tma(name: str, kernel, signature: dict, variant: dict) -> None:
    """Register sm_90's FAST half-precision build of an implicit-GEMM kernel with its TMA operand
    (``variant`` sets the flag) for `tkernels inspect`: the FAST half tiles, as launched there.
    Triton without device-side descriptors never launches it, so it is not registered there."""
    if HAS_TENSOR_DESCRIPTORS:
        register_kernel(KernelSpec(
            name=name, kernel=kernel, signature=signature,
            configs_by_arch={"sm_90": GEMM_CONFIGS[True, "half"]["sm_90"]},
            variants=[dict(variant, FAST=True)], dtypes=("fp16", "bf16"), input_precision=True,
            tensor_cores=True,
        ))


# (the TMA flags are in the keys: the TMA and cp.async builds of a tile are tuned apart)
TUNED_DGRAD = tuned_family(conv2d_dgrad_kernel,
                           ["M", "C_in_g", "C_out_g", "KH", "KW", "stride_h", "stride_w", "W_TMA"],
                           interpreter=config(BLOCK_M=128, BLOCK_N=32, BLOCK_K=16, GROUP_M=4))
TUNED_WGRAD = tuned_family(conv2d_wgrad_kernel, ["P", "J", "C_out_g", "KH", "KW", "SPLIT", "DZ_TMA"],
                           interpreter=config(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=4))
GRAD_Z_META = dict(BLOCK_P=64, BLOCK_C=32, STAGES=2)

_I32 = "i32"
_GEOMETRY_SIG = {k: _I32 for k in ("H", "W", "OH", "OW", "KH", "KW", "stride_h", "stride_w", "pad_h", "pad_w",
                                   "dil_h", "dil_w")}


def _strides(*names: str) -> dict:
    return {f"s{p}{d}": _I32 for p in names for d in ("n", "c", "h", "w")}


_DGRAD_SIG = {"dz_ptr": "*{dtype}", "w_ptr": "*{dtype}", "dx_ptr": "*{dtype}",
              **_GEOMETRY_SIG, "C_in_g": _I32, "C_out_g": _I32, "HQ": _I32, "WQ": _I32, "M": _I32,
              **_strides("d"), "swo": _I32, "swi": _I32, "swh": _I32, "sww": _I32, **_strides("x")}
_WGRAD_SIG = {"dz_ptr": "*{dtype}", "x_ptr": "*{dtype}", "out_ptr": "*fp32",
              **_GEOMETRY_SIG, "C_in_g": _I32, "C_out_g": _I32, "P": _I32, "J": _I32,
              **_strides("d", "x"), "soo": _I32, "soi": _I32, "soh": _I32, "sow": _I32, "stride_split": _I32}
# the generic input gradient as launched with a channels_last dz (8-aligned C_out, 64 here) and the
# tap-major weight of a 3x3 conv with 12 input channels per group
register_family("conv2d_dgrad", conv2d_dgrad_kernel, _DGRAD_SIG,
                [dict(sdc=1, sdn=64 * 56 * 56, sdh=64 * 56, sdw=64, C_out_g=64, swi=1, swo=12, swh=3 * 64 * 12,
                      sww=64 * 12)],
                fast_variants=[{}])
# out_ptr is the fp32 partials buffer (split) or dW itself; only the store's cast differs
# the generic weight gradient as launched with a channels_last dz (8-aligned C_out, 64 here)
register_family("conv2d_wgrad", conv2d_wgrad_kernel, _WGRAD_SIG,
                [dict(SPLIT=4, sdc=1, sdn=64 * 56 * 56, sdh=64 * 56, sdw=64, C_out_g=64)],
                fast_variants=[dict(SPLIT=4)])
# sm_90's FAST half-precision gradients as launched there: the input gradient's weight tiles and
# the weight gradient's dz tiles (a dense channels_last dz, 64 channels at 56x56) by TMA
register_fast_tma("conv2d_dgrad_fast_tma", conv2d_dgrad_kernel, _DGRAD_SIG, dict(W_TMA=True))
register_fast_tma("conv2d_wgrad_fast_tma", conv2d_wgrad_kernel, _WGRAD_SIG,
                  dict(SPLIT=4, DZ_TMA=True, **example_strides(True, 64, 56, 56, "d")))
# STAGES: the tap loop's software-pipeline depth (cp.async buffers in shared memory); gathered
# (NCHW) tiles keep their int64 addresses per element in registers, so no 128-channel tile
TUNED_DW_DGRAD = depthwise_family(
    conv2d_depthwise_dgrad_kernel, "conv2d_depthwise_dgrad",
    {"dz_ptr": "*{dtype}", "w_ptr": "*{dtype}", "dx_ptr": "*{dtype}",
     **_GEOMETRY_SIG, "C_in": _I32, "MULT": _I32, "M": _I32, "W_ROW": _I32, **_strides("d", "x")},
    {True: [config(BLOCK_M=32, BLOCK_C=128, STAGES=2, num_warps=4, num_stages=2),
            config(BLOCK_M=64, BLOCK_C=32, STAGES=2, num_warps=4, num_stages=2)],
     False: [config(BLOCK_M=64, BLOCK_C=16, STAGES=2, num_warps=4, num_stages=2),
             config(BLOCK_M=32, BLOCK_C=32, STAGES=2, num_warps=4, num_stages=2)]},
    ["M", "C_in", "MULT", "KH", "KW"], config(BLOCK_M=64, BLOCK_C=32, STAGES=2), {}, "C_in", "d", "x")
register_kernel(KernelSpec(
    name="conv2d_grad_z",
    kernel=conv2d_grad_z_kernel,
    signature={"dy_ptr": "*{dtype}", "s_ptr": "*{dtype}", "dz_ptr": "*{dtype}", "db_ptr": "*fp32", "P": _I32,
               "C": _I32, "OH": _I32, "OW": _I32, "HW": _I32, **_strides("d", "s", "z"), "act_param": "fp32"},
    configs_by_arch={arch: [config(num_warps=4, num_stages=2, **GRAD_Z_META)] for arch in ("sm_80", "sm_90")},
    # 64 channels at 56x56: channels_last (FAST), dense NCHW (PLANES), and any other strides
    variants=[dict(HAS_GATE=True, GATE_ACT=4, STORE_DZ=True, SUM=True, SPLIT=8, FAST=True, PLANES=False, C=64,
                   **example_strides(True, 64, 56, 56, "d", "s", "z")),
              dict(HAS_GATE=True, GATE_ACT=4, STORE_DZ=True, SUM=True, SPLIT=8, FAST=False, PLANES=True, C=64, OW=56,
                   HW=56 * 56, **example_strides(False, 64, 56, 56, "d", "s", "z")),
              dict(HAS_GATE=True, GATE_ACT=4, STORE_DZ=True, SUM=True, SPLIT=8, FAST=False, PLANES=False)],
))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _split(programs: int, length: int, device: torch.device) -> int:
    """How many programs share one reduction: enough to fill the GPU when the output is small and
    the reduction long (>= 2048 pixels each); 1 on the interpreter unless a test forces it."""
    if FORCE_SPLIT is not None:
        return max(1, FORCE_SPLIT)
    if device.type != "cuda":
        return 1
    sms = sm_count(device)
    if programs >= sms:
        return 1
    return max(1, min(64, cdiv(2 * sms, programs), length // 2048))


def _reduce_partials(part: Tensor, out: Tensor) -> None:
    """out (contiguous) = sum over part's leading split axis, in a fixed order."""
    numel = out.numel()
    sum_partials_kernel[(cdiv(numel, SUM_PARTIALS_BLOCK),)](part, out, numel, part.shape[0], 1,
                                                             BLOCK=SUM_PARTIALS_BLOCK)


def _grad_z(dy: Tensor, gate: Optional[Tensor], act: Activation, dz: Optional[Tensor], db: Optional[Tensor]) -> None:
    """dz = dy * act'(gate) into dz (if given) and its channel sums into db (if given)."""
    n, c, oh, ow = dy.shape
    p = n * oh * ow
    block_c = GRAD_Z_META["BLOCK_C"]
    split = _split(cdiv(c, block_c), p, dy.device) if db is not None or dz is not None else 1
    if dz is not None and dy.device.type == "cuda":  # writing dz wants the whole GPU even without a sum
        split = max(split, min(64, cdiv(p, 4096)))
    part = None
    if db is not None:
        part = db if split == 1 else torch.empty((split, c), device=dy.device, dtype=torch.float32)
    s = gate if gate is not None else dy
    dz_t = dz if dz is not None else dy
    fast = c % 8 == 0 and aligned_channels_last(dy, s, dz_t)
    conv2d_grad_z_kernel[(cdiv(c, block_c), split)](
        dy, s, dz_t, part if part is not None else dy, p, c, oh, ow, oh * ow, *dy.stride(), *s.stride(),
        *dz_t.stride(), float(act.param), HAS_GATE=gate is not None, GATE_ACT=act.code, STORE_DZ=dz is not None,
        SUM=db is not None, SPLIT=split, FAST=fast, PLANES=not fast and p > 0 and dense_planes(dy, s, dz_t),
        **GRAD_Z_META)
    if db is not None and split > 1:
        _reduce_partials(part, db)


def _weight_grad(dz: Tensor, x: Tensor, dw: Tensor, geometry, groups: int) -> None:
    _, _, h, w = x.shape
    n, c_out, oh, ow = dz.shape
    _, c_in_g, kh, kw = dw.shape
    c_out_g = c_out // groups
    p = n * oh * ow
    fast = c_in_g >= 16 and c_in_g % 8 == 0 and c_out_g % 8 == 0 and aligned_channels_last(dz, x)
    if not fast and c_out_g % 8 == 0 and dz.stride(1) != 1:
        dz = as_channels_last(dz)  # (e.g. an RGB stem) unit-stride C_out runs: dz tiles move through cp.async
    # FAST: one tap per grid column, dW written tap-major (KH, KW, C_out, C_in_g) then re-laid out
    j, taps = (c_in_g, kh * kw) if fast else (c_in_g * kh * kw, 1)
    result_shape = (kh, kw, c_out, c_in_g) if fast else tuple(dw.shape)
    split = _split(cdiv(c_out_g, 64) * cdiv(j, 64) * groups * taps, p, x.device)
    if split > 1:
        target = torch.empty((split, *result_shape), device=x.device, dtype=torch.float32)
    else:
        target = torch.empty(result_shape, device=x.device, dtype=dw.dtype) if fast else dw
    # (co, ci, kh, kw) strides of the layout the kernel writes
    st = target.stride()[1:] if split > 1 else target.stride()
    strides = (st[2], st[3], st[0], st[1]) if fast else st
    precision = tl_input_precision(x.dtype, "conv")
    row_stride = pixel_row_stride(dz) if fast and p > 0 else None  # (no descriptor over an empty dz)
    dz_tma = row_stride is not None and use_tma(dz, (row_stride,))
    kernel, meta = TUNED_WGRAD[fast, operand_class(x.dtype, precision)].launcher(x.device)
    grid = lambda cfg: (cdiv(c_out_g, cfg["BLOCK_M"]) * cdiv(j, cfg["BLOCK_N"]), groups * taps, split)  # noqa: E731
    kernel[grid](dz, x, target, h, w, c_in_g, c_out_g, oh, ow, kh, kw, p, j, *geometry,
                 *dz.stride(), *x.stride(), *strides, dw.numel(),
                 SPLIT=split, FAST=fast, INPUT_PRECISION=precision, DZ_TMA=dz_tma, **meta)
    if split > 1:
        summed = torch.empty(result_shape, device=x.device, dtype=dw.dtype) if fast else dw
        _reduce_partials(target, summed)
        target = summed
    if fast:
        dw.copy_(target.permute(2, 3, 0, 1))


def _input_grad(dz: Tensor, weight: Tensor, dx: Tensor, geometry, groups: int) -> None:
    n, c_in, h, w = dx.shape
    _, _, oh, ow = dz.shape
    c_out, c_in_g, kh, kw = weight.shape
    sh, sw = geometry[:2]
    if c_in_g == 1:
        m = n * h * w
        mult = c_out // c_in
        fast = mult == 1 and c_in % 8 == 0 and aligned_channels_last(dz, dx)
        kernel, meta = TUNED_DW_DGRAD[fast].launcher(dx.device)
        grid = lambda cfg: (cdiv(m, cfg["BLOCK_M"]), cdiv(c_in, cfg["BLOCK_C"]))  # noqa: E731
        # rows (tap, j): W[ci*MULT + j, 0, kh, kw] at row (kh*KW + kw)*MULT + j, column ci
        w_steps = tap_major_depthwise(weight.reshape(c_in, mult, kh * kw).transpose(1, 2).reshape(c_in, -1))
        kernel[grid](dz, w_steps, dx, h, w, c_in, mult, oh, ow, kh, kw, m, w_steps.shape[1], *geometry,
                     *dz.stride(), *dx.stride(), FAST=fast, **meta)
        return
    c_out_g = c_out // groups
    fast = c_in_g % 8 == 0 and c_out_g % 8 == 0 and aligned_channels_last(dz, dx)
    if not fast and c_out_g % 8 == 0 and dz.stride(1) != 1:
        dz = as_channels_last(dz)  # unit-stride C_out runs: the dz tiles move through cp.async
    # tap-major weight (KH, KW, C_out, C_in_g), a small copy: each (tap, co) row of C_in_g is one run
    w_t = weight.permute(2, 3, 0, 1).contiguous()
    w_strides = (w_t.stride(2), w_t.stride(3), w_t.stride(0), w_t.stride(1))
    hq, wq = cdiv(h, sh), cdiv(w, sw)
    m = n * hq * wq
    precision = tl_input_precision(dx.dtype, "conv")
    # the descriptor's (tap * groups + group, co) strides: c_out_g * C_in_g and C_in_g (8-aligned)
    w_tma = fast and use_tma(w_t, (c_out_g * c_in_g, c_in_g))
    kernel, meta = TUNED_DGRAD[fast, operand_class(dx.dtype, precision)].launcher(dx.device)
    grid = lambda cfg: (cdiv(m, cfg["BLOCK_M"]) * cdiv(c_in_g, cfg["BLOCK_N"]), groups * sh * sw)  # noqa: E731
    kernel[grid](dz, w_t, dx, h, w, c_in_g, c_out_g, oh, ow, kh, kw, hq, wq, m, *geometry,
                 *dz.stride(), *w_strides, *dx.stride(),
                 FAST=fast, INPUT_PRECISION=precision, W_TMA=w_tma, **meta)


def use_tma(operand: Tensor, strides: Tuple[int, ...]) -> bool:
    """Whether a FAST conv launch loads ``operand`` through a tensor descriptor whose non-unit
    strides (in elements) are ``strides``: when TMA is enabled (triton's device-side descriptors,
    and not TKERNELS_TMA=0), on sm_90 in fp16/bf16 (CPU tensors under the interpreter: when a test
    sets FORCE_TMA), and when TMA's rules hold: a 16-byte aligned base and strides that are 16-byte
    multiples. Sets up the descriptors' scratch allocator on CUDA."""
    if not _tma.TMA_ENABLED:  # (no descriptors in this triton, or TKERNELS_TMA=0)
        return False
    if operand.is_cuda:  # (FORCE_TMA is for the interpreter: a GPU launches what a user's call would)
        if operand.dtype not in (torch.float16, torch.bfloat16) or device_properties(operand.device).major != 9:
            return False
    elif not FORCE_TMA:
        return False
    if not _tma.tma_aligned(operand, strides):
        return False
    if operand.is_cuda:
        ensure_scratch_allocator()
    return True


def pixel_row_stride(t: Tensor) -> Optional[int]:
    """s such that pixel p = (n * H + h) * W + w of a channels_last tensor sits at p * s (its pixels
    form one (N*H*W, C) matrix), when s is a multiple of 8 (the FAST kernels' assumption); else None."""
    n, _, h, w = t.shape
    sn, _, sh, sw = t.stride()
    uniform = (h == 1 or sh == w * sw) and (n == 1 or sn == h * w * sw)
    return sw if uniform and sw > 0 and sw % 8 == 0 else None


# Pixel indices are int32 in the kernels (offsets are int64): N*H*W must stay clear of 2**31.
MAX_PIXELS = 2**31 - 2**16


def check_pixel_count(x_shape, out_shape) -> None:
    pixels = max(x_shape[0] * x_shape[2] * x_shape[3], out_shape[0] * out_shape[2] * out_shape[3])
    if pixels > MAX_PIXELS:
        raise RuntimeError(f"conv2d: the triton kernels index at most {MAX_PIXELS} pixels per channel (N*H*W), "
                           f"but got input {list(x_shape)} and output {list(out_shape)}; split the batch")


def rows_view(t: Tensor) -> Optional[Tensor]:
    """(N*H*W, C) view of an NCHW-shaped tensor whose channels are its innermost dense axis, else None."""
    try:
        return t.permute(0, 2, 3, 1).view(-1, t.shape[1])
    except RuntimeError:
        return None


def aligned_channels_last(*tensors: Tensor) -> bool:
    """Unit channel stride and every other stride (of a dim longer than 1) a multiple of 8: the
    layout the FAST kernel variants assume, so that channel runs load as 16-byte vectors."""
    return all(t.stride(1) == 1 and all(st % 8 == 0 for d, st in enumerate(t.stride()) if d != 1 and t.shape[d] > 1)
               for t in tensors)


def channels_last_pays(c_in_g: int, c_out_g: int, *tensors: Tensor) -> bool:
    """Whether to run the FAST (vectorised, cp.async-pipelined) kernels on channels_last copies of
    tensors that are not laid out for them (e.g. torch's default NCHW): the channel counts allow
    them (>= 16 input channels, 8-aligned runs) and one copy of each tensor (memory-bound) is
    cheap next to an implicit GEMM that gathers element by element with no async copies."""
    return c_in_g >= 16 and c_in_g % 8 == 0 and c_out_g % 8 == 0 and not aligned_channels_last(*tensors)


def dense_planes(*tensors: Tensor) -> bool:
    """Each (h, w) plane is dense and row-major (w stride 1, h stride W), as in NCHW, and planes
    start 8-aligned (H*W and the n and c strides multiples of 8): a run of pixels of one image and
    channel is then an aligned vector."""
    return all(t.stride(3) == 1 and t.stride(2) == t.shape[3] and t.shape[2] * t.shape[3] % 8 == 0
               and t.stride(0) % 8 == 0 and t.stride(1) % 8 == 0 for t in tensors)


def as_channels_last(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def is_pointwise(weight: Tensor, stride, padding, groups: int) -> bool:
    """A 1x1, stride-1, unpadded, ungrouped conv: exactly a GEMM over the pixels."""
    return tuple(weight.shape[2:]) == (1, 1) and tuple(stride) == (1, 1) and not any(padding) and groups == 1


def _pointwise_backward(dy: Tensor, gate: Optional[Tensor], x: Tensor, weight: Tensor, act: Activation,
                        dx: Optional[Tensor], dw: Optional[Tensor], db: Optional[Tensor]) -> bool:
    """1x1 stride-1 unpadded conv whose pixels form 2-D views: Linear's two GEMMs with act' fused
    into their loads. False (nothing done) if a layout forbids the views."""
    views = [rows_view(t) for t in (dy, x, gate, dx) if t is not None]
    if any(v is None for v in views):
        return False
    dy2d, x2d = rows_view(dy), rows_view(x)
    g2d = rows_view(gate) if gate is not None else None
    w2d = weight[:, :, 0, 0]
    if dx is not None:  # dX = dZ @ W
        matmul(dy2d, w2d, rows_view(dx), gate=g2d, gate_activation_code=act.code, activation_param=act.param,
               precision_of="conv")
    if dw is not None:  # dW = dZ^T @ X, db its row sums
        matmul(dy2d.t(), x2d, dw[:, :, 0, 0], gate=None if g2d is None else g2d.t(), gate_activation_code=act.code,
               activation_param=act.param, rowsum_out=db, precision_of="conv")
    elif db is not None:
        _grad_z(dy, gate, act, None, db)
    return True


def backward_triton(dy: Tensor, x: Tensor, weight: Tensor, gate: Optional[Tensor], act: Activation, stride, padding,
                    dilation, groups: int, dx: Optional[Tensor], dw: Optional[Tensor], db: Optional[Tensor]) -> None:
    """Fill whichever of dx, dw (contiguous) and db (contiguous) are given. gate is what forward kept
    for act' (None for identity); it has the output's layout, which dz takes too."""
    check_pixel_count(x.shape, dy.shape)
    if is_pointwise(weight, stride, padding, groups) and _pointwise_backward(dy, gate, x, weight, act, dx, dw, db):
        return
    geometry = (*stride, padding[0], padding[2], *dilation)
    need_gemm = (dx is not None and dx.numel() > 0) or (dw is not None and dw.numel() > 0)
    # NCHW (or other unaligned) operands with FAST-able channels: dz is made channels_last, x and
    # dx go through channels_last copies, and the GEMMs take the FAST kernels
    convert = need_gemm and channels_last_pays(weight.shape[1], weight.shape[0] // groups, dy, x)
    dz = as_channels_last(dy) if convert and gate is None else dy
    if gate is not None and need_gemm:
        dz = torch.empty_like(gate, memory_format=torch.channels_last if convert else torch.preserve_format)
        _grad_z(dy, gate, act, dz, db)
    elif db is not None:
        _grad_z(dy, gate, act, None, db)
    if dx is not None and dx.numel():
        dx_target = torch.empty_like(dx, memory_format=torch.channels_last) if convert else dx
        _input_grad(dz, weight, dx_target, geometry, groups)
        if dx_target is not dx:
            dx.copy_(dx_target)
    if dw is not None and dw.numel():
        _weight_grad(dz, as_channels_last(x) if convert else x, dw, geometry, groups)
