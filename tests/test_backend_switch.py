"""A backend switch between forward and backward (``tkernels.use_backend``) must not change the
gradients: every op runs its forward on one backend and its backward on the other, both orders, and
its gradients are compared with torch's in float64. Under TRITON_INTERPRET=1 (tests/conftest.py)
both backends run on CPU tensors.

Where the two backends' forwards keep different state for backward (cross-entropy's NumPy forward
keeps placeholder statistics; dropout's two backends draw different masks from one seed), the
backward runs on the forward's backend (``ops/_common.forward_backend``); every other op keeps
backend-independent state and its backward runs on the backend in force. The launch records check
which backend each phase really ran on."""
from dataclasses import dataclass
from typing import Callable, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as TF

import tkernels
import tkernels.functional as F

from helpers import DEVICE, assert_close

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="the NumPy backend runs on CPU tensors only, so a "
                                "switch needs the Triton kernels on CPU tensors (TRITON_INTERPRET=1)")

SWITCHES = [("numpy", "triton"), ("triton", "numpy")]


@dataclass
class Case:
    name: str
    modules: Tuple[str, ...]  # tkernels.ops modules one of whose kernels the Triton phases must launch
    inputs: Callable[[], Sequence[torch.Tensor]]  # float32 leaves; each gets a gradient
    ours: Callable
    theirs: Callable  # torch, called on float64 copies of the inputs
    reduction: int  # the longest sum behind a gradient (tolerance scale)
    backward_follows_forward: bool = False  # the backward runs on the forward's backend


def _nonzero(*shape):
    x = torch.randn(*shape)
    return x + torch.where(x >= 0, 0.1, -0.1)  # away from relu's and max pooling's kinks


_TARGET = torch.tensor([0, 16, 3, -100, 7, 7])
_CLASS_WEIGHT = torch.rand(17) + 0.5
_MSE_WEIGHT = torch.rand(5, 7)


def _batch_norm(functional):
    def run(x, w, b):
        running_mean, running_var = torch.zeros(4, dtype=x.dtype), torch.ones(4, dtype=x.dtype)
        return functional.batch_norm(x, running_mean, running_var, w, b, training=True, momentum=0.1, eps=1e-5)
    return run


CASES = [
    Case("linear", ("matmul",), lambda: [torch.randn(5, 33), torch.randn(7, 33), torch.randn(7)],
         F.linear, TF.linear, 33),
    Case("linear+gelu", ("matmul",), lambda: [torch.randn(5, 33), torch.randn(7, 33), torch.randn(7)],
         lambda x, w, b: F.linear(x, w, b, activation="gelu"), lambda x, w, b: TF.gelu(TF.linear(x, w, b)), 33),
    Case("linear+relu", ("matmul",), lambda: [torch.randn(5, 33), torch.randn(7, 33), torch.randn(7)],
         lambda x, w, b: F.linear(x, w, b, activation="relu"), lambda x, w, b: TF.relu(TF.linear(x, w, b)), 33),
    Case("conv2d", ("conv", "conv_backward", "matmul"),
         lambda: [torch.randn(2, 3, 7, 9), torch.randn(4, 3, 3, 3), torch.randn(4)],
         lambda x, w, b: F.conv2d(x, w, b, padding=1), lambda x, w, b: TF.conv2d(x, w, b, padding=1), 126),
    Case("conv2d+silu", ("conv", "conv_backward", "matmul"),
         lambda: [torch.randn(2, 3, 7, 9), torch.randn(4, 3, 3, 3), torch.randn(4)],
         lambda x, w, b: F.conv2d(x, w, b, stride=2, activation="silu"),
         lambda x, w, b: TF.silu(TF.conv2d(x, w, b, stride=2)), 126),
    Case("batch_norm", ("batch_norm_kernels",), lambda: [torch.randn(3, 4, 5, 2), torch.rand(4) + 0.5, torch.randn(4)],
         _batch_norm(F), _batch_norm(TF), 30),
    Case("max_pool2d", ("pooling",), lambda: [_nonzero(2, 3, 9, 7)],
         lambda x: F.max_pool2d(x, 3, 2, 1), lambda x: TF.max_pool2d(x, 3, 2, 1), 9),
    Case("avg_pool2d", ("avg_pooling",), lambda: [torch.randn(2, 3, 9, 7)],
         lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
         lambda x: TF.avg_pool2d(x, 3, 2, 1, count_include_pad=False), 9),
    Case("adaptive_avg_pool2d", ("avg_pooling",), lambda: [torch.randn(2, 3, 9, 7)],
         lambda x: F.adaptive_avg_pool2d(x, (4, 3)), lambda x: TF.adaptive_avg_pool2d(x, (4, 3)), 9),
    Case("softmax", ("softmax",), lambda: [torch.randn(5, 17)],
         lambda x: F.softmax(x, 1), lambda x: TF.softmax(x, 1), 17),
    Case("log_softmax", ("softmax",), lambda: [torch.randn(5, 17)],
         lambda x: F.log_softmax(x, 0), lambda x: TF.log_softmax(x, 0), 5),
    Case("cross_entropy", ("losses",), lambda: [torch.randn(6, 17)],
         lambda x: F.cross_entropy(x, _TARGET, weight=_CLASS_WEIGHT, label_smoothing=0.1),
         lambda x: TF.cross_entropy(x, _TARGET, weight=_CLASS_WEIGHT.double(), label_smoothing=0.1), 102,
         backward_follows_forward=True),
    Case("cross_entropy_plain", ("losses",), lambda: [torch.randn(6, 17)],
         lambda x: F.cross_entropy(x, _TARGET), lambda x: TF.cross_entropy(x, _TARGET), 102,
         backward_follows_forward=True),
    Case("cross_entropy_probabilities", ("losses",), lambda: [torch.randn(4, 9, 3), torch.rand(4, 9, 3)],
         lambda x, q: F.cross_entropy(x, q, reduction="none"), lambda x, q: TF.cross_entropy(x, q, reduction="none"),
         9, backward_follows_forward=True),
    Case("mse_loss", ("mse",), lambda: [torch.randn(5, 7), torch.randn(5, 7)], F.mse_loss, TF.mse_loss, 35),
    Case("mse_loss_weighted", ("mse",), lambda: [torch.randn(5, 7), torch.randn(5, 7)],
         lambda x, y: F.mse_loss(x, y, reduction="sum", weight=_MSE_WEIGHT),
         lambda x, y: TF.mse_loss(x, y, reduction="sum", weight=_MSE_WEIGHT.double()), 35),
    Case("relu", ("elementwise",), lambda: [_nonzero(4, 33)], F.relu, TF.relu, 1),
    Case("gelu", ("elementwise",), lambda: [torch.randn(4, 33)], F.gelu, TF.gelu, 1),
    Case("leaky_relu", ("elementwise",), lambda: [_nonzero(4, 33)],
         lambda x: F.leaky_relu(x, 0.2), lambda x: TF.leaky_relu(x, 0.2), 1),
    Case("sigmoid", ("elementwise",), lambda: [torch.randn(4, 33)], F.sigmoid, torch.sigmoid, 1),
]


def _assert_ran_on(backend: str, launches, modules: Sequence[str], what: str) -> None:
    if backend == "triton":
        launches.assert_any_module([f"tkernels.ops.{m}" for m in modules], what)
    else:
        assert launches.names == [], f"{what} ran on the numpy backend but launched {launches.names}"


@pytest.mark.parametrize("forward,backward", SWITCHES, ids=["numpy-then-triton", "triton-then-numpy"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_gradients_survive_a_backend_switch_before_backward(case, forward, backward, launches):
    leaves = [t.requires_grad_() for t in case.inputs()]
    with tkernels.use_backend(forward):
        launches.clear()
        out = case.ours(*leaves)
        _assert_ran_on(forward, launches, case.modules, f"{case.name} forward")
    grad_out = torch.randn_like(out)
    with tkernels.use_backend(backward):
        launches.clear()
        grads = torch.autograd.grad(out, leaves, grad_out)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    expected_out = case.theirs(*leaves64)
    expected = torch.autograd.grad(expected_out, leaves64, grad_out.double())
    assert_close(out, expected_out, dtype=torch.float32, reduction=case.reduction, msg=f"{case.name} output")
    for i, (g, e) in enumerate(zip(grads, expected)):
        assert_close(g, e, dtype=torch.float32, reduction=case.reduction, msg=f"{case.name} gradient {i}")
    ran_on = forward if case.backward_follows_forward else backward
    _assert_ran_on(ran_on, launches, case.modules, f"{case.name} backward")


@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "in-place"])
@pytest.mark.parametrize("forward,backward", SWITCHES, ids=["numpy-then-triton", "triton-then-numpy"])
def test_dropout_backward_recomputes_the_forward_mask_after_a_backend_switch(forward, backward, inplace, launches):
    """The two backends draw different masks from one seed, so the backward must keep the forward's:
    dx = g * keep / (1 - p) with keep read off the forward's output."""
    p = 0.4
    x = _nonzero(8, 129).requires_grad_()
    with tkernels.use_backend(forward):
        launches.clear()
        y = F.dropout(x * 1.0 if inplace else x, p, inplace=inplace)
        _assert_ran_on(forward, launches, ("dropout",), "dropout forward")
    keep = y.detach() != 0
    assert keep.any() and not keep.all(), "the mask must keep some elements and drop others"
    g = torch.randn_like(y)
    with tkernels.use_backend(backward):
        launches.clear()
        (dx,) = torch.autograd.grad(y, x, g)
    assert_close(dx, g.double() * keep.double() / (1 - p), dtype=torch.float32)
    _assert_ran_on(forward, launches, ("dropout",), "dropout backward")


@pytest.mark.parametrize("op,args", [
    ("dropout_backward", lambda: (torch.randn(3), torch.tensor([7]), 0.5)),
    ("cross_entropy_backward", lambda: (torch.tensor(1.0), torch.randn(2, 3), torch.tensor([0, 2]), None,
                                        torch.zeros(6), "mean", -100, 0.0, False)),
])
def test_backward_ops_refuse_an_unknown_recorded_backend(op, args):
    with pytest.raises(ValueError, match="recorded by the forward must be '', 'triton' or 'numpy', but got 'cuda'"):
        getattr(torch.ops.tkernels, op)(*args(), "cuda")
