"""The roofline the figures are scaled by, measured at start-up on the device in use.

* bandwidth: a device-to-device copy (bytes read + bytes written) / time;
* compute: a large torch matmul (cuBLAS on a GPU) per dtype, 2*n^3 / time.

An op's floor is max(FLOPs / peak FLOP/s, bytes / bandwidth); its "% of roofline" is
floor / measured time. The peaks are what the library baselines reach, not the datasheet's,
so a kernel at 100% matches the best the device was seen to do in this run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from .timing import time_callables

GPU_COPY_BYTES, CPU_COPY_BYTES = 1 << 30, 64 << 20
GPU_MATMUL_N, CPU_MATMUL_N = 8192, 768


@dataclass
class Roofline:
    device: torch.device
    warmup_ms: float = 10.0
    rep_ms: float = 50.0
    bandwidth_gbps: Optional[float] = None
    tflops: Dict[torch.dtype, Optional[float]] = field(default_factory=dict)

    def measure_bandwidth(self) -> float:
        if self.bandwidth_gbps is None:
            nbytes = GPU_COPY_BYTES if self.device.type == "cuda" else CPU_COPY_BYTES
            src = torch.empty(nbytes // 4, dtype=torch.float32, device=self.device).fill_(1.0)
            dst = torch.empty_like(src)
            t = time_callables([lambda: dst.copy_(src)], self.device, self.warmup_ms, self.rep_ms)
            self.bandwidth_gbps = 2 * nbytes / (t.ms * 1e-3) / 1e9
            del src, dst
        return self.bandwidth_gbps

    def measure_tflops(self, dtype: torch.dtype) -> Optional[float]:
        if dtype not in self.tflops:
            n = GPU_MATMUL_N if self.device.type == "cuda" else CPU_MATMUL_N
            try:
                a = torch.randn(n, n, device=self.device).to(dtype)
                b = torch.randn(n, n, device=self.device).to(dtype)
                t = time_callables([lambda: torch.matmul(a, b)], self.device, self.warmup_ms, self.rep_ms)
                self.tflops[dtype] = 2 * n ** 3 / (t.ms * 1e-3) / 1e12
            except RuntimeError:  # a dtype the device's matmul does not support
                self.tflops[dtype] = None
        return self.tflops[dtype]

    def percent(self, ms: float, flops: Optional[float], nbytes: Optional[float],
                dtype: torch.dtype) -> Optional[float]:
        """Measured time against the floor set by the measured peaks."""
        floor_s = 0.0
        if nbytes:
            floor_s = nbytes / (self.measure_bandwidth() * 1e9)
        if flops:
            peak = self.measure_tflops(dtype)
            if peak:
                floor_s = max(floor_s, flops / (peak * 1e12))
        return 100.0 * floor_s / (ms * 1e-3) if floor_s and ms > 0 else None

    def summary(self) -> Dict[str, float]:
        out = {"peak_copy_gbps": self.bandwidth_gbps}
        for dtype, tf in self.tflops.items():
            out[f"peak_matmul_tflops_{str(dtype).replace('torch.', '')}"] = tf
        return {k: (float(f"{v:.4g}") if v is not None else None) for k, v in out.items()}
