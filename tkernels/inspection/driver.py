"""Stage 5 of `tkernels inspect`: the driver. Plans the builds, answers what it can from the
on-disk cache, compiles the rest on a pool of workers and returns one row per build.

Results are cached on disk, keyed by the kernel's Triton source hash (which covers the device
functions it calls), signature, constexprs (INPUT_PRECISION included), target, options and the
triton version.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, TextIO

from .builds import (Build, InspectError, coverage_order, estimated_cost, parse_archs, parse_dtypes, plan,
                     registered_specs, select_kernels)
from .report import make_row
from .workers import Pool, default_jobs

DEFAULT_TIMEOUT_S = 600.0


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

    pool = Pool(jobs, timeout)
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
                flavour = build.dtype + (f"/{build.precision}" if build.precision else "")
                prog.step(f"{build.kernel} {build.arch} {flavour} config {build.config_index} "
                          f"variant {build.variant_index} ({metrics.get('compile_s') or 0:.1f} s)")

        if budget_s is None:  # slowest first, so that the last builds to finish are short ones
            order = sorted(pending.values(), key=lambda b: -estimated_cost(specs[b.kernel], b))
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
