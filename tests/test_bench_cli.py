"""`tkernels bench` on the CPU: argument parsing, the JSON/CSV schemas from tiny real runs, plots,
the correctness check, and clear errors. Every run forces --device cpu, so these tests stay CPU
tests on a GPU machine too."""
import csv
import io
import json
import math
import sys
import types
from contextlib import redirect_stdout

import pytest
import torch
import torch.nn.functional as F

import tkernels
import tkernels.functional
from tkernels.bench import BenchError, cases, plan, report, roofline, runner, suites, timing
from tkernels.cli import bench as bench_cli
from tkernels.cli import build_parser, main

FAST = ["--device", "cpu", "--warmup", "0", "--rep", "1", "--no-progress"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """torch's CPU thread pool stalls on a loaded machine; the figures do not matter here."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def bench(capsys, *argv):
    rc = main(["bench", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------
def test_parse_arguments():
    args = build_parser().parse_args(
        ["bench", "linear", "relu,gelu", "--suite", "linear", "--dtype", "fp16,bf16", "--mode", "fwd+bwd",
         "--shapes", "8x16x32", "64x64:activation=relu", "--baselines", "eager", "--json", "a.json", "--csv",
         "a.csv", "--plot", "a.png", "--cuda-graphs", "--warmup", "5", "--rep", "20", "--device", "cpu"])
    assert args.ops == ["linear", "relu,gelu"]
    assert plan.split_list(args.ops) == ["linear", "relu", "gelu"]
    assert args.suite == ["linear"] and args.dtype == ["fp16,bf16"] and args.mode == ["fwd+bwd"]
    assert args.shapes == ["8x16x32", "64x64:activation=relu"]
    assert (args.baselines, args.json, args.csv, args.plot) == ("eager", "a.json", "a.csv", "a.png")
    assert args.cuda_graphs and (args.warmup, args.rep, args.device) == (5.0, 20.0, "cpu")
    assert not args.list and not args.check and not args.interpreter
    defaults = build_parser().parse_args(["bench"])
    assert (defaults.warmup, defaults.rep, defaults.device, defaults.ops) == (25.0, 100.0, "auto", [])


def test_to_argv_round_trips():
    parser = build_parser()
    argv = ["bench", "linear", "--suite", "smoke", "--dtype", "fp32", "--mode", "fwd", "--shapes", "4x5x6",
            "--baselines", "eager,compile", "--json", "x.json", "--plot", "p.png", "--warmup", "1.5", "--rep", "3",
            "--device", "cpu", "--threads", "3", "--interpreter", "--check", "--no-progress"]
    args = parser.parse_args(argv)
    again = parser.parse_args(["bench", *bench_cli.to_argv(args)])
    assert {k: v for k, v in vars(again).items() if k != "_run"} == {k: v for k, v in vars(args).items()
                                                                    if k != "_run"}


def test_interpreter_reruns_itself_with_the_variable_set(monkeypatch):
    calls = []
    monkeypatch.setattr(tkernels, "INTERPRET", False)
    monkeypatch.setattr(bench_cli.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 7)
    assert main(["bench", "relu", "--shapes", "8x8", "--interpreter", "--device", "cpu"]) == 7
    (cmd, env), = calls
    assert env["TRITON_INTERPRET"] == "1"
    assert cmd[:4] == [sys.executable, "-m", "tkernels", "bench"] and "--interpreter" in cmd and "8x8" in cmd


# ---------------------------------------------------------------------------------------------
# --list and errors
# ---------------------------------------------------------------------------------------------
def test_list_shows_ops_with_availability_and_suites(capsys):
    rc, out, _ = bench(capsys, "--list")
    assert rc == 0
    ops_part, suites_part = out.split("Suites")
    lines = {line.split()[0]: line for line in ops_part.splitlines() if line.startswith("  ")}
    for name, spec in cases.OPS.items():
        expected = hasattr(tkernels.functional, name) if spec.kind == "functional" else spec.available()
        assert lines[name].split()[1] == ("yes" if expected else "no"), lines[name]
    suite_lines = {line.split()[0] for line in suites_part.splitlines() if line.startswith("  ")}
    assert set(suites.SUITES) <= suite_lines


@pytest.mark.parametrize("argv, message", [
    (["nosuchop"], "unknown op 'nosuchop'"),
    (["linear", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--suite", "nosuchsuite"], "unknown suite 'nosuchsuite'"),
    (["linear", "--mode", "sideways"], "unknown mode 'sideways'"),
    (["linear", "--baselines", "cudnn"], "unknown baseline 'cudnn'"),
    (["linear", "--shapes", "8x8"], "linear: expected 3 dims MxNxK"),
    (["linear", "--shapes", "8xAx8"], "cannot read shape '8xAx8'"),
    (["linear", "--shapes", "8x8x8:colour=red"], "unknown parameter(s) colour"),
    (["linear", "--shapes", "8x8x8:activation=swoosh"], "unknown activation 'swoosh'"),
    (["linear", "--cuda-graphs"], "--cuda-graphs needs a CUDA device"),
])
def test_usage_errors_exit_2_with_a_clear_message(capsys, argv, message):
    rc, out, err = bench(capsys, *argv, *FAST)
    assert rc == 2
    assert message in err and err.startswith("tkernels bench: error:"), err
    assert out == ""


def test_unavailable_op_is_an_error_when_named_and_skipped_in_a_suite(capsys, monkeypatch):
    monkeypatch.delattr(tkernels.functional, "gelu")
    rc, _, err = bench(capsys, "gelu", *FAST)
    assert rc == 2 and "gelu" in err and "does not exist yet" in err
    tasks = plan.plan(plan.make_config(suite="smoke", device="cpu"), notes=sys.stderr)
    assert "gelu" not in {t.op.name for t in tasks}
    assert "skipping ops not in tkernels yet" in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_clear_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc, _, err = bench(capsys, "relu", "--shapes", "8x8", "--plot", str(tmp_path / "p.png"), *FAST)
    assert rc == 2 and "matplotlib" in err and "pip install" in err


# ---------------------------------------------------------------------------------------------
# A tiny real run: table, JSON, CSV, plot, Markdown
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench")
    files = {k: str(path / f"out.{k}") for k in ("json", "csv", "png", "md")}
    argv = ["bench", "linear", "relu", "--shapes", "16x24x32", "--dtype", "fp32", "--mode", "fwd,bwd,fwd+bwd",
            "--baselines", "eager", "--json", files["json"], "--csv", files["csv"], "--plot", files["png"],
            "--markdown", files["md"], *FAST]
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        rc = main(argv)
    return rc, buffer.getvalue(), files


def test_tiny_run_json_schema(tiny_run):
    rc, _, files = tiny_run
    assert rc == 0
    rows = json.load(open(files["json"]))
    assert isinstance(rows, list) and len(rows) == 2 * 3 * 2  # ops x modes x providers
    for r in rows:
        assert list(r) == list(report.ROW_FIELDS)
        assert r["dtype"] == "fp32" and r["shape"] == "16x24x32" and r["error"] is None
        assert r["mode"] in ("fwd", "bwd", "fwd+bwd") and r["provider"] in ("tkernels-numpy", "eager")
        assert r["ms"] > 0 and r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        assert r["gbps"] > 0 and r["bytes"] > 0
        assert r["cpu_figure"] is True and r["device_kind"] == "cpu"
        assert r["torch"] == torch.__version__ and r["tkernels"] == tkernels.__version__ and r["git_commit"]
        if r["op"] == "linear":
            mult = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[r["mode"]]
            assert r["flops"] == mult * 2 * 16 * 24 * 32
            assert math.isclose(r["tflops"], r["flops"] / (r["ms"] * 1e-3) / 1e12)
        else:
            assert r["flops"] is None and r["tflops"] is None
    by_key = {(r["op"], r["mode"], r["provider"]): r for r in rows}
    for (op, mode, provider), r in by_key.items():
        if provider == "tkernels-numpy":
            eager = by_key[(op, mode, "eager")]
            assert math.isclose(r["speedup_eager"], eager["ms"] / r["ms"]) and r["speedup"] == r["speedup_eager"]
        else:
            assert r["speedup"] is None and r["speedup_eager"] is None


def test_tiny_run_csv_matches_json(tiny_run):
    _, _, files = tiny_run
    with open(files["csv"], newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == report.ROW_FIELDS
        rows = list(reader)
    expected = json.load(open(files["json"]))
    assert len(rows) == len(expected)
    for got, want in zip(rows, expected):
        assert (got["op"], got["mode"], got["provider"]) == (want["op"], want["mode"], want["provider"])
        assert math.isclose(float(got["ms"]), want["ms"]) and got["cpu_figure"] == "True"


def test_tiny_run_table_plot_and_markdown(tiny_run):
    _, out, files = tiny_run
    lines = out.splitlines()
    assert lines[0].startswith("*** CPU FIGURES, NOT GPU TIMINGS")
    header = next(line for line in lines if line.startswith("op "))
    assert all(h in header for h in ("shape", "dtype", "mode", "provider", "ms", "TFLOP/s", "GB/s", "vs eager", "on"))
    body = [line for line in lines if line.startswith(("linear ", "relu "))]
    assert len(body) == 12 and all(line.rstrip().endswith("CPU") for line in body)
    with open(files["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    markdown = open(files["md"]).read()
    assert "CPU FIGURES, NOT GPU TIMINGS" in markdown and "| linear |" in markdown and "out.png" in markdown


def test_load_renders_saved_results(capsys, tiny_run, tmp_path):
    _, _, files = tiny_run
    rc, out, _ = bench(capsys, "--load", files["json"], "--markdown", str(tmp_path / "r.md"))
    assert rc == 0 and "tkernels-numpy" in out and (tmp_path / "r.md").exists()
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "rows"}')
    rc, _, err = bench(capsys, "--load", str(bad))
    assert rc == 2 and "not a tkernels bench JSON file" in err


def test_progress_bar_on_stderr(capsys):
    rc, _, err = bench(capsys, "relu", "--shapes", "8x8", "--mode", "fwd", "--device", "cpu", "--warmup", "0",
                       "--rep", "1")
    assert rc == 0
    assert "[" in err and "0/2 relu 8x8 fp32 fwd tkernels-numpy" in err and "done: 2 steps" in err


# ---------------------------------------------------------------------------------------------
# --check, and every case builder (ops that have not landed yet stand in with torch's own)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def all_ops(monkeypatch):
    """Make every op available: the ones tkernels does not export yet are torch's own functions,
    which exercises the builders' inputs, calls and counts before the kernels land."""
    for name, spec in cases.OPS.items():
        if spec.kind == "functional" and not hasattr(tkernels.functional, name):
            monkeypatch.setattr(tkernels.functional, name, getattr(F, name), raising=False)
    if not all(spec.available() for spec in cases.OPS.values()):
        optim = sys.modules.get("tkernels.optim") or types.ModuleType("tkernels.optim")
        for name in ("SGD", "AdamW"):
            if not hasattr(optim, name):
                monkeypatch.setattr(optim, name, getattr(torch.optim, name), raising=False)
        monkeypatch.setitem(sys.modules, "tkernels.optim", optim)
    assert all(spec.available() for spec in cases.OPS.values())


def test_check_smoke_suite_passes_for_every_op(capsys, all_ops, tmp_path):
    out_json = tmp_path / "check.json"
    rc, out, err = bench(capsys, "--suite", "smoke", "--check", "--json", str(out_json), *FAST)
    rows = json.load(open(out_json))
    assert rc == 0, out + err
    assert {r["op"] for r in rows} == set(suites.SUITES["smoke"].ops)
    for r in rows:
        assert list(r) == list(report.CHECK_FIELDS)
        assert r["check"] == "pass" and r["err"] <= r["tol"], r
    assert "pass" in out and "FAIL" not in out


def test_check_catches_a_wrong_kernel(capsys, monkeypatch):
    monkeypatch.setattr(tkernels.functional, "relu", lambda input, inplace=False: F.relu(input) * 1.01)
    rc, out, err = bench(capsys, "relu", "--shapes", "17x33", "--check", *FAST)
    assert rc == 1 and "FAIL" in out and "checks failed" in err


def test_smoke_suite_runs_every_mode_of_every_op(capsys, all_ops, tmp_path):
    out_json = tmp_path / "smoke.json"
    rc, out, err = bench(capsys, "--suite", "smoke", "--mode", "fwd,bwd,fwd+bwd", "--json", str(out_json), *FAST)
    rows = json.load(open(out_json))
    assert rc == 0, [r["error"] for r in rows if r["error"]]
    optimizers = {"SGD", "AdamW"}
    assert {(r["op"], r["mode"]) for r in rows} == (
        {(op, m) for op in suites.SUITES["smoke"].ops if op not in optimizers for m in ("fwd", "bwd", "fwd+bwd")}
        | {(op, "step") for op in optimizers})
    assert all(r["ms"] > 0 for r in rows)


def test_a_failing_provider_becomes_an_error_row(capsys, monkeypatch):
    def broken(input, inplace=False):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(tkernels.functional, "relu", broken)
    rc, out, _ = bench(capsys, "relu", "--shapes", "8x8", "--mode", "fwd", *FAST)
    assert rc == 1 and "RuntimeError: kernel exploded" in out and "eager" in out


# ---------------------------------------------------------------------------------------------
# Suites, counts, timing and roofline arithmetic
# ---------------------------------------------------------------------------------------------
def test_suites_are_real_model_shapes_and_all_parse():
    shapes = suites.resnet50_parameter_shapes()
    assert len(shapes) == 161 and sum(math.prod(s) for s in shapes) == 25_557_032  # torchvision's count
    linear = {(e.dims, e.params["activation"]) for e in suites.SUITES["linear"].entries}
    assert ((4096, 4096, 4096), "gelu") in linear and ((8192, 4096, 1024), "gelu") in linear
    assert {e.dims[1] for e in suites.SUITES["classifier"].entries} == {10, 1000, 32000, 128000}
    for suite in suites.SUITES.values():
        for e in suite.entries:
            spec = cases.get_op(e.op)
            shape = spec.shape(e.dims, e.params, e.label)
            assert spec.parse_shape(str(shape)) == cases.Shape(shape.dims, shape.params), (suite.name, str(shape))
            case = spec.builder(spec, shape.dims, {**spec.defaults, **dict(shape.params)}, torch.float16,
                                torch.device("cpu"))  # nothing is allocated until make_inputs
            for mode in spec.modes:
                assert case.bytes[mode] > 0
                if e.op in ("linear", "conv2d"):
                    assert case.flops[mode] > 0


def test_cost_formulas():
    lin = cases.OPS["linear"].builder(cases.OPS["linear"], (2, 3, 4), {"activation": "identity", "bias": 1},
                                      torch.float32, torch.device("cpu"))
    assert lin.flops == {"fwd": 48.0, "bwd": 96.0, "fwd+bwd": 144.0}
    assert lin.bytes["fwd"] == (8 + 12 + 3 + 6) * 4  # x, W, b read; y written
    assert lin.bytes["bwd"] == (6 + 8 + 12 + 8 + 12 + 3) * 4  # dy, x, W read; dx, dW, db written
    conv = cases.OPS["conv2d"].builder(cases.OPS["conv2d"], (1, 2, 5, 5, 3, 3),
                                       {"stride": 2, "padding": "half", "groups": 1, "bias": 0},
                                       torch.float16, torch.device("cpu"))
    assert conv.flops["fwd"] == 2 * (1 * 3 * 3 * 3) * 2 * 3 * 3  # 3x3 outputs, 18 MACs each
    sgd = cases.OPS["SGD"].builder(cases.OPS["SGD"], (10, 2), {**cases.OPS["SGD"].defaults}, torch.float32,
                                   torch.device("cpu"))
    assert sgd.bytes == {"step": 5 * 20 * 4}  # read param, grad, momentum; write param, momentum


def test_cpu_timer_quantiles():
    t = timing.time_cpu(lambda: sum(range(2000)), warmup_ms=0, rep_ms=2)
    assert 0 < t.ms_p20 <= t.ms <= t.ms_p80


def test_rotation_exceeds_l2(monkeypatch):
    assert timing.rotation_sets(1 << 20, torch.device("cpu")) == 1
    monkeypatch.setattr(timing, "l2_bytes", lambda device: 50 << 20)
    gpu = torch.device("cuda")
    assert timing.rotation_sets(60 << 20, gpu) == 2
    assert timing.rotation_sets(200 << 20, gpu) == 1
    assert timing.rotation_sets(1 << 20, gpu) == timing.MAX_SETS
    assert timing.rotation_sets(1 << 30, gpu) == 1


def test_roofline_percent():
    roof = roofline.Roofline(torch.device("cpu"), bandwidth_gbps=100.0, tflops={torch.float16: 10.0})
    # memory-bound: 1e9 bytes at 100 GB/s = 10 ms floor; measured 20 ms -> 50%
    assert math.isclose(roof.percent(20.0, None, 1e9, torch.float16), 50.0)
    # compute-bound: 1e12 FLOPs at 10 TFLOP/s = 100 ms floor; measured 125 ms -> 80%
    assert math.isclose(roof.percent(125.0, 1e12, 1e9, torch.float16), 80.0)


def test_bf16_on_the_interpreter_is_skipped_not_passed():
    provider = plan.Provider("tkernels-interpreter", "triton")
    assert "bfloat16" in runner.skip_reason(provider, torch.bfloat16)
    assert runner.skip_reason(provider, torch.float32) is None
    assert runner.failed([{"op": "x", "error": plan.SKIPPED + "why"}]) == []
    assert len(runner.failed([{"op": "x", "error": "RuntimeError: no"}])) == 1


def test_make_config_rejects_bad_values():
    with pytest.raises(BenchError, match="--warmup must be >= 0"):
        plan.make_config(warmup=-1, device="cpu")
    with pytest.raises(BenchError, match="unknown device"):
        plan.make_config(device="tpu")


def test_gpu_timing_calls_do_bench_with_quantiles_and_rotates(monkeypatch):
    """The CUDA branch, with do_bench faked (no GPU here): every input set is called once
    untimed, then do_bench gets the rotating callable, the warm-up/rep budget and the quantiles."""
    import triton.testing

    seen = {}

    def fake_do_bench(fn, warmup, rep, quantiles):
        seen.update(warmup=warmup, rep=rep, quantiles=quantiles)
        for _ in range(4):
            fn()
        return [2.0, 1.5, 2.5]

    def fake_cudagraph(fn, rep, quantiles):
        seen.update(graph_rep=rep)
        fn()
        return [1.0, 0.5, 1.5]

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", fake_cudagraph)
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    t = timing.time_callables(fns, torch.device("cuda"), warmup_ms=7, rep_ms=30)
    assert (t.ms, t.ms_p20, t.ms_p80) == (2.0, 1.5, 2.5)
    assert seen == {"warmup": 7, "rep": 30, "quantiles": [0.5, 0.2, 0.8]}
    assert calls == [0, 1, 2, 0, 1, 2, 0]  # one untimed call each, then round-robin
    t = timing.time_callables(fns, torch.device("cuda"), warmup_ms=7, rep_ms=30, cuda_graphs=True)
    assert t.ms == 1.0 and seen["graph_rep"] == 30


@pytest.mark.parametrize("channels_last", [0, 1])
def test_batch_norm_case_takes_the_layout_and_the_large_suite_covers_both(channels_last):
    """`channels_last=1` gives both providers a channels_last input (the large ResNet-50 suite
    measures each layout against the copy bandwidth); the default stays NCHW."""
    spec = cases.OPS["batch_norm"]
    params = dict(spec.defaults, channels_last=channels_last)
    case = spec.builder(spec, (2, 3, 4, 5), params, torch.float32, torch.device("cpu"))
    x = case.make_inputs(True)[0]
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert x.is_contiguous(memory_format=layout) and x.requires_grad and x.is_leaf
    assert not channels_last or not x.is_contiguous()
    large = suites.SUITES["resnet50-bn-large"].entries
    assert {e.params["channels_last"] for e in large} == {0, 1}
    assert {e.dims for e in large} >= {(256, 64, 112, 112), (256, 256, 56, 56), (256, 2048, 7, 7)}
