"""Relative precision of every activation and its gradient, in fp32 ulps, over tiny, ordinary and huge
|x| of both signs: against the exact value (mpmath, which torch's sympy dependency brings) and against
torch's own fp32 error on the same inputs. (Infinities and NaN: tests/test_nonfinite.py.)"""
import functools

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import tkernels.functional as F
from helpers import device_for

mpmath.mp.prec = 400  # 1 + tanh(-30) is 1e-26: exact enough at any fp32 input


def _sigmoid(v):
    return 1 / (1 + mpmath.exp(-v))


def _inner(v):
    return mpmath.sqrt(2 / mpmath.pi) * (v + mpmath.mpf(0.044715) * v ** 3)


def _gelu_tanh_terms(v):
    return ((1 + mpmath.tanh(_inner(v))) / 2, v / 2 * mpmath.sech(_inner(v)) ** 2 * mpmath.sqrt(2 / mpmath.pi)
            * (1 + 3 * mpmath.mpf(0.044715) * v * v))


def _gelu_terms(v):
    return mpmath.ncdf(v), v * mpmath.npdf(v)


def _silu_terms(v):
    return _sigmoid(v), v * _sigmoid(v) * (1 - _sigmoid(v))


def _sum_with_scale(terms):
    """(exact value, the scale of its error): a derivative that crosses zero is the sum of two terms
    that cancel near the root, where no fp32 formula (torch's included) is accurate relative to the
    tiny sum; there the error is judged relative to the largest term."""
    return lambda v: (sum(terms(v)), max(abs(t) for t in terms(v)))


# name -> (ours, torch, exact forward, exact derivative); an exact function gives a value, or a
# (value, error scale) pair
CASES = {
    "gelu": (F.gelu, TF.gelu, lambda v: v * mpmath.ncdf(v), _sum_with_scale(_gelu_terms)),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), lambda x: TF.gelu(x, approximate="tanh"),
                  lambda v: v / 2 * (1 + mpmath.tanh(_inner(v))), _sum_with_scale(_gelu_tanh_terms)),
    "silu": (F.silu, TF.silu, lambda v: v * _sigmoid(v), _sum_with_scale(_silu_terms)),
    "sigmoid": (F.sigmoid, torch.sigmoid, _sigmoid, lambda v: _sigmoid(v) * (1 - _sigmoid(v))),
    "tanh": (F.tanh, torch.tanh, mpmath.tanh, lambda v: mpmath.sech(v) ** 2),
    "leaky_relu": (lambda x: F.leaky_relu(x, 0.1), lambda x: TF.leaky_relu(x, 0.1),
                   lambda v: v if v > 0 else v / 10, lambda v: mpmath.mpf(1) if v > 0 else mpmath.mpf(1) / 10),
}
# grad-from-output activations: their derivative is computed from y, as torch's is, so it is
# judged given our own y (whose error the forward check bounds)
FROM_OUTPUT = {"sigmoid": lambda y: y * (1 - y), "tanh": lambda y: 1 - y * y}


@functools.lru_cache(maxsize=None)
def _inputs():
    magnitudes = np.concatenate([np.logspace(-38, 2, 400), np.linspace(0.05, 9.95, 200)])
    x = np.unique(np.concatenate([magnitudes, -magnitudes]).astype(np.float32))
    # quarter-decade bins of |x|, per sign: tiny, ordinary and huge inputs are judged separately
    bins = np.round(np.log10(np.abs(x)) * 4) * np.sign(x)
    return torch.from_numpy(x), bins


def _exact_values(fn, xs):
    """(exact values, error scales) in float64."""
    pairs = [fn(mpmath.mpf(float(v))) for v in xs]
    pairs = [p if isinstance(p, tuple) else (p, p) for p in pairs]
    return (torch.tensor([float(p[0]) for p in pairs], dtype=torch.float64),
            torch.tensor([float(abs(p[1])) for p in pairs], dtype=torch.float64))


@functools.lru_cache(maxsize=None)
def _exact(name, which):
    return _exact_values(CASES[name][2 + which], _inputs()[0].tolist())


def _ulps(values, exact):
    """|values - exact| in fp32 ulps of the error scale (the ulp of the smallest normal below it).
    `exact` is a (value, scale) pair or a tensor of values (then the scale is |value|)."""
    value, scale = exact if isinstance(exact, tuple) else (exact, exact.abs())
    spacing = np.spacing(np.maximum(scale.float().numpy(), np.float32(2.0 ** -126))).astype(np.float64)
    return (values.detach().cpu().double() - value).abs() / torch.from_numpy(spacing)


def _assert_within_few_ulps_of_torch(ours, theirs, exact, bins, what):
    """In every bin, our worst error is at most 2x torch's worst + 4 ulps; where torch is exact to a
    few ulps, so must we be."""
    ours_ulps, torch_ulps = _ulps(ours, exact), _ulps(theirs, exact)
    bad = []
    for b in np.unique(bins):
        in_bin = torch.from_numpy(bins == b)
        worst, torch_worst = ours_ulps[in_bin].max().item(), torch_ulps[in_bin].max().item()
        if not worst <= 2 * torch_worst + 4:
            x = _inputs()[0][in_bin][ours_ulps[in_bin].argmax()].item()
            bad.append(f"x={x:.4g}: {worst:.3g} ulp (torch {torch_worst:.3g})")
    assert not bad, f"{what}: relative error above torch's in {len(bad)} ranges: {bad[:6]}"


@pytest.mark.parametrize("name", CASES)
def test_relative_error_forward_and_gradient(backend, name):
    ours_fn, torch_fn = CASES[name][:2]
    x, bins = _inputs()
    leaf = x.to(device_for(backend)).requires_grad_()
    y = ours_fn(leaf)
    (grad,) = torch.autograd.grad(y, leaf, torch.ones_like(y))
    torch_leaf = x.clone().requires_grad_()
    y_torch = torch_fn(torch_leaf)
    (grad_torch,) = torch.autograd.grad(y_torch, torch_leaf, torch.ones_like(y_torch))
    _assert_within_few_ulps_of_torch(y, y_torch, _exact(name, 0), bins, f"{name} forward")
    if name in FROM_OUTPUT:  # fp32 evaluation of 1 - y*y or y*(1 - y): an ulp of 1 at most
        torch.testing.assert_close(grad.cpu().double(), FROM_OUTPUT[name](y.detach().cpu().double()),
                                   rtol=4 * 2.0 ** -24, atol=2.0 ** -23)
    else:
        _assert_within_few_ulps_of_torch(grad, grad_torch, _exact(name, 1), bins, f"{name} gradient")


@pytest.mark.parametrize("name", ["tanh", "gelu_tanh"])
def test_tiny_inputs_exact_to_an_ulp(backend, name):
    """The report of issue 10: tanh via 2*sigmoid(2x)-1 was 19% off at 1e-7. Here every tiny input is
    within 2 ulps of the exact value, as torch's is."""
    x = torch.tensor([1e-7, -1e-7, 1e-5, 3e-4, -2e-3, 1e-20, -1e-30], dtype=torch.float32)
    exact, _ = _exact_values(CASES[name][2], x.tolist())
    y = CASES[name][0](x.to(device_for(backend)))
    assert _ulps(y, exact).max() <= 2.0, (y.tolist(), exact.tolist())


@pytest.mark.parametrize("activation", ["tanh", "gelu_tanh", "silu"])
def test_fused_epilogue_precision(backend, activation):
    """The fused linear runs the same device functions in its epilogue and in its gated backward:
    with an identity weight, y = act(x) and dx = act'(x) exactly as the standalone op's."""
    dev = device_for(backend)
    x = torch.tensor([[1e-7, -3e-6, 0.3, -0.7], [2.5, -4.0, 1e-12, 11.0]], dtype=torch.float32, device=dev)
    weight = torch.eye(4, device=dev)
    fused_leaf, plain_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused = F.linear(fused_leaf, weight, activation=activation)
    plain = F.gelu(plain_leaf, approximate="tanh") if activation == "gelu_tanh" else getattr(F, activation)(plain_leaf)
    fused.sum().backward(), plain.sum().backward()
    torch.testing.assert_close(fused, plain, rtol=4 * 2.0 ** -24, atol=0)
    tiny = x.abs() < 1e-5  # the range that 2*sigmoid(2x)-1 got wrong
    exact, _ = _exact_values(CASES[activation][2], x[tiny].tolist())
    assert _ulps(fused[tiny], exact).max() <= 2.0, (fused.tolist(), exact.tolist())
    torch.testing.assert_close(fused_leaf.grad, plain_leaf.grad, rtol=4 * 2.0 ** -24, atol=2.0 ** -23)
