"""Fused multi-tensor SGD and AdamW steps: one launch updates every parameter of a group.

Multi-tensor design. The launcher writes one int64 table per (device, dtype) partition:
``[one row per tensor | one (tensor, chunk) pair per chunk]``. A row holds the raw
addresses of the parameter, its gradient and its state tensors, plus its element count. Every
tensor is cut into CHUNK-element chunks and the grid has one program per chunk, so a program
reads its (tensor, chunk) pair, then its row, turns the addresses into typed pointers and streams
its chunk in BLOCK-element steps: whole blocks unmasked (with 128-bit accesses when the host has
checked that every address is 16-byte aligned), then one masked tail. Big and small tensors share
one launch with no padding and no concatenation; the table costs 16 bytes per chunk plus 64 per
tensor. It depends only on the tensors (addresses, sizes, SGD's first-step flags), never on a
hyperparameter, so it is built once per set of tensors, copied to the device once (pinned,
asynchronous) and kept: a steady-state step builds no host tensor and never waits for the device.
A new param, new state or a moved tensor gives a new set and one new table (TABLE_CACHE_SIZE sets
are kept). Gradients are in the set too: backward accumulating into kept .grad tensors, or CUDA's
caching allocator in a steady loop, gives the same addresses; new gradient storage costs one table
(an upload, never a sync). Under CUDA-graph capture, warm up first so that no table is built then.
Addresses in a table work the same under Triton's interpreter (host addresses of CPU tensors).

torch.amp.GradScaler: like torch's fused optimizers, a step may take ``grad_scale`` and
``found_inf`` (one-element device tensors). The kernels divide each gradient by grad_scale and
write the unscaled gradient back (as torch's fused kernels do); a nonzero found_inf empties every
chunk, so nothing is written and AdamW's step counters stay put. No host ever reads either value.

AdamW keeps ``step`` as a float32 0-d tensor per parameter, as torch does. A one-program-per-128-
tensors prologue increments the steps on the device and computes, in float64 (lr and the betas are
float64 kernel arguments), each tensor's step size lr / (1 - beta1^t), sqrt(1 - beta2^t) (t by
binary powering, to match Python's ``beta ** t``) and decay 1 - lr * weight_decay; the update
kernel reads them. Two launches per group, whatever its size.

A tensor ``lr`` on the params' device (torch's fused optimizers accept one, e.g. for CUDA graphs)
is read by the kernels, not by the host; one elsewhere (a CPU tensor beside CUDA params) is read on
the host, as torch does, which waits for no device.

No autotuning: the mutated buffers are reached through the table, so ``restore_value`` could not
protect them from the benchmark runs; one config per architecture is data below.
"""
from __future__ import annotations

import contextlib
import itertools
from collections import OrderedDict
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
import triton
import triton.language as tl

from .. import _backend
from ..reference import optim as ref
from ._dispatch import custom_op
from ._common import (KernelSpec, cdiv, check_triton_dtype, config, current_arch, numpy_view, register_kernel,
                      to_numpy)

# Table layout (int64 words; the kernels index rows with these literal field numbers).
ROW = 8  # param, grad, state a, state b, state c, aux (AdamW: step address; SGD: first-step flag), numel, -
PARAM, GRAD, STATE_A, STATE_B, STATE_C, AUX, NUMEL = range(7)
PROLOGUE_BLOCK = 128
# Per tensor, from AdamW's prologue: step size, sqrt(1 - beta2^t), 1 - lr * weight_decay (a constexpr:
# the kernels read it as a global)
SCALARS = tl.constexpr(3)
TABLE_CACHE_SIZE = 16  # tables kept, least recently used dropped: a few optimizers x groups x dtypes

# CHUNK is what the table is cut by; a program loops over its chunk BLOCK elements at a time.
# The interpreter's chunk is small so that tests of modest size cross chunk and block borders.
CONFIGS = {
    "sm_80": config(BLOCK=1024, CHUNK=16384, num_warps=8, num_stages=1),  # 2048 spills (fp16 AMSGrad)
    "sm_90": config(BLOCK=2048, CHUNK=32768, num_warps=8, num_stages=1),
}
INTERPRETER_CONFIG = config(BLOCK=512, CHUNK=1024, num_warps=4, num_stages=1)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _locate(meta_ptr, chunk_base, found_inf_ptr, ROW: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
            HAS_FOUND_INF: tl.constexpr):
    """This program's tensor index and table row, and its chunk [start, stop) with the end `full`
    of its whole BLOCKs (the rest, if any, is one masked tail block). A step with a nonzero
    found_inf gets an empty chunk: it is skipped without a branch on the host."""
    pair = meta_ptr + chunk_base + 2 * tl.program_id(0).to(tl.int64)
    tensor = tl.load(pair)
    row = meta_ptr + tensor * ROW
    start = tl.load(pair + 1) * CHUNK
    stop = tl.minimum(start + CHUNK, tl.load(row + 6))
    if HAS_FOUND_INF:
        stop = tl.where(tl.load(found_inf_ptr) != 0, start, stop)
    full = start + (stop - start) // BLOCK * BLOCK
    return tensor, row, start, full, stop


@triton.jit
def _pointer(row, field, like_ptr, ALIGNED: tl.constexpr):
    """The address in ``row[field]`` as a pointer of like_ptr's type. When the launcher has checked
    that every address is 16-byte aligned, saying so lets whole blocks use 128-bit accesses."""
    ptr = tl.load(row + field).to(tl.pointer_type(like_ptr.dtype.element_ty))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _load(ptr, offs, stop, MASKED: tl.constexpr):
    if MASKED:
        value = tl.load(ptr + offs, mask=offs < stop, other=0.0)
    else:
        value = tl.load(ptr + offs)
    return value.to(tl.float32)


@triton.jit
def _store(ptr, offs, value, stop, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=offs < stop)
    else:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty))


@triton.jit
def _gradient(grad, offs, stop, grad_scale, UNSCALE: tl.constexpr, MASKED: tl.constexpr):
    """The gradient in fp32; with UNSCALE divided by GradScaler's scale and stored back unscaled."""
    g = _load(grad, offs, stop, MASKED)
    if UNSCALE:
        g = g / grad_scale
        _store(grad, offs, g, stop, MASKED)
    return g


@triton.jit
def _grad_scale(grad_scale_ptr, UNSCALE: tl.constexpr):
    scale = 1.0
    if UNSCALE:
        scale = tl.load(grad_scale_ptr).to(tl.float32)
    return scale


@triton.jit
def _sgd_block(param, grad, buf, offs, stop, first, grad_scale, lr, momentum, one_minus_dampening, weight_decay,
               MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
               WEIGHT_DECAY: tl.constexpr, UNSCALE: tl.constexpr, MASKED: tl.constexpr):
    p = _load(param, offs, stop, MASKED)
    d = _gradient(grad, offs, stop, grad_scale, UNSCALE, MASKED)
    if MAXIMIZE:
        d = -d
    if WEIGHT_DECAY:
        d = d + weight_decay * p
    if MOMENTUM:
        if first != 0:  # the buffer of a tensor's first step is uninitialised: it becomes d
            b = d
        else:
            b = _load(buf, offs, stop, MASKED) * momentum + one_minus_dampening * d
        _store(buf, offs, b, stop, MASKED)
        if NESTEROV:
            d = d + momentum * b
        else:
            d = b
    _store(param, offs, p - lr * d, stop, MASKED)


@triton.jit
def sgd_kernel(meta_ptr, chunk_base, like_ptr, grad_scale_ptr, found_inf_ptr, lr_ptr, lr, momentum,
               one_minus_dampening, weight_decay, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
               MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, UNSCALE: tl.constexpr,
               HAS_FOUND_INF: tl.constexpr, LR_TENSOR: tl.constexpr, ALIGNED: tl.constexpr, ROW: tl.constexpr,
               CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """SGD on one CHUNK of one tensor: g /= grad_scale (UNSCALE; g stored back); d = ±g + wd*p;
    b = d (first step) or momentum*b + (1-dampening)*d; p -= lr * (d + momentum*b if nesterov else b).
    Nothing at all when found_inf != 0 (HAS_FOUND_INF). With LR_TENSOR, lr is read from lr_ptr.

    Grid: one program per chunk of every tensor (see the module docstring); unmasked BLOCKs, then
    one masked tail. Loads p, g (and b); stores p (and b): 3 element accesses, 5 with momentum, in
    the param dtype with fp32 math (one more store of g with UNSCALE). Memory-bound.
    """
    tensor, row, start, full, stop = _locate(meta_ptr, chunk_base, found_inf_ptr, ROW, CHUNK, BLOCK, HAS_FOUND_INF)
    param = _pointer(row, 0, like_ptr, ALIGNED)
    grad = _pointer(row, 1, like_ptr, ALIGNED)
    buf = _pointer(row, 2, like_ptr, ALIGNED)
    first = tl.load(row + 5)  # 1 on the tensor's first step with momentum
    scale = _grad_scale(grad_scale_ptr, UNSCALE)
    if LR_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float32)
    for off in range(start, full, BLOCK):
        _sgd_block(param, grad, buf, off + tl.arange(0, BLOCK), stop, first, scale, lr, momentum,
                   one_minus_dampening, weight_decay, MOMENTUM, NESTEROV, MAXIMIZE, WEIGHT_DECAY, UNSCALE,
                   MASKED=False)
    if full < stop:
        _sgd_block(param, grad, buf, full + tl.arange(0, BLOCK), stop, first, scale, lr, momentum,
                   one_minus_dampening, weight_decay, MOMENTUM, NESTEROV, MAXIMIZE, WEIGHT_DECAY, UNSCALE,
                   MASKED=True)


@triton.jit
def adamw_prologue_kernel(meta_ptr, scalars_ptr, found_inf_ptr, lr_ptr, num_tensors, lr: tl.float64,
                          beta1: tl.float64, beta2: tl.float64, weight_decay: tl.float64, HAS_FOUND_INF: tl.constexpr,
                          LR_TENSOR: tl.constexpr, ROW: tl.constexpr, BLOCK_T: tl.constexpr):
    """Per tensor: step += 1 (unless found_inf != 0, as torch's fused AdamW leaves it);
    scalars = (lr / (1 - beta1^step), sqrt(1 - beta2^step), 1 - lr * weight_decay) in float64,
    lr read from lr_ptr with LR_TENSOR.

    Grid: cdiv(T, BLOCK_T) programs of BLOCK_T tensors. Reads and writes one float32 step per
    tensor and writes three float32 scalars; latency-bound (one float64 powering round per bit of step).
    """
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = t < num_tensors
    zero = tl.zeros([BLOCK_T], dtype=tl.float64)
    if LR_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float64)
    lr = lr + zero
    beta1 = beta1 + zero
    beta2 = beta2 + zero
    step_ptr = tl.load(meta_ptr + t.to(tl.int64) * ROW + 5, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    increment = 1.0
    if HAS_FOUND_INF:
        increment = tl.where(tl.load(found_inf_ptr) != 0, 0.0, 1.0)
    step = tl.load(step_ptr, mask=mask, other=0.0) + increment
    tl.store(step_ptr, step, mask=mask)
    # beta^step by binary powering (float32 steps are exact integers up to 2^24), as many rounds
    # as the largest step has bits
    remaining = step.to(tl.int32)
    pow1 = tl.full([BLOCK_T], 1.0, tl.float64)
    pow2 = tl.full([BLOCK_T], 1.0, tl.float64)
    while tl.max(remaining, axis=0) > 0:
        bit = (remaining & 1) != 0
        pow1 = tl.where(bit, pow1 * beta1, pow1)
        pow2 = tl.where(bit, pow2 * beta2, pow2)
        beta1 = beta1 * beta1
        beta2 = beta2 * beta2
        remaining = remaining >> 1
    # (a skipped first step leaves step 0, whose scalars the skipped update never reads)
    tl.store(scalars_ptr + SCALARS * t, (lr / tl.where(step > 0, 1.0 - pow1, 1.0)).to(tl.float32), mask=mask)
    tl.store(scalars_ptr + SCALARS * t + 1, tl.sqrt(1.0 - pow2).to(tl.float32), mask=mask)
    tl.store(scalars_ptr + SCALARS * t + 2, (1.0 - lr * weight_decay).to(tl.float32), mask=mask)


@triton.jit
def _adamw_block(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, offs, stop, grad_scale, step_size, bc2_sqrt,
                 one_minus_beta1, beta2, one_minus_beta2, eps, decay, AMSGRAD: tl.constexpr,
                 MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, UNSCALE: tl.constexpr, MASKED: tl.constexpr):
    p = _load(param, offs, stop, MASKED)
    g = _gradient(grad, offs, stop, grad_scale, UNSCALE, MASKED)
    m = _load(exp_avg, offs, stop, MASKED)
    v = _load(exp_avg_sq, offs, stop, MASKED)
    if MAXIMIZE:
        g = -g
    if WEIGHT_DECAY:
        p = p * decay
    # torch.lerp's two-sided form, so m rounds as torch's does
    if one_minus_beta1 < 0.5:
        m = m + one_minus_beta1 * (g - m)
    else:
        m = g - (g - m) * (1.0 - one_minus_beta1)
    v = v * beta2 + one_minus_beta2 * g * g
    _store(exp_avg, offs, m, stop, MASKED)
    _store(exp_avg_sq, offs, v, stop, MASKED)
    if AMSGRAD:
        v = tl.maximum(_load(max_exp_avg_sq, offs, stop, MASKED), v, propagate_nan=tl.PropagateNan.ALL)
        _store(max_exp_avg_sq, offs, v, stop, MASKED)
    denom = tl.sqrt(v) / bc2_sqrt + eps
    _store(param, offs, p - step_size * (m / denom), stop, MASKED)


@triton.jit
def adamw_kernel(meta_ptr, chunk_base, scalars_ptr, like_ptr, grad_scale_ptr, found_inf_ptr, one_minus_beta1, beta2,
                 one_minus_beta2, eps, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                 WEIGHT_DECAY: tl.constexpr, UNSCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                 ALIGNED: tl.constexpr, ROW: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """AdamW on one CHUNK of one tensor, torch's formulation (after g /= grad_scale with UNSCALE, g
    stored back; nothing at all when found_inf != 0):
    p *= 1 - lr*wd; m = lerp(m, g, 1-beta1); v = beta2*v + (1-beta2)*g^2; v_max = max(v_max, v);
    p -= step_size * m / (sqrt(v or v_max) / bc2_sqrt + eps), with the prologue's per-tensor scalars.

    Grid: one program per chunk; unmasked BLOCKs, then one masked tail. Loads p, g, m, v (+ v_max);
    stores p, m, v (+ v_max): 7 (9) element accesses in the param dtype with fp32 math, one more with
    UNSCALE. Memory-bound.
    """
    tensor, row, start, full, stop = _locate(meta_ptr, chunk_base, found_inf_ptr, ROW, CHUNK, BLOCK, HAS_FOUND_INF)
    param = _pointer(row, 0, like_ptr, ALIGNED)
    grad = _pointer(row, 1, like_ptr, ALIGNED)
    exp_avg = _pointer(row, 2, like_ptr, ALIGNED)
    exp_avg_sq = _pointer(row, 3, like_ptr, ALIGNED)
    max_exp_avg_sq = _pointer(row, 4, like_ptr, ALIGNED)
    step_size = tl.load(scalars_ptr + SCALARS * tensor)
    bc2_sqrt = tl.load(scalars_ptr + SCALARS * tensor + 1)
    decay = tl.load(scalars_ptr + SCALARS * tensor + 2)
    scale = _grad_scale(grad_scale_ptr, UNSCALE)
    for off in range(start, full, BLOCK):
        _adamw_block(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, off + tl.arange(0, BLOCK), stop, scale,
                     step_size, bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps, decay, AMSGRAD, MAXIMIZE,
                     WEIGHT_DECAY, UNSCALE, MASKED=False)
    if full < stop:
        _adamw_block(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, full + tl.arange(0, BLOCK), stop, scale,
                     step_size, bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps, decay, AMSGRAD, MAXIMIZE,
                     WEIGHT_DECAY, UNSCALE, MASKED=True)


_MAIN_SIG = {"meta_ptr": "*i64", "chunk_base": "i32", "like_ptr": "*{dtype}", "grad_scale_ptr": "*fp32",
             "found_inf_ptr": "*fp32"}
_SCALER = dict(UNSCALE=True, HAS_FOUND_INF=True)  # under torch.amp.GradScaler
_NO_SCALER = dict(UNSCALE=False, HAS_FOUND_INF=False)
_TABLE = dict(ROW=ROW)
_ALIGNED = dict(ROW=ROW, ALIGNED=True)
register_kernel(KernelSpec(
    name="sgd_step",
    kernel=sgd_kernel,
    signature={**_MAIN_SIG, "lr_ptr": "*fp32", "lr": "fp32", "momentum": "fp32", "one_minus_dampening": "fp32",
               "weight_decay": "fp32"},
    configs_by_arch={arch: [cfg] for arch, cfg in CONFIGS.items()},
    variants=[dict(MOMENTUM=True, NESTEROV=True, MAXIMIZE=True, WEIGHT_DECAY=True, LR_TENSOR=True, **_SCALER,
                   **_ALIGNED),
              dict(MOMENTUM=False, NESTEROV=False, MAXIMIZE=False, WEIGHT_DECAY=False, LR_TENSOR=False, **_NO_SCALER,
                   **_ALIGNED),
              dict(MOMENTUM=True, NESTEROV=False, MAXIMIZE=False, WEIGHT_DECAY=True, LR_TENSOR=False, **_NO_SCALER,
                   **_TABLE, ALIGNED=False)],
))
register_kernel(KernelSpec(
    name="adamw_step",
    kernel=adamw_kernel,
    signature={**_MAIN_SIG, "scalars_ptr": "*fp32", "one_minus_beta1": "fp32", "beta2": "fp32",
               "one_minus_beta2": "fp32", "eps": "fp32"},
    configs_by_arch={arch: [cfg] for arch, cfg in CONFIGS.items()},
    variants=[dict(AMSGRAD=True, MAXIMIZE=True, WEIGHT_DECAY=True, **_SCALER, **_ALIGNED),
              dict(AMSGRAD=False, MAXIMIZE=False, WEIGHT_DECAY=True, **_NO_SCALER, **_ALIGNED),
              dict(AMSGRAD=False, MAXIMIZE=False, WEIGHT_DECAY=True, **_NO_SCALER, **_TABLE, ALIGNED=False)],
))
register_kernel(KernelSpec(
    name="adamw_prologue",
    kernel=adamw_prologue_kernel,
    signature={"meta_ptr": "*i64", "scalars_ptr": "*fp32", "found_inf_ptr": "*fp32", "lr_ptr": "*fp32",
               "num_tensors": "i32", "lr": "fp64", "beta1": "fp64", "beta2": "fp64", "weight_decay": "fp64"},
    configs_by_arch={arch: [config(BLOCK_T=PROLOGUE_BLOCK, num_warps=4, num_stages=1)] for arch in CONFIGS},
    variants=[dict(HAS_FOUND_INF=True, LR_TENSOR=True, **_TABLE), dict(HAS_FOUND_INF=False, LR_TENSOR=False, **_TABLE)],
    dtypes=("fp32",),
))


# ---------------------------------------------------------------------------------------------
# Launch plumbing: validation, layout staging and the address table
# ---------------------------------------------------------------------------------------------
def _on(device: torch.device):
    """Triton launches on the current CUDA device, which need not be the params' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch_config(device: torch.device) -> Tuple[int, int, int]:
    cfg = INTERPRETER_CONFIG if device.type != "cuda" else CONFIGS[current_arch(device)]
    return cfg.kwargs["BLOCK"], cfg.kwargs["CHUNK"], cfg.num_warps


def validate(op: str, params: Sequence[Tensor], grads: Sequence[Tensor], states: Dict[str, Sequence[Tensor]],
             steps: Optional[Sequence[Tensor]] = None) -> Dict[Tuple[torch.device, torch.dtype], List[int]]:
    """Raise, before anything is touched, if a step cannot run on these tensors (the kernels write
    through raw addresses, so every shape is checked). ``states`` maps a state name to one tensor per
    param, shaped like it; ``steps`` holds AdamW's 0-d counters. Returns the (device, dtype)
    partitions of the params, one launch each."""
    columns = [("grad", grads), *states.items()]
    for name, tensors in columns + ([("step", steps)] if steps is not None else []):
        if len(tensors) != len(params):
            raise RuntimeError(f"{op}: got {len(params)} params but {len(tensors)} {name}s")
    partitions: Dict[Tuple[torch.device, torch.dtype], List[int]] = OrderedDict()
    for i, p in enumerate(params):
        shape, dtype, device = p.shape, p.dtype, p.device
        if not dtype.is_floating_point:
            raise RuntimeError(f"{op}: param {i} has dtype {dtype}; only floating-point parameters "
                               "(float16, bfloat16, float32, float64) are supported")
        if grads[i].is_sparse:
            raise RuntimeError(f"{op}: param {i} has a sparse gradient; only dense gradients are supported")
        for name, tensors in columns:
            t = tensors[i]
            if t.shape != shape or t.dtype != dtype or t.device != device:
                raise RuntimeError(f"{op}: the {name} of param {i} is {tuple(t.shape)} {t.dtype} on {t.device}, "
                                   f"but the param is {tuple(shape)} {dtype} on {device}")
        if steps is not None and steps[i].numel() != 1:
            raise RuntimeError(f"{op}: step {i} must be a one-element tensor, but it has shape {tuple(steps[i].shape)}")
        partitions.setdefault((device, dtype), []).append(i)
    for idx in partitions.values():
        if _backend.resolve(op, params[idx[0]]) != "triton":
            continue
        check_triton_dtype(op, params[idx[0]])
        for i in idx if steps is not None else ():
            if steps[i].dtype != torch.float32 or steps[i].device != params[i].device:
                raise RuntimeError(f"{op}: the triton backend keeps each step as a float32 tensor on its param's "
                                   f"device ({params[i].device}), but step {i} is {steps[i].dtype} on "
                                   f"{steps[i].device}")
    return partitions


def _is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill [data_ptr, data_ptr + numel) in some order."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_order(a: Tensor, b: Tensor) -> bool:
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


class _Staging:
    """Flat working copies of tensors the kernel cannot walk as one storage range in the param's
    order (non-dense params, or a grad/state laid out differently); results are copied back."""

    def __init__(self):
        self._write_back: List[Tuple[Tensor, Tensor]] = []
        self._alive: List[Tensor] = []  # the table holds bare addresses: the copies must outlive the launch

    def param(self, p: Tensor) -> Tensor:
        if p.is_contiguous() or _is_dense(p):
            return p
        work = p.contiguous()
        self._write_back.append((p, work))
        return work

    def like(self, t: Tensor, work_param: Tensor, mutated: bool) -> Tensor:
        if (t.is_contiguous() and work_param.is_contiguous()) or (_is_dense(t) and _same_order(t, work_param)):
            return t
        work = torch.empty_like(work_param).copy_(t)
        self._alive.append(work)
        if mutated:
            self._write_back.append((t, work))
        return work

    def finish(self) -> None:
        for original, work in self._write_back:
            original.copy_(work)


class _Table(NamedTuple):
    meta: Tensor      # the int64 table, on the params' device
    chunk_base: int   # index of its first (tensor, chunk) pair
    num_chunks: int
    aligned: bool     # every tensor address 16-byte aligned


_TABLES: "OrderedDict[tuple, _Table]" = OrderedDict()


def table(rows: List[List[int]], chunk: int, device: torch.device) -> _Table:
    """The device table of these rows: the cached one when the same tensors (same addresses, sizes
    and flags) were stepped before, else a new one, which replaces the least recently used."""
    key = (device, chunk, *itertools.chain.from_iterable(rows))
    found = _TABLES.get(key)
    if found is not None:
        _TABLES.move_to_end(key)
        return found
    built = _build_table(rows, chunk, device)
    _TABLES[key] = built
    if len(_TABLES) > TABLE_CACHE_SIZE:
        _TABLES.popitem(last=False)
    return built


def _build_table(rows: List[List[int]], chunk: int, device: torch.device) -> _Table:
    """Built with NumPy on the host (a handful of tiny torch CPU ops would cost more than the whole
    table) and copied to the device once."""
    counts = np.array([cdiv(row[NUMEL], chunk) for row in rows], dtype=np.int64)
    num_chunks = int(counts.sum())
    chunk_base = ROW * len(rows)
    meta = np.zeros(chunk_base + 2 * num_chunks, dtype=np.int64)
    meta[:chunk_base] = np.array(rows, dtype=np.int64).reshape(-1)
    pairs = meta[chunk_base:].reshape(num_chunks, 2)
    pairs[:, 0] = np.repeat(np.arange(len(rows)), counts)
    pairs[:, 1] = np.arange(num_chunks) - np.repeat(np.cumsum(counts) - counts, counts)
    table = torch.from_numpy(meta)
    if device.type == "cuda":
        # through pinned memory, so the copy is queued on the stream instead of waiting for the
        # backward pass still running there (torch's host allocator recycles the block afterwards)
        pinned = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
        pinned.copy_(table)
        table = pinned.to(device, non_blocking=True)
    return _Table(table, chunk_base, num_chunks, _aligned(rows))


def _aligned(rows: List[List[int]]) -> bool:
    """Whether every tensor address in the rows (param, grad, states) is a multiple of 16 bytes."""
    return all(address % 16 == 0 for row in rows for address in row[PARAM:AUX])


def _row(*tensors_or_ints) -> List[int]:
    row = [t.data_ptr() if isinstance(t, Tensor) else int(t) for t in tensors_or_ints]
    return row + [0] * (ROW - len(row))


# ---------------------------------------------------------------------------------------------
# Scalars that live in tensors: torch.amp.GradScaler's two, and a tensor lr
# ---------------------------------------------------------------------------------------------
def check_scalar_tensors(op: str, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and (not isinstance(t, Tensor) or t.numel() != 1 or not t.dtype.is_floating_point):
            given = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise RuntimeError(f"{op}: {name} must be a one-element floating-point tensor, but got {given}")


def _host_lr(lr: float, lr_tensor: Optional[Tensor]) -> float:
    return lr if lr_tensor is None else float(lr_tensor)


def _lr_launch_args(lr: float, lr_tensor: Optional[Tensor], device: torch.device, fallback: Tensor) -> dict:
    """A tensor lr on the params' device is read by the kernel (no host read, capture-safe); any
    other lr is passed by value, a CPU tensor beside CUDA params read here as torch does."""
    if lr_tensor is not None and lr_tensor.device == device:
        return dict(lr_ptr=lr_tensor, lr=0.0, LR_TENSOR=True)
    return dict(lr_ptr=fallback, lr=_host_lr(lr, lr_tensor), LR_TENSOR=False)


def _on_device(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    """GradScaler's tensor on the params' device, as torch's fused optimizers move it (asynchronously)."""
    return t if t is None or t.device == device else t.to(device, non_blocking=True)


def _numpy_skipped(found_inf: Optional[Tensor]) -> bool:
    """The NumPy backend's step runs on the host, so it reads found_inf there (a CPU tensor)."""
    return found_inf is not None and float(found_inf) != 0.0


def _numpy_gather(tensors: List[Tensor]) -> np.ndarray:
    """The tensors flattened into one float64 array: the NumPy backend's step runs once per batch of
    params (the update is elementwise), not once per param with a conversion each."""
    if len(tensors) == 1:
        return to_numpy(tensors[0]).reshape(-1)
    views = [numpy_view(t) for t in tensors]
    if all(v is not None for v in views):  # (one NumPy concatenate: no torch.cat, no second conversion)
        return np.concatenate([v.reshape(-1) for v in views], dtype=np.float64)
    return to_numpy(torch.cat([t.detach().reshape(-1) for t in tensors]))


def _numpy_scatter(values: np.ndarray, tensors: List[Tensor]) -> None:
    """Copy the float64 ``values`` (laid out as :func:`_numpy_gather` gathered) back into tensors,
    each through a NumPy view of its memory where there is one (the op bumps their versions)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        part = values[offset:offset + n].reshape(t.shape)
        offset += n
        view = numpy_view(t)
        if view is not None:
            np.copyto(view, part, casting="same_kind")
        else:
            t.copy_(torch.from_numpy(np.ascontiguousarray(part)))


def _numpy_gradients(grads: List[Tensor], grad_scale: Optional[Tensor]) -> np.ndarray:
    """The gathered float64 gradients; unscaled, and stored back unscaled, under a GradScaler."""
    g = _numpy_gather(grads)
    if grad_scale is not None:
        g = ref.unscale(g, float(grad_scale))
        _numpy_scatter(g, grads)
    return g


def _numpy_batches(idx: List[int], key) -> List[List[int]]:
    """idx grouped by key(i) (the params one reference call can update together), in first-seen order."""
    batches: Dict = {}
    for i in idx:
        batches.setdefault(key(i), []).append(i)
    return list(batches.values())


def _scaler_launch_args(grad_scale: Optional[Tensor], found_inf: Optional[Tensor], device: torch.device,
                        fallback: Tensor) -> dict:
    """Kernel arguments for the two tensors (an unread fallback pointer for an absent one)."""
    grad_scale, found_inf = _on_device(grad_scale, device), _on_device(found_inf, device)
    return dict(grad_scale_ptr=fallback if grad_scale is None else grad_scale,
                found_inf_ptr=fallback if found_inf is None else found_inf,
                UNSCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None)


# ---------------------------------------------------------------------------------------------
# SGD
# ---------------------------------------------------------------------------------------------
def _sgd_triton(params, grads, bufs, first, lr, momentum, dampening, weight_decay, nesterov, maximize, grad_scale,
                found_inf, lr_tensor):
    device = params[0].device
    block, chunk, num_warps = _launch_config(device)
    staging = _Staging()
    rows = []
    for i, p in enumerate(params):
        wp = staging.param(p)
        wg = staging.like(grads[i], wp, mutated=grad_scale is not None)
        wb = staging.like(bufs[i], wp, mutated=True) if momentum != 0 else 0
        rows.append(_row(wp, wg, wb, 0, 0, int(momentum != 0 and first[i]), p.numel()))
    tab = table(rows, chunk, device)
    with _on(device):
        if tab.num_chunks:
            sgd_kernel[(tab.num_chunks,)](
                tab.meta, tab.chunk_base, params[0], momentum=float(momentum),
                one_minus_dampening=1.0 - float(dampening), weight_decay=float(weight_decay),
                MOMENTUM=momentum != 0, NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
                WEIGHT_DECAY=weight_decay != 0, ALIGNED=tab.aligned, ROW=ROW, CHUNK=chunk, BLOCK=block,
                num_warps=num_warps, num_stages=1, **_scaler_launch_args(grad_scale, found_inf, device, tab.meta),
                **_lr_launch_args(float(lr), lr_tensor, device, tab.meta))
        staging.finish()


@custom_op("tkernels::sgd_step", mutates_args=("params", "grads", "momentum_buffers"))
def sgd_step(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], first_step: List[bool],
             lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
             maximize: bool, grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
             lr_tensor: Optional[Tensor] = None) -> None:
    """One SGD step over a list of parameters, in place. With momentum, ``momentum_buffers[i]`` is the
    buffer of param i; where ``first_step[i]`` it is uninitialised and gets the first direction.
    ``grad_scale``/``found_inf`` are torch.amp.GradScaler's: grads are divided by grad_scale (and
    stored back unscaled) and a nonzero found_inf skips the step. ``lr_tensor``, if given, is the lr."""
    partitions = validate("sgd", params, grads, {"momentum_buffer": momentum_buffers} if momentum != 0 else {})
    check_scalar_tensors("sgd", grad_scale=grad_scale, found_inf=found_inf, lr=lr_tensor)
    if momentum != 0 and len(first_step) != len(params):
        raise RuntimeError(f"sgd: momentum={momentum} needs a first_step flag per param, but got {len(params)} "
                           f"params and {len(first_step)} flags")
    for idx in partitions.values():
        sub = lambda seq: [seq[i] for i in idx] if len(seq) else []  # noqa: E731
        if _backend.resolve("sgd", params[idx[0]]) == "numpy":
            if _numpy_skipped(found_inf):
                continue
            has_buffer = lambda i: momentum != 0 and not first_step[i]  # noqa: E731
            for batch in _numpy_batches(idx, has_buffer):
                pick = lambda seq: [seq[i] for i in batch]  # noqa: E731
                buf = _numpy_gather(pick(momentum_buffers)) if has_buffer(batch[0]) else None
                new_p, new_buf = ref.sgd_update(_numpy_gather(pick(params)), _numpy_gradients(pick(grads), grad_scale),
                                                buf, lr=_host_lr(lr, lr_tensor), momentum=momentum,
                                                dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                                                maximize=maximize)
                _numpy_scatter(new_p, pick(params))
                if new_buf is not None:
                    _numpy_scatter(new_buf, pick(momentum_buffers))
        else:
            _sgd_triton(sub(params), sub(grads), sub(momentum_buffers), sub(first_step), lr, momentum, dampening,
                        weight_decay, nesterov, maximize, grad_scale, found_inf, lr_tensor)


@sgd_step.register_fake
def _(params, grads, momentum_buffers, first_step, lr, momentum, dampening, weight_decay, nesterov, maximize,
      grad_scale=None, found_inf=None, lr_tensor=None):
    return None


# ---------------------------------------------------------------------------------------------
# AdamW
# ---------------------------------------------------------------------------------------------
def _adamw_triton(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps,
                  weight_decay, amsgrad, maximize, grad_scale, found_inf, lr_tensor):
    device = params[0].device
    block, chunk, num_warps = _launch_config(device)
    staging = _Staging()
    rows = []
    for i, p in enumerate(params):
        wp = staging.param(p)
        states = [staging.like(s[i], wp, mutated=True) for s in (exp_avgs, exp_avg_sqs)]
        states.append(staging.like(max_exp_avg_sqs[i], wp, mutated=True) if amsgrad else 0)
        rows.append(_row(wp, staging.like(grads[i], wp, mutated=grad_scale is not None), *states, steps[i],
                         p.numel()))
    tab = table(rows, chunk, device)
    scalars = torch.empty((len(params), SCALARS.value), dtype=torch.float32, device=device)
    scaler = _scaler_launch_args(grad_scale, found_inf, device, scalars)
    with _on(device):
        adamw_prologue_kernel[(cdiv(len(params), PROLOGUE_BLOCK),)](
            tab.meta, scalars, scaler["found_inf_ptr"], num_tensors=len(params), beta1=float(beta1),
            beta2=float(beta2), weight_decay=float(weight_decay), HAS_FOUND_INF=scaler["HAS_FOUND_INF"], ROW=ROW,
            BLOCK_T=PROLOGUE_BLOCK, num_warps=4, num_stages=1, **_lr_launch_args(float(lr), lr_tensor, device, scalars))
        if tab.num_chunks:
            adamw_kernel[(tab.num_chunks,)](
                tab.meta, tab.chunk_base, scalars, params[0], one_minus_beta1=1.0 - beta1, beta2=beta2,
                one_minus_beta2=1.0 - beta2, eps=eps, AMSGRAD=bool(amsgrad),
                MAXIMIZE=bool(maximize), WEIGHT_DECAY=weight_decay != 0, ALIGNED=tab.aligned, ROW=ROW, CHUNK=chunk,
                BLOCK=block, num_warps=num_warps, num_stages=1, **scaler)
        staging.finish()


@custom_op("tkernels::adamw_step",
           mutates_args=("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"))
def adamw_step(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
               max_exp_avg_sqs: List[Tensor], steps: List[Tensor], lr: float, beta1: float, beta2: float,
               eps: float, weight_decay: float, amsgrad: bool, maximize: bool, grad_scale: Optional[Tensor] = None,
               found_inf: Optional[Tensor] = None, lr_tensor: Optional[Tensor] = None) -> None:
    """One AdamW step over a list of parameters, in place; ``steps[i]`` (a 0-d tensor) counts the
    steps param i has taken and is incremented. ``max_exp_avg_sqs`` is empty unless amsgrad.
    ``grad_scale``/``found_inf`` are torch.amp.GradScaler's, as in :func:`sgd_step`; a skipped step
    leaves the step counters alone, as torch's fused AdamW does. ``lr_tensor``, if given, is the lr."""
    states = {"exp_avg": exp_avgs, "exp_avg_sq": exp_avg_sqs}
    if amsgrad:
        states["max_exp_avg_sq"] = max_exp_avg_sqs
    partitions = validate("adamw", params, grads, states, steps)
    check_scalar_tensors("adamw", grad_scale=grad_scale, found_inf=found_inf, lr=lr_tensor)
    for idx in partitions.values():
        sub = lambda seq: [seq[i] for i in idx] if len(seq) else []  # noqa: E731
        if _backend.resolve("adamw", params[idx[0]]) == "numpy":
            if _numpy_skipped(found_inf):
                continue
            step_counts = [float(to_numpy(s)) for s in steps]
            for batch in _numpy_batches(idx, lambda i: step_counts[i]):  # the bias corrections depend on the step
                pick = lambda seq: [seq[i] for i in batch]  # noqa: E731
                p, m, v, v_max, t = ref.adamw_update(
                    _numpy_gather(pick(params)), _numpy_gradients(pick(grads), grad_scale),
                    _numpy_gather(pick(exp_avgs)), _numpy_gather(pick(exp_avg_sqs)),
                    _numpy_gather(pick(max_exp_avg_sqs)) if amsgrad else None, step_counts[batch[0]],
                    lr=_host_lr(lr, lr_tensor), beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                    amsgrad=amsgrad, maximize=maximize)
                for tensors, value in ((params, p), (exp_avgs, m), (exp_avg_sqs, v)):
                    _numpy_scatter(value, pick(tensors))
                if amsgrad:
                    _numpy_scatter(v_max, pick(max_exp_avg_sqs))
                for i in batch:
                    steps[i].fill_(t)
        else:
            _adamw_triton(sub(params), sub(grads), sub(exp_avgs), sub(exp_avg_sqs), sub(max_exp_avg_sqs),
                          sub(steps), lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale, found_inf,
                          lr_tensor)


@adamw_step.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, amsgrad,
      maximize, grad_scale=None, found_inf=None, lr_tensor=None):
    return None
