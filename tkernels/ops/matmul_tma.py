"""Hopper (sm_90) matmul: persistent, TMA-fed, warp-specialised; the same math as
:func:`tkernels.ops.matmul.matmul_kernel`:

    C[M, N] = act( gate(A)[M, K] @ B[K, N] + bias[N] ),   gate(A) = A * act'(G)  (optional)

* **TMA.** Every operand tile moves through a tensor descriptor (``tl.make_tensor_descriptor``,
  built on the device; ``desc.load`` / ``desc.store`` become ``cp.async.bulk.tensor``, UTMALDG /
  UTMASTG in SASS). The copy engine computes the addresses and clips the tile at the tensor's
  edge (out-of-bounds elements read as 0 and are never written), so the main loop carries no
  masks and no address registers. Each operand must have one unit stride and 16-byte aligned
  rows; ``A_T`` / ``B_T`` say that A (or B) is stored transposed (unit stride along M, or along K
  for B) and the tile is transposed in shared memory, which wgmma reads either way.
* **Persistent.** The grid is one program per multiprocessor; each walks output tiles
  ``pid, pid + P, ...`` in GROUP_M bands (L2 reuse), so no launch per tile and the next tile's
  loads overlap the previous tile's epilogue.
* **Warp-specialised** (triton >= 3.9, see WARP_SPECIALIZATION). With ``WARP_SPECIALIZE`` the persistent tile loop is split by the compiler
  into a producer warp group issuing TMA loads and two consumer warp groups issuing wgmma (HGMMA),
  so loads for the next K step (and the next tile) run while the tensor cores work.
* **Epilogue on sub-tiles.** The fp32 accumulator is split into EPILOGUE_SPLIT column slices;
  each gets the bias, optionally stores the pre-activation z, applies the activation and is
  stored by TMA, so only one slice of converted values is live at a time.
* ``ROWSUM`` writes sum_k gate(A)[m, k] (the bias gradient of dW = dZ^T @ X), from the tile
  column pid_n == 0.

Tiles: 128x256x64 (3 stages) forward; the gated backward holds A and G tiles in registers for
the act' prologue, so it uses up to 128x128x64. Traffic: A read N/BLOCK_N times, B
M/BLOCK_M times, C written once; compute-bound. Offsets are the copy engine's (int32 coordinates
per dimension, int64 addresses), so tensors past 2**31 elements are fine.
"""
from __future__ import annotations

import contextvars
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..activations import activation_grad, apply_activation
from ._common import KernelSpec, Tuned, cdiv, config, device_properties, grouped_tile, register_kernel, sm_count

# triton >= 3.4 has device-side tensor descriptors (3.2/3.3 only an experimental spelling); without
# them every launch takes the cp.async kernel.
HAS_TENSOR_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor")


def _tma_switch(value: str) -> bool:
    if value.strip() not in ("0", "1"):
        raise ValueError(f"TKERNELS_TMA={value!r}: expected 0 (no TMA paths) or 1 (the default)")
    return value.strip() == "1"


# TKERNELS_TMA=0 turns every TMA path off (the matmul and the three conv kernels take their cp.async
# builds, FORCE_TMA included): to compare the two designs on one GPU, or to step around a driver or
# triton that mishandles descriptors. Read once, at import.
TMA_ENABLED = _tma_switch(os.environ.get("TKERNELS_TMA") or "1") and HAS_TENSOR_DESCRIPTORS
# Tests set this to run the TMA kernel on CPU tensors under the interpreter.
FORCE_TMA: bool = False


@triton.jit
def _gated_tile(a, g, GATE_ACT: tl.constexpr, act_param):
    """a * act'(g) in fp32, cast back to a's dtype (the MMA operand)."""
    return (a.to(tl.float32) * activation_grad(g.to(tl.float32), GATE_ACT, act_param)).to(a.dtype)


@triton.jit
def matmul_tma_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, gate_ptr, preact_ptr, rowsum_ptr,
    M, N, K, stride_a, stride_b, stride_c, stride_g, stride_p, act_param,
    A_T: tl.constexpr, B_T: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PREACT: tl.constexpr,
    HAS_GATE: tl.constexpr, GATE_ACT: tl.constexpr, ROWSUM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """Persistent TMA matmul (module docstring). stride_a is A's non-unit stride (along M, or along
    K when A_T), stride_b B's (along K, or along N when B_T); C, G (like A) and z have unit column
    strides. Grid: (min(programs, tiles),)."""
    SUB_N: tl.constexpr = BLOCK_N // EPILOGUE_SPLIT
    if A_T:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[K, M], strides=[stride_a, 1], block_shape=[BLOCK_K, BLOCK_M])
    else:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_a, 1], block_shape=[BLOCK_M, BLOCK_K])
    if HAS_GATE:
        if A_T:
            g_desc = tl.make_tensor_descriptor(gate_ptr, shape=[K, M], strides=[stride_g, 1],
                                               block_shape=[BLOCK_K, BLOCK_M])
        else:
            g_desc = tl.make_tensor_descriptor(gate_ptr, shape=[M, K], strides=[stride_g, 1],
                                               block_shape=[BLOCK_M, BLOCK_K])
    if B_T:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_b, 1], block_shape=[BLOCK_N, BLOCK_K])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_b, 1], block_shape=[BLOCK_K, BLOCK_N])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_c, 1], block_shape=[BLOCK_M, SUB_N])
    # (without STORE_PREACT the launcher passes C here and the descriptor goes unused)
    p_desc = tl.make_tensor_descriptor(preact_ptr, shape=[M, N], strides=[stride_p, 1], block_shape=[BLOCK_M, SUB_N])

    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0),
                         warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        row_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for kt in range(k_tiles):
            off_k = kt * BLOCK_K
            if A_T:
                a = a_desc.load([off_k, off_m]).T
            else:
                a = a_desc.load([off_m, off_k])
            if HAS_GATE:
                if A_T:
                    g = g_desc.load([off_k, off_m]).T
                else:
                    g = g_desc.load([off_m, off_k])
                a = _gated_tile(a, g, GATE_ACT, act_param)
            if ROWSUM:
                row_acc += tl.sum(a.to(tl.float32), axis=1)
            if B_T:
                b = b_desc.load([off_n, off_k]).T
            else:
                b = b_desc.load([off_k, off_n])
            acc = tl.dot(a, b, acc)

        if ROWSUM:
            if pid_n == 0:
                offs_m = off_m + tl.arange(0, BLOCK_M)
                tl.store(rowsum_ptr + offs_m, row_acc.to(rowsum_ptr.dtype.element_ty), mask=offs_m < M)
        # epilogue in EPILOGUE_SPLIT column slices: [BM, BN] -> [BM, SPLIT, SUB_N] -> slices
        if EPILOGUE_SPLIT == 2:
            left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, SUB_N)), (0, 2, 1)))
            _epilogue_slice(left, c_desc, p_desc, bias_ptr, off_m, off_n, N, act_param,
                            HAS_BIAS, ACT, STORE_PREACT, SUB_N)
            _epilogue_slice(right, c_desc, p_desc, bias_ptr, off_m, off_n + SUB_N, N, act_param,
                            HAS_BIAS, ACT, STORE_PREACT, SUB_N)
        else:
            _epilogue_slice(acc, c_desc, p_desc, bias_ptr, off_m, off_n, N, act_param,
                            HAS_BIAS, ACT, STORE_PREACT, SUB_N)


@triton.jit
def _epilogue_slice(acc, c_desc, p_desc, bias_ptr, off_m, off_n, N, act_param,
                    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PREACT: tl.constexpr, SUB_N: tl.constexpr):
    """bias, optional pre-activation store, activation, cast and TMA store of one [BM, SUB_N] slice."""
    if HAS_BIAS:
        offs_n = off_n + tl.arange(0, SUB_N)
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if STORE_PREACT:
        p_desc.store([off_m, off_n], acc.to(p_desc.dtype))
    c_desc.store([off_m, off_n], apply_activation(acc, ACT, act_param).to(c_desc.dtype))


# ---------------------------------------------------------------------------------------------
# Configs (sm_90 only) and `tkernels inspect` registrations
# ---------------------------------------------------------------------------------------------
def _tile(m: int, n: int, warps: int, stages: int, split: int = 2, ws: bool = True, k: int = 64) -> triton.Config:
    return config(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, EPILOGUE_SPLIT=split, WARP_SPECIALIZE=ws,
                  num_warps=warps, num_stages=stages)


# Triton's Hopper warp specialisation (``add_hopper_warpspec``) applies to num_warps=4 programs:
# it adds a producer warp group for the TMA loads and splits the tile over two consumer warp
# groups issuing wgmma, with setmaxnreg moving registers to the consumers; 12 warps launch (inspect
# reports them). The forward (no gate) takes 128x256 tiles: 64 rows x 256 fp32 accumulators per
# consumer group = 128 registers a thread. The gated backward also holds A and G tiles in registers
# for the act' prologue, so its largest tile is 128x128, stepping K by 32 when warp-specialised
# (the consumers' register cap; at 64 the gelu_tanh gradient spilled 24-32 B). Configs without warp specialisation
# (8 warps, 2 consumer groups, software-pipelined) cover small or skinny problems.
def _triton_version() -> tuple:
    return tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())


# Hopper warp specialisation compiled here with triton 3.9; triton 3.6 (the GPU image's) fails in
# its NVGPUWarpSpecialization pass on these kernels, an error autotune would not skip. So older
# tritons get the same tiles software-pipelined instead (8 warps, two consumer warp groups).
WARP_SPECIALIZATION = _triton_version() >= (3, 9)
if WARP_SPECIALIZATION:
    TMA_CONFIGS = {
        "plain": {"sm_90": [_tile(128, 256, 4, 3), _tile(128, 128, 4, 4), _tile(128, 128, 8, 4, ws=False),
                            _tile(64, 128, 4, 4, ws=False)]},
        "gated": {"sm_90": [_tile(128, 128, 4, 4, k=32), _tile(128, 128, 8, 3, ws=False),
                            _tile(64, 128, 4, 4, ws=False)]},
    }
else:
    TMA_CONFIGS = {
        "plain": {"sm_90": [_tile(128, 256, 8, 3, ws=False), _tile(128, 128, 8, 4, ws=False),
                            _tile(64, 128, 4, 4, ws=False)]},
        "gated": {"sm_90": [_tile(128, 128, 8, 3, ws=False), _tile(64, 128, 4, 4, ws=False)]},
    }
TUNED_TMA = {family: Tuned(matmul_tma_kernel, configs,
                           interpreter=config(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, EPILOGUE_SPLIT=2,
                                              WARP_SPECIALIZE=False),
                           key=["M", "N", "K", "A_T", "B_T", "HAS_GATE", "ROWSUM"])
             for family, configs in TMA_CONFIGS.items()}

_SIG = {"a_ptr": "*{dtype}", "b_ptr": "*{dtype}", "c_ptr": "*{dtype}", "bias_ptr": "*{dtype}",
        "gate_ptr": "*{dtype}", "preact_ptr": "*{dtype}", "rowsum_ptr": "*{dtype}",
        "M": "i32", "N": "i32", "K": "i32", "stride_a": "i32", "stride_b": "i32", "stride_c": "i32",
        "stride_g": "i32", "stride_p": "i32", "act_param": "fp32"}
_SIZES = {name: 4096 for name in ("M", "N", "K", "stride_a", "stride_b", "stride_c", "stride_g", "stride_p")}
if HAS_TENSOR_DESCRIPTORS:
    # the forward as linear launches it (A = x, B = W^T stored as W: B_T) with the heaviest epilogue;
    # the backward's input gradient (dZ @ W) and weight gradient (dZ^T @ X, A_T, with the bias rowsum)
    register_kernel(KernelSpec(
        name="matmul_tma", kernel=matmul_tma_kernel, signature=_SIG, configs_by_arch=TMA_CONFIGS["plain"],
        variants=[dict(A_T=False, B_T=True, HAS_BIAS=True, ACT=4, STORE_PREACT=True, HAS_GATE=False, GATE_ACT=0,
                       ROWSUM=False)],
        dtypes=("fp16", "bf16"), example_args=_SIZES, tensor_cores=True,
    ))
    register_kernel(KernelSpec(
        name="matmul_tma_gated", kernel=matmul_tma_kernel, signature=_SIG, configs_by_arch=TMA_CONFIGS["gated"],
        variants=[dict(A_T=False, B_T=False, HAS_BIAS=False, ACT=0, STORE_PREACT=False, HAS_GATE=True,
                       GATE_ACT=4, ROWSUM=False),
                  dict(A_T=True, B_T=False, HAS_BIAS=False, ACT=0, STORE_PREACT=False, HAS_GATE=True,
                       GATE_ACT=4, ROWSUM=True)],
        dtypes=("fp16", "bf16"), example_args=_SIZES, tensor_cores=True,
    ))


# ---------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------
def tma_aligned(t: torch.Tensor, strides) -> bool:
    """TMA's addressing rules for a descriptor over ``t`` whose non-unit strides (in elements) are
    ``strides``: a 16-byte aligned base, and strides that are positive 16-byte multiples."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s > 0 and s * size % 16 == 0 for s in strides)


def _tma_layout(t: torch.Tensor, unit_dim: Optional[int] = None) -> Optional[int]:
    """The dim with unit stride (``unit_dim`` if given) when the other stride and the base are
    16-byte aligned, as TMA needs; else None."""
    for dim in ((unit_dim,) if unit_dim is not None else (1, 0)):
        if t.stride(dim) == 1 and tma_aligned(t, (t.stride(1 - dim),)):
            return dim
    return None


def _scratch_buffer(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, device="cuda", dtype=torch.int8)


# Whether ensure_scratch_allocator has set triton's allocator in the current context. Triton keeps
# the allocator in a ContextVar (so in 3.6 and 3.9; triton PR 7685): a new thread, such as the worker thread
# on which autograd runs CUDA backward, starts without it. A flag of our own in a ContextVar is set
# and copied exactly where triton's is, so it never says "set" in a context that lacks the allocator.
_scratch_allocator_set: contextvars.ContextVar = contextvars.ContextVar("tkernels_scratch_allocator", default=False)


def ensure_scratch_allocator() -> None:
    """Device-side descriptors live in a global scratch buffer that triton asks the allocator for;
    called before each launch that builds descriptors, in whatever thread launches."""
    if not _scratch_allocator_set.get():
        triton.set_allocator(_scratch_buffer)
        _scratch_allocator_set.set(True)


def tma_eligible(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, gate: Optional[torch.Tensor],
                 preact: Optional[torch.Tensor], split: int) -> bool:
    """Whether this launch can take the TMA kernel: TMA_ENABLED, sm_90 (or FORCE_TMA), fp16/bf16, no
    split-K, every operand TMA-addressable and the gate laid out like A."""
    if not TMA_ENABLED or split != 1 or a.dtype not in (torch.float16, torch.bfloat16):
        return False
    if not FORCE_TMA and (not a.is_cuda or device_properties(a.device).major != 9):
        return False
    a_unit = _tma_layout(a)
    if a_unit is None or _tma_layout(b) is None or _tma_layout(out, 1) is None:
        return False
    if gate is not None and _tma_layout(gate, a_unit) is None:
        return False
    return preact is None or _tma_layout(preact, 1) is not None


def matmul_tma(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, bias, activation_code: int,
               activation_param: float, preact_out, gate, gate_activation_code: int, rowsum_out) -> None:
    """Launch the TMA kernel (callers check :func:`tma_eligible` first)."""
    M, K = a.shape
    N = b.shape[1]
    a_t = a.stride(1) != 1
    b_t = b.stride(1) != 1
    dummy = out
    gate_t = gate if gate is not None else a
    preact_t = preact_out if preact_out is not None else out
    family = "gated" if gate is not None else "plain"
    kernel, meta = TUNED_TMA[family].launcher(a)
    if a.device.type == "cuda":
        ensure_scratch_allocator()
        programs = sm_count(a.device)
    else:
        programs = 4  # the interpreter runs programs one by one; a few exercise the persistent walk
    grid = lambda m: (min(programs, cdiv(M, m["BLOCK_M"]) * cdiv(N, m["BLOCK_N"])),)  # noqa: E731
    kernel[grid](
        a, b, out, bias if bias is not None else dummy, gate_t, preact_t,
        rowsum_out if rowsum_out is not None else dummy,
        M, N, K, a.stride(1) if a_t else a.stride(0), b.stride(1) if b_t else b.stride(0), out.stride(0),
        gate_t.stride(1) if a_t else gate_t.stride(0), preact_t.stride(0), float(activation_param),
        A_T=a_t, B_T=b_t, HAS_BIAS=bias is not None, ACT=activation_code, STORE_PREACT=preact_out is not None,
        HAS_GATE=gate is not None, GATE_ACT=gate_activation_code, ROWSUM=rowsum_out is not None, **meta,
    )
