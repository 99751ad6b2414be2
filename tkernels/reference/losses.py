"""Cross-entropy and mean-squared-error losses, and their gradients, in float64 NumPy.

Cross-entropy is written as one formula for both kinds of target: with the target distribution
q (a one-hot row mixed with label smoothing, or the given class probabilities mixed the same way),

    loss_i = -sum_c w_c q_ic log_softmax(x_i)_c,

and 'mean' divides by sum_i w_{t_i} over non-ignored rows (class indices) or by the number of
rows (class probabilities), as torch does. Arrays keep torch's layout: the class axis is 1
for batched input (N, C, d1, ...) and 0 for a single sample (C,).
"""
import numpy as np

from ._errstate import silent


REDUCTIONS = ("none", "mean", "sum")


def _class_axis(x):
    return 1 if x.ndim >= 2 else 0


def _move(a, source, destination):
    """np.moveaxis, skipped when it would not move anything (the common (N, C) case)."""
    return a if source % max(a.ndim, 1) == destination % max(a.ndim, 1) else np.moveaxis(a, source, destination)


def _log_softmax_last(z):
    m = np.max(z, axis=-1, keepdims=True)
    return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def _check_classes(t, C, ignore_index):
    """IndexError (torch's message) for the first class index in t outside [0, C)."""
    bad = t[(t < 0) | (t >= C)]
    if bad.size:
        raise IndexError(f"Target {bad[0]} is out of bounds: expected a class index in [0, {C - 1}] or "
                         f"ignore_index={ignore_index}")


def _distribution(z, target, ignore_index, label_smoothing, probabilities):
    """(q, valid) with the class axis last: q is (..., C), valid is (...)."""
    C = z.shape[-1]
    eps = max(float(label_smoothing), 0.0)
    if probabilities:
        q = np.asarray(target, np.float64) * (1.0 - eps) + eps / C
        return q, np.ones(z.shape[:-1], dtype=bool)
    t = np.asarray(target).astype(np.int64)
    valid = t != ignore_index
    _check_classes(t[valid], C, ignore_index)
    onehot = (np.arange(C) == np.where(valid, t, -1)[..., None]).astype(np.float64)
    if eps == 0.0:  # the mix below would reproduce onehot exactly (ignored rows are already 0)
        return onehot, valid
    q = (1.0 - eps) * onehot + eps / C
    return np.where(valid[..., None], q, 0.0), valid


def _prepare(x, target, weight, ignore_index, label_smoothing):
    x = np.asarray(x, np.float64)
    axis = _class_axis(x)
    z = _move(x, axis, -1)
    probabilities = np.asarray(target).shape == x.shape and np.issubdtype(np.asarray(target).dtype, np.floating)
    tgt = _move(np.asarray(target), axis, -1) if probabilities else target
    q, valid = _distribution(z, tgt, ignore_index, label_smoothing, probabilities)
    w = np.ones(z.shape[-1]) if weight is None else np.asarray(weight, np.float64)
    if probabilities:
        denom = float(valid.size)
    else:
        t = np.asarray(target).astype(np.int64)
        denom = float(np.sum(w[t[valid]]))
    return axis, z, q, valid, w, denom, probabilities


def _one_hot(x, target, label_smoothing):
    """Whether the target distribution is one-hot: class indices without label smoothing."""
    return float(label_smoothing) <= 0.0 and np.asarray(target).dtype.kind != "f"


def _picked(x, target, weight, ignore_index):
    """For one-hot targets the sum over classes is one gathered term per row. Returns (z (R, C) with
    the class axis last, moved shape, rows, t (R,) with ignored rows pointing at class 0, valid (R,),
    w_t (R,): the target's class weight, 0 on ignored rows, or None when every row weighs 1, denom)."""
    x = np.asarray(x, np.float64)
    z = _move(x, _class_axis(x), -1)
    given = np.asarray(target, np.int64).reshape(-1)
    valid = given != ignore_index
    all_valid = valid.all()
    t = given if all_valid else np.where(valid, given, 0)
    if t.size and t.view(np.uint64).max() >= z.shape[-1]:  # (as unsigned, a negative index is huge)
        _check_classes(given[valid], z.shape[-1], ignore_index)
    if weight is None and all_valid:  # (the common case: no per-row weights to multiply by)
        return z.reshape(-1, z.shape[-1]), z.shape, np.arange(t.size), t, valid, None, float(t.size)
    if weight is None:
        w_t = valid.astype(np.float64)
    else:  # (a where, not a product: an ignored row must not pick up a NaN or Inf weight)
        w_t = np.where(valid, np.asarray(weight, np.float64)[t], 0.0)
    return z.reshape(-1, z.shape[-1]), z.shape, np.arange(t.size), t, valid, w_t, float(w_t.sum())


def _exp_shifted(z):
    """(z - max, exp(z - max), its row sums) per row of z (R, C): log_softmax = shifted - log(sums)[:, None],
    softmax = exps / sums[:, None]."""
    shifted = z - z.max(axis=-1, keepdims=True)
    exps = np.exp(shifted)
    return shifted, exps, exps.sum(axis=-1)


def _reduce(per_row, reduction, denom):
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return np.asarray(total)
    return np.asarray(np.float64(total) / np.float64(denom))


def _row_scale(grad, reduction, shape, denom):
    """d total / d loss_i for each row: the incoming gradient, divided by the divisor for 'mean'."""
    g = np.asarray(grad, np.float64)
    if reduction == "none":
        return g
    if reduction == "sum":
        return np.full(shape, float(g))
    return np.full(shape, np.float64(g) / np.float64(denom))


@silent
def cross_entropy(x, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """Loss: a scalar for 'mean'/'sum', per-sample (target's batch shape) for 'none'."""
    if _one_hot(x, target, label_smoothing):
        z, _, rows, t, valid, w_t, denom = _picked(x, target, weight, ignore_index)
        shifted, _, sums = _exp_shifted(z)
        per_row = np.log(sums) - shifted[rows, t]  # -log p_t
        if w_t is not None:
            per_row *= w_t
            if not w_t.all():  # a zero weight contributes 0 even where log p = -inf
                per_row[w_t == 0.0] = 0.0
        return _reduce(per_row.reshape(np.shape(target)), reduction, denom)
    _, z, q, valid, w, denom, _ = _prepare(x, target, weight, ignore_index, label_smoothing)
    logp = _log_softmax_last(z)
    wq = w * q
    # a class the target distribution does not touch contributes 0 even where log p = -inf
    per_row = -np.sum(np.where(wq != 0.0, wq * logp, 0.0), axis=-1)
    return _reduce(np.where(valid, per_row, 0.0), reduction, denom)


@silent
def cross_entropy_backward(grad, x, target, weight=None, ignore_index=-100, reduction="mean",
                           label_smoothing=0.0):
    """(grad_input, grad_target); grad_target is None for class-index targets."""
    if _one_hot(x, target, label_smoothing):
        z, moved, rows, t, valid, w_t, denom = _picked(x, target, weight, ignore_index)
        _, dz, sums = _exp_shifted(z)
        # d loss_i / d x_ic = w_t (p_ic - [c == t]), times the row's scale
        g = np.asarray(grad, np.float64)
        coef = g.reshape(-1) if reduction == "none" else (g / np.float64(denom) if reduction == "mean" else g)
        if w_t is not None:
            coef = w_t * coef
        dz *= (coef / sums)[:, None]  # p = exps / sums
        dz[rows, t] -= coef
        if not valid.all():
            dz[~valid] = 0.0
        return _move(dz.reshape(moved), -1, _class_axis(np.asarray(x))), None
    axis, z, q, valid, w, denom, probabilities = _prepare(x, target, weight, ignore_index, label_smoothing)
    logp = _log_softmax_last(z)
    p = np.exp(logp)
    scale = _row_scale(grad, reduction, valid.shape, denom)
    wq = w * q
    # d loss_i / d x_ic = p_ic * sum_k w_k q_ik - w_c q_ic
    dz = np.where(valid[..., None], scale[..., None] * (p * np.sum(wq, axis=-1, keepdims=True) - wq), 0.0)
    grad_input = _move(dz, -1, axis)
    grad_target = None
    if probabilities:
        eps = max(float(label_smoothing), 0.0)
        grad_target = _move(-scale[..., None] * w * (1.0 - eps) * logp, -1, axis)
    return grad_input, grad_target


def _sum_to_shape(a, shape):
    """Undo broadcasting: sum `a` over the axes that were broadcast to reach a.shape."""
    extra = a.ndim - len(shape)
    a = np.sum(a, axis=tuple(range(extra))) if extra else a
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and a.shape[i] != 1)
    return np.sum(a, axis=axes, keepdims=True) if axes else a


@silent
def mse_loss(x, y, reduction="mean", weight=None):
    """(x - y)^2, times `weight` if given; 'mean' divides by the number of elements, or by sum(weight)."""
    d = np.asarray(x, np.float64) - np.asarray(y, np.float64)
    sq = d * d
    if weight is not None:
        sq = sq * np.asarray(weight, np.float64)
    if reduction == "none":
        return sq
    if reduction == "sum":
        return np.asarray(np.sum(sq))
    divisor = np.sum(np.broadcast_to(weight, sq.shape)) if weight is not None else sq.size
    return np.asarray(np.sum(sq) / np.float64(divisor))


@silent
def mse_loss_backward(grad, x, y, reduction="mean", weight=None):
    """(grad_x, grad_y, grad_weight), each summed back to its own (pre-broadcast) shape;
    grad_weight is None without a weight."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d = x - y
    w = np.ones(d.shape) if weight is None else np.broadcast_to(np.asarray(weight, np.float64), d.shape)
    g = np.asarray(grad, np.float64)
    if reduction == "mean":
        g = g / np.float64(np.sum(w) if weight is not None else d.size)
    dd = 2.0 * d * w * g
    grad_weight = None
    if weight is not None:
        # d/dw_j of sum_k w_k sq_k / sum_k w_k is (sq_j - loss) / sum_k w_k
        shift = mse_loss(x, y, "mean", weight) if reduction == "mean" else 0.0
        grad_weight = _sum_to_shape((d * d - shift) * g * np.ones(d.shape), np.shape(weight))
    return _sum_to_shape(dd, x.shape), _sum_to_shape(-dd, y.shape), grad_weight
