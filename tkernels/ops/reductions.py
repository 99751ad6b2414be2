"""Column sums with a fused activation derivative: out[n] = sum_m dY[m, n] * act'(S[m, n]).

This is the bias gradient whenever the weight gradient is not also wanted (otherwise the
weight-gradient GEMM produces it as its row sums). One program per BLOCK_N columns walks
all M rows in BLOCK_M steps with an fp32 accumulator, in a fixed order (deterministic).
Traffic: dY (and S) read once, N values written; memory-bound.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..activations import activation_grad
from ._common import KernelSpec, cdiv, config, register_kernel


@triton.jit
def column_sum_kernel(g_ptr, s_ptr, out_ptr, M, N, stride_gm, stride_gn, stride_sm, stride_sn, act_param,
                      HAS_GATE: tl.constexpr, GATE_ACT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (offs_m < M)[:, None] & mask_n[None, :]
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=mask, other=0.0)
        g = g.to(tl.float32)
        if HAS_GATE:
            s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn, mask=mask, other=0.0)
            g = tl.where(mask, g * activation_grad(s.to(tl.float32), GATE_ACT, act_param), 0.0)
        acc += g
    tl.store(out_ptr + offs_n, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=mask_n)


_CFG = dict(BLOCK_M=32, BLOCK_N=64)
register_kernel(KernelSpec(
    name="column_sum",
    kernel=column_sum_kernel,
    signature={"g_ptr": "*{dtype}", "s_ptr": "*{dtype}", "out_ptr": "*{dtype}", "M": "i32", "N": "i32",
               "stride_gm": "i32", "stride_gn": "i32", "stride_sm": "i32", "stride_sn": "i32", "act_param": "fp32"},
    configs_by_arch={arch: [config(num_warps=4, num_stages=2, **_CFG)] for arch in ("sm_80", "sm_90")},
    variants=[dict(HAS_GATE=True, GATE_ACT=4)],
))


def column_sum(grad: torch.Tensor, out: torch.Tensor, *, gate: Optional[torch.Tensor] = None,
               gate_activation_code: int = 0, activation_param: float = 0.0) -> torch.Tensor:
    M, N = grad.shape
    if N == 0:
        return out
    s = gate if gate is not None else grad
    column_sum_kernel[(cdiv(N, _CFG["BLOCK_N"]),)](
        grad, s, out, M, N, grad.stride(0), grad.stride(1), s.stride(0), s.stride(1), float(activation_param),
        HAS_GATE=gate is not None, GATE_ACT=gate_activation_code, **_CFG)
    return out
