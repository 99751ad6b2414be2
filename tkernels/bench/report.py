"""Reports: the terminal table, JSON, CSV, Markdown, plots, the progress bar and run metadata.

Every row carries the run's metadata (device, versions, git commit, the torch and BLAS thread
counts, and whether it is a CPU figure), so a JSON or CSV file read on its own still says where its
numbers come from. A ratio whose providers' p20-p80 spreads are wider than the gap between their
medians is marked as within noise (``noisy_<baseline>``, and ``?`` after the ratio in tables).
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from . import BenchError

META_ROW_KEYS = ("device", "device_kind", "cpu_figure", "torch", "triton", "tkernels", "git_commit",
                 "torch_threads", "blas_threads")
ROW_FIELDS = ("suite", "op", "case", "shape", "dtype", "mode", "provider", "backend", "ms", "ms_p20", "ms_p80",
              "tflops", "gbps", "roofline_pct", "speedup", "speedup_eager", "speedup_compile", "noisy_eager",
              "noisy_compile", "flops", "bytes", "buffers", "peak_gbps", "peak_tflops") + META_ROW_KEYS + ("error",)
STDOUT = "-"  # --json - / --csv -: the file is standard output (and the table goes to stderr)
NOISE_NOTE = ("within noise: the p20-p80 spread of the repeats is wider than the difference between the "
              "providers; rerun with a longer --rep, or on a quieter machine")
CHECK_FIELDS = ("suite", "op", "case", "shape", "dtype", "mode", "provider", "backend", "check", "err",
                "torch_err", "tol", "detail") + META_ROW_KEYS + ("error",)


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def git_commit() -> str:
    """HEAD of the checkout tkernels is imported from, '+dirty' when tracked files changed;
    TKERNELS_GIT_COMMIT overrides it (for copies of the tree without .git)."""
    if os.environ.get("TKERNELS_GIT_COMMIT"):
        return os.environ["TKERNELS_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def collect_metadata(device, interpreter: bool) -> Dict[str, object]:
    """Where the figures come from; call it inside the run's thread limits (it records them)."""
    import torch
    import triton

    import tkernels
    from .._threads import thread_counts

    on_gpu = device.type == "cuda"
    meta = {
        "device": torch.cuda.get_device_name(device) if on_gpu else _cpu_model(),
        "device_kind": "gpu" if on_gpu else "cpu",
        "cpu_figure": not on_gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "tkernels": tkernels.__version__,
        "git_commit": git_commit(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "interpreter": interpreter,
        "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "allow_tf32_cudnn": torch.backends.cudnn.allow_tf32,
        **thread_counts(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if on_gpu:
        props = torch.cuda.get_device_properties(device)
        meta["capability"] = f"sm_{props.major}{props.minor}"
        meta["multiprocessors"] = props.multi_processor_count
    return meta


def cpu_banner(meta: Dict[str, object], stars: bool = True) -> str:
    text = (f"CPU FIGURES, NOT GPU TIMINGS: measured on {meta['device']} (tkernels' NumPy backend"
            f"{' and the Triton interpreter' if meta.get('interpreter') else ''} against torch CPU). "
            "Do not compare them with GPU numbers.")
    return f"*** {text} ***" if stars else text


def header_lines(meta: Dict[str, object], peaks: Dict[str, Optional[float]]) -> List[str]:
    lines = [cpu_banner(meta)] if meta.get("cpu_figure") else []
    lines.append(f"tkernels bench on {meta['device']} ({meta['device_kind'].upper()}) | torch {meta['torch']} | "
                 f"triton {meta['triton']} | tkernels {meta['tkernels']} | commit {meta['git_commit']} | "
                 f"threads: torch {meta.get('torch_threads') or '?'}, BLAS {meta.get('blas_threads') or '?'}")
    measured = []
    for key, value in peaks.items():
        if value and key == "peak_copy_gbps":
            measured.append(f"copy {value:.4g} GB/s")
        elif value:
            measured.append(f"{key.replace('peak_matmul_tflops_', '')} matmul {value:.4g} TFLOP/s")
    if measured:
        lines.append("roofline, measured at start-up: " + ", ".join(measured))
    return lines


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------
def _num(v, spec: str = ".4g") -> str:
    return "" if v is None else format(v, spec)


def _speedup(row: dict, baseline: str) -> str:
    v = row.get(f"speedup_{baseline}")
    return "" if v is None else f"{v:.2f}x" + ("?" if row.get(f"noisy_{baseline}") else "")


def spread_exceeds_difference(a: dict, b: dict) -> bool:
    """Whether either provider's p20-p80 spread is wider than the gap between the two medians:
    then the ratio of the two is not resolved by this measurement."""
    spread = max(a["ms_p80"] - a["ms_p20"], b["ms_p80"] - b["ms_p20"])
    return spread > abs(a["ms"] - b["ms"])


def notes(rows: Sequence[dict]) -> List[str]:
    """Lines to print under a table of these rows."""
    noisy = sum(bool(r.get("noisy_eager") or r.get("noisy_compile")) for r in rows)
    return [f'"?" after a ratio ({noisy} of {len(rows)} rows): {NOISE_NOTE}'] if noisy else []


def _failure(row: dict) -> str:
    return "skipped" if str(row.get("error") or "").startswith("skipped") else "error"


def _short(text, width: int) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= width else text[: width - 3] + "..."


BENCH_COLUMNS: List[Tuple[str, Callable[[dict], str]]] = [
    ("op", lambda r: r["op"]),
    ("case", lambda r: _short(r.get("case"), 34)),
    ("shape", lambda r: _short(r["shape"], 34)),
    ("dtype", lambda r: r["dtype"]),
    ("mode", lambda r: r["mode"]),
    ("provider", lambda r: r["provider"]),
    ("ms", lambda r: _num(r.get("ms")) if r.get("ms") is not None else _failure(r)),
    ("p20-p80 ms", lambda r: "" if r.get("ms") is None else f"{r['ms_p20']:.4g}-{r['ms_p80']:.4g}"),
    ("TFLOP/s", lambda r: _num(r.get("tflops"), ".3g")),
    ("GB/s", lambda r: _num(r.get("gbps"), ".4g")),
    ("%roof", lambda r: _num(r.get("roofline_pct"), ".1f")),
    ("vs eager", lambda r: _speedup(r, "eager")),
    ("vs compile", lambda r: _speedup(r, "compile")),
    ("on", lambda r: "CPU" if r.get("cpu_figure") else "GPU"),
    ("note", lambda r: _short(r.get("error"), 70)),
]

CHECK_COLUMNS: List[Tuple[str, Callable[[dict], str]]] = [
    ("op", lambda r: r["op"]),
    ("case", lambda r: _short(r.get("case"), 34)),
    ("shape", lambda r: _short(r["shape"], 34)),
    ("dtype", lambda r: r["dtype"]),
    ("provider", lambda r: r["provider"]),
    ("check", lambda r: r.get("check") or ""),
    ("error", lambda r: _num(r.get("err"), ".3g")),
    ("torch error", lambda r: _num(r.get("torch_err"), ".3g")),
    ("tolerance", lambda r: _num(r.get("tol"), ".3g")),
    ("on", lambda r: "CPU" if r.get("cpu_figure") else "GPU"),
    ("detail", lambda r: _short(r.get("error") or r.get("detail"), 70)),
]


RIGHT_ALIGNED = {"ms", "p20-p80 ms", "TFLOP/s", "GB/s", "%roof", "vs eager", "vs compile", "error", "torch error",
                 "tolerance"}
# Widths of the number columns when rows are printed as they complete (before all are known).
STREAM_WIDTHS = {"ms": 9, "p20-p80 ms": 19, "TFLOP/s": 8, "GB/s": 9, "%roof": 6, "vs eager": 9, "vs compile": 10,
                 "check": 7, "error": 9, "torch error": 11, "tolerance": 9}


class Table:
    """Aligned columns: ``widths`` maps the header of each column shown to its width."""

    def __init__(self, columns: Sequence[Tuple[str, Callable[[dict], str]]], widths: Dict[str, int]):
        self.columns = [(h, fmt) for h, fmt in columns if h in widths]
        self.widths = [max(len(h), widths[h]) for h, _ in self.columns]

    def _line(self, values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if h in RIGHT_ALIGNED else v.ljust(w)
                         for v, w, (h, _) in zip(values, self.widths, self.columns)).rstrip()

    def header(self) -> str:
        return "\n".join([self._line([h for h, _ in self.columns]), self._line(["-" * w for w in self.widths])])

    def row(self, row: dict) -> str:
        return self._line([fmt(row) for _, fmt in self.columns])


def columns_for(rows_are_checks: bool):
    return CHECK_COLUMNS if rows_are_checks else BENCH_COLUMNS


def stream_table(rows_are_checks: bool, planned: Sequence[dict], hidden: Iterable[str] = ()) -> Table:
    """A table for rows not measured yet: text columns as wide as their values in ``planned`` (the
    rows' names, before measuring), number columns fixed, ``hidden`` left out."""
    widths = {}
    for header, fmt in columns_for(rows_are_checks):
        if header not in hidden:
            widths[header] = STREAM_WIDTHS.get(header) or max((len(fmt(r)) for r in planned), default=0)
    return Table(columns_for(rows_are_checks), widths)


def format_table(rows: Sequence[dict]) -> str:
    """Aligned columns; columns empty in every row are left out."""
    if not rows:
        return "(no results)"
    columns = columns_for("check" in rows[0])
    cells = [[fmt(r) for _, fmt in columns] for r in rows]
    widths = {h: max(len(c[i]) for c in cells) for i, (h, _) in enumerate(columns) if any(c[i] for c in cells)}
    table = Table(columns, widths)
    return "\n".join([table.header()] + [table.row(r) for r in rows])


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def _parent(path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)


def write_json(path: str, rows: Sequence[dict]) -> None:
    """A list of rows. Written to a temporary file and renamed, so a run killed mid-write
    leaves the previous complete file; ``-`` is standard output."""
    if path == STDOUT:
        json.dump(list(rows), sys.stdout, indent=1)
        sys.stdout.write("\n")
        sys.stdout.flush()
        return
    _parent(path)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(list(rows), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def write_csv(path: str, rows: Sequence[dict]) -> None:
    """Like write_json: renamed into place, ``-`` is standard output."""
    fields = CHECK_FIELDS if rows and "check" in rows[0] else ROW_FIELDS
    if path == STDOUT:
        writer = csv.DictWriter(sys.stdout, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        sys.stdout.flush()
        return
    _parent(path)
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def load_json(paths: Iterable[str]) -> List[dict]:
    rows: List[dict] = []
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise BenchError(f"cannot read results file {path}: {exc}") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) and "op" in r for r in data):
            raise BenchError(f"{path} is not a tkernels bench JSON file (expected a list of rows with 'op')")
        rows += data
    return rows


def by_suite(rows: Sequence[dict]) -> Dict[str, List[dict]]:
    groups: Dict[str, List[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("suite") or "custom", []).append(r)
    return groups


def plot_paths(path: str, suites: Sequence[str]) -> Dict[str, str]:
    """FILE for a single suite; FILE's stem + '-<suite>' + suffix per suite otherwise."""
    if len(suites) == 1:
        return {suites[0]: path}
    p = Path(path)
    suffix = p.suffix or ".png"
    return {s: str(p.with_name(f"{p.stem}-{s}{suffix}")) for s in suites}


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise BenchError("--plot needs matplotlib, which is not installed: pip install 'tkernels[demo]' "
                         "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_plots(path: str, rows: Sequence[dict]) -> Dict[str, str]:
    """One figure per suite: a panel per (op, dtype, mode), grouped bars per case and provider,
    in TFLOP/s for GEMM-like ops and GB/s for the others."""
    plt = require_matplotlib()
    groups = {s: [r for r in rs if r.get("ms") is not None] for s, rs in by_suite(rows).items()}
    groups = {s: rs for s, rs in groups.items() if rs}
    written = {}
    for suite, path_for in plot_paths(path, list(groups)).items():
        suite_rows = groups[suite]
        panels: Dict[tuple, List[dict]] = {}
        for r in suite_rows:
            panels.setdefault((r["op"], r["dtype"], r["mode"]), []).append(r)
        heights = [1.2 + 0.32 * len({r["shape"] for r in rs}) * max(1, len({r["provider"] for r in rs})) ** 0.5
                   for rs in panels.values()]
        fig, axes = plt.subplots(len(panels), 1, figsize=(11, sum(heights) + 0.8), squeeze=False,
                                 gridspec_kw={"height_ratios": heights}, constrained_layout=True)
        first = suite_rows[0]
        for ax, ((op, dtype, mode), rs) in zip(axes[:, 0], panels.items()):
            _panel(ax, op, dtype, mode, rs, "CPU" if first.get("cpu_figure") else "GPU")
        where = "CPU FIGURES (not GPU timings)" if first.get("cpu_figure") else "GPU"
        fig.suptitle(f"tkernels bench: {suite} | {first.get('device')} | {where}\n"
                     f"torch {first.get('torch')}, triton {first.get('triton')}, commit {first.get('git_commit')}",
                     fontsize=10, color="darkred" if first.get("cpu_figure") else "black")
        _parent(path_for)
        fig.savefig(path_for, dpi=110)
        plt.close(fig)
        written[suite] = path_for
    return written


def _panel(ax, op, dtype, mode, rows, where: str) -> None:
    metric, unit = ("tflops", "TFLOP/s") if any(r.get("tflops") for r in rows) else ("gbps", "GB/s")
    cases = list(dict.fromkeys(r["shape"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    labels = {r["shape"]: _short(r.get("case") or r["shape"], 48) for r in rows}
    height = 0.8 / len(providers)
    for j, provider in enumerate(providers):
        values = {r["shape"]: r.get(metric) or 0.0 for r in rows if r["provider"] == provider}
        ys = [i + (j - (len(providers) - 1) / 2) * height for i in range(len(cases))]
        ax.barh(ys, [values.get(c, 0.0) for c in cases], height=height, label=provider)
    ax.set_yticks(range(len(cases)))
    ax.set_yticklabels([labels[c] for c in cases], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"{unit} ({where} figure)", fontsize=8)
    ax.set_title(f"{op}  {dtype}  {mode}", fontsize=9, loc="left")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.grid(axis="x", alpha=0.3)


def write_markdown(path: str, rows: Sequence[dict], plots: Optional[Dict[str, str]] = None) -> None:
    """A README for benchmarks/results/<gpu>/: metadata, then per suite its plot and table."""
    if not rows:
        raise BenchError("no results to write to Markdown")
    first, plots = rows[0], plots or {}
    out = [f"# tkernels benchmark results: {first.get('device')}", ""]
    if first.get("cpu_figure"):
        interpreter = any(r.get("provider") == "tkernels-interpreter" for r in rows)
        out += [f"> **{cpu_banner({**first, 'interpreter': interpreter}, stars=False)}**", ""]
    out += ["| | |", "|---|---|"] + [f"| {k} | {first.get(k)} |" for k in META_ROW_KEYS] + [""]
    for suite, suite_rows in by_suite(rows).items():
        out += [f"## {suite}", ""]
        if suite in plots:
            out += [f"![{suite}]({os.path.relpath(plots[suite], Path(path).parent)})", ""]
        out += ["| op | case | shape | dtype | mode | provider | ms | TFLOP/s | GB/s | % roofline | vs eager "
                "| vs compile |",
                "|---|---|---|---|---|---|--:|--:|--:|--:|--:|--:|"]
        for r in suite_rows:
            ms = _num(r.get("ms")) if r.get("ms") is not None else f"{_failure(r)}: {_short(r.get('error'), 60)}"
            out.append(f"| {r['op']} | {r.get('case') or ''} | `{r['shape']}` | {r['dtype']} | {r['mode']} | "
                       f"{r['provider']} | {ms} | {_num(r.get('tflops'), '.3g')} | {_num(r.get('gbps'), '.4g')} | "
                       f"{_num(r.get('roofline_pct'), '.1f')} | {_speedup(r, 'eager')} | "
                       f"{_speedup(r, 'compile')} |")
        suite_notes = notes(suite_rows)
        out += [""] + suite_notes + ([""] if suite_notes else [])
    _parent(path)
    Path(path).write_text("\n".join(out))


# ---------------------------------------------------------------------------------------------
# Progress bar (stderr): redrawn in place on a terminal, one line per step in a log file
# ---------------------------------------------------------------------------------------------
class Progress:
    """The bar stays on the last line of a terminal; ``print`` writes finished rows above it."""

    def __init__(self, total: int, enabled: bool = True, stream=None, width: int = 30):
        self.total, self.done, self.enabled = max(total, 1), 0, enabled
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = ""

    def step(self, label: str) -> None:
        """Announce the step about to run (so a hang shows where it is)."""
        if not self.enabled:
            return
        filled = int(self.width * self.done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        text = f"[{bar}] {self.done}/{self.total} {label}"
        if self.tty:
            self._bar = "\r" + text[:150].ljust(150)
            self.stream.write(self._bar)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.done += 1

    def print(self, text: str, out) -> None:
        """Print ``text`` to ``out`` now (flushed), above the bar when the bar is on a terminal."""
        redraw = self.enabled and self.tty and self._bar
        if redraw:
            self.stream.write("\r" + " " * 150 + "\r")
            self.stream.flush()
        print(text, file=out, flush=True)
        if redraw:
            self.stream.write(self._bar)
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write(("\r" + " " * 150 + "\r" if self.tty else "") + f"done: {self.done} steps\n")
            self.stream.flush()
