"""Timing: CUDA events through ``triton.testing.do_bench`` on a GPU, perf_counter on the CPU.

On the CPU the providers of one case are timed side by side (:func:`time_cpu_interleaved`): rounds in
which each is called once, so that a change in the machine's load falls on all of them alike and
their ratios move much less from run to run than their absolute times.

The timed callable rotates among several input sets whose total size exceeds the L2 cache,
so a kernel cannot look fast by finding its inputs in L2 from the previous call (do_bench
also flushes L2 between calls, but CUDA-graph replays do not). Every callable is called once
before timing (compilation, autotuning) and then warmed up for ``warmup_ms``.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, List, Optional, Sequence

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
    """perf_counter around each call of one callable (see time_cpu_interleaved)."""
    return time_cpu_interleaved([call], warmup_ms, rep_ms, min_reps=min_reps)[0]


class CallFailed(Exception):
    """``calls[index]`` raised (the original exception is the cause)."""

    def __init__(self, index: int):
        super().__init__(f"call {index} failed")
        self.index = index


def time_cpu_interleaved(calls: Sequence[Callable[[], object]], warmup_ms: float, rep_ms: float,
                         contexts: Optional[Sequence[Callable[[], ContextManager]]] = None,
                         min_reps: int = 3) -> List[Timing]:
    """Median and 20/80 quantiles, in ms, of each callable, timed in rounds that call each once
    (in alternating order, so none always runs after the same other one). Warm-up lasts
    ``warmup_ms`` per callable, sampling ``rep_ms`` per callable and at least ``min_reps`` rounds
    (one if a single round already outlasts the sampling time). ``contexts[i]()`` is entered
    around each call of ``calls[i]``, outside the timed region (e.g. the tkernels backend).
    A callable that raises ends the measurement with CallFailed."""
    contexts = contexts or [contextlib.nullcontext] * len(calls)
    order = list(range(len(calls)))

    def timed(i: int) -> float:
        with contexts[i]():
            start = time.perf_counter()
            try:
                calls[i]()
            except Exception as exc:
                raise CallFailed(i) from exc
            return (time.perf_counter() - start) * 1e3

    def one_round(k: int) -> List[float]:
        ms = [0.0] * len(calls)
        for i in (order if k % 2 == 0 else order[::-1]):
            ms[i] = timed(i)
        return ms

    rounds = itertools.count()
    fastest = sum(one_round(next(rounds)))  # may include lazy initialisation, so only the fastest sets the pace
    deadline = time.perf_counter() + warmup_ms * len(calls) / 1e3
    while time.perf_counter() < deadline:
        fastest = min(fastest, sum(one_round(next(rounds))))
    budget_ms = rep_ms * len(calls)
    needed = 1 if fastest >= budget_ms else min_reps
    samples = []
    deadline = time.perf_counter() + budget_ms / 1e3
    while len(samples) < needed or time.perf_counter() < deadline:
        samples.append(one_round(next(rounds)))
    quantiles = torch.tensor(QUANTILES, dtype=torch.float64)
    q = torch.quantile(torch.tensor(samples, dtype=torch.float64), quantiles, dim=0)  # quantile x callable
    return [Timing(*(float(v) for v in q[:, i])) for i in order]
