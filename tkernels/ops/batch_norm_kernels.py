"""Batch-norm kernels and their launchers; the custom ops and autograd live in :mod:`.batch_norm`.

Geometry. Input x is (N, C, *spatial). Every kernel sees it as a 2-D tile space
[channels] x [reduction positions], where the reduction positions (N and the spatial dims) are
merged, in x's storage order, into one *inner* run of S positions (stride ``ss``) and up to three
*outer* indices (o0, o1, o2). Contiguous NCHW gives outer=(N,), inner=H*W with stride 1;
channels_last and (N, C) give no outer index and inner=N*H*W with stride C; padded or permuted
views keep whatever does not merge as outer indices. No copy is made for any of these. A *work
item* is one (outer index, BLOCK_S run of the inner dim); each tile is BLOCK_C x BLOCK_S. Tile
shapes are tuned separately for the two orientations (spatial-inner: few channels, long runs;
channels-inner: many channels, short runs) so that loads are coalesced in both.

Statistics are fp32 and shifted: each channel's first value p ("pivot", an exact input value)
is subtracted before anything is summed, and the mean is kept as the unevaluated pair
(p, mean - p). With mean 1e4 and std 1e-2 the fp32 mean itself cannot resolve the data
(its ulp is 1e-3), but x - p is exact and mean - p is accurate to fp32 relative precision.

The stats tensor (5, C) fp32, rows: 0 count, 1 pivot, 2 mean - pivot, 3 M2 (sum of squared
deviations), 4 invstd. The same layout is a "partial" that the combine kernel merges, so
SyncBatchNorm can all-gather per-process stats and merge them with the same kernel.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..activations import activation_grad, apply_activation
from ._common import KernelSpec, Tuned, cdiv, config, register_kernel, sm_count

STATS_ROWS = 5  # count, pivot, mean - pivot, m2, invstd
PARTIAL_ROWS = 4  # count, pivot, mean - pivot, m2
MAX_OUTER = 3


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _split_item(item, nsb, O1, O2, BLOCK_S: tl.constexpr):
    """Work item -> outer indices (o0, o1, o2) and the first inner position s0, in int64."""
    sb = item % nsb
    o = item // nsb
    o2 = o % O2
    o1 = (o // O2) % O1
    o0 = o // (O2 * O1)
    return o0.to(tl.int64), o1.to(tl.int64), o2.to(tl.int64), sb.to(tl.int64) * BLOCK_S


@triton.jit
def _elementwise_tile(pid, C, S, O1, O2, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """The BLOCK_C x BLOCK_S tile of program `pid` in the one-pass (apply, input-gradient) kernels:
    channel blocks vary fastest, then the (outer item, spatial block) work items."""
    n_cb = (C + BLOCK_C - 1) // BLOCK_C
    nsb = (S + BLOCK_S - 1) // BLOCK_S
    o0, o1, o2, s0 = _split_item(pid // n_cb, nsb, O1, O2, BLOCK_S)
    offs_c = (pid % n_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    offs_s = s0 + tl.arange(0, BLOCK_S)
    return o0, o1, o2, offs_c.to(tl.int64), mask_c, offs_s, mask_c[:, None] & (offs_s < S)[None, :]


@triton.jit
def _channel_params(stats_ptr, rm_ptr, rv_ptr, w_ptr, b_ptr, offs_c, mask_c, C, eps,
                    TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per-channel fp32 (pivot, mean - pivot, invstd, gamma, beta): batch stats in training,
    running stats in eval (pivot = running mean, so x - pivot is formed before any scaling)."""
    if TRAINING:
        pivot = tl.load(stats_ptr + 1 * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        mean = tl.load(stats_ptr + 2 * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        invstd = tl.load(stats_ptr + 4 * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    else:
        pivot = tl.load(rm_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        mean = tl.zeros_like(pivot)  # (not pivot * 0: that is NaN for an infinite running mean)
        invstd = 1.0 / tl.sqrt(tl.load(rv_ptr + offs_c, mask=mask_c, other=1.0).to(tl.float32) + eps)
    gamma, beta = _affine(w_ptr, b_ptr, offs_c, mask_c, pivot, HAS_WEIGHT, HAS_BIAS)
    return pivot, mean, invstd, gamma, beta


@triton.jit
def _affine(w_ptr, b_ptr, offs_c, mask_c, like, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per-channel fp32 (gamma, beta), shaped like `like`: 1 and 0 where absent."""
    if HAS_WEIGHT:
        gamma = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    else:
        gamma = tl.full(like.shape, 1.0, tl.float32)
    if HAS_BIAS:
        beta = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    else:
        beta = tl.zeros_like(like)
    return gamma, beta


@triton.jit
def _mean_update(mean, value, weight):
    """A Welford / Chan mean step written as mean (1 - w) + value w rather than mean + (value - mean) w:
    the same for finite values, and once an Inf is in, inf - inf = NaN is never formed, so the mean
    stays +-Inf as torch's plain sum does (and becomes NaN for inf + -inf or a NaN). (w = 1 only for
    a first value, where mean is still 0.) No extra select per element."""
    return mean * (1.0 - weight) + value * weight


@triton.jit
def _load_pivot(x_ptr, offs_c64, mask_c, sxc):
    """Each channel's first value as fp32 (kernels run only on non-empty inputs, so it exists);
    an Inf/NaN pivot would poison every x - p, so it is replaced by 0."""
    pivot = tl.load(x_ptr + offs_c64 * sxc, mask=mask_c, other=0.0).to(tl.float32)
    return tl.where(tl.abs(pivot) < float("inf"), pivot, 0.0)


@triton.jit
def _item_tile(item, end, nsb, S, O1, O2, mask_c, BLOCK_S: tl.constexpr):
    """Outer indices, inner positions, valid positions and tile mask of work item `item`;
    nothing is valid unless item < end (the second item of a pair past the end of a range)."""
    o0, o1, o2, s0 = _split_item(item, nsb, O1, O2, BLOCK_S)
    lanes = tl.arange(0, BLOCK_S)
    # compared in int32 against the positions left in this run (< S, so no overflow): one compare
    # per element instead of a 64-bit pair
    valid = lanes < tl.where(item < end, S - (item % nsb) * BLOCK_S, 0)
    offs_s = s0 + lanes
    return o0, o1, o2, offs_s, valid, mask_c[:, None] & valid[None, :]


@triton.jit
def _welford_step(lane_count, mean, m2, d, valid, mask):
    """One Welford update of every lane by its value d (lanes whose position is not valid keep
    their state: step 0, and d is finite there since it is 0 - pivot)."""
    lane_count += valid.to(tl.float32)
    step = tl.where(valid, 1.0 / tl.maximum(lane_count, 1.0), 0.0)
    delta = d - mean
    mean = _mean_update(mean, d, step[None, :])
    m2 += tl.where(mask, delta * (d - mean), 0.0)
    return lane_count, mean, m2


@triton.jit
def _welford_items(x_ptr, pivot, offs_c64, mask_c, start, end, nsb, S, O1, O2, sx0, sx1, sx2, sxc, sxs,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr):
    """Per-channel (count, mean - pivot, M2) of work items [start, end). Each of the
    BLOCK_C x BLOCK_S lanes runs Welford's update on x - pivot (no cross-lane traffic inside the
    loop); at the end the lanes are merged with the exact K-group formula
    mean = sum(n_s mean_s) / n, M2 = sum(M2_s + n_s (mean_s - mean)^2).

    Items are taken in pairs: both tiles are loaded before either is used, so each thread has two
    independent loads in flight per iteration (twice the bytes in flight of a one-tile loop, at the
    cost of one more tile of registers, not of more accumulators). Each lane still sees its values
    in item order, so the result is bit-for-bit that of a one-tile loop. With STAGES > 1 (and unit
    stride, so loads are >= 4 bytes wide) Triton's pipeliner turns the loads into cp.async copies
    issued STAGES - 1 iterations ahead into shared memory: 2 * (STAGES - 1) tiles in flight."""
    lane_count = tl.zeros([BLOCK_S], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    tile_c = offs_c64[:, None] * sxc
    for item in tl.range(start, end, 2, num_stages=STAGES):
        o0, o1, o2, offs_s, valid_a, mask_a = _item_tile(item, end, nsb, S, O1, O2, mask_c, BLOCK_S)
        q0, q1, q2, offs_t, valid_b, mask_b = _item_tile(item + 1, end, nsb, S, O1, O2, mask_c, BLOCK_S)
        a = tl.load(x_ptr + (o0 * sx0 + o1 * sx1 + o2 * sx2) + tile_c + offs_s[None, :] * sxs, mask=mask_a, other=0.0)
        b = tl.load(x_ptr + (q0 * sx0 + q1 * sx1 + q2 * sx2) + tile_c + offs_t[None, :] * sxs, mask=mask_b, other=0.0)
        lane_count, mean, m2 = _welford_step(lane_count, mean, m2, a.to(tl.float32) - pivot[:, None], valid_a, mask_a)
        lane_count, mean, m2 = _welford_step(lane_count, mean, m2, b.to(tl.float32) - pivot[:, None], valid_b, mask_b)
    count = tl.sum(lane_count, axis=0)
    chan_mean = tl.sum(mean * lane_count[None, :], axis=1) / tl.maximum(count, 1.0)
    spread = mean - chan_mean[:, None]
    chan_m2 = tl.sum(m2 + spread * spread * lane_count[None, :], axis=1)
    return count, chan_mean, chan_m2


@triton.jit
def _finish_stats(stats_ptr, rm_ptr, rv_ptr, offs64, mask, C, count, ref, mean, m2, momentum, eps,
                  HAS_RUNNING: tl.constexpr):
    """Write the (5, C) stats of merged per-channel (count, pivot, mean - pivot, M2), update the
    running stats in place (unbiased variance; untouched where the count is 0); returns invstd."""
    var = m2 / tl.maximum(count, 1.0)
    out = stats_ptr + offs64
    tl.store(out, count, mask=mask)
    tl.store(out + C, ref, mask=mask)
    tl.store(out + 2 * C, mean, mask=mask)
    tl.store(out + 3 * C, m2, mask=mask)
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(out + 4 * C, invstd, mask=mask)
    if HAS_RUNNING:
        seen = mask & (count > 0.0)
        rm = tl.load(rm_ptr + offs64, mask=seen, other=0.0).to(tl.float32)
        rv = tl.load(rv_ptr + offs64, mask=seen, other=0.0).to(tl.float32)
        rm = (1.0 - momentum) * rm + momentum * (ref + mean)
        rv = (1.0 - momentum) * rv + momentum * (m2 / (count - 1.0))
        tl.store(rm_ptr + offs64, rm.to(rm_ptr.dtype.element_ty), mask=seen)
        tl.store(rv_ptr + offs64, rv.to(rv_ptr.dtype.element_ty), mask=seen)
    return invstd


@triton.jit
def _normalise_tile(x_ptr, y_ptr, x_base, y_base, offs_c64, offs_s, mask, pivot, scale, shift,
                    sxc, sxs, syc, sys, ACT: tl.constexpr, act_param):
    """y = act((x - pivot) * scale + shift) on one BLOCK_C x BLOCK_S tile."""
    x = tl.load(x_ptr + x_base + offs_c64[:, None] * sxc + offs_s[None, :] * sxs, mask=mask, other=0.0)
    z = (x.to(tl.float32) - pivot[:, None]) * scale[:, None] + shift[:, None]
    y = apply_activation(z, ACT, act_param)
    tl.store(y_ptr + y_base + offs_c64[:, None] * syc + offs_s[None, :] * sys, y.to(y_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _act_derivative(z, ACT: tl.constexpr, param):
    """act'(z) from the recomputed pre-activation; relu/sigmoid/tanh take theirs from act(z)."""
    if (ACT == 1 or ACT == 6) or ACT == 7:  # in pairs: older triton refuses A or B or C
        return activation_grad(apply_activation(z, ACT, param), ACT, param)
    else:
        return activation_grad(z, ACT, param)


@triton.jit
def _dz_x_hat(x, g, mask, pivot, mean, invstd, gamma, beta, ACT: tl.constexpr, act_param):
    """(dz = dy * act'(z), x_hat) in fp32 for one tile of loaded x and dy; dz is 0 outside mask."""
    x_hat = ((x.to(tl.float32) - pivot[:, None]) - mean[:, None]) * invstd[:, None]
    dz = g.to(tl.float32)
    if ACT != 0:
        dz = dz * _act_derivative(x_hat * gamma[:, None] + beta[:, None], ACT, act_param)
    return tl.where(mask, dz, 0.0), x_hat


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def bn_stats_partial_kernel(x_ptr, part_ptr, C, S, O, O1, O2, sx0, sx1, sx2, sxc, sxs,
                            BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr):
    """Per-channel (count, pivot, mean - pivot, M2) of one contiguous range of work items.

    Grid (cdiv(C, BLOCK_C), G): program (i, g) takes channels [i*BLOCK_C, ...) and the g-th of G
    equal ranges of the O*cdiv(S, BLOCK_S) work items, so small-C / large-N*H*W inputs still
    spread over G*cdiv(C, BLOCK_C) programs (lane-wise Welford, see _welford_items).
    Writes part[g] (4 rows x C fp32). Reads x once (N*C*S elements): memory-bound.
    """
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    offs_c64 = offs_c.to(tl.int64)
    nsb = (S + BLOCK_S - 1) // BLOCK_S
    total = O * nsb
    per = (total + tl.num_programs(1) - 1) // tl.num_programs(1)
    start = split * per
    end = tl.minimum(start + per, total)
    pivot = _load_pivot(x_ptr, offs_c64, mask_c, sxc)
    count, chan_mean, chan_m2 = _welford_items(x_ptr, pivot, offs_c64, mask_c, start, end, nsb, S, O1, O2,
                                               sx0, sx1, sx2, sxc, sxs, BLOCK_C, BLOCK_S, STAGES)
    row = part_ptr + split.to(tl.int64) * (4 * C) + offs_c64
    # count broadcast to the channels with zeros_like, not `chan_mean * 0 + count`: a NaN or Inf in
    # the batch makes chan_mean non-finite, and a NaN count would drop the partial (and so leave
    # the running stats untouched instead of NaN/Inf like torch's)
    tl.store(row, tl.zeros_like(chan_mean) + count, mask=mask_c)
    tl.store(row + C, pivot, mask=mask_c)
    tl.store(row + 2 * C, chan_mean, mask=mask_c)
    tl.store(row + 3 * C, chan_m2, mask=mask_c)


@triton.jit
def bn_stats_combine_kernel(part_ptr, stats_ptr, rm_ptr, rv_ptr, C, G, part_stride, momentum, eps,
                            HAS_RUNNING: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr):
    """Merge G partials (count, pivot, mean - pivot, M2) per channel; write the (5, C) stats and
    update the running stats in place (unbiased variance; untouched where the count is 0).

    Grid (cdiv(C, BLOCK),). Partials are read BLOCK_G at a time (one [BLOCK_G, BLOCK] tile per
    row: G can be ~1000 for small C, and a loop of one partial per iteration would wait a memory
    latency per partial), in a fixed order (deterministic). Every partial is rebased to the first
    non-empty partial's pivot; a chunk is merged with the exact K-group formula
    mean_k = sum(n_b mean_b) / n_k, M2_k = sum(M2_b + n_b (mean_b - mean_k)^2), and chunks are
    merged in order with Chan's formula: delta = mean_k - mean, mean += delta * n_k / n,
    M2 += M2_k + delta^2 * n_a * n_k / n. Reads G*4*C floats; tiny.
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < C
    offs64 = offs.to(tl.int64)
    count = tl.zeros([BLOCK], dtype=tl.float32)
    ref = tl.zeros([BLOCK], dtype=tl.float32)
    mean = tl.zeros([BLOCK], dtype=tl.float32)
    m2 = tl.zeros([BLOCK], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        tile_mask = (offs_g < G)[:, None] & mask[None, :]
        rows = part_ptr + offs_g[:, None] * part_stride + offs64[None, :]  # G * 5 * C is small: int32 rows
        n_b = tl.load(rows, mask=tile_mask, other=0.0).to(tl.float32)
        p_b = tl.load(rows + C, mask=tile_mask, other=0.0).to(tl.float32)
        m_b = tl.load(rows + 2 * C, mask=tile_mask, other=0.0).to(tl.float32)
        q_b = tl.load(rows + 3 * C, mask=tile_mask, other=0.0).to(tl.float32)
        has = n_b > 0.0
        # the pivot of the first non-empty partial becomes the reference while nothing is merged yet
        first = tl.min(tl.where(has, offs_g[:, None], G + BLOCK_G), axis=0)
        chunk_ref = tl.sum(tl.where(offs_g[:, None] == first[None, :], p_b, 0.0), axis=0)
        ref = tl.where(count == 0.0, chunk_ref, ref)
        value = tl.where(has, (p_b - ref[None, :]) + m_b, 0.0)
        n_k = tl.sum(n_b, axis=0)
        mean_k = tl.sum(tl.where(has, n_b * value, 0.0), axis=0) / tl.maximum(n_k, 1.0)
        spread = value - mean_k[None, :]
        m2_k = tl.sum(tl.where(has, q_b + spread * spread * n_b, 0.0), axis=0)
        chunk_has = n_k > 0.0
        merged = count + n_k
        w = tl.where(chunk_has, n_k / tl.maximum(merged, 1.0), 0.0)
        delta = tl.where(chunk_has, mean_k - mean, 0.0)
        mean = tl.where(chunk_has, _mean_update(mean, mean_k, w), mean)
        m2 += tl.where(chunk_has, m2_k + delta * delta * count * w, 0.0)
        count = merged
    _finish_stats(stats_ptr, rm_ptr, rv_ptr, offs64, mask, C, count, ref, mean, m2, momentum, eps, HAS_RUNNING)


@triton.jit
def bn_apply_kernel(x_ptr, y_ptr, stats_ptr, rm_ptr, rv_ptr, w_ptr, b_ptr, C, S, O1, O2,
                    sx0, sx1, sx2, sxc, sxs, sy0, sy1, sy2, syc, sys, eps, act_param,
                    TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """y = act((x - pivot) * scale + shift), with scale = gamma * invstd and
    shift = beta - (mean - pivot) * scale folded per channel from the batch stats (training) or
    the running stats (eval; pivot = running mean). One elementwise pass.

    Grid (cdiv(C, BLOCK_C) * work items,), one BLOCK_C x BLOCK_S tile per program. Reads x,
    writes y (2 * N*C*S elements): memory-bound.
    """
    pid = tl.program_id(0)
    o0, o1, o2, offs_c64, mask_c, offs_s, mask = _elementwise_tile(pid, C, S, O1, O2, BLOCK_C, BLOCK_S)
    pivot, mean, invstd, gamma, beta = _channel_params(stats_ptr, rm_ptr, rv_ptr, w_ptr, b_ptr, offs_c64, mask_c,
                                                       C, eps, TRAINING, HAS_WEIGHT, HAS_BIAS)
    scale = gamma * invstd
    shift = beta - mean * scale
    _normalise_tile(x_ptr, y_ptr, o0 * sx0 + o1 * sx1 + o2 * sx2, o0 * sy0 + o1 * sy1 + o2 * sy2, offs_c64, offs_s,
                    mask, pivot, scale, shift, sxc, sxs, syc, sys, ACT, act_param)


@triton.jit
def bn_train_single_kernel(x_ptr, y_ptr, stats_ptr, rm_ptr, rv_ptr, w_ptr, b_ptr, C, S, O, O1, O2,
                           sx0, sx1, sx2, sxc, sxs, sy0, sy1, sy2, syc, sys, momentum, eps, act_param,
                           HAS_RUNNING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                           ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                           STAGES: tl.constexpr):
    """Training forward of small inputs in one launch: the statistics, the running-stat update and
    y = act(gamma * x_hat + beta) for one block of channels per program.

    Grid (cdiv(C, BLOCK_C),). Pass 1 is the partial kernel's shifted Welford over *all* work items
    of the channel block; as the only partial, it is already the combined result (pivot = first
    value), so the stats and running stats are finished exactly as the combine kernel does. Pass 2
    re-reads the same x (L1/L2 resident at the sizes this path is chosen for) and writes y.
    Traffic: x twice (the second mostly from cache), y once; no partials buffer, no second launch.
    """
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    offs_c64 = offs_c.to(tl.int64)
    nsb = (S + BLOCK_S - 1) // BLOCK_S
    total = O * nsb
    pivot = _load_pivot(x_ptr, offs_c64, mask_c, sxc)
    count, mean, m2 = _welford_items(x_ptr, pivot, offs_c64, mask_c, 0, total, nsb, S, O1, O2,
                                     sx0, sx1, sx2, sxc, sxs, BLOCK_C, BLOCK_S, STAGES)
    count = tl.zeros_like(mean) + count  # per channel (zeros_like, not mean * 0: mean may be NaN/Inf)
    invstd = _finish_stats(stats_ptr, rm_ptr, rv_ptr, offs_c64, mask_c, C, count, pivot, mean, m2, momentum, eps,
                           HAS_RUNNING)
    gamma, beta = _affine(w_ptr, b_ptr, offs_c64, mask_c, pivot, HAS_WEIGHT, HAS_BIAS)
    scale = gamma * invstd
    shift = beta - mean * scale
    for item in range(0, total):
        o0, o1, o2, s0 = _split_item(item, nsb, O1, O2, BLOCK_S)
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = mask_c[:, None] & (offs_s < S)[None, :]
        _normalise_tile(x_ptr, y_ptr, o0 * sx0 + o1 * sx1 + o2 * sx2, o0 * sy0 + o1 * sy1 + o2 * sy2, offs_c64,
                        offs_s, mask, pivot, scale, shift, sxc, sxs, syc, sys, ACT, act_param)


@triton.jit
def bn_backward_partial_kernel(g_ptr, x_ptr, stats_ptr, rm_ptr, rv_ptr, w_ptr, b_ptr, part_ptr,
                               C, S, O, O1, O2, sx0, sx1, sx2, sxc, sxs, sg0, sg1, sg2, sgc, sgs, eps, act_param,
                               TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                               ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                               STAGES: tl.constexpr):
    """Per-channel partial sums of dz = dy * act'(z) and of dz * x_hat over one range of work
    items; z = gamma * x_hat + beta is recomputed from x, never stored.

    Grid (cdiv(C, BLOCK_C), G) as for the statistics. Accumulates per lane in fp32 and reduces
    once at the end; writes part[g] (2 rows x C fp32). Reads x and dy: memory-bound.
    """
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    offs_c64 = offs_c.to(tl.int64)
    nsb = (S + BLOCK_S - 1) // BLOCK_S
    total = O * nsb
    per = (total + tl.num_programs(1) - 1) // tl.num_programs(1)
    start = split * per
    end = tl.minimum(start + per, total)
    pivot, mean, invstd, gamma, beta = _channel_params(stats_ptr, rm_ptr, rv_ptr, w_ptr, b_ptr, offs_c64, mask_c,
                                                       C, eps, TRAINING, HAS_WEIGHT, HAS_BIAS)
    acc_dz = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    acc_dzx = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    x_c, g_c = offs_c64[:, None] * sxc, offs_c64[:, None] * sgc
    # in pairs, all four loads issued before any is used, pipelined with STAGES (see _welford_items)
    for item in tl.range(start, end, 2, num_stages=STAGES):
        o0, o1, o2, offs_s, valid_a, mask_a = _item_tile(item, end, nsb, S, O1, O2, mask_c, BLOCK_S)
        q0, q1, q2, offs_t, valid_b, mask_b = _item_tile(item + 1, end, nsb, S, O1, O2, mask_c, BLOCK_S)
        x_a = tl.load(x_ptr + (o0 * sx0 + o1 * sx1 + o2 * sx2) + x_c + offs_s[None, :] * sxs, mask=mask_a, other=0.0)
        g_a = tl.load(g_ptr + (o0 * sg0 + o1 * sg1 + o2 * sg2) + g_c + offs_s[None, :] * sgs, mask=mask_a, other=0.0)
        x_b = tl.load(x_ptr + (q0 * sx0 + q1 * sx1 + q2 * sx2) + x_c + offs_t[None, :] * sxs, mask=mask_b, other=0.0)
        g_b = tl.load(g_ptr + (q0 * sg0 + q1 * sg1 + q2 * sg2) + g_c + offs_t[None, :] * sgs, mask=mask_b, other=0.0)
        dz, x_hat = _dz_x_hat(x_a, g_a, mask_a, pivot, mean, invstd, gamma, beta, ACT, act_param)
        acc_dz += dz
        acc_dzx += dz * x_hat
        dz, x_hat = _dz_x_hat(x_b, g_b, mask_b, pivot, mean, invstd, gamma, beta, ACT, act_param)
        acc_dz += dz
        acc_dzx += dz * x_hat
    row = part_ptr + split.to(tl.int64) * (2 * C) + offs_c64
    tl.store(row, tl.sum(acc_dz, axis=1), mask=mask_c)
    tl.store(row + C, tl.sum(acc_dzx, axis=1), mask=mask_c)


@triton.jit
def bn_backward_combine_kernel(part_ptr, sums_ptr, dw_ptr, db_ptr, C, G,
                               HAS_DW: tl.constexpr, HAS_DB: tl.constexpr, BLOCK_G: tl.constexpr,
                               BLOCK: tl.constexpr):
    """Sum G partials of (sum dz, sum dz * x_hat) in a fixed order, BLOCK_G at a time: writes sums
    (2, C) fp32, and dbeta = sum dz, dgamma = sum dz * x_hat in the parameters' dtype.
    Grid (cdiv(C, BLOCK),)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < C
    offs64 = offs.to(tl.int64)
    acc_dz = tl.zeros([BLOCK], dtype=tl.float32)
    acc_dzx = tl.zeros([BLOCK], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        rows = part_ptr + offs_g[:, None] * (2 * C) + offs64[None, :]
        tile_mask = (offs_g < G)[:, None] & mask[None, :]
        acc_dz += tl.sum(tl.load(rows, mask=tile_mask, other=0.0), axis=0)
        acc_dzx += tl.sum(tl.load(rows + C, mask=tile_mask, other=0.0), axis=0)
    tl.store(sums_ptr + offs64, acc_dz, mask=mask)
    tl.store(sums_ptr + C + offs64, acc_dzx, mask=mask)
    if HAS_DW:
        tl.store(dw_ptr + offs64, acc_dzx.to(dw_ptr.dtype.element_ty), mask=mask)
    if HAS_DB:
        tl.store(db_ptr + offs64, acc_dz.to(db_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bn_backward_input_kernel(g_ptr, x_ptr, dx_ptr, stats_ptr, rm_ptr, rv_ptr, w_ptr, b_ptr, sums_ptr,
                             C, S, O1, O2, sx0, sx1, sx2, sxc, sxs, sg0, sg1, sg2, sgc, sgs,
                             sd0, sd1, sd2, sdc, sds, eps, act_param,
                             TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                             ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """dx = gamma * invstd * (dz - sum(dz) / M - x_hat * sum(dz * x_hat) / M) in training
    (M = stats count, the sums possibly all-reduced across processes), dx = gamma * invstd * dz
    in eval; dz = dy * act'(z) with z recomputed from x. One pass.

    Grid (cdiv(C, BLOCK_C) * work items,). Reads x and dy, writes dx: memory-bound.
    """
    pid = tl.program_id(0)
    o0, o1, o2, offs_c64, mask_c, offs_s, mask = _elementwise_tile(pid, C, S, O1, O2, BLOCK_C, BLOCK_S)
    pivot, mean, invstd, gamma, beta = _channel_params(stats_ptr, rm_ptr, rv_ptr, w_ptr, b_ptr, offs_c64, mask_c,
                                                       C, eps, TRAINING, HAS_WEIGHT, HAS_BIAS)
    scale = gamma * invstd
    x = tl.load(x_ptr + (o0 * sx0 + o1 * sx1 + o2 * sx2) + offs_c64[:, None] * sxc + offs_s[None, :] * sxs,
                mask=mask, other=0.0)
    g = tl.load(g_ptr + (o0 * sg0 + o1 * sg1 + o2 * sg2) + offs_c64[:, None] * sgc + offs_s[None, :] * sgs,
                mask=mask, other=0.0)
    dz, x_hat = _dz_x_hat(x, g, mask, pivot, mean, invstd, gamma, beta, ACT, act_param)
    if TRAINING:
        inv_count = 1.0 / tl.maximum(tl.load(stats_ptr + offs_c64, mask=mask_c, other=1.0), 1.0)
        mean_dz = tl.load(sums_ptr + offs_c64, mask=mask_c, other=0.0) * inv_count
        mean_dzx = tl.load(sums_ptr + C + offs_c64, mask=mask_c, other=0.0) * inv_count
        dx = scale[:, None] * (dz - mean_dz[:, None] - x_hat * mean_dzx[:, None])
    else:
        dx = scale[:, None] * dz
    tl.store(dx_ptr + (o0 * sd0 + o1 * sd1 + o2 * sd2) + offs_c64[:, None] * sdc + offs_s[None, :] * sds,
             dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Configs. Spatial-inner tiles (NCHW: positions contiguous) are long and narrow; channels-inner
# tiles (channels_last, (N, C)) are wide in C. Tiny per-channel kernels get a BLOCK only.
#
# Bytes in flight (why the tiles are these sizes). An H200 streams ~4.8 TB/s with a loaded
# memory latency of ~0.6-0.8 us, so by Little's law 4.8e12 B/s x 0.7e-6 s = 3.4 MB must be in
# flight, 25-30 KB per SM (132 SMs); we aim at >= 32 KB. A CTA has (tiles loaded before the first
# use) x (tensors read) x BLOCK_C x BLOCK_S x element size in flight, times the CTAs resident per
# SM: the reductions load two work items per iteration and, pipelined, two iterations ahead (see
# _welford_items), e.g. fp16 1 x 1024: 4 tiles x 2 KB = 8 KB per CTA, 4-6 resident = 32-48 KB (the
# unpipelined fallback: 2 tiles, 24 KB); the elementwise kernels keep one tile per program but
# 6-16 programs resident (benchmarks/bn_bytes_in_flight.py has the estimate per build, and
# benchmarks/results/inspect/bn-inflight.md the table). Small spatial maps (ResNet's 14x14 = 196 and 7x7 = 49
# positions per (n, c)) get tiles short in S and wide in C, or a 1024-long tile would be 80-95%
# masked off. (8x256 and 16x64 with 4 warps, and 256x16, 32x64 and 128x32 with 8 warps, spilled
# 8-56 B in fp16/bf16 builds of the apply and input-gradient kernels compiled with generic strides
# -- the last two in the eval apply with relu -- so they are not offered.)
# ---------------------------------------------------------------------------------------------
ARCHS = ("sm_80", "sm_90")
_TILES = {False: [config(BLOCK_C=1, BLOCK_S=1024, num_warps=8, num_stages=2),
                  config(BLOCK_C=2, BLOCK_S=1024, num_warps=8, num_stages=2),
                  config(BLOCK_C=4, BLOCK_S=256, num_warps=4, num_stages=2),
                  config(BLOCK_C=16, BLOCK_S=64, num_warps=4, num_stages=2)],
          True: [config(BLOCK_C=32, BLOCK_S=64, num_warps=4, num_stages=2),
                 config(BLOCK_C=64, BLOCK_S=32, num_warps=4, num_stages=2),
                 config(BLOCK_C=128, BLOCK_S=16, num_warps=4, num_stages=2),
                 config(BLOCK_C=16, BLOCK_S=128, num_warps=4, num_stages=2)]}
# The reduction loops are software-pipelined (STAGES, see _welford_items): 3 stages keep two
# iterations (four tiles; eight in the backward, which reads x and dy) in flight as cp.async copies.
# One tile per orientation is also offered unpipelined (STAGES=1: the pair of loads in registers
# only), so the tuner can fall back where shared memory would cost occupancy. (1 x 1024 with 4 warps
# and 2 x 512 with 4 warps, 8 values per thread with 3 stages, left 8 B of stack in some of triton
# 3.6's fp16/bf16 Welford builds; with 8 warps, 4-8 values per thread, they need <= 110 registers
# and none, in 3.6 and 3.9 alike.)
LOOP_STAGES = 3
_UNPIPELINED = {False: config(BLOCK_C=1, BLOCK_S=1024, STAGES=1, num_warps=4, num_stages=2),
                True: config(BLOCK_C=32, BLOCK_S=64, STAGES=1, num_warps=4, num_stages=2)}


def _with_stages(configs, stages=LOOP_STAGES):
    return [config(STAGES=stages, num_warps=c.num_warps, num_stages=c.num_stages, **c.kwargs) for c in configs]


_REDUCE = {channels_inner: _with_stages(tiles) + [_UNPIPELINED[channels_inner]]
           for channels_inner, tiles in _TILES.items()}
_ELEMENTWISE = {False: [config(BLOCK_C=1, BLOCK_S=1024, num_warps=4, num_stages=2),
                        config(BLOCK_C=1, BLOCK_S=2048, num_warps=4, num_stages=2),
                        config(BLOCK_C=2, BLOCK_S=1024, num_warps=8, num_stages=2),
                        config(BLOCK_C=4, BLOCK_S=256, num_warps=4, num_stages=2),
                        config(BLOCK_C=16, BLOCK_S=64, num_warps=4, num_stages=2)],
                True: list(_TILES[True])}


# The single-launch training forward: one program per channel block loops over all N*H*W
# positions, so the tiles are narrow in C (many programs even for small C) and carry the same
# two Welford accumulator tiles as the partial kernel (<= 8 elements each per thread).
_SINGLE = {False: [_UNPIPELINED[False],
                   config(BLOCK_C=2, BLOCK_S=512, STAGES=LOOP_STAGES, num_warps=4, num_stages=2),
                   config(BLOCK_C=1, BLOCK_S=2048, STAGES=LOOP_STAGES, num_warps=8, num_stages=2)],
           True: _with_stages([config(BLOCK_C=16, BLOCK_S=64, num_warps=4, num_stages=2),
                               config(BLOCK_C=32, BLOCK_S=32, num_warps=4, num_stages=2),
                               config(BLOCK_C=64, BLOCK_S=16, num_warps=4, num_stages=2)])}
# The combine kernels read [BLOCK_G, BLOCK] tiles of partials, <= 16 values per thread per row (the
# statistics combine reads 4 rows). Small C has the most partials (G up to MAX_SPLITS) and the
# fewest programs, so tall tiles (64 partials per iteration) keep its serial loop short.
_COMBINE = [config(BLOCK_G=64, BLOCK=32, num_warps=4, num_stages=1),
            config(BLOCK_G=16, BLOCK=64, num_warps=2, num_stages=1),
            config(BLOCK_G=16, BLOCK=128, num_warps=4, num_stages=1),
            config(BLOCK_G=4, BLOCK=512, num_warps=4, num_stages=1)]
# Under the interpreter (one config, per-program overhead dominates): big tiles, still masked on odd
# shapes; 2 partials per combine chunk, so the 3 partials tests make span two chunks.
_INTERP = {False: config(BLOCK_C=4, BLOCK_S=64), True: config(BLOCK_C=16, BLOCK_S=32)}
_INTERP_REDUCE = {k: config(STAGES=LOOP_STAGES, **c.kwargs) for k, c in _INTERP.items()}
_INTERP_COMBINE = config(BLOCK_G=2, BLOCK=128)
_TILE_KEY = ["C", "S", "O1", "O2", "TRAINING", "ACT"]
# Reduction grid: enough programs that the widest-channel tile still puts this many on every SM
# (at most 8 CTAs of these kernels are resident per SM, see `tkernels inspect`), each with at least
# MIN_ITEMS_PER_PROGRAM work items so the pivot load and partial store are amortised.
PROGRAMS_PER_SM = 8
MIN_ITEMS_PER_PROGRAM = 8
MAX_SPLITS = 2048


def _tuned_pair(kernel, key, configs, interpreter=_INTERP, **kwargs):
    return {channels_inner: Tuned(kernel, {a: list(configs[channels_inner]) for a in ARCHS},
                                  interpreter=interpreter[channels_inner], key=key, **kwargs)
            for channels_inner in (False, True)}


TUNED_STATS = _tuned_pair(bn_stats_partial_kernel, ["C", "S", "O", "O1", "O2"], _REDUCE, _INTERP_REDUCE)
TUNED_APPLY = _tuned_pair(bn_apply_kernel, _TILE_KEY, _ELEMENTWISE)
TUNED_BWD_PARTIAL = _tuned_pair(bn_backward_partial_kernel, ["O"] + _TILE_KEY, _REDUCE, _INTERP_REDUCE)
TUNED_BWD_INPUT = _tuned_pair(bn_backward_input_kernel, _TILE_KEY, _ELEMENTWISE)
# Kernels that update running_mean/var in place restore them while configs are timed.
TUNED_TRAIN_SINGLE = _tuned_pair(bn_train_single_kernel, ["C", "S", "O", "O1", "O2", "HAS_RUNNING", "ACT"], _SINGLE,
                                 _INTERP_REDUCE, restore_value=["rm_ptr", "rv_ptr"])
TUNED_COMBINE = Tuned(bn_stats_combine_kernel, {a: list(_COMBINE) for a in ARCHS}, interpreter=_INTERP_COMBINE,
                      key=["C", "G", "HAS_RUNNING"], restore_value=["rm_ptr", "rv_ptr"])
TUNED_BWD_COMBINE = Tuned(bn_backward_combine_kernel, {a: list(_COMBINE) for a in ARCHS},
                          interpreter=_INTERP_COMBINE, key=["C", "G"])

# `tkernels inspect`: every kernel is registered once per orientation, with the configs that
# orientation tunes over and the sizes and strides of a typical launch (ResNet-50's 256x256x56x56),
# so that inspect specialises unit strides and 16-divisible sizes as the JIT does and the loads
# vectorise as they do on a GPU. NCHW: S = H*W with unit stride, N the one outer index;
# channels_last: S = N*H*W with stride C, channels unit-stride.
_EXAMPLE_N, _EXAMPLE_C, _EXAMPLE_HW = 256, 256, 56 * 56
_LAYOUTS = {
    False: ("", dict(C=_EXAMPLE_C, S=_EXAMPLE_HW, O=_EXAMPLE_N, O1=1, O2=_EXAMPLE_N),
            dict(zip("012cs", (0, 0, _EXAMPLE_C * _EXAMPLE_HW, _EXAMPLE_HW, 1)))),
    True: ("_channels_last", dict(C=_EXAMPLE_C, S=_EXAMPLE_N * _EXAMPLE_HW, O=1, O1=1, O2=1),
           dict(zip("012cs", (0, 0, 0, 1, _EXAMPLE_C)))),
}
_GEOM_SIG = {"C": "i32", "S": "i32", "O1": "i32", "O2": "i32"}


def _strides_sig(prefix):
    return {f"{prefix}{k}": "i32" for k in ("0", "1", "2", "c", "s")}


def _register_per_layout(name, kernel, signature, configs, variants, prefixes):
    """One KernelSpec per orientation (see _LAYOUTS); `prefixes` name the kernel's stride arguments."""
    for channels_inner, (suffix, sizes, strides) in _LAYOUTS.items():
        example = {k: v for k, v in sizes.items() if k in signature}
        example.update({f"{p}{k}": v for p in prefixes for k, v in strides.items()})
        register_kernel(KernelSpec(name=name + suffix, kernel=kernel, signature=signature,
                                   configs_by_arch={a: list(configs[channels_inner]) for a in ARCHS},
                                   variants=variants, example_args=example))


_PARAMS_SIG = {"stats_ptr": "*fp32", "rm_ptr": "*{dtype}", "rv_ptr": "*{dtype}", "w_ptr": "*{dtype}",
               "b_ptr": "*{dtype}"}
_HEAVY = [dict(TRAINING=True, HAS_WEIGHT=True, HAS_BIAS=True, ACT=4),
          dict(TRAINING=False, HAS_WEIGHT=True, HAS_BIAS=True, ACT=1)]
_register_per_layout(
    "batch_norm_stats_partial", bn_stats_partial_kernel,
    {"x_ptr": "*{dtype}", "part_ptr": "*fp32", "C": "i32", "S": "i32", "O": "i32", "O1": "i32", "O2": "i32",
     **_strides_sig("sx")}, _REDUCE, [{}], ["sx"])
register_kernel(KernelSpec(
    name="batch_norm_stats_combine", kernel=bn_stats_combine_kernel,
    signature={"part_ptr": "*fp32", "stats_ptr": "*fp32", "rm_ptr": "*{dtype}", "rv_ptr": "*{dtype}", "C": "i32",
               "G": "i32", "part_stride": "i32", "momentum": "fp32", "eps": "fp32"},
    configs_by_arch={a: list(_COMBINE) for a in ARCHS}, variants=[dict(HAS_RUNNING=True)]))
_register_per_layout(
    "batch_norm_apply", bn_apply_kernel,
    {"x_ptr": "*{dtype}", "y_ptr": "*{dtype}", **_PARAMS_SIG, **_GEOM_SIG, **_strides_sig("sx"),
     **_strides_sig("sy"), "eps": "fp32", "act_param": "fp32"}, _ELEMENTWISE, _HEAVY, ["sx", "sy"])
_register_per_layout(
    "batch_norm_train_single", bn_train_single_kernel,
    {"x_ptr": "*{dtype}", "y_ptr": "*{dtype}", "stats_ptr": "*fp32", "rm_ptr": "*{dtype}", "rv_ptr": "*{dtype}",
     "w_ptr": "*{dtype}", "b_ptr": "*{dtype}", "C": "i32", "S": "i32", "O": "i32", "O1": "i32", "O2": "i32",
     **_strides_sig("sx"), **_strides_sig("sy"), "momentum": "fp32", "eps": "fp32", "act_param": "fp32"},
    _SINGLE, [dict(HAS_RUNNING=True, HAS_WEIGHT=True, HAS_BIAS=True, ACT=4)], ["sx", "sy"])
_register_per_layout(
    "batch_norm_backward_partial", bn_backward_partial_kernel,
    {"g_ptr": "*{dtype}", "x_ptr": "*{dtype}", **_PARAMS_SIG, "part_ptr": "*fp32", "C": "i32", "S": "i32",
     "O": "i32", "O1": "i32", "O2": "i32", **_strides_sig("sx"), **_strides_sig("sg"), "eps": "fp32",
     "act_param": "fp32"}, _REDUCE, _HEAVY[:1], ["sx", "sg"])
register_kernel(KernelSpec(
    name="batch_norm_backward_combine", kernel=bn_backward_combine_kernel,
    signature={"part_ptr": "*fp32", "sums_ptr": "*fp32", "dw_ptr": "*{dtype}", "db_ptr": "*{dtype}", "C": "i32",
               "G": "i32"},
    configs_by_arch={a: list(_COMBINE) for a in ARCHS}, variants=[dict(HAS_DW=True, HAS_DB=True)]))
_register_per_layout(
    "batch_norm_backward_input", bn_backward_input_kernel,
    {"g_ptr": "*{dtype}", "x_ptr": "*{dtype}", "dx_ptr": "*{dtype}", **_PARAMS_SIG, "sums_ptr": "*fp32",
     **_GEOM_SIG, **_strides_sig("sx"), **_strides_sig("sg"), **_strides_sig("sd"), "eps": "fp32",
     "act_param": "fp32"}, _ELEMENTWISE, _HEAVY, ["sx", "sg", "sd"])


# ---------------------------------------------------------------------------------------------
# Geometry: merge the reduction dims of several same-shaped tensors without copying.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    C: int
    S: int  # inner run of reduction positions
    outer: Tuple[int, int, int]  # (O0, O1, O2)
    strides: List[Tuple[int, int, int, int, int]]  # per tensor: (s_o0, s_o1, s_o2, s_c, s_inner)
    channels_inner: bool

    @property
    def O(self) -> int:
        return self.outer[0] * self.outer[1] * self.outer[2]


@functools.lru_cache(maxsize=1024)  # pure, and a training loop asks for the same few layouts every step
def plan(shape: Sequence[int], *tensor_strides: Sequence[int]) -> Optional[Geometry]:
    """Merge N and the spatial dims, in the storage order of the first tensor, wherever every
    tensor allows it; None when more than 1 + MAX_OUTER runs remain (the caller copies).
    Arguments must be hashable (torch.Size and stride() tuples are); the result is shared."""
    primary = tensor_strides[0]
    dims = [d for d in range(len(shape)) if d != 1 and shape[d] != 1]
    dims.sort(key=lambda d: -abs(primary[d]))
    runs: List[Tuple[int, List[int]]] = []
    for d in dims:
        st = [s[d] for s in tensor_strides]
        if runs and all(prev == cur * shape[d] for prev, cur in zip(runs[-1][1], st)):
            runs[-1] = (runs[-1][0] * shape[d], st)
        else:
            runs.append((shape[d], st))
    if not runs:
        runs = [(1, [0] * len(tensor_strides))]
    if len(runs) > 1 + MAX_OUTER:
        return None
    outer = [(1, [0] * len(tensor_strides))] * (1 + MAX_OUTER - len(runs)) + runs[:-1]
    S, inner = runs[-1]
    strides = [tuple(o[1][k] for o in outer) + (s[1], inner[k]) for k, s in enumerate(tensor_strides)]
    C = shape[1]
    channels_inner = C > 1 and abs(primary[1]) < abs(inner[0])
    return Geometry(C, S, tuple(o[0] for o in outer), strides, channels_inner)


def empty_like_dense(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of x's shape whose storage order is x's (dense even if x is not)."""
    if x.is_contiguous():
        return x.new_empty(x.shape)
    # (reverse=True keeps equal strides in dimension order, as a stable sort on -stride would)
    order = sorted(range(x.dim()), key=x.stride().__getitem__, reverse=True)
    return torch.empty_permuted(x.shape, order, dtype=x.dtype, device=x.device)


def _num_splits(geom: Geometry, device: torch.device) -> int:
    """How many programs share one channel block's reduction (G): enough that even the tuned
    config with the widest channel block puts PROGRAMS_PER_SM programs on every SM (narrower
    blocks get proportionally more), with at least MIN_ITEMS_PER_PROGRAM work items each."""
    if device.type == "cuda":
        widest = max(_REDUCE[geom.channels_inner], key=lambda c: c.kwargs["BLOCK_C"]).kwargs
    else:
        widest = _INTERP[geom.channels_inner].kwargs
    items = geom.O * cdiv(geom.S, widest["BLOCK_S"])
    if items == 0:
        return 0
    if device.type != "cuda":
        return min(items, 3)  # enough to exercise the merge, few programs for the interpreter
    wanted = cdiv(PROGRAMS_PER_SM * sm_count(device), cdiv(geom.C, widest["BLOCK_C"]))
    return max(1, min(wanted, cdiv(items, MIN_ITEMS_PER_PROGRAM), MAX_SPLITS))


def _geom_args(geom: Geometry, k: int):
    return list(geom.strides[k])


def _grid_tiles(geom: Geometry):
    return lambda m: (cdiv(geom.C, m["BLOCK_C"]) * geom.O * cdiv(geom.S, m["BLOCK_S"]),)  # noqa: E731


# ---------------------------------------------------------------------------------------------
# Launchers. `stats` is the (5, C) fp32 tensor; weight, bias and the running stats may be None.
# Geometries list x first, then grad and dx (backward), or y (forward).
# ---------------------------------------------------------------------------------------------
def launch_stats(x: torch.Tensor, geom: Geometry, running_mean, running_var, momentum: float,
                 eps: float) -> torch.Tensor:
    C = geom.C
    G = _num_splits(geom, x.device)
    partials = torch.empty((max(G, 1), PARTIAL_ROWS, C), device=x.device, dtype=torch.float32)
    if G:
        kernel, meta = TUNED_STATS[geom.channels_inner].launcher(x.device)
        kernel[lambda m: (cdiv(C, m["BLOCK_C"]), G)](
            x, partials, C, geom.S, geom.O, geom.outer[1], geom.outer[2], *_geom_args(geom, 0), **meta)
    return launch_combine(partials, G, PARTIAL_ROWS * C, running_mean, running_var, momentum, eps)


# Single-launch thresholds (see launch_train_single).
SINGLE_LAUNCH_MAX_POSITIONS = 8192
SINGLE_LAUNCH_MAX_ELEMENTS = 1 << 22


def single_launch_fits(shape: Sequence[int]) -> bool:
    """Whether training forward of an input of this shape takes the single-launch kernel."""
    numel = 1
    for n in shape:
        numel *= n
    return 0 < numel <= SINGLE_LAUNCH_MAX_ELEMENTS and numel // shape[1] <= SINGLE_LAUNCH_MAX_POSITIONS


def launch_train_single(x, y, geom: Geometry, running_mean, running_var, weight, bias, momentum: float, eps: float,
                        act_code: int, act_param: float) -> torch.Tensor:
    """Statistics, running-stat update and y in one launch; returns the (5, C) stats.

    Chosen (single_launch_fits) when the per-channel reduction is at most
    SINGLE_LAUNCH_MAX_POSITIONS = 8192 values and the whole input at most 2^22 elements. The split
    path costs three launches (partials, combine, apply: ~5 us each plus host time) whatever the
    size; one program streaming 8192 values of one channel twice (32 KiB fp32 per pass, the second
    from L1/L2) takes about as long as one launch, so below that the single launch wins, and above
    it a channel block's serial loop outgrows what the split grid spreads over every SM. The total
    cap (16 MiB fp32) keeps the second pass L2-resident on A100/H100/H200 (40-60 MiB of L2) even
    when all programs' first passes run before any second pass. (LeNet's 64x16x8x8: 4096 per channel.)
    """
    C = geom.C
    stats = x.new_empty((STATS_ROWS, C), dtype=torch.float32)
    has_running = running_mean is not None
    kernel, meta = TUNED_TRAIN_SINGLE[geom.channels_inner].launcher(x)
    fallback = stats
    kernel[lambda m: (cdiv(C, m["BLOCK_C"]),)](
        x, y, stats, *[t if t is not None else fallback for t in (running_mean, running_var, weight, bias)],
        C, geom.S, geom.O, geom.outer[1], geom.outer[2], *_geom_args(geom, 0), *_geom_args(geom, 1),
        float(momentum), float(eps), float(act_param), HAS_RUNNING=has_running, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, ACT=act_code, **meta)
    return stats


def launch_combine(partials: torch.Tensor, G: int, part_stride: int, running_mean, running_var, momentum: float,
                   eps: float) -> torch.Tensor:
    C = partials.shape[-1]
    stats = torch.empty((STATS_ROWS, C), device=partials.device, dtype=torch.float32)
    has_running = running_mean is not None
    kernel, meta = TUNED_COMBINE.launcher(partials.device)
    kernel[lambda m: (cdiv(C, m["BLOCK"]),)](
        partials, stats, running_mean if has_running else partials, running_var if has_running else partials,
        C, G, part_stride, float(momentum), float(eps), HAS_RUNNING=has_running, **meta)
    return stats


def _param_ptrs(stats, running_mean, running_var, weight, bias, fallback):
    return [t if t is not None else fallback for t in (stats, running_mean, running_var, weight, bias)]


def launch_apply(x, y, geom: Geometry, stats, running_mean, running_var, weight, bias, training: bool, eps: float,
                 act_code: int, act_param: float) -> None:
    kernel, meta = TUNED_APPLY[geom.channels_inner].launcher(x.device)
    kernel[_grid_tiles(geom)](
        x, y, *_param_ptrs(stats, running_mean, running_var, weight, bias, x), geom.C, geom.S, geom.outer[1],
        geom.outer[2], *_geom_args(geom, 0), *_geom_args(geom, 1), float(eps), float(act_param),
        TRAINING=training, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=act_code, **meta)


def launch_backward_reduce(grad, x, geom: Geometry, stats, running_mean, running_var, weight, bias, training: bool,
                           eps: float, act_code: int, act_param: float, grad_weight, grad_bias) -> torch.Tensor:
    """Returns sums (2, C) fp32 = (sum dz, sum dz * x_hat); fills grad_weight / grad_bias if given."""
    C = geom.C
    G = _num_splits(geom, x.device)
    partials = torch.empty((max(G, 1), 2, C), device=x.device, dtype=torch.float32)
    if G:
        kernel, meta = TUNED_BWD_PARTIAL[geom.channels_inner].launcher(x.device)
        kernel[lambda m: (cdiv(C, m["BLOCK_C"]), G)](
            grad, x, *_param_ptrs(stats, running_mean, running_var, weight, bias, x), partials, C, geom.S, geom.O,
            geom.outer[1], geom.outer[2], *_geom_args(geom, 0), *_geom_args(geom, 1), float(eps), float(act_param),
            TRAINING=training, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=act_code, **meta)
    sums = torch.empty((2, C), device=x.device, dtype=torch.float32)
    kernel, meta = TUNED_BWD_COMBINE.launcher(x.device)
    kernel[lambda m: (cdiv(C, m["BLOCK"]),)](
        partials, sums, grad_weight if grad_weight is not None else sums, grad_bias if grad_bias is not None else sums,
        C, G, HAS_DW=grad_weight is not None, HAS_DB=grad_bias is not None, **meta)
    return sums


def launch_backward_input(grad, x, dx, geom: Geometry, stats, running_mean, running_var, weight, bias, sums,
                          training: bool, eps: float, act_code: int, act_param: float) -> None:
    kernel, meta = TUNED_BWD_INPUT[geom.channels_inner].launcher(x.device)
    kernel[_grid_tiles(geom)](
        grad, x, dx, *_param_ptrs(stats, running_mean, running_var, weight, bias, x),
        sums if sums is not None else x, geom.C, geom.S, geom.outer[1], geom.outer[2],
        *_geom_args(geom, 0), *_geom_args(geom, 1), *_geom_args(geom, 2), float(eps), float(act_param),
        TRAINING=training, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=act_code, **meta)
