"""softmax / log_softmax: every dim, layouts, the chunked (online) path, dtypes, errors, modules, opcheck."""
import warnings

import numpy as np
import pytest
import torch

import tkernels
import tkernels.functional as F
from tkernels.ops import softmax as softmax_ops
from tkernels.reference import softmax as ref
from helpers import expect_kernels, assert_close, canary, device_for, skip_unsupported, to_numpy64

LOG = pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])


def _ours(log):
    return F.log_softmax if log else F.softmax


def _torch(log):
    return torch.log_softmax if log else torch.softmax


def _reference(log, x, dim):
    # as a tensor: 0-d results keep their shape (np.ascontiguousarray would make them 1-d)
    return torch.as_tensor(np.asarray((ref.log_softmax if log else ref.softmax)(to_numpy64(x), dim)))


def _reference_grad(log, g, y, dim):
    fn = ref.log_softmax_backward if log else ref.softmax_backward
    return torch.as_tensor(np.asarray(fn(to_numpy64(g), to_numpy64(y), dim)))


def _check(log, x, dim, dtype=None):
    """Forward and input gradient against the float64 reference and torch (float64)."""
    x = x.detach().requires_grad_()
    y = _ours(log)(x, dim)
    C = x.shape[dim] if x.dim() else 1
    dtype = dtype or x.dtype
    assert y.shape == x.shape and y.dtype == x.dtype
    y64 = _reference(log, x, dim)
    assert_close(y, y64, dtype=dtype, reduction=C)
    assert_close(y, _torch(log)(x.detach().double(), dim), dtype=dtype, reduction=C)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    # the backward kernel's input is the stored y, rounded to dtype: the reference at that y sees
    # the kernel's own error (the 1% check). From x, y's rounding (up to a whole ulp per element
    # where the interpreter truncates bf16, all of one sign) enters sum(g*y): a normwise error
    # of ~2 ulp of max|y|, 8 times the normwise A in fp16/bf16, a sanity bound only.
    assert_close(dx, _reference_grad(log, g, y, dim), dtype=dtype, reduction=C)
    end_to_end = 1.0 if dtype in (torch.float32, torch.float64) else 8.0
    assert_close(dx, _reference_grad(log, g, y64, dim), dtype=dtype, reduction=C, scale=end_to_end)
    xd = x.detach().double().requires_grad_()
    (dx_t,) = torch.autograd.grad(_torch(log)(xd, dim), xd, g.double())
    assert_close(dx, dx_t, dtype=dtype, reduction=C, scale=end_to_end)
    if x.numel():
        expect_kernels("softmax_forward_kernel", "softmax_backward_kernel")
    return y, dx


@LOG
@pytest.mark.parametrize("dim", [0, 1, 2, 3, -1])
def test_every_dim_of_4d(backend, log, dim):
    x = torch.randn(3, 5, 4, 6, device=device_for(backend)) * 3
    _check(log, x, dim)


@LOG
@pytest.mark.parametrize("layout", ["canary", "channels_last", "transposed", "sliced"])
def test_strided_layouts(backend, log, layout):
    base = torch.randn(2, 17, 3, 5, device=device_for(backend)) * 2
    if layout == "canary":
        x = canary(base)
    elif layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = base.transpose(1, 3)
    else:
        x = base[:, 1:, ::2, 1:]
    for dim in (1, 3):
        y, _ = _check(log, x, dim)
    if layout == "channels_last" and backend == "triton":
        assert y.is_contiguous(memory_format=torch.channels_last), "output keeps the input's dense layout"


@LOG
@pytest.mark.parametrize("shape,dim", [((), 0), ((7,), 0), ((1, 1), 1), ((33, 1), 1), ((4, 33), -1), ((0, 5), 1),
                                       ((4, 0), 1), ((3, 0, 2), 0)])
def test_odd_and_degenerate_shapes(backend, log, shape, dim):
    x = torch.randn(shape, device=device_for(backend))
    _check(log, x, dim)


@LOG
def test_long_rows_use_the_chunked_online_path(backend, log):
    C = softmax_ops.MAX_BLOCK_C + 37  # one block does not hold the row
    x = torch.randn(3, C, device=device_for(backend)) * 4
    x[1, : C // 2] -= 30.0  # the running max rises late in the row: the online rescale must be right
    x[2, -5:] += 25.0
    _check(log, x, 1)


@LOG
def test_chunked_path_with_strided_classes(backend, log, monkeypatch):
    # small blocks exercise the multi-chunk loops (strided classes and contiguous classes) at small sizes
    monkeypatch.setattr(softmax_ops, "MAX_TILE", 64)
    monkeypatch.setattr(softmax_ops, "MAX_BLOCK_C", 16)
    monkeypatch.setattr(softmax_ops, "MAX_BLOCK_R", 4)
    x = canary(torch.randn(2, 37, 5, device=device_for(backend)) * 3)
    _check(log, x, 1)
    _check(log, x, 2)
    _check(log, x.transpose(0, 2), 1)
    plan = softmax_ops.plan_rows([2, 5], 37, 5, [185, 1])
    assert not plan.single and plan.BLOCK_C == 16


@LOG
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy, inside the interpreter, on the all -inf row
def test_infinities_follow_torch(backend, log):
    x = torch.randn(3, 6, device=device_for(backend))
    x[0, 2] = float("-inf")
    x[1, :] = float("-inf")  # an all -inf row is NaN in torch
    y = _ours(log)(x, 1)
    expected = _torch(log)(x.double(), 1)
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    assert_close(y[0], expected[0])
    assert torch.isnan(y[1]).all()


@LOG
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(backend, log, dtype):
    skip_unsupported(backend, dtype)
    x = (torch.randn(5, 33) * 3).to(dtype=dtype, device=device_for(backend))
    _check(log, x, 1, dtype=dtype)


@LOG
def test_dtype_argument_casts_inside_the_kernel(backend, log):
    x = (torch.randn(4, 9) * 3).half().to(device_for(backend)).requires_grad_()
    y = _ours(log)(x, 1, dtype=torch.float32)
    expected = _torch(log)(x, 1, dtype=torch.float32)
    assert y.dtype == torch.float32
    assert_close(y, _reference(log, x, 1), dtype=torch.float32)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    (dx_t,) = torch.autograd.grad(expected, x, g)
    assert dx.dtype == torch.float16
    assert_close(dx, dx_t, dtype=torch.float16)
    ints = torch.arange(6, device=device_for(backend)).reshape(2, 3)
    assert_close(_ours(log)(ints, 1, dtype=torch.float32), _torch(log)(ints, 1, dtype=torch.float32))


@pytest.mark.parametrize("ndim,expected_dim", [(0, 0), (1, 0), (2, 1), (3, 0), (4, 1)])
def test_implicit_dim_warns_and_follows_torch(ndim, expected_dim):
    x = torch.randn([3] * ndim)
    with pytest.warns(UserWarning, match="Implicit dimension choice for softmax") as record:
        y = F.softmax(x)
    assert record[0].filename == __file__, "the warning should point at the caller"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(y, torch.softmax(x, expected_dim))
        module = tkernels.nn.LogSoftmax()
        assert_close(module(x), torch.nn.LogSoftmax()(x))


def test_bad_input_errors(backend):
    dev = device_for(backend)
    x = torch.randn(2, 3, device=dev)
    with pytest.raises(IndexError, match=r"expected to be in range of \[-2, 1\], but got 2"):
        F.softmax(x, 2)
    with pytest.raises(IndexError, match=r"range of \[-2, 1\], but got -3"):
        F.log_softmax(x, -3)
    with pytest.raises(NotImplementedError, match="floating-point.*torch.int64"):
        F.softmax(torch.ones(3, dtype=torch.long, device=dev), 0)
    with pytest.raises(NotImplementedError, match="torch.int32"):
        F.softmax(x, 1, dtype=torch.int32)
    with pytest.raises(TypeError, match="must be a Tensor"):
        F.softmax([1.0, 2.0], 0)


def test_triton_backend_refuses_float64():
    x = torch.randn(2, 3, dtype=torch.float64, device=device_for("triton"))
    with tkernels.use_backend("triton"):
        with pytest.raises(RuntimeError, match="float64 runs on the numpy backend"):
            F.softmax(x, 1)
        with pytest.raises(RuntimeError, match="float64 runs on the numpy backend"):
            F.softmax(x.float(), 1, dtype=torch.float64)


def test_modules_subclass_torch(backend):
    x = torch.randn(4, 5, 6, device=device_for(backend))
    for ours, theirs in ((tkernels.nn.Softmax(dim=1), torch.nn.Softmax(dim=1)),
                         (tkernels.nn.LogSoftmax(dim=-1), torch.nn.LogSoftmax(dim=-1))):
        assert isinstance(ours, type(theirs)) and repr(ours) == repr(theirs)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        assert_close(ours(x), theirs(x.double()), reduction=6)


def test_opcheck(backend):
    dev = device_for(backend)
    x = torch.randn(3, 5, 4, device=dev)
    torch.library.opcheck(torch.ops.tkernels.softmax.default, (x, 1, False, torch.float32))
    torch.library.opcheck(torch.ops.tkernels.softmax.default, (x.transpose(0, 2), 2, True, torch.float32))
    y = torch.softmax(x, 2)
    torch.library.opcheck(torch.ops.tkernels.softmax_backward.default, (torch.randn_like(y), y, 2, False,
                                                                       torch.float32))
    torch.library.opcheck(torch.ops.tkernels.softmax_backward.default, (torch.randn_like(y), y.log(), 0, True,
                                                                       torch.float32))
