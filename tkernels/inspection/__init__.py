"""`tkernels inspect`: compile every registered kernel ahead of time for GPU targets, with no GPU,
and measure it. One module per stage, each readable on its own:

* :mod:`.builds`: which builds a request means. Each ``KernelSpec`` (``tkernels/ops/_common.py``)
  expands into config x variant x dtype x fp32 input precision (ieee and tf32) per target;
* :mod:`.workers`: compile a build with Triton's AOT compiler in worker processes started without
  ``TRITON_INTERPRET``;
* :mod:`.sass`: read the cubin: registers, spills, shared memory, occupancy and the counts of
  tensor-core (HMMA/HGMMA), TMA (UTMALDG/UTMASTG/...) and cp.async (LDGSTS) instructions;
* :mod:`.report`: one row per build and the problems that make it unfit to ship;
* :mod:`.driver`: the cache and :func:`inspect_kernels`, which ties them together.
"""
from __future__ import annotations

from .builds import (ARCHS, CAPABILITY, DTYPES, FP32_PRECISIONS, TENSOR_CORE_DTYPES, Build, InspectError,
                     config_label, coverage_order, parse_archs, parse_dtypes, plan, precisions, registered_specs,
                     select_kernels, variant_label)
from .driver import DEFAULT_TIMEOUT_S, default_cache_dir, inspect_kernels
from .report import ROW_KEYS, make_row, problems
from .sass import SHARED_LIMIT, count_opcodes, ctas_per_sm
from .workers import compile_and_measure, default_jobs

__all__ = ["ARCHS", "CAPABILITY", "DTYPES", "FP32_PRECISIONS", "TENSOR_CORE_DTYPES", "Build", "InspectError",
           "config_label", "coverage_order", "parse_archs", "parse_dtypes", "plan", "precisions",
           "registered_specs", "select_kernels", "variant_label", "DEFAULT_TIMEOUT_S", "default_cache_dir",
           "inspect_kernels", "ROW_KEYS", "make_row", "problems", "SHARED_LIMIT", "count_opcodes", "ctas_per_sm",
           "compile_and_measure", "default_jobs"]
