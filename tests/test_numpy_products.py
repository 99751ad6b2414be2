"""The NumPy backend's matrix products (linear, conv2d): float32 tensors run single-precision BLAS
products, as torch's CPU kernels do; float64 tensors and the reference itself (the float64 oracle
the Triton tests use) stay float64."""
import numpy as np
import pytest
import torch

import tkernels
from tkernels import functional as F
from tkernels.reference import conv as ref_conv
from tkernels.reference import linear as ref_linear

from helpers import assert_close, to_numpy64


def _linear_case():
    torch.manual_seed(0)
    x, w, b = torch.randn(33, 40), torch.randn(24, 40), torch.randn(24)
    return (x, w, b), lambda *a, **k: ref_linear.linear_forward(*a, "relu", **k)[0], \
        lambda x, w, b: F.linear(x, w, b, activation="relu"), 40


def _conv_case():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 5, 9, 7), torch.randn(6, 5, 3, 3), torch.randn(6)
    return (x, w, b), lambda *a, **k: ref_conv.conv2d_forward(*a, (1, 1), (1, 1, 1, 1), **k)[0], \
        lambda x, w, b: F.conv2d(x, w, b, padding=1), 45


CASES = {"linear": _linear_case, "conv2d": _conv_case}


@pytest.mark.parametrize("op", CASES)
def test_reference_computes_in_float64_by_default(op):
    (x, w, b), reference, _, _ = CASES[op]()
    from32 = reference(*(t.numpy() for t in (x, w, b)))
    from64 = reference(*(to_numpy64(t) for t in (x, w, b)))
    assert from32.dtype == np.float64
    np.testing.assert_array_equal(from32, from64)


@pytest.mark.parametrize("op", CASES)
def test_float32_tensors_run_float32_products(op):
    (x, w, b), reference, ours, k = CASES[op]()
    with tkernels.use_backend("numpy"):
        out = ours(x, w, b)
    assert out.dtype == torch.float32
    single = reference(*(t.numpy() for t in (x, w, b)), compute_dtype=np.float32)
    exact = reference(*(to_numpy64(t) for t in (x, w, b)))
    torch.testing.assert_close(out, torch.from_numpy(np.ascontiguousarray(single)).float(), rtol=0, atol=0)
    assert not np.array_equal(single.astype(np.float64), exact)  # it did round in float32
    assert_close(out, exact, reduction=k)
    with pytest.raises(AssertionError):  # the tolerance still catches a 1% error
        assert_close(out * 1.01, exact, reduction=k)


@pytest.mark.parametrize("op", CASES)
def test_float64_tensors_stay_float64(op):
    (x, w, b), reference, ours, _ = CASES[op]()
    x, w, b = x.double(), w.double(), b.double()
    with tkernels.use_backend("numpy"):
        out = ours(x, w, b)
    np.testing.assert_array_equal(out.numpy(), reference(x.numpy(), w.numpy(), b.numpy()))


@pytest.mark.parametrize("op", CASES)
def test_float32_gradients_against_the_float64_reference(op):
    (x, w, b), _, ours, k = CASES[op]()
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    leaves64 = [t.double().requires_grad_() for t in (x, w, b)]
    g = torch.randn_like(ours(x, w, b))
    with tkernels.use_backend("numpy"):
        grads = torch.autograd.grad(ours(*leaves), leaves, g)
        grads64 = torch.autograd.grad(ours(*leaves64), leaves64, g.double())
    for got, expected, n in zip(grads, grads64, (k, x.numel() // x.shape[1], x.numel() // x.shape[1])):
        assert got.dtype == torch.float32
        assert_close(got, expected, dtype=torch.float32, reduction=n)
