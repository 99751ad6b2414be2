"""Mutation check: does the test suite see a 1% error, or a missing launch, in every Triton kernel?

Opt-in and slow (not part of `pytest`); run from the repository root on a CPU machine:

    python3 -m benchmarks.mutation_check                  # every kernel, mutants scale and skip
    python3 -m benchmarks.mutation_check --modes scale,skip,hide --kernels matmul_kernel,sgd_kernel

1. Map: the Triton-backend tests run once, unmutated, through the interpreter, and
   tests/conftest.py logs which kernels each test launched (TKERNELS_LAUNCH_LOG). Every test
   must pass here, or the verdicts below would mean nothing.
2. For each kernel and mutant, the tests that launch that kernel run again with
   TKERNELS_MUTANT=<kernel>:<mode> (tests/launches.py applies it) and stop at the first
   failure (-x). The mutant is *caught* when a test fails.
   * scale: every element the launch wrote is multiplied by 1.01,
   * skip:  the launch does not happen,
   * hide:  the launch happens but is not recorded (the kernel "replaced by torch"): only a
            launch assertion can catch it.
Prints a table (kernel, mutant, verdict, first failing test, seconds) and exits 1 if any
mutant survived. A full run takes about 15 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from typing import Dict, List

PYTEST = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow",
          "-W", "ignore"]
# The Triton-backend tests: parametrised on backend=triton, or without a backend parameter
# (those run on the interpreter by default); the map keeps only the ones that launch kernels.
TRITON_SELECTION = ["-k", "triton or not numpy"]


def build_map(paths: List[str]) -> "OrderedDict[str, List[str]]":
    """kernel name -> node ids of the tests that launch it, in suite order."""
    with tempfile.NamedTemporaryFile("r", suffix=".log", delete=False) as log:
        env = dict(os.environ, TKERNELS_LAUNCH_LOG=log.name)
        env.pop("TKERNELS_MUTANT", None)
        started = time.time()
        proc = subprocess.run(PYTEST + TRITON_SELECTION + ["--maxfail=1000"] + paths, env=env,
                              capture_output=True, text=True)
        print(f"map: {proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ''} "
              f"({time.time() - started:.0f} s)", flush=True)
        if proc.returncode != 0:
            sys.exit(f"the unmutated Triton tests must pass first:\n{proc.stdout[-4000:]}")
        lines = open(log.name).read().splitlines()
    os.unlink(log.name)
    kernels: Dict[str, List[str]] = {}
    for line in lines:
        node, _, names = line.partition("\t")
        for name in filter(None, names.split(",")):
            kernels.setdefault(name, []).append(node)
    return OrderedDict(sorted(kernels.items()))


def run_mutant(kernel: str, mode: str, nodes: List[str]) -> dict:
    env = dict(os.environ, TKERNELS_MUTANT=f"{kernel}:{mode}")
    env.pop("TKERNELS_LAUNCH_LOG", None)
    started = time.time()
    proc = subprocess.run(PYTEST + ["-rf"] + nodes, env=env, capture_output=True, text=True)
    seconds = time.time() - started
    failed = [line.split(" ", 2)[1] for line in proc.stdout.splitlines()
              if line.startswith(("FAILED ", "ERROR "))]
    if proc.returncode == 0:
        verdict = "SURVIVED"
    elif proc.returncode == 1 and failed:
        verdict = "caught"
    else:
        verdict = f"error (pytest exit {proc.returncode})"
    return {"kernel": kernel, "mode": mode, "verdict": verdict, "by": failed[0] if failed else "",
            "tests": len(nodes), "seconds": round(seconds, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="scale,skip", help="comma-separated: scale, skip, hide")
    parser.add_argument("--kernels", default="", help="comma-separated kernel names (default: every launched)")
    parser.add_argument("--paths", default="tests", help="comma-separated test paths for the map")
    parser.add_argument("--map", help="reuse (or write, if missing) the kernel -> tests map as JSON")
    parser.add_argument("--json", help="write the results as JSON")
    args = parser.parse_args(argv)
    os.environ.pop("TKERNELS_TEST_DEVICE", None)  # the interpreter: mutants patch its launches

    if args.map and os.path.exists(args.map):
        kernel_tests = OrderedDict(json.load(open(args.map)))
    else:
        kernel_tests = build_map(args.paths.split(","))
        if args.map:
            json.dump(kernel_tests, open(args.map, "w"), indent=1)
    wanted = [k for k in args.kernels.split(",") if k] or list(kernel_tests)
    unknown = [k for k in wanted if k not in kernel_tests]
    if unknown:
        sys.exit(f"no test launches {unknown}; launched kernels: {', '.join(kernel_tests)}")

    results = []
    print(f"{'kernel':36} {'mutant':6} {'verdict':9} {'tests':>5} {'s':>6}  first failing test", flush=True)
    for kernel in wanted:
        for mode in args.modes.split(","):
            r = run_mutant(kernel, mode, kernel_tests[kernel])
            results.append(r)
            print(f"{kernel:36} {mode:6} {r['verdict']:9} {r['tests']:>5} {r['seconds']:>6}  {r['by']}", flush=True)
    if args.json:
        json.dump(results, open(args.json, "w"), indent=1)
    survived = [r for r in results if r["verdict"] != "caught"]
    print(f"\n{len(results) - len(survived)} of {len(results)} mutants caught", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
