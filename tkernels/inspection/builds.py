"""Stage 1 of `tkernels inspect`: which builds a request means.

A build is one compile: a kernel spec's (config, variant) for one dtype, fp32 input precision
and target. This stage runs anywhere (it needs only the registry's data, no compiler).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

ARCHS = ("sm_80", "sm_90")
CAPABILITY = {"sm_80": 80, "sm_90": 90}
DTYPES = ("fp16", "bf16", "fp32")
_DTYPE_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}
TENSOR_CORE_DTYPES = ("fp16", "bf16")
# fp32 tl.dot: torch's allow_tf32 flags choose between these at run time, so both are built.
FP32_PRECISIONS = ("ieee", "tf32")


class InspectError(ValueError):
    """A request that names no registered kernel, an unknown arch or dtype, or a broken spec."""


@dataclass(frozen=True)
class Build:
    """One compile: a kernel spec's config and variant for one dtype, input precision and target.
    ``precision`` is the INPUT_PRECISION constexpr ("ieee"/"tf32") of specs that take one, else ""."""
    kernel: str
    arch: str
    dtype: str
    config_index: int
    variant_index: int
    precision: str = ""


def registered_specs() -> Dict[str, object]:
    from ..ops import _common  # importing the ops package registers every family's specs
    return _common.KERNEL_SPECS


def parse_archs(values: Optional[Iterable[str]]) -> List[str]:
    archs: List[str] = []
    for value in values or ARCHS:
        for item in str(value).split(","):
            item = item.strip().lower()
            if not item:
                continue
            arch = item if item.startswith("sm_") else "sm_" + item.replace("sm", "")
            if arch not in CAPABILITY:
                raise InspectError(f"unknown arch {item!r}; expected one of {', '.join(ARCHS)} "
                                   f"(e.g. --arch sm_80,sm_90)")
            if arch not in archs:
                archs.append(arch)
    if not archs:
        raise InspectError(f"no arch given; expected some of {', '.join(ARCHS)}")
    return archs


def parse_dtypes(values: Optional[Iterable[str]]) -> Optional[List[str]]:
    if not values:
        return None
    dtypes: List[str] = []
    for value in values:
        for item in str(value).split(","):
            item = item.strip().lower()
            if not item:
                continue
            dtype = _DTYPE_ALIASES.get(item, item)
            if dtype not in DTYPES:
                raise InspectError(f"unknown dtype {item!r}; expected one of {', '.join(DTYPES)}")
            if dtype not in dtypes:
                dtypes.append(dtype)
    return dtypes or None


def select_kernels(specs: Dict[str, object], patterns: Optional[Iterable[str]]) -> List[str]:
    """Names matching the patterns (exact names or shell globs such as ``conv*``), sorted."""
    names = sorted(specs)
    if not patterns:
        return names
    chosen = set()
    for pattern in patterns:
        for item in str(pattern).split(","):
            item = item.strip()
            if not item:
                continue
            hits = [n for n in names if fnmatch.fnmatchcase(n, item)]
            if not hits:
                raise InspectError(f"no registered kernel matches {item!r}; registered kernels: "
                                   f"{', '.join(names) or '(none)'}")
            chosen.update(hits)
    return sorted(chosen)


def precisions(spec, dtype: str) -> Tuple[str, ...]:
    """The INPUT_PRECISION values a default call can reach for this dtype ("" if the kernel has none)."""
    if not getattr(spec, "input_precision", False):
        return ("",)
    return FP32_PRECISIONS if dtype == "fp32" else ("ieee",)


def build_configs(spec, build: Build) -> list:
    """The config list a build indexes (fp32 precisions may have their own)."""
    return spec.configs(build.arch, build.dtype, build.precision)


def build_config(spec, build: Build):
    return build_configs(spec, build)[build.config_index]


def plan(specs: Dict[str, object], kernels: Sequence[str], archs: Sequence[str],
         dtypes: Optional[Sequence[str]] = None) -> List[Build]:
    builds = []
    for name in kernels:
        spec = specs[name]
        wanted = [d for d in spec.dtypes if dtypes is None or d in dtypes]
        for arch in archs:
            if arch not in spec.configs_by_arch:
                continue  # a kernel for other targets only (e.g. TMA on sm_90)
            if not spec.configs_by_arch[arch]:
                raise InspectError(f"kernel spec {name!r} has an empty config list for {arch}")
            for dtype in wanted:
                for precision in precisions(spec, dtype):
                    configs = spec.configs(arch, dtype, precision)
                    for ci in range(len(configs)):
                        builds.extend(Build(name, arch, dtype, ci, vi, precision) for vi in range(len(spec.variants)))
    return builds


def config_label(cfg) -> str:
    parts = [f"{k}={v}" for k, v in cfg.kwargs.items()]
    parts.append(f"w{cfg.num_warps}")
    parts.append(f"s{cfg.num_stages}")
    if getattr(cfg, "num_ctas", 1) not in (None, 1):
        parts.append(f"ctas{cfg.num_ctas}")
    if getattr(cfg, "maxnreg", None):
        parts.append(f"maxnreg{cfg.maxnreg}")
    return " ".join(parts)


def variant_label(variant: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in variant.items()) or "-"


def estimated_cost(spec, build: Build) -> float:
    """Rough compile cost, to start the slowest builds first (better packing across workers)."""
    cfg = build_config(spec, build)
    tile = 1
    for k, v in cfg.kwargs.items():
        if "BLOCK" in k and isinstance(v, int) and v > 0:
            tile *= v
    return tile * cfg.num_warps * max(1, cfg.num_stages) * (1.5 if build.arch == "sm_90" else 1.0)


def _flavour(b: Build) -> Tuple[str, str]:
    return (b.dtype, b.precision)


def coverage_order(specs, builds: Sequence[Build]) -> List[Tuple[int, Build]]:
    """(tier, build) pairs in the order that makes any prefix cover as much as it can.

    A flavour is a (dtype, input precision) pair. Per kernel x arch: tier 0 is one build, the
    costliest config with the first variant in bf16 (the dtype the interpreter cannot check)
    where the spec has it; tier 1 adds every config (in both fp16 and bf16 for tensor-core
    kernels), variants and flavours rotating; tier 2 every remaining variant and flavour; tier 3
    the rest. Kernels are interleaved within a tier.
    """
    groups: Dict[Tuple[str, str], Dict[Tuple[int, int, Tuple[str, str]], Build]] = {}
    for b in builds:
        groups.setdefault((b.kernel, b.arch), {})[(b.config_index, b.variant_index, _flavour(b))] = b
    tiers: List[List[List[Build]]] = [[], [], [], []]
    for (kernel, arch), by_axes in groups.items():
        spec = specs[kernel]
        chosen: List[List[Build]] = [[], [], [], []]
        taken = set()

        def take(tier: int, build: Optional[Build]) -> None:
            if build is not None and build not in taken:
                taken.add(build)
                chosen[tier].append(build)

        members = list(by_axes.values())
        flavours = sorted({_flavour(b) for b in members},
                          key=lambda f: (f[0] != "bf16", f[0] not in DTYPES, f[0], f[1]))
        variants = sorted({b.variant_index for b in members})
        heaviest = max(members, key=lambda b: (estimated_cost(spec, b), -b.variant_index, b.dtype == "bf16"))
        take(0, by_axes.get((heaviest.config_index, variants[0], flavours[0]), heaviest))
        # tier 1: every config of every config list; tensor-core kernels in each half dtype, other
        # flavours sharing a list take turns
        tc_flavours = [f for f in flavours if f[0] in TENSOR_CORE_DTYPES] if spec.tensor_cores else []
        by_list: Dict[Tuple[str, ...], List[Tuple[str, str]]] = {}
        for f in flavours:
            by_list.setdefault(tuple(map(config_label, spec.configs(arch, *f))), []).append(f)
        for labels, sharing in by_list.items():
            turns = [f for f in sharing if f in tc_flavours]
            for ci in range(len(labels)):
                for j, f in enumerate(turns or [sharing[ci % len(sharing)]]):
                    take(1, by_axes.get((ci, variants[(ci + j) % len(variants)], f)))
        for vi in variants:
            if not any(b.variant_index == vi for b in taken):
                take(2, next(b for b in members if b.variant_index == vi))
        for f in flavours:
            if not any(_flavour(b) == f for b in taken):
                take(2, next(b for b in members if _flavour(b) == f))
        for b in members:
            take(3, b)
        for tier in range(4):
            tiers[tier].append(chosen[tier])
    ordered: List[Tuple[int, Build]] = []
    for tier, lists in enumerate(tiers):
        if tier == 0:  # one build per group: the slowest first, so the workers finish together
            flat = sorted((group[0] for group in lists if group), key=lambda b: -estimated_cost(specs[b.kernel], b))
            ordered.extend((0, b) for b in flat)
            continue
        for k in range(max((len(group) for group in lists), default=0)):
            ordered.extend((tier, group[k]) for group in lists if k < len(group))
    return ordered
