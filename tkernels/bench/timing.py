"""Timing: CUDA events through ``triton.testing.do_bench`` on a GPU, perf_counter on the CPU.

The timed callable rotates among several input sets whose total size exceeds the L2 cache,
so a kernel cannot look fast by finding its inputs in L2 from the previous call (do_bench
also flushes L2 between calls, but CUDA-graph replays do not). Every callable is called once
before timing (compilation, autotuning) and then warmed up for ``warmup_ms``.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

QUANTILES = (0.5, 0.2, 0.8)
MAX_SETS = 32
MAX_ROTATION_BYTES = 2 << 30
DEFAULT_L2_BYTES = 50 << 20


@dataclass
class Timing:
    ms: float  # median
    ms_p20: float
    ms_p80: float


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def rotation_sets(bytes_per_set: int, device: torch.device) -> int:
    """How many input sets to rotate among so that together they exceed twice the L2 cache
    (1 on the CPU, where the figures are not cache-controlled anyway)."""
    if device.type != "cuda" or bytes_per_set <= 0:
        return 1
    wanted = math.ceil(2 * l2_bytes(device) / bytes_per_set)
    return max(1, min(wanted, MAX_SETS, MAX_ROTATION_BYTES // bytes_per_set))


def rotating(fns: Sequence[Callable[[], object]]) -> Callable[[], object]:
    if len(fns) == 1:
        return fns[0]
    cycle = itertools.cycle(fns)
    return lambda: next(cycle)()


def time_callables(fns: Sequence[Callable[[], object]], device: torch.device, warmup_ms: float, rep_ms: float,
                   cuda_graphs: bool = False) -> Timing:
    """Median and 20/80 quantiles, in ms, of one call, rotating among ``fns`` (one per input set)."""
    for fn in fns:  # first calls compile, autotune and allocate; never timed
        fn()
    call = rotating(fns)
    if device.type == "cuda":
        import triton.testing

        torch.cuda.synchronize(device)
        if cuda_graphs:
            values = triton.testing.do_bench_cudagraph(call, rep=rep_ms, quantiles=list(QUANTILES))
        else:
            values = triton.testing.do_bench(call, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
        return Timing(*(float(v) for v in values))
    if cuda_graphs:
        raise RuntimeError("--cuda-graphs needs a CUDA device")
    return time_cpu(call, warmup_ms, rep_ms)


def time_cpu(call: Callable[[], object], warmup_ms: float, rep_ms: float, min_reps: int = 3) -> Timing:
    """perf_counter around each call: warm up for ``warmup_ms``, then sample for ``rep_ms``
    (at least ``min_reps`` samples, or one if a single call already outlasts ``rep_ms``)."""
    def timed() -> float:
        t0 = time.perf_counter()
        call()
        return (time.perf_counter() - t0) * 1e3

    fastest = timed()  # may include lazy initialisation, so only the fastest call sets the pace
    deadline = time.perf_counter() + warmup_ms / 1e3
    while time.perf_counter() < deadline:
        fastest = min(fastest, timed())
    needed = 1 if fastest >= rep_ms else min_reps
    samples = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(samples) < needed or time.perf_counter() < deadline:
        samples.append(timed())
    ordered = torch.tensor(samples, dtype=torch.float64)
    q = torch.quantile(ordered, torch.tensor(QUANTILES, dtype=torch.float64))
    return Timing(*(float(v) for v in q))
