"""The NumPy backend is as quiet as torch: NaN, Inf and empty inputs raise no RuntimeWarning
("invalid value encountered in subtract", "divide by zero", "overflow", "Mean of empty slice")
from any op family, forward or backward, and give torch's values.

Every case runs with all warnings turned into errors. Forward outputs are compared with torch on
the same input (NaN where torch has NaN, inf where torch has inf), so a silenced warning that hid
a wrong value would still fail; gradients are checked for silence and shape only, because torch's
gradients at NaN differ in places that have nothing to do with warnings (relu passes the gradient
through a NaN input; cross-entropy's ignored rows turn NaN when their logits are NaN).
"""
import warnings

import pytest
import torch
import torch.nn.functional as TF

import tkernels
import tkernels.functional as F

NAN, INF = float("nan"), float("inf")


def _special(shape, kind):
    """A float64 input of `shape` holding `kind` values among ordinary ones ('empty': a zero batch)."""
    if kind == "empty":
        return torch.randn((0,) + tuple(shape[1:]), dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64)
    flat = x.view(-1)
    if kind == "nan":
        flat[::3] = NAN
    elif kind == "inf":
        flat[::3] = INF
        flat[1::5] = -INF
    elif kind == "all_nan":
        flat[:] = NAN
    elif kind == "all_inf":
        flat[:] = INF
    elif kind == "huge":  # exp() and squares overflow float64
        flat[::2] = 1e300
        flat[1::2] = -1e300
    return x


KINDS = ("nan", "inf", "all_nan", "all_inf", "huge", "empty")


def _run(fn, *inputs):
    """(output, gradients of the inputs) of fn, for the gradient sum(out * 1)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    total = sum((o * torch.ones_like(o)).sum() for o in outs if o.requires_grad)
    grads = torch.autograd.grad(total, leaves, allow_unused=True) if torch.is_tensor(total) else [None] * len(leaves)
    return outs, grads


def _check_silent_and_like_torch(ours, theirs, *inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning from NumPy fails the test here
        with tkernels.use_backend("numpy"):
            got, got_grads = _run(ours, *inputs)
    want, want_grads = _run(theirs, *inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-9, atol=1e-9)
    for a, b in zip(got_grads, want_grads):
        assert (a is None) == (b is None)
        assert a is None or (a.shape == b.shape and a.dtype == b.dtype)


# (name, ours, torch's, input shape); each gets one input from _special
UNARY = [
    ("relu", F.relu, TF.relu, (4, 6)),
    ("leaky_relu", lambda x: F.leaky_relu(x, 0.1), lambda x: TF.leaky_relu(x, 0.1), (4, 6)),
    ("gelu", F.gelu, TF.gelu, (4, 6)),
    ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), lambda x: TF.gelu(x, approximate="tanh"), (4, 6)),
    ("silu", F.silu, TF.silu, (4, 6)),
    ("sigmoid", F.sigmoid, torch.sigmoid, (4, 6)),
    ("tanh", F.tanh, torch.tanh, (4, 6)),
    ("softmax", lambda x: F.softmax(x, dim=1), lambda x: TF.softmax(x, dim=1), (4, 6)),
    ("log_softmax", lambda x: F.log_softmax(x, dim=1), lambda x: TF.log_softmax(x, dim=1), (4, 6)),
    ("max_pool2d", lambda x: F.max_pool2d(x, 2), lambda x: TF.max_pool2d(x, 2), (2, 3, 6, 6)),
    ("avg_pool2d", lambda x: F.avg_pool2d(x, 3, 2, 1), lambda x: TF.avg_pool2d(x, 3, 2, 1), (2, 3, 6, 6)),
    ("adaptive_avg_pool2d", lambda x: F.adaptive_avg_pool2d(x, (2, 3)),
     lambda x: TF.adaptive_avg_pool2d(x, (2, 3)), (2, 3, 5, 7)),
    ("batch_norm_train", lambda x: F.batch_norm(x, None, None, training=True),
     lambda x: TF.batch_norm(x, None, None, training=True), (4, 3, 2, 2)),
    ("batch_norm_1d_train", lambda x: F.batch_norm(x, None, None, training=True),
     lambda x: TF.batch_norm(x, None, None, training=True), (8, 5)),
    ("dropout_p0", lambda x: F.dropout(x, 0.0), lambda x: TF.dropout(x, 0.0), (4, 6)),
    ("dropout_p1", lambda x: F.dropout(x, 1.0), lambda x: TF.dropout(x, 1.0), (4, 6)),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,ours,theirs,shape", UNARY, ids=[u[0] for u in UNARY])
def test_unary_ops_are_silent(name, ours, theirs, shape, kind):
    _check_silent_and_like_torch(ours, theirs, _special(shape, kind))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_with_running_stats_and_affine_is_silent(kind, training):
    """(The running statistics after a non-finite batch are another question, left to test_batch_norm.)"""
    x = _special((4, 3, 2, 2), kind)
    weight, bias = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    stats = {name: (torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5)
             for name in ("ours", "torch")}
    stats["torch"] = tuple(t.clone() for t in stats["ours"])

    def run(fn, rm, rv):
        return lambda x, w, b: fn(x, rm, rv, w, b, training=training)

    _check_silent_and_like_torch(run(lambda *a, **k: F.batch_norm(*a, **k, activation="relu"), *stats["ours"]),
                                 run(lambda *a, **k: TF.relu(TF.batch_norm(*a, **k)), *stats["torch"]),
                                 x, weight, bias)


@pytest.mark.parametrize("kind", KINDS)
def test_linear_and_conv2d_are_silent(kind):
    x = _special((2, 3, 5, 5), kind)
    w, b = torch.randn(4, 3, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    _check_silent_and_like_torch(lambda x, w, b: F.conv2d(x, w, b, padding=1, activation="gelu"),
                                 lambda x, w, b: TF.gelu(TF.conv2d(x, w, b, padding=1)), x, w, b)
    x, w = _special((4, 6), kind), _special((5, 6), "huge" if kind == "huge" else "nan")
    _check_silent_and_like_torch(lambda x, w: F.linear(x, w, activation="sigmoid"),
                                 lambda x, w: torch.sigmoid(TF.linear(x, w)), x, w)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"weight": "w"}, {"ignore_index": 1}],
                         ids=["plain", "smoothing", "weight", "ignore"])
def test_cross_entropy_is_silent(kind, reduction, options):
    x = _special((5, 4), kind)
    target = torch.tensor([0, 1, 2, 3, 1][:x.shape[0]], dtype=torch.long)
    options = {k: torch.rand(4, dtype=torch.float64) if v == "w" else v for k, v in options.items()}
    _check_silent_and_like_torch(lambda x: F.cross_entropy(x, target, reduction=reduction, **options),
                                 lambda x: TF.cross_entropy(x, target, reduction=reduction, **options), x)
    probabilities = torch.softmax(torch.randn(x.shape, dtype=torch.float64), dim=1)
    _check_silent_and_like_torch(lambda x, p: F.cross_entropy(x, p, reduction=reduction),
                                 lambda x, p: TF.cross_entropy(x, p, reduction=reduction), x, probabilities)


def test_cross_entropy_all_targets_ignored_is_silent():
    """'mean' over zero counted rows is 0/0: NaN in torch, without a warning."""
    x, target = torch.randn(3, 4, dtype=torch.float64), torch.full((3,), -100)
    _check_silent_and_like_torch(lambda x: F.cross_entropy(x, target), lambda x: TF.cross_entropy(x, target), x)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss_is_silent(kind, reduction):
    x = _special((4, 6), kind)
    y = torch.randn(x.shape, dtype=torch.float64)
    _check_silent_and_like_torch(lambda x, y: F.mse_loss(x, y, reduction=reduction),
                                 lambda x, y: TF.mse_loss(x, y, reduction=reduction), x, y)


@pytest.mark.parametrize("kind", ["nan", "inf", "huge"])
@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
def test_optimizers_are_silent(kind, optimizer):
    params = {}
    for side in ("ours", "torch"):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        p.grad = _special((3, 4), kind)
        params[side] = p
    params["torch"].grad = params["ours"].grad.clone()
    params["torch"].data.copy_(params["ours"].data)
    kwargs = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01} if optimizer == "SGD" else {"lr": 0.1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with tkernels.use_backend("numpy"):
            ours = getattr(tkernels.optim, optimizer)([params["ours"]], **kwargs)
            ours.step()
            ours.step()
    theirs = getattr(torch.optim, optimizer)([params["torch"]], **kwargs)
    theirs.step()
    theirs.step()
    torch.testing.assert_close(params["ours"].data, params["torch"].data, equal_nan=True)
