"""Linear layer y = act(x @ W.T + b) in float64 NumPy; backward recomputes z from the inputs."""
import numpy as np

from .activations import activation_backward, activation_forward
from ._errstate import silent


@silent
def linear_forward(x, weight, bias=None, activation="identity", param=0.0):
    """x: (M, K), weight: (N, K), bias: (N,) or None -> (y, z), both (M, N)."""
    z = np.asarray(x, np.float64) @ np.asarray(weight, np.float64).T
    if bias is not None:
        z = z + np.asarray(bias, np.float64)
    return activation_forward(activation, z, param), z


@silent
def linear_backward(grad_y, x, weight, bias=None, activation="identity", param=0.0):
    """Returns (grad_x (M, K), grad_weight (N, K), grad_bias (N,))."""
    _, z = linear_forward(x, weight, bias, "identity")
    grad_z = activation_backward(activation, np.asarray(grad_y, np.float64), z, param)
    return grad_z @ np.asarray(weight, np.float64), grad_z.T @ np.asarray(x, np.float64), grad_z.sum(axis=0)
