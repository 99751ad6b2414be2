"""Batch norm: functional and modules, training and eval, every gradient, against the float64
NumPy reference and torch, on both backends."""
import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import tkernels
from tkernels import functional as F
from tkernels import nn as tnn
from tkernels.ops import batch_norm_kernels as K
from tkernels.reference import batch_norm as ref

from helpers import LAUNCHES, expect_kernels, assert_close, canary, device_for, skip_unsupported, to_numpy64

TORCH_ACT = {
    "identity": lambda z: z, "relu": TF.relu, "leaky_relu": lambda z: TF.leaky_relu(z, 0.2), "gelu": TF.gelu,
    "gelu_tanh": lambda z: TF.gelu(z, approximate="tanh"), "silu": TF.silu, "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}


SINGLE = ["bn_train_single_kernel"]
SPLIT = ["bn_stats_partial_kernel", "bn_stats_combine_kernel", "bn_apply_kernel"]


@pytest.fixture
def launched():
    """Names of the kernels launched so far in the test (conftest's record, tests/launches.py)."""
    return LAUNCHES[0].names


def _forward_kernels(log):
    """The distinct training-forward kernels in a launch log, in first-launch order (backward
    kernels left out; on CUDA an autotuner launches a kernel more than once)."""
    return list(dict.fromkeys(name for name in log if name in SINGLE + SPLIT))


@pytest.fixture(params=["single", "split"])
def path(request, monkeypatch):
    """Training forward through the single-launch kernel or (threshold forced to 0) the split path."""
    if request.param == "split":
        monkeypatch.setattr(K, "SINGLE_LAUNCH_MAX_POSITIONS", 0)
    return request.param


def _assert_path(backend, launched, path):
    if backend == "triton":
        assert _forward_kernels(launched) == (SINGLE if path == "single" else SPLIT), launched


def _act(name):
    return tkernels.activations.Activation(name, 0.2 if name == "leaky_relu" else 0.0)


def _values(shape, dtype, scale=1.5, shift=0.5):
    return (torch.randn(*shape) * scale + shift).to(dtype)


def _per_channel(C, dtype, positive=False):
    v = torch.rand(C) + 0.5 if positive else torch.randn(C)
    return v.to(dtype)


def _run(backend, x, weight, bias, rm, rv, training, act, momentum=0.1, grad=None, layout=None):
    """Forward + backward through tkernels on `backend`; returns (y, grads, running stats)."""
    device = device_for(backend)
    xt = canary(x.to(device), requires_grad=True, memory_format=layout)
    wt = None if weight is None else weight.detach().clone().to(device).requires_grad_()
    bt = None if bias is None else bias.detach().clone().to(device).requires_grad_()
    rmt = None if rm is None else rm.clone().to(device)
    rvt = None if rv is None else rv.clone().to(device)
    y = F.batch_norm(xt, rmt, rvt, wt, bt, training=training, momentum=momentum, activation=_act(act))
    g = torch.randn(y.shape).to(y.dtype).to(device) if grad is None else grad
    y.backward(g)
    grads = [None if t is None else t.grad for t in (xt, wt, bt)]
    return y, g, grads, rmt, rvt


def _check_against_reference_and_torch(x, weight, bias, rm, rv, training, act, y, g, grads, rmt, rvt,
                                        momentum=0.1, scale=1.0):
    dtype = x.dtype
    if x.numel():
        forward = (SINGLE if K.single_launch_fits(x.shape) else SPLIT) if training else ["bn_apply_kernel"]
        expect_kernels(*forward, "bn_backward_partial_kernel", "bn_backward_combine_kernel",
                       "bn_backward_input_kernel")
    M = x.numel() // x.shape[1]
    y_ref, rm_ref, rv_ref = ref.batch_norm_forward(to_numpy64(x), to_numpy64(rm), to_numpy64(rv), to_numpy64(weight),
                                                   to_numpy64(bias), training, momentum, 1e-5, act, _act(act).param)
    dx_ref, dw_ref, db_ref = ref.batch_norm_backward(to_numpy64(g), to_numpy64(x), to_numpy64(weight),
                                                     to_numpy64(bias), to_numpy64(rm), to_numpy64(rv), training, 1e-5,
                                                     act, _act(act).param)
    assert_close(y, y_ref, dtype=dtype, scale=scale, msg="y vs reference")
    assert_close(grads[0], dx_ref, dtype=dtype, reduction=M, scale=scale, msg="dx vs reference")
    if weight is not None:
        assert_close(grads[1], dw_ref, dtype=dtype, reduction=M, scale=scale, msg="dweight vs reference")
    if bias is not None:
        assert_close(grads[2], db_ref, dtype=dtype, reduction=M, scale=scale, msg="dbias vs reference")
    if rm is not None:
        assert_close(rmt, rm_ref, dtype=dtype, msg="running_mean vs reference")
        assert_close(rvt, rv_ref, dtype=dtype, scale=scale, msg="running_var vs reference")
    # torch itself, in float32 or float64 (its CPU batch norm of half inputs is not a useful yardstick)
    wide = torch.float64 if dtype == torch.float64 else torch.float32

    def widened(t):
        return None if t is None else t.detach().to(wide).clone()

    xs, ws, bs, rms, rvs = (widened(t) for t in (x, weight, bias, rm, rv))
    for t in (xs, ws, bs):
        if t is not None:
            t.requires_grad_()
    ys = TORCH_ACT[act](TF.batch_norm(xs, rms, rvs, ws, bs, training=training, momentum=momentum))
    ys.backward(g.to(wide).cpu())
    tol = dict(dtype=dtype, scale=scale)
    assert_close(y, ys, **tol, msg="y vs torch")
    assert_close(grads[0], xs.grad, reduction=M, **tol, msg="dx vs torch")
    if weight is not None:
        assert_close(grads[1], ws.grad, reduction=M, **tol, msg="dweight vs torch")
    if rm is not None:
        assert_close(rvt, rvs, **tol, msg="running_var vs torch")


# (shape, channels_last, activation, affine: weight/bias present, running stats present)
TRAINING_CASES = [
    pytest.param((17, 33), None, "tanh", (True, True), True, id="2d-17x33-tanh"),
    pytest.param((4, 3, 19), None, "leaky_relu", (True, False), True, id="3d-weight-only-leaky"),
    pytest.param((3, 5, 4, 5), None, "gelu", (True, True), True, id="nchw-gelu"),
    pytest.param((3, 5, 4, 5), torch.channels_last, "silu", (False, True), True, id="channels_last-bias-only-silu"),
    pytest.param((2, 3, 2, 3, 4), None, "sigmoid", (False, False), False, id="5d-no-affine-no-running-sigmoid"),
    pytest.param((6, 1, 3, 5), None, "relu", (True, True), True, id="C1-relu"),
]


@pytest.mark.parametrize("shape, layout, act, affine, running", TRAINING_CASES)
def test_training(backend, path, launched, shape, layout, act, affine, running):
    C = shape[1]
    x = _values(shape, torch.float32)
    weight = _per_channel(C, torch.float32) if affine[0] else None
    bias = _per_channel(C, torch.float32) if affine[1] else None
    rm = _per_channel(C, torch.float32) if running else None
    rv = _per_channel(C, torch.float32, positive=True) if running else None
    y, g, grads, rmt, rvt = _run(backend, x, weight, bias, rm, rv, True, act, momentum=0.3, layout=layout)
    _assert_path(backend, launched, path)
    if layout is not None:
        assert y.is_contiguous(memory_format=layout), "output should keep the input's memory format"
    _check_against_reference_and_torch(x, weight, bias, rm, rv, True, act, y, g, grads, rmt, rvt, momentum=0.3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_training_dtypes(backend, dtype):
    skip_unsupported(backend, dtype)
    shape = (5, 4, 3, 3)
    x = _values(shape, dtype)
    weight, bias = _per_channel(4, dtype), _per_channel(4, dtype)
    rm, rv = _per_channel(4, dtype), _per_channel(4, dtype, positive=True)
    y, g, grads, rmt, rvt = _run(backend, x, weight, bias, rm, rv, True, "identity")
    assert y.dtype == dtype and grads[1].dtype == dtype and rmt.dtype == dtype
    _check_against_reference_and_torch(x, weight, bias, rm, rv, True, "identity", y, g, grads, rmt, rvt, scale=2.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_with_float32_parameters(backend, path, launched, dtype):
    """Mixed precision (autocast-style): fp16/bf16 activations, fp32 weight/bias/running stats."""
    skip_unsupported(backend, dtype)
    x = _values((6, 3, 4, 3), dtype)
    weight, bias = _per_channel(3, torch.float32), _per_channel(3, torch.float32)
    rm, rv = _per_channel(3, torch.float32), _per_channel(3, torch.float32, positive=True)
    y, g, grads, rmt, rvt = _run(backend, x, weight, bias, rm, rv, True, "relu")
    _assert_path(backend, launched, path)
    assert y.dtype == dtype and grads[1].dtype == torch.float32 and rmt.dtype == torch.float32
    _check_against_reference_and_torch(x, weight, bias, rm, rv, True, "relu", y, g, grads, rmt, rvt, scale=2.0)


@pytest.mark.parametrize("layout", [None, torch.channels_last])
def test_eval(backend, layout):
    shape = (4, 6, 3, 5)
    x = _values(shape, torch.float32)
    weight, bias = _per_channel(6, torch.float32), _per_channel(6, torch.float32)
    rm, rv = _per_channel(6, torch.float32), _per_channel(6, torch.float32, positive=True)
    y, g, grads, rmt, rvt = _run(backend, x, weight, bias, rm, rv, False, "gelu_tanh", layout=layout)
    assert torch.equal(rmt, rm) and torch.equal(rvt, rv), "eval must not touch the running stats"
    _check_against_reference_and_torch(x, weight, bias, rm, rv, False, "gelu_tanh", y, g, grads, rmt, rvt)


def test_stability_large_mean_small_std(backend):
    """Data with mean 1e4 and std 1e-2. E[x^2] - E[x]^2 in fp32 returns noise or a negative variance,
    and even a two-pass fp32 mean is off by up to half an ulp of 1e4 (5e-4, 5% of the std); the
    shifted statistics keep the normalised output at fp32 precision."""
    device = device_for(backend)
    x = (1e4 + 1e-2 * torch.randn(8, 3, 6, 6)).to(device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    eps = 1e-10  # so that the normalised data has unit variance
    y = F.batch_norm(x, rm, rv, training=True, momentum=1.0, eps=eps)
    y_ref, rm_ref, rv_ref = ref.batch_norm_forward(to_numpy64(x), np.zeros(3), np.ones(3), training=True, momentum=1.0,
                                                   eps=eps)
    assert_close(y, y_ref, dtype=torch.float32, scale=2, msg="normalised output")
    per_channel = y.transpose(0, 1).reshape(3, -1).double()
    assert per_channel.mean(1).abs().max() < 1e-5
    assert (per_channel.std(1, unbiased=False) - 1).abs().max() < 1e-5
    torch.testing.assert_close(rm.double().cpu(), torch.from_numpy(rm_ref), rtol=0, atol=5e-4)  # fp32 ulp(1e4) / 2
    torch.testing.assert_close(rv.double().cpu(), torch.from_numpy(rv_ref), rtol=1e-5, atol=0)


def test_small_channels_large_batch_splits_the_reduction(backend, monkeypatch, launched):
    """C=2 with N*H*W = 1024, split path forced: the statistics and the weight gradients come from
    several partials."""
    monkeypatch.setattr(K, "SINGLE_LAUNCH_MAX_POSITIONS", 0)
    shape = (16, 2, 8, 8)
    x = _values(shape, torch.float32)
    weight, bias = _per_channel(2, torch.float32), _per_channel(2, torch.float32)
    rm, rv = _per_channel(2, torch.float32), _per_channel(2, torch.float32, positive=True)
    geom = K.plan(shape, x.stride(), x.stride())
    assert K._num_splits(geom, torch.device(device_for(backend))) > 1
    y, g, grads, rmt, rvt = _run(backend, x, weight, bias, rm, rv, True, "identity")
    _assert_path(backend, launched, "split")
    _check_against_reference_and_torch(x, weight, bias, rm, rv, True, "identity", y, g, grads, rmt, rvt)


# ---------------------------------------------------------------------------------------------
# The single-launch training forward
# ---------------------------------------------------------------------------------------------
# (shape, layout): C in (1, 3, 17) x N*H*W in (3, 33, 129), as (N, C), (N, C, L), NCHW, channels_last
SINGLE_SHAPES = [pytest.param((3, C), None, id=f"2d-C{C}-M3") for C in (1, 3, 17)] + [
    pytest.param((3, C, 11), None, id=f"3d-C{C}-M33") for C in (1, 3, 17)] + [
    pytest.param((3, C, 1, 43), None, id=f"nchw-C{C}-M129") for C in (1, 3, 17)] + [
    pytest.param((3, C, 11, 1), torch.channels_last, id=f"channels_last-C{C}-M33") for C in (3, 17)] + [
    pytest.param((1, 17, 3, 43), torch.channels_last, id="channels_last-C17-M129")]


@pytest.mark.parametrize("shape, layout", SINGLE_SHAPES)
def test_single_launch_odd_shapes(backend, launched, shape, layout):
    C = shape[1]
    x = _values(shape, torch.float32)
    weight, bias = _per_channel(C, torch.float32), _per_channel(C, torch.float32)
    rm, rv = _per_channel(C, torch.float32), _per_channel(C, torch.float32, positive=True)
    y, g, grads, rmt, rvt = _run(backend, x, weight, bias, rm, rv, True, "silu", momentum=0.3, layout=layout)
    _assert_path(backend, launched, "single")
    if layout is not None:
        assert y.is_contiguous(memory_format=layout), "output should keep the input's memory format"
    _check_against_reference_and_torch(x, weight, bias, rm, rv, True, "silu", y, g, grads, rmt, rvt, momentum=0.3)


def _both_paths(x, weight, bias, rm, rv, momentum=0.2):
    """Forward outputs (y, stats, running_mean, running_var) of the single-launch op and of the
    split ops (batch_norm_stats + batch_norm_apply) on the same inputs."""
    ops = torch.ops.tkernels
    r1, r2 = (None, None) if rm is None else (rm.clone(), rv.clone())
    y1, s1 = ops.batch_norm_train(x, weight, bias, r1, r2, momentum, 1e-5, "relu", 0.0)
    q1, q2 = (None, None) if rm is None else (rm.clone(), rv.clone())
    s2 = ops.batch_norm_stats(x, q1, q2, momentum, 1e-5)
    y2 = ops.batch_norm_apply(x, s2, weight, bias, None, None, True, 1e-5, "relu", 0.0)
    return (y1, s1, r1, r2), (y2, s2, q1, q2)


@pytest.mark.parametrize("values", ["finite", "nan", "inf", "inf-and-neg-inf", "one-value"])
def test_single_launch_matches_split_path(backend, launched, values):
    """Same stats tensor (backward's input), running stats and y as the split path, NaN and Inf
    propagating as torch's do (the one-value case is SyncBatchNorm's, running_var becomes NaN)."""
    device = device_for(backend)
    shape = (1, 5, 1, 1) if values == "one-value" else (4, 5, 3, 3)
    x = _values(shape, torch.float32)
    if values == "nan":
        x[1, 2, 0, 1] = float("nan")
    elif values == "inf":
        x[0, 1, 2, 2] = float("inf")  # also the pivot position of no channel: the mean stays +Inf
    elif values == "inf-and-neg-inf":
        x[0, 3, 0, 0], x[2, 3, 1, 1] = float("inf"), -float("inf")  # the pivot itself is Inf
    x = x.to(device)
    w, b = _per_channel(5, torch.float32).to(device), _per_channel(5, torch.float32).to(device)
    rm, rv = _per_channel(5, torch.float32).to(device), _per_channel(5, torch.float32, positive=True).to(device)
    single, split = _both_paths(x, w, b, rm, rv)
    if backend == "triton":
        assert _forward_kernels(launched) == SINGLE + SPLIT, launched
    for a, e, name in zip(single, split, ("y", "stats", "running_mean", "running_var")):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, equal_nan=True, msg=lambda m: f"{name}: {m}")
    if values != "finite":
        assert torch.isnan(single[3]).any() or torch.isinf(single[2]).any(), "non-finite input must reach the stats"
    # and both agree with torch's running statistics
    rm_t, rv_t = rm.clone().cpu(), rv.clone().cpu()
    if values != "one-value":
        TF.batch_norm(x.cpu(), rm_t, rv_t, w.cpu(), b.cpu(), training=True, momentum=0.2)
        torch.testing.assert_close(single[2].cpu(), rm_t, rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(single[3].cpu(), rv_t, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_single_launch_threshold(backend, monkeypatch, launched):
    """The path follows the per-channel size: at the threshold one launch, one value above it the split path."""
    assert K.single_launch_fits((64, 16, 8, 8)), "LeNet's 64x16x8x8 should take one launch"
    assert K.single_launch_fits((1, 3, K.SINGLE_LAUNCH_MAX_POSITIONS))
    assert not K.single_launch_fits((1, 3, K.SINGLE_LAUNCH_MAX_POSITIONS + 1))
    assert not K.single_launch_fits((512, 1024, 4, 4)), "8192 per channel but 2^23 elements in all"
    assert not K.single_launch_fits((0, 3, 4))
    monkeypatch.setattr(K, "SINGLE_LAUNCH_MAX_POSITIONS", 33)
    device = device_for(backend)
    for n, expected in ((11, SINGLE), (12, SPLIT)):  # 3 * 11 = 33 positions per channel, 3 * 12 = 36
        start = len(launched)
        x = _values((3, 2, n), torch.float32).to(device)
        y = F.batch_norm(x, None, None, training=True)
        assert_close(y, ref.batch_norm_forward(to_numpy64(x), None, None, training=True)[0], msg=f"N*L={3 * n}")
        if backend == "triton":
            assert _forward_kernels(launched[start:]) == expected, (n, launched[start:])


def test_single_launch_kernel_refuses_an_empty_batch():
    """The dispatcher never sends an empty batch there (test_empty_batch); called directly, the
    Triton backend refuses it (the NumPy backend computes it like batch_norm_stats)."""
    x = torch.randn(0, 3, 4, device=device_for("triton"))
    with tkernels.use_backend("triton"), pytest.raises(ValueError, match="non-empty"):
        torch.ops.tkernels.batch_norm_train(x, None, None, None, None, 0.1, 1e-5, "identity", 0.0)


@pytest.mark.parametrize("layout", ["permuted", "sliced-6d"])
def test_unusual_strides(backend, layout):
    """A permuted (H, W, N, C)-stored input runs in place; a sliced 6-D view (five separate runs of
    reduction dims) falls back to a contiguous copy. Both must give the same numbers."""
    if layout == "permuted":
        x = _values((3, 4, 5, 2), torch.float32).permute(2, 3, 0, 1)  # logical (5, 2, 3, 4)
    else:
        x = _values((2, 3, 4, 4, 4, 3), torch.float32)[:, :, ::2, ::2, ::2, ::2]
    C = x.shape[1]
    weight, bias = _per_channel(C, torch.float32), _per_channel(C, torch.float32)
    rm, rv = _per_channel(C, torch.float32), _per_channel(C, torch.float32, positive=True)
    device = device_for(backend)
    xt = x.to(device).requires_grad_()
    wt, bt = weight.clone().to(device).requires_grad_(), bias.clone().to(device).requires_grad_()
    rmt, rvt = rm.clone().to(device), rv.clone().to(device)
    y = F.batch_norm(xt, rmt, rvt, wt, bt, training=True, activation="gelu")
    g = torch.randn(y.shape).to(device)
    y.backward(g)
    _check_against_reference_and_torch(x, weight, bias, rm, rv, True, "gelu", y, g, [xt.grad, wt.grad, bt.grad],
                                       rmt, rvt)


def test_broadcast_gradient_and_no_mutation(backend):
    """y.sum() gives a stride-0 gradient; neither input, gradient nor parameters may be written."""
    device = device_for(backend)
    x = _values((5, 3, 4, 2), torch.float32).to(device).requires_grad_()
    w, b = _per_channel(3, torch.float32).to(device).requires_grad_(), _per_channel(3, torch.float32).to(device)
    before = [t.detach().clone() for t in (x, w, b)]
    y = F.batch_norm(x, None, None, w, b, training=True, activation="silu")
    y.sum().backward()
    for t, t0 in zip((x, w, b), before):
        assert torch.equal(t.detach(), t0), "an input was mutated"
    dx_ref, dw_ref, _ = ref.batch_norm_backward(np.ones(x.shape), to_numpy64(x), to_numpy64(w), to_numpy64(b),
                                                activation="silu")
    assert_close(x.grad, dx_ref, reduction=40)
    assert_close(w.grad, dw_ref, reduction=40)


def test_deterministic(backend):
    device = device_for(backend)
    x = _values((7, 3, 5, 3), torch.float32).to(device)
    w = _per_channel(3, torch.float32).to(device)
    g = torch.randn(x.shape).to(device)
    results = []
    for _ in range(2):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = F.batch_norm(xs, None, None, ws, None, training=True)
        y.backward(g)
        results.append((y, xs.grad, ws.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_empty_batch(backend, launched):
    device = device_for(backend)
    rm, rv = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    x = torch.randn(0, 3, 4, device=device, requires_grad=True)
    w = torch.randn(3, device=device, requires_grad=True)
    y = F.batch_norm(x, rm, rv, w, training=True)
    y.sum().backward()
    assert y.shape == (0, 3, 4) and x.grad.shape == (0, 3, 4)
    assert torch.equal(w.grad, torch.zeros(3, device=device))
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0), "torch leaves running stats alone for an empty batch"
    if backend == "triton":
        assert _forward_kernels(launched) == ["bn_stats_combine_kernel"], launched  # no partials, nothing to apply
    assert F.batch_norm(x.detach(), rm, rv).shape == (0, 3, 4)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_module_running_stats_sequence_then_eval(backend, momentum):
    device = device_for(backend)
    ours = tnn.BatchNorm2d(3, momentum=momentum).to(device)
    theirs = torch.nn.BatchNorm2d(3, momentum=momentum)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 1.5, 3))
            m.bias.copy_(torch.linspace(-1, 1, 3))
    for step in range(3):
        x = _values((4, 3, 3, 5), torch.float32, scale=1 + step, shift=step)
        assert_close(ours(x.to(device)), theirs(x), msg=f"training step {step}")
    assert_close(ours.running_mean, theirs.running_mean)
    assert_close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 3
    ours.eval()
    theirs.eval()
    x = _values((2, 3, 3, 5), torch.float32)
    assert_close(ours(x.to(device)), theirs(x), msg="eval")
    assert int(ours.num_batches_tracked) == 3


def test_module_no_affine_no_tracking(backend):
    device = device_for(backend)
    ours = tnn.BatchNorm1d(5, affine=False, track_running_stats=False, activation="relu").to(device)
    theirs = torch.nn.BatchNorm1d(5, affine=False, track_running_stats=False)
    assert ours.weight is None and ours.running_mean is None and list(ours.state_dict()) == []
    x = _values((7, 5, 3), torch.float32)
    xo, xt = x.clone().to(device).requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(7, 5, 3)
    ours.eval()  # without running stats, eval still normalises with the batch
    theirs.eval()
    yo, yt = ours(xo), torch.relu(theirs(xt))
    yo.backward(g.to(device))
    yt.backward(g)
    assert_close(yo, yt)
    assert_close(xo.grad, xt.grad, reduction=21)


def test_module_interface():
    m = tnn.BatchNorm2d(4, eps=1e-3, momentum=0.2, activation=torch.nn.LeakyReLU(0.3))
    assert isinstance(m, torch.nn.BatchNorm2d)
    assert list(m.state_dict()) == list(torch.nn.BatchNorm2d(4).state_dict())
    assert "activation=leaky_relu(negative_slope=0.3)" in repr(m)
    with pytest.raises(ValueError):
        m(torch.randn(2, 4))  # BatchNorm2d wants 4-D input, as torch's does
    with pytest.raises(ValueError):
        tnn.BatchNorm1d(3, activation="softplus")
    state = torch.nn.BatchNorm1d(3).state_dict()
    tnn.BatchNorm1d(3).load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
_X = torch.randn(4, 3, 2)
_C3 = torch.ones(3)
BAD_CALLS = [
    pytest.param(lambda f: f(torch.randn(1, 3), None, None, training=True), ValueError, id="one-value-per-channel"),
    pytest.param(lambda f: f(torch.randn(1, 3, 1), _C3.clone(), _C3.clone(), training=True), ValueError,
                 id="one-value-per-channel-3d"),
    pytest.param(lambda f: f(_X, _C3.clone(), None, training=True), ValueError, id="running-mean-without-var"),
    pytest.param(lambda f: f(_X, None, None), RuntimeError, id="eval-without-running-stats"),
    pytest.param(lambda f: f(_X, _C3.clone(), _C3.clone(), torch.ones(4), training=True), RuntimeError,
                 id="weight-size"),
    pytest.param(lambda f: f(_X, torch.zeros(4), torch.ones(4), training=True), RuntimeError,
                 id="running-mean-size"),
    pytest.param(lambda f: f(torch.ones(4, 3, dtype=torch.int64), _C3.clone(), _C3.clone()), RuntimeError,
                 id="integer-input"),
    pytest.param(lambda f: f(_X, _C3.clone().half(), _C3.clone().half(), training=True), RuntimeError,
                 id="fp32-input-fp16-params"),
    pytest.param(lambda f: f(_X, _C3.clone(), _C3.clone(), training=True, momentum=None), TypeError,
                 id="momentum-None"),
]


@pytest.mark.parametrize("call, expected", BAD_CALLS)
def test_bad_input_raises_what_torch_raises(call, expected):
    with pytest.raises(expected):
        call(TF.batch_norm)
    with pytest.raises(expected) as info:
        call(F.batch_norm)
    assert "batch_norm" in str(info.value) or "per channel" in str(info.value)


def test_errors_before_mutation():
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError):
        F.batch_norm(torch.randn(4, 3), rm, rv, training=True, activation="nope")
    with tkernels.use_backend("triton"):
        with pytest.raises(RuntimeError, match="float64"):
            F.batch_norm(torch.randn(4, 3, dtype=torch.float64), rm.double(), rv.double(), training=True)
    m = tnn.BatchNorm2d(3)
    with pytest.raises(RuntimeError):
        m(torch.randn(2, 4, 3, 3))  # 4 channels for a 3-channel layer
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    assert int(m.num_batches_tracked) == 0 and torch.equal(m.running_mean, torch.zeros(3))


# ---------------------------------------------------------------------------------------------
# Layout planning, custom-op checks, torch.compile
# ---------------------------------------------------------------------------------------------
def test_geometry_needs_no_copy():
    shape = (3, 5, 4, 6)
    contiguous = torch.empty(shape)
    cl = contiguous.to(memory_format=torch.channels_last)
    padded = canary(torch.randn(shape))
    g = K.plan(shape, contiguous.stride(), contiguous.stride())
    assert (g.S, g.O, g.channels_inner) == (24, 3, False)
    g = K.plan(shape, cl.stride(), cl.stride())
    assert (g.S, g.O, g.channels_inner) == (72, 1, True)
    g = K.plan(shape, padded.stride(), contiguous.stride())
    assert g is not None and g.S == 6 and g.O == 12
    g = K.plan(shape, cl.stride(), torch.empty(shape).expand(shape).stride(), (0, 0, 0, 0))
    assert g is not None  # channels_last x with a contiguous / broadcast gradient: still no copy
    assert K.plan((4, 3), (3, 1), (3, 1)).channels_inner


def _opcheck_samples(device):
    x = torch.randn(3, 2, 2, 3, device=device)
    p = [torch.randn(2, device=device) for _ in range(2)]
    rm, rv = torch.zeros(2, device=device), torch.ones(2, device=device)
    stats = torch.ops.tkernels.batch_norm_stats(x, None, None, 0.1, 1e-5)
    g = torch.randn_like(x)
    sums = torch.ops.tkernels.batch_norm_backward_reduce(g, x, stats, p[0], p[1], None, None, True, 1e-5, "gelu",
                                                         0.0, True, True)[0]
    return [
        (torch.ops.tkernels.batch_norm_stats.default, (x, rm, rv, 0.1, 1e-5)),
        (torch.ops.tkernels.batch_norm_stats.default, (x, None, None, 0.1, 1e-5)),
        (torch.ops.tkernels.batch_norm_gather_stats.default, (torch.stack([stats, stats]), rm, rv, 0.1, 1e-5)),
        (torch.ops.tkernels.batch_norm_train.default, (x, p[0], p[1], rm, rv, 0.1, 1e-5, "gelu", 0.0)),
        (torch.ops.tkernels.batch_norm_train.default, (x, p[0], p[1], rm, rv, 0.1, 1e-5, "relu", 0.0, False)),
        (torch.ops.tkernels.batch_norm_train.default,
         (x.to(memory_format=torch.channels_last), None, None, None, None, 0.1, 1e-5, "identity", 0.0)),
        (torch.ops.tkernels.batch_norm_apply.default, (x, stats, p[0], p[1], None, None, True, 1e-5, "relu", 0.0)),
        (torch.ops.tkernels.batch_norm_apply.default, (x, None, None, p[1], rm, rv, False, 1e-5, "identity", 0.0)),
        (torch.ops.tkernels.batch_norm_backward_reduce.default,
         (g, x, stats, p[0], None, None, None, True, 1e-5, "silu", 0.0, True, False)),
        (torch.ops.tkernels.batch_norm_backward_input.default,
         (g, x, stats, p[0], p[1], None, None, sums, True, 1e-5, "gelu", 0.0)),
        (torch.ops.tkernels.batch_norm_backward_input.default,
         (g, x, None, None, None, rm, rv, None, False, 1e-5, "identity", 0.0)),
        (torch.ops.tkernels.batch_norm_backward.default,
         (g, x, stats, p[0], p[1], None, None, True, 1e-5, "relu", 0.0, True, True, True)),
        (torch.ops.tkernels.batch_norm_backward.default,
         (g, x, stats, None, p[1], None, None, True, 1e-5, "identity", 0.0, True, False, True)),
        (torch.ops.tkernels.batch_norm_backward.default,
         (g, x, None, p[0], None, rm, rv, False, 1e-5, "silu", 0.0, False, True, False)),
    ]


def test_opcheck(backend):
    for op, args in _opcheck_samples(device_for(backend)):
        torch.library.opcheck(op, args)


@pytest.mark.slow
def test_torch_compile_fullgraph(backend, launched):
    device = device_for(backend)
    torch._dynamo.reset()
    model = tnn.BatchNorm2d(3, activation="relu").to(device)
    reference = tnn.BatchNorm2d(3, activation="relu").to(device)
    compiled = torch.compile(model, fullgraph=True)
    x = _values((4, 3, 3, 3), torch.float32).to(device)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled(xc).sum().backward()
    reference(xe).sum().backward()
    # the independent reference: the NumPy backend in float64
    numpy64 = tnn.BatchNorm2d(3, activation="relu").double()
    x64 = x.detach().cpu().double().requires_grad_()
    with tkernels.use_backend("numpy"):
        numpy64(x64).sum().backward()
    for expected, dtype in ((xe.grad, None), (x64.grad, torch.float32)):
        assert_close(xc.grad, expected, dtype=dtype, reduction=36)
    for expected in (reference, numpy64):
        assert_close(model.weight.grad, expected.weight.grad, dtype=torch.float32, reduction=36)
        assert_close(model.running_var, expected.running_var, dtype=torch.float32)
    assert int(model.num_batches_tracked) == 1
    if backend == "triton":
        assert _forward_kernels(launched) == SINGLE, launched  # compiled and eager alike
    model.eval()
    reference.eval()
    numpy64.eval()
    assert_close(compiled(x), reference(x))
    with tkernels.use_backend("numpy"):
        assert_close(compiled(x), numpy64(x.cpu().double()), dtype=torch.float32)


@pytest.mark.parametrize("act", ["identity", "relu", "gelu"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("need", [(True, True, True), (True, False, False), (False, True, True), (False, False, True)])
def test_fused_backward_matches_the_two_ops(backend, launched, act, training, need):
    """batch_norm_backward (one op: what BatchNorm's backward runs) gives what backward_reduce then
    backward_input give (what SyncBatchNorm runs, with an all-reduce between them) and what the
    whole-layer float64 reference gives; unrequested gradients come back empty."""
    ops = torch.ops.tkernels
    device = device_for(backend)
    x = _values((6, 3, 4, 5), torch.float32).to(device)
    g = torch.randn_like(x)
    w, b = _per_channel(3, torch.float32).to(device), _per_channel(3, torch.float32).to(device)
    rm, rv = _per_channel(3, torch.float32).to(device), _per_channel(3, torch.float32, positive=True).to(device)
    stats = ops.batch_norm_stats(x, None, None, 0.1, 1e-5) if training else None
    running = (None, None) if training else (rm, rv)
    need_x, need_w, need_b = need
    before = len(launched)
    dx, dw, db = ops.batch_norm_backward(g, x, stats, w, b, *running, training, 1e-5, act, 0.0, need_x, need_w,
                                         need_b)
    fused_kernels = set(launched[before:])
    sums, dw2, db2 = ops.batch_norm_backward_reduce(g, x, stats, w, b, *running, training, 1e-5, act, 0.0, True,
                                                    True)
    dx2 = ops.batch_norm_backward_input(g, x, stats, w, b, *running, sums if training else None, training, 1e-5,
                                        act, 0.0)
    expected = ref.batch_norm_backward(to_numpy64(g), to_numpy64(x), to_numpy64(w), to_numpy64(b), to_numpy64(rm),
                                       to_numpy64(rv), training, 1e-5, act, 0.0)
    for got, two_ops, exact, wanted in zip((dx, dw, db), (dx2, dw2, db2), expected, need):
        if wanted:
            assert_close(got, two_ops, reduction=x.numel() // 3)
            assert_close(got, exact, reduction=x.numel() // 3)
        else:
            assert got.numel() == 0
    if backend == "triton":  # the kernels the two ops launch, and only those needed
        reduces = need_w or need_b or (need_x and training)
        assert ("bn_backward_partial_kernel" in fused_kernels) == reduces, fused_kernels
        assert ("bn_backward_input_kernel" in fused_kernels) == need_x, fused_kernels


# ---------------------------------------------------------------------------------------------
# Bytes in flight (issue 13): paired / pipelined reduction loops, every tuned tile, chunked
# combines and a split grid that fills every SM.
# ---------------------------------------------------------------------------------------------
def _orientation_configs(channels_inner):
    """(reduction, elementwise, single-launch) config triples covering every tuned config of one
    orientation at least once."""
    lists = (K._REDUCE[channels_inner], K._ELEMENTWISE[channels_inner], K._SINGLE[channels_inner])
    return [tuple(cfgs[min(i, len(cfgs) - 1)] for cfgs in lists) for i in range(max(map(len, lists)))]


TILE_CASES = [pytest.param(ci, i, id=f"{'channels_last' if ci else 'nchw'}-{i}")
              for ci in (False, True) for i in range(len(_orientation_configs(ci)))]


@pytest.mark.parametrize("channels_inner, index", TILE_CASES)
def test_every_tuned_tile_runs_under_the_interpreter(monkeypatch, launched, channels_inner, index):
    """Each GPU config (tile shape and STAGES, pipelined or not) of the reduction, elementwise and
    single-launch kernels, run by the interpreter in place of its one config: training forward
    through the split and the single-launch paths, and backward, against the reference and torch.
    The shape leaves every tile partly masked (odd C and S) and gives the split ranges odd lengths."""
    reduce_cfg, elementwise_cfg, single_cfg = _orientation_configs(channels_inner)[index]
    for tuned, cfg in ((K.TUNED_STATS, reduce_cfg), (K.TUNED_BWD_PARTIAL, reduce_cfg),
                       (K.TUNED_APPLY, elementwise_cfg), (K.TUNED_BWD_INPUT, elementwise_cfg),
                       (K.TUNED_TRAIN_SINGLE, single_cfg)):
        monkeypatch.setattr(tuned[channels_inner], "_interpreter_meta", dict(cfg.kwargs))
    shape, layout = ((5, 19, 3, 7), torch.channels_last) if channels_inner else ((5, 3, 7, 9), None)
    C = shape[1]
    default_threshold = K.SINGLE_LAUNCH_MAX_POSITIONS
    with tkernels.use_backend("triton"):
        for split in (True, False):
            monkeypatch.setattr(K, "SINGLE_LAUNCH_MAX_POSITIONS", 0 if split else default_threshold)
            start = len(launched)
            x = _values(shape, torch.float32, scale=3.0, shift=20.0)
            weight, bias = _per_channel(C, torch.float32), _per_channel(C, torch.float32)
            rm, rv = _per_channel(C, torch.float32), _per_channel(C, torch.float32, positive=True)
            y, g, grads, rmt, rvt = _run("triton", x, weight, bias, rm, rv, True, "gelu", momentum=0.3, layout=layout)
            assert _forward_kernels(launched[start:]) == (SPLIT if split else SINGLE), launched[start:]
            assert geometry_of(shape, layout).channels_inner == channels_inner
            _check_against_reference_and_torch(x, weight, bias, rm, rv, True, "gelu", y, g, grads, rmt, rvt,
                                               momentum=0.3)


def geometry_of(shape, layout):
    x = torch.empty(shape, memory_format=layout or torch.contiguous_format)
    return K.plan(x.shape, x.stride())


def test_pair_loop_masks_the_item_past_its_range_end(monkeypatch, launched):
    """NCHW (5, 2, 8, 8) with the interpreter's 64-position tiles has 5 work items per channel block,
    split 3 ways as [0, 2), [2, 4), [4, 5): the last program's pair has no second item, which must
    not be read (it is the next sample, or past the end of x: NaN in the canary) nor counted."""
    monkeypatch.setattr(K, "SINGLE_LAUNCH_MAX_POSITIONS", 0)
    shape = (5, 2, 8, 8)
    geom = geometry_of(shape, None)
    assert K._INTERP[False].kwargs["BLOCK_S"] == geom.S == 64 and geom.O == 5
    with tkernels.use_backend("triton"):
        assert K._num_splits(geom, torch.device(device_for("triton"))) == 3
        x = _values(shape, torch.float32)
        rm, rv = torch.zeros(2), torch.ones(2)
        y, g, grads, rmt, rvt = _run("triton", x, None, None, rm, rv, True, "identity")
    assert _forward_kernels(launched) == SPLIT, launched
    _check_against_reference_and_torch(x, None, None, rm, rv, True, "identity", y, g, grads, rmt, rvt)


def test_gather_stats_merges_many_partials_chunk_by_chunk(backend, launched):
    """Nine partials, the first three empty, merged by the combine kernel: under the interpreter it
    reads 2 partials per chunk, so the first chunk is all empty and the second starts with an empty
    one (the reference pivot is the first non-empty partial's), and the rest merge chunk by chunk."""
    device = device_for(backend)
    sizes = (0, 0, 0, 4, 1, 7, 2, 3, 5)
    chunks = [torch.randn(n, 3, 2) * (1 + i) + 100.0 * (-1) ** i for i, n in enumerate(sizes)]
    local = [torch.ops.tkernels.batch_norm_stats(c.to(device), None, None, 0.0, 1e-5) for c in chunks]
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    merged = torch.ops.tkernels.batch_norm_gather_stats(torch.stack(local), rm, rv, 0.25, 1e-5)
    expect_kernels("bn_stats_combine_kernel")
    whole = to_numpy64(torch.cat(chunks))
    count, mean, m2 = ref.channel_stats(whole)
    assert_close(merged[0], count)
    assert_close(merged[1].double() + merged[2].double(), mean, dtype=merged.dtype, msg="mean = pivot + offset")
    assert_close(merged[3], m2, scale=10, msg="M2")
    rm_ref, rv_ref = ref.update_running(np.zeros(3), np.ones(3), count, mean, m2, 0.25)
    assert_close(rm, rm_ref, msg="running_mean")
    assert_close(rv, rv_ref, msg="running_var")


def _strides(shape, channels_last):
    if not channels_last:
        out, step = [], 1
        for n in reversed(shape):
            out.append(step)
            step *= n
        return tuple(reversed(out))
    N, C, H, W = shape
    return (H * W * C, 1, W * C, C)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(256, 64, 112, 112), (256, 256, 56, 56), (256, 2048, 7, 7), (32, 512, 28, 28),
                                   (8, 3, 4, 4)], ids=lambda s: "x".join(map(str, s)))
def test_split_grid_fills_every_sm(monkeypatch, shape, channels_last):
    """On a 132-SM GPU (H200), the reduction grid puts PROGRAMS_PER_SM programs of the widest tuned
    tile on every SM wherever there are enough work items, never gives a program fewer than
    MIN_ITEMS_PER_PROGRAM items unless the whole input is smaller, and caps the partials."""
    monkeypatch.setattr(K, "sm_count", lambda device: 132)
    geom = K.plan(shape, _strides(shape, channels_last))
    assert geom.channels_inner == channels_last
    G = K._num_splits(geom, torch.device("cuda"))
    widest = max(K._REDUCE[channels_last], key=lambda c: c.kwargs["BLOCK_C"]).kwargs
    items = geom.O * -(-geom.S // widest["BLOCK_S"])
    programs = -(-geom.C // widest["BLOCK_C"]) * G
    assert 1 <= G <= K.MAX_SPLITS
    if items >= K.MIN_ITEMS_PER_PROGRAM * K.PROGRAMS_PER_SM * 132:
        assert programs >= K.PROGRAMS_PER_SM * 132, (G, programs)
    assert G == 1 or items // G >= K.MIN_ITEMS_PER_PROGRAM, (G, items)
    if shape[0] == 256:  # the ResNet-50 batch norms: at least a full wave everywhere
        assert programs >= K.PROGRAMS_PER_SM * 132


@pytest.mark.slow
def test_pipelined_reduction_builds_move_tiles_by_cp_async():
    """Compiled for sm_80 and sm_90 with a typical launch's unit strides (as `tkernels inspect`
    does), every STAGES > 1 reduction build loads its tiles with cp.async (LDGSTS) and the STAGES = 1
    fallback does not; none spills. (The interpreter ignores num_stages, so only compiling shows it.)"""
    from tkernels import inspection

    rows = inspection.inspect_kernels(kernels=["batch_norm_stats_partial*", "batch_norm_backward_partial*"],
                                      archs=["sm_80", "sm_90"], dtypes=["bf16"])
    assert len(rows) == 2 * 2 * sum(len(K._REDUCE[ci]) for ci in (False, True))
    for r in rows:
        assert r["ok"] and not r["spill_bytes"], r
        assert (r["async_copy_ops"] > 0) == (r["meta"]["STAGES"] > 1), (r["kernel"], r["arch"], r["config"])
