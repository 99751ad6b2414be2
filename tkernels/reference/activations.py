"""Activations and their derivatives in float64 NumPy."""
import math

import numpy as np

from ._errstate import silent

try:  # scipy's erf is vectorised C; math.erf through np.vectorize is the fallback
    from scipy.special import erf as _erf
except ImportError:  # pragma: no cover
    _erf = np.vectorize(math.erf, otypes=[np.float64])


def identity(z, param=0.0):
    return z


def identity_grad(saved, param=0.0):
    return np.ones_like(saved)


def relu(z, param=0.0, out=None):
    # against an array of zeros (one row, broadcast): NumPy's maximum with a scalar operand runs a
    # loop about half as fast
    z = np.asarray(z)
    return np.maximum(z, np.zeros(z.shape[-1:], z.dtype), out=out)


def relu_grad_from_output(y, param=0.0):
    # torch's threshold_backward: zero where y <= 0, so a NaN output passes the gradient
    return (~(y <= 0)).astype(y.dtype)


def leaky_relu(z, negative_slope=0.01):
    return np.where(z > 0, z, z * negative_slope)


def leaky_relu_grad(z, negative_slope=0.01):
    return np.where(z > 0, 1.0, negative_slope).astype(z.dtype)


@silent
def gelu(z, param=0.0):
    return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))


@silent
def gelu_grad(z, param=0.0):
    cdf = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return cdf + z * pdf


_K = math.sqrt(2.0 / math.pi)


@silent
def gelu_tanh(z, param=0.0):
    return 0.5 * z * (1.0 + np.tanh(_K * (z + 0.044715 * z**3)))


@silent
def gelu_tanh_grad(z, param=0.0):
    t = np.tanh(_K * (z + 0.044715 * z**3))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _K * (1.0 + 3 * 0.044715 * z * z)


def _sigmoid(z):
    # split by sign so exp never overflows
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    e = np.exp(z[~pos])
    out[~pos] = e / (1.0 + e)
    return out


@silent
def silu(z, param=0.0):
    return z * _sigmoid(z)


@silent
def silu_grad(z, param=0.0):
    s = _sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def sigmoid(z, param=0.0):
    return _sigmoid(z)


def sigmoid_grad_from_output(y, param=0.0):
    return y * (1.0 - y)


def tanh(z, param=0.0):
    return np.tanh(z)


def tanh_grad_from_output(y, param=0.0):
    return 1.0 - y * y


def relu_grad(z, param=0.0):
    return (~(z <= 0)).astype(z.dtype)


def sigmoid_grad(z, param=0.0):
    s = _sigmoid(z)
    return s * (1.0 - s)


def tanh_grad(z, param=0.0):
    t = np.tanh(z)
    return 1.0 - t * t


def epilogue_dtype(activation, product_dtype):
    """The precision a layer applies its bias and activation in when its matrix product ran in
    `product_dtype`: that one for identity and relu (a correctly rounded bias add and a comparison
    give what float64 rounded back would), float64 for the others (float32 transcendental formulas
    lose accuracy: gelu_tanh(-4) by 4e-4 relative)."""
    return product_dtype if activation in ("identity", "relu") else np.float64


# name -> (forward(z, param), derivative(z, param)), derivatives taken at the pre-activation z.
ACTIVATIONS = {
    "identity": (identity, identity_grad),
    "relu": (relu, relu_grad),
    "leaky_relu": (leaky_relu, leaky_relu_grad),
    "gelu": (gelu, gelu_grad),
    "gelu_tanh": (gelu_tanh, gelu_tanh_grad),
    "silu": (silu, silu_grad),
    "sigmoid": (sigmoid, sigmoid_grad),
    "tanh": (tanh, tanh_grad),
}


@silent
def activation_forward(name, z, param=0.0):
    return ACTIVATIONS[name][0](z, param)


@silent
def activation_backward(name, grad_y, z, param=0.0):
    """dL/dz given dL/dy and the pre-activation z."""
    return grad_y * ACTIVATIONS[name][1](z, param)
