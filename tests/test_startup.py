"""Start-up cost. `tkernels --help` and argument errors answer without importing torch, and eager use
of the ops never imports torch._dynamo (torch.compile's machinery, about 1.5 s). Each check runs
in a fresh interpreter, since this one has imported everything long ago."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tkernels

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "triton", "numpy", "torch._dynamo")


def fresh_python(code: str, **env: str) -> dict:
    """Run ``code`` in a new interpreter (this checkout first on the path); it prints one JSON line."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CLI = """
import contextlib, io, json, runpy, sys
argv = {argv!r}
sys.argv = ["tkernels", *argv]
err = io.StringIO()
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(err):
    try:
        runpy.run_module("tkernels", run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code
print(json.dumps({{"code": code, "out": out.getvalue(), "err": err.getvalue(),
                  "loaded": [m for m in {heavy!r} if m in sys.modules]}}))
"""


@pytest.mark.parametrize("argv, code, says", [
    (["--help"], 0, "train"),
    (["bench", "--help"], 0, "--threads"),
    (["train", "--help"], 0, "--epochs"),
    (["inspect", "--help"], 0, "--arch"),
    (["nosuchcommand"], 2, "invalid choice"),
    (["bench", "--no-such-flag"], 2, "unrecognized arguments"),
    (["bench", "--threads", "many"], 2, "invalid int value"),
    (["train", "--model", "alexnet"], 2, "invalid choice"),
    (["inspect", "--jobs", "x"], 2, "invalid int value"),
])
def test_help_and_argument_errors_do_not_import_torch(argv, code, says):
    result = fresh_python(CLI.format(argv=argv, heavy=HEAVY))
    assert result["code"] == code and says in result["out"] + result["err"], result
    assert result["loaded"] == [], f"tkernels {' '.join(argv)} imported {result['loaded']}"


EAGER_MODEL = """
import json, sys
import torch
import tkernels
from tkernels import nn

torch.manual_seed(0)
model = torch.nn.Sequential(
    nn.Conv2d(1, 2, 3, padding=1, activation="relu"), nn.BatchNorm2d(2, activation="silu"), nn.MaxPool2d(2),
    nn.AvgPool2d(1), nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), nn.Linear(8, 5, activation="gelu"),
    nn.Dropout(0.25), nn.Linear(5, 4))
x, target = torch.randn(3, 1, 6, 6), torch.tensor([0, 3, 1])
logits = model(x)
loss = nn.CrossEntropyLoss()(logits, target) + tkernels.functional.mse_loss(logits.softmax(1), logits.sigmoid())
loss = loss + tkernels.functional.log_softmax(logits, 1).mean() + tkernels.functional.tanh(logits).sum()
loss.backward()
assert all(p.grad is not None for p in model.parameters())
print(json.dumps({"dynamo": "torch._dynamo" in sys.modules, "interpret": tkernels.INTERPRET}))
"""


@pytest.mark.parametrize("interpret", ["0", "1"], ids=["numpy-backend", "triton-interpreter"])
def test_eager_forward_and_backward_do_not_import_dynamo(interpret):
    result = fresh_python(EAGER_MODEL, TRITON_INTERPRET=interpret)
    assert result == {"dynamo": False, "interpret": interpret == "1"}


def test_kernels_load_in_the_mode_read_at_import():
    """TRITON_INTERPRET is read at `import tkernels`; the kernels, defined later on first use, follow
    that value even if the variable changed in between (and the variable is left as the user set it)."""
    code = """
import json, os
import tkernels
os.environ["TRITON_INTERPRET"] = "1"
from tkernels.ops import _common
kinds = sorted({type(spec.kernel).__name__ for spec in _common.KERNEL_SPECS.values()})
print(json.dumps({"interpret": tkernels.INTERPRET, "kinds": kinds, "env": os.environ["TRITON_INTERPRET"]}))
"""
    result = fresh_python(code, TRITON_INTERPRET="0")
    assert result == {"interpret": False, "kinds": ["JITFunction"], "env": "1"}


def test_lazy_package_attributes():
    assert {"nn", "functional", "optim", "models", "use_backend", "INTERPRET"} <= set(dir(tkernels))
    assert tkernels.nn.Linear.__module__ == "tkernels.nn.linear"
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        tkernels.nonexistent
