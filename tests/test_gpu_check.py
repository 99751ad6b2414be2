"""benchmarks/gpu_check.sh without a GPU: it refuses a machine without CUDA cleanly, and a dry run
with a stand-in interpreter (PYTHON=) that logs its arguments and writes the files asked for shows
every step running, every output under OUTDIR, every `tkernels bench` / train_steps.py command line
accepted by the real parsers (suites, dtypes and host-overhead cases that exist), the report kept
its time when earlier steps run out of it, and a report without --plot where matplotlib is missing."""
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tkernels.bench import host_overhead
from tkernels.bench.suites import SUITES
from tkernels.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STEPS = ["env", "tests-hopper", "tests", "check", "bench-linear", "bench-resnet50", "bench-classifier", "bench-optim",
         "bench-bn-large", "report", "host-overhead", "train-steps"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="gpu_check.sh needs bash and coreutils' timeout")

# The stand-in interpreter: logs argv as one JSON line, fakes the GPU probe, answers `-c` imports
# (matplotlib fails when FAKE_NO_MATPLOTLIB is set), hangs when an argument equals FAKE_HANG_ON (noting
# it if interrupted by SIGINT), and writes a file at every output path it is given.
FAKE_PYTHON = """#!{python}
import json, os, sys, time
args = sys.argv[1:]
with open(os.environ["FAKE_PY_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[:1] == ["-"]:
    sys.stdin.read()
    with open(args[1], "w") as f:
        f.write("FAKE-GPU\\n")
    print("gpu FAKE-GPU sm_90 132 SMs")
    sys.exit(0)
if args[:1] == ["-c"]:
    sys.exit(1 if "matplotlib" in args[1] and os.environ.get("FAKE_NO_MATPLOTLIB") else 0)
if os.environ.get("FAKE_HANG_ON") in args:
    try:
        time.sleep(600)
    except KeyboardInterrupt:  # what pytest turns into a summary and junit.xml of the tests that ran
        with open(os.environ["FAKE_PY_LOG"] + ".interrupted", "w") as f:
            f.write(" ".join(args))
        sys.exit(2)
for i, a in enumerate(args):
    if a.startswith("--junitxml="):
        path = a.split("=", 1)[1]
    elif a in ("--json", "--csv", "--markdown", "--plot") and i + 1 < len(args):
        path = args[i + 1]
    else:
        continue
    with open(path, "w") as f:
        f.write("[]" if path.endswith(".json") else "x")
"""


def _dry_run(tmp_path, budget=460, **env_flags):
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "argv.jsonl"
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHON=str(fake), FAKE_PY_LOG=str(log), GPU_CHECK_BUDGET_S=str(budget), **env_flags)
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=300)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    return proc, out, calls, summary


def _status(summary: str) -> dict:
    return {line.split()[1]: line.split()[0] for line in summary.splitlines()
            if line.split() and line.split()[0] in ("PASS", "FAIL", "TIMEOUT", "SKIP")}


def _value_lists(argv, flag):
    return [v for i, a in enumerate(argv[:-1]) if a == flag for v in argv[i + 1].split(",")]


def test_refuses_a_machine_without_cuda_cleanly(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the no-GPU refusal cannot be shown here")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "no usable CUDA device" in proc.stdout
    summary = (out / "summary.txt").read_text()
    assert _status(summary) == {"env": "FAIL"}, summary
    assert "torch sees no CUDA device" in (out / "env.txt").read_text()


def test_usage_error_without_outdir():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_dry_run_runs_every_step_with_commands_the_parsers_accept(tmp_path, monkeypatch):
    proc, out, calls, summary = _dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _status(summary) == {name: "PASS" for name in STEPS}, summary

    paths = [a.split("=", 1)[1] if a.startswith("--junitxml=") else argv[i + 1]
             for argv in calls for i, a in enumerate(argv)
             if a.startswith("--junitxml=") or (a in ("--json", "--csv", "--markdown", "--plot") and i + 1 < len(argv))]
    assert paths and all(Path(p).resolve().is_relative_to(out.resolve()) for p in paths), paths
    assert (out / "results" / "README.md").exists() and (out / "tests" / "junit.xml").exists()

    pytest_runs = [argv for argv in calls if argv[:2] == ["-m", "pytest"]]
    assert len(pytest_runs) == 2, calls
    hopper, suite = pytest_runs
    assert all(run[2:4] == ["-n", "8"] for run in pytest_runs), pytest_runs  # (the stand-in has xdist)
    ignored = [a.split("=", 1)[1] for a in suite if a.startswith("--ignore=")]
    assert sorted(ignored) == ["tests/test_gpu_check.py", "tests/test_inspect.py"], calls
    assert all((REPO / path).is_file() for path in ignored)  # (what it ignores is there to ignore)
    # the Hopper-first run names tests that exist, each of which collects
    targets = [a for a in hopper[2:] if a.startswith("tests/")]
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                *targets], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert collected.returncode == 0, collected.stdout + collected.stderr
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    assert all(any(i.startswith(t) for i in ids) for t in targets), (targets, ids)

    bench = [argv[3:] for argv in calls if argv[:3] == ["-m", "tkernels", "bench"]]
    assert len(bench) == 8, bench  # check, five bench suites, report, host overhead
    cases = [host_overhead.case_label(c).lower() for c in host_overhead.all_cases()]
    for argv in bench:
        args = build_parser().parse_args(["bench", *argv])  # an unknown flag or bad value exits here
        assert set(_value_lists(argv, "--suite")) <= set(SUITES), argv
        assert set(_value_lists(argv, "--dtype")) <= {"fp16", "bf16", "fp32"}, argv
        if args.host_overhead:
            for name in args.ops:
                assert any(c.startswith(name.lower()) for c in cases), f"no host-overhead case {name!r}"
    steps = [argv[1:] for argv in calls if argv[:1] == ["benchmarks/train_steps.py"]]
    assert len(steps) == 1, calls
    spec = importlib.util.spec_from_file_location("train_steps", REPO / "benchmarks" / "train_steps.py")
    train_steps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_steps)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_steps.main(steps[0]) == 2  # parsed, then refused for want of CUDA (argparse would exit)


def test_report_runs_without_matplotlib_and_without_plots(tmp_path):
    proc, out, calls, summary = _dry_run(tmp_path, FAKE_NO_MATPLOTLIB="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = [argv for argv in calls if "--load" in argv]
    assert len(report) == 1 and "--markdown" in report[0], calls
    assert "--plot" not in report[0], "without matplotlib, --plot makes the report refuse to run"
    assert "matplotlib is not installed" in summary


@pytest.mark.slow
def test_report_keeps_its_time_when_a_bench_step_runs_out_of_it(tmp_path):
    """A 55 s run whose last bench step hangs: that step is cut when all but the report's reserve
    is spent, by SIGINT (pytest, cut that way, still reports the tests that ran and writes junit.xml;
    cut by SIGTERM it leaves neither), and the report still runs on what the other steps wrote
    (~25 s of waiting)."""
    proc, out, calls, summary = _dry_run(tmp_path, budget=55, FAKE_HANG_ON="resnet50-bn-large")
    status = _status(summary)
    assert proc.returncode == 1, summary
    assert status["bench-bn-large"] == "TIMEOUT" and status["bench-linear"] == "PASS", summary
    assert status["report"] == "PASS", summary
    assert (out / "results" / "README.md").exists()
    assert "resnet50-bn-large" in (tmp_path / "argv.jsonl.interrupted").read_text(), "the cut step got no SIGINT"
