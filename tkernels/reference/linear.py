"""Linear layer y = act(x @ W.T + b) in float64 NumPy; backward recomputes z from the inputs.

``compute_dtype`` (float64 unless given) is the precision of the products and the activation: the
NumPy backend runs float32 inputs in float32, as torch's CPU linear does; the bias gradient is
summed in float64 either way."""
import numpy as np

from .activations import activation_backward, activation_forward
from ._errstate import silent


@silent
def linear_forward(x, weight, bias=None, activation="identity", param=0.0, compute_dtype=np.float64):
    """x: (M, K), weight: (N, K), bias: (N,) or None -> (y, z), both (M, N)."""
    z = np.asarray(x, compute_dtype) @ np.asarray(weight, compute_dtype).T
    if bias is not None:
        z += np.asarray(bias, compute_dtype)
    return activation_forward(activation, z, param), z


@silent
def linear_backward(grad_y, x, weight, bias=None, activation="identity", param=0.0, compute_dtype=np.float64):
    """Returns (grad_x (M, K), grad_weight (N, K), grad_bias (N,))."""
    grad_z = np.asarray(grad_y, compute_dtype)
    if activation != "identity":  # only an activation needs the pre-activation
        _, z = linear_forward(x, weight, bias, "identity", compute_dtype=compute_dtype)
        grad_z = activation_backward(activation, grad_z, z, param)
    x, weight = np.asarray(x, compute_dtype), np.asarray(weight, compute_dtype)
    return grad_z @ weight, grad_z.T @ x, grad_z.sum(axis=0, dtype=np.float64)
