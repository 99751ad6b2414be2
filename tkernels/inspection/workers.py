"""Stage 2 of `tkernels inspect`: compile builds, in worker processes.

A build is compiled with Triton's AOT compiler
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80|90, 32))``) and measured by
:mod:`.sass`. Arguments are specialised as the JIT specialises a typical launch: pointers are
16-byte aligned (torch's allocations are), and the spec's ``example_args`` (sizes, strides) follow
the JIT's rule, 1 becoming a constant and multiples of 16 being marked divisible by 16. Unit
strides and aligned sizes are what let loads vectorise, so the registers and spills reported are
those a GPU run gets. fp32 builds of kernels with an INPUT_PRECISION constexpr are compiled once
per precision ("ieee" and "tf32"): torch's allow_tf32 flags choose between them at run time.

Compiling needs a process in which ``@triton.jit`` made real JIT functions, i.e. one started
without ``TRITON_INTERPRET``. So compiles always run in worker subprocesses started with that
variable removed; they also isolate a crashing compiler from the caller.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from typing import Callable, List, Optional

from .builds import CAPABILITY, Build, InspectError, build_config, registered_specs
from .sass import measure_cubin

CACHE_VERSION = 2
STARTUP_TIMEOUT_S = 300.0


def compile_inputs(spec, build: Build):
    """(fn, signature, constexprs, indices of 16-divisible args, options) for ASTSource/compile."""
    fn = spec.kernel
    params = getattr(fn, "params", None)
    if params is None:
        raise InspectError(f"{spec.name}: kernel is not a triton.JITFunction ({type(fn).__name__}); "
                           "compile in a process started without TRITON_INTERPRET")
    cfg = build_config(spec, build)
    given = dict(getattr(spec, "example_args", None) or {})
    given.update(spec.variants[build.variant_index])
    given.update(spec.per_dtype.get(build.dtype, {}))
    if build.precision:
        given["INPUT_PRECISION"] = build.precision
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
    fn, signature, constexprs, divisible, options = compile_inputs(spec, build)
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


def compile_and_measure(spec, build: Build) -> dict:
    """Compile one build for its target and measure it; compile errors come back as ``error``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    try:
        fn, signature, constexprs, divisible, options = compile_inputs(spec, build)
        src = ASTSource(fn, signature, constexprs, _divisibility_attrs(divisible))
        compiled = triton.compile(src, target=GPUTarget("cuda", CAPABILITY[build.arch], 32), options=options)
        metrics = measure_cubin(compiled.asm["cubin"])
        metrics["shared_bytes"] = int(compiled.metadata.shared)
        # warp specialisation adds warp groups: occupancy counts the warps that launch
        metrics["launch_warps"] = int(getattr(compiled.metadata, "num_warps", options["num_warps"]))
        metrics["error"] = None
    except Exception as exc:  # noqa: BLE001 - any compiler failure is a result to report, not a crash
        metrics = {"error": f"{type(exc).__name__}: {exc}".strip()}
    metrics["compile_s"] = round(time.perf_counter() - start, 3)
    return metrics


def worker_main() -> None:
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
# Workers: subprocesses without TRITON_INTERPRET, and a pool of them
# ---------------------------------------------------------------------------------------------
class WorkerFailed(RuntimeError):
    pass


class Worker:
    def __init__(self):
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tkernels.inspection.workers import worker_main; worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env, text=True,
            start_new_session=True)  # its own process group, so a timeout also ends its ptxas
        self.ready = False

    def _answer(self, timeout: float, what: str) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.kill()
            raise WorkerFailed(f"{what} timed out after {timeout:g} s")
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerFailed(self._death_note())
        return json.loads(line)

    def request(self, message: dict, timeout: float) -> dict:
        if not self.ready:  # importing torch, triton and the kernels: not part of any build's time
            self._answer(max(timeout, STARTUP_TIMEOUT_S), "starting the worker")
            self.ready = True
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except OSError:
            raise WorkerFailed(self._death_note()) from None
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


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class Pool:
    """Up to ``size`` compile workers, started on demand, serving one queue of builds."""

    def __init__(self, size: int, timeout: float):
        self.size, self.timeout = size, timeout
        self.idle: List[Worker] = []
        self.started: List[Worker] = []
        self.lock = threading.Lock()
        self.stopped = False

    def _take(self) -> Worker:
        with self.lock:
            if self.idle:
                return self.idle.pop()
        worker = Worker()
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
        except WorkerFailed as exc:
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
                except WorkerFailed as exc:  # crash or timeout: report it and go on with a fresh worker
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


