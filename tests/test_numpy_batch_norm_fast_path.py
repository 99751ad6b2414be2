"""The NumPy backend's batch norm at small sizes, where fixed per-call costs decide its speed: running
stats updated in place through NumPy views of the buffers, no stats tensor when no backward can
run, and a training forward that keeps x - mean and z for its backward (ops.batch_norm
KEEP_ROWS_MAX_NUMEL). Each is checked against torch and against the path it replaces."""
import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import tkernels
from tkernels import functional as F
from tkernels import nn as tnn
from tkernels.ops import batch_norm as bn_ops
from tkernels.reference import batch_norm as ref
from tkernels.reference._errstate import silent

from helpers import assert_close

TORCH_ACT = {"identity": lambda z: z, "relu": TF.relu, "gelu": TF.gelu}


@pytest.fixture(autouse=True)
def numpy_backend():
    with tkernels.use_backend("numpy"):
        yield


@pytest.fixture
def backward_calls(monkeypatch):
    """The `kept` argument of every reference backward call: None where the rows were recomputed."""
    seen = []
    original = ref.backward_local

    def spy(*args, **kwargs):
        seen.append(args[13] if len(args) > 13 else kwargs.get("kept"))
        return original(*args, **kwargs)

    monkeypatch.setattr(ref, "backward_local", spy)
    return seen


# ---------------------------------------------------------------------------------------------
# Running stats in place
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_running_stats_move_in_place_like_torch(dtype, momentum):
    ours = tnn.BatchNorm1d(5, momentum=momentum, activation="relu").to(dtype)
    theirs = torch.nn.BatchNorm1d(5, momentum=momentum).to(dtype)
    buffers = (ours.running_mean, ours.running_var, ours.num_batches_tracked)
    pointers = [b.data_ptr() for b in buffers]
    state = ours.state_dict()
    optimizer = torch.optim.SGD(ours.parameters(), lr=0.1)
    params = [p.detach().clone() for p in ours.parameters()]
    for step in range(3):
        x = (torch.randn(6, 5, dtype=dtype) * (1 + step) + step).requires_grad_()
        versions = (x._version, ours.weight._version, ours.bias._version)
        running = (ours.running_mean._version, ours.running_var._version)
        ours(x)
        theirs(x.detach())
        # the buffers moved, through views of the same storage; nothing else was written
        assert (x._version, ours.weight._version, ours.bias._version) == versions
        assert ours.running_mean._version > running[0] and ours.running_var._version > running[1]
        assert_close(ours.running_mean, theirs.running_mean, msg=f"step {step}")
        assert_close(ours.running_var, theirs.running_var, msg=f"step {step}")
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 3
    assert all(a is b for a, b in zip((ours.running_mean, ours.running_var, ours.num_batches_tracked), buffers))
    assert [b.data_ptr() for b in buffers] == pointers
    assert state["running_mean"].data_ptr() == pointers[0] and state["running_var"].data_ptr() == pointers[1]
    assert_close(state["running_var"], theirs.running_var)  # the state_dict entry sees the new values
    assert optimizer.param_groups[0]["params"][0] is ours.weight
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), params))  # forward leaves the parameters


def test_strided_running_buffers_are_written_where_they_live():
    storage_mean, storage_var = torch.full((8,), 7.0), torch.full((8,), 9.0)
    running_mean, running_var = storage_mean[::2], storage_var[1::2]  # 4 channels, stride 2
    expected_mean, expected_var = running_mean.clone(), running_var.clone()
    x = torch.randn(5, 4, 3)
    F.batch_norm(x, running_mean, running_var, training=True, momentum=0.25)
    TF.batch_norm(x, expected_mean, expected_var, training=True, momentum=0.25)
    assert_close(storage_mean[::2], expected_mean)
    assert_close(storage_var[1::2], expected_var)
    assert torch.equal(storage_mean[1::2], torch.full((4,), 7.0))  # the gaps are untouched
    assert torch.equal(storage_var[::2], torch.full((4,), 9.0))


def test_update_running_writes_out_and_keeps_an_empty_batchs_stats():
    running_mean, running_var = np.array([1.0, 2.0], np.float32), np.array([3.0, 4.0], np.float32)
    mean, m2 = np.array([0.5, -0.5]), np.array([2.0, 6.0])
    out = (running_mean, running_var)
    new = ref.update_running(*out, 5.0, mean, m2, 0.25, out=out)
    assert new[0] is running_mean and new[1] is running_var
    expected_mean = 0.75 * np.array([1.0, 2.0]) + 0.25 * mean
    expected_var = 0.75 * np.array([3.0, 4.0]) + 0.25 * m2 / 4.0
    np.testing.assert_array_equal(running_mean, expected_mean.astype(np.float32))
    np.testing.assert_array_equal(running_var, expected_var.astype(np.float32))
    # per-channel counts: the channel that saw nothing keeps its stats, as with one count of 0
    kept_mean, kept_var = ref.update_running(np.ones(2), np.ones(2), np.array([4.0, 0.0]), mean, m2, 0.5)
    np.testing.assert_array_equal(kept_mean, [0.75, 1.0])
    np.testing.assert_array_equal(kept_var, [0.5 + 0.5 * 2.0 / 3.0, 1.0])
    assert [list(a) for a in ref.update_running(np.ones(2), np.ones(2), 0.0, mean, m2, 0.5)] == [[1, 1], [1, 1]]


# ---------------------------------------------------------------------------------------------
# No stats tensor when no backward can run
# ---------------------------------------------------------------------------------------------
def test_training_forward_without_stats_gives_the_same_output_and_running_stats():
    x, w, b = torch.randn(6, 4, 3), torch.rand(4) + 0.5, torch.randn(4)
    results = []
    for need_stats in (True, False):
        rm, rv = torch.zeros(4), torch.ones(4)
        y, stats = bn_ops.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5, "relu", 0.0, need_stats)
        results.append((y, stats, rm, rv))
    (y1, s1, rm1, rv1), (y2, s2, rm2, rv2) = results
    assert s1.shape == (bn_ops.K.STATS_ROWS, 4) and s2.shape == (0,)
    assert torch.equal(y1, y2) and torch.equal(rm1, rm2) and torch.equal(rv1, rv2)


def test_no_grad_forward_builds_no_stats(monkeypatch):
    built = []
    original = bn_ops._numpy_stats_rows
    monkeypatch.setattr(bn_ops, "_numpy_stats_rows", lambda *a: built.append(1) or original(*a))
    m = tnn.BatchNorm1d(4, activation="relu")
    x = torch.randn(8, 4, requires_grad=True)
    with torch.no_grad():
        m(x)
    m.requires_grad_(False)
    m(x.detach())
    assert built == []
    m.requires_grad_(True)
    m(x.detach())  # weight and bias need gradients: the stats are built for backward
    assert built == [1]


# ---------------------------------------------------------------------------------------------
# Backward reuses the training forward's rows
# ---------------------------------------------------------------------------------------------
def _forward_backward(x, weight, bias, activation, grad):
    x = x.clone().requires_grad_()
    params = [p.clone().requires_grad_() for p in (weight, bias) if p is not None]
    w, b = (params + [None, None])[:2] if weight is not None else (None, params[0] if params else None)
    y = F.batch_norm(x, torch.zeros(x.shape[1], dtype=x.dtype), torch.ones(x.shape[1], dtype=x.dtype), w, b,
                     training=True, activation=activation)
    return (y, *torch.autograd.grad(y, [x, *params], grad))


@pytest.mark.parametrize("activation", ["identity", "relu", "gelu"])
@pytest.mark.parametrize("shape", [(16, 5), (4, 3, 7)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kept_rows_give_the_gradients_of_recomputed_ones(monkeypatch, backward_calls, activation, shape, affine,
                                                         dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 2 + 1).to(dtype)
    C = shape[1]
    weight, bias = ((torch.rand(C) + 0.5).to(dtype), torch.randn(C).to(dtype)) if affine else (None, None)
    grad = torch.randn(shape, dtype=dtype)
    kept = _forward_backward(x, weight, bias, activation, grad)
    assert backward_calls and backward_calls[-1] is not None  # the forward's rows were used
    monkeypatch.setattr(bn_ops, "KEEP_ROWS_MAX_NUMEL", -1)
    recomputed = _forward_backward(x, weight, bias, activation, grad)
    assert backward_calls[-1] is None
    reduction = x.numel() // C
    for a, b in zip(kept, recomputed):
        assert_close(a, b, reduction=reduction)
    # and both are torch's
    xt = x.clone().requires_grad_()
    params = [p.clone().requires_grad_() for p in (weight, bias) if p is not None]
    yt = TORCH_ACT[activation](TF.batch_norm(xt, None, None, *(params or [None, None]), training=True))
    expected = (yt, *torch.autograd.grad(yt, [xt, *params], grad))
    for a, b in zip(kept, expected):
        assert_close(a, b.detach(), reduction=reduction)


def test_kept_rows_are_consumed_once(backward_calls):
    x = torch.randn(8, 3, requires_grad=True)
    m = tnn.BatchNorm1d(3, activation="relu")
    y = m(x)
    g = torch.randn_like(y)
    first = torch.autograd.grad(y, [x, m.weight], g, retain_graph=True)
    second = torch.autograd.grad(y, [x, m.weight], g)
    assert backward_calls[0] is not None and backward_calls[1] is None  # (dx is built in the kept rows)
    for a, b in zip(first, second):
        assert_close(a, b, reduction=8)


def test_kept_rows_serve_only_their_own_forward(backward_calls):
    """A backward op called with another input (equal values, another tensor), changed parameters or
    other options recomputes; the rows are dropped either way."""
    x, w, b = torch.randn(6, 4), torch.rand(4) + 0.5, torch.randn(4)
    g = torch.randn(6, 4)
    for case in ("other input", "weight changed", "other activation", "same"):
        y, stats = bn_ops.batch_norm_train(x, w, b, None, None, 0.1, 1e-5, "relu", 0.0)
        args = [g, x, stats, w, b, None, None, True, 1e-5, "relu", 0.0, True, True, True]
        if case == "other input":
            args[1] = x.clone()
        elif case == "weight changed":
            w.add_(0.0)  # same values, but an in-place write: the version moves
        elif case == "other activation":
            args[9] = "identity"
        dx, dw, db = bn_ops.batch_norm_backward(*args)
        assert (backward_calls[-1] is not None) == (case == "same"), case
        assert not hasattr(stats, bn_ops._KEPT_ATTRIBUTE)
        x64, g64 = x.double().requires_grad_(), g.double()
        w64, b64 = w.double().requires_grad_(), b.double().requires_grad_()
        act = TORCH_ACT[args[9]]
        expected = torch.autograd.grad(act(TF.batch_norm(x64, None, None, w64, b64, training=True)),
                                       [x64, w64, b64], g64)
        for got, want in zip((dx, dw, db), expected):
            assert_close(got, want, reduction=6, msg=case)


def test_large_inputs_keep_nothing(backward_calls):
    x = torch.randn(2, 3, bn_ops.KEEP_ROWS_MAX_NUMEL, requires_grad=True)
    y = F.batch_norm(x, None, None, training=True, activation="relu")
    y.sum().backward()
    assert backward_calls == [None]


# ---------------------------------------------------------------------------------------------
# One np.errstate per call
# ---------------------------------------------------------------------------------------------
def test_nested_silent_calls_stay_silent_and_restore_the_error_state():
    @silent
    def inner(a):
        return a / 0.0

    @silent
    def outer(a):
        return inner(a) - inner(a)  # inf - inf inside the nested call's region

    before = np.geterr()
    with np.errstate(all="raise"):
        assert np.isnan(outer(np.ones(2))).all()
        with pytest.raises(FloatingPointError):
            np.ones(2) / 0.0  # restored after the calls

        @silent
        def failing():
            raise ValueError("boom")

        with pytest.raises(ValueError):
            failing()
        assert np.isinf(inner(np.ones(1))).all()  # the region flag was reset by the exception
        with pytest.raises(FloatingPointError):
            np.ones(2) / 0.0
    assert np.geterr() == before
