"""Stage 4 of `tkernels inspect`: one row per build, and what makes a build unfit to ship."""
from __future__ import annotations

from typing import List

from .builds import TENSOR_CORE_DTYPES, Build, build_config, config_label, variant_label
from .sass import SHARED_LIMIT, ctas_per_sm

# Keys every JSON row has (tests check them).
ROW_KEYS = ("kernel", "arch", "dtype", "input_precision", "config", "config_index", "variant", "variant_index",
            "num_warps", "num_stages", "launch_warps", "registers", "spill_bytes", "shared_bytes",
            "static_shared_bytes", "ctas_per_sm", "tensor_core_ops", "hmma", "hgmma", "tma_ops", "async_copy_ops",
            "ok", "error", "problems", "cached", "compile_s")
_MEASURED = ("launch_warps", "registers", "spill_bytes", "shared_bytes", "static_shared_bytes", "tensor_core_ops",
             "hmma", "hgmma", "tma_ops", "async_copy_ops")


def _plain(values: dict) -> dict:
    """JSON-safe copy: constexprs may be triton dtypes or other objects."""
    return {k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v) for k, v in values.items()}


def tensor_cores_expected(spec, build: Build) -> bool:
    """fp16/bf16 and tf32 dots of a tensor-core kernel must run on tensor cores; exact fp32 cannot."""
    return bool(spec.tensor_cores) and (build.dtype in TENSOR_CORE_DTYPES or build.precision == "tf32")


def make_row(spec, build: Build, metrics: dict, cached: bool = False) -> dict:
    cfg = build_config(spec, build)
    variant = spec.variants[build.variant_index]
    values = {**(getattr(spec, "example_args", None) or {}), **variant, **spec.per_dtype.get(build.dtype, {})}
    if build.precision:
        values["INPUT_PRECISION"] = build.precision
    row = {
        "kernel": build.kernel, "arch": build.arch, "dtype": build.dtype,
        "input_precision": build.precision or None,
        "config": config_label(cfg), "config_index": build.config_index, "meta": _plain(cfg.kwargs),
        "variant": variant_label(variant), "variant_index": build.variant_index, "values": _plain(values),
        "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
        **{key: metrics.get(key) for key in _MEASURED},
        "tensor_cores_expected": tensor_cores_expected(spec, build),
        "error": metrics.get("error"), "cached": cached, "compile_s": metrics.get("compile_s"),
    }
    shared = None if row["shared_bytes"] is None else row["shared_bytes"] + (row["static_shared_bytes"] or 0)
    warps = row["launch_warps"] or cfg.num_warps
    row["ctas_per_sm"] = None if row["error"] else ctas_per_sm(build.arch, row["registers"], shared, warps)
    row["problems"] = problems(row)
    row["ok"] = not row["problems"]
    return row


def total_shared(row: dict) -> int:
    return (row["shared_bytes"] or 0) + (row["static_shared_bytes"] or 0)


def problems(row: dict) -> List[str]:
    """Why a build is not fit to ship: it fails to compile, spills, needs more shared memory than a
    block of its target can have (it would never launch), or (fp16/bf16/tf32 of a tensor-core spec)
    runs without tensor cores."""
    if row["error"]:
        return ["compile failed"]
    found = []
    if row["spill_bytes"]:
        found.append(f"spills ({row['spill_bytes']} B local memory per thread)")
    if total_shared(row) > SHARED_LIMIT[row["arch"]]:
        found.append(f"never launches ({total_shared(row)} B shared memory > the "
                     f"{SHARED_LIMIT[row['arch']]} B of {row['arch']})")
    if row["tensor_cores_expected"] and not row["tensor_core_ops"]:
        found.append("no tensor-core ops (HMMA/HGMMA)")
    return found

