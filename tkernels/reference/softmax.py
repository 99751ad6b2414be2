"""Softmax and log-softmax over one axis, and their gradients, in float64 NumPy.

softmax(x)_c = exp(x_c - max x) / sum_k exp(x_k - max x); log_softmax = x - max x - log(sum ...).
Rows whose entries are all -inf give NaN, as in torch.
"""
import numpy as np

from ._errstate import silent


def _shifted(x, axis):
    x = np.asarray(x, np.float64)
    if x.ndim == 0:
        return x - x
    return x - np.max(x, axis=axis, keepdims=True, initial=-np.inf)


@silent
def softmax(x, axis):
    z = _shifted(x, axis)
    e = np.exp(z)
    if e.ndim == 0:
        return np.asarray(e / e)
    return e / np.sum(e, axis=axis, keepdims=True)


@silent
def log_softmax(x, axis):
    z = _shifted(x, axis)
    if z.ndim == 0:
        return z
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


@silent
def softmax_backward(grad_y, y, axis):
    """d/dx of sum(grad_y * softmax(x)), given y = softmax(x): y * (grad_y - <grad_y, y>)."""
    g, y = np.asarray(grad_y, np.float64), np.asarray(y, np.float64)
    if y.ndim == 0:
        return g * 0.0
    return y * (g - np.sum(g * y, axis=axis, keepdims=True))


@silent
def log_softmax_backward(grad_y, y, axis):
    """d/dx of sum(grad_y * log_softmax(x)), given y = log_softmax(x): grad_y - softmax * sum(grad_y)."""
    g, y = np.asarray(grad_y, np.float64), np.asarray(y, np.float64)
    if y.ndim == 0:
        return g * 0.0
    return g - np.exp(y) * np.sum(g, axis=axis, keepdims=True)
