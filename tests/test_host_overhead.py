"""`tkernels bench --host-overhead`: the launch stub, the case list, the rows and the files."""
import csv
import json

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

import tkernels.functional
import tkernels.nn
from tkernels.bench import host_overhead as ho
from tkernels.cli import main


@pytest.fixture(autouse=True)
def _one_thread(one_cpu_thread):
    yield


def test_launch_stub_counts_launches_and_restores_the_interpreter():
    original = InterpretedFunction.__dict__.get("__getitem__")
    x = torch.randn(4, 16)
    w = torch.randn(8, 16)
    with ho.launches_stubbed() as launches:
        y = tkernels.functional.linear(x, w)
        assert launches[0] == 1
    assert InterpretedFunction.__dict__.get("__getitem__") is original
    z = tkernels.functional.linear(x, w)  # really computed again
    torch.testing.assert_close(z, x @ w.t(), rtol=1e-5, atol=1e-5)
    assert y.shape == z.shape


def test_every_public_op_and_module_has_a_case():
    names = " ".join(ho.case_label(c) for c in ho.all_cases()).lower()
    modules = [n for n in tkernels.nn.__all__ if n[0].isupper() and n not in ("SyncBatchNorm", "ConversionReport")]
    missing = [n for n in modules if n.lower() not in names]
    assert not missing, f"modules without a host-overhead case: {missing}"
    functional_only = ("cross_entropy", "mse_loss")
    assert all(n in names for n in functional_only)
    for kind in ("fwd", "fwd+bwd"):
        assert f"linear {kind}" in names and f"batchnorm2d train {kind}" in names
    assert "adamw step" in names and "lenet train step" in names


def test_rows_compare_with_torch_and_carry_the_targets():
    rows = ho.run(ho.HOST, rounds=1, round_ms=1.0, only=["Linear fwd", "cross_entropy fwd+bwd", "LeNet train"])
    labels = [(r["case"], r["mode"]) for r in rows]
    assert labels == [("Linear", "fwd"), ("Linear", "fwd+bwd"), ("cross_entropy", "fwd+bwd"),
                      ("LeNet train step (AdamW, CE)", "step")]
    by_case = {(r["case"], r["mode"]): r for r in rows}
    assert by_case[("Linear", "fwd")]["launches_per_call"] == 1
    assert by_case[("Linear", "fwd+bwd")]["launches_per_call"] == 3  # forward, dX and dW (bias by-product)
    assert by_case[("LeNet train step (AdamW, CE)", "step")]["launches_per_call"] > 10
    for r in rows:
        assert r["tkernels_us"] > 0 and r["torch_us"] > 0
        assert r["ratio"] == pytest.approx(r["tkernels_us"] / r["torch_us"], rel=0.02)
        assert r["where"] == ho.HOST
    assert by_case[("Linear", "fwd")]["target"] == 2.0 and by_case[("cross_entropy", "fwd+bwd")]["target"] is None
    lenet = by_case[("LeNet train step (AdamW, CE)", "step")]
    assert lenet["target"] == 1.5 and lenet["ok"] == (lenet["ratio"] <= 1.5)


def test_cli_writes_json_and_csv(tmp_path, capsys):
    rc = main(["bench", "--host-overhead", "ReLU", "--rep", "2", "--json", str(tmp_path / "h.json"),
               "--csv", str(tmp_path / "h.csv")])
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "h.json").read_text())
    assert [(r["case"], r["mode"]) for r in rows] == [("ReLU", "fwd"), ("ReLU", "fwd+bwd")]
    assert rc == 0
    assert "| ReLU fwd | host (launch stubbed) |" in out
    with open(tmp_path / "h.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["case"] for r in table] == ["ReLU", "ReLU"] and tuple(table[0]) == ho.FIELDS


def test_the_cuda_wall_measurement_refuses_the_interpreter():
    with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=unset"):
        ho.run(ho.CUDA_WALL, only=["ReLU"])


def test_host_floor_calls_compute_what_they_stand_for():
    """benchmarks/host_floor.py times the least a Python op can do; its calls must still be the real
    launches (run here, unstubbed, through the interpreter), or the floor would understate the cost."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "host_floor.py"
    spec = importlib.util.spec_from_file_location("host_floor", path)
    floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floor)
    torch.manual_seed(0)
    layer, x = floor._FloorLinearModule(16, 8), torch.randn(4, 16)
    with tkernels.use_backend("triton"):
        y = layer(x)
        logits, labels = torch.randn(4, 10), torch.randint(0, 10, (4,))
        loss = floor._floor_cross_entropy(logits, labels)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert y.requires_grad  # built through autograd.Function.apply, as a real layer's output
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels), rtol=1e-5, atol=1e-6)
