"""The sm_90 TMA matmul (tkernels/ops/matmul_tma.py) run through Triton's interpreter, which
implements tensor descriptors: every operand layout (A and B plain or transposed), the forward
epilogue (bias, stored pre-activation, activation, split into column slices) and the gated
backward with its bias row sums, on odd shapes, against float64 NumPy; then Linear end to end
with the TMA path forced, and the fallback when TMA cannot address an operand.

fp16 only: the interpreter computes bf16 tl.dot wrongly (triton issue 11584) and fp32 never takes
this path; bf16 builds are proven by `tkernels inspect` (matmul_tma*, sm_90: UTMALDG + HGMMA).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tkernels.functional as F
from tkernels.activations import Activation, resolve_activation
from tkernels.ops import matmul as matmul_ops
from tkernels.ops import matmul_tma
from tkernels.reference import activations as np_act
from helpers import DEVICE, assert_close, log_tuned_launches, to_numpy64

pytestmark = [
    pytest.mark.skipif(not matmul_tma.HAS_TENSOR_DESCRIPTORS,
                       reason="this triton has no tl.make_tensor_descriptor (triton < 3.4)"),
    pytest.mark.skipif(DEVICE.type == "cuda" and torch.cuda.get_device_capability(DEVICE)[0] != 9,
                       reason="the TMA matmul is built for sm_90 only; this GPU runs the cp.async kernel"),
]
ALIGN = 8  # fp16 elements in 16 bytes: TMA needs 16-byte aligned rows and bases


class Framed:
    """A (rows, cols) fp16 matrix inside a NaN buffer: aligned row padding and margins, so it is
    TMA-addressable, an out-of-bounds read shows as NaN and a stray write as a non-NaN margin.
    ``transposed`` stores it column-major (unit stride along rows)."""

    def __init__(self, values: torch.Tensor, transposed: bool = False):
        rows, cols = values.shape
        inner, outer = (rows, cols) if transposed else (cols, rows)
        pitch = (inner + ALIGN - 1) // ALIGN * ALIGN + ALIGN
        self.buffer = torch.full((ALIGN * 2 + pitch * outer + ALIGN,), float("nan"), dtype=values.dtype,
                                 device=DEVICE)
        strides = (1, pitch) if transposed else (pitch, 1)
        self.view = self.buffer.as_strided((rows, cols), strides, ALIGN * 2)
        self.view.copy_(values)
        self.covered = torch.zeros(self.buffer.shape, dtype=torch.bool, device=DEVICE)
        self.covered.as_strided((rows, cols), strides, ALIGN * 2).fill_(True)

    def assert_untouched_outside(self):
        assert torch.isnan(self.buffer[~self.covered]).all(), "a kernel wrote outside the tensor it was given"


@pytest.fixture
def tma_launches(monkeypatch):
    """Force the TMA path on CPU tensors and log which matmul kernel each launch takes."""
    monkeypatch.setattr(matmul_tma, "FORCE_TMA", True)
    names = {id(tuned): "tma_" + family for family, tuned in matmul_tma.TUNED_TMA.items()}
    names.update({id(tuned): "cp.async" for families in (matmul_ops.TUNED_MATMUL, matmul_ops.TUNED_MATMUL_GATED)
                  for tuned in families.values()})
    return log_tuned_launches(monkeypatch, names)


def _half(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).half().to(DEVICE)


def _nan(*shape):
    return torch.full(shape, float("nan"), dtype=torch.float16, device=DEVICE)


LAYOUTS = [(False, False), (False, True), (True, False), (True, True)]


@pytest.mark.parametrize("a_t, b_t", LAYOUTS)
@pytest.mark.parametrize("act", ["gelu_tanh", "relu"])
def test_forward_epilogue_every_layout(tma_launches, a_t, b_t, act):
    M, K, N = 45, 72, 88  # odd M; N not a multiple of the 32-wide tile nor of its 16-wide slices
    a, b, bias = _half(M, K), _half(K, N, scale=K ** -0.5), _half(N)
    A, B = Framed(a, a_t), Framed(b, b_t)
    out = Framed(_nan(M, N))
    z = Framed(_nan(M, N))
    kind = resolve_activation(Activation(act))
    matmul_ops.matmul(A.view, B.view, out.view, bias=bias, activation_code=kind.code, preact_out=z.view)
    assert tma_launches == ["tma_plain"]
    z_ref = to_numpy64(a) @ to_numpy64(b) + to_numpy64(bias)
    assert_close(z.view, z_ref, reduction=K, msg="pre-activation")
    assert_close(out.view, kind.numpy_forward(z_ref), reduction=K, msg="activation")
    for framed in (A, B, out, z):
        framed.assert_untouched_outside()


@pytest.mark.parametrize("a_t, b_t", LAYOUTS)
def test_gated_backward_with_row_sums(tma_launches, a_t, b_t):
    M, K, N = 40, 56, 33  # M aligned so that a transposed A keeps 16-byte rows; odd N
    a, g, b = _half(M, K), _half(M, K), _half(K, N, scale=K ** -0.5)
    A, G, B = Framed(a, a_t), Framed(g, a_t), Framed(b, b_t)
    out = Framed(_nan(M, N))
    rows = _nan(M)
    gelu = resolve_activation(Activation("gelu"))
    matmul_ops.matmul(A.view, B.view, out.view, gate=G.view, gate_activation_code=gelu.code, rowsum_out=rows)
    assert tma_launches == ["tma_gated"]
    gated = to_numpy64(a) * np_act.gelu_grad(to_numpy64(g), 0.0)
    assert_close(out.view, gated @ to_numpy64(b), reduction=K, msg="gated product")
    assert_close(rows, gated.sum(axis=1), reduction=K, msg="row sums (bias gradient)")
    for framed in (A, G, B, out):
        framed.assert_untouched_outside()


def test_linear_end_to_end_takes_the_tma_path(tma_launches):
    """Forward, input gradient and weight gradient (+ bias) of a Linear: three TMA launches."""
    M, K, N = 48, 64, 40
    x = _half(M, K).requires_grad_()
    w = _half(N, K, scale=K ** -0.5).requires_grad_()
    b = _half(N).requires_grad_()
    y = F.linear(x, w, b, activation="silu")
    gy = _half(M, N)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), gy)
    assert tma_launches == ["tma_plain", "tma_gated", "tma_gated"]
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    yd = torch.nn.functional.silu(torch.nn.functional.linear(xd, wd, bd))
    expected = torch.autograd.grad(yd, (xd, wd, bd), gy.double())
    assert_close(y, yd, reduction=K, msg="forward")
    for got, exp, red in zip((dx, dw, db), expected, (N, M, M)):
        assert_close(got, exp, reduction=red, msg="gradient")


def test_tma_switched_off_takes_the_cp_async_kernel(tma_launches, monkeypatch):
    """TKERNELS_TMA=0 (TMA_ENABLED false) wins over FORCE_TMA: a Linear's three products all take
    the cp.async kernel and give the same result."""
    monkeypatch.setattr(matmul_tma, "TMA_ENABLED", False)
    M, K, N = 48, 64, 40
    x = _half(M, K).requires_grad_()
    w = _half(N, K, scale=K ** -0.5).requires_grad_()
    y = F.linear(x, w, None, activation="silu")
    gy = _half(M, N)
    dx, dw = torch.autograd.grad(y, (x, w), gy)
    assert tma_launches == ["cp.async"] * 3
    xd, wd = (t.detach().double().requires_grad_() for t in (x, w))
    yd = torch.nn.functional.silu(xd @ wd.t())
    expected = torch.autograd.grad(yd, (xd, wd), gy.double())
    assert_close(y, yd, reduction=K, msg="forward")
    for got, exp, red in zip((dx, dw), expected, (N, M)):
        assert_close(got, exp, reduction=red, msg="gradient")


@pytest.mark.parametrize("value, enabled", [("0", False), ("", True), ("off", None)])
def test_tma_switch_is_read_from_the_environment(value, enabled):
    """TKERNELS_TMA: 0 or 1 (empty: the default, 1), anything else refused with a message naming it."""
    code = "import tkernels.ops.matmul_tma as m; print(m.TMA_ENABLED)"
    env = dict(os.environ, TKERNELS_TMA=value, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if enabled is None:
        assert proc.returncode != 0 and "TKERNELS_TMA" in proc.stderr and "expected 0" in proc.stderr, proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == str(enabled), proc.stdout


def test_operands_tma_cannot_address_take_the_cp_async_kernel(tma_launches):
    """Rows that are not 16-byte aligned (K = 37 fp16), fp32, and split-K fall back."""
    M, K, N = 20, 37, 24
    a, b = _half(M, K), _half(K, N)
    out = _nan(M, N)
    matmul_ops.matmul(a, b, out)
    assert tma_launches == ["cp.async"]
    assert_close(out, to_numpy64(a) @ to_numpy64(b), reduction=K)
    assert not matmul_tma.tma_eligible(a.float(), b.float(), out.float(), None, None, 1)
    aligned = _half(M, 40)
    assert matmul_tma.tma_eligible(aligned, _half(40, N), out, None, None, 1)
    assert not matmul_tma.tma_eligible(aligned, _half(40, N), out, None, None, 2)
    assert not torch.isnan(out).any()


def test_scratch_allocator_is_set_in_every_thread_that_launches():
    """Device-side descriptors need triton's scratch allocator, which triton keeps in a ContextVar:
    each thread starts without it. On a GPU, autograd runs CUDA backward on its own worker thread,
    so the gated backward launches where the forward's thread set nothing. Each thread that calls
    ensure_scratch_allocator must end up with the allocator set (checked in fresh threads only, so
    this process's main thread is left as it was)."""
    import threading

    from triton.runtime import _allocation

    seen = []

    def launcher_thread():
        matmul_tma.ensure_scratch_allocator()
        seen.append(_allocation._allocator.get())

    for _ in range(2):  # the forward's thread, then autograd's worker
        thread = threading.Thread(target=launcher_thread)
        thread.start()
        thread.join()
    assert len(seen) == 2
    assert not any(isinstance(allocator, _allocation.NullAllocator) for allocator in seen), seen
