"""Stage 3 of `tkernels inspect`: read a compiled cubin with the CUDA tools in the triton wheel.

* ``cuobjdump --dump-resource-usage``: registers per thread and local memory (STACK/LOCAL);
  local memory above zero means ptxas spilled registers;
* ``nvdisasm``: the SASS, where instructions are counted: tensor cores (``HMMA`` is mma.sync, on
  sm_80 and on sm_90 for small tiles; ``HGMMA`` is Hopper's wgmma), the tensor memory accelerator
  (``UTMALDG``/``UTMASTG``/... , TMA bulk tensor copies) and cp.async (``LDGSTS``);
* occupancy: CTAs that fit on one multiprocessor by registers, shared memory, threads and slots.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

# Largest shared memory one block can opt into: A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB.
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
# Per multiprocessor (CUDA C programming guide, compute capabilities table): shared memory
# (each resident block also takes 1 KiB reserved by the system), 64 Ki registers, 2048 threads,
# 32 blocks; registers are allocated per warp in units of 256.
SHARED_PER_SM = {"sm_80": 164 * 1024, "sm_90": 228 * 1024}
RESERVED_SHARED_PER_CTA = 1024
REGISTERS_PER_SM = 64 * 1024
THREADS_PER_SM = 2048
CTAS_PER_SM = 32
REGISTER_UNIT = 256

_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_OPCODE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", re.MULTILINE)
TMA_OPCODES = ("UTMALDG", "UTMASTG", "UTMAPF", "UTMAREDG", "UBLKCP", "UBLKRED", "UBLKPF")


def tool(name: str) -> str:
    import triton
    candidates = [os.environ.get(f"TRITON_{name.upper()}_PATH", ""),
                  str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name),
                  shutil.which(name) or ""]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise RuntimeError(f"{name} not found (looked in the triton wheel's backends/nvidia/bin and on PATH)")


def count_opcodes(sass: str) -> dict:
    """Instruction counts by family in nvdisasm output (the opcode's first dotted part)."""
    ops = _OPCODE.findall(sass)
    hmma = sum(op == "HMMA" for op in ops)
    hgmma = sum(op == "HGMMA" for op in ops)
    return {"hmma": hmma, "hgmma": hgmma, "tensor_core_ops": hmma + hgmma,
            "tma_ops": sum(op in TMA_OPCODES for op in ops),
            "async_copy_ops": sum(op == "LDGSTS" for op in ops)}


def measure_cubin(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory(prefix="tkernels-inspect-") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
        found = [tuple(int(x) for x in m.groups()) for m in _RESOURCE.finditer(usage)]
        if not found:
            raise RuntimeError(f"cuobjdump printed no resource usage:\n{usage}")
        sass = subprocess.run([tool("nvdisasm"), path], capture_output=True, text=True, check=True).stdout
    return {"registers": max(f[0] for f in found), "spill_bytes": max(f[1] for f in found) + max(f[3] for f in found),
            "static_shared_bytes": max(f[2] for f in found), **count_opcodes(sass)}


def ctas_per_sm(arch: str, registers: Optional[int], shared_bytes: Optional[int], num_warps: int) -> Optional[int]:
    """Blocks of this kernel resident on one multiprocessor at once (0: it cannot launch)."""
    if registers is None or shared_bytes is None:
        return None
    if shared_bytes > SHARED_LIMIT[arch]:
        return 0
    per_warp = -(-max(registers, 1) * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = (REGISTERS_PER_SM // per_warp) // num_warps
    by_shared = SHARED_PER_SM[arch] // (shared_bytes + RESERVED_SHARED_PER_CTA)
    by_threads = THREADS_PER_SM // (32 * num_warps)
    return max(0, min(by_registers, by_shared, by_threads, CTAS_PER_SM))
