"""CPU thread counts for torch and NumPy's BLAS, pinned for the length of a run.

`tkernels train` and `tkernels bench` use one thread each by default on the CPU: at the sizes they
run, thread hand-offs cost more than they save, and on a shared or loaded machine a multithreaded
pool makes timings swing by orders of magnitude. threadpoolctl (installed with scikit-learn)
reaches NumPy's BLAS; without it only torch is pinned and the BLAS count is reported as unknown.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import torch


def blas_threads() -> Optional[int]:
    """The largest thread count among the BLAS libraries loaded in this process (None: unknown)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    counts = [info["num_threads"] for info in threadpool_info() if info.get("user_api") == "blas"]
    return max(counts) if counts else None


def thread_counts() -> Dict[str, Optional[int]]:
    return {"torch_threads": torch.get_num_threads(), "blas_threads": blas_threads()}


@contextlib.contextmanager
def cpu_threads(threads: int) -> Iterator[Dict[str, Optional[int]]]:
    """Within the block torch and NumPy's BLAS use ``threads`` threads each (0 or less: leave the
    libraries' defaults); restored afterwards. Yields the counts in force (see thread_counts)."""
    if threads <= 0:
        yield thread_counts()
        return
    import numpy  # noqa: F401  (loads NumPy's BLAS, so that threadpoolctl can find it)

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            yield thread_counts()
        else:
            with threadpool_limits(limits=threads, user_api="blas"):
                yield thread_counts()
    finally:
        torch.set_num_threads(previous)
