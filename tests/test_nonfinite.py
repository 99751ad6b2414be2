"""NaN and Inf in the data, for every op family: outputs, gradients and running buffers follow
torch's, NaN for NaN and Inf for Inf at the same positions, on both backends."""
import pytest
import torch
import torch.nn.functional as TF

import tkernels.functional as F
from helpers import device_for, tolerance

NONFINITE = {"nan": (float("nan"),), "inf": (float("inf"),), "-inf": (float("-inf"),),
             "mixed": (float("nan"), float("inf"), float("-inf"))}


def _poisoned(shape, kind, dev, seed=0):
    """Random data with a few non-finite values at fixed, spread-out positions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    flat = x.view(-1)
    values = NONFINITE[kind]
    for i, position in enumerate(range(1, flat.numel(), max(2, flat.numel() // 5))):
        flat[position] = values[i % len(values)]
    return x.to(dev)


def assert_same_nonfinite(actual, expected, *, reduction=1, msg=""):
    """Same shape, NaN exactly where torch has NaN, the same infinities, finite values close."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert actual.shape == expected.shape, msg
    nan_a, nan_e = actual.isnan(), expected.isnan()
    assert torch.equal(nan_a, nan_e), (f"{msg}: NaN at {nan_a.sum().item()} positions, torch at "
                                       f"{nan_e.sum().item()}; differing at {(nan_a != nan_e).nonzero()[:5].tolist()}")
    inf_a, inf_e = actual.isinf(), expected.isinf()
    assert torch.equal(inf_a, inf_e) and torch.equal(actual[inf_a], expected[inf_e]), f"{msg}: infinities differ"
    finite = expected[expected.isfinite()]
    tol = tolerance(torch.float32, float(finite.abs().max()) if finite.numel() else 0.0, reduction)
    torch.testing.assert_close(actual, expected, rtol=tol.rtol, atol=tol.atol, equal_nan=True,
                               msg=lambda m: f"{m}\n{msg}")


def _compare(ours_fn, torch_fn, inputs, *, reduction=1, grad_seed=1):
    """Run both on clones of `inputs` (a list of tensors; those that are floating get gradients)."""
    results = []
    for fn in (ours_fn, torch_fn):
        leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = fn(*leaves)
        g = torch.Generator().manual_seed(grad_seed)
        upstream = torch.randn(out.shape, generator=g).to(out.device)
        wrt = [t for t in leaves if t.requires_grad]
        results.append((out, torch.autograd.grad(out, wrt, upstream)))
    (out_k, grads_k), (out_t, grads_t) = results
    assert_same_nonfinite(out_k, out_t, reduction=reduction, msg="output")
    for i, (a, b) in enumerate(zip(grads_k, grads_t)):
        assert_same_nonfinite(a, b, reduction=reduction, msg=f"gradient of input {i}")


def _elementwise(fn):
    """torch's scalar path, one element at a time: its vectorised CPU kernels give gelu(+inf) = NaN
    where its scalar path (and its CUDA kernel) give +inf."""
    return lambda x: torch.stack([fn(v) for v in x.reshape(-1)]).reshape(x.shape)


@pytest.mark.parametrize("kind", NONFINITE)
def test_linear(backend, kind):
    dev = device_for(backend)
    x, w, b = _poisoned((6, 9), kind, dev), torch.randn(5, 9, device=dev), torch.randn(5, device=dev)
    for act in (None, "relu", "gelu", "tanh"):
        torch_act = {None: lambda z: z, "relu": torch.relu, "gelu": _elementwise(TF.gelu), "tanh": torch.tanh}[act]
        _compare(lambda x, w, b: F.linear(x, w, b, activation=act), lambda x, w, b: torch_act(TF.linear(x, w, b)),
                 [x, w, b], reduction=9)
    # a non-finite weight as well
    _compare(F.linear, TF.linear, [torch.randn(4, 9, device=dev), _poisoned((5, 9), kind, dev), b], reduction=9)


@pytest.mark.parametrize("kind", NONFINITE)
def test_conv2d(backend, kind):
    dev = device_for(backend)
    x, w, b = _poisoned((2, 3, 7, 6), kind, dev), torch.randn(4, 3, 3, 3, device=dev), torch.randn(4, device=dev)
    _compare(lambda x, w, b: F.conv2d(x, w, b, padding=1), lambda x, w, b: TF.conv2d(x, w, b, padding=1),
             [x, w, b], reduction=27)
    _compare(lambda x, w: F.conv2d(x, w, stride=2, groups=3), lambda x, w: TF.conv2d(x, w, stride=2, groups=3),
             [x, torch.randn(3, 1, 3, 3, device=dev)], reduction=9)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", NONFINITE)
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (7, 3)], ids=["2d", "1d"])
def test_batch_norm_outputs_gradients_and_running_stats(backend, kind, training, shape):
    dev = device_for(backend)
    x = _poisoned(shape, kind, dev)
    C = shape[1]
    w, b = torch.rand(C, device=dev) + 0.5, torch.randn(C, device=dev)
    buffers = {}
    for who in ("ours", "torch"):
        buffers[who] = (torch.randn(C, device=dev).abs(), torch.rand(C, device=dev) + 0.5)
        buffers[who][0].copy_(buffers["ours"][0]), buffers[who][1].copy_(buffers["ours"][1])
    _compare(lambda x, w, b: F.batch_norm(x, *buffers["ours"], w, b, training=training),
             lambda x, w, b: TF.batch_norm(x, *buffers["torch"], w, b, training=training), [x, w, b],
             reduction=x.numel() // C)
    for i, name in enumerate(("running_mean", "running_var")):
        assert_same_nonfinite(buffers["ours"][i], buffers["torch"][i], msg=name)
    if training:
        assert buffers["torch"][0].isfinite().logical_not().any(), "the case does not poison torch's running stats"


@pytest.mark.parametrize("kind", NONFINITE)
def test_batch_norm_nonfinite_running_stats_in_eval(backend, kind):
    dev = device_for(backend)
    x = torch.randn(3, 4, 2, 2, device=dev)
    rm, rv = torch.randn(4, device=dev), torch.rand(4, device=dev) + 0.5
    rm[1] = NONFINITE[kind][0]
    rv[2] = NONFINITE[kind][-1] if kind != "-inf" else float("inf")
    _compare(lambda x: F.batch_norm(x, rm, rv), lambda x: TF.batch_norm(x, rm, rv), [x])


@pytest.mark.parametrize("kind", NONFINITE)
def test_pooling(backend, kind):
    dev = device_for(backend)
    x = _poisoned((2, 3, 7, 7), kind, dev)
    _compare(lambda x: F.max_pool2d(x, 3, 2, 1), lambda x: TF.max_pool2d(x, 3, 2, 1), [x])
    _compare(lambda x: F.avg_pool2d(x, 2), lambda x: TF.avg_pool2d(x, 2), [x])
    _compare(lambda x: F.adaptive_avg_pool2d(x, 3), lambda x: TF.adaptive_avg_pool2d(x, 3), [x])


@pytest.mark.parametrize("kind", NONFINITE)
@pytest.mark.parametrize("dim", [1, 0])
def test_softmax_and_log_softmax(backend, kind, dim):
    dev = device_for(backend)
    x = _poisoned((5, 11), kind, dev)
    x[3] = float("-inf")  # a row that is all -inf: NaN in torch
    _compare(lambda x: F.softmax(x, dim), lambda x: TF.softmax(x, dim), [x])
    _compare(lambda x: F.log_softmax(x, dim), lambda x: TF.log_softmax(x, dim), [x])


@pytest.mark.parametrize("reduction", ["mean", "none", "sum"])
@pytest.mark.parametrize("kind", NONFINITE)
def test_cross_entropy(backend, kind, reduction):
    dev = device_for(backend)
    x = _poisoned((6, 7), kind, dev)
    target = torch.tensor([0, 1, 2, 3, 4, 5], device=dev)
    _compare(lambda x: F.cross_entropy(x, target, reduction=reduction),
             lambda x: TF.cross_entropy(x, target, reduction=reduction), [x])
    _compare(lambda x: F.cross_entropy(x, target, label_smoothing=0.1, reduction=reduction),
             lambda x: TF.cross_entropy(x, target, label_smoothing=0.1, reduction=reduction), [x])
    probabilities = torch.softmax(torch.randn(6, 7), 1).to(dev)
    _compare(lambda x: F.cross_entropy(x, probabilities, reduction=reduction),
             lambda x: TF.cross_entropy(x, probabilities, reduction=reduction), [x])


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("kind", NONFINITE)
def test_mse_loss(backend, kind, reduction):
    dev = device_for(backend)
    x, y = _poisoned((4, 9), kind, dev), _poisoned((4, 9), kind, dev, seed=3)
    _compare(lambda x, y: F.mse_loss(x, y, reduction=reduction), lambda x, y: TF.mse_loss(x, y, reduction=reduction),
             [x, y])


ACTIVATIONS = {"relu": (F.relu, TF.relu), "leaky_relu": (F.leaky_relu, TF.leaky_relu), "gelu": (F.gelu, TF.gelu),
               "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), lambda x: TF.gelu(x, approximate="tanh")),
               "silu": (F.silu, TF.silu), "sigmoid": (F.sigmoid, torch.sigmoid), "tanh": (F.tanh, torch.tanh)}


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("kind", NONFINITE)
def test_activations(backend, kind, name):
    dev = device_for(backend)
    ours, theirs = ACTIVATIONS[name]
    _compare(ours, _elementwise(theirs), [_poisoned((3, 17), kind, dev)])


@pytest.mark.parametrize("kind", NONFINITE)
def test_dropout(backend, kind):
    """Masks differ from torch's (another generator), so the rule is checked against torch on both:
    torch multiplies by the mask, so a dropped NaN stays NaN and a dropped Inf becomes NaN (0 * inf)."""
    dev = device_for(backend)
    x = _poisoned((8, 64), kind, dev)
    for dropout in (F.dropout, TF.dropout):
        leaf = x.clone().requires_grad_()
        y = dropout(leaf, 0.5, True)
        y.backward(torch.ones_like(y))
        kept = leaf.grad != 0
        assert 0 < kept.sum() < kept.numel()
        expected = torch.where(kept, x * 2, x * 0)
        assert_same_nonfinite(y, expected, msg=f"{dropout.__module__} dropout output")
        assert_same_nonfinite(leaf.grad, kept * 2.0, msg=f"{dropout.__module__} dropout gradient")
