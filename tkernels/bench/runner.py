"""The sweep: each task under each provider, timed (or checked), and the rows it gives.

Loop order is dtype, then case, then mode, then provider, so a run cut short (a step timeout in
benchmarks/gpu_check.sh) still leaves complete tables for the first dtypes; JSON and CSV files are
rewritten after every case, and each row is printed as soon as its case and mode are done, for the
same reason. The whole run holds torch and NumPy's BLAS to ``--threads`` threads (default 1).
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .._threads import cpu_threads
from . import report
from .cases import STEP, Case
from .check import check_case
from .plan import BASELINES, DTYPE_NAMES, SKIPPED, Config, Provider, Task, plan, providers, task_modes
from .roofline import Roofline
from .timing import CallFailed, rotation_sets, time_callables, time_cpu_interleaved


# ---------------------------------------------------------------------------------------------
# One measurement
# ---------------------------------------------------------------------------------------------
def _backend(provider: Provider):
    if not provider.is_tkernels:
        return contextlib.nullcontext()
    import tkernels

    return tkernels.use_backend(provider.backend)


def prepare(case: Case, impl, mode: str, inputs: tuple, compiled: bool):
    """A zero-argument callable that runs one timed step on one input set."""
    if case.kind == "optimizer":
        step = impl(*inputs).step
        return torch.compile(step) if compiled else step
    if mode == "fwd":
        return lambda: impl(*inputs)
    wrt = [inputs[i] for i in case.grad_argnums if inputs[i] is not None]
    out = impl(*inputs)
    grad_out = torch.randn_like(out)
    if mode == "bwd":
        return lambda: torch.autograd.grad(out, wrt, grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(impl(*inputs), wrt, grad_out)


def _nbytes(inputs) -> int:
    total = 0
    for t in inputs:
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
        elif isinstance(t, (list, tuple)):
            total += _nbytes(t)
    return total


def skip_reason(provider: Provider, dtype: torch.dtype) -> Optional[str]:
    if provider.name == "tkernels-interpreter" and dtype == torch.bfloat16:
        return "Triton's interpreter computes bfloat16 wrongly (triton issue 11584)"
    return None


def prepare_sets(case: Case, provider: Provider, mode: str, cfg: Config) -> List[Callable[[], object]]:
    """One timed-step callable per rotated input set; call it under ``_backend(provider)``."""
    requires_grad = mode in ("bwd", "fwd+bwd")
    compiled = provider.name == "compile"
    impl = case.tkernels if provider.is_tkernels else case.torch
    if compiled:
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no stale guards
        if case.kind != "optimizer":
            impl = torch.compile(impl)
    first = case.make_inputs(requires_grad)
    n_sets = 1 if case.kind == "optimizer" else rotation_sets(_nbytes(first), cfg.device)
    sets = [first] + [case.make_inputs(requires_grad) for _ in range(n_sets - 1)]
    return [prepare(case, impl, mode, s, compiled) for s in sets]


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# ---------------------------------------------------------------------------------------------
# The sweep and the check
# ---------------------------------------------------------------------------------------------
class Run:
    """``out`` receives the human-readable header and rows, as they complete."""

    def __init__(self, cfg: Config, meta: Dict[str, object], out=None):
        self.cfg, self.meta, self.out = cfg, meta, out or sys.stdout
        self.meta_row = {k: meta[k] for k in report.META_ROW_KEYS}
        self.roofline = Roofline(cfg.device)
        self.rows: List[dict] = []

    def _base_row(self, task: Task, dtype, mode, provider) -> dict:
        return {"suite": task.suite, "op": task.op.name, "case": task.shape.label, "shape": str(task.shape),
                "dtype": DTYPE_NAMES[dtype], "mode": mode, "provider": provider.name, "backend": provider.backend,
                **self.meta_row, "error": None}

    def _save(self, final: bool = False) -> None:
        """Rewrite the JSON/CSV files; standard output (``-``) is written once, at the end."""
        for path, write in ((self.cfg.json, report.write_json), (self.cfg.csv, report.write_csv)):
            if path and (final or path != report.STDOUT):
                write(path, self.rows)

    def _start_table(self, tasks: List[Task], provs: List[Provider], checks: bool) -> report.Table:
        """Print the run's header and the table's, sized for every row the plan will give."""
        planned = [self._base_row(t, d, m, p) for d in self.cfg.dtypes for t in tasks
                   for m in task_modes(t.op, self.cfg.modes) for p in provs]
        hidden = [] if any(t.shape.label for t in tasks) else ["case"]
        if not checks:
            hidden += [f"vs {b}" for b in BASELINES if b not in self.cfg.baselines]
            if not _has_gemm(tasks):
                hidden.append("TFLOP/s")
        table = report.stream_table(checks, planned, hidden)
        lines = report.header_lines(self.meta, self.roofline.summary())
        print("\n".join(lines + [table.header()]), file=self.out, flush=True)
        return table

    def bench_group(self, task: Task, case: Case, dtype, mode: str, provs: Sequence[Provider],
                    progress: report.Progress) -> List[dict]:
        """One row per provider. On a GPU each provider is timed in turn; on the CPU they are first
        called once each (compilation), then timed side by side (see timing.time_cpu_interleaved)."""
        rows, side_by_side = [], []
        for provider in provs:
            progress.step(f"{task.op.name} {task.shape} {DTYPE_NAMES[dtype]} {mode} {provider.name}")
            row = self._base_row(task, dtype, mode, provider)
            row.update({k: None for k in report.ROW_FIELDS if k not in row})
            row.update(flops=case.flops.get(mode), bytes=case.bytes.get(mode))
            rows.append(row)
            reason = skip_reason(provider, dtype)
            if reason:
                row["error"] = SKIPPED + reason
                continue
            try:
                with _backend(provider):
                    fns = prepare_sets(case, provider, mode, self.cfg)
                    if self.cfg.device.type == "cuda":
                        timing = time_callables(fns, self.cfg.device, self.cfg.warmup_ms, self.cfg.rep_ms,
                                                self.cfg.cuda_graphs)
                        self._record(row, dtype, timing, len(fns))
                    else:
                        fns[0]()  # the first call compiles and allocates; never timed
                        side_by_side.append((row, provider, fns[0]))
            except Exception as exc:  # one failing provider must not end the sweep
                self._record_error(row, exc)
        self._time_side_by_side(side_by_side, dtype)
        return [_ordered(row, report.ROW_FIELDS) for row in rows]

    def _time_side_by_side(self, entries: List[tuple], dtype) -> None:
        """CPU: time the (row, provider, step) entries together. One that fails mid-way gets its
        error, and the others are timed again without it."""
        while entries:
            try:
                timings = time_cpu_interleaved([step for _, _, step in entries], self.cfg.warmup_ms,
                                               self.cfg.rep_ms, [partial(_backend, p) for _, p, _ in entries])
            except CallFailed as failure:
                self._record_error(entries.pop(failure.index)[0], failure.__cause__)
                continue
            for (row, _, _), timing in zip(entries, timings):
                self._record(row, dtype, timing, 1)
            return

    def _record(self, row: dict, dtype, timing, n_sets: int) -> None:
        flops, nbytes, seconds = row["flops"], row["bytes"], timing.ms * 1e-3
        row.update(ms=timing.ms, ms_p20=timing.ms_p20, ms_p80=timing.ms_p80, buffers=n_sets,
                   tflops=flops / seconds / 1e12 if flops else None, gbps=nbytes / seconds / 1e9 if nbytes else None,
                   roofline_pct=self.roofline.percent(timing.ms, flops, nbytes, dtype),
                   peak_gbps=self.roofline.measure_bandwidth(),
                   peak_tflops=self.roofline.measure_tflops(dtype) if flops else None)

    def _record_error(self, row: dict, exc: BaseException) -> None:
        row["error"] = _error_text(exc)
        if self.cfg.device.type == "cuda":
            torch.cuda.empty_cache()

    def measure_roofline(self, tasks: List[Task]) -> None:
        """At start-up, before any kernel runs: copy bandwidth, and matmul throughput for the dtypes
        that GEMM-like ops will use."""
        self.roofline.warmup_ms, self.roofline.rep_ms = self.cfg.warmup_ms, max(self.cfg.rep_ms, 20.0)
        self.roofline.measure_bandwidth()
        if _has_gemm(tasks):
            for dtype in self.cfg.dtypes:
                self.roofline.measure_tflops(dtype)

    def sweep(self, tasks: List[Task]) -> List[dict]:
        provs = providers(self.cfg)
        self.measure_roofline(tasks)
        table = self._start_table(tasks, provs, checks=False)
        steps = sum(len(task_modes(t.op, self.cfg.modes)) for t in tasks) * len(self.cfg.dtypes) * len(provs)
        progress = report.Progress(steps, self.cfg.progress)
        try:
            for dtype in self.cfg.dtypes:
                for task in tasks:
                    case = task.op.build(task.shape, dtype, self.cfg.device)
                    for mode in task_modes(task.op, self.cfg.modes):
                        group = self.bench_group(task, case, dtype, mode, provs, progress)
                        _add_speedups(group, self.cfg.baselines)
                        self.rows += group
                        for row in group:
                            progress.print(table.row(row), self.out)
                    self._save()
        finally:
            progress.close()
        return self.rows

    def check(self, tasks: List[Task]) -> List[dict]:
        provs = [p for p in providers(self.cfg) if p.is_tkernels]
        table = self._start_table(tasks, provs, checks=True)
        progress = report.Progress(len(tasks) * len(self.cfg.dtypes) * len(provs), self.cfg.progress)
        try:
            for dtype in self.cfg.dtypes:
                for task in tasks:
                    case = task.op.build(task.shape, dtype, self.cfg.device)
                    mode = STEP if task.op.kind == "optimizer" else "fwd+bwd"
                    for provider in provs:
                        progress.step(f"check {task.op.name} {task.shape} {DTYPE_NAMES[dtype]} {provider.name}")
                        self.rows.append(self.check_row(task, case, dtype, mode, provider))
                        progress.print(table.row(self.rows[-1]), self.out)
                    self._save()
        finally:
            progress.close()
        return self.rows

    def check_row(self, task, case, dtype, mode, provider) -> dict:
        row = self._base_row(task, dtype, mode, provider)
        row.update(check=None, err=None, torch_err=None, tol=None, detail=None)
        reason = skip_reason(provider, dtype)
        if reason:
            row.update(check="skipped", error=SKIPPED + reason)
        else:
            try:
                with _backend(provider):
                    result = check_case(case, dtype)
                row.update(check="pass" if result.ok else "FAIL", err=result.err, torch_err=result.torch_err,
                           tol=result.tol, detail=result.detail)
            except Exception as exc:
                row.update(check="ERROR", error=_error_text(exc))
        return _ordered(row, report.CHECK_FIELDS)


def _has_gemm(tasks: Sequence[Task]) -> bool:
    return any(t.op.name in ("linear", "conv2d") for t in tasks)


def _ordered(row: dict, fields: Sequence[str]) -> dict:
    return {k: row.get(k) for k in fields}


def _add_speedups(group: List[dict], baselines: Sequence[str]) -> None:
    measured = {r["provider"]: r for r in group if r["ms"]}
    for r in group:
        if not r["provider"].startswith("tkernels") or r["ms"] is None:
            continue
        for b in baselines:
            if b in measured:
                r[f"speedup_{b}"] = measured[b]["ms"] / r["ms"]
                r[f"noisy_{b}"] = report.spread_exceeds_difference(r, measured[b])
        if baselines:
            r["speedup"] = r.get(f"speedup_{baselines[0]}")


def failed(rows: Sequence[dict]) -> List[dict]:
    bad = []
    for r in rows:
        if "check" in r:
            if r["check"] not in ("pass", "skipped"):
                bad.append(r)
        elif r.get("error") and not str(r["error"]).startswith(SKIPPED):
            bad.append(r)
    return bad


@contextlib.contextmanager
def _sigterm_as_exit():
    """`timeout` sends SIGTERM: end through Python so the finally blocks write what was measured."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def execute(cfg: Config, out=None) -> int:
    """Run the sweep (or the check), printing each row as it completes, and write the files.
    Returns the exit code. The table goes to stderr when JSON or CSV goes to standard output."""
    out = out or (sys.stderr if report.STDOUT in (cfg.json, cfg.csv) else sys.stdout)
    tasks = plan(cfg)
    with cpu_threads(cfg.threads), _sigterm_as_exit():
        run = Run(cfg, report.collect_metadata(cfg.device, cfg.interpreter), out)
        try:
            rows = run.check(tasks) if cfg.check else run.sweep(tasks)
        finally:
            run._save(final=True)
    for line in report.notes(rows):
        print(line, file=out)
    write_extras(rows, cfg.plot, cfg.markdown)
    bad = failed(rows)
    if bad:
        what = "checks failed" if cfg.check else "measurements failed"
        print(f"{len(bad)} of {len(rows)} {what}; see the note/detail column", file=sys.stderr)
    return 1 if bad else 0


def finish(rows: List[dict], plot: Optional[str], markdown: Optional[str], out, peaks=None) -> None:
    """Print the header and table of saved rows, and write plots and Markdown."""
    if rows:
        first = rows[0]
        meta = {**{k: first.get(k) for k in report.META_ROW_KEYS}, "interpreter": any(
            r["provider"] == "tkernels-interpreter" for r in rows)}
        print("\n".join(report.header_lines(meta, peaks or {})), file=out)
    print("\n".join([report.format_table(rows)] + report.notes(rows)), file=out)
    write_extras(rows, plot, markdown)


def write_extras(rows: List[dict], plot: Optional[str], markdown: Optional[str]) -> None:
    """Plots and the Markdown report (benchmark rows only)."""
    plots = {}
    is_bench = bool(rows) and "check" not in rows[0]
    if plot and is_bench:
        plots = report.write_plots(plot, rows)
        for path in plots.values():
            print(f"wrote {path}", file=sys.stderr)
    if markdown and is_bench:
        report.write_markdown(markdown, rows, plots)
        print(f"wrote {markdown}", file=sys.stderr)
