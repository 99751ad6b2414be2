"""Forward-mode AD: tkernels' autograd Functions define no jvp, so a dual tensor must meet torch's
error for such a Function, never a result silently without its tangent. A dual tensor need not
require grad, so the eager fast path (ops/_dispatch.py) takes Function.apply whenever a dual level
is entered. torch.func.jvp (a functorch transform) takes it anyway and gets torch's error for a
Function without setup_context."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import tkernels.functional as F
from tkernels.ops import _dispatch

from helpers import assert_close, device_for


class _NoJvp(torch.autograd.Function):
    """A Function as ours are (forward(ctx, ...), no jvp, no setup_context): torch's errors for it
    are the expected ones."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def _torch_error(call):
    with pytest.raises(Exception) as info:
        call()
    return type(info.value), str(info.value)


def _calls(dev):
    """(name, f(x) on one dual input x of shape (4, 6, 5, 3)) for every public op family."""
    w2, w4 = torch.randn(7, 3, device=dev), torch.randn(2, 6, 3, 3, device=dev)
    t = torch.randint(0, 6, (4, 5, 3), device=dev)
    return [
        ("linear", lambda x: F.linear(x, w2)),
        ("linear+gelu", lambda x: F.linear(x, w2, activation="gelu")),
        ("conv2d", lambda x: F.conv2d(x, w4, padding=1)),
        ("batch_norm", lambda x: F.batch_norm(x, None, None, training=True)),
        ("relu", F.relu),
        ("relu_inplace", lambda x: F.relu(x * 1.0, inplace=True)),
        ("sigmoid", F.sigmoid),
        ("softmax", lambda x: F.softmax(x, 1)),
        ("log_softmax", lambda x: F.log_softmax(x, 1)),
        ("max_pool2d", lambda x: F.max_pool2d(x, 2)),
        ("avg_pool2d", lambda x: F.avg_pool2d(x, 2)),
        ("adaptive_avg_pool2d", lambda x: F.adaptive_avg_pool2d(x, 1)),
        ("cross_entropy", lambda x: F.cross_entropy(x, t)),
        ("mse_loss", lambda x: F.mse_loss(x, torch.zeros_like(x))),
        ("dropout", lambda x: F.dropout(x, 0.5)),
    ]


NAMES = [name for name, _ in _calls("cpu")]


@pytest.mark.parametrize("grad_mode", ["grad", "no_grad"])
@pytest.mark.parametrize("name", NAMES)
def test_a_dual_tensor_raises_torchs_error_for_a_function_without_jvp(backend, name, grad_mode):
    dev = device_for(backend)
    call = dict(_calls(dev))[name]
    x, tangent = torch.randn(4, 6, 5, 3, device=dev), torch.randn(4, 6, 5, 3, device=dev)
    with torch.set_grad_enabled(grad_mode == "grad"), fwAD.dual_level():
        dual = fwAD.make_dual(x, tangent)
        assert not dual.requires_grad  # (the case the eager fast path used to take directly)
        expected = _torch_error(lambda: _NoJvp.apply(dual))
        with pytest.raises(expected[0]) as info:
            call(dual)
    assert str(info.value) == expected[1]


def test_a_dual_level_without_dual_inputs_still_computes(backend):
    """Inside a dual level, calls on ordinary tensors take Function.apply and give the usual result."""
    dev = device_for(backend)
    x, w = torch.randn(5, 33, device=dev, requires_grad=True), torch.randn(7, 33, device=dev)
    with fwAD.dual_level():
        assert _dispatch.eager_device((x,)) is None
        y = F.linear(x, w, activation="relu")
        assert fwAD.unpack_dual(y).tangent is None
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    xd = x.detach().double().requires_grad_()
    expected = torch.relu(xd @ w.double().t())
    (expected_dx,) = torch.autograd.grad(expected, xd, torch.ones_like(expected))
    assert_close(y, expected, reduction=33)
    assert_close(dx, expected_dx, reduction=7)


def test_the_fast_path_returns_after_the_dual_level_exits():
    x = torch.randn(3)
    with fwAD.dual_level():
        assert _dispatch.eager_device((x,)) is None
    assert _dispatch.eager_device((x,)) == "cpu"


@pytest.mark.parametrize("name", ["linear", "relu", "batch_norm", "cross_entropy"])
def test_torch_func_jvp_raises_torchs_functorch_error(backend, name):
    dev = device_for(backend)
    call = dict(_calls(dev))[name]
    x, tangent = torch.randn(4, 6, 5, 3, device=dev), torch.randn(4, 6, 5, 3, device=dev)
    expected = _torch_error(lambda: torch.func.jvp(_NoJvp.apply, (x,), (tangent,)))
    assert "setup_context" in expected[1]
    with pytest.raises(expected[0]) as info:
        torch.func.jvp(call, (x,), (tangent,))
    assert str(info.value) == expected[1]
