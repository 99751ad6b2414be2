"""2-D convolution (cross-correlation, as torch defines it) in float64 NumPy, as matrix products.

The zero-padded input is unfolded once into a column matrix (im2col): row (c, i, j) holds, for
every output position (n, oh, ow), the input value that kernel tap (i, j) of channel c meets
there. Each group's convolution is then a single BLAS matrix product of the weight, reshaped to
(C_out_g, C_in_g * KH * KW), with that group's rows of the columns. Channels are the outer index
of both the rows and the result, so groups are row blocks and no product needs a transpose copy.

Backward reuses the columns: grad_weight = grad_z @ columns.T, and the input gradient's columns
weight.T @ grad_z are folded back (col2im) with one strided add of a whole (C, positions) block
per kernel tap.

The output positions (n, oh, ow) run batch outermost (n, oh, ow), except for feature maps narrower
than 8 columns with a larger batch, where they run batch innermost (oh, ow, n). NumPy's strided
copies and adds cost per innermost run, so 4-wide runs over a batch of 64 make the unfold and the
fold several times slower than 64-long ones; for wider maps the transposes in and out of the
batch-innermost layout cost more than they save.

Shapes: x (N, C_in, H, W), weight (C_out, C_in/groups, KH, KW), bias (C_out,),
padding (top, bottom, left, right), stride (sh, sw), dilation (dh, dw).
The results are (N, C, H, W) views of arrays laid out channels first, then the positions' order.

Everything is computed in float64 unless the caller asks for another ``compute_dtype`` for the
unfold and the products: the NumPy backend runs float32 inputs' products in float32, as torch's CPU
convolution does (single-precision BLAS, twice as fast as double). The bias and activation run in
:func:`~.activations.epilogue_dtype`; the bias gradient is summed in float64.
"""
import numpy as np
from numpy.lib.stride_tricks import as_strided

from .activations import activation_backward, activation_forward, epilogue_dtype
from ._errstate import silent


def padded(x, padding, fill=0.0):
    """x with `fill` around its last two dims, padding = (top, bottom, left, right); x itself when
    there is nothing to pad. (np.pad does the same several times more slowly on small arrays.)"""
    top, bottom, left, right = padding
    if not any(padding):
        return x
    n, c, h, w = x.shape
    xp = np.full((n, c, top + h + bottom, left + w + right), fill, dtype=x.dtype)
    xp[:, :, top:top + h, left:left + w] = x
    return xp


def _output_size(padded_size, kernel, stride, dilation):
    return (padded_size - dilation * (kernel - 1) - 1) // stride + 1


_N, _H, _W = 0, 2, 3  # axes of an (N, C, H, W) array


def _position_order(n, ow):
    """The axes (of N, C, H, W) that output positions run over, slowest first."""
    return (_H, _W, _N) if ow < 8 and n > ow else (_N, _H, _W)


def _from_layout(a, order):
    """An array laid out (C, *order) seen as (N, C, H, W)."""
    return a.transpose(np.argsort((1,) + order))


def _columns(xp, kernel, stride, dilation):
    """im2col of the padded input: (C * KH * KW, positions), rows (c, i, j); returns the columns,
    the output size (OH, OW) and the order of the positions."""
    n, c, hp, wp = xp.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    oh, ow = _output_size(hp, kh, sh, dh), _output_size(wp, kw, sw, dw)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"conv2d: kernel {kh}x{kw} with dilation {dh}x{dw} does not fit the padded input "
                         f"{hp}x{wp}")
    order = _position_order(n, ow)
    s_n, s_c, s_h, s_w = xp.strides
    extent, step = {_N: n, _H: oh, _W: ow}, {_N: s_n, _H: sh * s_h, _W: sw * s_w}
    taps = as_strided(xp, (c, kh, kw) + tuple(extent[a] for a in order),
                      (s_c, dh * s_h, dw * s_w) + tuple(step[a] for a in order), writeable=False)
    return taps.reshape(c * kh * kw, n * oh * ow), (oh, ow), order  # the one copy of the windows


def _by_group(product, a, b, groups):
    """product(a_g, b_g) for equal row blocks a_g, b_g of a and b, stacked by rows."""
    if groups == 1:
        return product(a, b)
    return np.concatenate([product(a_g, b_g) for a_g, b_g in zip(np.split(a, groups), np.split(b, groups))])


def _preactivation(weight, bias, columns, groups, shape, activation):
    """z laid out (C_out, *positions), `shape` being that layout's shape, in the activation's epilogue dtype."""
    z = _by_group(np.matmul, weight.reshape(weight.shape[0], -1), columns, groups).reshape(shape)
    z = z.astype(epilogue_dtype(activation, z.dtype), copy=False)
    if bias is not None:
        z += np.asarray(bias, z.dtype).reshape((-1, 1, 1, 1))
    return z


def _layout_shape(channels, n, h, w, order):
    return (channels,) + tuple({_N: n, _H: h, _W: w}[a] for a in order)


@silent
def conv2d_forward(x, weight, bias=None, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1,
                   activation="identity", param=0.0, compute_dtype=np.float64):
    """Returns (y, z): the output act(z) and the pre-activation z, both (N, C_out, OH, OW)."""
    x = np.asarray(x, compute_dtype)
    weight = np.asarray(weight, compute_dtype)
    columns, (oh, ow), order = _columns(padded(x, padding), weight.shape[2:], stride, dilation)
    z = _preactivation(weight, bias, columns, groups, _layout_shape(weight.shape[0], x.shape[0], oh, ow, order),
                       activation)
    z = _from_layout(z, order)
    return activation_forward(activation, z, param), z


def _fold(grad_columns, padded_shape, kernel, stride, dilation, out_size, order):
    """col2im: add each tap's block of gradients onto the padded input positions it read; returns
    the gradient of the padded input laid out (C, *order)."""
    n, c, hp, wp = padded_shape
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel, stride, dilation, out_size
    blocks = grad_columns.reshape((c, kh, kw) + _layout_shape(c, n, oh, ow, order)[1:])
    grad = np.zeros(_layout_shape(c, n, hp, wp, order), grad_columns.dtype)
    h_axis, w_axis = 1 + order.index(_H), 1 + order.index(_W)
    for i in range(kh):
        for j in range(kw):
            window = [slice(None)] * 4
            window[h_axis] = slice(i * dh, i * dh + sh * (oh - 1) + 1, sh)
            window[w_axis] = slice(j * dw, j * dw + sw * (ow - 1) + 1, sw)
            grad[tuple(window)] += blocks[:, i, j]
    return grad


@silent
def conv2d_backward(grad_y, x, weight, bias=None, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1,
                    activation="identity", param=0.0, need_input=True, compute_dtype=np.float64):
    """Returns (grad_x, grad_weight, grad_bias); z is recomputed from the inputs. Without
    need_input grad_x is None: a network's first layer skips a product and the fold."""
    x = np.asarray(x, compute_dtype)
    weight = np.asarray(weight, compute_dtype)
    c_out = weight.shape[0]
    xp = padded(x, padding)
    columns, (oh, ow), order = _columns(xp, weight.shape[2:], stride, dilation)
    grad_z = np.asarray(grad_y, compute_dtype).transpose((1,) + order)  # laid out (C_out, *positions)
    if activation != "identity":  # only an activation needs the pre-activation
        z = _preactivation(weight, bias, columns, groups, grad_z.shape, activation)
        grad_z = activation_backward(activation, grad_z, z, param)
    grad_z = grad_z.reshape(c_out, columns.shape[1])
    grad_b = grad_z.sum(axis=1, dtype=np.float64)
    grad_z = grad_z.astype(compute_dtype, copy=False)  # (the products' precision)

    grad_w = _by_group(lambda g, col: g @ col.T, grad_z, columns, groups).reshape(weight.shape)
    if not need_input:
        return None, grad_w, grad_b
    grad_columns = _by_group(lambda w, g: w.T @ g, weight.reshape(c_out, -1), grad_z, groups)
    grad_xp = _from_layout(_fold(grad_columns, xp.shape, weight.shape[2:], stride, dilation, (oh, ow), order), order)
    top, _, left, _ = padding
    return grad_xp[:, :, top:top + x.shape[2], left:left + x.shape[3]], grad_w, grad_b
