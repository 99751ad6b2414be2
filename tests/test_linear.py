"""Fused linear: both backends against the float64 NumPy reference and against torch."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import tkernels
import tkernels.functional as F
from tkernels.activations import REGISTRY, Activation
from tkernels.reference import linear as ref
from helpers import (expect_kernels, Canary, assert_close, assert_not_mutated, canary, device_for, log_tuned_launches,
                     skip_unsupported, to_numpy64)

ACTIVATIONS = [Activation(name, 0.2 if name == "leaky_relu" else 0.0) for name in REGISTRY]
TORCH_ACT = {
    "identity": lambda z: z, "relu": torch.relu, "leaky_relu": lambda z: torch.nn.functional.leaky_relu(z, 0.2),
    "gelu": torch.nn.functional.gelu, "gelu_tanh": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
    "silu": torch.nn.functional.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
}


def _check_linear(backend, M, K, N, dtype=torch.float32, act=Activation("identity"), bias=True, lead=(),
                  use_canary=True):
    skip_unsupported(backend, dtype, uses_dot=True)
    dev = device_for(backend)
    x0 = torch.randn(*lead, M, K, dtype=dtype, device=dev)
    w0 = (torch.randn(N, K, dtype=torch.float32) / max(1, K) ** 0.5).to(dtype=dtype, device=dev)
    b0 = torch.randn(N, dtype=dtype, device=dev) if bias else None
    if use_canary:
        x, w = canary(x0, requires_grad=True), canary(w0, requires_grad=True)
        b = canary(b0, requires_grad=True) if bias else None
    else:
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        b = b0.clone().requires_grad_() if bias else None
    snapshot = [t.detach().clone() for t in (x, w) + ((b,) if bias else ())]

    y = F.linear(x, w, b, activation=act)
    expect_kernels("matmul_kernel")
    assert y.dtype == dtype and y.shape == (*lead, M, N)
    grad = torch.randn_like(y)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], grad)
    assert_not_mutated(snapshot, [t.detach() for t in (x, w) + ((b,) if bias else ())])

    # float64 NumPy reference
    x2 = to_numpy64(x0).reshape(-1, K)
    y_ref, _ = ref.linear_forward(x2, to_numpy64(w0), to_numpy64(b0), act.name, act.param)
    dx_ref, dw_ref, db_ref = ref.linear_backward(to_numpy64(grad).reshape(-1, N), x2, to_numpy64(w0), to_numpy64(b0),
                                                 act.name, act.param)
    assert_close(y, y_ref.reshape(*lead, M, N), reduction=K, msg="forward vs reference")
    assert_close(grads[0], dx_ref.reshape(*lead, M, K), reduction=N, msg="grad input vs reference")
    assert_close(grads[1], dw_ref, reduction=max(1, x2.shape[0]), msg="grad weight vs reference")
    if bias:
        assert_close(grads[2], db_ref, reduction=max(1, x2.shape[0]), msg="grad bias vs reference")

    # torch itself, in float64 from the same inputs
    xt, wt = x0.double().requires_grad_(), w0.double().requires_grad_()
    bt = b0.double().requires_grad_() if bias else None
    yt = TORCH_ACT[act.name](torch.nn.functional.linear(xt, wt, bt))
    tgrads = torch.autograd.grad(yt, [t for t in (xt, wt, bt) if t is not None], grad.double())
    assert_close(y, yt, dtype=dtype, reduction=K, msg="forward vs torch")
    for ours, theirs in zip(grads, tgrads):
        assert_close(ours, theirs, dtype=dtype, reduction=max(K, N, x2.shape[0]), msg="grad vs torch")


@pytest.mark.parametrize("act", ACTIVATIONS, ids=str)
def test_every_activation(backend, act):
    _check_linear(backend, 17, 33, 19, act=act)


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (1, 7, 3), (7, 5, 1), (33, 17, 40), (3, 129, 17), (64, 15, 66)])
def test_odd_shapes(backend, M, K, N):
    _check_linear(backend, M, K, N, act=Activation("relu"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(backend, dtype):
    _check_linear(backend, 19, 40, 23, dtype=dtype, act=Activation("gelu"))


def test_no_bias_and_3d_input(backend):
    _check_linear(backend, 5, 12, 9, act=Activation("silu"), bias=False, lead=(3,))


def test_one_dimensional_input(backend):
    dev = device_for(backend)
    x, w, b = torch.randn(6, device=dev), torch.randn(4, 6, device=dev), torch.randn(4, device=dev)
    assert_close(F.linear(x, w, b), torch.nn.functional.linear(x, w, b), reduction=6)


def test_empty_batch(backend):
    dev = device_for(backend)
    x = torch.randn(0, 8, device=dev, requires_grad=True)
    w = torch.randn(5, 8, device=dev, requires_grad=True)
    b = torch.randn(5, device=dev, requires_grad=True)
    y = F.linear(x, w, b, activation="relu")
    assert y.shape == (0, 5)
    y.sum().backward()
    assert x.grad.shape == (0, 8)
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_transposed_and_sliced_inputs(backend):
    """Non-contiguous operands go through strides (no copies), including a transposed weight."""
    dev = device_for(backend)
    x = torch.randn(40, 21, device=dev)[::2].requires_grad_()  # row stride 42
    w = torch.randn(21, 13, device=dev).t().requires_grad_()    # (13, 21) transposed view
    y = F.linear(x, w, activation="tanh")
    y.sum().backward()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    torch.tanh(torch.nn.functional.linear(xr, wr)).sum().backward()
    assert_close(y, torch.tanh(torch.nn.functional.linear(xr, wr)), reduction=21)
    assert_close(x.grad, xr.grad, reduction=13)
    assert_close(w.grad, wr.grad, reduction=20)


def test_only_needed_gradients(backend):
    dev = device_for(backend)
    x = torch.randn(9, 6, device=dev)
    w = torch.randn(4, 6, device=dev, requires_grad=True)
    b = torch.randn(4, device=dev)
    F.linear(x, w, b, activation="gelu_tanh").sum().backward()
    assert x.grad is None and b.grad is None and w.grad is not None
    b.requires_grad_()
    w.grad = None
    F.linear(x, w.detach(), b, activation="silu").sum().backward()
    expected = torch.autograd.grad(torch.nn.functional.silu(torch.nn.functional.linear(x, w.detach(), b)).sum(), b)
    assert_close(b.grad, expected[0], reduction=9)
    expect_kernels("column_sum_kernel")  # the bias gradient alone is a column sum, not a matmul


def test_split_k_matches_single_pass():
    """The split-K path (partials + fixed-order reduction) gives the same result as one pass."""
    if tkernels.INTERPRET is False and device_for("triton").type != "cuda":
        pytest.skip("the Triton kernels need the interpreter or a GPU")
    from tkernels.ops.matmul import matmul
    dev = device_for("triton")
    a, b = torch.randn(20, 300, device=dev), torch.randn(300, 13, device=dev)
    out, rows = torch.empty(20, 13, device=dev), torch.empty(20, device=dev)
    matmul(a, b, out, rowsum_out=rows, split_k=3)
    assert_close(out, a.double() @ b.double(), reduction=300)
    assert_close(rows, a.double().sum(1), reduction=300)
    expect_kernels("matmul_kernel", "sum_partials_kernel")


def test_gated_backward_tunes_over_its_own_tiles(monkeypatch):
    """The backward products with act' fused into their A operand launch from the gated tile family
    (the tiles `tkernels inspect` compiles as matmul_gated); the forward and ungated products do not."""
    if tkernels.INTERPRET is False and device_for("triton").type != "cuda":
        pytest.skip("the Triton kernels need the interpreter or a GPU")
    from tkernels.ops import matmul as matmul_ops
    family = {id(t): "gated" for t in matmul_ops.TUNED_MATMUL_GATED.values()}
    family.update({id(t): "forward" for t in matmul_ops.TUNED_MATMUL.values()})
    log = log_tuned_launches(monkeypatch, family)
    dev = device_for("triton")
    with tkernels.use_backend("triton"):
        for act, expected in (("gelu_tanh", ["forward", "gated", "gated"]), ("identity", ["forward"] * 3)):
            log.clear()
            x = torch.randn(17, 33, device=dev, requires_grad=True)
            w = torch.randn(9, 33, device=dev, requires_grad=True)
            b = torch.randn(9, device=dev, requires_grad=True)
            y = F.linear(x, w, b, activation=act)
            y.backward(torch.randn_like(y))
            assert sorted(log) == sorted(expected), (act, log)
            z = x.detach().double() @ w.detach().double().t() + b.detach().double()
            assert_close(y, TORCH_ACT[act](z), reduction=33)


@settings(max_examples=12, deadline=None)
@given(M=st.integers(1, 40), K=st.integers(1, 70), N=st.integers(1, 40),
       act=st.sampled_from(ACTIVATIONS), bias=st.booleans())
def test_property_random_shapes(M, K, N, act, bias):
    with tkernels.use_backend("triton" if tkernels.INTERPRET else "numpy") as backend:
        _check_linear(backend, M, K, N, act=act, bias=bias, use_canary=False)


def test_canary_margins_untouched(backend):
    dev = device_for(backend)
    c = Canary(torch.randn(9, 14, device=dev))
    F.linear(c.view, torch.randn(5, 14, device=dev))
    c.assert_untouched_outside()


# --------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing mutated
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,error,match", [
    ("int_input", RuntimeError, "floating-point"),
    ("in_features", RuntimeError, "in_features=6"),
    ("weight_dtype", RuntimeError, "dtype"),
    ("bias_dtype", RuntimeError, "dtype"),
    ("bias_length", RuntimeError, r"bias must have shape \(4,\)"),
    ("weight_3d", RuntimeError, "2-D"),
    ("unknown_activation", ValueError, "unknown activation 'swishy'; valid:"),
    ("meta_weight", RuntimeError, "same device"),
])
def test_bad_input(backend, case, error, match):
    dev = device_for(backend)
    x, w, b = torch.randn(3, 6, device=dev), torch.randn(4, 6, device=dev), torch.randn(4, device=dev)
    kwargs = {}
    if case == "int_input":
        x = torch.randint(0, 5, (3, 6), device=dev)
    elif case == "in_features":
        x = torch.randn(3, 5, device=dev)
    elif case == "weight_dtype":
        w = w.double()
    elif case == "bias_dtype":
        b = b.half()
    elif case == "bias_length":
        b = torch.randn(5, device=dev)
    elif case == "weight_3d":
        w = w[None]
    elif case == "unknown_activation":
        kwargs["activation"] = "swishy"
    elif case == "meta_weight":
        w = torch.randn(4, 6, device="meta")
    before = [t.clone() for t in (x, b)]
    with pytest.raises(error, match=match):
        F.linear(x, w, b, **kwargs)
    assert_not_mutated(before, [x, b])


def test_triton_backend_refuses_float64():
    if not tkernels.INTERPRET:
        pytest.skip("needs the Triton interpreter or a GPU")
    with tkernels.use_backend("triton"), pytest.raises(RuntimeError, match="float64 runs on the numpy backend"):
        F.linear(torch.randn(2, 3, dtype=torch.float64, device=device_for("triton")),
                 torch.randn(4, 3, dtype=torch.float64, device=device_for("triton")))


# --------------------------------------------------------------------------------------------
# Module, custom-op registration and torch.compile
# --------------------------------------------------------------------------------------------
def test_module_matches_torch_linear():
    torch.manual_seed(3)
    ours = tkernels.nn.Linear(7, 5, activation=torch.nn.GELU(approximate="tanh"))
    torch.manual_seed(3)
    theirs = torch.nn.Linear(7, 5)
    assert isinstance(ours, torch.nn.Linear)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k in theirs.state_dict():
        assert torch.equal(ours.state_dict()[k], theirs.state_dict()[k]), "initialisation differs from torch"
    assert "activation=gelu_tanh" in repr(ours)
    plain = tkernels.nn.Linear(7, 5, bias=False)
    assert plain.bias is None and "activation" not in repr(plain)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 7)
    assert_close(ours(x), torch.nn.functional.gelu(theirs(x), approximate="tanh"), reduction=7)


def test_opcheck(backend):
    dev = device_for(backend)
    x, w, b = torch.randn(5, 7, device=dev), torch.randn(3, 7, device=dev), torch.randn(3, device=dev)
    torch.library.opcheck(torch.ops.tkernels.linear_preact.default, (x, w, b, "gelu", 0.0))
    torch.library.opcheck(torch.ops.tkernels.linear.default, (x, w, None, "relu", 0.0))
    g = torch.randn(5, 3, device=dev)
    z = torch.randn(5, 3, device=dev)
    torch.library.opcheck(torch.ops.tkernels.linear_backward.default,
                          (g, x, w, b, z, "silu", 0.0, True, True, True))
    torch.library.opcheck(torch.ops.tkernels.linear_backward.default,
                          (g, x, w, b, z, "leaky_relu", 0.1, False, False, True))


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager(backend):
    dev = device_for(backend)
    torch.manual_seed(0)
    model = torch.nn.Sequential(tkernels.nn.Linear(12, 16, activation="relu"),
                                tkernels.nn.Linear(16, 4, activation="gelu")).to(dev)
    x = torch.randn(9, 12, device=dev)
    eager = model(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    assert_close(out, eager, reduction=16)
    for p, g in zip(model.parameters(), eager_grads):
        assert_close(p.grad, g, reduction=9)
    # the independent reference: the NumPy backend in float64
    model64 = copy.deepcopy(model).cpu().double()
    model64.zero_grad()
    with tkernels.use_backend("numpy"):
        out64 = model64(x.cpu().double())
        out64.sum().backward()
    assert_close(out, out64, dtype=torch.float32, reduction=16)
    for p, q in zip(model.parameters(), model64.parameters()):
        assert_close(p.grad, q.grad, dtype=torch.float32, reduction=9)
