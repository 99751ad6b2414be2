"""The one tolerance model, shared by the tests (tests/helpers.py) and `bench --check`.

An element passes when ``|actual - expected| <= rtol * |expected| + atol`` with

    rtol = R[dtype] * scale
    atol = scale * max|expected| * (A[dtype] + A_acc * growth(reduction))
    growth(K) = max(1, sqrt(K / 256))

*Why this shape.* Every kernel computes in fp32 and rounds its result to the tensor's dtype
once, so each element is off by its own rounding (relative: ``R``) plus what the rounding of
low-precision intermediates leaves after a sum with cancellation (e.g. a fp16 ``dz`` fed to a
matmul): that error is a fraction of the typical magnitude of the result, not of the element,
hence the normwise term ``A * max|expected|``. Accumulating K terms in fp32 in another order
than float64 adds a random walk of fp32 roundings whose size relative to ``max|expected|``
grows like sqrt(K); ``A_acc`` (fp32's, or tf32's when the matmul runs in tf32) covers it and
only starts growing past K = 256, where it overtakes the fixed terms. Nothing here is an
absolute O(1) constant, so results of any magnitude are checked at their own scale.

*It sees a 1% error.* A 1% error at the largest element exceeds ``R + A + A_acc*growth``:
fp32 2e-5 + 2e-5*growth, fp16 2.5e-3, bf16 6e-3 on CUDA (bf16's own rounding is up to 0.39%,
so its R is 1.15 units of roundoff and 1% is 2.6 of them); under the interpreter, whose bf16
cast truncates, 9.5e-3 (see the "bfloat16-truncating" entry). benchmarks/mutation_check.py checks this
mechanically: every kernel's output scaled by 1.01 must fail a test.

*On a GPU* (see tests/helpers.py for the full account) fp32 ``/``, ``sqrt``, ``exp`` and ``log``
lower to approximate instructions (div.full: 2 ulp; ex2.approx/lg2.approx: 2 ulp plus the
argument-reduction error |x|*2^-24 relative, i.e. ~1e-6 for |x| ~ 20) and FMA contraction
changes each multiply-add's rounding by up to 1 ulp. fp32 R and A here are ~340 and ~170
units of roundoff, so they absorb that; ``CUDA_FP32_WIDENING`` doubles them on CUDA for the
exp/log of large arguments (|x| up to ~100 in losses) and is the only GPU widening besides
tf32. fp16/bf16 results are dominated by their own rounding and do not widen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

DtypeKey = Union[torch.dtype, str]

# (R: relative to each element, A: relative to max|expected|)
TOLERANCES = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-5, 1e-5),
    "tf32": (3e-3, 2e-3),  # fp32 matmul/conv on CUDA with TF32 allowed: 10-bit significand inputs
    torch.float16: (1.5e-3, 1e-3),
    torch.bfloat16: (4.5e-3, 1.5e-3),
    # Triton's interpreter casts fp32 to bf16 by truncation, not round-to-nearest (measured with
    # triton 3.9: up to 0.77% off, torch's cast 0.38%), so on CPU a bf16 result may be one whole
    # ulp (2^-7 relative) away: R is one ulp, and a 1% error is still out of bounds wherever
    # the element did not happen to be truncated by almost a whole ulp the other way.
    "bfloat16-truncating": (8.5e-3, 1e-3),
}
# Half the distance between neighbouring values relative to the value: one rounding's worst error.
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
                 torch.bfloat16: 2.0 ** -8}
ACCUMULATION_FREE_TERMS = 256  # growth(K) stays 1 up to here
CUDA_FP32_WIDENING = 2.0


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float

    def violation(self, actual: torch.Tensor, expected: torch.Tensor, extra: Optional[torch.Tensor] = None) -> float:
        """max |a - e| / (rtol*|e| + atol [+ extra, elementwise]) over the elements: <= 1 passes
        (inf for NaN/inf mismatches)."""
        actual, expected = actual.double(), expected.double()
        if expected.numel() == 0:
            return 0.0
        diff = (actual - expected).abs()
        same = (actual == expected) | (actual.isnan() & expected.isnan())
        bound = self.rtol * expected.abs() + self.atol + (0.0 if extra is None else extra.double())
        ratio = torch.where(same, torch.zeros_like(diff), diff / bound.clamp_min(1e-300))
        ratio = torch.where(ratio.isnan(), torch.full_like(ratio, math.inf), ratio)
        return float(ratio.max())


def growth(reduction: int) -> float:
    return max(1.0, math.sqrt(max(1, reduction) / ACCUMULATION_FREE_TERMS))


def dtype_key(dtype: torch.dtype, device: Union[str, torch.device] = "cpu", product: str = "none") -> DtypeKey:
    """The TOLERANCES entry. fp32 on CUDA takes the tf32 entry where torch's flags let the tl.dot
    `product` behind the result ("matmul", "conv", "any" of them, or "none") run in TF32 (see
    tl_input_precision: matmuls off by default, convolutions on). bf16 off CUDA takes the
    truncating-cast entry (the interpreter's)."""
    cuda = torch.device(device).type == "cuda"
    if dtype == torch.bfloat16 and not cuda:
        return "bfloat16-truncating"
    if dtype == torch.float32 and cuda and product != "none":
        from .ops._common import tl_input_precision
        products = ("matmul", "conv") if product == "any" else (product,)
        if any(tl_input_precision(dtype, p) == "tf32" for p in products):
            return "tf32"
    return dtype


def tolerance(dtype: DtypeKey, expected_max: float, reduction: int = 1, scale: float = 1.0,
              device: Union[str, torch.device] = "cpu") -> Tolerance:
    """The tolerance for results of `dtype` whose largest magnitude is `expected_max`, computed
    with sums of `reduction` terms, widened by `scale` (callers say why) and for CUDA fp32."""
    r, a = TOLERANCES[dtype]
    acc = TOLERANCES["tf32" if dtype == "tf32" else torch.float32][1]
    if dtype == torch.float64:
        acc = a
    if torch.device(device).type == "cuda" and dtype in (torch.float32, "tf32"):
        r, a, acc = r * CUDA_FP32_WIDENING, a * CUDA_FP32_WIDENING, acc * CUDA_FP32_WIDENING
    expected_max = expected_max if math.isfinite(expected_max) else 0.0
    return Tolerance(rtol=r * scale, atol=scale * expected_max * (a + acc * growth(reduction)))
