"""Backend selection: context manager, setter, environment variable, and clear refusals."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import tkernels
from tkernels import _backend


def test_use_backend_restores_previous():
    assert tkernels.get_backend() == "auto"
    with tkernels.use_backend("numpy"):
        assert tkernels.get_backend() == "numpy"
        with tkernels.use_backend("triton"):
            assert tkernels.get_backend() == "triton"
        assert tkernels.get_backend() == "numpy"
    assert tkernels.get_backend() == "auto"


def test_set_backend_and_unknown_name():
    tkernels.set_backend("numpy")
    try:
        assert tkernels.get_backend() == "numpy"
    finally:
        tkernels.set_backend("auto")
    with pytest.raises(ValueError, match="unknown tkernels backend 'cuda'; expected one of auto, triton, numpy"):
        tkernels.set_backend("cuda")
    with pytest.raises(ValueError):
        with tkernels.use_backend("fast"):
            pass


def test_auto_resolution_here():
    cpu = torch.zeros(1)
    assert _backend.resolve("op", cpu) == ("triton" if tkernels.INTERPRET else "numpy")
    fake_cuda = SimpleNamespace(device=torch.device("cuda"))
    assert _backend.resolve("op", fake_cuda) == "triton"


def test_numpy_backend_refuses_cuda_tensors():
    fake_cuda = SimpleNamespace(device=torch.device("cuda"), is_cuda=True)  # (what resolve reads of a tensor)
    with tkernels.use_backend("numpy"), pytest.raises(RuntimeError, match="numpy backend runs on CPU tensors only"):
        _backend.resolve("linear", fake_cuda)


def _run(code, **env):
    full = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


def test_triton_on_cpu_without_interpreter_says_how_to_enable():
    code = ("import torch, tkernels, tkernels.functional as F\n"
            "tkernels.set_backend('triton')\n"
            "try:\n    F.linear(torch.randn(2, 3), torch.randn(4, 3))\n"
            "except RuntimeError as e:\n    print('ERR', e)\n")
    out = _run(code)
    assert "ERR" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def test_environment_variable_sets_default():
    out = _run("import tkernels; print(tkernels.get_backend())", TKERNELS_BACKEND="numpy")
    assert out.stdout.strip() == "numpy", out.stderr
    out = _run("import tkernels", TKERNELS_BACKEND="gpu")
    assert out.returncode != 0 and "unknown tkernels backend 'gpu'" in out.stderr
