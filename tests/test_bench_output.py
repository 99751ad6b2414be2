"""`tkernels bench` output that a reader can trust: thread counts pinned and recorded, CPU providers
timed side by side, ratios within noise marked, rows printed as they complete, and `-` meaning
standard output for JSON and CSV."""
import csv
import io
import json

import pytest
import threadpoolctl
import torch

import tkernels
import tkernels.functional
from tkernels.bench import plan, report, runner, timing
from test_bench_cli import FAST, bench

RELU = ["relu", "--shapes", "8x8", "--mode", "fwd"]


# ---------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("threads", [1, 2])
def test_threads_are_pinned_recorded_and_restored(capsys, tmp_path, threads):
    seen = []
    relu = tkernels.functional.relu

    def spy(input, inplace=False):
        seen.append(torch.get_num_threads())
        return relu(input, inplace)

    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(tkernels.functional, "relu", spy)
            rc, out, _ = bench(capsys, *RELU, "--threads", str(threads), "--json", str(tmp_path / "r.json"),
                               "--markdown", str(tmp_path / "r.md"), *FAST)
        assert torch.get_num_threads() == 3  # restored after the run
    finally:
        torch.set_num_threads(previous)
    assert rc == 0 and seen and set(seen) == {threads}
    with threadpoolctl.threadpool_limits(limits=threads, user_api="blas"):  # what BLAS grants (<= the cores)
        blas = max(info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas")
    rows = json.load(open(tmp_path / "r.json"))
    assert {(r["torch_threads"], r["blas_threads"]) for r in rows} == {(threads, blas)}
    assert f"threads: torch {threads}, BLAS {blas}" in out
    assert f"| torch_threads | {threads} |" in (tmp_path / "r.md").read_text()


def test_threads_zero_keeps_the_libraries_defaults(capsys, tmp_path):
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rc, _, _ = bench(capsys, *RELU, "--threads", "0", "--json", str(tmp_path / "r.json"), *FAST)
    finally:
        torch.set_num_threads(previous)
    assert rc == 0 and {r["torch_threads"] for r in json.load(open(tmp_path / "r.json"))} == {2}


def test_bad_threads_and_two_outputs_on_stdout_are_usage_errors(capsys):
    rc, out, err = bench(capsys, *RELU, "--threads", "-1", *FAST)
    assert rc == 2 and "--threads must be >= 0" in err and out == ""
    rc, out, err = bench(capsys, *RELU, "--json", "-", "--csv", "-", *FAST)
    assert rc == 2 and "cannot both write to standard output" in err and out == ""


# ---------------------------------------------------------------------------------------------
# --json - / --csv -
# ---------------------------------------------------------------------------------------------
def test_json_dash_is_stdout_and_the_table_goes_to_stderr(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = bench(capsys, *RELU, "--json", "-", *FAST)
    rows = json.loads(out)  # stdout holds the JSON and nothing else
    assert rc == 0 and [r["provider"] for r in rows] == ["tkernels-numpy", "eager"]
    assert "CPU FIGURES" in err and "tkernels-numpy" in err
    assert list(tmp_path.iterdir()) == []  # no file named '-'


def test_csv_dash_is_stdout(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = bench(capsys, *RELU, "--csv", "-", "--json", "rows.json", *FAST)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rc == 0 and [r["provider"] for r in rows] == ["tkernels-numpy", "eager"]
    assert rows[0]["torch_threads"] == "1" and "op " in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]


# ---------------------------------------------------------------------------------------------
# Rows as they complete
# ---------------------------------------------------------------------------------------------
def test_each_row_is_printed_when_its_case_completes(monkeypatch):
    out = io.StringIO()
    printed_before_each_timing = []
    real = runner.time_cpu_interleaved

    def spy(*args, **kwargs):
        printed_before_each_timing.append(out.getvalue().count("tkernels-numpy"))
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "time_cpu_interleaved", spy)
    cfg = plan.make_config(ops=["relu"], shapes=["8x8", "9x9", "10x10"], mode=["fwd"], device="cpu",
                           warmup=0, rep=1, progress=False)
    assert runner.execute(cfg, out=out) == 0
    assert printed_before_each_timing == [0, 1, 2]  # case k's row is out before case k+1 is timed
    body = [line for line in out.getvalue().splitlines() if line.startswith("relu ")]
    assert [line.split()[1] for line in body] == ["8x8", "8x8", "9x9", "9x9", "10x10", "10x10"]
    # columns stay aligned although the rows were printed one case at a time
    assert len({line.index(" fp32 ") for line in body}) == 1


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_stays_below_the_printed_rows():
    terminal, out = FakeTerminal(), io.StringIO()
    progress = report.Progress(2, stream=terminal)
    progress.step("first")
    progress.print("row one", out)
    assert out.getvalue() == "row one\n"
    bar = "\r" + "[" + "." * 30 + "] 0/2 first"
    # the bar is drawn, wiped before the row is printed, and drawn again after it
    assert terminal.getvalue().split("\r" + " " * 150 + "\r") == [bar.ljust(151), bar.ljust(151)]


# ---------------------------------------------------------------------------------------------
# Ratios within noise
# ---------------------------------------------------------------------------------------------
def _timed(provider, ms, p20, p80):
    return {"provider": provider, "ms": ms, "ms_p20": p20, "ms_p80": p80}


def test_a_ratio_is_within_noise_when_a_spread_exceeds_the_gap():
    assert report.spread_exceeds_difference(_timed("a", 1.0, 0.9, 1.1), _timed("b", 1.1, 1.05, 1.15))
    assert not report.spread_exceeds_difference(_timed("a", 1.0, 0.9, 1.1), _timed("b", 2.0, 1.9, 2.1))
    assert report.spread_exceeds_difference(_timed("a", 1.0, 0.99, 1.01), _timed("b", 2.0, 1.0, 3.5))


def test_noisy_ratios_are_marked_in_rows_table_and_markdown(tmp_path):
    group = [{**_timed("tkernels-numpy", 1.0, 0.8, 1.3), "speedup_eager": None, "speedup_compile": None},
             {**_timed("eager", 1.1, 1.0, 1.2)}, {**_timed("compile", 3.0, 2.9, 3.1)}]
    runner._add_speedups(group, ["eager", "compile"])
    ours = group[0]
    assert ours["noisy_eager"] is True and ours["noisy_compile"] is False
    assert ours["speedup"] == ours["speedup_eager"] == pytest.approx(1.1)
    rows = [{**r, "op": "relu", "case": "", "shape": "8x8", "dtype": "fp32", "mode": "fwd", "suite": "s"}
            for r in group]
    text = report.format_table(rows) + "\n" + "\n".join(report.notes(rows))
    assert "1.10x?" in text and "3.00x" in text and "3.00x?" not in text
    assert '"?" after a ratio (1 of 3 rows): within noise' in text
    report.write_markdown(str(tmp_path / "r.md"), rows)
    assert "1.10x?" in (tmp_path / "r.md").read_text() and "within noise" in (tmp_path / "r.md").read_text()


# ---------------------------------------------------------------------------------------------
# Side-by-side CPU timing
# ---------------------------------------------------------------------------------------------
def test_cpu_providers_are_timed_in_alternating_rounds_inside_their_contexts():
    calls, entered = [], []

    class Context:
        def __init__(self, i):
            self.i = i

        def __enter__(self):
            entered.append(self.i)

        def __exit__(self, *exc):
            return False

    timings = timing.time_cpu_interleaved([lambda: calls.append(0), lambda: calls.append(1)], warmup_ms=0,
                                          rep_ms=20, contexts=[lambda: Context(0), lambda: Context(1)])
    assert len(timings) == 2 and all(0 < t.ms_p20 <= t.ms <= t.ms_p80 for t in timings)
    assert calls[:8] == [0, 1, 1, 0, 0, 1, 1, 0] and entered == calls
    assert len(calls) >= 2 * 4  # the first round, then at least three timed rounds


def test_a_call_that_fails_while_timed_is_named_by_index():
    def flaky(count=[0]):
        count[0] += 1
        if count[0] == 3:
            raise ValueError("third call")
    with pytest.raises(timing.CallFailed) as failure:
        timing.time_cpu_interleaved([lambda: None, flaky], warmup_ms=0, rep_ms=1)
    assert failure.value.index == 1 and isinstance(failure.value.__cause__, ValueError)


def test_a_provider_failing_mid_measurement_leaves_the_others_timed(capsys, monkeypatch):
    relu, count = tkernels.functional.relu, [0]

    def fails_on_the_third_call(input, inplace=False):
        count[0] += 1
        if count[0] == 3:
            raise RuntimeError("gave up on call 3")
        return relu(input, inplace)

    monkeypatch.setattr(tkernels.functional, "relu", fails_on_the_third_call)
    rc, out, _ = bench(capsys, *RELU, *FAST)
    assert rc == 1 and "RuntimeError: gave up on call 3" in out
    eager = next(line.split() for line in out.splitlines() if line.startswith("relu ") and " eager " in line)
    assert eager[4] == "eager" and float(eager[5]) > 0
