"""2-D max, average and adaptive average pooling in float64 NumPy, forward and backward.

Layout is always (N, C, H, W). Windows are built tap by tap: for kernel tap (kh, kw) every
output (oh, ow) reads input row oh*stride - pad + kh*dilation (column likewise), or nothing
when that falls in the padding. The taps are stacked along a leading axis, so that reductions
over a window are elementwise passes over whole (N, C, OH, OW) arrays (NumPy reduces a short
trailing axis several times more slowly). Backward scatters each output gradient back to its
taps (``np.bincount`` / ``np.add.at``; the kernels gather instead; the two formulations must agree).

Semantics follow torch's documentation and behaviour:
  * output size: floor((in + 2p - d(k-1) - 1 [+ s-1 if ceil_mode]) / s) + 1, minus one if
    ceil_mode made the last window start beyond the input and right padding;
  * max pooling propagates NaN: a window holding a NaN yields NaN and the index of its LAST
    NaN in scan order (rows, then columns); otherwise the FIRST maximum; a window with no
    finite candidate keeps the index of its first in-bounds tap;
  * average pooling divides by divisor_override, else by the window size clipped to the
    padded input (count_include_pad) or by the number of in-bounds taps;
  * adaptive windows are [floor(o*In/Out), ceil((o+1)*In/Out)).
"""
import functools
from typing import NamedTuple, Tuple

import numpy as np

from ._errstate import silent
from .conv import padded


def output_size(size, kernel, stride, padding, dilation=1, ceil_mode=False):
    """Number of pooling windows along one dimension."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _taps(size, out, kernel, stride, padding, dilation):
    """For each kernel tap k: (input positions of every window (out,), in-bounds mask)."""
    starts = np.arange(out) * stride - padding
    for k in range(kernel):
        pos = starts + k * dilation
        yield k, pos, (pos >= 0) & (pos < size)


def _every(start, step, count):
    """The slice of `count` positions start, start + step, ... (empty for count 0)."""
    return slice(start, start + step * (count - 1) + 1 if count else start, step)


def _padded_extent(size, out, kernel, stride, padding, dilation):
    """(before, after): the padding that makes every tap of every window an index of the padded
    input; `after` also covers windows that ceil_mode lets run past the right padding."""
    last = (out - 1) * stride - padding + (kernel - 1) * dilation  # the last position any tap reads
    return padding, max(last - (size - 1), 0)


class _Geometry(NamedTuple):
    """Where the windows of one pooling configuration read, independent of the values (cached):
    (OH, OW); the padding (top, bottom, left, right) that makes every tap an index; per tap in scan
    order (rows, then columns): (row slice, column slice) of the padded input, valid (OH, OW), false
    where the tap reads padding, and its flat input index h * W + w (OH, OW)."""
    out: Tuple[int, int]
    padding: Tuple[int, int, int, int]
    taps: tuple
    all_valid: bool  # no tap of any window reads padding
    flat: np.ndarray  # (T, OH, OW): every tap's flat indices, stacked
    no_tap: np.ndarray  # (OH, OW): windows that read padding only


@functools.lru_cache(maxsize=256)
def _geometry(H, W, kernel_size, stride, padding, dilation, ceil_mode) -> _Geometry:
    (kh_, kw_), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    OH = output_size(H, kh_, sh, ph, dh, ceil_mode)
    OW = output_size(W, kw_, sw, pw, dw, ceil_mode)
    pad_h, pad_w = _padded_extent(H, OH, kh_, sh, ph, dh), _padded_extent(W, OW, kw_, sw, pw, dw)
    taps = []
    for i, rows, row_ok in _taps(H, OH, kh_, sh, ph, dh):
        for j, cols, col_ok in _taps(W, OW, kw_, sw, pw, dw):
            taps.append(((_every(i * dh, sh, OH), _every(j * dw, sw, OW)), _frozen(row_ok[:, None] & col_ok[None, :]),
                         _frozen(rows[:, None] * W + cols[None, :])))
    valid = [v for _, v, _ in taps]
    return _Geometry((OH, OW), pad_h + pad_w, tuple(taps), all(v.all() for v in valid),
                     _frozen(np.stack([f for _, _, f in taps])), _frozen(~np.any(valid, axis=0)))


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False  # (cached: shared by every call of its configuration)
    return a


def _windows(x, kernel_size, stride, padding, dilation, ceil_mode, fill):
    """One entry per kernel tap, in scan order (rows, then columns): (values (N, C, OH, OW), a view
    of the input padded with `fill`; valid (OH, OW); flat input index (OH, OW)). Also returns the
    geometry (see :class:`_Geometry`)."""
    N, C, H, W = x.shape
    geometry = _geometry(H, W, *map(tuple, (kernel_size, stride, padding, dilation)), bool(ceil_mode))
    xp = padded(x, geometry.padding, fill)
    return [(xp[:, :, rows, cols], valid, flat) for (rows, cols), valid, flat in geometry.taps], geometry


# ---------------------------------------------------------------------------------------------
# Max pooling
# ---------------------------------------------------------------------------------------------
@silent
def max_pool2d_forward(x, kernel_size, stride, padding=(0, 0), dilation=(1, 1), ceil_mode=False,
                       compute_dtype=np.float64):
    """x: (N, C, H, W) -> (y (N, C, OH, OW), indices (N, C, OH, OW) int64, flat h*W + w).
    y is of `compute_dtype` (float32 input may stay float32: a maximum is one of its inputs, exact)."""
    x = np.asarray(x, compute_dtype)
    N, C, H, W = x.shape
    (_, _), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    taps, geometry = _windows(x, kernel_size, stride, padding, dilation, ceil_mode, -np.inf)
    OH, OW = geometry.out
    # Whole-array passes, one per tap (NumPy's argmax over a short tap axis is several times
    # slower). np.maximum propagates NaN; padding is -inf, so it never wins over an input value.
    y = taps[0][0]
    for values, _, _ in taps[1:]:
        y = np.maximum(y, values)
    # the index is that of the first tap holding the maximum; padding only ties where every
    # in-bounds value is -inf, and then the first in-bounds tap wins
    tap = np.zeros(y.shape, np.intp)
    for t in reversed(range(len(taps))):  # (an earlier tap overwrites: the first maximum wins)
        values, valid, _ = taps[t]
        np.copyto(tap, t, where=values == y if geometry.all_valid else (values == y) & valid)
    if np.isnan(y).any():  # a window holding NaN gives the index of its last NaN
        for t, (values, _, _) in enumerate(taps):
            tap = np.where(np.isnan(values), t, tap)
    # indices[n, c, oh, ow] = flat[tap, oh, ow]
    indices = geometry.flat.ravel()[tap * (OH * OW) + np.arange(OH * OW).reshape(OH, OW)]
    # a window whose taps are all padding keeps torch's start index: its first tap moved
    # forward by whole dilation steps until it is no longer negative
    no_tap = geometry.no_tap
    if no_tap.any():
        h0 = np.arange(OH) * sh - ph
        w0 = np.arange(OW) * sw - pw
        h0 = np.where(h0 < 0, h0 + (-h0 + dh - 1) // dh * dh, h0)
        w0 = np.where(w0 < 0, w0 + (-w0 + dw - 1) // dw * dw, w0)
        indices = np.where(no_tap, h0[:, None] * W + w0[None, :], indices)
    return y.copy() if y is taps[0][0] else y, indices.astype(np.int64)


@silent
def max_pool2d_backward(grad_y, indices, input_shape, kernel_size=None, stride=None, padding=(0, 0),
                        dilation=(1, 1)):
    """Each output gradient goes to the input element its index names; overlaps add up.

    Given the window options, a window whose taps are all padding (possible with dilation) sends
    nothing: its value does not depend on the input, and its index names none of its taps.
    """
    grad_y = np.asarray(grad_y, np.float64)
    N, C, H, W = input_shape
    if kernel_size is not None and any(padding):  # (without padding every window reads the input)
        OH, OW = grad_y.shape[2:]
        rows = np.zeros(OH, bool)
        cols = np.zeros(OW, bool)
        for _, _, ok in _taps(H, OH, kernel_size[0], stride[0], padding[0], dilation[0]):
            rows |= ok
        for _, _, ok in _taps(W, OW, kernel_size[1], stride[1], padding[1], dilation[1]):
            cols |= ok
        grad_y = grad_y * (rows[:, None] & cols[None, :])
    idx = np.asarray(indices).reshape(N * C, grad_y.shape[2] * grad_y.shape[3])
    g = grad_y.reshape(idx.shape)
    inside = (idx >= 0) & (idx < H * W)
    # one flat bin per input element; bincount adds in order, like the sequential scatter
    bins = (np.arange(N * C)[:, None] * (H * W) + idx)[inside]
    dx = np.bincount(bins, weights=g[inside], minlength=N * C * H * W)
    return dx.astype(np.float64, copy=False).reshape(N, C, H, W)  # (an empty bincount is int64)


# ---------------------------------------------------------------------------------------------
# Average pooling
# ---------------------------------------------------------------------------------------------
def _avg_divisors(H, W, OH, OW, kernel_size, stride, padding, count_include_pad, divisor_override):
    """(OH, OW) divisor of every window, and whether the window touches the input at all."""
    def extent(size, out, k, s, p):
        start = np.arange(out) * s - p
        end = np.minimum(start + k, size + p)
        clipped = np.minimum(end, size) - np.maximum(start, 0)
        return end - start, clipped

    padded_h, inside_h = extent(H, OH, kernel_size[0], stride[0], padding[0])
    padded_w, inside_w = extent(W, OW, kernel_size[1], stride[1], padding[1])
    touches = (inside_h[:, None] > 0) & (inside_w[None, :] > 0)
    if divisor_override:
        divisor = np.full((OH, OW), float(divisor_override))
    elif count_include_pad:
        divisor = (padded_h[:, None] * padded_w[None, :]).astype(np.float64)
    else:
        divisor = (inside_h[:, None] * inside_w[None, :]).astype(np.float64)
    return np.where(touches, divisor, 1.0), touches


@silent
def avg_pool2d_forward(x, kernel_size, stride, padding=(0, 0), ceil_mode=False, count_include_pad=True,
                       divisor_override=None):
    x = np.asarray(x, np.float64)
    N, C, H, W = x.shape
    taps, geometry = _windows(x, kernel_size, stride, padding, (1, 1), ceil_mode, 0.0)
    OH, OW = geometry.out
    divisor, touches = _avg_divisors(H, W, OH, OW, kernel_size, stride, padding, count_include_pad,
                                     divisor_override)
    total = np.zeros((N, C, OH, OW))
    for values, _, _ in taps:
        total += values
    return np.where(touches, total / divisor, 0.0)


@silent
def avg_pool2d_backward(grad_y, input_shape, kernel_size, stride, padding=(0, 0), ceil_mode=False,
                        count_include_pad=True, divisor_override=None):
    grad_y = np.asarray(grad_y, np.float64)
    N, C, H, W = input_shape
    OH, OW = grad_y.shape[2:]
    divisor, touches = _avg_divisors(H, W, OH, OW, kernel_size, stride, padding, count_include_pad,
                                     divisor_override)
    share = np.where(touches, grad_y / divisor, 0.0)
    # every tap adds the share to a strided slice of the padded input; cropping drops the padding
    (kh_, kw_), (sh, sw), (ph, pw) = kernel_size, stride, padding
    (top, bottom), (left, right) = _padded_extent(H, OH, kh_, sh, ph, 1), _padded_extent(W, OW, kw_, sw, pw, 1)
    dx = np.zeros((N, C, top + H + bottom, left + W + right))
    for i in range(kh_):
        for j in range(kw_):
            dx[:, :, _every(i, sh, OH), _every(j, sw, OW)] += share
    return dx[:, :, top:top + H, left:left + W]


# ---------------------------------------------------------------------------------------------
# Adaptive average pooling
# ---------------------------------------------------------------------------------------------
def adaptive_window(o, size, out):
    """[start, end) of adaptive window o: floor(o*In/Out) to ceil((o+1)*In/Out)."""
    return (o * size) // out, -((-(o + 1) * size) // out)


@silent
def adaptive_avg_pool2d_forward(x, output_size):
    x = np.asarray(x, np.float64)
    N, C, H, W = x.shape
    OH, OW = output_size
    y = np.zeros((N, C, OH, OW))
    for oh in range(OH):
        h0, h1 = adaptive_window(oh, H, OH)
        for ow in range(OW):
            w0, w1 = adaptive_window(ow, W, OW)
            y[:, :, oh, ow] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return y


@silent
def adaptive_avg_pool2d_backward(grad_y, input_shape):
    grad_y = np.asarray(grad_y, np.float64)
    N, C, H, W = input_shape
    OH, OW = grad_y.shape[2:]
    dx = np.zeros((N, C, H, W))
    for oh in range(OH):
        h0, h1 = adaptive_window(oh, H, OH)
        for ow in range(OW):
            w0, w1 = adaptive_window(ow, W, OW)
            dx[:, :, h0:h1, w0:w1] += (grad_y[:, :, oh, ow] / ((h1 - h0) * (w1 - w0)))[:, :, None, None]
    return dx
