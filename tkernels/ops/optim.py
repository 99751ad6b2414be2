"""Fused multi-tensor SGD and AdamW steps: one launch updates every parameter of a group.

Multi-tensor design. The launcher writes one int64 table per (device, dtype) partition:
``[header | one row per tensor | one (tensor, chunk) pair per chunk]``. A row holds the raw
addresses of the parameter, its gradient and its state tensors, plus its element count. Every
tensor is cut into CHUNK-element chunks and the grid has one program per chunk, so a program
reads its (tensor, chunk) pair, then its row, turns the addresses into typed pointers and streams
its chunk in BLOCK-element steps: whole blocks unmasked (with 128-bit accesses when the host has
checked that every address is 16-byte aligned), then one masked tail. Big and small tensors share
one launch with no padding and no concatenation; the table costs 16 bytes per chunk plus 64 per
tensor and one (pinned, asynchronous) host-to-device copy. Addresses in a table work the same
under Triton's interpreter, where pointers are host addresses of CPU tensors (tested there).

AdamW keeps ``step`` as a float32 0-d tensor per parameter, as torch does. A one-program-per-128-
tensors prologue increments the steps on the device and computes, in float64, each tensor's step
size lr / (1 - beta1^t) and sqrt(1 - beta2^t) (t by binary powering, to match Python's
``beta ** t``); the update kernel reads them. Two launches per group, whatever its size.

No autotuning: the mutated buffers are reached through the table, so ``restore_value`` could not
protect them from the benchmark runs; one config per architecture is data below.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
import triton
import triton.language as tl

from .. import _backend
from ..reference import optim as ref
from ._dispatch import custom_op
from ._common import (KernelSpec, cdiv, check_triton_dtype, config, current_arch, from_numpy, register_kernel,
                      to_numpy)

# Table layout (int64 words; the kernels index rows with these literal field numbers). The header
# holds float64 hyperparameters as raw bits.
HEADER = 4
ROW = 8  # param, grad, state a, state b, state c, aux (AdamW: step address; SGD: first-step flag), numel, -
PARAM, GRAD, STATE_A, STATE_B, STATE_C, AUX, NUMEL = range(7)
PROLOGUE_BLOCK = 128

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
def _locate(meta_ptr, chunk_base, HEADER: tl.constexpr, ROW: tl.constexpr, CHUNK: tl.constexpr,
            BLOCK: tl.constexpr):
    """This program's tensor index and table row, and its chunk [start, stop) with the end `full`
    of its whole BLOCKs (the rest, if any, is one masked tail block)."""
    pair = meta_ptr + chunk_base + 2 * tl.program_id(0).to(tl.int64)
    tensor = tl.load(pair)
    row = meta_ptr + HEADER + tensor * ROW
    start = tl.load(pair + 1) * CHUNK
    stop = tl.minimum(start + CHUNK, tl.load(row + 6))
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
def _sgd_block(param, grad, buf, offs, stop, first, lr, momentum, one_minus_dampening, weight_decay,
               MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
               WEIGHT_DECAY: tl.constexpr, MASKED: tl.constexpr):
    p = _load(param, offs, stop, MASKED)
    d = _load(grad, offs, stop, MASKED)
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
def sgd_kernel(meta_ptr, chunk_base, like_ptr, lr, momentum, one_minus_dampening, weight_decay,
               MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
               WEIGHT_DECAY: tl.constexpr, ALIGNED: tl.constexpr, HEADER: tl.constexpr, ROW: tl.constexpr,
               CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """SGD on one CHUNK of one tensor: d = ±g + wd*p; b = d (first step) or momentum*b + (1-dampening)*d;
    p -= lr * (d + momentum*b if nesterov else b).

    Grid: one program per chunk of every tensor (see the module docstring); unmasked BLOCKs, then
    one masked tail. Loads p, g (and b); stores p (and b): 3 element accesses, 5 with momentum, in
    the param dtype with fp32 math. Memory-bound.
    """
    tensor, row, start, full, stop = _locate(meta_ptr, chunk_base, HEADER, ROW, CHUNK, BLOCK)
    param = _pointer(row, 0, like_ptr, ALIGNED)
    grad = _pointer(row, 1, like_ptr, ALIGNED)
    buf = _pointer(row, 2, like_ptr, ALIGNED)
    first = tl.load(row + 5)  # 1 on the tensor's first step with momentum
    for off in range(start, full, BLOCK):
        _sgd_block(param, grad, buf, off + tl.arange(0, BLOCK), stop, first, lr, momentum, one_minus_dampening,
                   weight_decay, MOMENTUM, NESTEROV, MAXIMIZE, WEIGHT_DECAY, MASKED=False)
    if full < stop:
        _sgd_block(param, grad, buf, full + tl.arange(0, BLOCK), stop, first, lr, momentum, one_minus_dampening,
                   weight_decay, MOMENTUM, NESTEROV, MAXIMIZE, WEIGHT_DECAY, MASKED=True)


@triton.jit
def adamw_prologue_kernel(meta_ptr, scalars_ptr, num_tensors, HEADER: tl.constexpr, ROW: tl.constexpr,
                          BLOCK_T: tl.constexpr):
    """Per tensor: step += 1; scalars = (lr / (1 - beta1^step), sqrt(1 - beta2^step)) in float64.

    Grid: cdiv(T, BLOCK_T) programs of BLOCK_T tensors. Reads and writes one float32 step per
    tensor and writes two float32 scalars; latency-bound (one float64 powering round per bit of step).
    """
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = t < num_tensors
    lr = tl.load(meta_ptr + 0).to(tl.float64, bitcast=True)
    beta1 = tl.load(meta_ptr + 1).to(tl.float64, bitcast=True) + tl.zeros([BLOCK_T], dtype=tl.float64)
    beta2 = tl.load(meta_ptr + 2).to(tl.float64, bitcast=True) + tl.zeros([BLOCK_T], dtype=tl.float64)
    step_ptr = tl.load(meta_ptr + HEADER + t.to(tl.int64) * ROW + 5, mask=mask, other=0).to(
        tl.pointer_type(tl.float32))
    step = tl.load(step_ptr, mask=mask, other=0.0) + 1.0
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
    tl.store(scalars_ptr + 2 * t, (lr / (1.0 - pow1)).to(tl.float32), mask=mask)
    tl.store(scalars_ptr + 2 * t + 1, tl.sqrt(1.0 - pow2).to(tl.float32), mask=mask)


@triton.jit
def _adamw_block(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, offs, stop, step_size, bc2_sqrt,
                 one_minus_beta1, beta2, one_minus_beta2, eps, decay, AMSGRAD: tl.constexpr,
                 MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MASKED: tl.constexpr):
    p = _load(param, offs, stop, MASKED)
    g = _load(grad, offs, stop, MASKED)
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
def adamw_kernel(meta_ptr, chunk_base, scalars_ptr, like_ptr, one_minus_beta1, beta2, one_minus_beta2, eps,
                 decay, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                 ALIGNED: tl.constexpr, HEADER: tl.constexpr, ROW: tl.constexpr, CHUNK: tl.constexpr,
                 BLOCK: tl.constexpr):
    """AdamW on one CHUNK of one tensor, torch's formulation:
    p *= 1 - lr*wd; m = lerp(m, g, 1-beta1); v = beta2*v + (1-beta2)*g^2; v_max = max(v_max, v);
    p -= step_size * m / (sqrt(v or v_max) / bc2_sqrt + eps), with the prologue's per-tensor scalars.

    Grid: one program per chunk; unmasked BLOCKs, then one masked tail. Loads p, g, m, v (+ v_max);
    stores p, m, v (+ v_max): 7 (9) element accesses in the param dtype with fp32 math. Memory-bound.
    """
    tensor, row, start, full, stop = _locate(meta_ptr, chunk_base, HEADER, ROW, CHUNK, BLOCK)
    param = _pointer(row, 0, like_ptr, ALIGNED)
    grad = _pointer(row, 1, like_ptr, ALIGNED)
    exp_avg = _pointer(row, 2, like_ptr, ALIGNED)
    exp_avg_sq = _pointer(row, 3, like_ptr, ALIGNED)
    max_exp_avg_sq = _pointer(row, 4, like_ptr, ALIGNED)
    step_size = tl.load(scalars_ptr + 2 * tensor)
    bc2_sqrt = tl.load(scalars_ptr + 2 * tensor + 1)
    for off in range(start, full, BLOCK):
        _adamw_block(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, off + tl.arange(0, BLOCK), stop, step_size,
                     bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps, decay, AMSGRAD, MAXIMIZE, WEIGHT_DECAY,
                     MASKED=False)
    if full < stop:
        _adamw_block(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, full + tl.arange(0, BLOCK), stop,
                     step_size, bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps, decay, AMSGRAD, MAXIMIZE,
                     WEIGHT_DECAY, MASKED=True)


_MAIN_SIG = {"meta_ptr": "*i64", "chunk_base": "i32", "like_ptr": "*{dtype}"}
_TABLE = dict(HEADER=HEADER, ROW=ROW)
_ALIGNED = dict(HEADER=HEADER, ROW=ROW, ALIGNED=True)
register_kernel(KernelSpec(
    name="sgd_step",
    kernel=sgd_kernel,
    signature={**_MAIN_SIG, "lr": "fp32", "momentum": "fp32", "one_minus_dampening": "fp32", "weight_decay": "fp32"},
    configs_by_arch={arch: [cfg] for arch, cfg in CONFIGS.items()},
    variants=[dict(MOMENTUM=True, NESTEROV=True, MAXIMIZE=True, WEIGHT_DECAY=True, **_ALIGNED),
              dict(MOMENTUM=False, NESTEROV=False, MAXIMIZE=False, WEIGHT_DECAY=False, **_ALIGNED),
              dict(MOMENTUM=True, NESTEROV=False, MAXIMIZE=False, WEIGHT_DECAY=True, **_TABLE, ALIGNED=False)],
))
register_kernel(KernelSpec(
    name="adamw_step",
    kernel=adamw_kernel,
    signature={**_MAIN_SIG, "scalars_ptr": "*fp32", "one_minus_beta1": "fp32", "beta2": "fp32",
               "one_minus_beta2": "fp32", "eps": "fp32", "decay": "fp32"},
    configs_by_arch={arch: [cfg] for arch, cfg in CONFIGS.items()},
    variants=[dict(AMSGRAD=True, MAXIMIZE=True, WEIGHT_DECAY=True, **_ALIGNED),
              dict(AMSGRAD=False, MAXIMIZE=False, WEIGHT_DECAY=True, **_ALIGNED),
              dict(AMSGRAD=False, MAXIMIZE=False, WEIGHT_DECAY=True, **_TABLE, ALIGNED=False)],
))
register_kernel(KernelSpec(
    name="adamw_prologue",
    kernel=adamw_prologue_kernel,
    signature={"meta_ptr": "*i64", "scalars_ptr": "*fp32", "num_tensors": "i32"},
    configs_by_arch={arch: [config(BLOCK_T=PROLOGUE_BLOCK, num_warps=4, num_stages=1)] for arch in CONFIGS},
    variants=[dict(**_TABLE)],
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


def _table(rows: List[List[int]], numels: List[int], chunk: int, header: Sequence[float],
           device: torch.device) -> Tuple[Tensor, int, int]:
    """(device table, index of its first chunk pair, number of chunks). Built with NumPy on the host:
    a handful of tiny torch CPU ops would cost more than the whole table."""
    counts = np.array([cdiv(n, chunk) for n in numels], dtype=np.int64)
    num_chunks = int(counts.sum())
    chunk_base = HEADER + ROW * len(rows)
    meta = np.zeros(chunk_base + 2 * num_chunks, dtype=np.int64)
    meta[:len(header)] = np.array(header, dtype=np.float64).view(np.int64)
    meta[HEADER:chunk_base] = np.array(rows, dtype=np.int64).reshape(-1)
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
    return table, chunk_base, num_chunks


def _aligned(rows: List[List[int]]) -> bool:
    """Whether every tensor address in the rows (param, grad, states) is a multiple of 16 bytes."""
    return all(address % 16 == 0 for row in rows for address in row[PARAM:AUX])


def _row(*tensors_or_ints) -> List[int]:
    row = [t.data_ptr() if isinstance(t, Tensor) else int(t) for t in tensors_or_ints]
    return row + [0] * (ROW - len(row))


# ---------------------------------------------------------------------------------------------
# SGD
# ---------------------------------------------------------------------------------------------
def _sgd_triton(params, grads, bufs, first, lr, momentum, dampening, weight_decay, nesterov, maximize):
    device = params[0].device
    block, chunk, num_warps = _launch_config(device)
    staging = _Staging()
    rows, numels = [], []
    for i, p in enumerate(params):
        wp = staging.param(p)
        wg = staging.like(grads[i], wp, mutated=False)
        wb = staging.like(bufs[i], wp, mutated=True) if momentum != 0 else 0
        rows.append(_row(wp, wg, wb, 0, 0, int(momentum != 0 and first[i]), p.numel()))
        numels.append(p.numel())
    meta, chunk_base, num_chunks = _table(rows, numels, chunk, (), device)
    with _on(device):
        if num_chunks:
            sgd_kernel[(num_chunks,)](
                meta, chunk_base, params[0], float(lr), float(momentum), 1.0 - float(dampening),
                float(weight_decay), MOMENTUM=momentum != 0, NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
                WEIGHT_DECAY=weight_decay != 0, ALIGNED=_aligned(rows), HEADER=HEADER, ROW=ROW, CHUNK=chunk,
                BLOCK=block, num_warps=num_warps, num_stages=1)
        staging.finish()


@custom_op("tkernels::sgd_step", mutates_args=("params", "momentum_buffers"))
def sgd_step(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], first_step: List[bool],
             lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
             maximize: bool) -> None:
    """One SGD step over a list of parameters, in place. With momentum, ``momentum_buffers[i]`` is the
    buffer of param i; where ``first_step[i]`` it is uninitialised and gets the first direction."""
    partitions = validate("sgd", params, grads, {"momentum_buffer": momentum_buffers} if momentum != 0 else {})
    if momentum != 0 and len(first_step) != len(params):
        raise RuntimeError(f"sgd: momentum={momentum} needs a first_step flag per param, but got {len(params)} "
                           f"params and {len(first_step)} flags")
    for idx in partitions.values():
        sub = lambda seq: [seq[i] for i in idx] if len(seq) else []  # noqa: E731
        if _backend.resolve("sgd", params[idx[0]]) == "numpy":
            for i in idx:
                buf = None if momentum == 0 or first_step[i] else to_numpy(momentum_buffers[i])
                new_p, new_buf = ref.sgd_update(to_numpy(params[i]), to_numpy(grads[i]), buf, lr=lr,
                                                momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                                nesterov=nesterov, maximize=maximize)
                params[i].copy_(from_numpy(new_p, params[i]))
                if new_buf is not None:
                    momentum_buffers[i].copy_(from_numpy(new_buf, momentum_buffers[i]))
        else:
            _sgd_triton(sub(params), sub(grads), sub(momentum_buffers), sub(first_step), lr, momentum, dampening,
                        weight_decay, nesterov, maximize)


@sgd_step.register_fake
def _(params, grads, momentum_buffers, first_step, lr, momentum, dampening, weight_decay, nesterov, maximize):
    return None


# ---------------------------------------------------------------------------------------------
# AdamW
# ---------------------------------------------------------------------------------------------
def _adamw_triton(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps,
                  weight_decay, amsgrad, maximize):
    device = params[0].device
    block, chunk, num_warps = _launch_config(device)
    staging = _Staging()
    rows, numels = [], []
    for i, p in enumerate(params):
        wp = staging.param(p)
        states = [staging.like(s[i], wp, mutated=True) for s in (exp_avgs, exp_avg_sqs)]
        states.append(staging.like(max_exp_avg_sqs[i], wp, mutated=True) if amsgrad else 0)
        rows.append(_row(wp, staging.like(grads[i], wp, mutated=False), *states, steps[i], p.numel()))
        numels.append(p.numel())
    meta, chunk_base, num_chunks = _table(rows, numels, chunk, (lr, beta1, beta2), device)
    scalars = torch.empty((len(params), 2), dtype=torch.float32, device=device)
    with _on(device):
        adamw_prologue_kernel[(cdiv(len(params), PROLOGUE_BLOCK),)](
            meta, scalars, len(params), HEADER=HEADER, ROW=ROW, BLOCK_T=PROLOGUE_BLOCK, num_warps=4, num_stages=1)
        if num_chunks:
            adamw_kernel[(num_chunks,)](
                meta, chunk_base, scalars, params[0], 1.0 - beta1, beta2, 1.0 - beta2, eps, 1.0 - lr * weight_decay,
                AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize), WEIGHT_DECAY=weight_decay != 0,
                ALIGNED=_aligned(rows), HEADER=HEADER, ROW=ROW, CHUNK=chunk, BLOCK=block, num_warps=num_warps,
                num_stages=1)
        staging.finish()


@custom_op("tkernels::adamw_step",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"))
def adamw_step(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
               max_exp_avg_sqs: List[Tensor], steps: List[Tensor], lr: float, beta1: float, beta2: float,
               eps: float, weight_decay: float, amsgrad: bool, maximize: bool) -> None:
    """One AdamW step over a list of parameters, in place; ``steps[i]`` (a 0-d tensor) counts the
    steps param i has taken and is incremented. ``max_exp_avg_sqs`` is empty unless amsgrad."""
    states = {"exp_avg": exp_avgs, "exp_avg_sq": exp_avg_sqs}
    if amsgrad:
        states["max_exp_avg_sq"] = max_exp_avg_sqs
    partitions = validate("adamw", params, grads, states, steps)
    for idx in partitions.values():
        sub = lambda seq: [seq[i] for i in idx] if len(seq) else []  # noqa: E731
        if _backend.resolve("adamw", params[idx[0]]) == "numpy":
            for i in idx:
                p, m, v, v_max, t = ref.adamw_update(
                    to_numpy(params[i]), to_numpy(grads[i]), to_numpy(exp_avgs[i]), to_numpy(exp_avg_sqs[i]),
                    to_numpy(max_exp_avg_sqs[i]) if amsgrad else None, float(to_numpy(steps[i])), lr=lr, beta1=beta1,
                    beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
                for tensor, value in ((params[i], p), (exp_avgs[i], m), (exp_avg_sqs[i], v)):
                    tensor.copy_(from_numpy(value, tensor))
                if amsgrad:
                    max_exp_avg_sqs[i].copy_(from_numpy(v_max, max_exp_avg_sqs[i]))
                steps[i].fill_(t)
        else:
            _adamw_triton(sub(params), sub(grads), sub(exp_avgs), sub(exp_avg_sqs), sub(max_exp_avg_sqs),
                          sub(steps), lr, beta1, beta2, eps, weight_decay, amsgrad, maximize)


@adamw_step.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, amsgrad,
      maximize):
    return None
