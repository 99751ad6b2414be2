"""Softmax and log-softmax over any dim, forward and backward, as tkernels custom ops.

Rows. The reduced dim (length C) is addressed by its stride; every other dim is a "batch" dim.
Batch dims are collapsed (adjacent dims that are contiguous with each other in every tensor
merge) to at most three: (outer0, outer1, inner). A program owns one (outer0, outer1) pair and
BLOCK_R consecutive `inner` indices, and holds a [BLOCK_R, BLOCK_C] tile. When the classes are
contiguous (softmax over the last dim) BLOCK_R is small and BLOCK_C wide; when they are strided
(softmax over dim 1 of NCHW) `inner` is the contiguous dim, so BLOCK_R is wide and the loads
still coalesce. No input is copied unless its batch dims cannot be collapsed to three.

Long rows. If C fits one BLOCK_C the row is read once and kept in registers. Otherwise the
first pass computes the running max m and the rescaled sum s online
(s <- s * exp(m_old - m_new) + sum exp(x - m_new)) and the second pass writes the output.

The row helpers here (`plan_rows`, `row_coordinates`, `row_offsets`) are shared with the
fused cross-entropy in :mod:`tkernels.ops.losses`.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
import triton
import triton.language as tl

from .. import _backend
from ..reference import softmax as ref
from ._autocast import output_dtype
from ._dispatch import custom_op, run_function
from ._common import (TRITON_DTYPES, KernelSpec, Tuned, cdiv, check_triton_dtype, config, from_numpy,
                      register_kernel, to_numpy)
from .elementwise import _collapse

# One row per program takes up to MAX_BLOCK_C classes at a time (fp32: 16 values a thread at
# 8 warps); rows longer than that are processed in chunks. A tile of several rows holds at most
# MAX_TILE elements: each needs its own 64-bit address, and 64x64 tiles spilled on sm_80/sm_90.
MAX_TILE = 1024
MAX_BLOCK_C = 4096
# In the strided-class layout, how many contiguous `inner` rows one program reads side by side.
MAX_BLOCK_R = 32


# ---------------------------------------------------------------------------------------------
# Row layout shared by softmax and cross-entropy
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowPlan:
    """How a row-reduction kernel is launched: collapsed batch dims, tile and grid."""

    C: int
    n_outer1: int
    n_inner: int
    n_outer: int
    strides: List[Tuple[int, int, int]]  # per tensor: (outer0, outer1, inner) strides
    BLOCK_R: int
    BLOCK_C: int

    # (cached: a plan is shared by every call of its layout, and these are read on each launch)
    @functools.cached_property
    def n_tiles(self) -> int:
        return cdiv(self.n_inner, self.BLOCK_R)

    @functools.cached_property
    def grid(self) -> Tuple[int]:
        return (self.n_outer * self.n_tiles,)

    @property
    def single(self) -> bool:
        return self.C <= self.BLOCK_C

    @property
    def n_rows(self) -> int:
        return self.n_outer * self.n_inner

    def launch_args(self) -> Tuple[int, int, int, int]:
        return self._launch_args

    @functools.cached_property
    def _launch_args(self) -> Tuple[int, int, int, int]:
        return self.C, self.n_inner, self.n_tiles, self.n_outer1

    def meta(self) -> dict:
        return dict(SINGLE=self.single, BLOCK_R=self.BLOCK_R, BLOCK_C=self.BLOCK_C)


def batch_strides(t: Tensor, dim: int) -> List[int]:
    return [s for i, s in enumerate(t.stride()) if i != dim]


def plan_rows(batch_shape: Sequence[int], C: int, class_stride: int,
              *strides: Sequence[int]) -> Optional[RowPlan]:
    """Plan for rows of length C over `batch_shape`; `strides` are each tensor's batch strides.
    None when the batch dims do not collapse to three (the caller then makes inputs contiguous).
    The plan is shared between calls with the same layout: never change it."""
    return _plan_rows(tuple(batch_shape), C, class_stride, *(tuple(s) for s in strides))


@functools.lru_cache(maxsize=1024)  # a training loop asks for the same few layouts every step
def _plan_rows(batch_shape: Tuple[int, ...], C: int, class_stride: int,
               *strides: Tuple[int, ...]) -> Optional[RowPlan]:
    try:
        sizes, collapsed = _collapse(tuple(batch_shape), *strides)
    except NotImplementedError:
        return None
    if sizes[0] != 1:
        return None
    n_outer1, n_inner = sizes[2], sizes[3]
    c_pow2 = triton.next_power_of_2(max(C, 1))
    inner_pow2 = triton.next_power_of_2(max(n_inner, 1))
    if class_stride == 1:
        block_c = min(c_pow2, MAX_BLOCK_C)
        block_r = min(inner_pow2, max(1, MAX_TILE // block_c), MAX_BLOCK_R)
    elif n_inner == 1:
        # strided classes need a 64-bit address per element: 4096-wide rows spilled on sm_80
        block_c = min(c_pow2, MAX_TILE)
        block_r = 1
    else:
        block_r = min(inner_pow2, MAX_BLOCK_R)
        block_c = min(c_pow2, max(1, MAX_TILE // block_r), MAX_BLOCK_C)
    return RowPlan(C=C, n_outer1=n_outer1, n_inner=n_inner, n_outer=sizes[1] * sizes[2],
                   strides=[tuple(s[1:]) for s in collapsed], BLOCK_R=block_r, BLOCK_C=block_c)


@triton.jit
def row_coordinates(n_inner, n_tiles, n_outer1, BLOCK_R: tl.constexpr):
    """This program's rows: (outer0, outer1, inner[BLOCK_R], row mask, flat row id), all int64."""
    pid = tl.program_id(0)
    outer = pid // n_tiles
    tile = pid - outer * n_tiles
    o0 = outer // n_outer1
    o1 = outer - o0 * n_outer1
    inner = (tile * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_id = outer.to(tl.int64) * n_inner + inner
    return o0.to(tl.int64), o1.to(tl.int64), inner, inner < n_inner, row_id


@triton.jit
def row_offsets(o0, o1, inner, s0, s1, si):
    return o0 * s0 + o1 * s1 + inner * si


def _num_warps_configs():
    return {arch: [config(num_warps=w, num_stages=1) for w in (4, 8)] for arch in ("sm_80", "sm_90")}


def _spec_configs(*blocks: Tuple[int, int, int]):
    """inspect configs: (BLOCK_R, BLOCK_C, num_warps) covering the row-major and strided tiles."""
    return {arch: [config(num_warps=w, num_stages=1, BLOCK_R=r, BLOCK_C=c) for r, c, w in blocks]
            for arch in ("sm_80", "sm_90")}


# the tiles plan_rows makes: unit class stride (rows up to MAX_BLOCK_C wide), strided classes (<= MAX_TILE)
SPEC_BLOCKS_UNIT = ((1, MAX_BLOCK_C, 8), (8, MAX_TILE // 8, 4))
SPEC_BLOCKS_STRIDED = ((1, MAX_TILE, 4), (MAX_BLOCK_R, MAX_TILE // MAX_BLOCK_R, 4), (8, MAX_TILE // 8, 4))
SPEC_BLOCKS = ((1, MAX_BLOCK_C, 8), (MAX_BLOCK_R, MAX_TILE // MAX_BLOCK_R, 4), (8, MAX_TILE // 8, 4))  # losses


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def softmax_forward_kernel(x_ptr, y_ptr, C, n_inner, n_tiles, n_outer1,
                           sx0, sx1, sxi, sxc, sy0, sy1, syi, syc,
                           LOG: tl.constexpr, SINGLE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = softmax(x) (or log_softmax) along the class axis, for BLOCK_R rows per program.

    m = max_c x_c, s = sum_c exp(x_c - m); y = exp(x - m) / s, or x - m - log s. fp32 math.
    Tile [BLOCK_R, BLOCK_C]; grid = (outer0 * outer1 * cdiv(inner, BLOCK_R),).
    Bytes: reads x once (SINGLE) or twice (chunked), writes y once; memory-bound.
    """
    o0, o1, inner, row_mask, _ = row_coordinates(n_inner, n_tiles, n_outer1, BLOCK_R)
    x_row = x_ptr + row_offsets(o0, o1, inner, sx0, sx1, sxi)[:, None]
    y_row = y_ptr + row_offsets(o0, o1, inner, sy0, sy1, syi)[:, None]
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    if SINGLE:
        mask = row_mask[:, None] & (cols < C)[None, :]
        x = tl.load(x_row + cols[None, :] * sxc, mask=mask, other=-float("inf")).to(tl.float32)
        m = tl.max(x, axis=1)
        m = tl.where(m == -float("inf"), 0.0, m)  # an all -inf row: keep exp() finite, s = 0 -> NaN like torch
        e = tl.exp(x - m[:, None])
        s = tl.where(row_mask, tl.sum(e, axis=1), 1.0)  # rows past the end stay finite (never stored)
        if LOG:
            y = x - (m + tl.log(s))[:, None]
        else:
            y = e / s[:, None]
        tl.store(y_row + cols[None, :] * syc, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        m = tl.full((BLOCK_R,), -float("inf"), tl.float32)
        s = tl.zeros((BLOCK_R,), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            mask = row_mask[:, None] & (c < C)[None, :]
            x = tl.load(x_row + c[None, :] * sxc, mask=mask, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
            m = m_new
        m = tl.where(m == -float("inf"), 0.0, m)
        s = tl.where(row_mask, s, 1.0)
        lse = m + tl.log(s)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            mask = row_mask[:, None] & (c < C)[None, :]
            x = tl.load(x_row + c[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
            if LOG:
                y = x - lse[:, None]
            else:
                y = tl.exp(x - m[:, None]) / s[:, None]
            tl.store(y_row + c[None, :] * syc, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def softmax_backward_kernel(g_ptr, y_ptr, dx_ptr, C, n_inner, n_tiles, n_outer1,
                            sg0, sg1, sgi, sgc, sy0, sy1, syi, syc, sd0, sd1, sdi, sdc,
                            LOG: tl.constexpr, SINGLE: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_C: tl.constexpr):
    """dx from the saved output y: softmax y * (g - sum_c g_c y_c); log-softmax g - exp(y) * sum_c g_c.

    Tile [BLOCK_R, BLOCK_C]; grid as the forward. Bytes: reads g and y once (SINGLE) or twice
    (chunked: a first pass for the row sum), writes dx once; memory-bound.
    """
    o0, o1, inner, row_mask, _ = row_coordinates(n_inner, n_tiles, n_outer1, BLOCK_R)
    g_row = g_ptr + row_offsets(o0, o1, inner, sg0, sg1, sgi)[:, None]
    y_row = y_ptr + row_offsets(o0, o1, inner, sy0, sy1, syi)[:, None]
    d_row = dx_ptr + row_offsets(o0, o1, inner, sd0, sd1, sdi)[:, None]
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    if SINGLE:
        mask = row_mask[:, None] & (cols < C)[None, :]
        g = tl.load(g_row + cols[None, :] * sgc, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_row + cols[None, :] * syc, mask=mask, other=0.0).to(tl.float32)
        if LOG:
            dx = g - tl.exp(y) * tl.sum(g, axis=1)[:, None]
        else:
            dx = y * (g - tl.sum(g * y, axis=1)[:, None])
        tl.store(d_row + cols[None, :] * sdc, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            mask = row_mask[:, None] & (c < C)[None, :]
            g = tl.load(g_row + c[None, :] * sgc, mask=mask, other=0.0).to(tl.float32)
            if LOG:
                acc += g
            else:
                acc += g * tl.load(y_row + c[None, :] * syc, mask=mask, other=0.0).to(tl.float32)
        total = tl.sum(acc, axis=1)[:, None]
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            mask = row_mask[:, None] & (c < C)[None, :]
            g = tl.load(g_row + c[None, :] * sgc, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_row + c[None, :] * syc, mask=mask, other=0.0).to(tl.float32)
            if LOG:
                dx = g - tl.exp(y) * total
            else:
                dx = y * (g - total)
            tl.store(d_row + c[None, :] * sdc, dx.to(dx_ptr.dtype.element_ty), mask=mask)


_FORWARD = Tuned(softmax_forward_kernel, _num_warps_configs(), config(num_warps=4, num_stages=1),
                 key=["C", "n_inner", "LOG", "BLOCK_R", "BLOCK_C"])
_BACKWARD = Tuned(softmax_backward_kernel, _num_warps_configs(), config(num_warps=4, num_stages=1),
                  key=["C", "n_inner", "LOG", "BLOCK_R", "BLOCK_C"])

_ROW_SIG = {"C": "i32", "n_inner": "i32", "n_tiles": "i32", "n_outer1": "i32"}


def _stride_sig(*prefixes: str, with_class: bool = True) -> dict:
    names = ("0", "1", "i", "c") if with_class else ("0", "1", "i")
    return {f"{p}{n}": "i64" for p in prefixes for n in names}


# call sites: softmax over the last dim (unit class stride) and log-softmax over dim 1 of NCHW
# (strided classes, unit inner stride), each compiled with the tiles plan_rows gives it
for _suffix, _blocks, _unit_class in (("", SPEC_BLOCKS_UNIT, True), ("_strided", SPEC_BLOCKS_STRIDED, False)):
    register_kernel(KernelSpec(
        name="softmax_forward" + _suffix, kernel=softmax_forward_kernel,
        signature={"x_ptr": "*{dtype}", "y_ptr": "*{dtype}", **_ROW_SIG, **_stride_sig("sx", "sy")},
        configs_by_arch=_spec_configs(*_blocks),
        variants=[dict(LOG=False, SINGLE=True, sxc=1, syc=1)] if _unit_class else
                 [dict(LOG=True, SINGLE=False, sxi=1, syi=1)],
        example_args={"C": 32000, "n_inner": 4096},
    ))
    register_kernel(KernelSpec(
        name="softmax_backward" + _suffix, kernel=softmax_backward_kernel,
        signature={"g_ptr": "*{dtype}", "y_ptr": "*{dtype}", "dx_ptr": "*{dtype}", **_ROW_SIG,
                   **_stride_sig("sg", "sy", "sd")},
        configs_by_arch=_spec_configs(*_blocks),
        variants=[dict(LOG=False, SINGLE=False, sgc=1, syc=1, sdc=1)] if _unit_class else
                 [dict(LOG=True, SINGLE=True, sgi=1, syi=1, sdi=1)],
        example_args={"C": 32000, "n_inner": 4096},
    ))


# ---------------------------------------------------------------------------------------------
# Launchers and custom ops
# ---------------------------------------------------------------------------------------------
def _check_triton_out_dtype(op: str, dtype: torch.dtype) -> None:
    if dtype not in TRITON_DTYPES:
        raise RuntimeError(f"{op}: the triton backend supports float16, bfloat16 and float32, not {dtype}; "
                           "float64 runs on the numpy backend")


def _from_numpy(a, like: Tensor, dtype: torch.dtype) -> Tensor:
    """The reference's result in a tensor laid out like `like` (as the fake impl promises)."""
    out = torch.empty_like(like, dtype=dtype)
    # from_numpy goes through np.ascontiguousarray, which turns a 0-d result into shape (1,)
    out.copy_(from_numpy(a, like, dtype=dtype).reshape(out.shape))
    return out


def _launch(tuned: Tuned, tensors: List[Tensor], dim: int, log: bool) -> bool:
    """Launch over rows along `dim`; False if the batch dims do not collapse (caller restrides)."""
    shape = tensors[0].shape
    if tensors[0].dim() == 0:  # a scalar is one row of one class
        tensors, shape, dim = [t.view(1) for t in tensors], (1,), 0
    batch_shape = [n for i, n in enumerate(shape) if i != dim]
    plan = plan_rows(batch_shape, shape[dim], tensors[0].stride(dim), *[batch_strides(t, dim) for t in tensors])
    if plan is None:
        return False
    strides = [(*plan.strides[k], t.stride(dim)) for k, t in enumerate(tensors)]
    kernel, meta = tuned.launcher(tensors[0].device)
    kernel[plan.grid](*tensors, *plan.launch_args(), *[s for st in strides for s in st], LOG=log,
                      **plan.meta(), **meta)
    return True


@custom_op("tkernels::softmax", mutates_args=())
def softmax_forward(x: Tensor, dim: int, log: bool, dtype: torch.dtype) -> Tensor:
    """softmax (log=False) or log_softmax (log=True) of x along dim, computed in fp32, output in dtype."""
    op = "log_softmax" if log else "softmax"
    if _backend.resolve(op, x) == "numpy":
        fn = ref.log_softmax if log else ref.softmax
        return _from_numpy(fn(to_numpy(x), dim), x, dtype)
    check_triton_dtype(op, x)
    _check_triton_out_dtype(op, dtype)
    y = torch.empty_like(x, dtype=dtype)
    if x.numel() and not _launch(_FORWARD, [x, y], dim, log):
        # batch dims that do not collapse to three (rare): compute on contiguous copies
        tmp = torch.empty(x.shape, dtype=dtype, device=x.device)
        _launch(_FORWARD, [x.contiguous(), tmp], dim, log)
        y.copy_(tmp)
    return y


@softmax_forward.register_fake
def _(x, dim, log, dtype):
    return torch.empty_like(x, dtype=dtype)


@custom_op("tkernels::softmax_backward", mutates_args=())
def softmax_backward(grad_y: Tensor, y: Tensor, dim: int, log: bool, input_dtype: torch.dtype) -> Tensor:
    """Gradient with respect to the input of softmax/log_softmax, from the saved output y."""
    op = "log_softmax" if log else "softmax"
    if _backend.resolve(op, y) == "numpy":
        fn = ref.log_softmax_backward if log else ref.softmax_backward
        return _from_numpy(fn(to_numpy(grad_y), to_numpy(y), dim), y, input_dtype)
    dx = torch.empty_like(y, dtype=input_dtype)
    if y.numel() and not _launch(_BACKWARD, [grad_y, y, dx], dim, log):
        tmp = torch.empty(y.shape, dtype=input_dtype, device=y.device)
        _launch(_BACKWARD, [grad_y.contiguous(), y.contiguous(), tmp], dim, log)
        dx.copy_(tmp)
    return dx


@softmax_backward.register_fake
def _(grad_y, y, dim, log, input_dtype):
    return torch.empty_like(y, dtype=input_dtype)


class SoftmaxFunction(torch.autograd.Function):
    """Autograd for softmax/log_softmax; backward keeps only the output y."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, log: bool, dtype: torch.dtype):
        y = softmax_forward.in_forward(x, dim, log, dtype)
        ctx.dim, ctx.log, ctx.input_dtype = dim, log, x.dtype
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        (y,) = ctx.saved_tensors
        dx = softmax_backward(grad_y, y, ctx.dim, ctx.log, ctx.input_dtype)
        return dx, None, None, None


# ---------------------------------------------------------------------------------------------
# Public functions (torch.nn.functional signatures)
# ---------------------------------------------------------------------------------------------
def _implicit_dim(name: str, ndim: int, stacklevel: int) -> int:
    """torch's legacy rule for dim=None, with its deprecation warning (stacklevel points at the caller
    of the public function, as in torch)."""
    warnings.warn(f"Implicit dimension choice for {name} has been deprecated. Change the call to include "
                  "dim=X as an argument.", stacklevel=stacklevel)
    return 0 if ndim in (0, 1, 3) else 1


def _normalized_dim(op: str, dim: int, ndim: int) -> int:
    low, high = -max(ndim, 1), max(ndim, 1) - 1
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"{op}: dim must be an int, but got {type(dim).__name__}")
    if not low <= dim <= high:
        raise IndexError(f"{op}: Dimension out of range (expected to be in range of [{low}, {high}], "
                         f"but got {dim}) for an input with {ndim} dims")
    return dim % max(ndim, 1)


def _apply(op: str, input: Tensor, dim: Optional[int], stacklevel: int, dtype: Optional[torch.dtype],
           log: bool) -> Tensor:
    if not isinstance(input, Tensor):
        raise TypeError(f"{op}: input must be a Tensor, not {type(input).__name__}")
    if dim is None:
        dim = _implicit_dim(op, input.dim(), stacklevel + 1)
    dtype = output_dtype(op, input, dtype)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"{op}: dtype must be a torch.dtype or None, but got {dtype!r}")
    out_dtype = dtype or input.dtype
    if not out_dtype.is_floating_point or out_dtype not in (torch.float16, torch.bfloat16, torch.float32,
                                                           torch.float64):
        raise NotImplementedError(f"{op}: expected a floating-point input or dtype (float16, bfloat16, "
                                  f"float32 or float64), but got input {input.dtype} and dtype={dtype}")
    if not input.dtype.is_floating_point:
        input = input.to(out_dtype)  # torch casts integer input to dtype first; it has no gradient anyway
    dim = _normalized_dim(op, dim, input.dim())
    return run_function(SoftmaxFunction, input, dim, log, out_dtype)


def softmax(input: Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
            dtype: Optional[torch.dtype] = None) -> Tensor:
    """``torch.nn.functional.softmax``: exp(x_c) / sum_k exp(x_k) along ``dim``; with ``dtype`` the input
    is read as that dtype and the output has it (the gradient keeps the input's dtype)."""
    return _apply("softmax", input, dim, _stacklevel, dtype, log=False)


def log_softmax(input: Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
                dtype: Optional[torch.dtype] = None) -> Tensor:
    """``torch.nn.functional.log_softmax``: x_c - log sum_k exp(x_k) along ``dim``."""
    return _apply("log_softmax", input, dim, _stacklevel, dtype, log=True)
