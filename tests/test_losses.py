"""cross_entropy and mse_loss: every reduction and option against the float64 reference and torch,
all gradients, layouts, the chunked path, empty batches, errors, modules, opcheck and torch.compile."""
import inspect

import numpy as np
import pytest
import torch

import tkernels
import tkernels.functional as F
from tkernels.ops import softmax as softmax_ops
from tkernels.reference import losses as ref
from helpers import LAUNCHES, expect_kernels, assert_close, canary, device_for, skip_unsupported, to_numpy64

REDUCTIONS = ("none", "mean", "sum")


def _t(a):
    """A reference result as a float64 tensor, keeping 0-d shapes."""
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def _index_target(x, ignore_index=-100, n_ignored=1):
    C = x.shape[1] if x.dim() > 1 else x.shape[0]
    shape = (x.shape[0],) + tuple(x.shape[2:]) if x.dim() > 1 else ()
    t = torch.randint(0, C, shape, device=x.device)
    if t.dim():
        t.view(-1)[:n_ignored] = ignore_index
    return t


def _check_ce(x, target, dtype=None, **kw):
    """Loss and gradients (input, and probability targets) against the reference and torch (float64)."""
    dtype = dtype or x.dtype
    prob = target.is_floating_point()
    x = x.detach().requires_grad_()
    target = target.detach().requires_grad_() if prob else target
    C = x.shape[1] if x.dim() > 1 else x.shape[0]
    loss = F.cross_entropy(x, target, **kw)
    reduction = kw.get("reduction", "mean")
    n = max(1, x.numel() // C) if reduction != "none" else 1
    weight = kw.get("weight")
    args = (to_numpy64(x), to_numpy64(target) if prob else target.cpu().numpy(), to_numpy64(weight),
            kw.get("ignore_index", -100), reduction, kw.get("label_smoothing", 0.0))
    assert_close(loss, _t(ref.cross_entropy(*args)), dtype=dtype, reduction=C * n)
    torch_kw = dict(kw, weight=None if weight is None else weight.double())
    xd = x.detach().double().requires_grad_()
    td = target.detach().double().requires_grad_() if prob else target
    expected = torch.nn.functional.cross_entropy(xd, td, **torch_kw)
    assert_close(loss, expected, dtype=dtype, reduction=C * n)
    g = torch.randn_like(loss)
    inputs = (x, target) if prob else (x,)
    grads = torch.autograd.grad(loss, inputs, g)
    ref_dx, ref_dt = ref.cross_entropy_backward(to_numpy64(g), *args)
    torch_grads = torch.autograd.grad(expected, (xd, td) if prob else (xd,), g.double())
    assert_close(grads[0], _t(ref_dx), dtype=dtype, reduction=C)
    assert_close(grads[0], torch_grads[0], dtype=dtype, reduction=C)
    if prob:
        assert_close(grads[1], _t(ref_dt), dtype=dtype, reduction=C)
        assert_close(grads[1], torch_grads[1], dtype=dtype, reduction=C)
    if x.numel():
        # a reduced loss over one forward program is finished by that program itself
        finish = reduction != "none" and _forward_programs(x, target) > 1
        expect_kernels("cross_entropy_forward_kernel", "cross_entropy_backward_kernel",
                       *(("loss_finish_kernel",) if finish else ()))
    return loss, grads


def _forward_programs(x, target) -> int:
    from tkernels.ops import losses as loss_ops
    if x.dim() == 1:
        x, target = x.unsqueeze(0), target.unsqueeze(0)
    plan = loss_ops._ce_plan(x, target) or loss_ops._ce_plan(x.contiguous(), target.contiguous())
    return plan.grid[0]


def _strided_indices(t):
    """Class indices as a stride-2 view whose gaps hold an invalid class (an overread would show)."""
    buffer = torch.full((*t.shape[:-1], 2 * t.shape[-1]), 10**6, dtype=t.dtype, device=t.device)
    view = buffer[..., ::2]
    view.copy_(t)
    return view


# ---------------------------------------------------------------------------------------------
# cross_entropy
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("smoothing", [0.0, 0.15])
def test_class_indices_with_ignore_index(backend, reduction, weighted, smoothing):
    dev = device_for(backend)
    x = torch.randn(9, 17, device=dev) * 3
    t = _index_target(x, n_ignored=2)
    w = torch.rand(17, device=dev) + 0.1 if weighted else None
    _check_ce(x, t, weight=w, reduction=reduction, label_smoothing=smoothing)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("rows", [1, 3, 33, 129])
def test_reduced_loss_in_one_launch_or_with_the_finish_kernel(reduction, rows):
    """Up to one tile of rows, the forward program writes the reduced loss and divisor itself (one
    launch); more rows take per-program partials and loss_finish_kernel. Both against float64."""
    x = torch.randn(rows, 7, device=device_for("triton")) * 3
    t = _index_target(x, n_ignored=min(rows - 1, 2))
    w = torch.rand(7, device=x.device) + 0.1
    with tkernels.use_backend("triton"):
        _, grads = _check_ce(x, t, weight=w, reduction=reduction, label_smoothing=0.1)
    programs = _forward_programs(x, t)
    assert (programs == 1) == (rows <= 32), programs
    assert ("loss_finish_kernel" in LAUNCHES[0].names) == (programs > 1)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_custom_ignore_index_and_uint8_targets(backend, reduction):
    dev = device_for(backend)
    x = torch.randn(7, 5, device=dev)
    t = torch.tensor([0, 3, 4, 3, 1, 2, 3], device=dev)  # class 3 is ignored
    _check_ce(x, t, ignore_index=3, reduction=reduction, weight=torch.rand(5, device=dev), label_smoothing=0.1)
    loss = F.cross_entropy(x, t.to(torch.uint8), reduction=reduction)
    assert_close(loss, torch.nn.functional.cross_entropy(x.double(), t.to(torch.uint8), reduction=reduction))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", ["plain", "weight+smoothing"])
def test_class_probabilities(backend, reduction, options):
    dev = device_for(backend)
    x = torch.randn(6, 13, device=dev) * 2
    q = torch.softmax(torch.randn(6, 13, device=dev) * 2, 1)
    kw = dict(weight=torch.rand(13, device=dev), label_smoothing=0.2) if options != "plain" else {}
    _check_ce(x, q, reduction=reduction, **kw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("targets", ["indices", "probabilities"])
def test_spatial_inputs(backend, reduction, targets):
    dev = device_for(backend)
    x = torch.randn(2, 5, 3, 4, device=dev) * 2
    t = _index_target(x, n_ignored=3) if targets == "indices" else torch.softmax(torch.randn_like(x), 1)
    _check_ce(x, t, reduction=reduction, weight=torch.rand(5, device=dev), label_smoothing=0.1)


@pytest.mark.parametrize("targets", ["indices", "probabilities"])
def test_unbatched_input(backend, targets):
    dev = device_for(backend)
    x = torch.randn(7, device=dev)
    t = torch.tensor(4, device=dev) if targets == "indices" else torch.softmax(torch.randn(7, device=dev), 0)
    for reduction in REDUCTIONS:
        loss, _ = _check_ce(x, t, reduction=reduction, label_smoothing=0.05)
        assert loss.shape == ()


@pytest.mark.parametrize("layout", ["canary", "channels_last", "transposed"])
def test_non_contiguous_inputs(backend, layout):
    dev = device_for(backend)
    base = torch.randn(3, 6, 4, 5, device=dev) * 2
    t = _index_target(base, n_ignored=2)
    if layout == "canary":
        x, t = canary(base), _strided_indices(t)
    elif layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    else:
        x, t = base.transpose(2, 3).contiguous().transpose(2, 3), t.transpose(1, 2).contiguous().transpose(1, 2)
    weight = canary(torch.rand(12, device=dev))[::2]  # a strided class-weight view too
    _check_ce(x, t, reduction="none", weight=weight, label_smoothing=0.1)
    q = torch.softmax(torch.randn(9, 11, device=dev), 1)
    _check_ce(canary(torch.randn(9, 11, device=dev)).t().contiguous().t(), canary(q), label_smoothing=0.1)


def test_many_classes_use_the_chunked_path(backend):
    dev = device_for(backend)
    C = softmax_ops.MAX_BLOCK_C + 5
    x = torch.randn(3, C, device=dev) * 3
    x[0, -3] = 40.0  # the max arrives in the last chunk
    t = torch.tensor([C - 1, 0, -100], device=dev)
    _check_ce(x, t, weight=torch.rand(C, device=dev), label_smoothing=0.1)
    _check_ce(x, torch.softmax(torch.randn(3, C, device=dev), 1), reduction="sum")


def test_chunked_path_with_strided_classes(backend, monkeypatch):
    monkeypatch.setattr(softmax_ops, "MAX_TILE", 64)
    monkeypatch.setattr(softmax_ops, "MAX_BLOCK_C", 16)
    monkeypatch.setattr(softmax_ops, "MAX_BLOCK_R", 4)
    dev = device_for(backend)
    x = torch.randn(2, 37, 5, device=dev) * 3
    _check_ce(x, _index_target(x, n_ignored=2), weight=torch.rand(37, device=dev), label_smoothing=0.2)
    _check_ce(x, torch.softmax(torch.randn_like(x), 1), reduction="none", label_smoothing=0.2)


@pytest.mark.parametrize("targets", ["indices", "probabilities"])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy in the interpreter: the mean's 0 / 0
def test_empty_batch(backend, targets):
    dev = device_for(backend)
    x = torch.randn(0, 5, device=dev, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long, device=dev) if targets == "indices" else torch.rand(0, 5, device=dev)
    mean = F.cross_entropy(x, t)
    assert mean.shape == () and torch.isnan(mean), "torch's mean over no targets is NaN"
    assert F.cross_entropy(x, t, reduction="sum").item() == 0.0
    none = F.cross_entropy(x, t, reduction="none")
    assert none.shape == (0,)
    (dx,) = torch.autograd.grad(F.cross_entropy(x, t, reduction="sum"), x)
    assert dx.shape == (0, 5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the mean's 0 / 0
def test_every_target_ignored(backend):
    dev = device_for(backend)
    x = torch.randn(3, 4, device=dev, requires_grad=True)
    t = torch.full((3,), -100, device=dev)
    for kw in ({}, {"weight": torch.rand(4, device=dev), "label_smoothing": 0.1}):
        loss = F.cross_entropy(x, t, **kw)
        assert torch.isnan(loss), "torch: 0 / 0"
        (dx,) = torch.autograd.grad(loss, x)
        assert torch.equal(dx, torch.zeros_like(dx)), "ignored rows get zero gradient, as in torch"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(backend, dtype):
    skip_unsupported(backend, dtype)
    dev = device_for(backend)
    x = (torch.randn(5, 33) * 2).to(dtype=dtype, device=dev)
    loss, _ = _check_ce(x, _index_target(x), weight=torch.rand(33, device=dev).to(dtype), label_smoothing=0.1,
                        dtype=dtype)
    assert loss.dtype == dtype


@pytest.mark.parametrize("smoothing", [-0.3, float("nan"), float("-inf"), -0.0], ids=["negative", "nan", "-inf", "-0"])
@pytest.mark.parametrize("target_kind", ["indices", "indices+weight", "probabilities"])
def test_negative_or_nan_label_smoothing_smooths_nothing_like_torch(backend, smoothing, target_kind):
    """torch smooths only when label_smoothing > 0 (and raises above 1): a negative or NaN value
    means no smoothing, with no error, on the fast path (plain class indices) and the full one."""
    dev = device_for(backend)
    x = torch.randn(4, 6, device=dev, requires_grad=True)
    prob = target_kind == "probabilities"
    t = torch.softmax(torch.randn(4, 6, device=dev), 1) if prob else _index_target(x)
    w = torch.rand(6, device=dev) + 0.5 if target_kind == "indices+weight" else None
    loss = F.cross_entropy(x, t, weight=w, label_smoothing=smoothing)
    xd = x.detach().double().requires_grad_()
    expected = torch.nn.functional.cross_entropy(xd, t.double() if prob else t,
                                                 weight=None if w is None else w.double(), label_smoothing=smoothing)
    unsmoothed = torch.nn.functional.cross_entropy(xd, t.double() if prob else t,
                                                   weight=None if w is None else w.double())
    assert torch.equal(expected, unsmoothed)  # torch's own behaviour, which this test pins
    g = torch.tensor(1.7, device=dev)
    assert_close(loss, expected, reduction=24)
    assert_close(torch.autograd.grad(loss, x, g)[0], torch.autograd.grad(expected, xd, g.double())[0], reduction=6)
    expect_kernels("cross_entropy_forward_kernel", "cross_entropy_backward_kernel")


@pytest.mark.parametrize("smoothing", [float("nan"), -0.5])
def test_the_ops_smooth_nothing_for_nan_or_negative_smoothing_on_both_backends(backend, smoothing):
    """The custom ops themselves (called directly, past the public checks) treat a smoothing that is
    not > 0 as none, on either backend, forward and backward."""
    dev = device_for(backend)
    x = torch.randn(4, 6, device=dev)
    t = _index_target(x)
    loss, stats = torch.ops.tkernels.cross_entropy(x, t, None, "mean", -100, smoothing)
    grad = torch.tensor(1.3, device=dev)
    dx, _ = torch.ops.tkernels.cross_entropy_backward(grad, x, t, None, stats, "mean", -100, smoothing, False, "")
    xd = x.double().requires_grad_()
    expected = torch.nn.functional.cross_entropy(xd, t)
    assert_close(loss, expected, reduction=6)
    assert_close(dx, torch.autograd.grad(expected, xd, grad.double())[0], reduction=6)
    expect_kernels("cross_entropy_forward_kernel", "cross_entropy_backward_kernel")


def test_legacy_size_average_and_reduce(backend):
    x = torch.randn(4, 6, device=device_for(backend))
    t = _index_target(x)
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        ours = F.cross_entropy(x, t, size_average=False)
    with pytest.warns(UserWarning):
        theirs = torch.nn.functional.cross_entropy(x.double(), t, size_average=False)
    assert_close(ours, theirs)


def test_reductions_are_deterministic():
    x = torch.randn(64, 37, device=device_for("triton"))
    t = _index_target(x, n_ignored=5)
    w = torch.rand(37, device=x.device)
    with tkernels.use_backend("triton"):
        runs = [F.cross_entropy(x, t, weight=w, label_smoothing=0.1) for _ in range(3)]
        runs += [F.mse_loss(x, x.flip(0)) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:3]), "the reduction order must be fixed"
    assert all(torch.equal(runs[3], r) for r in runs[4:]), "the reduction order must be fixed"


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("rows", [3, 33, 129])
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8])
def test_device_targets_are_checked_by_the_forward_kernel(monkeypatch, reduction, rows, dtype):
    """A target on the GPU is range-checked by the forward kernel (one program, or per-program counts
    added by loss_finish_kernel) and asserted with torch._assert_async, as torch's device-side
    assert: the target is declared device-resident here, so the path runs on CPU tensors, where the
    assert raises at once. No host check (no aminmax) runs."""
    from tkernels.ops import losses as loss_ops
    monkeypatch.setattr(loss_ops, "_target_on_host", lambda target: False)
    monkeypatch.setattr(loss_ops, "_check_host_target_range", None)  # must not be called
    x = torch.randn(rows, 7, device=device_for("triton"))
    t = torch.randint(0, 7, (rows,), device=x.device).to(dtype)
    ignore = 255 if dtype == torch.uint8 else -100
    t[0] = ignore
    with tkernels.use_backend("triton"):
        loss, stats = torch.ops.tkernels.cross_entropy(x, t, None, reduction, ignore, 0.0)
        expect_kernels("cross_entropy_forward_kernel",
                       *(("loss_finish_kernel",) if _forward_programs(x, t) > 1 else ()))
        assert float(stats[2 * rows + 1]) == 1.0
        expected = ref.cross_entropy(to_numpy64(x), t.cpu().numpy().astype(np.int64), None, ignore, reduction, 0.0)
        assert_close(loss, _t(expected), dtype=x.dtype, reduction=7)
        for position in (1, rows - 1):
            bad = t.clone()
            bad[position] = 7
            with pytest.raises(RuntimeError, match="a target is out of bounds"):
                F.cross_entropy(x, bad, ignore_index=ignore, reduction=reduction)
            if dtype == torch.int64:
                bad[position] = -1
                with pytest.raises(RuntimeError, match="a target is out of bounds"):
                    F.cross_entropy(x, bad, reduction=reduction)


def test_cross_entropy_errors(backend):
    dev = device_for(backend)
    x = torch.randn(2, 3, device=dev)
    with pytest.raises(IndexError, match="Target 5 is out of bounds"):
        F.cross_entropy(x, torch.tensor([0, 5], device=dev))
    with pytest.raises(IndexError, match="Target -1 is out of bounds"):
        F.cross_entropy(x, torch.tensor([-1, 1], device=dev), reduction="none")
    with pytest.raises(RuntimeError, match="int64.*uint8.*but got torch.int32"):
        F.cross_entropy(x, torch.tensor([0, 1], dtype=torch.int32, device=dev))
    with pytest.raises(ValueError, match=r"Expected input batch_size \(2\) to match target batch_size \(3\)"):
        F.cross_entropy(x, torch.tensor([0, 1, 2], device=dev))
    with pytest.raises(RuntimeError, match="size mismatch"):
        F.cross_entropy(torch.randn(2, 3, 4, device=dev), torch.zeros(2, 5, dtype=torch.long, device=dev))
    with pytest.raises(RuntimeError, match="all 3 classes"):
        F.cross_entropy(x, torch.tensor([0, 1], device=dev), weight=torch.ones(4, device=dev))
    with pytest.raises(RuntimeError, match="dtype"):
        F.cross_entropy(x, torch.tensor([0, 1], device=dev), weight=torch.ones(3, dtype=torch.float64, device=dev))
    with pytest.raises(RuntimeError, match="not supported"):
        F.cross_entropy(x, torch.tensor([0, 1], device=dev), weight=torch.ones(3, device=dev, requires_grad=True))
    with pytest.raises(ValueError, match="'avg' is not a valid value for reduction"):
        F.cross_entropy(x, torch.tensor([0, 1], device=dev), reduction="avg")
    for smoothing in (1.5, float("inf")):  # (torch: RuntimeError "label_smoothing must be between 0.0 and 1.0")
        with pytest.raises(RuntimeError, match="label_smoothing must be between 0.0 and 1.0"):
            F.cross_entropy(x, torch.tensor([0, 1], device=dev), label_smoothing=smoothing)
    with pytest.raises(RuntimeError, match="ignore_index=1 is not supported"):
        F.cross_entropy(x, torch.rand(2, 3, device=dev), ignore_index=1)
    with pytest.raises(RuntimeError, match="must be floating point"):
        F.cross_entropy(x, torch.ones(2, 3, dtype=torch.long, device=dev))
    with pytest.raises(NotImplementedError, match="floating-point"):
        F.cross_entropy(torch.ones(2, 3, dtype=torch.long, device=dev), torch.tensor([0, 1], device=dev))
    with pytest.raises(RuntimeError, match="0-d"):
        F.cross_entropy(torch.tensor(1.0, device=dev), torch.tensor(0, device=dev))


def test_triton_backend_refuses_float64():
    with tkernels.use_backend("triton"):
        x = torch.randn(2, 3, dtype=torch.float64, device=device_for("triton"))
        with pytest.raises(RuntimeError, match="float64 runs on the numpy backend"):
            F.cross_entropy(x, torch.tensor([0, 1], device=x.device))
        with pytest.raises(RuntimeError, match="float64 runs on the numpy backend"):
            F.mse_loss(x, x)


def test_cross_entropy_module(backend):
    dev = device_for(backend)
    w = torch.rand(5, device=dev)
    ours = tkernels.nn.CrossEntropyLoss(weight=w, ignore_index=2, reduction="sum", label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight=w.double(), ignore_index=2, reduction="sum", label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss) and repr(ours) == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {"weight"}
    x = torch.randn(6, 5, device=dev)
    t = torch.tensor([0, 2, 4, 1, 2, 3], device=dev)
    assert_close(ours(x, t), theirs(x.double(), t), reduction=30)


# ---------------------------------------------------------------------------------------------
# mse_loss
# ---------------------------------------------------------------------------------------------
def _check_mse(x, y, dtype=None, weight=None, reduction="mean"):
    dtype = dtype or x.dtype
    x, y = x.detach().requires_grad_(), y.detach().requires_grad_()
    wt = weight.detach().requires_grad_() if weight is not None else None
    kw = dict(reduction=reduction) if wt is None else dict(reduction=reduction, weight=wt)
    loss = F.mse_loss(x, y, **kw)
    n = max(1, torch.broadcast_shapes(x.shape, y.shape).numel()) if reduction != "none" else 1
    expected = ref.mse_loss(to_numpy64(x), to_numpy64(y), reduction, to_numpy64(wt))
    assert_close(loss, _t(expected), dtype=dtype, reduction=n)
    g = torch.randn_like(loss)
    inputs = (x, y) if wt is None else (x, y, wt)
    grads = torch.autograd.grad(loss, inputs, g)
    for got, want in zip(grads, ref.mse_loss_backward(to_numpy64(g), to_numpy64(x), to_numpy64(y), reduction,
                                                      to_numpy64(wt))):
        assert_close(got, _t(want), dtype=dtype, reduction=n)
    if wt is None or "weight" in inspect.signature(torch.nn.functional.mse_loss).parameters:
        doubles = [t.detach().double().requires_grad_() for t in inputs]
        twin = torch.nn.functional.mse_loss(doubles[0], doubles[1], **dict(kw, **(
            {"weight": doubles[2]} if wt is not None else {})))
        assert_close(loss, twin, dtype=dtype, reduction=n)
        for got, want in zip(grads, torch.autograd.grad(twin, doubles, g.double())):
            assert_close(got, want, dtype=dtype, reduction=n)
    if x.numel():
        expect_kernels("mse_forward_kernel", "mse_backward_kernel", *(("loss_finish_kernel",) if reduction != "none" else ()))
    return loss


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_same_shape_and_layouts(backend, reduction):
    dev = device_for(backend)
    x = torch.randn(3, 5, 7, 9, device=dev)
    y = torch.randn(3, 5, 7, 9, device=dev)
    _check_mse(x, y, reduction=reduction)
    _check_mse(canary(x), y.contiguous(memory_format=torch.channels_last), reduction=reduction)
    _check_mse(x.transpose(1, 3), canary(y.transpose(1, 3)), reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_broadcasting_warns_like_torch(backend, reduction):
    dev = device_for(backend)
    x = torch.randn(4, 6, device=dev)
    with pytest.warns(UserWarning, match="Using a target size .* different to the input size"):
        _check_mse(x, torch.randn(6, device=dev), reduction=reduction)
    with pytest.warns(UserWarning):
        _check_mse(torch.randn(4, 1, 3, device=dev), torch.randn(5, 1, device=dev), reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_weight(backend, reduction):
    dev = device_for(backend)
    x, y = torch.randn(5, 7, device=dev), torch.randn(5, 7, device=dev)
    _check_mse(x, y, weight=torch.rand(5, 7, device=dev), reduction=reduction)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the mean's 0 / 0
def test_mse_empty_and_odd_sizes(backend):
    dev = device_for(backend)
    x = torch.randn(0, 3, device=dev, requires_grad=True)
    assert torch.isnan(F.mse_loss(x, torch.randn(0, 3, device=dev)))
    assert F.mse_loss(x, torch.randn(0, 3, device=dev), reduction="sum").item() == 0.0
    assert F.mse_loss(x, torch.randn(0, 3, device=dev), reduction="none").shape == (0, 3)
    for shape in ((1,), (1033,), ()):  # 1033 spans two blocks of partial sums
        _check_mse(torch.randn(shape, device=dev), torch.randn(shape, device=dev))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_mse_dtypes(backend, dtype):
    skip_unsupported(backend, dtype)
    dev = device_for(backend)
    x, y = torch.randn(4, 33, device=dev).to(dtype), torch.randn(4, 33, device=dev).to(dtype)
    assert _check_mse(x, y, dtype=dtype).dtype == dtype
    mixed = F.mse_loss(x, y.float())  # torch promotes mixed dtypes
    assert mixed.dtype == torch.promote_types(dtype, torch.float32)


def test_mse_errors(backend):
    dev = device_for(backend)
    x = torch.randn(2, 3, device=dev)
    with pytest.raises(ValueError, match="'mena' is not a valid value for reduction"):
        F.mse_loss(x, x, reduction="mena")
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match=r"\(2, 3\) and target \(4,\) do not broadcast"):
        F.mse_loss(x, torch.randn(4, device=dev))
    with pytest.raises(NotImplementedError, match="floating-point"):
        F.mse_loss(x.long(), x.long())
    with pytest.raises(ValueError, match="Weights and input must have the same size"):
        F.mse_loss(x, x, weight=torch.ones(3, device=dev))


def test_mse_module(backend):
    ours, theirs = tkernels.nn.MSELoss(reduction="sum"), torch.nn.MSELoss(reduction="sum")
    assert isinstance(ours, torch.nn.MSELoss) and repr(ours) == repr(theirs)
    x, y = torch.randn(3, 4, device=device_for(backend)), torch.randn(3, 4, device=device_for(backend))
    assert_close(ours(x, y), theirs(x.double(), y.double()), reduction=12)


# ---------------------------------------------------------------------------------------------
# Custom-op registration and torch.compile
# ---------------------------------------------------------------------------------------------
def test_opcheck(backend):
    dev = device_for(backend)
    ops = torch.ops.tkernels
    x = torch.randn(4, 5, 3, device=dev)
    t = torch.tensor([[0, 1, 4], [2, -100, 3], [1, 1, 0], [4, 3, 2]], device=dev)
    w = torch.rand(5, device=dev)
    torch.library.opcheck(ops.cross_entropy.default, (x, t, w, "mean", -100, 0.1))
    q = torch.softmax(torch.randn(4, 5, device=dev), 1)
    torch.library.opcheck(ops.cross_entropy.default, (x[:, :, 0], q, None, "none", -100, 0.0))
    torch.library.opcheck(ops.cross_entropy.default, (torch.randn(40, 5, device=dev), t[:, 0].repeat(10), w, "sum",
                                                      -100, 0.0))  # several programs, finish kernel
    loss, stats = ops.cross_entropy(x, t, w, "mean", -100, 0.1)
    torch.library.opcheck(ops.cross_entropy_backward.default,
                          (torch.tensor(1.5, device=dev), x, t, w, stats, "mean", -100, 0.1, False, backend))
    loss, stats = ops.cross_entropy(x[:, :, 0], q, None, "none", -100, 0.0)
    torch.library.opcheck(ops.cross_entropy_backward.default,
                          (torch.randn(4, device=dev), x[:, :, 0], q, None, stats, "none", -100, 0.0, True, ""))
    y = torch.randn(4, 5, 3, device=dev)
    torch.library.opcheck(ops.mse_loss.default, (x, y, None, "mean"))
    torch.library.opcheck(ops.mse_loss.default, (x, y.expand(4, 5, 3), w[None, :, None].expand(4, 5, 3), "none"))
    loss, denom = ops.mse_loss(x, y, w[None, :, None].expand(4, 5, 3), "mean")
    torch.library.opcheck(ops.mse_loss_backward.default,
                          (torch.tensor(0.5, device=dev), x, y, w[None, :, None].expand(4, 5, 3), loss, denom, "mean",
                           True, True, True))


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager(backend):
    """One graph through every op of this family: dropout, softmax, log_softmax, cross_entropy, mse_loss."""
    dev = device_for(backend)

    def loss_fn(x, h, t, q):
        return (F.cross_entropy(h, t, label_smoothing=0.1) + F.mse_loss(F.softmax(x, 1), q)
                + F.log_softmax(x, 0).mean() + F.cross_entropy(x, q, reduction="sum"))

    def step(x, t, q):
        h = F.dropout(x, 0.25)
        return loss_fn(x, h, t, q), h

    x = torch.randn(6, 7, device=dev, requires_grad=True)
    t = torch.tensor([0, 6, 3, -100, 2, 2], device=dev)
    q = torch.softmax(torch.randn(6, 7, device=dev), 1)
    loss, h = torch.compile(step, fullgraph=True)(x, t, q)
    (dx,) = torch.autograd.grad(loss, x)
    # the compiled graph may draw the dropout seed from its own RNG; replay its mask in eager
    scale = (h.detach() != 0).to(x.dtype) / 0.75
    assert_close(h, x.detach() * scale)
    eager = loss_fn(x, x * scale, t, q)
    (eager_dx,) = torch.autograd.grad(eager, x)
    assert_close(loss, eager, reduction=42)
    assert_close(dx, eager_dx, reduction=42)
    # the independent reference: the NumPy backend in float64, with the same dropout mask
    x64 = x.detach().cpu().double().requires_grad_()
    with tkernels.use_backend("numpy"):
        expected = loss_fn(x64, x64 * scale.cpu().double(), t.cpu(), q.cpu().double())
        (expected_dx,) = torch.autograd.grad(expected, x64)
    assert_close(loss, expected, dtype=torch.float32, reduction=42)
    assert_close(dx, expected_dx, dtype=torch.float32, reduction=42)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_reads_only_the_targets_class_weights(backend, reduction):
    """Class indices without smoothing: each row reads the weight of its own target class only (as
    torch does), so a NaN weight of a class no counted row targets leaves the loss finite."""
    dev = device_for(backend)
    x = torch.randn(6, 4, device=dev, requires_grad=True)
    t = torch.tensor([0, 2, 3, 3, 0, 2], device=dev)
    t_ignored = torch.tensor([0, 1, 3, 1, 0, 2], device=dev)  # class 1 only on ignored rows
    w = torch.tensor([0.5, float("nan"), 2.0, 1.5], device=dev)
    for target, ignore in ((t, -100), (t_ignored, 1)):
        ours = F.cross_entropy(x, target, weight=w, ignore_index=ignore, reduction=reduction)
        theirs = torch.nn.functional.cross_entropy(x, target, weight=w, ignore_index=ignore, reduction=reduction)
        assert torch.isfinite(ours).all()
        assert_close(ours, theirs, reduction=4)
        g_ours, = torch.autograd.grad(ours.sum(), x)
        g_theirs, = torch.autograd.grad(theirs.sum(), x)
        assert_close(g_ours, g_theirs, reduction=4)
