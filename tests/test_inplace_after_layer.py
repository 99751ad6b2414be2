"""In-place ops on a layer's output: a tkernels layer keeps for backward exactly what torch's own
sequence of ops keeps, so the in-place habits of torch models (`out += identity`, ReLU(inplace=True)
outside a Sequential, `y.mul_(2)`) work where torch's work, and fail where torch's fail."""
import copy

import pytest
import torch
from torch import nn

import tkernels
from helpers import assert_close, device_for


def _relu_inplace(y, other):
    return nn.ReLU(inplace=True)(y)


def _add_inplace(y, other):
    y += other
    return y


def _mul_inplace(y, other):
    return y.mul_(2)


INPLACE_OPS = {"relu_": _relu_inplace, "add_": _add_inplace, "mul_": _mul_inplace}

# layers after which torch allows an in-place op on the output (none of them keeps its output)
LAYERS = {
    "linear": (lambda: nn.Linear(7, 5), (6, 7)),
    "linear_no_bias_3d": (lambda: nn.Linear(7, 5, bias=False), (2, 3, 7)),
    "conv": (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 6, 5)),
    "conv_strided_grouped": (lambda: nn.Conv2d(4, 6, 3, stride=2, groups=2, bias=False), (2, 4, 7, 7)),
    "conv_1x1": (lambda: nn.Conv2d(4, 8, 1), (2, 4, 3, 3)),
    "batch_norm": (lambda: nn.BatchNorm2d(3), (4, 3, 3, 3)),
    "max_pool": (lambda: nn.MaxPool2d(2), (2, 3, 6, 6)),
    "avg_pool": (lambda: nn.AvgPool2d(2), (2, 3, 6, 6)),
    "adaptive_avg_pool": (lambda: nn.AdaptiveAvgPool2d(1), (2, 3, 5, 5)),
    "gelu": (lambda: nn.GELU(), (4, 9)),
    "leaky_relu": (lambda: nn.LeakyReLU(0.1), (4, 9)),
    # fused activations whose torch twin (the separate activation) keeps its input, not its output
    "linear+gelu": (lambda: nn.Sequential(nn.Linear(7, 5), nn.GELU()), (6, 7)),
    "conv+silu": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU()), (2, 3, 6, 6)),
    "bn+leaky_relu": (lambda: nn.Sequential(nn.BatchNorm2d(3), nn.LeakyReLU(0.2)), (4, 3, 3, 3)),
}


def _twins(factory, dev):
    torch_model = factory().to(dev)
    ours = tkernels.nn.convert(copy.deepcopy(nn.Sequential(torch_model)), fuse=True)
    assert not any(type(m).__module__.startswith("torch.nn") and not isinstance(m, (nn.Sequential, nn.Identity))
                   for m in ours.modules()), f"not every layer was converted: {ours}"
    return nn.Sequential(torch_model), ours


def _run(model, x, other, inplace, grad):
    x = x.clone().requires_grad_()
    other = other.clone().requires_grad_()
    y = inplace(model(x), other)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(y, [x, other, *params], grad, allow_unused=True)
    return y.detach(), grads


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("op", INPLACE_OPS)
@pytest.mark.parametrize("layer", LAYERS)
def test_inplace_op_on_layer_output(backend, layer, op, training):
    dev = device_for(backend)
    factory, shape = LAYERS[layer]
    theirs, ours = _twins(factory, dev)
    theirs.train(training), ours.train(training)
    x = torch.randn(*shape, device=dev)
    with torch.no_grad():
        out_shape = copy.deepcopy(theirs)(x).shape  # a copy: running stats move once per model
    other = torch.randn(out_shape, device=dev)
    grad = torch.randn(out_shape, device=dev)
    y_t, g_t = _run(theirs, x, other, INPLACE_OPS[op], grad)
    y_k, g_k = _run(ours, x, other, INPLACE_OPS[op], grad)  # raised "modified by an inplace operation" before
    assert_close(y_k, y_t, reduction=x.shape[-1] * 9, msg="output")
    for i, (a, b) in enumerate(zip(g_k, g_t)):
        assert (a is None) == (b is None), f"gradient {i}: {a is None} vs torch {b is None}"
        if a is not None:
            assert_close(a, b, reduction=x.numel(), msg=f"gradient {i} ({layer}, {op})")
    for name in ("running_mean", "running_var"):
        for m_t, m_k in zip(theirs.modules(), ours.modules()):
            if getattr(m_t, name, None) is not None:
                assert_close(getattr(m_k, name), getattr(m_t, name), msg=name)


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_fused_activation_that_keeps_its_output_refuses_inplace_like_torch(backend, kind, activation):
    """torch's relu/sigmoid/tanh keep their output, so an in-place op on it makes backward fail;
    the fused layer keeps the same tensor and fails the same way (no silent wrong gradient)."""
    dev = device_for(backend)
    act = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[activation]
    layer = nn.Linear(5, 4) if kind == "linear" else nn.Conv2d(2, 4, 3)
    shape = (3, 5) if kind == "linear" else (2, 2, 5, 5)
    theirs, ours = _twins(lambda: nn.Sequential(layer, act()), dev)
    x = torch.randn(*shape, device=dev, requires_grad=True)
    for model in (theirs, ours):
        y = model(x)
        y.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_module_relu_inplace_outside_sequential(backend):
    """SqueezeNet/EfficientNet style: `self.act(self.conv(x))` with ReLU(inplace=True) as an attribute."""
    dev = device_for(backend)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.conv = nn.Conv2d(6, 6, 1)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            h = self.act(self.fc(x))
            h = self.act(self.conv(h[:, :, None, None]))
            return h.flatten(1)

    theirs = Block().to(dev)
    ours = tkernels.nn.convert(copy.deepcopy(theirs), fuse=True)
    assert isinstance(ours.act, tkernels.nn.ReLU) and isinstance(ours.conv, tkernels.nn.Conv2d)
    x = torch.randn(4, 6, device=dev)
    for training in (True, False):
        theirs.train(training), ours.train(training)
        y_t, g_t = _run(theirs, x, x, lambda y, o: y, torch.ones(4, 6, device=dev))
        y_k, g_k = _run(ours, x, x, lambda y, o: y, torch.ones(4, 6, device=dev))
        assert_close(y_k, y_t, reduction=6)
        for a, b in zip(g_k, g_t):
            if b is not None:
                assert_close(a, b, reduction=24)


def test_inplace_op_after_dropout(backend):
    """Dropout keeps only its seed (torch keeps the mask): an in-place op on its output is legal."""
    dev = device_for(backend)
    x = torch.randn(64, 9, device=dev, requires_grad=True)
    y = tkernels.nn.Dropout(0.25)(x)
    kept = (y != 0).detach()
    y.mul_(3)
    y.backward(torch.ones_like(y))
    assert 0 < kept.sum() < kept.numel()
    assert_close(x.grad, kept * (3 / 0.75))
