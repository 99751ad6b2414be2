"""Max, average and adaptive average pooling: both backends against the float64 NumPy reference
and against torch, forward and backward."""
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import assume, given, settings, strategies as st

import tkernels
import tkernels.functional as F
from tkernels.reference import pooling as ref
from helpers import expect_kernels, Canary, assert_close, assert_not_mutated, device_for, skip_unsupported, to_numpy64

NAN = float("nan")


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _tied_input(shape, dtype, device, nan_at=()):
    """Values on a coarse grid (many exact ties in every dtype), optional NaNs."""
    x = (torch.randn(*shape) * 2).round() / 2
    for idx in nan_at:
        x[idx] = NAN
    return x.to(dtype=dtype, device=device)


def _torch_grads(fn, x0, grad, *args, **kwargs):
    """torch's forward and input gradient on a float64 copy of x0."""
    xt = x0.detach().double().requires_grad_()
    out = fn(xt, *args, **kwargs)
    y = out[0] if isinstance(out, tuple) else out
    (dx,) = torch.autograd.grad(y, xt, grad.double())
    return out, dx


# --------------------------------------------------------------------------------------------
# max_pool2d
# --------------------------------------------------------------------------------------------
# (input (N, C, H, W), kernel, stride, padding, dilation, ceil_mode)
MAX_CASES = [
    ((2, 3, 11, 9), 2, None, 0, 1, False),
    ((2, 3, 11, 9), 3, 2, 1, 1, True),            # ResNet stem window; ceil adds a clipped edge window
    ((1, 2, 17, 13), 3, 1, 1, 1, False),          # stride < kernel: every input in up to 9 windows
    ((2, 2, 5, 5), 2, 2, 1, 1, True),             # ceil_mode drops a window that would start in the padding
    ((1, 3, 9, 12), (3, 2), (2, 1), (1, 1), 1, True),
    ((1, 2, 13, 11), 5, 2, 2, 2, False),          # dilation; padding = half the kernel
    ((2, 1, 10, 7), (2, 3), 3, (1, 0), (3, 1), True),
    ((3, 2, 1, 7), (1, 4), (1, 3), (0, 2), 1, True),
]


def _check_max_pool(backend, shape, k, s, p, d, ceil_mode, dtype=torch.float32, memory_format=None,
                    nan_at=((0, 0, 1, 1), (0, 0, 2, 3), (-1, -1, -1, 0))):
    skip_unsupported(backend, dtype)
    dev = device_for(backend)
    x0 = _tied_input(shape, dtype, dev, nan_at=[i for i in nan_at if all(abs(a) < n for a, n in zip(i, shape))])
    c = Canary(x0, memory_format=memory_format)
    x = c.view.requires_grad_()
    snapshot = x.detach().clone()

    y, idx = F.max_pool2d(x, k, s, p, d, ceil_mode, return_indices=True)
    grad = torch.randn(y.shape).to(dtype=dtype, device=dev)
    (dx,) = torch.autograd.grad(y, x, grad)
    assert y.dtype == dtype and idx.dtype == torch.int64 and dx.dtype == dtype
    assert_not_mutated([snapshot], [x.detach()])
    c.assert_untouched_outside()

    kk, ss = _pair(k), _pair(s if s is not None else k)
    y_ref, idx_ref = ref.max_pool2d_forward(to_numpy64(x0), kk, ss, _pair(p), _pair(d), ceil_mode)
    dx_ref = ref.max_pool2d_backward(to_numpy64(grad), idx_ref, shape, kk, ss, _pair(p), _pair(d))
    torch.testing.assert_close(y.double().cpu(), torch.from_numpy(y_ref), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx.cpu(), torch.from_numpy(idx_ref)), "indices differ from the reference"
    windows = kk[0] * kk[1]
    assert_close(dx, dx_ref, dtype=dtype, reduction=windows, msg="grad vs reference")

    (yt, idxt), dxt = _torch_grads(TF.max_pool2d, x0, grad, k, s, p, d, ceil_mode, True)
    torch.testing.assert_close(y.double().cpu(), yt.detach(), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx.cpu(), idxt), "indices differ from torch's (tie or NaN choice)"
    assert_close(dx, dxt, dtype=dtype, reduction=windows, msg="grad vs torch")
    if y.numel():
        expect_kernels("max_pool2d_kernel", "max_pool2d_backward_kernel")
    return y, idx, dx


@pytest.mark.parametrize("shape,k,s,p,d,ceil_mode", MAX_CASES)
def test_max_pool2d(backend, shape, k, s, p, d, ceil_mode):
    _check_max_pool(backend, shape, k, s, p, d, ceil_mode)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_max_pool2d_dtypes(backend, dtype):
    _check_max_pool(backend, (2, 3, 11, 9), 3, 2, 1, 1, True, dtype=dtype)


def test_max_pool2d_channels_last(backend):
    y, idx, dx = _check_max_pool(backend, (2, 5, 9, 7), 3, 2, 1, 1, True, memory_format=torch.channels_last)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert idx.stride() == y.stride()
    dense = torch.randn(2, 5, 9, 7, device=device_for(backend)).to(memory_format=torch.channels_last)
    assert F.max_pool2d(dense, 2).stride() == TF.max_pool2d(dense.cpu(), 2).stride()


def test_max_pool2d_nan_propagation(backend):
    """A window with a NaN gives NaN and the index of its LAST NaN in scan order; others are unaffected."""
    x = torch.tensor([[[[1., 3., 3., 0.],
                        [3., NAN, 2., 5.],
                        [NAN, 0., 1., 2.],
                        [4., 4., -1., NAN]]]], device=device_for(backend))
    y, idx = F.max_pool2d(x, 3, 1, 1, return_indices=True)
    yt, idxt = TF.max_pool2d(x.cpu(), 3, 1, 1, return_indices=True)
    assert torch.equal(idx.cpu(), idxt)
    torch.testing.assert_close(y.cpu(), yt, equal_nan=True)
    assert idx[0, 0, 1, 1] == 8 and idx[0, 0, 0, 3] == 7 and torch.isnan(y[0, 0, 1, 1])
    assert idx[0, 0, 3, 3] == 15


def test_max_pool2d_tie_gradients(backend):
    """Ties go to the first maximum in scan order; overlapping windows add up on it."""
    x = torch.ones(1, 1, 4, 5, device=device_for(backend), requires_grad=True)
    y, idx = F.max_pool2d(x, 2, 1, return_indices=True)
    y.backward(torch.arange(1., 13.).reshape(1, 1, 3, 4).to(x.device))
    xt = torch.ones(1, 1, 4, 5, requires_grad=True)
    yt, idxt = TF.max_pool2d(xt, 2, 1, return_indices=True)
    yt.backward(torch.arange(1., 13.).reshape(1, 1, 3, 4))
    assert torch.equal(idx.cpu(), idxt)
    expected = torch.zeros(4, 5)
    expected[:3, :4] = torch.arange(1., 13.).reshape(3, 4)  # each window's first element is its top-left
    assert torch.equal(x.grad.cpu()[0, 0], expected) and torch.equal(xt.grad[0, 0], expected)


def test_max_pool2d_infinite_windows_and_deterministic_backward(backend):
    """-inf everywhere: the index is the window's first in-bounds tap (torch's); backward is bitwise stable."""
    dev = device_for(backend)
    x = torch.full((1, 2, 5, 6), float("-inf"), device=dev)
    y, idx = F.max_pool2d(x, 3, 2, 1, 2, return_indices=True)
    yt, idxt = TF.max_pool2d(x.cpu(), 3, 2, 1, 2, return_indices=True)
    assert torch.equal(idx.cpu(), idxt) and torch.equal(y.cpu(), yt)
    x = torch.randn(2, 3, 13, 13, device=dev).round().requires_grad_()
    grads = [torch.autograd.grad(F.max_pool2d(x, 3, 1, 1).sum(), x)[0] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


def test_max_pool2d_all_padding_windows(backend):
    """With dilation a window can hold only padding: -inf and torch's index in forward; its index
    names none of its taps (here it aliases the next row), so backward sends nothing (torch's
    CPU backward would write to that aliased element)."""
    x = torch.randn(1, 2, 3, 1, device=device_for(backend), requires_grad=True)
    y, idx = F.max_pool2d(x, 2, 1, 1, 2, return_indices=True)
    yt, idxt = TF.max_pool2d(x.detach().cpu(), 2, 1, 1, 2, return_indices=True)
    assert torch.equal(y.detach().cpu(), yt) and torch.equal(idx.cpu(), idxt)
    assert torch.isinf(yt).all() and (idxt < 3).any()  # in-range, aliasing indices
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, torch.zeros_like(x))


# --------------------------------------------------------------------------------------------
# avg_pool2d
# --------------------------------------------------------------------------------------------
# (input shape, kernel, stride, padding, ceil_mode)
AVG_CASES = [
    ((2, 3, 11, 9), 2, None, 0, False),
    ((2, 3, 11, 9), 3, 2, 1, True),
    ((1, 2, 17, 13), 3, 1, 1, False),
    ((2, 2, 5, 5), 2, 2, 1, True),
    ((1, 3, 9, 12), (3, 4), (2, 3), (1, 2), True),
    ((3, 2, 1, 7), (1, 5), (1, 2), (0, 2), True),
]


def _check_avg_pool(backend, shape, k, s, p, ceil_mode, count_include_pad, divisor_override,
                    dtype=torch.float32, memory_format=None):
    skip_unsupported(backend, dtype)
    dev = device_for(backend)
    x0 = torch.randn(*shape).to(dtype=dtype, device=dev)
    c = Canary(x0, memory_format=memory_format)
    x = c.view.requires_grad_()
    y = F.avg_pool2d(x, k, s, p, ceil_mode, count_include_pad, divisor_override)
    grad = torch.randn(y.shape).to(dtype=dtype, device=dev)
    (dx,) = torch.autograd.grad(y, x, grad)
    c.assert_untouched_outside()
    assert torch.equal(x.detach().cpu(), x0.cpu())

    kk, ss = _pair(k), _pair(s if s is not None else k)
    opts = (_pair(p), ceil_mode, count_include_pad, divisor_override)
    y_ref = ref.avg_pool2d_forward(to_numpy64(x0), kk, ss, *opts)
    dx_ref = ref.avg_pool2d_backward(to_numpy64(grad), shape, kk, ss, *opts)
    windows = kk[0] * kk[1]
    assert_close(y, y_ref, dtype=dtype, reduction=windows, msg="forward vs reference")
    assert_close(dx, dx_ref, dtype=dtype, reduction=windows, msg="grad vs reference")
    yt, dxt = _torch_grads(TF.avg_pool2d, x0, grad, k, s, p, ceil_mode, count_include_pad, divisor_override)
    assert_close(y, yt, dtype=dtype, reduction=windows, msg="forward vs torch")
    assert_close(dx, dxt, dtype=dtype, reduction=windows, msg="grad vs torch")
    if y.numel():
        expect_kernels("avg_pool2d_kernel", "avg_pool2d_backward_kernel")
    return y, dx


@pytest.mark.parametrize("count_include_pad,divisor_override", [(True, None), (False, None), (True, 5)])
@pytest.mark.parametrize("shape,k,s,p,ceil_mode", AVG_CASES)
def test_avg_pool2d(backend, shape, k, s, p, ceil_mode, count_include_pad, divisor_override):
    _check_avg_pool(backend, shape, k, s, p, ceil_mode, count_include_pad, divisor_override)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_avg_pool2d_dtypes(backend, dtype):
    _check_avg_pool(backend, (2, 3, 11, 9), 3, 2, 1, True, False, None, dtype=dtype)


def test_avg_pool2d_channels_last(backend):
    y, dx = _check_avg_pool(backend, (2, 5, 9, 7), 3, 2, 1, True, True, None, memory_format=torch.channels_last)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


# --------------------------------------------------------------------------------------------
# adaptive_avg_pool2d
# --------------------------------------------------------------------------------------------
def _check_adaptive(backend, shape, output_size, dtype=torch.float32, memory_format=None):
    skip_unsupported(backend, dtype)
    dev = device_for(backend)
    x0 = torch.randn(*shape).to(dtype=dtype, device=dev)
    c = Canary(x0, memory_format=memory_format)
    x = c.view.requires_grad_()
    y = F.adaptive_avg_pool2d(x, output_size)
    grad = torch.randn(y.shape).to(dtype=dtype, device=dev)
    (dx,) = torch.autograd.grad(y, x, grad)
    c.assert_untouched_outside()
    window = -(-shape[-2] // max(1, y.shape[-2])) * -(-shape[-1] // max(1, y.shape[-1])) + 1
    x4, g4 = to_numpy64(x0), to_numpy64(grad)
    if x4.ndim == 3:  # the reference takes (N, C, H, W)
        x4, g4 = x4[None], g4[None]
    y_ref = ref.adaptive_avg_pool2d_forward(x4, y.shape[-2:]).reshape(y.shape)
    dx_ref = ref.adaptive_avg_pool2d_backward(g4, x4.shape).reshape(shape)
    assert_close(y, y_ref, dtype=dtype, reduction=window, msg="forward vs reference")
    assert_close(dx, dx_ref, dtype=dtype, reduction=4, msg="grad vs reference")
    yt, dxt = _torch_grads(TF.adaptive_avg_pool2d, x0, grad, output_size)
    assert_close(y, yt, dtype=dtype, reduction=window, msg="forward vs torch")
    assert_close(dx, dxt, dtype=dtype, reduction=4, msg="grad vs torch")
    if y.numel():
        expect_kernels("adaptive_avg_pool2d_kernel", "adaptive_avg_pool2d_backward_kernel")
    return y


@pytest.mark.parametrize("shape,output_size", [
    ((2, 3, 11, 9), (3, 4)),          # uneven, overlapping windows
    ((2, 3, 11, 9), 1),               # global average
    ((1, 2, 7, 5), (None, 3)),        # None keeps the input size
    ((1, 2, 4, 3), (9, 7)),           # larger than the input
    ((3, 17, 13), (5, None)),         # unbatched
])
def test_adaptive_avg_pool2d(backend, shape, output_size):
    _check_adaptive(backend, shape, output_size)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_adaptive_avg_pool2d_dtypes(backend, dtype):
    _check_adaptive(backend, (2, 3, 11, 9), (4, 5), dtype=dtype)


def test_adaptive_avg_pool2d_channels_last_and_empty_output(backend):
    y = _check_adaptive(backend, (2, 5, 9, 7), (4, 3), memory_format=torch.channels_last)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    x = torch.randn(2, 3, 5, 4, device=device_for(backend), requires_grad=True)
    y = F.adaptive_avg_pool2d(x, (0, 3))
    assert y.shape == TF.adaptive_avg_pool2d(x.detach().cpu(), (0, 3)).shape == (2, 3, 0, 3)
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@st.composite
def _window_options(draw):
    dims = []
    for _ in range(2):
        size, k = draw(st.integers(1, 12)), draw(st.integers(1, 4))
        s, d = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        p = draw(st.integers(0, min(k // 2, ((k - 1) * d + 1) // 2)))
        dims.append((size, k, s, p, d))
    return dims, draw(st.booleans())


@settings(max_examples=15, deadline=None)
@given(options=_window_options(), n=st.integers(0, 2), c=st.integers(1, 3))
def test_property_random_windows(options, n, c):
    """Random sizes and window options, max and average pooling, against torch (forward and backward)."""
    dims, ceil_mode = options
    (H, kh, sh, ph, dh), (W, kw, sw, pw, dw) = dims
    outs = [ref.output_size(*dim[:4], dim[4], ceil_mode) for dim in dims]
    assume(min(outs) >= 1)
    # torch's own backward writes out of bounds for windows made only of padding: keep them out
    assume(all(any(0 <= o * s - p + j * d < size for j in range(k)) for (size, k, s, p, d), out in zip(dims, outs)
               for o in range(out)))
    k, s, p, d = (kh, kw), (sh, sw), (ph, pw), (dh, dw)
    with tkernels.use_backend("triton" if tkernels.INTERPRET else "numpy") as backend:
        x0 = _tied_input((n, c, H, W), torch.float32, device_for(backend))
        grad_shape = (n, c, *outs)
        grad = torch.randn(grad_shape).to(x0.device)
        x = x0.clone().requires_grad_()
        y, idx = F.max_pool2d(x, k, s, p, d, ceil_mode, return_indices=True)
        (dx,) = torch.autograd.grad(y, x, grad)
        (yt, idxt), dxt = _torch_grads(TF.max_pool2d, x0, grad, k, s, p, d, ceil_mode, True)
        assert torch.equal(idx.cpu(), idxt) and torch.equal(y.double().cpu(), yt.detach())
        assert_close(dx, dxt, reduction=kh * kw)
        if d == (1, 1):
            y = F.avg_pool2d(x, k, s, p, ceil_mode)
            (dx,) = torch.autograd.grad(y, x, grad)
            yt, dxt = _torch_grads(TF.avg_pool2d, x0, grad, k, s, p, ceil_mode)
            assert_close(y, yt, reduction=kh * kw)
            assert_close(dx, dxt, reduction=kh * kw)


# --------------------------------------------------------------------------------------------
# Shapes every op must handle: unbatched, empty batch, expanded gradients
# --------------------------------------------------------------------------------------------
OPS = {
    "max": (F.max_pool2d, TF.max_pool2d, (3, 2, 1)),
    "avg": (F.avg_pool2d, TF.avg_pool2d, (3, 2, 1)),
    "adaptive": (F.adaptive_avg_pool2d, TF.adaptive_avg_pool2d, ((3, 2),)),
}


@pytest.mark.parametrize("op", OPS)
def test_unbatched_input(backend, op):
    ours, theirs, args = OPS[op]
    x = torch.randn(3, 7, 5, device=device_for(backend)).round().requires_grad_()
    y = ours(x, *args)
    y.sum().backward()  # an expanded (stride-0) gradient
    xt = x.detach().cpu().clone().requires_grad_()
    yt = theirs(xt, *args)
    yt.sum().backward()
    assert y.shape == yt.shape and y.is_contiguous()
    assert_close(y, yt, reduction=9)
    assert_close(x.grad, xt.grad, reduction=9)


@pytest.mark.parametrize("op", OPS)
def test_empty_batch(backend, op):
    ours, theirs, args = OPS[op]
    x = torch.randn(0, 3, 7, 5, device=device_for(backend), requires_grad=True)
    y = ours(x, *args)
    assert y.shape == theirs(x.detach().cpu(), *args).shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_max_pool2d_indices_only_when_asked(backend):
    x = torch.randn(1, 2, 6, 6, device=device_for(backend))
    y = F.max_pool2d(x, 2)
    assert isinstance(y, torch.Tensor) and y.shape == (1, 2, 3, 3)
    y_unbatched, idx = F.max_pool2d(x[0], 2, return_indices=True)
    assert idx.shape == (2, 3, 3) and torch.equal(y_unbatched, y[0])


def test_batches_beyond_the_grid_limit_run_in_chunks(monkeypatch):
    """The batch rides on grid dimension 1 (at most 65535 on CUDA); larger batches launch in chunks."""
    if not tkernels.INTERPRET and device_for("triton").type != "cuda":
        pytest.skip("needs the Triton interpreter or a GPU")
    from tkernels.ops import pooling
    monkeypatch.setattr(pooling, "MAX_GRID_Y", 2)
    x = torch.randn(5, 2, 7, 6, device=device_for("triton")).to(memory_format=torch.channels_last)
    x.requires_grad_()
    with tkernels.use_backend("triton"):
        for op, (ours, theirs, args) in OPS.items():
            y = ours(x, *args)
            (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
            xt = x.detach().cpu().requires_grad_()
            yt = theirs(xt, *args)
            (dxt,) = torch.autograd.grad(yt, xt, torch.ones_like(yt))
            assert_close(y, yt, reduction=9, msg=op)
            assert_close(dx, dxt, reduction=9, msg=op)


@pytest.mark.parametrize("op", OPS)
def test_image_too_large_is_refused(backend, op):
    """Indices within one image are int32 (plane offsets int64): a 2**31-element image gets a clear error."""
    ours, _, args = OPS[op]
    x = torch.zeros(1, device=device_for(backend)).expand(1, 1, 2**16, 2**15 + 1)  # no memory behind it
    with pytest.raises(RuntimeError, match="too large: indices within one image must stay below 2\\*\\*31"):
        ours(x, *args)


# --------------------------------------------------------------------------------------------
# Bad input: clear errors, of torch's type, before anything is touched
# --------------------------------------------------------------------------------------------
BAD = [
    ("max", (6,), {}, "Output size is too small"),
    ("max", (3, 1, 2), {}, "pad should be at most half of effective kernel size"),
    ("max", (3, 1, 3), {"dilation": 2}, "pad should be at most half of effective kernel size"),
    ("max", (3, 1, 2), {"dilation": 2}, "pad should be smaller than or equal to half of kernel size"),
    ("max", (3, 1, -1), {}, "pad must be non-negative"),
    ("max", (0,), {}, "kernel size should be greater than zero"),
    ("max", (2, 0), {}, "stride should be greater than zero"),
    ("max", (2,), {"dilation": 0}, "dilation should be greater than zero"),
    ("max", ((2, 2, 2),), {}, "kernel_size must either be a single int, or a tuple of two ints"),
    ("max", (2, (1, 1, 1)), {}, "stride must either be a single int, or a tuple of two ints"),
    ("avg", (6,), {}, "Output size is too small"),
    ("avg", (3, 1, 2), {}, "pad should be at most half"),
    ("avg", (2,), {"divisor_override": 0}, "divisor must be not zero"),
    ("adaptive", ((2, 2, 2),), {}, "output_size must be an int or a pair"),
    ("adaptive", ((-1, 2),), {}, "greater than or equal to 0"),
]


@pytest.mark.parametrize("op,args,kwargs,match", BAD, ids=[f"{b[0]}-{b[3][:20]}" for b in BAD])
def test_bad_options(backend, op, args, kwargs, match):
    ours, theirs, _ = OPS[op]
    x = torch.randn(2, 3, 5, 5, device=device_for(backend))
    before = x.clone()
    with pytest.raises(RuntimeError):
        theirs(x.cpu(), *args, **kwargs)
    with pytest.raises(RuntimeError, match=match):
        ours(x, *args, **kwargs)
    assert_not_mutated([before], [x])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case,match", [
    ("int", "floating-point"), ("2d", "3D .* or 4D"), ("5d", "3D .* or 4D"), ("empty_channels", "non-empty"),
])
def test_bad_input_tensor(backend, op, case, match):
    ours, theirs, args = OPS[op]
    dev = device_for(backend)
    x = {"int": torch.randint(0, 9, (2, 3, 6, 6)), "2d": torch.randn(6, 6), "5d": torch.randn(1, 2, 3, 6, 6),
         "empty_channels": torch.randn(2, 0, 6, 6)}[case].to(dev)
    before = x.clone()
    with pytest.raises(RuntimeError, match=match):
        ours(x, *args)
    assert_not_mutated([before], [x])


def test_float_kernel_size_is_a_type_error():
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(TypeError):
        TF.max_pool2d(x, 2.5)
    with pytest.raises(TypeError, match="kernel_size must be an int"):
        F.max_pool2d(x, 2.5)


def test_triton_backend_refuses_float64():
    if not tkernels.INTERPRET and device_for("triton").type != "cuda":
        pytest.skip("needs the Triton interpreter or a GPU")
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, device=device_for("triton"))
    with tkernels.use_backend("triton"):
        for fn in (lambda: F.max_pool2d(x, 2), lambda: F.avg_pool2d(x, 2), lambda: F.adaptive_avg_pool2d(x, 2)):
            with pytest.raises(RuntimeError, match="float64 runs on the numpy backend"):
                fn()


# --------------------------------------------------------------------------------------------
# Modules, custom-op registration, torch.compile
# --------------------------------------------------------------------------------------------
def test_modules_match_torch(backend):
    x = torch.randn(2, 3, 9, 8, device=device_for(backend))
    pairs = [
        (tkernels.nn.MaxPool2d(3, 2, 1, ceil_mode=True), torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True)),
        (tkernels.nn.MaxPool2d(2, return_indices=True), torch.nn.MaxPool2d(2, return_indices=True)),
        (tkernels.nn.AvgPool2d(3, 2, 1, count_include_pad=False), torch.nn.AvgPool2d(3, 2, 1, count_include_pad=False)),
        (tkernels.nn.AdaptiveAvgPool2d((None, 2)), torch.nn.AdaptiveAvgPool2d((None, 2))),
    ]
    for ours, theirs in pairs:
        assert isinstance(ours, type(theirs)) and repr(ours) == repr(theirs)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        out, expected = ours(x), theirs(x.cpu())
        if isinstance(expected, tuple):
            assert torch.equal(out[1].cpu(), expected[1])
            out, expected = out[0], expected[0]
        assert_close(out, expected, reduction=9)


def test_opcheck(backend):
    dev = device_for(backend)
    x = torch.randn(2, 3, 7, 6, device=dev)
    xc = x.to(memory_format=torch.channels_last)
    for args in [(x, [3, 3], [2, 2], [1, 1], [1, 1], True, False, True),
                 (xc, [2, 3], [1, 2], [1, 0], [2, 1], False, True, False)]:
        torch.library.opcheck(torch.ops.tkernels.max_pool2d.default, args)
    y, idx = torch.ops.tkernels.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], True, False, True)
    torch.library.opcheck(torch.ops.tkernels.max_pool2d_backward.default,
                          (torch.randn_like(y), idx, [2, 3, 7, 6], [3, 3], [2, 2], [1, 1], [1, 1], False))
    torch.library.opcheck(torch.ops.tkernels.avg_pool2d.default, (xc, [3, 2], [2, 1], [1, 1], True, False, None, True))
    torch.library.opcheck(torch.ops.tkernels.avg_pool2d_backward.default,
                          (torch.randn(2, 3, 4, 5, device=dev), [2, 3, 7, 6], [3, 2], [2, 1], [1, 1], True, True, 3,
                           False))
    torch.library.opcheck(torch.ops.tkernels.adaptive_avg_pool2d.default, (x, [4, 5], False))
    torch.library.opcheck(torch.ops.tkernels.adaptive_avg_pool2d_backward.default,
                          (torch.randn(2, 3, 4, 5, device=dev), [2, 3, 7, 6], True))


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    dev = device_for("triton" if tkernels.INTERPRET else "numpy")
    model = torch.nn.Sequential(tkernels.nn.MaxPool2d(3, 2, 1), tkernels.nn.AvgPool2d(2, ceil_mode=True),
                                tkernels.nn.AdaptiveAvgPool2d((2, 1)))
    x = torch.randn(2, 3, 11, 9, device=dev, requires_grad=True)
    eager = model(x)
    (eager_grad,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(out, eager) and torch.equal(grad, eager_grad)
    expected = TF.adaptive_avg_pool2d(TF.avg_pool2d(TF.max_pool2d(x.detach().cpu(), 3, 2, 1), 2, ceil_mode=True),
                                      (2, 1))
    assert_close(out, expected, reduction=8)
