"""The tiled matmul that Linear's forward and backward are made of.

    C[M, N] = act( gate(A)[M, K] @ B[K, N] + bias[N] )

* ``gate(A) = A * act'(G)``, an optional prologue applied to A's tiles as they are loaded.
  It fuses the activation derivative into the backward GEMMs: dX = (dY*act'(.)) @ W and
  dW = (dY*act'(.))^T @ X never materialise dZ.
* ``ROWSUM`` also writes sum_k gate(A)[m, k]; for dW = dZ^T @ X that is the bias gradient.
* The epilogue adds the bias, optionally stores the pre-activation z, applies the
  activation and casts to C's dtype; accumulation is fp32.

Tiling: one program per BLOCK_M x BLOCK_N tile of C, walking K in BLOCK_K steps. Tiles are
visited in groups of GROUP_M rows so that neighbouring programs share B columns in L2.
Traffic: A is read N/BLOCK_N times and B M/BLOCK_M times, C written once; compute-bound at
the sizes that matter. When M and N are small and K long (weight gradients of a big batch),
the K range is split across SPLIT_K programs that write fp32 partials to a workspace and a
second kernel sums them in a fixed order (deterministic; no float atomics).

All offsets are computed in int64, so tensors past 2**31 elements index correctly.

This kernel is the cp.async path (sm_80, fp32, split-K, and layouts TMA cannot address). On sm_90,
fp16/bf16 launches whose operands TMA can address go to the persistent, TMA-fed, warp-specialised
kernel in :mod:`.matmul_tma`. Configs come in three families by operand class: fp16/bf16, tf32
(fp32 operands are twice as wide) and exact fp32 (FMA units, both operand tiles in registers).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..activations import activation_grad, apply_activation
from . import matmul_tma as _tma_module
from .matmul_tma import matmul_tma, tma_eligible
from ._common import (grouped_tile, KernelSpec, Tuned, cdiv, config, operand_class, register_kernel,
                      sm_count, tl_input_precision)


@triton.jit
def matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, gate_ptr, preact_ptr, rowsum_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_gm, stride_gk, stride_pm, stride_pn,
    stride_split_c, stride_split_r,
    act_param,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PREACT: tl.constexpr,
    HAS_GATE: tl.constexpr, GATE_ACT: tl.constexpr, ROWSUM: tl.constexpr,
    SPLIT_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # this program's slice of the K range (the whole range unless split)
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_lo = pid_k * tiles_per_split * BLOCK_K
    k_hi = tl.minimum(K, k_lo + tiles_per_split * BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask_k = offs_k < k_hi
        a_mask = mask_m[:, None] & mask_k[None, :]
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak, mask=a_mask, other=0.0)
        if HAS_GATE:
            g = tl.load(gate_ptr + offs_m[:, None] * stride_gm + offs_k[None, :] * stride_gk, mask=a_mask, other=0.0)
            gated = a.to(tl.float32) * activation_grad(g.to(tl.float32), GATE_ACT, act_param)
            a = tl.where(a_mask, gated, 0.0).to(a_ptr.dtype.element_ty)
        if ROWSUM:
            row_acc += tl.sum(a.to(tl.float32), axis=1)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    c_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K > 1:
        # fp32 partials; the epilogue runs in the reduction kernel
        part = c_ptr + pid_k * stride_split_c
        tl.store(part + offs_m[:, None] * N + offs_n[None, :], acc, mask=c_mask)
        if ROWSUM:
            if pid_n == 0:
                tl.store(rowsum_ptr + pid_k * stride_split_r + offs_m, row_acc, mask=mask_m)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if STORE_PREACT:
            tl.store(preact_ptr + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn,
                     acc.to(preact_ptr.dtype.element_ty), mask=c_mask)
        out = apply_activation(acc, ACT, act_param)
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
                 out.to(c_ptr.dtype.element_ty), mask=c_mask)
        if ROWSUM:
            if pid_n == 0:
                tl.store(rowsum_ptr + offs_m, row_acc.to(rowsum_ptr.dtype.element_ty), mask=mask_m)


@triton.jit
def sum_partials_kernel(part_ptr, out_ptr, L, SPLIT, stride_out, BLOCK: tl.constexpr):
    """out[l] = sum_s part[s, l] in a fixed order (fp32), cast to out's dtype. Memory-bound."""
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = offs < L
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(part_ptr + s * L + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs * stride_out, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _tile(m: int, n: int, k: int, warps: int = 4, stages: int = 3) -> triton.Config:
    return config(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, num_warps=warps, num_stages=stages)


def _configs(block_k: int, small_block_k: int):
    # Accumulator registers per thread = BLOCK_M*BLOCK_N / (32*num_warps); the fused epilogue
    # (bias, stored pre-activation, gelu) needs headroom on top, so no tile holds more than
    # 64 fp32 accumulators per thread (larger tiles spilled in `tkernels inspect`). block_k is the
    # K step of the three largest tiles, small_block_k that of the 64x64 and 16x64 ones.
    return [_tile(128, 128, block_k, 8), _tile(128, 64, block_k), _tile(64, 128, block_k),
            _tile(64, 64, small_block_k), _tile(32, 64, 32, 2, 5), _tile(16, 64, small_block_k, 2, 4)]


# Config families by operand class (see operand_class): fp16/bf16 tiles step K by 64 on sm_90;
# tf32 operands are twice as wide, so 128x128x64 x 3 stages would need 246,784 B of shared
# memory, more than sm_90's 232,448 B: tf32 keeps BLOCK_K 32 on every arch. Exact fp32 dots run on
# the FMA units with both operand tiles in registers: BLOCK_K 64 spilled 264-2,616 B per thread
# (gated backward), so every tile steps K by 32, and the three largest by 16 (at 32 the gated
# backward with the gelu_tanh gradient still spilled 16-208 B). These are the forward's (and every
# ungated product's) tiles; they were sized while the gated backward shared them, and it now tunes
# over GATED_CONFIGS below.
MATMUL_CONFIGS = {
    "half": {"sm_80": _configs(32, 64), "sm_90": _configs(64, 64)},
    "tf32": {"sm_80": _configs(32, 64), "sm_90": _configs(32, 64)},
    "ieee": {"sm_80": _configs(16, 32), "sm_90": _configs(16, 32)},
}


# The gated backward (A = dY * act'(Z) formed in registers from two loaded tiles, its row sums taken
# on the way) tunes over its own tiles. Where a forward tile spilled in this role, the closest tile
# that compiles without spills under both ptxas 12.8 (triton 3.6, the GPU image) and 12.9 (triton
# 3.9) takes its place: those ptxas versions round register counts down to occupancy steps (72, 80,
# 96, 128) and spill 8-48 B around the main loop to get there, differently for each tile, so every
# swap below was checked in `tkernels inspect` under both.
GATED_CONFIGS = {
    "half": {
        "sm_80": [_tile(128, 128, 32, 8), _tile(128, 64, 32, stages=4), _tile(64, 128, 32), _tile(64, 64, 64),
                  _tile(32, 64, 32, 2, 3), _tile(16, 64, 64, 2, 4)],
        "sm_90": [_tile(128, 128, 64, 8), _tile(128, 64, 32, stages=4), _tile(64, 128, 64), _tile(64, 64, 64),
                  _tile(32, 64, 32, 2, 3), _tile(16, 64, 64, 2, 4)],
    },
    "tf32": {
        "sm_80": MATMUL_CONFIGS["tf32"]["sm_80"],
        "sm_90": [_tile(128, 128, 32, 8), _tile(128, 64, 32), _tile(64, 128, 32), _tile(64, 64, 64),
                  _tile(32, 64, 32, 2, 5), _tile(16, 64, 64, 2, 3)],
    },
    "ieee": {
        "sm_80": [_tile(128, 128, 16, 8), _tile(128, 64, 16), _tile(64, 128, 16), _tile(64, 64, 32),
                  _tile(32, 64, 32, 2, 5), _tile(16, 64, 32, 4, 4)],
        "sm_90": [_tile(128, 128, 16, 8), _tile(128, 64, 16), _tile(64, 128, 16), _tile(64, 64, 32),
                  _tile(32, 64, 32, 2, 4), _tile(16, 64, 32, 2, 4)],
    },
}
# Under the interpreter, bigger tiles mean fewer NumPy-driven programs; 32 keeps odd shapes masked.
_INTERPRETER_TILE = config(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
_KEY = ["M", "N", "K", "SPLIT_K", "HAS_GATE", "ROWSUM"]
TUNED_MATMUL = {family: Tuned(matmul_kernel, configs, interpreter=_INTERPRETER_TILE, key=_KEY)
                for family, configs in MATMUL_CONFIGS.items()}
TUNED_MATMUL_GATED = {family: Tuned(matmul_kernel, configs, interpreter=_INTERPRETER_TILE, key=_KEY)
                      for family, configs in GATED_CONFIGS.items()}
SUM_PARTIALS_BLOCK = 1024

_SIGNATURE = {
    "a_ptr": "*{dtype}", "b_ptr": "*{dtype}", "c_ptr": "*{dtype}", "bias_ptr": "*{dtype}",
    "gate_ptr": "*{dtype}", "preact_ptr": "*{dtype}", "rowsum_ptr": "*{dtype}",
    "M": "i32", "N": "i32", "K": "i32",
    "stride_am": "i32", "stride_ak": "i32", "stride_bk": "i32", "stride_bn": "i32",
    "stride_cm": "i32", "stride_cn": "i32", "stride_gm": "i32", "stride_gk": "i32",
    "stride_pm": "i32", "stride_pn": "i32", "stride_split_c": "i32", "stride_split_r": "i32",
    "act_param": "fp32",
}
_EXAMPLE_ARGS = {name: 4096 for name in ("M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn",
                                         "stride_cm", "stride_cn", "stride_gm", "stride_gk", "stride_pm",
                                         "stride_pn", "stride_split_c", "stride_split_r")}
# Unit strides as the linear launches them: forward A = x, B = W^T; weight gradient A = dY^T, B = x.
# Each family is compiled with its heaviest variant: the gelu_tanh epilogue (bias, stored
# pre-activation) for the forward tiles, the gelu_tanh gate prologue with row sums for the gated ones.
for _name, _families, _variant in (
        ("matmul", MATMUL_CONFIGS,
         dict(HAS_BIAS=True, ACT=4, STORE_PREACT=True, HAS_GATE=False, GATE_ACT=0, ROWSUM=False, SPLIT_K=1,
              stride_ak=1, stride_bk=1, stride_cn=1, stride_pn=1, stride_gk=1)),
        ("matmul_gated", GATED_CONFIGS,
         dict(HAS_BIAS=False, ACT=0, STORE_PREACT=False, HAS_GATE=True, GATE_ACT=4, ROWSUM=True, SPLIT_K=1,
              stride_am=1, stride_gm=1, stride_bn=1, stride_cn=1, stride_pn=1))):
    register_kernel(KernelSpec(name=_name, kernel=matmul_kernel, signature=_SIGNATURE,
                               configs_by_arch=_families["half"],
                               fp32_configs={"tf32": _families["tf32"], "ieee": _families["ieee"]},
                               variants=[_variant], example_args=_EXAMPLE_ARGS, input_precision=True,
                               tensor_cores=True))
register_kernel(KernelSpec(
    name="sum_partials",
    kernel=sum_partials_kernel,
    signature={"part_ptr": "*fp32", "out_ptr": "*{dtype}", "L": "i32", "SPLIT": "i32", "stride_out": "i32"},
    configs_by_arch={arch: [config(BLOCK=SUM_PARTIALS_BLOCK, num_warps=4, num_stages=1)] for arch in ("sm_80", "sm_90")},
))


_TMA_DTYPES = (torch.float16, torch.bfloat16)  # what the TMA kernel takes (tma_eligible checks the rest)


def _choose_split_k(M: int, N: int, K: int, a: torch.Tensor) -> int:
    """Split the reduction when the output has too few tiles to fill the GPU but K is long."""
    if K < 4096 or not a.is_cuda:  # (the common case first: no device properties read)
        return 1
    tiles = cdiv(M, 128) * cdiv(N, 128)
    sms = sm_count(a.device)
    if tiles >= sms:
        return 1
    return max(1, min(32, sms // tiles, K // 2048))


# (launch config, input precision, epilogue flags) -> constexpr keyword arguments of a launch: a
# training loop launches the same few variants, and one cached dict is cheaper than rebuilding nine
# keywords plus the config's on every call. Keyed by the identity of the config dict the launcher
# returns (each entry holds that dict, so the identity stays unique); entries are few, never evicted.
_LAUNCH_KWARGS: dict = {}


def _launch(a: torch.Tensor, dtype: torch.dtype, precision_of: str, flags: tuple):
    """(kernel, keyword arguments) of a matmul launch on ``a``'s device."""
    precision = tl_input_precision(dtype, precision_of)
    families = TUNED_MATMUL_GATED if flags[3] else TUNED_MATMUL  # flags[3]: has_gate
    kernel, meta = families[operand_class(dtype, precision)].launcher(a)
    key = (id(meta), precision, flags)
    entry = _LAUNCH_KWARGS.get(key)
    if entry is None:
        has_bias, act, store_preact, has_gate, gate_act, rowsum, split = flags
        entry = _LAUNCH_KWARGS[key] = meta, dict(
            HAS_BIAS=has_bias, ACT=act, STORE_PREACT=store_preact, HAS_GATE=has_gate, GATE_ACT=gate_act,
            ROWSUM=rowsum, SPLIT_K=split, INPUT_PRECISION=precision, **meta)
    return kernel, entry[1]


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *,
           bias: Optional[torch.Tensor] = None,
           activation_code: int = 0, activation_param: float = 0.0,
           preact_out: Optional[torch.Tensor] = None,
           gate: Optional[torch.Tensor] = None, gate_activation_code: int = 0,
           rowsum_out: Optional[torch.Tensor] = None,
           split_k: Optional[int] = None, precision_of: str = "matmul",
           a_transposed: bool = False, b_transposed: bool = False) -> torch.Tensor:
    """Launch C = act(gate(A) @ B + bias) into ``out``. A, B, C and gate may have any strides.

    a: (M, K), b: (K, N), out: (M, N), gate: like a, rowsum_out: (M,). ``precision_of``: whose
    torch precision flag an fp32 product follows ("matmul", or "conv" for a 1x1 convolution).
    ``a_transposed`` / ``b_transposed``: a (and gate) hold A^T (K, M), b holds B^T (N, K); the
    kernel reads them through swapped strides (no ``.t()`` view built per call on the hot path).
    """
    if a_transposed:
        K, M = a.shape
        sa = a.stride()[::-1]
    else:
        M, K = a.shape
        sa = a.stride()
    if b_transposed:
        N = b.shape[0]
        sb = b.stride()[::-1]
    else:
        N = b.shape[1]
        sb = b.stride()
    if M == 0 or N == 0:
        if rowsum_out is not None:
            rowsum_out.zero_()
        return out
    split = split_k if split_k is not None else _choose_split_k(M, N, K, a)
    if split != 1:
        split = max(1, min(split, max(1, K)))
    if split > 1 and (bias is not None or activation_code != 0 or preact_out is not None):
        raise ValueError("split-K matmul has no epilogue; use it for gradients only")

    if (a.is_cuda or _tma_module.FORCE_TMA) and a.dtype in _TMA_DTYPES:
        a_view, b_view = (a.t() if a_transposed else a), (b.t() if b_transposed else b)
        gate_view = gate.t() if gate is not None and a_transposed else gate
        if tma_eligible(a_view, b_view, out, gate_view, preact_out, split):
            matmul_tma(a_view, b_view, out, bias=bias, activation_code=activation_code,
                       activation_param=activation_param, preact_out=preact_out, gate=gate_view,
                       gate_activation_code=gate_activation_code, rowsum_out=rowsum_out)
            return out

    dummy = out
    if split > 1:
        c_target = a.new_empty((split, M, N), dtype=torch.float32)
        row_target = (a.new_empty((split, M), dtype=torch.float32)
                      if rowsum_out is not None else c_target)
    else:
        c_target = out
        row_target = rowsum_out if rowsum_out is not None else dummy
    if gate is None:
        gate_t, s_gate = a, sa
    else:
        gate_t, s_gate = gate, (gate.stride()[::-1] if a_transposed else gate.stride())
    preact_t = preact_out if preact_out is not None else dummy

    _launch_matmul(a, b, c_target, bias if bias is not None else dummy, gate_t, preact_t, row_target, M, N, K,
                   sa, sb, out.stride(), s_gate, preact_t.stride(), activation_param, split,
                   _launch(a, a.dtype, precision_of, (bias is not None, activation_code, preact_out is not None,
                                                       gate is not None, gate_activation_code, rowsum_out is not None,
                                                       split)))
    if split > 1:
        _sum_partials(c_target.view(split, M * N), out, M * N, split, out_2d=(M, N))
        if rowsum_out is not None:
            _sum_partials(row_target, rowsum_out, M, split)
    return out


def _launch_matmul(a, b, c, bias, gate, preact, rowsum, M: int, N: int, K: int, sa, sb, sc, s_gate, s_preact,
                   activation_param: float, split: int, launch) -> None:
    """One matmul_kernel launch; every stride given as a (row, column) tuple of the logical matrix."""
    kernel, kwargs = launch
    grid = lambda m: (cdiv(M, m["BLOCK_M"]) * cdiv(N, m["BLOCK_N"]), split)  # noqa: E731
    kernel[grid](a, b, c, bias, gate, preact, rowsum, M, N, K, *sa, *sb, *sc, *s_gate, s_preact[0], s_preact[-1],
                 M * N, M, float(activation_param), **kwargs)


def linear_matmul(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, bias: Optional[torch.Tensor],
                  activation_code: int, activation_param: float,
                  preact_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out = act(x @ weight^T + bias)`` (and ``preact_out = x @ weight^T + bias`` when given):
    :func:`matmul` for a linear layer's forward, with the per-call host work cut to what that case
    needs. Calls that may split K or take the TMA kernel (CUDA only) go through :func:`matmul`."""
    M, K = x.shape
    N = weight.shape[0]
    if (x.is_cuda and (K >= 4096 or x.dtype in _TMA_DTYPES)) or _tma_module.FORCE_TMA or M == 0 or N == 0:
        return matmul(x, weight, out, bias=bias, activation_code=activation_code, activation_param=activation_param,
                      preact_out=preact_out, b_transposed=True)
    sx, sw, so = x.stride(), weight.stride(), out.stride()
    has_preact = preact_out is not None
    # (the unread gate and rowsum slots get what matmul passes there: x and its strides, out)
    _launch_matmul(x, weight, out, bias if bias is not None else out, x, preact_out if has_preact else out, out,
                   M, N, K, sx, (sw[1], sw[0]), so, sx, preact_out.stride() if has_preact else so,
                   activation_param, 1,
                   _launch(x, x.dtype, "matmul", (bias is not None, activation_code, has_preact, False, 0, False, 1)))
    return out


def _sum_partials(part: torch.Tensor, out: torch.Tensor, L: int, split: int, out_2d=None) -> None:
    target = out
    if out_2d is not None and not out.is_contiguous():
        target = torch.empty(out_2d, device=out.device, dtype=out.dtype)
    grid = (cdiv(L, SUM_PARTIALS_BLOCK),)
    sum_partials_kernel[grid](part, target, L, split, 1, BLOCK=SUM_PARTIALS_BLOCK)
    if target is not out:
        out.copy_(target)
