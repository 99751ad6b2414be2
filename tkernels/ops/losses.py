"""Fused cross-entropy (log-softmax + loss), forward and backward, as tkernels custom ops.

Cross-entropy. log-softmax and the loss are one kernel. With the target distribution
q_i = (1 - eps) * onehot(t_i) + eps / C (class indices) or q_i = (1 - eps) * target_i + eps / C
(class probabilities), and class weights w, every row's loss is

    loss_i = -sum_c w_c q_ic (x_ic - lse_i) = lse_i * B_i - A_i,   B_i = sum_c w_c q_ic,  A_i = sum_c w_c q_ic x_ic,

so the forward streams the logits once: the online max/sum gives lse_i while A_i and B_i are
accumulated in the same pass (for class indices, x_{i,t_i} is one gathered load). It keeps only
lse_i and the coefficient B_i per row (8 bytes a row) for backward, which also streams the
logits once and writes dx_ic = scale_i * (exp(x_ic - lse_i) * B_i - w_c q_ic) directly; no
probability tensor is ever stored. scale_i is the incoming gradient, divided for 'mean' by the
sum of w_{t_i} over non-ignored rows (class indices) or by the number of rows (probabilities),
as torch does.

Reductions are deterministic: a one-program grid reduces its rows itself; otherwise each forward
program writes one partial sum of its rows (and of their weights), and a one-program kernel
(``loss_finish_kernel``, shared with :mod:`.mse`) adds the partials in a fixed order. No atomics.

Targets out of range: torch raises. A target in host memory is checked on the host (torch's
IndexError; reading host memory waits for nothing). A target on the GPU is checked by the forward
kernel itself, which counts the non-ignored indices outside [0, C), and one torch._assert_async on
the resulting flag fails the step as torch's device-side assert does, without a host sync. The
kernels mask the gathered load either way, so a bad target can never read out of bounds.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
import triton
import triton.language as tl

from .. import _backend
from ..reference import losses as ref
from ._autocast import cast_inputs
from ._dispatch import custom_op, run_function
from ._common import (FLOAT_DTYPES, KernelSpec, Tuned, check_triton_dtype, config, from_numpy, numpy_into,
                      register_kernel, to_numpy)
from ._common import backward_backend, forward_backend
from .softmax import (SPEC_BLOCKS, RowPlan, _num_warps_configs, _spec_configs, _stride_sig, batch_strides,
                      plan_rows, row_coordinates, row_offsets)

REDUCTIONS = ("none", "mean", "sum")
NONE, MEAN, SUM = 0, 1, 2
FINISH_BLOCK = 1024
_EMPTY = (0,)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def cross_entropy_forward_kernel(x_ptr, t_ptr, w_ptr, loss_ptr, den_ptr, bad_ptr, stats_ptr,
                                 C, n_inner, n_tiles, n_outer1, n_rows,
                                 sx0, sx1, sxi, sxc, st0, st1, sti, stc, ignore_index, eps,
                                 PROB: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
                                 REDUCTION: tl.constexpr, ONE_PROGRAM: tl.constexpr, CHECK: tl.constexpr,
                                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-row loss_i = lse_i * B_i - A_i (see the module docstring), logits read once, online.

    stats (fp32, 2 * n_rows + 2) = [lse_i | B_i | divisor | targets ok]. Writes the loss per row
    ('none', into the output, divisor 1) or, reduced: with ONE_PROGRAM (the grid is one program)
    the loss itself and the divisor (sum of the 'mean' weights w_{t_i}, or 1 per row for
    probabilities), else one partial sum per program of its losses and weights
    (``loss_finish_kernel`` adds them). With CHECK (class indices on the device), "targets ok" is
    1.0 when no non-ignored index is outside [0, C), else 0.0 (ONE_PROGRAM), or each program writes
    its count of such indices to bad_ptr for ``loss_finish_kernel``; without CHECK it is 1.0. Tile
    [BLOCK_R, BLOCK_C]; grid = (outer0 * outer1 * cdiv(inner, BLOCK_R),). Bytes: logits (and
    probability targets) read once, 8-12 bytes a row written; memory-bound.
    """
    o0, o1, inner, row_mask, row_id = row_coordinates(n_inner, n_tiles, n_outer1, BLOCK_R)
    x_row = x_ptr + row_offsets(o0, o1, inner, sx0, sx1, sxi)
    t_row = t_ptr + row_offsets(o0, o1, inner, st0, st1, sti)
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    m = tl.full((BLOCK_R,), -float("inf"), tl.float32)
    s = tl.zeros((BLOCK_R,), tl.float32)
    a = tl.zeros((BLOCK_R,), tl.float32)
    b = tl.zeros((BLOCK_R,), tl.float32)
    if not PROB:
        t = tl.load(t_row, mask=row_mask, other=ignore_index).to(tl.int64)
        valid = row_mask & (t != ignore_index)
        in_range = valid & (t >= 0) & (t < C)
        x_t = tl.load(x_row + t * sxc, mask=in_range, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            w_t = tl.load(w_ptr + t, mask=in_range, other=0.0).to(tl.float32)
        else:
            w_t = tl.where(in_range, 1.0, 0.0)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        mask = row_mask[:, None] & (c < C)[None, :]
        x = tl.load(x_row[:, None] + c[None, :] * sxc, mask=mask, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m = m_new
        if PROB or SMOOTH:
            if PROB:
                wq = tl.load(t_row[:, None] + c[None, :] * stc, mask=mask, other=0.0).to(tl.float32)
                if SMOOTH:
                    wq = wq * (1.0 - eps) + eps / C
            else:
                wq = tl.full((BLOCK_R, BLOCK_C), 1.0, tl.float32)
            if HAS_WEIGHT:
                wq = wq * tl.load(w_ptr + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
            wq = tl.where(mask, wq, 0.0)
            a += tl.sum(wq * tl.where(mask, x, 0.0), axis=1)
            b += tl.sum(wq, axis=1)
    lse = tl.where(m == -float("inf"), 0.0, m) + tl.log(tl.where(row_mask, s, 1.0))
    if PROB:
        loss = lse * b - a
        coef = b
        den = tl.where(row_mask, 1.0, 0.0)
    else:
        loss = w_t * (lse - x_t)
        coef = w_t
        if SMOOTH:  # torch: (1 - eps) * nll + eps / C * sum_c -w_c log p_c; here b = sum_c w_c
            loss = (1.0 - eps) * loss + (eps / C) * (lse * b - a)
            coef = (1.0 - eps) * w_t + (eps / C) * b
        loss = tl.where(valid, loss, 0.0)
        coef = tl.where(valid, coef, 0.0)
        den = w_t
    loss = tl.where(row_mask, loss, 0.0)
    tl.store(stats_ptr + row_id, lse, mask=row_mask)
    tl.store(stats_ptr + n_rows + row_id, coef, mask=row_mask)
    pid = tl.program_id(0)
    tail_ptr = stats_ptr + 2 * tl.cast(n_rows, tl.int64)  # divisor, then "targets ok" (64-bit: rows may pass 2^30)
    if CHECK:
        n_bad = tl.sum(tl.where(valid & ((t < 0) | (t >= C)), 1.0, 0.0), axis=0)
        if ONE_PROGRAM:
            tl.store(tail_ptr + 1, tl.where(n_bad == 0, 1.0, 0.0))
        else:
            tl.store(bad_ptr + pid, n_bad)
    elif pid == 0:
        tl.store(tail_ptr + 1, 1.0)
    if REDUCTION == 0:
        tl.store(loss_ptr + row_id, loss.to(loss_ptr.dtype.element_ty), mask=row_mask)
        if pid == 0:
            tl.store(tail_ptr, 1.0)  # 'none' has no divisor; the output stays defined
    elif ONE_PROGRAM:
        total = tl.sum(loss, axis=0)
        denom = tl.sum(den, axis=0)
        if REDUCTION == 1:
            total = total / denom
        tl.store(loss_ptr, total.to(loss_ptr.dtype.element_ty))
        tl.store(tail_ptr, denom)
    else:
        tl.store(loss_ptr + pid, tl.sum(loss, axis=0))
        tl.store(den_ptr + pid, tl.sum(den, axis=0))


@triton.jit
def cross_entropy_backward_kernel(g_ptr, x_ptr, t_ptr, w_ptr, stats_ptr, dx_ptr, dt_ptr,
                                  C, n_inner, n_tiles, n_outer1, n_rows,
                                  sg0, sg1, sgi, sx0, sx1, sxi, sxc, st0, st1, sti, stc, sd0, sd1, sdi, sdc,
                                  ignore_index, eps,
                                  PROB: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
                                  REDUCTION: tl.constexpr, TARGET_GRAD: tl.constexpr,
                                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx_ic = scale_i * (exp(x_ic - lse_i) * B_i - w_c q_ic), logits read once, dx written once.

    With TARGET_GRAD (probability targets): d target_ic = -scale_i * (1 - eps) * w_c * (x_ic - lse_i),
    written with dx's strides. Tile and grid as the forward. Bytes: logits (+ targets) read once,
    dx (+ d target) written once, 8 bytes a row of saved statistics (the forward's stats:
    [lse_i | B_i | divisor]); memory-bound.
    """
    o0, o1, inner, row_mask, row_id = row_coordinates(n_inner, n_tiles, n_outer1, BLOCK_R)
    x_row = x_ptr + row_offsets(o0, o1, inner, sx0, sx1, sxi)
    t_row = t_ptr + row_offsets(o0, o1, inner, st0, st1, sti)
    d_off = row_offsets(o0, o1, inner, sd0, sd1, sdi)
    if REDUCTION == 0:
        scale = tl.load(g_ptr + row_offsets(o0, o1, inner, sg0, sg1, sgi), mask=row_mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(g_ptr).to(tl.float32)
        if REDUCTION == 1:
            g = g / tl.load(stats_ptr + 2 * tl.cast(n_rows, tl.int64))  # (64-bit: rows may pass 2^30)
        scale = tl.full((BLOCK_R,), 0.0, tl.float32) + g
    lse = tl.load(stats_ptr + row_id, mask=row_mask, other=0.0)
    coef = tl.load(stats_ptr + n_rows + row_id, mask=row_mask, other=0.0)
    valid = row_mask
    if not PROB:
        t = tl.load(t_row, mask=row_mask, other=ignore_index).to(tl.int64)
        valid = row_mask & (t != ignore_index)
        if HAS_WEIGHT:
            w_t = tl.load(w_ptr + t, mask=valid & (t >= 0) & (t < C), other=0.0).to(tl.float32)
        else:
            w_t = tl.full((BLOCK_R,), 1.0, tl.float32)
        hit = (1.0 - eps) * w_t if SMOOTH else w_t
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        mask = row_mask[:, None] & (c < C)[None, :]
        x = tl.load(x_row[:, None] + c[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse[:, None])
        if HAS_WEIGHT:
            w = tl.load(w_ptr + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
        if PROB:
            q = tl.load(t_row[:, None] + c[None, :] * stc, mask=mask, other=0.0).to(tl.float32)
            if SMOOTH:
                q = q * (1.0 - eps) + eps / C
            wq = q * w if HAS_WEIGHT else q
        else:
            wq = tl.where(c[None, :] == t[:, None], hit[:, None], 0.0)
            if SMOOTH:
                wq += eps / C * w if HAS_WEIGHT else eps / C
        dx = scale[:, None] * (p * coef[:, None] - wq)
        # ignored rows get exactly 0, even when 'mean' divides by a zero total weight
        dx = tl.where(valid[:, None], dx, 0.0)
        tl.store(dx_ptr + d_off[:, None] + c[None, :] * sdc, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if TARGET_GRAD:
            dq = -(scale * (1.0 - eps))[:, None] * (x - lse[:, None])
            if HAS_WEIGHT:
                dq = dq * w
            tl.store(dt_ptr + d_off[:, None] + c[None, :] * sdc, dq.to(dt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def loss_finish_kernel(part_ptr, den_part_ptr, bad_part_ptr, out_ptr, denom_ptr, ok_ptr, n_parts, count,
                       MEAN: tl.constexpr, HAS_DEN: tl.constexpr, LOSS: tl.constexpr, CHECK: tl.constexpr,
                       BLOCK: tl.constexpr):
    """out = sum(parts) [/ sum(den parts) or / count for 'mean']; also stores the divisor. With
    CHECK: ok = 1.0 if the bad parts (counts of out-of-range targets) sum to 0, else 0.0; LOSS=False
    does only that (cross-entropy 'none' over several programs).

    One program walks the n_parts fp32 partials in a fixed order (deterministic). Bytes: 4-12 per
    partial read; latency-bound (partials are one per forward program).
    """
    acc = tl.zeros((BLOCK,), tl.float32)
    dacc = tl.zeros((BLOCK,), tl.float32)
    bad = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, n_parts, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        if LOSS:
            acc += tl.load(part_ptr + offs, mask=offs < n_parts, other=0.0)
            if HAS_DEN:
                dacc += tl.load(den_part_ptr + offs, mask=offs < n_parts, other=0.0)
        if CHECK:
            bad += tl.load(bad_part_ptr + offs, mask=offs < n_parts, other=0.0)
    if LOSS:
        total = tl.sum(acc, axis=0)
        if HAS_DEN:
            denom = tl.sum(dacc, axis=0)
        else:
            denom = tl.zeros_like(total) + count  # (not count + 0 * total: NaN for a NaN/Inf loss)
        if MEAN:
            total = total / denom
        tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))
        tl.store(denom_ptr, denom)
    if CHECK:
        tl.store(ok_ptr, tl.where(tl.sum(bad, axis=0) == 0, 1.0, 0.0))


_CE_KEY = ["C", "n_inner", "PROB", "HAS_WEIGHT", "SMOOTH", "BLOCK_R", "BLOCK_C"]
_CE_FORWARD = Tuned(cross_entropy_forward_kernel, _num_warps_configs(), config(num_warps=4, num_stages=1),
                    key=_CE_KEY)
_CE_BACKWARD = Tuned(cross_entropy_backward_kernel, _num_warps_configs(), config(num_warps=4, num_stages=1),
                     key=_CE_KEY)

_ROW_SIG = {"C": "i32", "n_inner": "i32", "n_tiles": "i32", "n_outer1": "i32", "n_rows": "i32",
            "ignore_index": "i64", "eps": "fp32"}
register_kernel(KernelSpec(
    name="cross_entropy_forward", kernel=cross_entropy_forward_kernel,
    signature={"x_ptr": "*{dtype}", "t_ptr": "*i64", "w_ptr": "*{dtype}", "loss_ptr": "*fp32", "den_ptr": "*fp32",
               "bad_ptr": "*fp32", "stats_ptr": "*fp32", **_ROW_SIG, **_stride_sig("sx", "st")},
    configs_by_arch=_spec_configs(*SPEC_BLOCKS),
    variants=[dict(PROB=False, HAS_WEIGHT=True, SMOOTH=True, REDUCTION=MEAN, ONE_PROGRAM=False, CHECK=True,
                   sxc=1, sti=1),
              dict(PROB=False, HAS_WEIGHT=False, SMOOTH=False, REDUCTION=MEAN, ONE_PROGRAM=True, CHECK=True,
                   sxc=1, sti=1),
              dict(PROB=False, HAS_WEIGHT=False, SMOOTH=False, REDUCTION=NONE, ONE_PROGRAM=False, CHECK=False,
                   sxi=1, sti=1)],
    example_args={"C": 32000, "n_inner": 4096},
))
register_kernel(KernelSpec(  # uint8 class indices (torch accepts Byte targets)
    name="cross_entropy_forward_u8", kernel=cross_entropy_forward_kernel,
    signature={"x_ptr": "*{dtype}", "t_ptr": "*u8", "w_ptr": "*{dtype}", "loss_ptr": "*fp32", "den_ptr": "*fp32",
               "bad_ptr": "*fp32", "stats_ptr": "*fp32", **_ROW_SIG, **_stride_sig("sx", "st")},
    configs_by_arch=_spec_configs(SPEC_BLOCKS[0]),
    variants=[dict(PROB=False, HAS_WEIGHT=True, SMOOTH=True, REDUCTION=MEAN, ONE_PROGRAM=False, CHECK=True, sxc=1,
                   sti=1)],
    dtypes=("fp16",),
))
register_kernel(KernelSpec(
    name="cross_entropy_forward_probs", kernel=cross_entropy_forward_kernel,
    signature={"x_ptr": "*{dtype}", "t_ptr": "*{dtype}", "w_ptr": "*{dtype}", "loss_ptr": "*fp32",
               "den_ptr": "*fp32", "bad_ptr": "*fp32", "stats_ptr": "*fp32", **_ROW_SIG, **_stride_sig("sx", "st")},
    configs_by_arch=_spec_configs(*SPEC_BLOCKS),
    variants=[dict(PROB=True, HAS_WEIGHT=True, SMOOTH=True, REDUCTION=SUM, ONE_PROGRAM=False, CHECK=False, sxc=1,
                   stc=1)],
    example_args={"C": 32000, "n_inner": 4096},
))
register_kernel(KernelSpec(
    name="cross_entropy_backward", kernel=cross_entropy_backward_kernel,
    signature={"g_ptr": "*{dtype}", "x_ptr": "*{dtype}", "t_ptr": "*i64", "w_ptr": "*{dtype}", "stats_ptr": "*fp32",
               "dx_ptr": "*{dtype}", "dt_ptr": "*{dtype}", **_ROW_SIG,
               **_stride_sig("sg", with_class=False), **_stride_sig("sx", "st", "sd")},
    configs_by_arch=_spec_configs(*SPEC_BLOCKS),
    variants=[dict(PROB=False, HAS_WEIGHT=True, SMOOTH=True, REDUCTION=MEAN, TARGET_GRAD=False, sxc=1, sdc=1,
                   sti=1),
              dict(PROB=False, HAS_WEIGHT=False, SMOOTH=False, REDUCTION=NONE, TARGET_GRAD=False, sxi=1, sdi=1,
                   sti=1, sgi=1)],
    example_args={"C": 32000, "n_inner": 4096},
))
register_kernel(KernelSpec(
    name="cross_entropy_backward_u8", kernel=cross_entropy_backward_kernel,
    signature={"g_ptr": "*{dtype}", "x_ptr": "*{dtype}", "t_ptr": "*u8", "w_ptr": "*{dtype}", "stats_ptr": "*fp32",
               "dx_ptr": "*{dtype}", "dt_ptr": "*{dtype}", **_ROW_SIG,
               **_stride_sig("sg", with_class=False), **_stride_sig("sx", "st", "sd")},
    configs_by_arch=_spec_configs(SPEC_BLOCKS[0]),
    variants=[dict(PROB=False, HAS_WEIGHT=True, SMOOTH=True, REDUCTION=MEAN, TARGET_GRAD=False, sxc=1, sdc=1)],
    dtypes=("fp16",),
))
register_kernel(KernelSpec(
    name="cross_entropy_backward_probs", kernel=cross_entropy_backward_kernel,
    signature={"g_ptr": "*{dtype}", "x_ptr": "*{dtype}", "t_ptr": "*{dtype}", "w_ptr": "*{dtype}",
               "stats_ptr": "*fp32", "dx_ptr": "*{dtype}", "dt_ptr": "*{dtype}", **_ROW_SIG,
               **_stride_sig("sg", with_class=False), **_stride_sig("sx", "st", "sd")},
    configs_by_arch=_spec_configs(*SPEC_BLOCKS),
    variants=[dict(PROB=True, HAS_WEIGHT=True, SMOOTH=True, REDUCTION=SUM, TARGET_GRAD=True, sxc=1, stc=1, sdc=1)],
    example_args={"C": 32000, "n_inner": 4096},
))
register_kernel(KernelSpec(
    name="loss_finish", kernel=loss_finish_kernel,
    signature={"part_ptr": "*fp32", "den_part_ptr": "*fp32", "bad_part_ptr": "*fp32", "out_ptr": "*{dtype}",
               "denom_ptr": "*fp32", "ok_ptr": "*fp32", "n_parts": "i32", "count": "fp32"},
    configs_by_arch={a: [config(num_warps=4, num_stages=1, BLOCK=FINISH_BLOCK)] for a in ("sm_80", "sm_90")},
    variants=[dict(MEAN=True, HAS_DEN=True, LOSS=True, CHECK=True),
              dict(MEAN=False, HAS_DEN=False, LOSS=True, CHECK=False),
              dict(MEAN=False, HAS_DEN=False, LOSS=False, CHECK=True)],
))


# ---------------------------------------------------------------------------------------------
# Cross-entropy: launchers and custom ops. x is (N, C, d1, ...) (class dim 1); target is (N, d1, ...)
# of class indices or x's shape of probabilities.
# ---------------------------------------------------------------------------------------------
_REDUCTION_CODES = {"none": NONE, "mean": MEAN, "sum": SUM}


def _reduction_code(reduction: str) -> int:
    return _REDUCTION_CODES[reduction]


def _row_count(x: Tensor) -> int:
    return x.numel() // x.shape[1] if x.shape[1] else 0


def _target_on_host(target: Tensor) -> bool:
    return target.is_cpu


def _check_host_target_range(target: Tensor, n_classes: int, ignore_index: int) -> None:
    """torch raises IndexError for a class index outside [0, C); so do we, for a target in host
    memory (reading it waits for nothing). A target on a GPU is checked by the forward kernel
    instead (see :func:`_assert_targets_ok`)."""
    t = target.to(torch.int64) if target.dtype != torch.int64 else target
    low, high = torch.aminmax(t)  # one pass; the full check only when something may be wrong
    if int(low) >= 0 and int(high) < n_classes:
        return
    bad = (t != ignore_index) & ((t < 0) | (t >= n_classes))
    if bool(bad.any()):
        value = int(t[bad].flatten()[0])
        raise IndexError(f"cross_entropy: Target {value} is out of bounds: expected a class index in "
                         f"[0, {n_classes - 1}] or ignore_index={ignore_index}")


def _assert_targets_ok(stats: Tensor, rows: int, n_classes: int, ignore_index: int) -> None:
    """The device-side check of a target on a GPU, as torch's own device-side assert: the forward
    kernel wrote 1.0 ("targets ok") or 0.0 into stats, and torch._assert_async fails on 0.0 without
    holding up the step; a bad index fails the next synchronising call (and the CUDA context) with
    this message. One small launch, where checking with torch ops took eight."""
    torch._assert_async(stats[2 * rows + 1], f"cross_entropy: a target is out of bounds: expected class indices "
                                             f"in [0, {n_classes - 1}] or ignore_index={ignore_index}")


# layout (shapes and strides of x, target and the others) -> plan: a training loop asks for the same
# few layouts every step, and the key is cheaper to build than the plan_rows arguments.
_CE_PLANS: Dict[tuple, Optional[RowPlan]] = {}
_CE_PLANS_MAX = 1024


def _ce_plan(x: Tensor, target: Tensor, *others: Tensor) -> Optional[RowPlan]:
    key = (x.shape, x.stride(), target.shape, target.stride(), *[(t.shape, t.stride()) for t in others])
    plan = _CE_PLANS.get(key, _CE_PLANS)
    if plan is _CE_PLANS:
        if len(_CE_PLANS) >= _CE_PLANS_MAX:
            _CE_PLANS.clear()
        plan = _CE_PLANS[key] = _plan_layout(x, target, *others)
    return plan


def _plan_layout(x: Tensor, target: Tensor, *others: Tensor) -> Optional[RowPlan]:
    prob = target.dim() == x.dim()
    strides = [batch_strides(x, 1), batch_strides(target, 1) if prob else list(target.stride())]
    strides += [batch_strides(t, 1) if t.dim() == x.dim() else list(t.stride()) for t in others]
    return plan_rows([n for i, n in enumerate(x.shape) if i != 1], x.shape[1], x.stride(1), *strides)


def _class_stride(t: Tensor, prob: bool) -> int:
    return t.stride(1) if prob else 0


def _smoothing(label_smoothing: float) -> float:
    """The smoothing applied: as torch's, a value that is not > 0 (negative, -0.0, NaN) smooths nothing.
    The public function checks the upper bound; the ops take any float, and both backends agree."""
    value = float(label_smoothing)
    return value if value > 0.0 else 0.0


def _stats_size(rows: int) -> int:
    """Length of the fp32 statistics the forward keeps for backward: [lse (rows) | B (rows) | divisor |
    targets ok]."""
    return 2 * rows + 2


@custom_op("tkernels::cross_entropy", mutates_args=())
def cross_entropy_forward(x: Tensor, target: Tensor, weight: Optional[Tensor], reduction: str, ignore_index: int,
                          label_smoothing: float) -> Tuple[Tensor, Tensor]:
    """(loss, stats) for x (N, C, ...); stats fp32 (2 * rows + 2,) = [lse | B | divisor | targets ok]
    (see the kernel)."""
    C, rows = x.shape[1], _row_count(x)
    prob = target.dim() == x.dim()
    reduce = reduction != "none"
    loss_shape = () if reduce else (target.shape if not prob else x.shape[:1] + x.shape[2:])
    if _backend.resolve("cross_entropy", x) == "numpy":
        # The reference checks the class indices itself (torch's IndexError). Its backward recomputes
        # everything from x, so the saved statistics stay unused.
        loss = ref.cross_entropy(to_numpy(x), target.numpy() if not prob else to_numpy(target),
                                 to_numpy(weight), ignore_index, reduction, _smoothing(label_smoothing))
        stats = np.zeros(_stats_size(rows), np.float32)  # (built in NumPy: a tensor setitem costs microseconds)
        stats[2 * rows:] = 1.0  # divisor, targets ok
        loss = from_numpy(loss, x)
        return (loss if reduce else loss.reshape(loss_shape)), torch.from_numpy(stats)
    indices = not prob and target.numel() > 0
    check = indices and not _target_on_host(target)  # checked by the kernel, asserted on the device
    if indices and not check:
        _check_host_target_range(target, C, ignore_index)
    check_triton_dtype("cross_entropy", x)
    loss = x.new_empty(loss_shape)
    stats = x.new_empty((_stats_size(rows),), dtype=torch.float32)
    if rows == 0:  # (no program runs: the kernels' results by hand; a mean over nothing is NaN, as torch)
        stats.fill_(float(rows) if reduce else 1.0)
        stats[-1] = 1.0
        if reduce:
            loss.fill_(float("nan") if reduction == "mean" else 0.0)
        return loss, stats
    plan = _ce_plan(x, target)
    if plan is None:
        x, target = x.contiguous(), target.contiguous()
        plan = _ce_plan(x, target)
    grid = plan.grid
    n_parts = grid[0]
    one_program = n_parts == 1
    # per-program partials: (loss, weight, bad-target count) rows, those this launch needs
    finish = not one_program and (reduce or check)
    parts = x.new_empty((3, n_parts), dtype=torch.float32) if finish else None
    eps = _smoothing(label_smoothing)
    kernel, meta = _CE_FORWARD.launcher(x)
    kernel[grid](x, target, weight if weight is not None else x,
                 parts[0] if reduce and parts is not None else loss, parts[1] if reduce and parts is not None else loss,
                 parts[2] if check and parts is not None else stats, stats, *plan.launch_args(), rows,
                 *plan.strides[0], x.stride(1), *plan.strides[1], target.stride(1) if prob else 0, int(ignore_index),
                 eps, PROB=prob, HAS_WEIGHT=weight is not None, SMOOTH=eps > 0, REDUCTION=_REDUCTION_CODES[reduction],
                 ONE_PROGRAM=one_program, CHECK=check, BLOCK_R=plan.BLOCK_R, BLOCK_C=plan.BLOCK_C, **meta)
    if finish:
        loss_finish_kernel[(1,)](parts[0], parts[1], parts[2], loss, stats[2 * rows:], stats[2 * rows + 1:], n_parts,
                                 float(rows), MEAN=reduction == "mean", HAS_DEN=True, LOSS=reduce, CHECK=check,
                                 BLOCK=FINISH_BLOCK)
    if check:
        _assert_targets_ok(stats, rows, C, ignore_index)
    return loss, stats


@cross_entropy_forward.register_fake
def _(x, target, weight, reduction, ignore_index, label_smoothing):
    loss_shape = () if reduction != "none" else (target.shape if target.dim() != x.dim()
                                                 else x.shape[:1] + x.shape[2:])
    return x.new_empty(loss_shape), x.new_empty((_stats_size(_row_count(x)),), dtype=torch.float32)


@custom_op("tkernels::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(grad: Tensor, x: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
                           reduction: str, ignore_index: int, label_smoothing: float,
                           need_target: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """(grad_input, grad_target or an empty tensor); `backend`: the one the forward ran on ('' for the
    one in force): the NumPy forward's stats are placeholders that only the NumPy backward accepts."""
    prob = target.dim() == x.dim()
    if backward_backend("cross_entropy", backend, x) == "numpy":
        dx, dt = ref.cross_entropy_backward(to_numpy(grad), to_numpy(x),
                                            to_numpy(target) if prob else target.numpy(),
                                            to_numpy(weight), ignore_index, reduction, _smoothing(label_smoothing))
        dt_out = numpy_into(torch.empty_like(x, dtype=target.dtype), dt) if need_target else x.new_empty(_EMPTY)
        return numpy_into(torch.empty_like(x), dx), dt_out
    dx = torch.empty_like(x)
    dt = torch.empty_like(dx, dtype=target.dtype) if need_target else x.new_empty(_EMPTY)
    if x.numel() == 0:
        return dx, dt
    per_row = reduction == "none"
    plan = _ce_plan(x, target, dx, *([grad] if per_row else []))
    if plan is None:  # batch dims that do not collapse to three (rare): contiguous copies
        x, target = x.contiguous(), target.contiguous()
        grad = grad.contiguous() if per_row else grad
        dx_out, dt_out = dx, dt
        dx = torch.empty_like(x)
        dt = torch.empty_like(dx, dtype=target.dtype) if need_target else dt
        plan = _ce_plan(x, target, dx, *([grad] if per_row else []))
        _launch_ce_backward(plan, grad, x, target, weight, stats, dx, dt, reduction, ignore_index,
                            label_smoothing, need_target)
        dx_out.copy_(dx)
        if need_target:
            dt_out.copy_(dt)
        return dx_out, dt_out
    _launch_ce_backward(plan, grad, x, target, weight, stats, dx, dt, reduction, ignore_index, label_smoothing,
                        need_target)
    return dx, dt


def _launch_ce_backward(plan, grad, x, target, weight, stats, dx, dt, reduction, ignore_index,
                        label_smoothing, need_target):
    prob = target.dim() == x.dim()
    per_row = reduction == "none"
    g_strides = plan.strides[3] if per_row else (0, 0, 0)
    kernel, meta = _CE_BACKWARD.launcher(x)
    eps = _smoothing(label_smoothing)
    kernel[plan.grid](grad, x, target, weight if weight is not None else x, stats, dx,
                      dt if need_target else dx, *plan.launch_args(), plan.n_rows, *g_strides,
                      *plan.strides[0], x.stride(1), *plan.strides[1], _class_stride(target, prob),
                      *plan.strides[2], dx.stride(1), int(ignore_index), eps,
                      PROB=prob, HAS_WEIGHT=weight is not None, SMOOTH=eps > 0,
                      REDUCTION=_reduction_code(reduction), TARGET_GRAD=need_target,
                      BLOCK_R=plan.BLOCK_R, BLOCK_C=plan.BLOCK_C, **meta)


@cross_entropy_backward.register_fake
def _(grad, x, target, weight, stats, reduction, ignore_index, label_smoothing, need_target, backend):
    return torch.empty_like(x), (torch.empty_like(x, dtype=target.dtype) if need_target else x.new_empty(_EMPTY))


class CrossEntropyFunction(torch.autograd.Function):
    """Autograd for the fused cross-entropy; keeps x, target and 8 bytes of statistics per row."""

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, weight: Optional[Tensor], reduction: str, ignore_index: int,
                label_smoothing: float):
        loss, stats = cross_entropy_forward.in_forward(x, target, weight, reduction, ignore_index, label_smoothing)
        ctx.save_for_backward(x, target, weight, stats)
        ctx.options = (reduction, ignore_index, label_smoothing)
        ctx.backend = forward_backend("cross_entropy", ctx, x)
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, target, weight, stats = ctx.saved_tensors
        need_target = ctx.needs_input_grad[1]
        dx, dt = cross_entropy_backward(grad, x, target, weight, stats, *ctx.options, need_target, ctx.backend)
        return (dx if ctx.needs_input_grad[0] else None), (dt if need_target else None), None, None, None, None


# ---------------------------------------------------------------------------------------------
# Public functions (torch.nn.functional signatures)
# ---------------------------------------------------------------------------------------------
def _resolve_reduction(op: str, size_average: Optional[bool], reduce: Optional[bool], reduction: str) -> str:
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)  # warns like torch
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: {reduction!r} is not a valid value for reduction; expected 'none', 'mean' or 'sum'")
    return reduction


def _check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, not {type(t).__name__}")


def _check_float(op: str, name: str, t: Tensor) -> None:
    _check_tensor(op, name, t)
    if not t.dtype.is_floating_point:
        # torch raises NotImplementedError ("... not implemented for 'Long'"), a RuntimeError
        raise NotImplementedError(f"{op}: {name} must be a floating-point tensor (float16, bfloat16, float32 or "
                                  f"float64), but got {t.dtype}")


def _check_device(op: str, x: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{op}: expected {name} on the device of input ({x.device}), but it is on {t.device}")


def _promote(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def _common_case(input, target, weight, size_average, reduce, reduction, label_smoothing) -> bool:
    """Whether every check of :func:`cross_entropy` passes for a call in the commonest form: batched
    floating-point logits (N, C, ...), int64 class indices of the batch shape on the same device,
    no class weights, no legacy arguments, a valid reduction and label smoothing. Read in one
    expression; False sends the call through the full checks (and their errors)."""
    return (weight is None and size_average is None and reduce is None and isinstance(input, Tensor)
            and isinstance(target, Tensor) and input.dtype in FLOAT_DTYPES and target.dtype == torch.int64
            and input.dim() >= 2 and input.shape[1] > 0 and target.dim() == input.dim() - 1
            and target.shape[0] == input.shape[0] and target.shape[1:] == input.shape[2:]
            and (reduction == "mean" or reduction == "sum" or reduction == "none")
            and type(label_smoothing) is float and 0.0 <= label_smoothing <= 1.0
            and input.device == target.device)


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, size_average: Optional[bool] = None,
                  ignore_index: int = -100, reduce: Optional[bool] = None, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> Tensor:
    """``torch.nn.functional.cross_entropy`` with log-softmax and the loss fused (see the module docstring).

    input (C,), (N, C) or (N, C, d1, ...); target class indices (int64 or uint8) of the batch shape, or
    class probabilities of input's shape. Targets outside [0, C) (other than ignore_index) raise
    IndexError (host targets; a GPU target fails through a device-side assert, as torch's).
    """
    op = "cross_entropy"
    input, target, weight = cast_inputs(op, input, target, weight)
    if _common_case(input, target, weight, size_average, reduce, reduction, label_smoothing):
        return run_function(CrossEntropyFunction, input, target, None, reduction, int(ignore_index),
                            float(label_smoothing))
    reduction = _resolve_reduction(op, size_average, reduce, reduction)
    _check_float(op, "input", input)
    _check_tensor(op, "target", target)
    _check_device(op, input, target=target, weight=weight)
    if input.dim() == 0:
        raise RuntimeError(f"{op}: input must be (C,), (N, C) or (N, C, d1, ...), but got a 0-d tensor")
    label_smoothing = float(label_smoothing)
    if label_smoothing > 1.0:
        raise RuntimeError(f"{op}: label_smoothing must be between 0.0 and 1.0, but got {label_smoothing}")
    label_smoothing = _smoothing(label_smoothing)
    batched = input.dim() >= 2
    n_classes = input.shape[1] if batched else input.shape[0]
    if n_classes == 0:
        raise RuntimeError(f"{op}: input has 0 classes (shape {tuple(input.shape)}); expected at least one")
    probabilities = target.shape == input.shape
    if probabilities:
        if not target.dtype.is_floating_point:
            raise RuntimeError(f"{op}: target has input's shape {tuple(input.shape)}, so it holds class "
                               f"probabilities and must be floating point, but it is {target.dtype}")
        if ignore_index != -100:
            raise RuntimeError(f"{op}: ignore_index={ignore_index} is not supported with class-probability targets")
        if target.dtype != input.dtype:
            input, target = _promote(input, target)
    else:
        if target.dtype not in (torch.int64, torch.uint8):
            raise RuntimeError(f"{op}: class-index targets must be int64 (Long) or uint8 (Byte), but got "
                               f"{target.dtype} (class probabilities need target.shape == input.shape "
                               f"{tuple(input.shape)}, got {tuple(target.shape)})")
        if batched and (target.dim() == 0 or target.shape[0] != input.shape[0]):
            raise ValueError(f"{op}: Expected input batch_size ({input.shape[0]}) to match target batch_size "
                             f"({target.shape[0] if target.dim() else 'none: target is 0-d'})")
        if target.shape != (input.shape[:1] + input.shape[2:] if batched else ()):
            expected = (input.shape[0],) + tuple(input.shape[2:]) if batched else ()
            raise RuntimeError(f"{op}: size mismatch: input {tuple(input.shape)} needs class-index target of shape "
                               f"{expected}, but got {tuple(target.shape)}")
    if weight is not None:
        _check_tensor(op, "weight", weight)
        if weight.dim() != 1 or weight.shape[0] != n_classes:
            raise RuntimeError(f"{op}: weight tensor should be defined either for all {n_classes} classes or no "
                               f"classes, but got weight of shape {tuple(weight.shape)}")
        if weight.dtype != input.dtype:
            raise RuntimeError(f"{op}: expected weight to have input's dtype {input.dtype}, but got {weight.dtype}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"{op}: the gradient with respect to weight is not supported (torch has none for "
                               "class-index targets); pass weight.detach()")
        weight = weight.contiguous()  # C values; the kernels index it densely
    x = input if batched else input.unsqueeze(0)
    t = target if batched else target.unsqueeze(0)
    loss = run_function(CrossEntropyFunction, x, t, weight, reduction, int(ignore_index), label_smoothing)
    return loss.squeeze(0) if reduction == "none" and not batched else loss
