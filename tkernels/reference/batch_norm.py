"""Batch normalisation in float64 NumPy: forward (training and eval, with the running-stat
update), backward, and the per-channel pieces that SyncBatchNorm combines across processes.

Shapes follow torch: x is (N, C, *spatial); statistics are per channel over N and all spatial
positions. Training normalises with the batch mean and the biased variance and moves the running
statistics towards the batch mean and the *unbiased* variance:

    running = (1 - momentum) * running + momentum * batch_statistic

Eval normalises with the running statistics. An activation, if any, follows the affine step:
y = act(gamma * x_hat + beta).
"""
import functools
import math
from typing import NamedTuple, Optional

import numpy as np

from .activations import ACTIVATIONS, relu
from ._errstate import silent


def _per_channel(x):
    """(N, C, *S) -> (C, N * prod(S)): one row per channel."""
    x = np.asarray(x, np.float64)
    return np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)


def _rows_view(x, dtype=np.float64):
    """(N, C, *S) -> (N, C, prod(S)) without a copy (for a contiguous x of `dtype`): reductions over
    axes 0 and 2 then stay passes over memory in order, with no transposed copy per call."""
    x = np.asarray(x, dtype)
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))


def _flat(x, dtype=np.float64):
    """(N, C, *S) -> (N, C * prod(S)) without a copy (for a contiguous x of `dtype`)."""
    x = np.asarray(x, dtype)
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def _spread(v, positions, dtype=np.float64):
    """A per-channel vector repeated over its `positions` values per channel: (C * positions,), to
    broadcast against :func:`_flat`'s rows. Elementwise passes then run over whole rows; a (C, 1)
    column against (N, C, M) would run NumPy's inner loop only M values at a time (1 for BatchNorm1d).
    With one position it is v itself (callers only read it). In `dtype`, that of the rows it meets."""
    v = np.asarray(v, dtype)
    return v if positions == 1 else np.repeat(v, positions)


def _positions(x):
    """Values per channel per sample: prod(S) for x of shape (N, C, *S)."""
    return math.prod(np.shape(x)[2:])


def _broadcast(v, ndim):
    """A per-channel vector shaped to broadcast against (N, C, *S)."""
    return np.asarray(v, np.float64).reshape((1, -1) + (1,) * (ndim - 2))


def _affine(x_hat, weight, bias):
    z = x_hat
    if weight is not None:
        z = z * _broadcast(weight, x_hat.ndim)
    if bias is not None:
        z = z + _broadcast(bias, x_hat.ndim)
    return z


# ---------------------------------------------------------------------------------------------
# Whole-layer reference
# ---------------------------------------------------------------------------------------------
@silent
def batch_norm_forward(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                       eps=1e-5, activation="identity", param=0.0):
    """Returns (y, new_running_mean, new_running_var); the running arrays are None when not given
    and are returned unchanged in eval mode (or for an empty batch). Nothing is modified in place."""
    x = np.asarray(x, np.float64)
    rows = _per_channel(x)
    new_mean = None if running_mean is None else np.array(running_mean, np.float64)
    new_var = None if running_var is None else np.array(running_var, np.float64)
    if training:
        count = rows.shape[1]
        mean = rows.mean(axis=1) if count else np.zeros(rows.shape[0])
        var = ((rows - mean[:, None]) ** 2).mean(axis=1) if count else np.zeros(rows.shape[0])
        if count and new_mean is not None:
            new_mean = (1.0 - momentum) * new_mean + momentum * mean
            new_var = (1.0 - momentum) * new_var + momentum * var * count / (count - 1)
    else:
        mean, var = np.asarray(running_mean, np.float64), np.asarray(running_var, np.float64)
    x_hat = (x - _broadcast(mean, x.ndim)) / np.sqrt(_broadcast(var, x.ndim) + eps)
    y = ACTIVATIONS[activation][0](_affine(x_hat, weight, bias), param)
    return y, new_mean, new_var


@silent
def batch_norm_backward(grad_y, x, weight=None, bias=None, running_mean=None, running_var=None, training=True,
                        eps=1e-5, activation="identity", param=0.0):
    """Returns (grad_x, grad_weight, grad_bias); grad_weight/grad_bias are per-channel vectors.

    Training: with dz = dy * act'(z) and M values per channel,
        dbeta = sum(dz), dgamma = sum(dz * x_hat),
        dx = gamma * invstd * (dz - dbeta / M - x_hat * dgamma / M).
    Eval: the statistics are constants, so dx = gamma * invstd * dz.
    """
    x = np.asarray(x, np.float64)
    grad_y = np.asarray(grad_y, np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    if training:
        mean = x.mean(axis=axes)
        var = ((x - _broadcast(mean, x.ndim)) ** 2).mean(axis=axes)
    else:
        mean, var = np.asarray(running_mean, np.float64), np.asarray(running_var, np.float64)
    invstd = 1.0 / np.sqrt(var + eps)
    x_hat = (x - _broadcast(mean, x.ndim)) * _broadcast(invstd, x.ndim)
    dz = grad_y * ACTIVATIONS[activation][1](_affine(x_hat, weight, bias), param)
    grad_bias = dz.sum(axis=axes)
    grad_weight = (dz * x_hat).sum(axis=axes)
    gamma = np.ones_like(invstd) if weight is None else np.asarray(weight, np.float64)
    scale = _broadcast(gamma * invstd, x.ndim)
    if training:
        count = x.size // x.shape[1] if x.shape[1] else 0
        grad_x = scale * (dz - _broadcast(grad_bias, x.ndim) / max(count, 1)
                          - x_hat * _broadcast(grad_weight, x.ndim) / max(count, 1))
    else:
        grad_x = scale * dz
    return grad_x, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# Pieces: per-channel statistics, their stable merge, and the two halves of backward.
#
# These take a ``compute_dtype`` (float64 unless given), the precision of the elementwise passes:
# the NumPy backend passes float32 for float32 tensors with an identity or relu activation, whose
# passes (x - mean, an affine step, a comparison) then run at twice the speed on half the memory.
# The per-channel sums are float64 whatever it is (:func:`_channel_sum`), and the mean is split as
# the kernels split it (:func:`_split_mean`), so that large means with small spreads stay exact.
# ---------------------------------------------------------------------------------------------
def _split_mean(mean, dtype):
    """(hi, lo): the mean rounded to `dtype`, which the rows subtract (x - hi is exact for x near the
    mean), and the float64 rest mean - hi, which per-channel terms take up; lo is None in float64."""
    mean = np.asarray(mean, np.float64)
    if dtype == np.float64:
        return mean, None
    hi = mean.astype(dtype)
    return hi, mean - hi


def _channel_sum(rows, other=None):
    """Per-channel sum of (N, C, M) rows, or of rows * other, as float64. float64 rows are summed in
    float64; float32 rows in float32 over each sample's M positions only (one einsum, at float32
    speed: a float64 einsum of float32 operands runs twice as slow), and those N partial sums in
    float64. Used for centred values and gradients, where float32 partials lose nothing visible."""
    if rows.dtype == np.float64:
        n, channels, m = rows.shape
        if m == 1:  # (N, C) rows: a product with a vector of ones (BLAS) costs less to set up than a
            flat = rows.reshape(n, channels)  # reduction or an einsum, which small inputs notice
            if other is not None:
                flat = flat * other.reshape(n, channels)
            return _ones(n) @ flat
        return np.einsum("ncm->c", rows) if other is None else np.einsum("ncm,ncm->c", rows, other)
    partial = np.einsum("ncm->nc", rows) if other is None else np.einsum("ncm,ncm->nc", rows, other)
    return np.add.reduce(partial, axis=0, dtype=np.float64)


@functools.lru_cache(maxsize=64)
def _ones(n):
    """A read-only vector of n ones (np.ones costs more than the sums it serves at small sizes)."""
    ones = np.ones(n)
    ones.flags.writeable = False
    return ones


def _centered_stats(x, compute_dtype=np.float64):
    """(count, mean, m2, rows, lo): count is the number of values per channel (one float, the same for
    every channel), mean and m2 per channel; rows = x - hi as (N, C * M) rows, where (hi, lo) is the
    mean split by :func:`_split_mean` (so x - mean = rows - lo); the rows are None for an empty batch."""
    rows = _rows_view(x, compute_dtype)
    n, channels, m = rows.shape
    count = n * m
    if count == 0:
        zeros = np.zeros(channels)
        return 0.0, zeros, zeros.copy(), None, None
    # the sum of x accumulates in float64 throughout: float32 partial sums of values far from zero
    # (a mean of 1e4, a spread of 1e-2) would lose the spread (the other sums are of centred values)
    mean = _channel_sum(rows) if rows.dtype == np.float64 else np.einsum("ncm->c", rows, dtype=np.float64)
    mean /= count
    hi, lo = _split_mean(mean, compute_dtype)
    centered = rows.reshape(n, channels * m) - _spread(hi, m, compute_dtype)
    per_channel = centered.reshape(rows.shape)
    m2 = _channel_sum(per_channel, per_channel)
    if lo is not None:  # sum (x - hi)^2 = m2 + count * lo^2 (clamped: a constant channel may round below)
        m2 = np.maximum(m2 - count * lo * lo, 0.0)
    return float(count), mean, m2, centered, lo


@silent
def channel_stats(x):
    """(count, mean, m2) per channel: m2 is the sum of squared deviations from the mean."""
    count, mean, m2 = _centered_stats(x)[:3]
    return np.full(np.shape(mean), count), mean, m2


class KeptRows(NamedTuple):
    """What a training forward computed that its backward computes again (:func:`backward_local`'s
    `kept`): the rows x - hi and the pre-activation z, (N, C * M) arrays, and lo (see _centered_stats)."""
    centered: np.ndarray
    z: np.ndarray
    lo: Optional[np.ndarray]


@silent
def train_forward(x, weight=None, bias=None, eps=1e-5, activation="identity", param=0.0,
                  compute_dtype=np.float64, out=None, keep=False):
    """Training forward of one process from its own statistics: (y, count, mean, m2, invstd), with
    x - mean computed once, for m2 and for y (= :func:`normalize` with these statistics). y is of
    `compute_dtype`, or is `out` when given: a C-ordered array of x's shape (of any float dtype) that
    the last pass writes, saving a copy. The statistics are float64; count, the number of values per
    channel, is one float. With `keep`, a sixth item: the :class:`KeptRows` for backward (None for an
    empty batch); z then takes an array of its own instead of x - hi's."""
    count, mean, m2, centered, lo = _centered_stats(x, compute_dtype)
    invstd = _invstd_from_m2(count, m2, eps)
    if centered is None:  # an empty batch
        y = normalize(x, mean, invstd, weight, bias, activation, param)
        if out is not None:
            out[...] = y
            y = out
        return (y, count, mean, m2, invstd) + ((None,) if keep else ())
    if not keep:
        return _scale_shift(centered, invstd, weight, bias, activation, param, x, lo, out), count, mean, m2, invstd
    y, z = _scale_shift(centered, invstd, weight, bias, activation, param, x, lo, out, keep=True)
    return y, count, mean, m2, invstd, KeptRows(centered, z, lo)


@silent
def merge_stats(counts, means, m2s):
    """Chan et al.'s pairwise merge of per-group (count, mean, m2), groups along axis 0."""
    counts, means, m2s = (np.asarray(a, np.float64) for a in (counts, means, m2s))
    n, mean, m2 = np.zeros(counts.shape[1:]), np.zeros(counts.shape[1:]), np.zeros(counts.shape[1:])
    for nb, mb, qb in zip(counts, means, m2s):
        total = n + nb
        weight = np.divide(nb, total, out=np.zeros_like(total), where=total > 0)
        delta = mb - mean
        mean = mean + delta * weight
        m2 = m2 + qb + delta * delta * n * weight
        n = total
    return n, mean, m2


@silent
def update_running(running_mean, running_var, count, mean, m2, momentum, out=None):
    """New running (mean, var) from merged statistics (unbiased variance); unchanged where count is 0.
    `count`: values per channel, one float for all or one per channel. Computed in float64; `out`, a
    pair of arrays (the running ones themselves may be given), receives the results, rounded once to
    their dtype, and is returned."""
    if not isinstance(count, float):
        count = np.asarray(count, np.float64)
    running = np.array((running_mean, running_var), np.float64)  # (2, C): both move in one pass
    batch = np.empty_like(running)
    batch[0] = mean
    np.divide(m2, count - 1.0, out=batch[1])
    batch *= momentum
    new = running * (1.0 - momentum)
    new += batch
    if not isinstance(count, float) or count <= 0:  # where a batch was empty the running stats stay
        new = np.where(count > 0, new, running)
    if out is None:
        return new[0], new[1]
    out[0][...], out[1][...] = new
    return out


def _shift(bias, lo, scale):
    """The per-channel shift after the scale: beta - lo * scale for rows that hold x - hi (None: no shift)."""
    if lo is None:
        return bias
    return -lo * scale if bias is None else np.asarray(bias, np.float64) - lo * scale


def _scale_shift(centered, invstd, weight, bias, activation, param, x, lo=None, out=None, keep=False):
    """act((centered - lo) * gamma * invstd + beta), shaped as x, written into `out` (a C-ordered array
    of x's shape) if given; built in centered's memory, or with `keep` in a fresh z, centered left as
    it was: then (y, z), z the pre-activation rows. gamma and beta may be float32 (they are exact in
    float64, which the per-channel terms are computed in)."""
    shape = np.shape(x)
    m = math.prod(shape[2:])
    scale = np.asarray(invstd, np.float64)
    if weight is not None:
        scale = np.multiply(scale, weight)  # (float64: the float32 weight is promoted)
    z = np.multiply(centered, _spread(scale, m, centered.dtype), out=None if keep else centered)
    shift = _shift(bias, lo, scale)
    if shift is not None:
        z += _spread(shift, m, z.dtype)
    rows = None if out is None else out.reshape(z.shape)
    if activation == "relu":  # in place: a fresh array of x's size costs more than the pass itself
        y = relu(z, out=rows if rows is not None else (None if keep else z))
    else:
        y = ACTIVATIONS[activation][0](z, param)  # (identity: z itself)
        if rows is not None:
            rows[...] = y
            y = rows
    y = y.reshape(shape)
    return (y, z) if keep else y


@silent
def normalize(x, mean, invstd, weight=None, bias=None, activation="identity", param=0.0):
    """y = act(gamma * (x - mean) * invstd + beta) with given per-channel statistics."""
    return _scale_shift(_flat(x) - _spread(mean, _positions(x)), invstd, weight, bias, activation, param, x)


def _centered_and_dz(grad_y, x, mean, invstd, weight, bias, activation, param, compute_dtype=np.float64,
                     kept=None):
    """(x - hi, dz, lo) with (hi, lo) the mean split by :func:`_split_mean`, as (N, C * M) rows:
    dz = dy * act'(z), z = gamma * invstd * (x - mean) + beta recomputed as the forward computed it,
    or taken with x - hi from the forward's :class:`KeptRows` `kept`.
    x_hat = invstd * (x - mean) is never formed: the sums and dx apply invstd per channel instead,
    which saves a pass over the values."""
    m = _positions(x)
    dz = _flat(grad_y, compute_dtype)
    if kept is not None:
        centered, z, lo = kept
    else:
        hi, lo = _split_mean(mean, compute_dtype)
        centered = _flat(x, compute_dtype) - _spread(hi, m, compute_dtype)
    if activation != "identity":  # act' is 1 everywhere for identity
        if kept is None:
            invstd = np.asarray(invstd, np.float64)
            scale = invstd if weight is None else np.multiply(invstd, weight)
            z = centered * _spread(scale, m, compute_dtype)
            shift = _shift(bias, lo, scale)
            if shift is not None:
                z += _spread(shift, m, compute_dtype)
        derivative = ACTIVATIONS[activation][1](z, param)  # a fresh array: dz is built in it
        dz = np.multiply(dz, derivative, out=derivative)
    return centered, dz, lo


def _channel_sums(centered, dz, lo, invstd, shape):
    """Per-channel (sum dz, sum dz * x_hat) of :func:`_centered_and_dz`'s rows for an input of `shape`."""
    rows = (shape[0], shape[1], math.prod(shape[2:]))
    dz, centered = dz.reshape(rows), centered.reshape(rows)
    sum_dz, sum_dz_centered = _channel_sum(dz), _channel_sum(dz, centered)
    if lo is not None:  # sum dz * (x - mean) = sum dz * (x - hi) - lo * sum dz
        sum_dz_centered -= lo * sum_dz
    return sum_dz, sum_dz_centered * np.asarray(invstd, np.float64)


def _input_grad(centered, dz, lo, invstd, weight, sum_dz, sum_dz_xhat, count, m, out=None):
    """dx as (N, C * M) rows from the sums over `count` values per channel, built in centered's memory
    (which it overwrites, in its dtype) and written to `out` if given; without the sums (eval)
    dx = gamma * invstd * dz."""
    invstd = np.asarray(invstd, np.float64)
    dtype = centered.dtype
    scale = _spread(invstd if weight is None else np.multiply(invstd, weight), m, dtype)
    if sum_dz is None:
        return np.multiply(dz, scale, out=out)
    count = max(count, 1.0) if isinstance(count, float) else np.maximum(np.asarray(count, np.float64), 1.0)
    # dx = scale * (dz - sum_dz / count - x_hat * sum_dz_xhat / count), x_hat = invstd * (centered - lo)
    dx = centered
    slope = np.multiply(invstd, sum_dz_xhat, dtype=np.float64)
    slope /= -count
    dx *= _spread(slope, m, dtype)
    dx += dz
    offset = np.divide(sum_dz, count, dtype=np.float64)
    dx -= _spread(offset if lo is None else offset + lo * slope, m, dtype)
    return np.multiply(dx, scale, out=dx if out is None else out)


@silent
def backward_reduce(grad_y, x, mean, invstd, weight=None, bias=None, activation="identity", param=0.0):
    """Per-channel (sum dz, sum dz * x_hat): dbeta and dgamma, and the two terms dx needs."""
    centered, dz, lo = _centered_and_dz(grad_y, x, mean, invstd, weight, bias, activation, param)
    return _channel_sums(centered, dz, lo, invstd, np.shape(x))


@silent
def backward_input(grad_y, x, mean, invstd, weight=None, bias=None, sum_dz=None, sum_dz_xhat=None, count=1,
                   activation="identity", param=0.0):
    """dx from the (possibly all-reduced) sums over `count` values per channel; without the sums
    (eval) the statistics are constants and dx = gamma * invstd * dz."""
    centered, dz, lo = _centered_and_dz(grad_y, x, mean, invstd, weight, bias, activation, param)
    return _input_grad(centered, dz, lo, invstd, weight, sum_dz, sum_dz_xhat, count,
                       _positions(x)).reshape(np.shape(x))


@silent
def backward_local(grad_y, x, mean, invstd, weight=None, bias=None, count=None, activation="identity", param=0.0,
                   need_input=True, need_sums=True, out=None, compute_dtype=np.float64, kept=None):
    """(dx, sum dz, sum dz * x_hat) of one process: :func:`backward_reduce` then :func:`backward_input`
    from one x - mean and dz. Training when `count` (values per channel) is given, eval (constant
    statistics) when it is None; what is not needed comes back as None. `out`, a C-ordered array of
    x's shape (of any float dtype), receives dx: the last pass writes it, saving a copy. The elementwise
    passes run in `compute_dtype` (dx is of that dtype without `out`), the sums in float64. `kept`, the
    :class:`KeptRows` of the training forward of this x with these statistics, parameters and
    activation, stands in for x - mean and z; its rows are consumed (dx is built in them)."""
    centered, dz, lo = _centered_and_dz(grad_y, x, mean, invstd, weight, bias, activation, param, compute_dtype,
                                        kept)
    sum_dz = sum_dz_xhat = dx = None
    if need_sums or (need_input and count is not None):
        sum_dz, sum_dz_xhat = _channel_sums(centered, dz, lo, invstd, np.shape(x))
    if need_input:
        sums = (sum_dz, sum_dz_xhat) if count is not None else (None, None)
        rows = None if out is None else out.reshape(centered.shape)
        dx = _input_grad(centered, dz, lo, invstd, weight, *sums, count, _positions(x), rows).reshape(np.shape(x))
    return dx, sum_dz, sum_dz_xhat


def _invstd_from_m2(count, m2, eps):
    values = max(count, 1.0) if isinstance(count, float) else np.maximum(count, 1.0)  # (0: none)
    variance = np.divide(m2, values, dtype=np.float64)  # biased: over count values
    variance += eps
    return np.reciprocal(np.sqrt(variance, out=variance), out=variance)


@silent
def invstd_from_m2(count, m2, eps):
    """1 / sqrt(biased variance + eps) from merged statistics (variance 0 where count is 0)."""
    return _invstd_from_m2(count, m2, eps)


@silent
def invstd_from_var(var, eps):
    return 1.0 / np.sqrt(np.asarray(var, np.float64) + eps)
