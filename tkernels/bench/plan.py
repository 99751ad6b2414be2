"""What a run is: the validated configuration, the (suite, op, shape) tasks, the providers,
and the `--list` text. Every usage problem raises BenchError (the CLI's exit code 2)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from . import BenchError, report
from .cases import OPS, STEP, OpSpec, Shape, get_op
from .suites import DEFAULT_CPU_SUITES, DEFAULT_GPU_SUITES, SUITES

DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
          "fp64": torch.float64, "float64": torch.float64, "double": torch.float64}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
MODES = ("fwd", "bwd", "fwd+bwd", STEP)
BASELINES = ("eager", "compile")
DEFAULT_MODES = ("fwd", "fwd+bwd")
SKIPPED = "skipped: "


@dataclass
class Config:
    ops: List[str] = field(default_factory=list)
    suites: List[str] = field(default_factory=list)
    dtypes: List[torch.dtype] = field(default_factory=list)
    modes: List[str] = field(default_factory=lambda: list(DEFAULT_MODES))
    shapes: List[str] = field(default_factory=list)
    baselines: List[str] = field(default_factory=list)
    device: torch.device = torch.device("cpu")
    cuda_graphs: bool = False
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    check: bool = False
    json: Optional[str] = None
    csv: Optional[str] = None
    plot: Optional[str] = None
    markdown: Optional[str] = None
    progress: bool = True
    interpreter: bool = False
    threads: int = 1  # torch and BLAS threads during the run; 0: the libraries' defaults


@dataclass
class Task:
    suite: str
    op: OpSpec
    shape: Shape


@dataclass
class Provider:
    name: str  # "tkernels", "tkernels-numpy", "tkernels-interpreter", "eager", "compile"
    backend: str  # the tkernels backend forced while it runs, or "torch"

    @property
    def is_tkernels(self) -> bool:
        return self.name.startswith("tkernels")


def split_list(values: Optional[Sequence[str]]) -> List[str]:
    """['a,b', 'c'] -> ['a', 'b', 'c']."""
    if isinstance(values, str):
        values = [values]
    return [v.strip() for item in (values or []) for v in str(item).split(",") if v.strip()]


def _choose(kind: str, given: List[str], valid: Sequence[str]) -> List[str]:
    unknown = [g for g in given if g not in valid]
    if unknown:
        raise BenchError(f"unknown {kind} {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    return list(dict.fromkeys(given))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BenchError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {name}: no CUDA device is available here (torch {torch.__version__})")
    return device


def make_config(*, ops=(), suite=(), dtype=(), mode=(), shapes=(), baselines=None, device="auto",
                cuda_graphs=False, warmup=25.0, rep=100.0, check=False, json=None, csv=None, plot=None,
                markdown=None, progress=True, interpreter=False, threads=1) -> Config:
    """Validate the CLI's values; every problem is a BenchError (exit code 2)."""
    dev = resolve_device(device)
    on_gpu = dev.type == "cuda"
    ops = split_list(ops)
    for name in ops:
        get_op(name)
    suites = split_list(suite)
    suites = list(SUITES) if suites == ["all"] else _choose("suite", suites, list(SUITES) + ["all"])
    dtypes = _choose("dtype", split_list(dtype), list(DTYPES)) or (["fp16", "bf16", "fp32"] if on_gpu else ["fp32"])
    modes = _choose("mode", split_list(mode), MODES) or list(DEFAULT_MODES)
    if baselines is None:
        base = list(BASELINES) if on_gpu else ["eager"]
    else:
        base = [] if split_list(baselines) == ["none"] else _choose("baseline", split_list(baselines), BASELINES)
    if cuda_graphs and not on_gpu:
        raise BenchError("--cuda-graphs needs a CUDA device")
    if interpreter and on_gpu:
        raise BenchError("--interpreter runs the Triton kernels on CPU tensors; it cannot be used with a CUDA device")
    if warmup < 0 or rep <= 0:
        raise BenchError(f"--warmup must be >= 0 and --rep > 0 (ms), but got {warmup} and {rep}")
    if threads < 0:
        raise BenchError(f"--threads must be >= 0 (0: the libraries' defaults), but got {threads}")
    if json == csv == report.STDOUT:
        raise BenchError("--json - and --csv - cannot both write to standard output; give one of them a file")
    if plot:
        report.require_matplotlib()
    return Config(ops, suites, list(dict.fromkeys(DTYPES[d] for d in dtypes)), modes, list(shapes or []), base,
                  dev, cuda_graphs, float(warmup), float(rep), check, json, csv, plot, markdown, progress, interpreter,
                  int(threads))


def plan(cfg: Config, notes=None) -> List[Task]:
    """The tasks of the run. Unavailable ops named explicitly are an error; in a suite they are
    skipped with a note (they appear once tkernels exports them)."""
    notes = notes if notes is not None else sys.stderr
    for name in cfg.ops:
        if not get_op(name).available():
            raise BenchError(f"op {name!r} is known but not available: tkernels."
                             f"{'optim' if get_op(name).kind == 'optimizer' else 'functional'}.{name} does not "
                             f"exist yet. Available ops: {', '.join(o for o in OPS if OPS[o].available())}")
    suites = cfg.suites or list(DEFAULT_GPU_SUITES if cfg.device.type == "cuda" else DEFAULT_CPU_SUITES)
    if cfg.shapes:
        names = cfg.ops or [o for s in suites for o in SUITES[s].ops if OPS[o].available()]
        names = list(dict.fromkeys(names))
        if not names:
            raise BenchError("--shapes: no available op to run them with; name the ops (see --list)")
        tasks = [Task("custom" if cfg.ops else ",".join(suites), get_op(n), get_op(n).parse_shape(tok))
                 for n in names for tok in cfg.shapes]
    else:
        tasks, skipped = [], set()
        for s in suites:
            for e in SUITES[s].entries:
                if cfg.ops and e.op not in cfg.ops:
                    continue
                spec = get_op(e.op)
                if not spec.available():
                    skipped.add(e.op)
                    continue
                tasks.append(Task(s, spec, spec.shape(e.dims, e.params, e.label)))
        if skipped:
            print(f"note: skipping ops not in tkernels yet: {', '.join(sorted(skipped))}", file=notes)
        missing = [o for o in cfg.ops if not any(t.op.name == o for t in tasks)]
        if missing:
            raise BenchError(f"no shapes for {', '.join(missing)} in suite(s) {', '.join(suites)}; "
                             "give --shapes or another --suite (see --list)")
    if not tasks:
        raise BenchError("nothing to run: no available op in the chosen suites (see --list)")
    for t in tasks:  # builders validate parameters without allocating anything
        t.op.build(t.shape, torch.float32, torch.device("cpu"))
    return tasks


def providers(cfg: Config) -> List[Provider]:
    if cfg.device.type == "cuda":
        own = [Provider("tkernels", "triton")]
    else:
        own = [Provider("tkernels-numpy", "numpy")]
        if cfg.interpreter:
            own.append(Provider("tkernels-interpreter", "triton"))
    return own + [Provider(b, "torch") for b in cfg.baselines]


def task_modes(op: OpSpec, modes: Sequence[str]) -> List[str]:
    """Requested modes the op has; optimizers always run their step."""
    if op.kind == "optimizer":
        return [STEP]
    return [m for m in modes if m in op.modes]


def listing() -> str:
    lines = ["Ops (available: exported by tkernels now; the others appear as they land):", ""]
    rows = [("op", "available", "modes", "dims (--shapes)", "parameters (name=default)", "what")]
    for name, spec in OPS.items():
        params = " ".join(f"{k}={v}" for k, v in spec.defaults.items() if k != "model") or "-"
        rows.append((name, "yes" if spec.available() else "no", ",".join(spec.modes), spec.dims_help(), params,
                     spec.doc))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines += ["", "Suites (--suite NAME, comma-separated, or all):", ""]
    srows = [("suite", "cases", "ops", "description")]
    for name, s in SUITES.items():
        ops = ",".join(s.ops)
        srows.append((name, str(len(s.entries)), ops if len(ops) <= 40 else ops[:37] + "...", s.description))
    widths = [max(len(r[i]) for r in srows) for i in range(3)]
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r[:3], widths)) + "  " + r[3] for r in srows]
    lines += ["", f"Default suites: GPU {','.join(DEFAULT_GPU_SUITES)}; CPU {','.join(DEFAULT_CPU_SUITES)}.",
              "Shape tokens: DIMS[:name=value...], e.g. 'linear --shapes 4096x4096x4096:activation=relu', "
              "'conv2d --shapes 32x64x56x56x64x3:stride=2', 'SGD --shapes resnet50'."]
    return "\n".join(lines)
