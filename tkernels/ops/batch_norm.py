"""Batch norm with an optional fused activation: custom ops, autograd and the public function.

    training: y = act(gamma * (x - mean_B) / sqrt(var_B + eps) + beta), running stats updated
    eval:     y = act(gamma * (x - running_mean) / sqrt(running_var + eps) + beta)

Training forward of small inputs (``K.single_launch_fits``: at most 8192 values per channel and
2^22 in all) is one custom op, ``batch_norm_train`` (one kernel: statistics, running-stat update
and y); larger inputs take two: ``batch_norm_stats`` (split reduction + stable combine,
running-stat update in place) and ``batch_norm_apply`` (one elementwise pass). Both write the same
(5, C) statistics for backward (the NumPy backend takes ``batch_norm_train`` at every size). Eval is
``batch_norm_apply`` alone. Backward is one op,
``batch_norm_backward``, running two kernels: the reduce (two-stage deterministic sums of dz and
dz * x_hat, which are dbeta and dgamma) and the input pass (one pass for dx). SyncBatchNorm
(:mod:`tkernels.nn.batchnorm`) calls them as two ops, ``batch_norm_backward_reduce`` and
``batch_norm_backward_input``, with the sums all-reduced in between, plus ``batch_norm_gather_stats``
to merge per-process statistics. On the NumPy backend the one op converts each tensor once and
computes x - mean and dz once for both halves (``reference.batch_norm.backward_local``).

What backward keeps: x, the (5, C) statistics, and the parameters; the pre-activation z is
recomputed from them. Keeping y instead (possible for relu) would not save any traffic: dx needs
x_hat, hence x, anyway, so backward reads x and dy either way.

The NumPy backend at small sizes, where fixed per-call costs outweigh the passes (issue 14):
running stats move in place through NumPy views of the buffers (same tensors, same storage); a
training forward that needs no gradient runs without the autograd.Function and the custom op
(``_numpy_forward_only``) and builds no stats; a training forward of at most
``KEEP_ROWS_MAX_NUMEL`` values leaves its float64 rows x - mean and z on the stats tensor for its
backward (``_keep_rows``), which takes them if it is that forward's (same tensors, unchanged).
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import _backend
from ..activations import ActivationLike, resolve_activation
from ..reference import batch_norm as ref
from ..reference._errstate import silent
from ..reference.activations import epilogue_dtype
from . import batch_norm_kernels as K
from ._dispatch import custom_op, eager_device, run_function
from ._common import (FLOAT_DTYPES, check_floating, check_triton_dtype, from_numpy, numpy_into, product_dtype,
                      to_numpy)

OP = "batch_norm"
_EMPTY = (0,)


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _use_numpy(*tensors: Optional[Tensor]) -> bool:
    return _backend.resolve(OP, *tensors) == "numpy"


# ---------------------------------------------------------------------------------------------
# NumPy-backend glue: the (5, C) stats layout <-> the reference's (count, mean, m2, invstd).
# ---------------------------------------------------------------------------------------------
@silent
def _numpy_stats_rows(count, mean, m2, invstd, like: Tensor) -> Tensor:
    """The (5, C) stats tensor of float64 statistics, built in its dtype (the NumPy backend runs on CPU).
    Silent: inf - inf is NaN, as in the kernels, a float64 beyond float32's range rounds to inf, and
    torch does not warn about either."""
    rows = np.empty((K.STATS_ROWS, mean.shape[0]), np.float64 if like.dtype == torch.float64 else np.float32)
    rows[0], rows[1], rows[3], rows[4] = count, mean, m2, invstd
    np.subtract(mean, rows[1], out=rows[2])  # the mean in two parts: its rounding (row 1), then the rest
    return torch.from_numpy(rows)


# Below this many values float64 passes are cheaper overall: the float32 path's extra per-channel
# steps (the split mean, float64 totals of float32 partial sums) cost more than its passes save.
FLOAT32_MIN_NUMEL = 1 << 14


def _compute_dtype(input: Tensor, activation: str):
    """The precision of the NumPy backend's elementwise passes (the reference's ``compute_dtype``):
    float32 for float32 tensors of at least FLOAT32_MIN_NUMEL values with an identity or relu
    activation, as linear and conv apply their epilogues, else float64. Statistics and per-channel
    sums are float64 either way."""
    if input.numel() < FLOAT32_MIN_NUMEL:
        return np.float64
    return epilogue_dtype(activation, product_dtype(input))


def _numpy_mean_invstd(stats, running_mean, running_var, training: bool, eps: float):
    if training:
        s = to_numpy(stats)
        return s[1] + s[2], s[4]
    return to_numpy(running_mean), ref.invstd_from_var(to_numpy(running_var), eps)


# Training forwards of at most this many values keep their rows x - mean and z (float64, 16 bytes a
# value) for backward, on the stats tensor that backward receives: at these sizes recomputing them
# costs more in fixed per-call work than in passes, and the memory held until backward is small.
KEEP_ROWS_MAX_NUMEL = FLOAT32_MIN_NUMEL
_KEPT_ATTRIBUTE = "_tkernels_kept_rows"


def _version(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t._version


def _forward_key(input, weight, bias, stats, eps, activation, param) -> tuple:
    """What kept rows were computed from: the tensors (compared by identity: the first three items),
    their versions (an in-place change moves them) and the options."""
    return (input, weight, bias, input._version, _version(weight), _version(bias), stats._version, eps, activation,
            param)


def _keep_rows(stats: Tensor, kept, input, weight, bias, eps, activation, param) -> None:
    setattr(stats, _KEPT_ATTRIBUTE, (kept, _forward_key(input, weight, bias, stats, eps, activation, param)))


def _kept_rows(stats: Tensor, input, weight, bias, eps, activation, param):
    """The rows the training forward that returned `stats` kept (see KEEP_ROWS_MAX_NUMEL), taken off it
    (backward consumes them: a second backward recomputes), if this backward is of that forward: the
    same input and parameters, unchanged since, and the same options. Else None."""
    entry = stats.__dict__.pop(_KEPT_ATTRIBUTE, None)
    if entry is None:
        return None
    kept, key = entry
    now = _forward_key(input, weight, bias, stats, eps, activation, param)
    same = key[0] is now[0] and key[1] is now[1] and key[2] is now[2] and key[3:] == now[3:]
    return kept if same else None


def _numpy_dtype(t: Tensor):
    return np.float32 if t.dtype == torch.float32 else np.float64


# dtypes whose CPU tensors the NumPy backend reads and writes through NumPy views (float64 results
# are rounded to them once, to nearest, as torch's copy_ rounds); float16 and bfloat16 ones take copy_
_VIEWED_DTYPES = (torch.float32, torch.float64)
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _writable_view(t: Tensor) -> np.ndarray:
    return (t.detach() if t.requires_grad else t).numpy()


def _numpy_update_running(running_mean, running_var, count, mean, m2, momentum: float) -> None:
    """The running stats moved towards the batch's, in place. float32/float64 buffers (on the CPU: the
    NumPy backend) are read and written through NumPy views, of any strides: the tensor objects and
    storages stay the same, so state_dict entries and optimizer references keep pointing at them."""
    if running_mean is None:
        return
    if running_mean.dtype in _VIEWED_DTYPES and running_var.dtype in _VIEWED_DTYPES:
        views = (_writable_view(running_mean), _writable_view(running_var))
        # float64 from the buffers' values, rounded once to their dtype on the way back
        ref.update_running(*views, count, mean, m2, momentum, out=views)
        return
    new_mean, new_var = ref.update_running(to_numpy(running_mean), to_numpy(running_var), count, mean, m2, momentum)
    numpy_into(running_mean, new_mean)
    numpy_into(running_var, new_var)


def _empty_output(input: Tensor) -> Optional[np.ndarray]:
    """An empty array of input's shape and dtype for the reference's last pass to write into (the
    output tensor is then made on it with torch.from_numpy, no copy), or None where it cannot: a
    non-contiguous input (the output keeps its layout) or another dtype."""
    dtype = _NUMPY_DTYPES.get(input.dtype)
    if dtype is not None and input.is_contiguous():
        return np.empty(input.shape, dtype)
    return None


def _numpy_param(t: Optional[Tensor]) -> Optional[np.ndarray]:
    """A per-channel parameter for the reference: float32 and float64 ones are viewed, not converted
    (the reference computes its per-channel terms in float64, where float32 values are exact)."""
    if t is not None and t.dtype in _VIEWED_DTYPES and t.is_cpu:
        return (t.detach() if t.requires_grad else t).numpy()
    return to_numpy(t)


def _like_input(a, x: Tensor) -> Tensor:
    """The float64 array a (x's shape) as a tensor of x's dtype in x's storage order."""
    return from_numpy(a, x) if x.is_contiguous() else numpy_into(K.empty_like_dense(x), a)


# ---------------------------------------------------------------------------------------------
# Triton-backend glue: layouts and in-place buffers.
# ---------------------------------------------------------------------------------------------
def _geometry(*tensors: Tensor):
    """(tensors, geometry) for same-shaped tensors, x first. Only views whose reduction dims form
    more than four separate runs (sliced 6-D and up) defeat the geometry; they are copied."""
    geom = K.plan(tensors[0].shape, *[t.stride() for t in tensors])
    if geom is None:
        tensors = tuple(t.contiguous() for t in tensors)
        geom = K.plan(tensors[0].shape, *[t.stride() for t in tensors])
    return tensors, geom


def _elementwise(launch, input: Tensor, grad: Optional[Tensor] = None) -> Tensor:
    """Allocate the output in input's storage order and run ``launch(*tensors, geom)``."""
    out = K.empty_like_dense(input)
    inputs = (input,) if grad is None else (input, grad)
    (*ins, work), geom = _geometry(*inputs, out)
    if input.numel():
        launch(*ins, work, geom)
    if work is not out:
        out.copy_(work)
    return out


def _run_with_running(fn, running_mean: Optional[Tensor], running_var: Optional[Tensor]) -> Tensor:
    """Kernels index running stats with unit stride; a strided buffer is updated through a copy."""
    if running_mean is None or (running_mean.is_contiguous() and running_var.is_contiguous()):
        return fn(running_mean, running_var)
    rm, rv = running_mean.contiguous(), running_var.contiguous()
    out = fn(rm, rv)
    running_mean.copy_(rm)
    running_var.copy_(rv)
    return out


def _contig(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------
def _numpy_batch_stats(input: Tensor, x: np.ndarray, running_mean, running_var, momentum: float,
                       eps: float) -> Tensor:
    """The stats tensor of input, whose float64 copy is x; running stats updated."""
    count, mean, m2 = ref.channel_stats(x)
    _numpy_update_running(running_mean, running_var, count, mean, m2, momentum)
    return _numpy_stats_rows(count, mean, m2, ref.invstd_from_m2(count, m2, eps), input)


@silent  # (one np.errstate for all the reference calls)
def _numpy_train(input, weight, bias, running_mean, running_var, momentum, eps, activation, param, need_stats):
    """batch_norm_train on the NumPy backend: statistics and y from one conversion of x; y from the
    float64 statistics, the stats tensor holds them rounded as the kernels store them (None without
    `need_stats`)."""
    dtype = _compute_dtype(input, activation)
    out = _empty_output(input)
    keep = need_stats and input.numel() <= KEEP_ROWS_MAX_NUMEL
    y, count, mean, m2, invstd, *kept = ref.train_forward(
        to_numpy(input, dtype), _numpy_param(weight), _numpy_param(bias), eps, activation, param, dtype, out, keep)
    _numpy_update_running(running_mean, running_var, count, mean, m2, momentum)
    y = _like_input(y, input) if out is None else torch.from_numpy(out)
    if not need_stats:
        return y, None
    stats = _numpy_stats_rows(count, mean, m2, invstd, input)
    if keep and kept[0] is not None:
        _keep_rows(stats, kept[0], input, weight, bias, eps, activation, param)
    return y, stats


@custom_op("tkernels::batch_norm_stats", mutates_args=("running_mean", "running_var"))
def batch_norm_stats(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
                     eps: float) -> Tensor:
    """Batch statistics (5, C) of input; running stats (if given) updated in place."""
    if _use_numpy(input):
        return _numpy_batch_stats(input, to_numpy(input), running_mean, running_var, momentum, eps)
    check_triton_dtype(OP, input)
    (x,), geom = _geometry(input)
    return _run_with_running(lambda rm, rv: K.launch_stats(x, geom, rm, rv, momentum, eps), running_mean, running_var)


@batch_norm_stats.register_fake
def _(input, running_mean, running_var, momentum, eps):
    return input.new_empty((K.STATS_ROWS, input.shape[1]), dtype=_stats_dtype(input))


@custom_op("tkernels::batch_norm_gather_stats", mutates_args=("running_mean", "running_var"))
def batch_norm_gather_stats(gathered: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                            momentum: float, eps: float) -> Tensor:
    """Merge per-process statistics (P, 5, C) into (5, C); running stats updated in place."""
    if _use_numpy(gathered):
        g = to_numpy(gathered)
        count, mean, m2 = ref.merge_stats(g[:, 0], g[:, 1] + g[:, 2], g[:, 3])
        _numpy_update_running(running_mean, running_var, count, mean, m2, momentum)
        return _numpy_stats_rows(count, mean, m2, ref.invstd_from_m2(count, m2, eps), gathered)
    parts = gathered.contiguous()
    P, C = parts.shape[0], parts.shape[2]
    return _run_with_running(
        lambda rm, rv: K.launch_combine(parts, P, K.STATS_ROWS * C, rm, rv, momentum, eps), running_mean, running_var)


@batch_norm_gather_stats.register_fake
def _(gathered, running_mean, running_var, momentum, eps):
    return gathered.new_empty(gathered.shape[1:])


@custom_op("tkernels::batch_norm_apply", mutates_args=())
def batch_norm_apply(input: Tensor, stats: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                     running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, eps: float,
                     activation: str, param: float) -> Tensor:
    """y = act(normalise(x) * gamma + beta), from batch stats (training) or running stats (eval)."""
    if _use_numpy(input):
        if training:
            s = to_numpy(stats)
            y = ref.normalize(to_numpy(input), s[1] + s[2], s[4], to_numpy(weight), to_numpy(bias), activation, param)
            return _like_input(y, input)
        y = ref.batch_norm_forward(to_numpy(input), to_numpy(running_mean), to_numpy(running_var),
                                   to_numpy(weight), to_numpy(bias), False, 0.0, eps, activation, param)[0]
        return _like_input(y, input)
    check_triton_dtype(OP, input)
    params = (stats, _contig(running_mean), _contig(running_var), _contig(weight), _contig(bias))
    code = resolve_activation(activation).code
    return _elementwise(lambda x, y, geom: K.launch_apply(x, y, geom, *params, training, eps, code, param), input)


@batch_norm_apply.register_fake
def _(input, stats, weight, bias, running_mean, running_var, training, eps, activation, param):
    return K.empty_like_dense(input)


@custom_op("tkernels::batch_norm_train", mutates_args=("running_mean", "running_var"))
def batch_norm_train(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                     running_var: Optional[Tensor], momentum: float, eps: float, activation: str,
                     param: float, need_stats: bool = True) -> Tuple[Tensor, Tensor]:
    """Training forward in one launch: (y, stats (5, C)); running stats (if given) updated in place.
    For non-empty inputs that ``K.single_launch_fits``; the result equals batch_norm_stats + apply.
    Without `need_stats` (no backward will run) stats is empty: the NumPy backend then skips building it."""
    if _use_numpy(input):
        y, stats = _numpy_train(input, weight, bias, running_mean, running_var, momentum, eps, activation, param,
                                need_stats)
        return y, (stats if need_stats else input.new_empty(_EMPTY))
    check_triton_dtype(OP, input)
    if not input.numel():
        raise ValueError(f"{OP}: the single-launch training forward needs a non-empty input, got shape "
                         f"{tuple(input.shape)}")
    out = K.empty_like_dense(input)
    (x, y), geom = _geometry(input, out)
    code = resolve_activation(activation).code
    stats = _run_with_running(
        lambda rm, rv: K.launch_train_single(x, y, geom, rm, rv, _contig(weight), _contig(bias), momentum, eps, code,
                                             param), running_mean, running_var)
    if y is not out:
        out.copy_(y)
    return out, (stats if need_stats else stats.new_empty(_EMPTY))


@batch_norm_train.register_fake
def _(input, weight, bias, running_mean, running_var, momentum, eps, activation, param, need_stats=True):
    return K.empty_like_dense(input), input.new_empty((K.STATS_ROWS, input.shape[1]) if need_stats else _EMPTY,
                                                      dtype=_stats_dtype(input))


def _param_dtype(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> torch.dtype:
    return weight.dtype if weight is not None else (bias.dtype if bias is not None else input.dtype)


def _triton_backward_reduce(grad, input, stats, weight, bias, running_mean, running_var, training, eps, activation,
                            param, need_weight, need_bias):
    check_triton_dtype(OP, input)
    C, pdtype = input.shape[1], _param_dtype(input, weight, bias)
    dw = torch.empty((C,), device=input.device, dtype=pdtype) if need_weight else None
    db = torch.empty((C,), device=input.device, dtype=pdtype) if need_bias else None
    (x, g), geom = _geometry(input, grad)
    sums = K.launch_backward_reduce(g, x, geom, stats, _contig(running_mean), _contig(running_var), _contig(weight),
                                    _contig(bias), training, eps, resolve_activation(activation).code, param, dw, db)
    return (sums, dw if need_weight else input.new_empty(_EMPTY), db if need_bias else input.new_empty(_EMPTY))


def _triton_backward_input(grad, input, stats, weight, bias, running_mean, running_var, sums, training, eps,
                           activation, param):
    check_triton_dtype(OP, input)
    params = (stats, _contig(running_mean), _contig(running_var), _contig(weight), _contig(bias), sums)
    code = resolve_activation(activation).code
    return _elementwise(lambda x, g, dx, geom: K.launch_backward_input(g, x, dx, geom, *params, training, eps, code,
                                                                       param), input, grad)


def _numpy_backward(grad, input, stats, weight, bias, running_mean, running_var, training, eps, activation, param,
                    need_input, need_sums, out=None):
    """(dx or None, sum dz, sum dz * x_hat) on the NumPy backend, each tensor converted once; dx is
    written into the array `out` if given."""
    kept = None
    if training:
        s = to_numpy(stats)
        kept = _kept_rows(stats, input, weight, bias, eps, activation, param)
        # (one count for all channels, as a float: the reference's per-channel steps are then cheaper;
        # the forward's rows hold x - mean already)
        mean = None if kept is not None else s[1] + s[2]
        invstd, count = s[4], float(s[0, 0]) if s.shape[1] else 0.0
    else:
        mean, invstd, count = to_numpy(running_mean), ref.invstd_from_var(to_numpy(running_var), eps), None
    dtype = _compute_dtype(input, activation)
    # (with the forward's rows, x is read for its shape only: no float64 copy)
    x = to_numpy(input, dtype if kept is None else _numpy_dtype(input))
    return ref.backward_local(to_numpy(grad, dtype), x, mean, invstd, _numpy_param(weight), _numpy_param(bias), count,
                              activation, param, need_input, need_sums, out, dtype, kept)


def _numpy_grad_params(s_dz, s_dzx, input, pdtype, need_weight, need_bias):
    """(grad_weight, grad_bias) from the per-channel sums (fresh float64 arrays, which a float64
    gradient takes over); unrequested ones empty."""
    viewed = _NUMPY_DTYPES.get(pdtype)
    if viewed is None:  # (float16/bfloat16 parameters)
        return (from_numpy(s_dzx, input, dtype=pdtype) if need_weight else input.new_empty(_EMPTY),
                from_numpy(s_dz, input, dtype=pdtype) if need_bias else input.new_empty(_EMPTY))
    return (torch.from_numpy(s_dzx.astype(viewed, copy=False)) if need_weight else input.new_empty(_EMPTY),
            torch.from_numpy(s_dz.astype(viewed, copy=False)) if need_bias else input.new_empty(_EMPTY))


@custom_op("tkernels::batch_norm_backward_reduce", mutates_args=())
def batch_norm_backward_reduce(grad: Tensor, input: Tensor, stats: Optional[Tensor], weight: Optional[Tensor],
                               bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                               training: bool, eps: float, activation: str, param: float, need_weight: bool,
                               need_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(sums (2, C) = (sum dz, sum dz * x_hat), grad_weight, grad_bias); unrequested grads are empty."""
    if _use_numpy(input):
        _, s_dz, s_dzx = _numpy_backward(grad, input, stats, weight, bias, running_mean, running_var, training, eps,
                                         activation, param, False, True)
        return (from_numpy(np.stack([s_dz, s_dzx]), input, dtype=_stats_dtype(input)),
                *_numpy_grad_params(s_dz, s_dzx, input, _param_dtype(input, weight, bias), need_weight, need_bias))
    return _triton_backward_reduce(grad, input, stats, weight, bias, running_mean, running_var, training, eps,
                                   activation, param, need_weight, need_bias)


@batch_norm_backward_reduce.register_fake
def _(grad, input, stats, weight, bias, running_mean, running_var, training, eps, activation, param, need_weight,
      need_bias):
    C, pdtype = input.shape[1], _param_dtype(input, weight, bias)
    return (input.new_empty((2, C), dtype=_stats_dtype(input)),
            input.new_empty((C,) if need_weight else _EMPTY, dtype=pdtype),
            input.new_empty((C,) if need_bias else _EMPTY, dtype=pdtype))


@custom_op("tkernels::batch_norm_backward_input", mutates_args=())
def batch_norm_backward_input(grad: Tensor, input: Tensor, stats: Optional[Tensor], weight: Optional[Tensor],
                              bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                              sums: Optional[Tensor], training: bool, eps: float, activation: str,
                              param: float) -> Tensor:
    """dx; in training `sums` (2, C) and the count in `stats` may cover several processes."""
    if _use_numpy(input):
        mean, invstd = _numpy_mean_invstd(stats, running_mean, running_var, training, eps)
        s = to_numpy(sums) if training else (None, None)
        count = to_numpy(stats)[0] if training else 1.0
        dx = ref.backward_input(to_numpy(grad), to_numpy(input), mean, invstd, to_numpy(weight), to_numpy(bias),
                                s[0], s[1], count, activation, param)
        return _like_input(dx, input)
    return _triton_backward_input(grad, input, stats, weight, bias, running_mean, running_var, sums, training, eps,
                                  activation, param)


@batch_norm_backward_input.register_fake
def _(grad, input, stats, weight, bias, running_mean, running_var, sums, training, eps, activation, param):
    return K.empty_like_dense(input)


@custom_op("tkernels::batch_norm_backward", mutates_args=())
def batch_norm_backward(grad: Tensor, input: Tensor, stats: Optional[Tensor], weight: Optional[Tensor],
                        bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        training: bool, eps: float, activation: str, param: float, need_input: bool,
                        need_weight: bool, need_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, grad_weight, grad_bias) of one process, unrequested ones empty: batch_norm_backward_reduce
    then batch_norm_backward_input in one op. The NumPy backend converts each tensor once and
    computes x - mean and dz once; the Triton backend runs the same two kernels as the two ops."""
    pdtype = _param_dtype(input, weight, bias)
    if _use_numpy(input):
        # a contiguous float32/float64 dx is written by the last pass of the reference, not copied after it
        dx_out = _empty_output(input) if need_input else None
        dx, s_dz, s_dzx = _numpy_backward(grad, input, stats, weight, bias, running_mean, running_var, training, eps,
                                          activation, param, need_input, need_weight or need_bias, dx_out)
        if not need_input:
            dx = input.new_empty(_EMPTY)
        else:
            dx = torch.from_numpy(dx_out) if dx_out is not None else _like_input(dx, input)
        return dx, *_numpy_grad_params(s_dz, s_dzx, input, pdtype, need_weight, need_bias)
    sums, dw, db = None, input.new_empty(_EMPTY), input.new_empty(_EMPTY)
    if need_weight or need_bias or (need_input and training):
        sums, dw, db = _triton_backward_reduce(grad, input, stats, weight, bias, running_mean, running_var, training,
                                               eps, activation, param, need_weight, need_bias)
    dx = input.new_empty(_EMPTY)
    if need_input:
        dx = _triton_backward_input(grad, input, stats, weight, bias, running_mean, running_var,
                                    sums if training else None, training, eps, activation, param)
    return dx, dw, db


@batch_norm_backward.register_fake
def _(grad, input, stats, weight, bias, running_mean, running_var, training, eps, activation, param, need_input,
      need_weight, need_bias):
    C, pdtype = input.shape[1], _param_dtype(input, weight, bias)
    return (K.empty_like_dense(input) if need_input else input.new_empty(_EMPTY),
            input.new_empty((C,) if need_weight else _EMPTY, dtype=pdtype),
            input.new_empty((C,) if need_bias else _EMPTY, dtype=pdtype))


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------
def backward(ctx, grad: Tensor, input, weight, bias, stats, running_mean, running_var, reduce_hook=None):
    """Shared by BatchNorm and SyncBatchNorm: `reduce_hook(sums)` all-reduces the two dx terms
    (between the two backward ops); without it one op does the whole backward."""
    training, eps, activation, param = ctx.bn_config
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_w, need_b = need_w and weight is not None, need_b and bias is not None
    if reduce_hook is None or not (need_x and training):
        dx, dw, db = batch_norm_backward(grad, input, stats, weight, bias, running_mean, running_var, training, eps,
                                         activation, param, need_x, need_w, need_b)
        return (dx if need_x else None), (dw if need_w else None), (db if need_b else None)
    sums, dw, db = batch_norm_backward_reduce(
        grad, input, stats, weight, bias, running_mean, running_var, training, eps, activation, param, need_w, need_b)
    dx = batch_norm_backward_input(grad, input, stats, weight, bias, running_mean, running_var, reduce_hook(sums),
                                   training, eps, activation, param)
    return dx, (dw if need_w else None), (db if need_b else None)


class BatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], training: bool, momentum: float, eps: float, activation: str,
                param: float):
        stats = None
        # (the NumPy backend takes the one-op forward at any size: one conversion of x, x - mean once)
        if training and (K.single_launch_fits(input.shape) or _use_numpy(input)):
            # stats are for backward: none runs when no input needs a gradient (as under torch.no_grad())
            need_stats = any(ctx.needs_input_grad[:3])
            y, stats = batch_norm_train.in_forward(input, weight, bias, running_mean, running_var, momentum, eps,
                                                   activation, param, need_stats)
        else:
            if training:
                stats = batch_norm_stats.in_forward(input, running_mean, running_var, momentum, eps)
            y = batch_norm_apply.in_forward(input, stats, weight, bias, running_mean, running_var, training, eps,
                                            activation, param)
        if training:
            running_mean = running_var = None  # normalisation used the batch stats; nothing else to keep
        ctx.save_for_backward(input, weight, bias, stats, running_mean, running_var)
        ctx.bn_config = (training, eps, activation, param)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        dx, dw, db = backward(ctx, grad, *ctx.saved_tensors)
        return dx, dw, db, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------
_MIXED_OK = (torch.float16, torch.bfloat16)


def _common_case(input, running_mean, running_var, weight, bias, training, momentum, eps) -> bool:
    """Whether a call passes every check of :func:`validate`, read in a few attribute reads for the
    commonest form: floating (N, C, ...) input; running stats both given or both None (and given in
    eval); every given parameter and running stat a (C,) tensor on input's device, all of one dtype
    (input's, or float32 for a half input); float momentum and eps; in training, more than one
    value per channel. False sends the call through the full checks (and their errors)."""
    if not (isinstance(input, Tensor) and input.dim() >= 2 and input.dtype in FLOAT_DTYPES
            and type(momentum) is float and type(eps) is float and (running_mean is None) == (running_var is None)
            and (running_mean is not None or training)):
        return False
    shape, on_cpu = input.shape[1:2], input.is_cpu
    device = None if on_cpu else input.device
    dtype = None
    for t in (running_mean, running_var, weight, bias):
        if t is None:
            continue
        # (two CPU tensors share the device: is_cpu is cheaper than building t.device)
        if not (isinstance(t, Tensor) and t.shape == shape and (dtype is None or t.dtype == dtype)
                and (t.is_cpu if on_cpu else t.device == device)):
            return False
        dtype = t.dtype
    if dtype is not None and dtype != input.dtype and not (dtype == torch.float32 and input.dtype in _MIXED_OK):
        return False
    return not training or input.numel() != shape[0]  # (one value per channel: the full check raises)


def validate(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], weight: Optional[Tensor],
             bias: Optional[Tensor], training: bool, momentum, eps, *, single_value_ok: bool = False) -> None:
    """Every check torch makes, raised with torch's exception types before anything runs.
    ``single_value_ok``: a synchronised batch norm may see one value per channel per process."""
    if _common_case(input, running_mean, running_var, weight, bias, training, momentum, eps):
        return
    check_floating(OP, "input", input)
    if input.dim() < 2:
        raise RuntimeError(f"{OP}: input must have at least 2 dimensions (N, C, *), but got shape {tuple(input.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{OP}: running_mean and running_var must either both be None or neither be None, "
                         f"but got running_mean={'None' if running_mean is None else 'a tensor'} and "
                         f"running_var={'None' if running_var is None else 'a tensor'}")
    if not training and running_mean is None:
        raise RuntimeError(f"{OP}: running_mean and running_var must be defined in evaluation mode (training=False)")
    for name, value in (("momentum", momentum), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{OP}: {name} must be a float, not {type(value).__name__}")
    C = input.shape[1]
    params = {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias}
    for name, t in params.items():
        if t is None:
            continue
        check_floating(OP, name, t)
        if t.numel() != C:
            raise RuntimeError(f"{OP}: {name} should contain {C} elements (one per channel of input "
                               f"{tuple(input.shape)}), not {t.numel()}")
        if t.device != input.device:
            raise RuntimeError(f"{OP}: expected {name} on the device of input ({input.device}), "
                               f"but it is on {t.device}")
    for name in ("running_mean", "running_var"):
        if params[name] is not None and params[name].dim() != 1:
            raise RuntimeError(f"{OP}: {name} must be 1-D of size {C}, but got shape {tuple(params[name].shape)}")
    dtypes = {t.dtype for t in params.values() if t is not None}
    if dtypes:
        dtype = next(iter(dtypes))
        if len(dtypes) > 1 or not (dtype == input.dtype or (dtype == torch.float32 and input.dtype in _MIXED_OK)):
            given = ", ".join(f"{n}={t.dtype}" for n, t in params.items() if t is not None)
            raise RuntimeError(f"{OP}: weight, bias, running_mean and running_var must all have the input's dtype "
                               f"({input.dtype}), or all be float32 for a float16/bfloat16 input; got {given}")
    if training and not single_value_ok:
        if input.shape[0] * math.prod(input.shape[2:]) == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, activation: ActivationLike = None) -> Tensor:
    """``torch.nn.functional.batch_norm`` with an optional fused activation applied after the affine step.

    In training the batch statistics normalise the input and, when running stats are given, they
    are updated in place (unbiased variance into running_var); in eval the running stats are used.
    """
    validate(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return batch_norm_validated(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                activation=activation)


def batch_norm_validated(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         weight: Optional[Tensor], bias: Optional[Tensor], training: bool, momentum: float,
                         eps: float, *, activation: ActivationLike = None) -> Tensor:
    """:func:`batch_norm` for arguments that passed :func:`validate` (the modules validate first, before
    num_batches_tracked moves, and should not pay for the checks twice)."""
    act = resolve_activation(activation)
    C = input.shape[1]
    weight = weight.reshape(C) if weight is not None and weight.dim() != 1 else weight
    bias = bias.reshape(C) if bias is not None and bias.dim() != 1 else bias
    if training and _numpy_forward_only(input, weight, bias):
        return _numpy_forward_only_train(input, weight, bias, running_mean, running_var, float(momentum), float(eps),
                                         act.name, float(act.param))
    return run_function(BatchNormFunction, input, weight, bias, running_mean, running_var, bool(training),
                        float(momentum), float(eps), act.name, float(act.param))


_grad_enabled = torch.is_grad_enabled
_increment_version = torch.autograd.graph.increment_version


def _numpy_forward_only(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    """Whether a training call is a plain eager one (ops/_dispatch.py: no tracing, no dispatch mode) on
    the NumPy backend that needs no gradient: its forward then runs without the autograd.Function and
    the custom op around it, whose fixed costs small inputs notice (the op would run the same code)."""
    if _grad_enabled() and (input.requires_grad or (weight is not None and weight.requires_grad)
                            or (bias is not None and bias.requires_grad)):
        return False
    return eager_device((input,)) == "cpu" and _use_numpy(input)


def _numpy_forward_only_train(input, weight, bias, running_mean, running_var, momentum, eps, activation, param):
    """batch_norm_train without stats, as its eager call would run it (running stats' versions bumped)."""
    y, _ = _numpy_train(input, weight, bias, running_mean, running_var, momentum, eps, activation, param, False)
    if running_mean is not None:
        _increment_version(running_mean)
        _increment_version(running_var)
    return y
