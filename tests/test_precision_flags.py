"""fp32 products follow torch's precision flags: convolutions cuDNN's (TF32 by default), matmuls
torch.backends.cuda.matmul / set_float32_matmul_precision (exact by default). The interpreter
ignores input_precision, so what is checked here is the precision each kernel launch is given."""
import contextlib

import pytest
import torch

import tkernels.functional as F
from tkernels.ops import _common
from helpers import device_for


@pytest.fixture
def precisions(monkeypatch):
    """INPUT_PRECISION of every tuned kernel launch during the test."""
    log = []
    original = _common.Tuned.launcher

    class Recording:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if "INPUT_PRECISION" in kwargs:
                    log.append(kwargs["INPUT_PRECISION"])
                return self.kernel[grid](*args, **kwargs)
            return launch

    def launcher(self, device):
        kernel, meta = original(self, device)
        return Recording(kernel), meta

    monkeypatch.setattr(_common.Tuned, "launcher", launcher)
    return log


@contextlib.contextmanager
def _matmul_tf32():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _conv_ieee():
    return torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False)


def test_defaults_are_torchs():
    assert _common.tl_input_precision(torch.float32, "matmul") == "ieee"
    assert _common.tl_input_precision(torch.float32, "conv") == "tf32"
    for dtype in (torch.float16, torch.bfloat16):
        assert _common.tl_input_precision(dtype, "matmul") == _common.tl_input_precision(dtype, "conv") == "ieee"


def test_flags_switch_each_family_alone():
    with _matmul_tf32():
        assert _common.tl_input_precision(torch.float32, "matmul") == "tf32"
        assert _common.tl_input_precision(torch.float32, "conv") == "tf32"
    with _conv_ieee():
        assert _common.tl_input_precision(torch.float32, "conv") == "ieee"
        assert _common.tl_input_precision(torch.float32, "matmul") == "ieee"


def test_new_fp32_precision_api():
    """torch >= 2.9: torch.backends.cudnn.conv.fp32_precision and torch.backends.cuda.matmul.fp32_precision."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has no fp32_precision API (the legacy flags are tested above)")
    matmul = torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    try:
        conv.fp32_precision, matmul.fp32_precision = "ieee", "tf32"
        assert _common.tl_input_precision(torch.float32, "conv") == "ieee"
        assert _common.tl_input_precision(torch.float32, "matmul") == "tf32"
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved



def test_fast_precision_read_matches_the_holders():
    """The C-getter read (a launch-time fast path) answers as walking torch.backends' holders does,
    for every combination of the generic, backend and op levels."""
    if _common._FP32_PRECISION_GETTER is None:
        pytest.skip(f"torch {torch.__version__} has no fp32_precision API (only the holder walk exists)")
    b = torch.backends
    holders = {"matmul": (b.cuda.matmul, b), "conv": (b.cudnn.conv, b.cudnn, b)}
    levels = [(b, "fp32_precision"), (b.cudnn, "fp32_precision"), (b.cudnn.conv, "fp32_precision"),
              (b.cuda.matmul, "fp32_precision")]
    saved = [getattr(h, a) for h, a in levels]
    seen = set()
    try:
        for generic in ("none", "ieee", "tf32"):
            for cuda_all in ("none", "ieee", "tf32"):
                for op_level in ("none", "ieee", "tf32"):
                    b.fp32_precision, b.cudnn.fp32_precision = generic, cuda_all
                    b.cudnn.conv.fp32_precision = b.cuda.matmul.fp32_precision = op_level
                    for op, chain in holders.items():
                        expected = _common._tf32_allowed(chain, lambda: pytest.fail("legacy flag read"))
                        assert _common._tf32_allowed_fast(op) == expected, (op, generic, cuda_all, op_level)
                        seen.add(expected)
    finally:
        for (h, a), value in zip(levels, saved):
            setattr(h, a, value)
    assert seen == {True, False}

def _linear_step(dev):
    x = torch.randn(16, 16, device=dev, requires_grad=True)
    w = torch.randn(16, 16, device=dev, requires_grad=True)
    F.linear(x, w, activation="gelu").sum().backward()


def _conv_step(dev, kernel_size):
    x = torch.randn(2, 16, 5, 5, device=dev).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(16, 16, kernel_size, kernel_size, device=dev, requires_grad=True)
    F.conv2d(x, w, padding=kernel_size // 2).sum().backward()


@pytest.mark.parametrize("kernel_size", [3, 1], ids=["3x3", "1x1-as-gemm"])
def test_launches_follow_the_flags(precisions, kernel_size):
    dev = device_for("triton")
    _linear_step(dev)
    assert precisions and set(precisions) == {"ieee"}, f"linear, default flags: {precisions}"
    precisions.clear()
    _conv_step(dev, kernel_size)
    assert precisions and set(precisions) == {"tf32"}, f"conv, default flags: {precisions}"
    precisions.clear()
    with _matmul_tf32(), _conv_ieee():
        _linear_step(dev)
        assert set(precisions) == {"tf32"}, f"linear with matmul TF32 allowed: {precisions}"
        precisions.clear()
        _conv_step(dev, kernel_size)
        assert precisions and set(precisions) == {"ieee"}, f"conv with cuDNN TF32 off: {precisions}"
    precisions.clear()
    F.linear(torch.randn(4, 16, device=dev, dtype=torch.float16), torch.randn(8, 16, device=dev, dtype=torch.float16))
    assert set(precisions) == {"ieee"}
