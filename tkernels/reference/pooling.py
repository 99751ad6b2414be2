"""2-D max, average and adaptive average pooling in float64 NumPy, forward and backward.

Layout is always (N, C, H, W). Windows are built tap by tap: for kernel tap (kh, kw) every
output (oh, ow) reads input row oh*stride - pad + kh*dilation (column likewise), or nothing
when that falls in the padding. Backward scatters each output gradient back to its taps with
``np.add.at`` (the kernels gather instead; the two formulations must agree).

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
import numpy as np


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


def _windows(x, kernel_size, stride, padding, dilation, ceil_mode, fill):
    """Stack the window taps: values (N, C, OH, OW, T), valid (OH, OW, T), flat input index (OH, OW, T)."""
    N, C, H, W = x.shape
    (kh_, kw_), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    OH = output_size(H, kh_, sh, ph, dh, ceil_mode)
    OW = output_size(W, kw_, sw, pw, dw, ceil_mode)
    values, valid, flat = [], [], []
    for _, rows, row_ok in _taps(H, OH, kh_, sh, ph, dh):
        for _, cols, col_ok in _taps(W, OW, kw_, sw, pw, dw):
            ok = row_ok[:, None] & col_ok[None, :]
            tap = x[:, :, np.clip(rows, 0, H - 1)][:, :, :, np.clip(cols, 0, W - 1)]
            values.append(np.where(ok, tap, fill))
            valid.append(ok)
            flat.append(rows[:, None] * W + cols[None, :])
    return np.stack(values, -1), np.stack(valid, -1), np.stack(flat, -1), (OH, OW)


# ---------------------------------------------------------------------------------------------
# Max pooling
# ---------------------------------------------------------------------------------------------
def max_pool2d_forward(x, kernel_size, stride, padding=(0, 0), dilation=(1, 1), ceil_mode=False):
    """x: (N, C, H, W) -> (y (N, C, OH, OW), indices (N, C, OH, OW) int64, flat h*W + w)."""
    x = np.asarray(x, np.float64)
    N, C, H, W = x.shape
    (kh_, kw_), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    OH = output_size(H, kh_, sh, ph, dh, ceil_mode)
    OW = output_size(W, kw_, sw, pw, dw, ceil_mode)
    # One pass per kernel tap with whole-tensor elementwise ops (reducing over a short trailing
    # tap axis is several times slower in NumPy): the first valid tap, then any strictly larger
    # value, wins; a NaN anywhere wins over everything, the last NaN giving the index.
    best = np.full((N, C, OH, OW), -np.inf)
    best_idx = np.full((N, C, OH, OW), -1, np.int64)
    nan_idx = np.full((N, C, OH, OW), -1, np.int64)
    any_nan = bool(np.isnan(x).any())
    for _, rows, row_ok in _taps(H, OH, kh_, sh, ph, dh):
        for _, cols, col_ok in _taps(W, OW, kw_, sw, pw, dw):
            ok = row_ok[:, None] & col_ok[None, :]
            flat = rows[:, None] * W + cols[None, :]
            if rows.size and cols.size and row_ok.all() and col_ok.all():  # in bounds: a strided view, no gather
                tap = x[:, :, rows[0]:rows[-1] + 1:sh, cols[0]:cols[-1] + 1:sw]
            else:
                tap = x[:, :, np.clip(rows, 0, H - 1)][:, :, :, np.clip(cols, 0, W - 1)]
            value = tap
            if any_nan:
                is_nan = ok & np.isnan(tap)
                nan_idx = np.where(is_nan, flat, nan_idx)
                value = np.where(is_nan, -np.inf, tap)
            take = ok & ((value > best) | (best_idx < 0))
            best = np.where(take, value, best)
            best_idx = np.where(take, flat, best_idx)
    has_nan = nan_idx >= 0
    indices = np.where(has_nan, nan_idx, best_idx)
    # a window whose taps are all padding keeps torch's start index: its first tap moved
    # forward by whole dilation steps until it is no longer negative
    no_tap = ~has_nan & (best_idx < 0)
    if no_tap.any():
        h0 = np.arange(OH) * sh - ph
        w0 = np.arange(OW) * sw - pw
        h0 = np.where(h0 < 0, h0 + (-h0 + dh - 1) // dh * dh, h0)
        w0 = np.where(w0 < 0, w0 + (-w0 + dw - 1) // dw * dw, w0)
        fallback = np.broadcast_to(h0[:, None] * W + w0[None, :], indices.shape)
        indices = np.where(no_tap, fallback, indices)
    y = np.where(has_nan, np.nan, best)
    return y, indices.astype(np.int64)


def max_pool2d_backward(grad_y, indices, input_shape, kernel_size=None, stride=None, padding=(0, 0),
                        dilation=(1, 1)):
    """Each output gradient goes to the input element its index names; overlaps add up.

    Given the window options, a window whose taps are all padding (possible with dilation) sends
    nothing: its value does not depend on the input, and its index names none of its taps.
    """
    grad_y = np.asarray(grad_y, np.float64)
    N, C, H, W = input_shape
    if kernel_size is not None:
        OH, OW = grad_y.shape[2:]
        rows = np.zeros(OH, bool)
        cols = np.zeros(OW, bool)
        for _, _, ok in _taps(H, OH, kernel_size[0], stride[0], padding[0], dilation[0]):
            rows |= ok
        for _, _, ok in _taps(W, OW, kernel_size[1], stride[1], padding[1], dilation[1]):
            cols |= ok
        grad_y = grad_y * (rows[:, None] & cols[None, :])
    dx = np.zeros((N * C, H * W))
    idx = np.asarray(indices).reshape(N * C, grad_y[0, 0].size if N * C else 0)
    g = grad_y.reshape(idx.shape)
    plane = np.broadcast_to(np.arange(N * C)[:, None], idx.shape)
    inside = (idx >= 0) & (idx < H * W)
    np.add.at(dx, (plane[inside], idx[inside]), g[inside])
    return dx.reshape(N, C, H, W)


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


def avg_pool2d_forward(x, kernel_size, stride, padding=(0, 0), ceil_mode=False, count_include_pad=True,
                       divisor_override=None):
    x = np.asarray(x, np.float64)
    N, C, H, W = x.shape
    values, _, _, (OH, OW) = _windows(x, kernel_size, stride, padding, (1, 1), ceil_mode, 0.0)
    divisor, touches = _avg_divisors(H, W, OH, OW, kernel_size, stride, padding, count_include_pad,
                                     divisor_override)
    return np.where(touches, values.sum(-1) / divisor, 0.0)


def avg_pool2d_backward(grad_y, input_shape, kernel_size, stride, padding=(0, 0), ceil_mode=False,
                        count_include_pad=True, divisor_override=None):
    grad_y = np.asarray(grad_y, np.float64)
    N, C, H, W = input_shape
    OH, OW = grad_y.shape[2:]
    divisor, touches = _avg_divisors(H, W, OH, OW, kernel_size, stride, padding, count_include_pad,
                                     divisor_override)
    share = np.where(touches, grad_y / divisor, 0.0)
    dx = np.zeros((N, C, H, W))
    for _, rows, row_ok in _taps(H, OH, kernel_size[0], stride[0], padding[0], 1):
        for _, cols, col_ok in _taps(W, OW, kernel_size[1], stride[1], padding[1], 1):
            r, c = np.nonzero(row_ok[:, None] & col_ok[None, :])
            np.add.at(dx, (slice(None), slice(None), rows[r], cols[c]), share[:, :, r, c])
    return dx


# ---------------------------------------------------------------------------------------------
# Adaptive average pooling
# ---------------------------------------------------------------------------------------------
def adaptive_window(o, size, out):
    """[start, end) of adaptive window o: floor(o*In/Out) to ceil((o+1)*In/Out)."""
    return (o * size) // out, -((-(o + 1) * size) // out)


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
