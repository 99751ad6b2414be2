"""Dropout in float64 NumPy, given the keep mask (which elements survive).

The mask is an input, not drawn here: the kernels draw it with their own counter-based
generator, so the reference checks everything except the random stream itself.
"""
import numpy as np

from ._errstate import silent


def keep_mask(shape, p, seed):
    """A Bernoulli(1 - p) keep mask from NumPy's Philox generator (the numpy backend's stream)."""
    u = np.random.Generator(np.random.Philox(int(seed))).random(shape)
    return u >= p


def _scale(p):
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


@silent
def dropout(x, keep, p):
    """y = x * keep / (1 - p); with p == 1 every element is multiplied by 0 (NaN stays NaN, as in torch)."""
    return np.asarray(x, np.float64) * (np.asarray(keep, np.float64) * _scale(p))


@silent
def dropout_backward(grad_y, keep, p):
    return np.asarray(grad_y, np.float64) * (np.asarray(keep, np.float64) * _scale(p))
