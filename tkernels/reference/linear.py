"""Linear layer y = act(x @ W.T + b) in float64 NumPy; backward recomputes z from the inputs.

``compute_dtype`` (float64 unless given) is the precision of the matrix products: the NumPy backend
runs float32 inputs' products in float32, as torch's CPU linear does. The bias and activation then
run in :func:`~.activations.epilogue_dtype` and the bias gradient is summed in float64."""
import numpy as np

from .activations import activation_backward, activation_forward, epilogue_dtype
from ._errstate import silent


def _preactivation(x, weight, bias, activation, compute_dtype):
    z = np.asarray(x, compute_dtype) @ np.asarray(weight, compute_dtype).T
    z = z.astype(epilogue_dtype(activation, compute_dtype), copy=False)
    if bias is not None:
        z += np.asarray(bias, z.dtype)
    return z


@silent
def linear_forward(x, weight, bias=None, activation="identity", param=0.0, compute_dtype=np.float64):
    """x: (M, K), weight: (N, K), bias: (N,) or None -> (y, z), both (M, N)."""
    z = _preactivation(x, weight, bias, activation, compute_dtype)
    return activation_forward(activation, z, param), z


@silent
def linear_backward(grad_y, x, weight, bias=None, activation="identity", param=0.0, compute_dtype=np.float64):
    """Returns (grad_x (M, K), grad_weight (N, K), grad_bias (N,))."""
    grad_z = np.asarray(grad_y, epilogue_dtype(activation, compute_dtype))
    if activation != "identity":  # only an activation needs the pre-activation
        grad_z = activation_backward(activation, grad_z, _preactivation(x, weight, bias, activation, compute_dtype),
                                     param)
    grad_b = grad_z.sum(axis=0, dtype=np.float64)
    grad_z = grad_z.astype(compute_dtype, copy=False)
    x, weight = np.asarray(x, compute_dtype), np.asarray(weight, compute_dtype)
    return grad_z @ weight, grad_z.T @ x, grad_b
