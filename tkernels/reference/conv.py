"""2-D convolution (cross-correlation, as torch defines it) in float64 NumPy.

The input is zero-padded explicitly, every receptive field is exposed as a strided view
(``sliding_window_view``), and each group is one ``tensordot`` between the windows and the
weight. The input gradient scatters the per-window gradients back with one strided add per
kernel position; the weight gradient is the tensordot of grad_z with the same windows.

Shapes: x (N, C_in, H, W), weight (C_out, C_in/groups, KH, KW), bias (C_out,),
padding (top, bottom, left, right), stride (sh, sw), dilation (dh, dw).
"""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .activations import activation_backward, activation_forward


def _windows(x, kernel, stride, padding, dilation):
    """Receptive fields of the padded input: (N, C, OH, OW, KH, KW)."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    top, bottom, left, right = padding
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    win = sliding_window_view(xp, (span_h, span_w), axis=(2, 3))  # (N, C, Hp-span+1, Wp-span+1, span_h, span_w)
    return win[:, :, ::sh, ::sw, ::dh, ::dw]


def conv2d_forward(x, weight, bias=None, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1,
                   activation="identity", param=0.0):
    """Returns (y, z): the output act(z) and the pre-activation z, both (N, C_out, OH, OW)."""
    weight = np.asarray(weight, np.float64)
    c_out, c_in_g, kh, kw = weight.shape
    c_out_g = c_out // groups
    win = _windows(x, (kh, kw), stride, padding, dilation)
    n, _, oh, ow = win.shape[:4]
    z = np.empty((n, c_out, oh, ow))
    for g in range(groups):
        w_g = weight[g * c_out_g:(g + 1) * c_out_g]
        win_g = win[:, g * c_in_g:(g + 1) * c_in_g]
        # (N, C_in_g, OH, OW, KH, KW) . (C_out_g, C_in_g, KH, KW) -> (N, OH, OW, C_out_g)
        z_g = np.tensordot(win_g, w_g, axes=([1, 4, 5], [1, 2, 3]))
        z[:, g * c_out_g:(g + 1) * c_out_g] = z_g.transpose(0, 3, 1, 2)
    if bias is not None:
        z = z + np.asarray(bias, np.float64)[None, :, None, None]
    return activation_forward(activation, z, param), z


def conv2d_backward(grad_y, x, weight, bias=None, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1,
                    activation="identity", param=0.0):
    """Returns (grad_x, grad_weight, grad_bias); z is recomputed from the inputs."""
    x = np.asarray(x, np.float64)
    weight = np.asarray(weight, np.float64)
    grad_z = np.asarray(grad_y, np.float64)
    if activation != "identity":  # only an activation needs the pre-activation
        _, z = conv2d_forward(x, weight, bias, stride, padding, dilation, groups)
        grad_z = activation_backward(activation, grad_z, z, param)

    n, c_in, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    c_out_g = c_out // groups
    (sh, sw), (dh, dw) = stride, dilation
    top, bottom, left, right = padding
    oh, ow = grad_z.shape[2:]
    win = _windows(x, (kh, kw), stride, padding, dilation)

    grad_w = np.empty_like(weight)
    grad_xp = np.zeros((n, c_in, h + top + bottom, w + left + right))
    for g in range(groups):
        gz = grad_z[:, g * c_out_g:(g + 1) * c_out_g]  # (N, C_out_g, OH, OW)
        win_g = win[:, g * c_in_g:(g + 1) * c_in_g]
        grad_w[g * c_out_g:(g + 1) * c_out_g] = np.tensordot(gz, win_g, axes=([0, 2, 3], [0, 2, 3]))
        # per-window input gradients: (N, OH, OW, C_in_g, KH, KW)
        cols = np.tensordot(gz, weight[g * c_out_g:(g + 1) * c_out_g], axes=([1], [0]))
        for i in range(kh):
            for j in range(kw):
                rows = slice(i * dh, i * dh + sh * (oh - 1) + 1, sh)
                cols_w = slice(j * dw, j * dw + sw * (ow - 1) + 1, sw)
                grad_xp[:, g * c_in_g:(g + 1) * c_in_g, rows, cols_w] += cols[..., i, j].transpose(0, 3, 1, 2)
    grad_x = grad_xp[:, :, top:top + h, left:left + w]
    return grad_x, grad_w, grad_z.sum(axis=(0, 2, 3))
