"""Compile every registered kernel ahead of time for GPU targets, with no GPU, and measure it.

Each ``KernelSpec`` (``tkernels/ops/_common.py``) expands into builds: config x variant x dtype
for each target architecture. A build is compiled with Triton's AOT compiler
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80|90, 32))``) and its cubin is read
with the CUDA tools shipped in the triton wheel:

* ``cuobjdump --dump-resource-usage``: registers per thread and local memory (STACK/LOCAL);
  local memory above zero means ptxas spilled registers;
* ``nvdisasm``: the SASS, where tensor-core instructions are counted (``HMMA`` is mma.sync,
  on sm_80 and on sm_90 for small tiles; ``HGMMA`` is Hopper's wgmma);
* ``metadata.shared``: the dynamic shared memory Triton launches the kernel with.

Arguments are specialised as the JIT specialises a typical launch: pointers are 16-byte aligned
(torch's allocations are), and the spec's ``example_args`` (sizes, strides) follow the JIT's rule,
1 becoming a constant and multiples of 16 being marked divisible by 16. Unit strides and aligned
sizes are what let loads vectorise, so the registers and spills reported are those a GPU run gets.

Compiling needs a process in which ``@triton.jit`` made real JIT functions, i.e. one started
without ``TRITON_INTERPRET``. So compiles always run in worker subprocesses started with that
variable removed; they also isolate a crashing compiler from the caller. Results are cached on
disk, keyed by the kernel's Triton source hash (which covers the device functions it calls),
signature, constexprs, target, options and the triton version.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import queue
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, TextIO, Tuple

ARCHS = ("sm_80", "sm_90")
CAPABILITY = {"sm_80": 80, "sm_90": 90}
# Largest shared memory one block can opt into: A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB.
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
DTYPES = ("fp16", "bf16", "fp32")
_DTYPE_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}
TENSOR_CORE_DTYPES = ("fp16", "bf16")
CACHE_VERSION = 1
DEFAULT_TIMEOUT_S = 600.0
STARTUP_TIMEOUT_S = 300.0

# Keys every JSON row has (tests check them).
ROW_KEYS = ("kernel", "arch", "dtype", "config", "config_index", "variant", "variant_index", "num_warps",
            "num_stages", "registers", "spill_bytes", "shared_bytes", "static_shared_bytes", "tensor_core_ops",
            "hmma", "hgmma", "ok", "error", "problems", "warnings", "cached", "compile_s")


class InspectError(ValueError):
    """A request that names no registered kernel, an unknown arch or dtype, or a broken spec."""


@dataclass(frozen=True)
class Build:
    """One compile: a kernel spec's config and variant for one dtype and target."""
    kernel: str
    arch: str
    dtype: str
    config_index: int
    variant_index: int


# ---------------------------------------------------------------------------------------------
# Planning: which builds a request means (runs anywhere; needs only the registry's data)
# ---------------------------------------------------------------------------------------------
def registered_specs() -> Dict[str, object]:
    from .ops import _common  # importing the ops package registers every family's specs
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


def plan(specs: Dict[str, object], kernels: Sequence[str], archs: Sequence[str],
         dtypes: Optional[Sequence[str]] = None) -> List[Build]:
    builds = []
    for name in kernels:
        spec = specs[name]
        wanted = [d for d in spec.dtypes if dtypes is None or d in dtypes]
        for arch in archs:
            configs = spec.configs_by_arch.get(arch)
            if not configs:
                raise InspectError(f"kernel spec {name!r} has no configs for {arch}; configs_by_arch has "
                                   f"{', '.join(spec.configs_by_arch) or 'nothing'}")
            for ci in range(len(configs)):
                for vi in range(len(spec.variants)):
                    builds.extend(Build(name, arch, d, ci, vi) for d in wanted)
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


def _estimated_cost(spec, build: Build) -> float:
    """Rough compile cost, to start the slowest builds first (better packing across workers)."""
    cfg = spec.configs_by_arch[build.arch][build.config_index]
    tile = 1
    for k, v in cfg.kwargs.items():
        if "BLOCK" in k and isinstance(v, int) and v > 0:
            tile *= v
    return tile * cfg.num_warps * max(1, cfg.num_stages) * (1.5 if build.arch == "sm_90" else 1.0)


def coverage_order(specs, builds: Sequence[Build]) -> List[Tuple[int, Build]]:
    """(tier, build) pairs in the order that makes any prefix cover as much as it can.

    Per kernel x arch: tier 0 is one build, the costliest config with the first variant in bf16
    (the dtype the interpreter cannot check) where the spec has it; tier 1 adds every config
    (in both fp16 and bf16 for tensor-core kernels), variants and dtypes rotating; tier 2 every
    remaining variant and dtype; tier 3 the rest. Kernels are interleaved within a tier.
    """
    groups: Dict[Tuple[str, str], Dict[Tuple[int, int, str], Build]] = {}
    for b in builds:
        groups.setdefault((b.kernel, b.arch), {})[(b.config_index, b.variant_index, b.dtype)] = b
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
        dtypes = sorted({b.dtype for b in members}, key=lambda d: (d != "bf16", d not in DTYPES, d))
        variants = sorted({b.variant_index for b in members})
        configs = sorted({b.config_index for b in members})
        heaviest = max(members, key=lambda b: (_estimated_cost(spec, b), -b.variant_index, b.dtype == "bf16"))
        take(0, by_axes.get((heaviest.config_index, variants[0], dtypes[0]), heaviest))
        tc_dtypes = [d for d in dtypes if d in TENSOR_CORE_DTYPES] if spec.tensor_cores else []
        for i, ci in enumerate(configs):
            for j, dt in enumerate(tc_dtypes or [dtypes[i % len(dtypes)]]):
                take(1, by_axes.get((ci, variants[(i + j) % len(variants)], dt)))
        for vi in variants:
            if not any(b.variant_index == vi for b in taken):
                take(2, next(b for b in members if b.variant_index == vi))
        for dt in dtypes:
            if not any(b.dtype == dt for b in taken):
                take(2, next(b for b in members if b.dtype == dt))
        for b in members:
            take(3, b)
        for tier in range(4):
            tiers[tier].append(chosen[tier])
    ordered: List[Tuple[int, Build]] = []
    for tier, lists in enumerate(tiers):
        if tier == 0:  # one build per group: the slowest first, so the workers finish together
            flat = sorted((group[0] for group in lists if group), key=lambda b: -_estimated_cost(specs[b.kernel], b))
            ordered.extend((0, b) for b in flat)
            continue
        for k in range(max((len(group) for group in lists), default=0)):
            ordered.extend((tier, group[k]) for group in lists if k < len(group))
    return ordered


# ---------------------------------------------------------------------------------------------
# Compile side: only valid where spec.kernel is a real triton.JITFunction
# ---------------------------------------------------------------------------------------------
def _compile_inputs(spec, build: Build):
    """(fn, signature, constexprs, indices of 16-divisible args, options) for ASTSource/compile."""
    fn = spec.kernel
    params = getattr(fn, "params", None)
    if params is None:
        raise InspectError(f"{spec.name}: kernel is not a triton.JITFunction ({type(fn).__name__}); "
                           "compile in a process started without TRITON_INTERPRET")
    cfg = spec.configs_by_arch[build.arch][build.config_index]
    given = dict(getattr(spec, "example_args", None) or {})
    given.update(spec.variants[build.variant_index])
    given.update(spec.per_dtype.get(build.dtype, {}))
    given.update(cfg.kwargs)
    names = [p.name for p in params]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise InspectError(f"{spec.name}: {unknown} are not parameters of {fn.__name__}")
    extra = sorted(set(spec.signature) - set(names))
    if extra:
        raise InspectError(f"{spec.name}: signature names {extra}, which are not parameters of {fn.__name__}")
    signature, constexprs, divisible = {}, {}, []
    for i, p in enumerate(params):
        declared = spec.signature.get(p.name)
        if p.is_constexpr or declared == "constexpr":
            if p.name in given:
                constexprs[p.name] = given[p.name]
            elif p.has_default:
                constexprs[p.name] = p.default
            else:
                raise InspectError(f"{spec.name}: constexpr {p.name} is set by no variant, per_dtype entry "
                                   f"or config of {build.arch}")
            signature[p.name] = "constexpr"
            continue
        if declared is None:
            raise InspectError(f"{spec.name}: signature has no type for argument {p.name}")
        ty = declared.replace("{dtype}", build.dtype)
        if ty.startswith("*"):
            if p.name in given:
                raise InspectError(f"{spec.name}: {p.name} is a pointer; example values are for integer arguments")
            signature[p.name] = ty
            divisible.append(i)  # torch allocations are 16-byte aligned, and the JIT says so
            continue
        value = given.get(p.name)
        if value is not None and not (ty[0] in "iu" and isinstance(value, int) and not isinstance(value, bool)):
            raise InspectError(f"{spec.name}: example value {value!r} for {p.name} ({ty}); only integer "
                               "arguments take example values")
        # the JIT's own rule: 1 becomes a constant, multiples of 16 are marked divisible by 16
        if value == 1 and not getattr(p, "do_not_specialize", False):
            signature[p.name] = "constexpr"
            constexprs[p.name] = 1
            continue
        signature[p.name] = ty
        if (value is not None and value % 16 == 0 and not getattr(p, "do_not_specialize", False)
                and not getattr(p, "do_not_specialize_on_alignment", False)):
            divisible.append(i)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if getattr(cfg, "num_ctas", 1) not in (None, 1):
        options["num_ctas"] = cfg.num_ctas
    if getattr(cfg, "maxnreg", None):
        options["maxnreg"] = cfg.maxnreg
    return fn, signature, constexprs, divisible, options


def build_key(spec, build: Build) -> str:
    import triton
    fn, signature, constexprs, divisible, options = _compile_inputs(spec, build)
    payload = {
        "cache_version": CACHE_VERSION, "triton": triton.__version__, "source": fn.cache_key,
        "fn": fn.__name__, "signature": signature, "constexprs": {k: repr(v) for k, v in constexprs.items()},
        "divisible_by_16": divisible, "arch": build.arch, "options": options,
        "fp_fusion": os.environ.get("TRITON_DEFAULT_FP_FUSION", ""),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _divisibility_attrs(indices: List[int]):
    """16-byte divisibility for these argument indices, in this triton's attrs format."""
    try:  # triton 3.2: an AttrsDescriptor object
        from triton.backends.compiler import AttrsDescriptor
    except ImportError:
        AttrsDescriptor = None
    if AttrsDescriptor is not None and hasattr(AttrsDescriptor, "from_hints"):
        return AttrsDescriptor.from_hints({i: 16 for i in indices})
    return {(i,): [["tt.divisibility", 16]] for i in indices}  # triton >= 3.3


def _tool(name: str) -> str:
    import triton
    candidates = [os.environ.get(f"TRITON_{name.upper()}_PATH", ""),
                  str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name),
                  shutil.which(name) or ""]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise RuntimeError(f"{name} not found (looked in the triton wheel's backends/nvidia/bin and on PATH)")


_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_MMA_PTX = re.compile(r"\b(mma\.sync|wgmma\.mma_async)\b")
_HMMA = re.compile(r"\bHMMA\.")
_HGMMA = re.compile(r"\bHGMMA\.")


def measure_cubin(cubin: bytes, ptx: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="tkernels-inspect-") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
        found = [tuple(int(x) for x in m.groups()) for m in _RESOURCE.finditer(usage)]
        if not found:
            raise RuntimeError(f"cuobjdump printed no resource usage:\n{usage}")
        regs = max(f[0] for f in found)
        stack = max(f[1] for f in found)
        static_shared = max(f[2] for f in found)
        local = max(f[3] for f in found)
        hmma = hgmma = 0
        if _MMA_PTX.search(ptx):  # no mma in the PTX means no tensor-core op in the SASS: skip nvdisasm
            sass = subprocess.run([_tool("nvdisasm"), path], capture_output=True, text=True, check=True).stdout
            hmma = len(_HMMA.findall(sass))
            hgmma = len(_HGMMA.findall(sass))
    return {"registers": regs, "spill_bytes": stack + local, "static_shared_bytes": static_shared,
            "hmma": hmma, "hgmma": hgmma, "tensor_core_ops": hmma + hgmma}


def compile_and_measure(spec, build: Build) -> dict:
    """Compile one build for its target and measure it; compile errors come back as ``error``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    try:
        fn, signature, constexprs, divisible, options = _compile_inputs(spec, build)
        src = ASTSource(fn, signature, constexprs, _divisibility_attrs(divisible))
        compiled = triton.compile(src, target=GPUTarget("cuda", CAPABILITY[build.arch], 32), options=options)
        metrics = measure_cubin(compiled.asm["cubin"], compiled.asm["ptx"])
        metrics["shared_bytes"] = int(compiled.metadata.shared)
        metrics["error"] = None
    except Exception as exc:  # noqa: BLE001 - any compiler failure is a result to report, not a crash
        metrics = {"error": f"{type(exc).__name__}: {exc}".strip()}
    metrics["compile_s"] = round(time.perf_counter() - start, 3)
    return metrics


def _worker_main() -> None:
    """Serve compile requests, one JSON line in and one out, until stdin closes."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints (triton dumps the PTX when ptxas fails) must not corrupt the protocol
    specs = registered_specs()
    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "keys":
            answer = {"keys": [_key_or_error(specs, Build(**b)) for b in request["builds"]]}
        else:
            build = Build(**request["build"])
            answer = {"result": compile_and_measure(specs[build.kernel], build)}
        protocol.write(json.dumps(answer) + "\n")


def _key_or_error(specs, build: Build) -> List[Optional[str]]:
    try:
        return [build_key(specs[build.kernel], build), None]
    except Exception as exc:  # noqa: BLE001
        return [None, f"{type(exc).__name__}: {exc}"]


# ---------------------------------------------------------------------------------------------
# Workers: subprocesses without TRITON_INTERPRET
# ---------------------------------------------------------------------------------------------
class _WorkerFailed(RuntimeError):
    pass


class _Worker:
    def __init__(self):
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tkernels.inspection import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env, text=True,
            start_new_session=True)  # its own process group, so a timeout also ends its ptxas
        self.ready = False

    def _answer(self, timeout: float, what: str) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.kill()
            raise _WorkerFailed(f"{what} timed out after {timeout:g} s")
        line = self.proc.stdout.readline()
        if not line:
            raise _WorkerFailed(self._death_note())
        return json.loads(line)

    def request(self, message: dict, timeout: float) -> dict:
        if not self.ready:  # importing torch, triton and the kernels: not part of any build's time
            self._answer(max(timeout, STARTUP_TIMEOUT_S), "starting the worker")
            self.ready = True
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except OSError:
            raise _WorkerFailed(self._death_note()) from None
        return self._answer(timeout, message["op"])

    def _death_note(self) -> str:
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
            code = "killed"
        self.log.seek(0)
        tail = self.log.read()[-2000:].strip()
        return f"compile worker exited ({code}); its stderr ends with:\n{tail}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Let the worker exit (end of its stdin) and release the pipes; kill it if it lingers."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()
        self.proc.stdout.close()
        self.log.close()


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    if os.environ.get("TKERNELS_CACHE_DIR"):
        return Path(os.environ["TKERNELS_CACHE_DIR"]) / "inspect"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tkernels" / "inspect"


def _cache_read(cache_dir: Optional[Path], key: str) -> Optional[dict]:
    if cache_dir is None:
        return None
    try:
        with open(cache_dir / f"{key}.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _cache_write(cache_dir: Optional[Path], key: str, metrics: dict) -> None:
    if cache_dir is None or metrics.get("error"):
        return  # failures are recompiled every time: they may come from the environment
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(metrics, f)
        os.replace(tmp, cache_dir / f"{key}.json")
    except OSError:
        pass  # a read-only cache only costs speed


# ---------------------------------------------------------------------------------------------
# Progress on stderr
# ---------------------------------------------------------------------------------------------
class _Progress:
    def __init__(self, total: int, stream: Optional[TextIO]):
        self.total, self.done, self.stream = total, 0, stream
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.next_report = 0.1
        self.lock = threading.Lock()

    def note(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write(f"tkernels inspect: {text}\n")
            self.stream.flush()

    def step(self, what: str) -> None:
        with self.lock:
            self.done += 1
            if self.stream is None:
                return
            elapsed = time.perf_counter() - self.start
            if self.tty:
                line = f"[{self.done}/{self.total}] {elapsed:5.0f} s  {what}"
                self.stream.write("\r\033[K" + line + ("\n" if self.done == self.total else ""))
            elif self.done / max(1, self.total) >= self.next_report or self.done == self.total:
                self.stream.write(f"tkernels inspect: {self.done}/{self.total} builds done after {elapsed:.0f} s\n")
                self.next_report = self.done / self.total + 0.1
            self.stream.flush()


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------
def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class _Pool:
    """Up to ``size`` compile workers, started on demand, serving one queue of builds."""

    def __init__(self, size: int, timeout: float):
        self.size, self.timeout = size, timeout
        self.idle: List[_Worker] = []
        self.started: List[_Worker] = []
        self.lock = threading.Lock()
        self.stopped = False

    def _take(self) -> _Worker:
        with self.lock:
            if self.idle:
                return self.idle.pop()
        worker = _Worker()
        with self.lock:
            self.started.append(worker)
        return worker

    def keys(self, specs, builds: List[Build]) -> List[List[Optional[str]]]:
        """[key, error] per build: here if this process holds real JIT functions, else in a worker."""
        if all(hasattr(specs[b.kernel].kernel, "cache_key") for b in builds):
            return [_key_or_error(specs, b) for b in builds]
        worker = self._take()
        try:
            answer = worker.request({"op": "keys", "builds": [asdict(b) for b in builds]}, self.timeout)
        except _WorkerFailed as exc:
            raise RuntimeError(f"a compile worker could not compute the cache keys: {exc}") from None
        self.idle.append(worker)
        return answer["keys"]

    def compile(self, builds: List[Build], done: Callable[[Build, dict], None],
                deadline: Optional[float] = None, required: frozenset = frozenset()) -> List[Build]:
        """Compile in order; after ``deadline`` (perf_counter) only ``required`` builds start.
        Returns the builds left out."""
        todo: "queue.Queue[Build]" = queue.Queue()
        for build in builds:
            todo.put(build)
        left_out: List[Build] = []

        def serve() -> None:
            worker = None
            while not self.stopped:
                try:
                    build = todo.get_nowait()
                except queue.Empty:
                    break
                if deadline is not None and build not in required and time.perf_counter() > deadline:
                    left_out.append(build)
                    continue
                try:
                    worker = worker or self._take()
                    metrics = worker.request({"op": "compile", "build": asdict(build)}, self.timeout)["result"]
                except _WorkerFailed as exc:  # crash or timeout: report it and go on with a fresh worker
                    metrics = {"error": f"compile worker failed: {exc}", "compile_s": None}
                    worker.kill()
                    worker = None
                done(build, metrics)

        threads = [threading.Thread(target=serve, daemon=True) for _ in range(min(self.size, len(builds)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return left_out

    def close(self, kill: bool = False) -> None:
        self.stopped = True
        for worker in self.started:
            if kill:
                worker.kill()
            worker.close()


def inspect_kernels(kernels: Optional[Iterable[str]] = None, archs: Optional[Iterable[str]] = None,
                    dtypes: Optional[Iterable[str]] = None, jobs: Optional[int] = None,
                    cache_dir: Optional[Path] = None, use_cache: bool = True,
                    timeout: float = DEFAULT_TIMEOUT_S, progress: Optional[TextIO] = None,
                    stats: Optional[dict] = None, budget_s: Optional[float] = None,
                    always: Optional[Callable[[Build], bool]] = None) -> List[dict]:
    """Compile and measure every build of the selected kernels; returns one row (dict) per build.

    ``kernels`` are names or globs (default: all registered), ``archs`` e.g. ["sm_80", "sm_90"],
    ``dtypes`` a subset of fp16/bf16/fp32. Raises InspectError for a bad request, before any
    compile. ``stats``, if given, receives the counts of cached, compiled and left-out builds.

    With ``budget_s``, builds are compiled in ``coverage_order`` and none starts after that many
    seconds, except tier 0 (one per kernel x arch) and those ``always(build)`` is true for; the
    builds left out are not in the result. Cached builds are always in it (they cost nothing).
    """
    started = time.perf_counter()
    specs = registered_specs()
    arch_list = parse_archs(archs)
    dtype_list = parse_dtypes(dtypes)
    names = select_kernels(specs, kernels)
    jobs = default_jobs() if jobs is None else int(jobs)
    if jobs < 1:
        raise InspectError(f"--jobs must be at least 1, got {jobs}")
    builds = plan(specs, names, arch_list, dtype_list)
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) if use_cache else None
    prog = _Progress(len(builds), progress)

    pool = _Pool(jobs, timeout)
    try:
        keys = pool.keys(specs, builds) if builds else []
        key_of = {b: k for b, (k, _) in zip(builds, keys)}
        metrics_by_key: Dict[str, dict] = {}
        failed: Dict[Build, dict] = {}
        pending: Dict[str, Build] = {}  # one compile per distinct key: identical builds are compiled once
        for build, (key, error) in zip(builds, keys):
            if key is None:
                failed[build] = {"error": error, "compile_s": 0.0}
            elif key not in metrics_by_key and key not in pending:
                hit = _cache_read(cache, key)
                if hit is not None:
                    metrics_by_key[key] = hit
                else:
                    pending[key] = build
        cached_keys = set(metrics_by_key)
        prog.done = sum(1 for b in builds if b in failed or key_of[b] in cached_keys)
        if prog.done:
            prog.note(f"{prog.done} of {len(builds)} builds answered from the cache ({cache}) or refused")
        if pending:
            prog.note(f"compiling {len(pending)} distinct builds on {min(jobs, len(pending))} worker(s)")
        copies = Counter(key_of[b] for b in builds if key_of[b] in pending)

        def done(build: Build, metrics: dict) -> None:
            key = key_of[build]
            _cache_write(cache, key, metrics)
            metrics_by_key[key] = metrics
            for _ in range(copies[key]):
                prog.step(f"{build.kernel} {build.arch} {build.dtype} config {build.config_index} "
                          f"variant {build.variant_index} ({metrics.get('compile_s') or 0:.1f} s)")

        if budget_s is None:  # slowest first, so that the last builds to finish are short ones
            order = sorted(pending.values(), key=lambda b: -_estimated_cost(specs[b.kernel], b))
            left_out = pool.compile(order, done)
        else:
            tiers = coverage_order(specs, list(pending.values()))
            required = frozenset(b for tier, b in tiers if tier == 0 or (always is not None and always(b)))
            order = sorted((b for _, b in tiers), key=lambda b: b not in required)  # stable: keeps coverage order
            left_out = pool.compile(order, done, deadline=time.perf_counter() + budget_s, required=required)
            if left_out:
                prog.note(f"budget of {budget_s:.0f} s spent: {len(left_out)} builds left out")
    except BaseException:  # Ctrl-C included: end the workers (and their ptxas) now
        pool.close(kill=True)
        raise
    pool.close()

    rows = [make_row(specs[b.kernel], b, failed.get(b) or metrics_by_key[key_of[b]], cached=key_of[b] in cached_keys)
            for b in builds if b in failed or key_of[b] in metrics_by_key]
    if stats is not None:
        stats.update(builds=len(builds), cached=sum(r["cached"] for r in rows),
                     compiled=len(pending) - len(left_out), left_out=len(builds) - len(rows),
                     jobs=min(jobs, len(pending)), wall_s=time.perf_counter() - started,
                     archs=arch_list, cache_dir=str(cache) if cache else None)
    return rows


def _plain(values: dict) -> dict:
    """JSON-safe copy: constexprs may be triton dtypes or other objects."""
    return {k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v) for k, v in values.items()}


def make_row(spec, build: Build, metrics: dict, cached: bool = False) -> dict:
    cfg = spec.configs_by_arch[build.arch][build.config_index]
    variant = spec.variants[build.variant_index]
    row = {
        "kernel": build.kernel, "arch": build.arch, "dtype": build.dtype,
        "config": config_label(cfg), "config_index": build.config_index, "meta": _plain(cfg.kwargs),
        "variant": variant_label(variant), "variant_index": build.variant_index,
        "values": _plain({**(getattr(spec, "example_args", None) or {}), **variant,
                              **spec.per_dtype.get(build.dtype, {})}),
        "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
        "registers": metrics.get("registers"), "spill_bytes": metrics.get("spill_bytes"),
        "shared_bytes": metrics.get("shared_bytes"), "static_shared_bytes": metrics.get("static_shared_bytes"),
        "tensor_core_ops": metrics.get("tensor_core_ops"), "hmma": metrics.get("hmma"), "hgmma": metrics.get("hgmma"),
        "tensor_cores_expected": bool(spec.tensor_cores) and build.dtype in TENSOR_CORE_DTYPES,
        "error": metrics.get("error"), "cached": cached, "compile_s": metrics.get("compile_s"),
    }
    row["problems"], row["warnings"] = problems(row), warnings(row)
    row["ok"] = not row["problems"]
    return row


def problems(row: dict) -> List[str]:
    """Why a build is not fit to ship: it fails to compile, spills, or (fp16/bf16 of a tensor-core
    spec) runs without tensor cores."""
    if row["error"]:
        return ["compile failed"]
    found = []
    if row["spill_bytes"]:
        found.append(f"spills ({row['spill_bytes']} B local memory per thread)")
    if row["tensor_cores_expected"] and not row["tensor_core_ops"]:
        found.append("no tensor-core ops (HMMA/HGMMA)")
    return found


def warnings(row: dict) -> List[str]:
    """What does not fail the build but wastes it: a config that needs more shared memory than a
    block of its target can have never launches; the autotuner skips it (OutOfResources)."""
    shared = (row["shared_bytes"] or 0) + (row["static_shared_bytes"] or 0)
    if row["error"] or shared <= SHARED_LIMIT[row["arch"]]:
        return []
    return [f"never launches: {shared} B shared memory > the {SHARED_LIMIT[row['arch']]} B of {row['arch']}"]
