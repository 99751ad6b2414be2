"""The activation registry and the standalone elementwise activation kernels."""
import pytest
import torch

import tkernels
import tkernels.functional as F
from tkernels.activations import Activation, resolve_activation, REGISTRY
from tkernels.reference import activations as ref
from helpers import expect_kernels, assert_close, canary, device_for, skip_unsupported, to_numpy64

# (tkernels function, torch function, kwargs) with torch's own signatures
FUNCS = [
    ("relu", {}), ("leaky_relu", {"negative_slope": 0.15}), ("gelu", {}), ("gelu", {"approximate": "tanh"}),
    ("silu", {}), ("sigmoid", {}), ("tanh", {}),
]
IDS = [f"{n}{'-' + '-'.join(f'{k}={v}' for k, v in kw.items()) if kw else ''}" for n, kw in FUNCS]


def _torch_fn(name):
    return getattr(torch.nn.functional, name) if name not in ("sigmoid", "tanh") else getattr(torch, name)


def _ref_name(name, kwargs):
    if name == "gelu" and kwargs.get("approximate") == "tanh":
        return "gelu_tanh", 0.0
    return name, kwargs.get("negative_slope", 0.0)


# ---- registry -------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,expected", [
    (None, Activation("identity")), ("relu", Activation("relu")), ("GELU", Activation("gelu")),
    ("gelu_tanh", Activation("gelu_tanh")), ("swish", Activation("silu")),
    ("leaky_relu", Activation("leaky_relu", 0.01)), (Activation("leaky_relu", 0.3), Activation("leaky_relu", 0.3)),
    (torch.nn.ReLU(), Activation("relu")), (torch.nn.LeakyReLU(0.2), Activation("leaky_relu", 0.2)),
    (torch.nn.GELU(approximate="tanh"), Activation("gelu_tanh")), (torch.nn.GELU(), Activation("gelu")),
    (torch.nn.SiLU(), Activation("silu")), (torch.nn.Sigmoid(), Activation("sigmoid")),
    (torch.nn.Tanh(), Activation("tanh")), (torch.nn.Identity(), Activation("identity")),
])
def test_resolve_activation(spec, expected):
    assert resolve_activation(spec) == expected


def test_unknown_activation_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown activation 'mish'; valid: .*gelu_tanh.*relu"):
        resolve_activation("mish")
    with pytest.raises(ValueError, match="unsupported activation module Softplus"):
        resolve_activation(torch.nn.Softplus())
    with pytest.raises(TypeError):
        resolve_activation(3)


def test_registry_is_complete():
    assert set(REGISTRY) == {"identity", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh"}
    assert set(ref.ACTIVATIONS) == set(REGISTRY)


# ---- standalone functions -------------------------------------------------------------------
@pytest.mark.parametrize("name,kwargs", FUNCS, ids=IDS)
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "channels_last", "transposed", "canary"])
def test_forward_backward_layouts(backend, name, kwargs, layout):
    dev = device_for(backend)
    base = torch.randn(3, 5, 7, 9, device=dev) * 3
    if layout == "sliced":
        x = base[:, 1:, ::2, 1:8]
    elif layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = base.transpose(1, 3)
    elif layout == "canary":
        x = canary(base)
    else:
        x = base
    x = x.detach().requires_grad_()
    y = getattr(F, name)(x, **kwargs)
    expected = _torch_fn(name)(x.detach().double(), **kwargs)
    assert_close(y, expected)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last), "output should keep the input's memory format"
    grad = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, grad)
    xd = x.detach().double().requires_grad_()
    (dx_t,) = torch.autograd.grad(_torch_fn(name)(xd, **kwargs), xd, grad.double())
    assert_close(dx, dx_t)
    rname, param = _ref_name(name, kwargs)
    assert_close(y, ref.activation_forward(rname, to_numpy64(x), param))
    assert_close(dx, ref.activation_backward(rname, to_numpy64(grad), to_numpy64(x), param))
    expect_kernels("activation_kernel", "activation_backward_kernel")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name,kwargs", FUNCS, ids=IDS)
def test_dtypes(backend, dtype, name, kwargs):
    skip_unsupported(backend, dtype)
    x = (torch.randn(4, 33) * 3).to(dtype=dtype, device=device_for(backend)).requires_grad_()
    y = getattr(F, name)(x, **kwargs)
    assert y.dtype == dtype
    expected = _torch_fn(name)(x.detach().double(), **kwargs)
    assert_close(y, expected, dtype=dtype)
    y.backward(torch.ones_like(y))
    xd = x.detach().double().requires_grad_()
    _torch_fn(name)(xd, **kwargs).sum().backward()
    saved = y.detach().double()
    from_output = {"sigmoid": saved * (1 - saved), "tanh": 1 - saved * saved}
    if name in from_output:
        # the backward's input is the stored output y, rounded to dtype: its exact derivative at
        # that y is the reference (the 1% check). From x, 1 - y (y near 1) has lost up to one
        # ulp of y absolutely (2^-8 in bf16, truncated), 4 units of roundoff relative to
        # max|dy/dx| = 1/4 (sigmoid): 16 times the normwise A, a sanity bound only.
        assert_close(x.grad, from_output[name], dtype=dtype)
        assert_close(x.grad, xd.grad, dtype=dtype, scale=16.0)
    else:
        assert_close(x.grad, xd.grad, dtype=dtype)


@pytest.mark.parametrize("name,kwargs", [f for f in FUNCS if f[0] in ("relu", "leaky_relu", "silu")])
def test_inplace_matches_torch(backend, name, kwargs):
    dev = device_for(backend)
    leaf = torch.randn(6, 11, device=dev, requires_grad=True)
    x = leaf * 1.5  # in-place on a non-leaf, as in a real network
    out = getattr(F, name)(x, inplace=True, **kwargs)
    assert out.data_ptr() == x.data_ptr(), "inplace=True must write into the input"
    out.backward(torch.arange(66.0, device=dev).reshape(6, 11))
    ref_leaf = leaf.detach().double().requires_grad_()
    rx = ref_leaf * 1.5
    _torch_fn(name)(rx, inplace=True, **kwargs).backward(torch.arange(66.0, device=dev).reshape(6, 11).double())
    assert_close(out, rx)
    assert_close(leaf.grad, ref_leaf.grad)


def test_not_inplace_leaves_input_alone(backend):
    x = torch.randn(5, 5, device=device_for(backend))
    before = x.clone()
    F.relu(x)
    F.leaky_relu(x, 0.3)
    assert torch.equal(x, before)


def test_empty_and_scalar(backend):
    dev = device_for(backend)
    assert F.gelu(torch.randn(0, 3, device=dev)).shape == (0, 3)
    assert_close(F.tanh(torch.tensor(0.5, device=dev)), torch.tanh(torch.tensor(0.5, dtype=torch.float64)))


def test_bad_input(backend):
    dev = device_for(backend)
    with pytest.raises(RuntimeError, match="floating-point"):
        F.relu(torch.arange(4, device=dev))
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        F.gelu(torch.randn(3, device=dev), approximate="fast")


def test_modules_subclass_torch():
    x = torch.randn(4, 6)
    for ours, theirs in [(tkernels.nn.ReLU(), torch.nn.ReLU()), (tkernels.nn.LeakyReLU(0.3), torch.nn.LeakyReLU(0.3)),
                         (tkernels.nn.GELU("tanh"), torch.nn.GELU("tanh")), (tkernels.nn.SiLU(), torch.nn.SiLU()),
                         (tkernels.nn.Sigmoid(), torch.nn.Sigmoid()), (tkernels.nn.Tanh(), torch.nn.Tanh())]:
        assert isinstance(ours, type(theirs)) and repr(ours) == repr(theirs)
        assert_close(ours(x), theirs(x.double()))


def test_opcheck(backend):
    x = torch.randn(4, 9, device=device_for(backend))
    torch.library.opcheck(torch.ops.tkernels.activation.default, (x, "gelu", 0.0))
    torch.library.opcheck(torch.ops.tkernels.activation_.default, (x.clone(), "leaky_relu", 0.2))
    torch.library.opcheck(torch.ops.tkernels.activation_backward.default, (x, x.sigmoid(), "sigmoid", 0.0, True))
    torch.library.opcheck(torch.ops.tkernels.activation_backward.default, (x, x, "silu", 0.0, False))
