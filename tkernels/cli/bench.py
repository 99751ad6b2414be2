"""`tkernels bench`: time the kernels against torch eager and torch.compile.

On a GPU the figures are CUDA-event timings with a roofline measured at start-up. On a CPU
it runs tkernels' NumPy backend against torch CPU (and, with --interpreter, the Triton
kernels through Triton's interpreter), and labels every figure as a CPU figure.

--interpreter needs TRITON_INTERPRET=1 before tkernels is imported, which has already
happened when this command runs, so without it the command re-runs itself in a child process
with that variable set (set it yourself to skip the re-run: TRITON_INTERPRET=1 tkernels bench
--interpreter ...).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import List

EPILOG = """examples:
  tkernels bench --list
  tkernels bench linear --dtype bf16 --mode fwd,fwd+bwd --json linear.json --plot linear.png
  tkernels bench --suite resnet50-conv,resnet50-bn --baselines eager --csv resnet.csv
  tkernels bench linear --shapes 4096x4096x4096:activation=relu 64x1024x784
  tkernels bench --suite linear --check          # correctness at benchmark sizes vs torch
  tkernels bench relu --device cpu --json - | jq .   # rows to stdout, table to stderr
  tkernels bench --load a.json b.json --markdown README.md --plot plot.png
exit codes: 0 ok, 1 a measurement or check failed, 2 usage error (unknown op, dtype, suite...)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("ops", nargs="*", metavar="OPS",
                        help="ops to run (space- or comma-separated; default: every op of the suites)")
    parser.add_argument("--suite", action="append", metavar="NAME",
                        help="suite(s) of shapes from real models, comma-separated, or 'all' (see --list); "
                             "default: the GPU suites on CUDA, 'smoke' on the CPU")
    parser.add_argument("--dtype", action="append", metavar="fp16,bf16,fp32",
                        help="dtypes (default: fp16,bf16,fp32 on CUDA, fp32 on the CPU)")
    parser.add_argument("--mode", action="append", metavar="fwd,bwd,fwd+bwd",
                        help="passes to time (default: fwd,fwd+bwd; optimizers always time their step)")
    parser.add_argument("--shapes", nargs="+", metavar="SHAPE",
                        help="shapes instead of the suites' lists: DIMS[:name=value...], "
                             "e.g. 64x128x256:activation=relu")
    parser.add_argument("--baselines", metavar="eager,compile",
                        help="torch baselines: eager, compile or none "
                             "(default: eager,compile on CUDA, eager on the CPU)")
    parser.add_argument("--json", metavar="FILE",
                        help="write the rows as a JSON list ('-': standard output, and the table goes to stderr)")
    parser.add_argument("--csv", metavar="FILE",
                        help="write the rows as CSV ('-': standard output, and the table goes to stderr)")
    parser.add_argument("--plot", metavar="FILE",
                        help="write charts (needs matplotlib); with several suites, FILE-<suite>.png per suite")
    parser.add_argument("--markdown", metavar="FILE", help="write a Markdown report (metadata, plots, tables)")
    parser.add_argument("--cuda-graphs", action="store_true", help="time CUDA-graph replays (do_bench_cudagraph)")
    parser.add_argument("--warmup", type=float, default=25.0, metavar="MS", help="warm-up time per measurement (ms)")
    parser.add_argument("--rep", type=float, default=100.0, metavar="MS", help="measuring time per measurement (ms)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="torch and NumPy/BLAS threads during the run, recorded in every row (default: 1, "
                             "so that CPU figures repeat; 0: the libraries' defaults)")
    parser.add_argument("--interpreter", action="store_true",
                        help="on the CPU, also run the Triton kernels through Triton's interpreter (slow)")
    parser.add_argument("--check", action="store_true",
                        help="instead of timing, check every op at these sizes against torch and a float64 reference")
    parser.add_argument("--load", nargs="+", metavar="FILE",
                        help="no run: print, plot and summarise saved JSON results")
    parser.add_argument("--list", action="store_true", help="list the ops and suites, then exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def to_argv(args: argparse.Namespace) -> List[str]:
    """The command line that parses back to ``args`` (used to re-run under the interpreter)."""
    argv: List[str] = list(args.ops or [])
    for flag in ("suite", "dtype", "mode"):
        for value in getattr(args, flag) or []:
            argv += [f"--{flag}", value]
    if args.shapes:
        argv += ["--shapes", *args.shapes]
    for flag in ("baselines", "json", "csv", "plot", "markdown"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", getattr(args, flag)]
    argv += ["--warmup", repr(args.warmup), "--rep", repr(args.rep), "--device", args.device,
             "--threads", str(args.threads)]
    for flag in ("cuda_graphs", "interpreter", "check", "list", "no_progress"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    if args.load:
        argv += ["--load", *args.load]
    return argv


def _rerun_with_interpreter(args: argparse.Namespace) -> int:
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "tkernels", "bench", *to_argv(args)]
    print("note: re-running with TRITON_INTERPRET=1 (the interpreter must be set before tkernels is imported)",
          file=sys.stderr)
    return subprocess.call(command, env=env)


def run(args: argparse.Namespace) -> int:
    import tkernels
    from tkernels.bench import BenchError

    if args.list:
        from tkernels.bench.plan import listing

        print(listing())
        return 0
    if args.interpreter and not tkernels.INTERPRET:
        return _rerun_with_interpreter(args)
    try:
        from tkernels.bench import plan, report, runner

        if args.load:
            rows = report.load_json(args.load)
            runner.finish(rows, args.plot, args.markdown, sys.stdout)
            return 0
        cfg = plan.make_config(
            ops=args.ops, suite=args.suite, dtype=args.dtype, mode=args.mode, shapes=args.shapes,
            baselines=args.baselines, device=args.device, cuda_graphs=args.cuda_graphs, warmup=args.warmup,
            rep=args.rep, check=args.check, json=args.json, csv=args.csv, plot=args.plot, markdown=args.markdown,
            progress=not args.no_progress, interpreter=args.interpreter, threads=args.threads)
        return runner.execute(cfg)
    except BenchError as exc:
        print(f"tkernels bench: error: {exc}", file=sys.stderr)
        return 2
