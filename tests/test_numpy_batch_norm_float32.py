"""The NumPy backend's batch norm runs the elementwise passes of float32 tensors (of at least
FLOAT32_MIN_NUMEL values, identity or relu) in float32, with the statistics and per-channel sums in
float64; the float64 reference (``compute_dtype`` unset) stays the oracle."""
import numpy as np
import pytest
import torch

import tkernels
from tkernels import functional as F
from tkernels.ops import batch_norm as bn_ops
from tkernels.reference import batch_norm as ref

from helpers import assert_close, to_numpy64

SHAPE = (8, 3, 48, 48)  # 55296 values: the float32 path
assert np.prod(SHAPE) >= bn_ops.FLOAT32_MIN_NUMEL


def _case(mean=0.0, std=1.0, memory_format=torch.contiguous_format):
    torch.manual_seed(0)
    x = (mean + std * torch.randn(SHAPE)).to(memory_format=memory_format)
    weight, bias = 0.5 + torch.rand(3), torch.randn(3)
    return x, weight, bias, torch.randn(SHAPE)


def _run(x, weight, bias, grad, activation):
    rm, rv = torch.zeros(3), torch.ones(3)
    x = x.clone().requires_grad_(True)
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    with tkernels.use_backend("numpy"):
        y = F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.5, eps=1e-5, activation=activation)
        y.backward(grad)
    return y.detach(), x.grad, w.grad, b.grad, rm, rv


def _oracle(x, weight, bias, grad, activation):
    args = [to_numpy64(t) for t in (x, weight, bias)]
    y, rm, rv = ref.batch_norm_forward(args[0], np.zeros(3), np.ones(3), args[1], args[2], True, 0.5, 1e-5,
                                       activation)
    dx, dw, db = ref.batch_norm_backward(to_numpy64(grad), args[0], args[1], args[2], training=True, eps=1e-5,
                                         activation=activation)
    return y, dx, dw, db, rm, rv


@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_float32_passes_against_the_float64_reference(activation, memory_format):
    x, weight, bias, grad = _case(memory_format=memory_format)
    y, dx, dw, db, rm, rv = _run(x, weight, bias, grad, activation)
    y_ref, dx_ref, dw_ref, db_ref, rm_ref, rv_ref = _oracle(x, weight, bias, grad, activation)
    count = SHAPE[0] * SHAPE[2] * SHAPE[3]
    assert y.dtype == dx.dtype == torch.float32
    assert_close(y, y_ref, msg="y")
    assert_close(dx, dx_ref, reduction=count, msg="dx")
    assert_close(dw, dw_ref, reduction=count, msg="dweight")
    assert_close(db, db_ref, reduction=count, msg="dbias")
    assert_close(rm, rm_ref, msg="running_mean")
    assert_close(rv, rv_ref, msg="running_var")
    for name, actual, expected, k in (("y", y, y_ref, 1), ("dx", dx, dx_ref, count), ("dweight", dw, dw_ref, count)):
        with pytest.raises(AssertionError):  # the tolerances still catch a 1% error
            assert_close(actual * 1.01, expected, reduction=k, msg=name)


def test_the_float32_path_is_taken_and_rounds_in_float32():
    x, weight, bias, _ = _case()
    y = _run(x, weight, bias, torch.zeros(SHAPE), "relu")[0]
    args = [t.numpy() for t in (x, weight, bias)]
    single = ref.train_forward(*args, 1e-5, "relu", 0.0, np.float32)[0]
    double = ref.train_forward(*args, 1e-5, "relu", 0.0)[0]
    assert single.dtype == np.float32
    np.testing.assert_array_equal(y.numpy(), single)
    assert not np.array_equal(single, double.astype(np.float32))  # it did round in float32


@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_large_mean_small_std_stays_exact(activation):
    """Mean 1e4, std 1e-2: a float32 x - mean is off by up to half an ulp of 1e4 (5% of the std);
    the split mean (hi in the pass, lo in the per-channel terms) keeps float32 precision."""
    x, weight, bias, grad = _case(mean=1e4, std=1e-2)
    y, dx, dw, db, rm, rv = _run(x, weight, bias, grad, activation)
    y_ref, dx_ref, dw_ref, db_ref, rm_ref, rv_ref = _oracle(x, weight, bias, grad, activation)
    count = SHAPE[0] * SHAPE[2] * SHAPE[3]
    assert_close(y, y_ref, scale=2, msg="y")
    assert_close(dx, dx_ref, reduction=count, scale=2, msg="dx")
    assert_close(dw, dw_ref, reduction=count, scale=2, msg="dweight")
    assert_close(db, db_ref, reduction=count, msg="dbias")
    torch.testing.assert_close(rv.double(), torch.from_numpy(rv_ref), rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape, activation", [((4, 3, 8, 8), "relu"), (SHAPE, "gelu")], ids=["small", "gelu"])
def test_small_inputs_and_other_activations_run_in_float64(shape, activation):
    torch.manual_seed(0)
    x = torch.randn(shape)
    assert bn_ops._compute_dtype(x, activation) == np.float64
    with tkernels.use_backend("numpy"):
        y = F.batch_norm(x, None, None, training=True, activation=activation)
    double = ref.train_forward(x.numpy(), None, None, 1e-5, activation, 0.0)[0]
    np.testing.assert_array_equal(y.numpy(), double.astype(np.float32))


def test_float64_tensors_stay_float64():
    x = torch.randn(SHAPE, dtype=torch.float64)
    assert bn_ops._compute_dtype(x, "relu") == np.float64
    with tkernels.use_backend("numpy"):
        y = F.batch_norm(x, None, None, training=True, activation="relu")
    np.testing.assert_array_equal(y.numpy(), ref.train_forward(x.numpy(), None, None, 1e-5, "relu", 0.0)[0])
