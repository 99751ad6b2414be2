"""Declared once, used by every test family: tolerances, devices, canaries and shape lists."""
from __future__ import annotations

import math
import os
import sys
from typing import Optional, Sequence

import numpy as np
import pytest
import torch

import tkernels
from tkernels.ops._common import tl_input_precision

DEVICE = torch.device(os.environ.get("TKERNELS_TEST_DEVICE", "cpu"))
ON_INTERPRETER = tkernels.INTERPRET

# Odd sizes that divide no block size, plus the degenerate ones.
ODD_SIZES = (1, 3, 17, 33)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (rtol, atol at reduction length 1). atol grows with sqrt(reduction length): rounding errors of
# a K-term fp32 sum of O(1) products are a random walk, and cancellation leaves an absolute error.
TOLERANCES = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-5, 2e-5),
    "tf32": (3e-3, 3e-3),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def device_for(backend: str) -> torch.device:
    """The NumPy backend runs on CPU tensors only; the Triton backend on the test device."""
    return torch.device("cpu") if backend == "numpy" else DEVICE


def skip_unsupported(backend: str, dtype: torch.dtype) -> None:
    """Skip, with the reason, the combinations that cannot be checked here."""
    if backend == "triton" and dtype == torch.bfloat16 and ON_INTERPRETER:
        pytest.skip("Triton's interpreter computes bfloat16 wrongly (triton issue 11584); bf16 is covered "
                    "by `tkernels inspect` and by the CUDA run of benchmarks/gpu_check.sh")
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("float64 runs on the numpy backend only (the triton backend refuses it, tested separately)")


def tolerance(dtype, reduction: int = 1, scale: float = 1.0):
    # fp32 products run in TF32 on a GPU where torch's flags allow it: convolutions by default
    # (cuDNN's flag), matmuls when set (see tl_input_precision)
    if dtype == torch.float32 and DEVICE.type == "cuda" and "tf32" in (tl_input_precision(dtype, "matmul"),
                                                                       tl_input_precision(dtype, "conv")):
        dtype = "tf32"
    rtol, atol = TOLERANCES[dtype]
    return rtol * scale, atol * scale * math.sqrt(max(1, reduction))


def assert_close(actual: torch.Tensor, expected, *, dtype=None, reduction: int = 1, scale: float = 1.0,
                 msg: str = "") -> None:
    """Compare with a per-dtype tolerance scaled by the reduction length. `expected` may be a NumPy
    float64 array (the reference) or a tensor (torch itself); comparison is done in float64."""
    dtype = dtype or actual.dtype
    if isinstance(expected, np.ndarray):
        expected = torch.from_numpy(np.ascontiguousarray(expected))
    expected = expected.detach().to(device="cpu", dtype=torch.float64)
    actual = actual.detach().to(device="cpu", dtype=torch.float64)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)} {msg}"
    rtol, atol = tolerance(dtype, reduction, scale)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=False, msg=lambda m: f"{m}\n{msg}")


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
