"""Declared once, used by every test family: tolerances, devices, canaries and shape lists."""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import numpy as np
import pytest
import torch

import tkernels
from tkernels import testing as _model

DEVICE = torch.device(os.environ.get("TKERNELS_TEST_DEVICE", "cpu"))
ON_INTERPRETER = tkernels.INTERPRET

# Odd sizes that divide no block size, plus the degenerate ones.
ODD_SIZES = (1, 3, 17, 33)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The tolerance model lives in tkernels/testing.py (bench --check uses the same one):
#   |actual - expected| <= R*scale*|expected| + scale*max|expected|*(A + A_acc*max(1, sqrt(K/256)))
# R is a few units of the dtype's roundoff, A the normwise share left by low-precision
# intermediates under cancellation, A_acc the fp32 accumulation of K terms. Nothing is an
# absolute O(1) constant, so a 1% error in any output is seen in every dtype
# (benchmarks/mutation_check.py proves it kernel by kernel).
#
# GPU tolerance model (TKERNELS_TEST_DEVICE=cuda, as benchmarks/gpu_check.sh runs the suite):
# * fp32 division, sqrt/rsqrt, exp and log lower to approximate instructions on NVIDIA GPUs:
#   div.full.f32 and sqrt.approx are within 2 ulp (2.4e-7 relative); ex2.approx/lg2.approx are
#   within 2 ulp too, but exp(x) = ex2(x*log2(e)) also rounds its argument, which costs
#   |x|*2^-24 relative: ~1e-6 for the |x| ~ 20 of softmax/cross-entropy logits, ~6e-6 for |x| ~ 100.
# * FMA contraction (TRITON_DEFAULT_FP_FUSION=1, also set here) fuses a*b+c with one rounding
#   instead of two: each multiply-add moves by up to 1 ulp either way, in sums a random walk.
# * tf32: fp32 matmul/conv run on tensor cores with 10-bit significands when
#   torch.backends.cuda.matmul.allow_tf32 is set; products then carry 2^-11 relative error and
#   a K-sum a normwise ~2^-11*sqrt(K)*rms, so such results use the "tf32" entry (R=3e-3, A=2e-3).
# fp32's R = 2e-5 and A = 1e-5 are ~340 and ~170 units of roundoff, far above the 2-20 units the
# first two points cost, so on CUDA fp32 tolerances are only doubled (CUDA_FP32_WIDENING: the
# exp/log of large arguments), tf32 is used where allowed, and fp16/bf16 (dominated by their own
# output rounding, which the GPU does exactly like the interpreter) are not widened at all.
# A CUDA run thus passes for the right reasons: a 1% error still exceeds every widened tolerance.

TOLERANCES = _model.TOLERANCES  # (R, A) per dtype key; see tkernels/testing.py

# Comparisons made by the running test (tests/conftest.py checks that a Triton-backend test that
# compared results also launched its family's kernels), and its launch record (tests/launches.py).
COMPARISONS = [0]
LAUNCHES = [None]


def on_triton() -> bool:
    """Whether ops called now run the Triton kernels (backend forced, or auto on the test device)."""
    backend = tkernels.get_backend()
    return backend == "triton" or (backend == "auto" and (DEVICE.type == "cuda" or ON_INTERPRETER))


def expect_kernels(*names: str) -> None:
    """On the Triton backend, assert that each named kernel launched in this test so far: a kernel
    quietly replaced by torch code (right values, no launch) then fails."""
    if on_triton():
        LAUNCHES[0].assert_ran(*names)


def tolerance(dtype, expected_max: float, reduction: int = 1, scale: float = 1.0, product: str = "any"):
    return _model.tolerance(_model.dtype_key(dtype, DEVICE, product), expected_max, reduction, scale, DEVICE)


def assert_close(actual: torch.Tensor, expected, *, dtype=None, reduction: int = 1, scale: float = 1.0,
                 product: str = "any", magnitude: float = 0.0, msg: str = "") -> None:
    """Compare elementwise under the shared tolerance model (tkernels/testing.py) for `dtype`
    (default: actual's), with sums of `reduction` terms. `expected` may be a NumPy float64 array
    (the reference) or a tensor (torch itself); the comparison is done in float64. `product`: which
    tl.dot products went into the result, "matmul", "conv", "none" or (default) "any": fp32 on
    CUDA takes the tf32 entry where torch's flags for those products allow TF32 (conv: by
    default). `scale` widens; callers say why.
    `magnitude`: the size of the terms a result is summed from when they cancel to much less (a
    gradient that is analytically zero): atol then follows it instead of max|expected|."""
    COMPARISONS[0] += actual.numel() > 0
    dtype = dtype or actual.dtype
    if isinstance(expected, np.ndarray):
        expected = torch.from_numpy(np.ascontiguousarray(expected))
    expected = expected.detach().to(device="cpu", dtype=torch.float64)
    actual = actual.detach().to(device="cpu", dtype=torch.float64)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)} {msg}"
    finite = expected[expected.isfinite()]
    expected_max = max(float(finite.abs().max()) if finite.numel() else 0.0, magnitude)
    tol = tolerance(dtype, expected_max, reduction, scale, product)
    torch.testing.assert_close(actual, expected, rtol=tol.rtol, atol=tol.atol, equal_nan=False,
                               msg=lambda m: f"{m}\n(max|expected| {expected_max:.3g}, rtol {tol.rtol:.3g}, "
                                             f"atol {tol.atol:.3g}, {dtype}, reduction {reduction}) {msg}")


def noise_magnitude(grads: dict, name: str) -> float:
    """For assert_close(magnitude=...): a bias ahead of a training-mode batch norm has an
    analytically zero gradient (a sum of batch-centred terms), so its value is rounding noise at
    the scale of the backward pass: compare it at that scale (the largest gradient in `grads`)
    instead of its own. 0 (no effect) for every other gradient."""
    largest = max(float(g.abs().max()) for g in grads.values() if g is not None)
    return largest if float(grads[name].abs().max()) < 1e-6 * largest else 0.0


def device_for(backend: str) -> torch.device:
    """The NumPy backend runs on CPU tensors only; the Triton backend on the test device."""
    return torch.device("cpu") if backend == "numpy" else DEVICE


BF16_DOT_SKIP = ("bfloat16 tl.dot is wrong in Triton's interpreter (off by ~5e10, triton issue 11584) and "
                 "this family's kernels multiply with tl.dot; bf16 matmul/conv are covered by the sm_80/sm_90 "
                 "compile check (`tkernels inspect`, tests/test_inspect.py) and by the CUDA run of "
                 "benchmarks/gpu_check.sh")


def skip_unsupported(backend: str, dtype: torch.dtype, uses_dot: bool = False) -> None:
    """Skip, with the reason, the combinations that cannot be checked here. Only the tl.dot
    kernels (matmul/linear, conv) skip bf16 under the interpreter; every other family's bf16
    runs through it, which is exact up to bf16 rounding."""
    if backend == "triton" and dtype == torch.bfloat16 and ON_INTERPRETER and uses_dot:
        pytest.skip(BF16_DOT_SKIP)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("float64 runs on the numpy backend only (the triton backend refuses it, tested separately)")


def to_numpy64(t: Optional[torch.Tensor]):
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64).numpy()


# ---------------------------------------------------------------------------------------------
# Canaries: inputs are views into NaN-filled buffers with margins and padded strides, so any
# out-of-bounds read turns a result into NaN; untouched margins prove no stray writes.
# ---------------------------------------------------------------------------------------------
class Canary:
    MARGIN = 67
    PAD = 5

    def __init__(self, values: torch.Tensor, pad: int = PAD, memory_format=None):
        shape = tuple(values.shape)
        if memory_format == torch.channels_last:
            assert len(shape) == 4
            order = (1, 3, 2, 0)  # innermost first: C, W, H, N
        else:
            order = tuple(reversed(range(len(shape))))
        strides = [0] * len(shape)
        step = 1
        for i, d in enumerate(order):
            strides[d] = step
            step *= shape[d] + (pad if i == 0 else 0)
        span = 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else 0
        self.buffer = torch.full((self.MARGIN * 2 + max(span, 1) + pad,), float("nan"), dtype=values.dtype,
                                 device=values.device)
        self.view = self.buffer.as_strided(shape, strides, self.MARGIN)
        with torch.no_grad():
            self.view.copy_(values)
        self._covered = torch.zeros(self.buffer.shape, dtype=torch.bool, device=values.device)
        self._covered.as_strided(shape, strides, self.MARGIN).fill_(True)

    def assert_untouched_outside(self) -> None:
        outside = self.buffer[~self._covered]
        assert torch.isnan(outside).all(), "a kernel wrote outside the tensor it was given"


def canary(values: torch.Tensor, requires_grad: bool = False, memory_format=None) -> torch.Tensor:
    """A copy of `values` living inside a NaN-padded buffer (non-contiguous, with margins)."""
    view = Canary(values.detach(), memory_format=memory_format).view
    return view.requires_grad_(requires_grad) if requires_grad else view


def randn(*shape: int, dtype=torch.float32, device=None, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(dtype=dtype, device=device or DEVICE)


def assert_not_mutated(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> None:
    for b, a in zip(before, after):
        assert torch.equal(b, a) or (torch.isnan(b) == torch.isnan(a)).all() and torch.equal(
            b.nan_to_num(), a.nan_to_num()), "an input was mutated"


# ---------------------------------------------------------------------------------------------
# Host syncs and host-built tensors: what makes a GPU wait for Python, or Python for the GPU.
# ---------------------------------------------------------------------------------------------
class HostSyncCounter:
    """Records, inside its ``with`` block, every call that makes the host wait for the device
    (``.item()``, ``.tolist()``, ``bool(t)``, ``float(t)``, ``int(t)``, ``.cpu()``, ``.numpy()``)
    and every tensor built from host data (``torch.tensor``, ``torch.as_tensor``,
    ``torch.from_numpy``), with the file and line that made it. On CPU tensors none of these waits,
    so tests count the calls themselves: each is a sync or an upload once the tensors live on a GPU.

    Calls made by Triton's interpreter are left out (on a GPU it does not exist: it stands in for the
    device). Calls reached through C++ only (not through these Python entry points) are not seen.

        with HostSyncCounter() as counter:
            optimizer.step()
        assert counter.calls == [], counter.report()
    """

    SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")
    HOST_BUILT = ("tensor", "as_tensor", "from_numpy")

    def __init__(self):
        import triton
        self.calls: list = []
        self._ignored_dir = os.path.dirname(triton.__file__)
        self._restore: list = []

    def _wrap(self, owner, name: str, kind: str) -> None:
        original = owner.__dict__.get(name)
        bound = getattr(owner, name)
        counter = self

        def counted(*args, **kwargs):
            caller = sys._getframe(1)
            if not caller.f_code.co_filename.startswith(counter._ignored_dir):
                counter.calls.append(f"{kind} {name} at {caller.f_code.co_filename}:{caller.f_lineno}")
            return bound(*args, **kwargs)

        setattr(owner, name, counted)
        self._restore.append((owner, name, original))

    def __enter__(self) -> "HostSyncCounter":
        for name in self.SYNCS:
            self._wrap(torch.Tensor, name, "sync")
        for name in self.HOST_BUILT:
            self._wrap(torch, name, "host-built tensor")
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._restore):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._restore.clear()

    def report(self) -> str:
        return "\n".join(self.calls)


def log_tuned_launches(monkeypatch, labels: dict, wrap=None) -> list:
    """Patch ``Tuned.launcher`` so that every launcher request of a Tuned whose id is in ``labels``
    appends that label to the returned list; or, given ``wrap(kernel, label, log)``, hands out the
    kernel that wrap returns instead (e.g. one that logs each launch's flags to ``log``). Patched on
    the class, so that undoing it leaves no instance attribute behind (one would shadow later
    class-level patches)."""
    from tkernels.ops._common import Tuned
    log = []
    original = Tuned.launcher

    def launcher(self, device):
        kernel, meta = original(self, device)
        if id(self) in labels:
            if wrap is None:
                log.append(labels[id(self)])
            else:
                kernel = wrap(kernel, labels[id(self)], log)
        return kernel, meta

    monkeypatch.setattr(Tuned, "launcher", launcher)
    return log

