"""Dropout with an in-kernel counter-based generator: y = x * keep / (1 - p), keep ~ Bernoulli(1 - p).

The keep decision of element i (its logical, row-major index) is ``u >= p`` with u one of the four
outputs of Philox (``tl.rand4x``) at a counter derived from i (see ``dropout_kernel``): a
counter-based generator, so the mask is a pure function of (seed, i). Nothing is
stored for backward: it recomputes the same mask from the seed and writes dx = g * keep / (1 - p).
The seed is one int64 drawn with ``torch.randint`` from torch's default generator of the input's
device and kept on that device (the kernel loads it, so there is no host sync); so
``torch.manual_seed`` makes results reproducible, and torch.compile traces the draw like any op.
The numpy backend draws its mask from NumPy's Philox with the same seed: reproducible too, but
a different stream from the Triton kernels'.

Like torch, the kept/dropped factor multiplies x (0 * inf is NaN), p == 1 multiplies by 0,
and p == 0 or training=False returns the input itself.

Tiling: a 1-D grid of BLOCK elements over the logical index; contiguous tensors are addressed
directly, others through up to 4 collapsed strides (the output keeps the input's dense layout).
Bytes: one read and one write per element; memory-bound (one Philox call, ~40 integer ops, per
four elements).
"""
from __future__ import annotations

import torch
from torch import Tensor
import triton
import triton.language as tl

from .. import _backend
from ..reference import dropout as ref
from ._dispatch import custom_op, run_function
from ._common import (KernelSpec, backward_backend, cdiv, check_triton_dtype, config, forward_backend,
                      from_numpy, register_kernel, to_numpy)
from .elementwise import _collapse, _strided_offsets

BLOCK = 1024
SEED_HIGH = 2**62  # seed + (i >> 31) must stay inside int64
_INT31 = 2**31 - 1


@triton.jit
def _uniform4(seed, counter, WIDE: tl.constexpr):
    """Philox's four 32-bit outputs for each counter, as uniforms in [0, 1). Philox takes a 32-bit
    counter; past 2**31 counters (WIDE) the high bits move the key instead, so the stream never
    repeats inside one tensor."""
    if WIDE:
        return tl.rand4x(seed + (counter >> 31), (counter & 0x7FFFFFFF).to(tl.int32))
    return tl.rand4x(seed, counter.to(tl.int32))


@triton.jit
def _dropout_quarter(x_ptr, y_ptr, offs, u, p, scale, n, size1, size2, size3, sx0, sx1, sx2, sx3,
                     sy0, sy1, sy2, sy3, DENSE: tl.constexpr):
    """y = x * (keep * scale) on one contiguous quarter of a block, keep = u >= p."""
    mask = offs < n
    if DENSE:
        x_offs = offs
        y_offs = offs
    else:
        x_offs = _strided_offsets(offs, size1, size2, size3, sx0, sx1, sx2, sx3)
        y_offs = _strided_offsets(offs, size1, size2, size3, sy0, sy1, sy2, sy3)
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + y_offs, (x * tl.where(u >= p, scale, 0.0)).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dropout_kernel(x_ptr, y_ptr, seed_ptr, p, scale, n, size1, size2, size3,
                   sx0, sx1, sx2, sx3, sy0, sy1, sy2, sy3,
                   DENSE: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """y_i = x_i * (keep_i * scale): the forward (x = input), the backward (x = grad_y) and the
    in-place forward (y_ptr == x_ptr). fp32 math. Grid = (cdiv(n, BLOCK),).

    One Philox call gives four 32-bit outputs, and all four are used: program b draws BLOCK/4
    counters c = b*BLOCK/4 + t, and output j of counter c decides element b*BLOCK + j*BLOCK/4 + t.
    Each quarter is a contiguous run, so loads and stores stay coalesced 16-byte vectors, and the
    mask is a pure function of (seed, element index) for a fixed BLOCK (backward launches the same)."""
    QUARTER: tl.constexpr = BLOCK // 4
    pid = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, QUARTER)
    u0, u1, u2, u3 = _uniform4(tl.load(seed_ptr), pid * QUARTER + t, WIDE)
    base = pid * BLOCK + t
    _dropout_quarter(x_ptr, y_ptr, base, u0, p, scale, n, size1, size2, size3, sx0, sx1, sx2, sx3,
                     sy0, sy1, sy2, sy3, DENSE)
    _dropout_quarter(x_ptr, y_ptr, base + QUARTER, u1, p, scale, n, size1, size2, size3, sx0, sx1, sx2, sx3,
                     sy0, sy1, sy2, sy3, DENSE)
    _dropout_quarter(x_ptr, y_ptr, base + 2 * QUARTER, u2, p, scale, n, size1, size2, size3, sx0, sx1, sx2, sx3,
                     sy0, sy1, sy2, sy3, DENSE)
    _dropout_quarter(x_ptr, y_ptr, base + 3 * QUARTER, u3, p, scale, n, size1, size2, size3, sx0, sx1, sx2, sx3,
                     sy0, sy1, sy2, sy3, DENSE)


register_kernel(KernelSpec(
    name="dropout", kernel=dropout_kernel,
    signature={"x_ptr": "*{dtype}", "y_ptr": "*{dtype}", "seed_ptr": "*i64", "p": "fp32", "scale": "fp32",
               "n": "i64", "size1": "i32", "size2": "i32", "size3": "i32",
               **{f"{t}{i}": "i64" for t in ("sx", "sy") for i in range(4)}},
    configs_by_arch={a: [config(num_warps=4, num_stages=1, BLOCK=BLOCK)] for a in ("sm_80", "sm_90")},
    variants=[dict(DENSE=True, WIDE=False), dict(DENSE=False, WIDE=True)],
))


def _scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _launch(x: Tensor, y: Tensor, seed: Tensor, p: float) -> bool:
    """y = dropout(x); False if the strides do not collapse to 4 dims (the caller restrides)."""
    n = x.numel()
    if n == 0:
        return True
    dense = x.is_contiguous() and y.is_contiguous()
    if dense:
        sizes, (sx, sy) = [1, 1, 1, 1], ([0] * 4, [0] * 4)
    else:
        try:
            sizes, (sx, sy) = _collapse(tuple(x.shape), x.stride(), y.stride())
        except NotImplementedError:
            return False
    dropout_kernel[(cdiv(n, BLOCK),)](x, y, seed, float(p), _scale(p), n, *sizes[1:], *sx, *sy,
                                      DENSE=dense, WIDE=n > _INT31, BLOCK=BLOCK)
    return True


def _numpy_apply(x: Tensor, seed: Tensor, p: float) -> Tensor:
    keep = ref.keep_mask(tuple(x.shape), p, int(seed.item()))
    return from_numpy(ref.dropout(to_numpy(x), keep, p), x).reshape(x.shape)


@custom_op("tkernels::dropout", mutates_args=())
def dropout_forward(x: Tensor, seed: Tensor, p: float) -> Tensor:
    """x * keep(seed) / (1 - p), keep drawn per logical element index from the int64 seed tensor."""
    if _backend.resolve("dropout", x) == "numpy":
        out = torch.empty_like(x)
        out.copy_(_numpy_apply(x, seed, p))
        return out
    check_triton_dtype("dropout", x)
    y = torch.empty_like(x)
    if not _launch(x, y, seed, p):  # strides that do not collapse to 4 dims (rare): contiguous copies
        tmp = x.contiguous()
        _launch(tmp, tmp, seed, p)
        y.copy_(tmp)
    return y


@dropout_forward.register_fake
def _(x, seed, p):
    return torch.empty_like(x)


@custom_op("tkernels::dropout_", mutates_args=("x",))
def dropout_forward_inplace(x: Tensor, seed: Tensor, p: float) -> None:
    if _backend.resolve("dropout", x) == "numpy":
        x.copy_(_numpy_apply(x, seed, p))
        return
    check_triton_dtype("dropout", x)
    if not _launch(x, x, seed, p):
        tmp = x.contiguous()
        _launch(tmp, tmp, seed, p)
        x.copy_(tmp)


@dropout_forward_inplace.register_fake
def _(x, seed, p):
    return None


@custom_op("tkernels::dropout_backward", mutates_args=())
def dropout_backward(grad_y: Tensor, seed: Tensor, p: float, backend: str) -> Tensor:
    """grad_y * keep(seed) / (1 - p), the mask recomputed from the seed by `backend`, the one the forward
    ran on ('' for the one in force): the two draw different masks from one seed."""
    if backward_backend("dropout", backend, grad_y) == "numpy":
        keep = ref.keep_mask(tuple(grad_y.shape), p, int(seed.item()))
        dx = torch.empty_like(grad_y)
        dx.copy_(from_numpy(ref.dropout_backward(to_numpy(grad_y), keep, p), grad_y).reshape(grad_y.shape))
        return dx
    dx = torch.empty_like(grad_y)
    if not _launch(grad_y, dx, seed, p):
        tmp = grad_y.contiguous()
        _launch(tmp, tmp, seed, p)
        dx.copy_(tmp)
    return dx


@dropout_backward.register_fake
def _(grad_y, seed, p, backend):
    return torch.empty_like(grad_y)


class DropoutFunction(torch.autograd.Function):
    """Autograd for dropout: saves only the seed (one int64), never the mask."""

    @staticmethod
    def forward(ctx, x: Tensor, seed: Tensor, p: float, inplace: bool):
        ctx.p = p
        ctx.backend = forward_backend("dropout", ctx, x)
        ctx.save_for_backward(seed)
        if inplace:
            dropout_forward_inplace.in_forward(x, seed, p)
            ctx.mark_dirty(x)
            return x
        return dropout_forward.in_forward(x, seed, p)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        (seed,) = ctx.saved_tensors
        return dropout_backward(grad_y, seed, ctx.p, ctx.backend), None, None, None


def draw_seed(device: torch.device) -> Tensor:
    """One int64 from torch's default generator for `device`, kept on that device."""
    return torch.randint(0, SEED_HIGH, (1,), dtype=torch.int64, device=device)


def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """``torch.nn.functional.dropout``: zero each element with probability p and scale the rest by 1/(1-p)."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not isinstance(input, Tensor):
        raise TypeError(f"dropout: input must be a Tensor, not {type(input).__name__}")
    if not training or p == 0.0 or input.numel() == 0:
        return input  # torch returns the input itself here, in place or not
    if not input.dtype.is_floating_point:
        raise RuntimeError(f"dropout: input must be a floating-point tensor (float16, bfloat16, float32 or "
                           f"float64), but got {input.dtype}")
    if inplace and input.is_leaf and input.requires_grad and torch.is_grad_enabled():
        # torch refuses before writing anything; autograd would only notice after the kernel ran
        raise RuntimeError("dropout: a leaf Variable that requires grad is being used in an in-place operation "
                           "(inplace=True); use inplace=False or run under torch.no_grad()")
    return run_function(DropoutFunction, input, draw_seed(input.device), float(p), bool(inplace))
