"""torch.autocast: every op casts as the torch op it replaces does (tkernels/ops/_autocast.py).

Each case runs ours and torch under the same autocast, from float32 leaves and from leaves already
in the autocast dtype, and compares output dtypes and values, and the dtypes and values of every
leaf's gradient (they come back through the casts in the leaf's own dtype, as torch's do).
Running statistics are compared too. On CPU, bfloat16 and float16 autocast; with
TKERNELS_TEST_DEVICE=cuda the same cases run against torch's CUDA policy.

Triton's interpreter computes bfloat16 tl.dot wrongly, so there linear and conv2d run under float16
autocast only; the other ops (no tl.dot) run under both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import pytest
import torch
import torch.nn.functional as F

import tkernels
import tkernels.functional as TF
from tkernels.ops import _autocast
from helpers import ON_INTERPRETER, assert_close, device_for

DTYPES = [torch.bfloat16, torch.float16]


@dataclass
class Case:
    name: str
    leaves: Callable[[torch.device], Dict[str, torch.Tensor]]  # float32; those named in `cast` follow the run dtype
    ours: Callable
    theirs: Callable
    uses_dot: bool = False          # a tl.dot kernel: no bfloat16 on the interpreter
    reduction: int = 1              # the longest reduction an output element sums over
    cast: tuple = ("x",)            # the leaves that are activations (given in the autocast dtype in the low run)
    buffers: Callable = None        # () -> fresh running stats, shared by both sides' calls


def _leaves(**shapes):
    def make(dev):
        return {name: torch.randn(shape, device=dev) for name, shape in shapes.items()}
    return make


def _running(dev):
    return {"running_mean": torch.randn(3, device=dev) * 0.1, "running_var": torch.rand(3, device=dev) + 0.5}


CASES = [
    Case("linear", _leaves(x=(5, 17), w=(9, 17), b=(9,)), lambda f, t, _: f.linear(t["x"], t["w"], t["b"]),
         lambda t, _: F.linear(t["x"], t["w"], t["b"]), uses_dot=True, reduction=17),
    Case("linear_gelu", _leaves(x=(3, 2, 17), w=(9, 17), b=(9,)),
         lambda f, t, _: f.linear(t["x"], t["w"], t["b"], activation="gelu"),
         lambda t, _: F.gelu(F.linear(t["x"], t["w"], t["b"])), uses_dot=True, reduction=17),
    Case("conv2d", _leaves(x=(2, 3, 9, 9), w=(4, 3, 3, 3), b=(4,)),
         lambda f, t, _: f.conv2d(t["x"], t["w"], t["b"], padding=1),
         lambda t, _: F.conv2d(t["x"], t["w"], t["b"], padding=1), uses_dot=True, reduction=27),
    Case("conv2d_relu", _leaves(x=(2, 3, 9, 9), w=(4, 3, 3, 3), b=(4,)),
         lambda f, t, _: f.conv2d(t["x"], t["w"], t["b"], stride=2, activation="relu"),
         lambda t, _: F.relu(F.conv2d(t["x"], t["w"], t["b"], stride=2)), uses_dot=True, reduction=27),
    Case("batch_norm_train", _leaves(x=(4, 3, 5, 5), w=(3,), b=(3,)),
         lambda f, t, r: f.batch_norm(t["x"], r["running_mean"], r["running_var"], t["w"], t["b"], True),
         lambda t, r: F.batch_norm(t["x"], r["running_mean"], r["running_var"], t["w"], t["b"], True),
         reduction=100, buffers=_running),
    Case("batch_norm_eval", _leaves(x=(4, 3, 5, 5), w=(3,), b=(3,)),
         lambda f, t, r: f.batch_norm(t["x"], r["running_mean"], r["running_var"], t["w"], t["b"], False),
         lambda t, r: F.batch_norm(t["x"], r["running_mean"], r["running_var"], t["w"], t["b"], False),
         reduction=100, buffers=_running),
    Case("softmax", _leaves(x=(5, 17)), lambda f, t, _: f.softmax(t["x"], dim=1),
         lambda t, _: F.softmax(t["x"], dim=1), reduction=17),
    Case("softmax_dtype", _leaves(x=(5, 17)), lambda f, t, _: f.softmax(t["x"], dim=0, dtype=torch.float32),
         lambda t, _: F.softmax(t["x"], dim=0, dtype=torch.float32), reduction=5),
    Case("log_softmax", _leaves(x=(3, 17, 2)), lambda f, t, _: f.log_softmax(t["x"], dim=1),
         lambda t, _: F.log_softmax(t["x"], dim=1), reduction=17),
    Case("cross_entropy", _leaves(x=(6, 5)),
         lambda f, t, _: f.cross_entropy(t["x"], torch.tensor([0, 4, 2, 1, 3, 0], device=t["x"].device)),
         lambda t, _: F.cross_entropy(t["x"], torch.tensor([0, 4, 2, 1, 3, 0], device=t["x"].device)),
         reduction=30),
    Case("cross_entropy_weighted", _leaves(x=(6, 5, 3)),
         lambda f, t, _: f.cross_entropy(t["x"], _targets(t["x"]), weight=_class_weight(t["x"]),
                                         label_smoothing=0.1, reduction="sum"),
         lambda t, _: F.cross_entropy(t["x"], _targets(t["x"]), weight=_class_weight(t["x"]), label_smoothing=0.1,
                                      reduction="sum"), reduction=90),
    Case("cross_entropy_probabilities", _leaves(x=(6, 5), p=(6, 5)),
         lambda f, t, _: f.cross_entropy(t["x"], t["p"].softmax(1)),
         lambda t, _: F.cross_entropy(t["x"], t["p"].softmax(1)), reduction=30, cast=("x", "p")),
    Case("mse_loss", _leaves(x=(4, 7), y=(4, 7)), lambda f, t, _: f.mse_loss(t["x"], t["y"]),
         lambda t, _: F.mse_loss(t["x"], t["y"]), reduction=28, cast=("x", "y")),
    Case("mse_loss_mixed", _leaves(x=(4, 7), y=(4, 7)), lambda f, t, _: f.mse_loss(t["x"], t["y"], reduction="none"),
         lambda t, _: F.mse_loss(t["x"], t["y"], reduction="none"), cast=("x",)),
    Case("max_pool2d", _leaves(x=(2, 3, 8, 8)), lambda f, t, _: f.max_pool2d(t["x"], 3, 2, 1),
         lambda t, _: F.max_pool2d(t["x"], 3, 2, 1)),
    Case("avg_pool2d", _leaves(x=(2, 3, 8, 8)), lambda f, t, _: f.avg_pool2d(t["x"], 2),
         lambda t, _: F.avg_pool2d(t["x"], 2), reduction=4),
    Case("adaptive_avg_pool2d", _leaves(x=(2, 3, 7, 7)), lambda f, t, _: f.adaptive_avg_pool2d(t["x"], 3),
         lambda t, _: F.adaptive_avg_pool2d(t["x"], 3), reduction=9),
    Case("dropout_eval", _leaves(x=(4, 9)), lambda f, t, _: f.dropout(t["x"], 0.5, training=False),
         lambda t, _: F.dropout(t["x"], 0.5, training=False)),
    Case("dropout_p0", _leaves(x=(4, 9)), lambda f, t, _: f.dropout(t["x"], 0.0),
         lambda t, _: F.dropout(t["x"], 0.0)),
    Case("gelu", _leaves(x=(4, 9)), lambda f, t, _: f.gelu(t["x"]), lambda t, _: F.gelu(t["x"])),
    Case("silu", _leaves(x=(4, 9)), lambda f, t, _: f.silu(t["x"]), lambda t, _: F.silu(t["x"])),
]


def _targets(x):
    return (torch.arange(x.numel() // x.shape[1], device=x.device) % x.shape[1]).reshape(x.shape[0], *x.shape[2:])


def _class_weight(x):
    return torch.linspace(0.5, 1.5, x.shape[1], device=x.device)


def _run(case: Case, side: str, backend: str, dtype: torch.dtype, leaves_dtype, dev):
    torch.manual_seed(0)
    leaves = {name: (t.to(leaves_dtype) if name in case.cast else t).requires_grad_()
              for name, t in case.leaves(dev).items()}
    buffers = case.buffers(dev) if case.buffers else {}
    with torch.autocast(dev.type, dtype=dtype):
        if side == "ours":
            with tkernels.use_backend(backend):
                out = case.ours(TF, leaves, buffers)
        else:
            out = case.theirs(leaves, buffers)
    torch.manual_seed(1)
    grad_out = torch.randn(out.shape, device=dev).to(out.dtype)
    with tkernels.use_backend(backend):
        out.backward(grad_out)
    return out, leaves, buffers


def _ids(case):
    return case.name


@pytest.mark.parametrize("start", ["float32", "low"], ids=["float32-leaves", "low-precision-leaves"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_op_follows_torch_autocast(backend, case, dtype, start):
    dev = device_for(backend)
    if backend == "triton" and ON_INTERPRETER and dtype == torch.bfloat16 and case.uses_dot:
        pytest.skip("Triton's interpreter computes bfloat16 tl.dot wrongly (triton issue 11584); the float16 "
                    "autocast run covers this kernel here, the CUDA run of benchmarks/gpu_check.sh covers bf16")
    leaves_dtype = torch.float32 if start == "float32" else dtype
    ours, our_leaves, our_buffers = _run(case, "ours", backend, dtype, leaves_dtype, dev)
    theirs, their_leaves, their_buffers = _run(case, "theirs", backend, dtype, leaves_dtype, dev)
    assert ours.dtype == theirs.dtype, f"{case.name}: output {ours.dtype}, torch gives {theirs.dtype}"
    assert_close(ours, theirs, reduction=case.reduction, msg=f"{case.name} output")
    for name, leaf in our_leaves.items():
        twin = their_leaves[name]
        assert leaf.grad.dtype == twin.grad.dtype == leaf.dtype, f"{case.name}: grad of {name} is {leaf.grad.dtype}"
        # torch's gradient is itself computed in the low precision from its own rounded output:
        # the two differ by the rounding of both saved outputs, up to ~2 ulp of the largest
        # gradient (see test_softmax._check), 8x the normwise A; fp32 grads of fp32 leaves: 2x
        low = ours.dtype != torch.float32
        assert_close(leaf.grad, twin.grad, dtype=ours.dtype if low else leaf.dtype,
                     reduction=case.reduction, scale=8.0 if low else 2.0, msg=f"{case.name} grad of {name}")
    for name, buffer in our_buffers.items():
        assert buffer.dtype == their_buffers[name].dtype == torch.float32
        assert_close(buffer, their_buffers[name], dtype=dtype, msg=f"{case.name} {name}")


def test_policy_table_matches_torch_on_cpu():
    """What the table in _autocast says for CPU is what torch does there (CUDA's is aten's
    autocast_mode.h, checked by the CUDA run of the test above)."""
    x = torch.randn(4, 6)
    torch_ops = {"linear": lambda a: F.linear(a, torch.randn(3, 6)),
                 "conv2d": lambda a: F.conv2d(a.reshape(1, 1, 4, 6), torch.randn(2, 1, 3, 3)),
                 "softmax": lambda a: F.softmax(a, 1), "log_softmax": lambda a: F.log_softmax(a, 1),
                 "cross_entropy": lambda a: F.cross_entropy(a, torch.tensor([0, 1, 2, 3])),
                 "mse_loss": lambda a: F.mse_loss(a, a.detach())}
    expected_dtype = {_autocast.LOWER: torch.bfloat16, _autocast.FP32: torch.float32, None: torch.float16}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for op, fn in torch_ops.items():
            policy = _autocast.POLICIES[op].get("cpu")
            assert fn(x.half()).dtype == expected_dtype[policy], f"{op}: torch's CPU policy is not {policy}"


@pytest.mark.filterwarnings("ignore:torch.*autocast.*deprecated:DeprecationWarning")
def test_per_device_fallback_agrees_with_the_device_generic_api():
    """The calls used on torch builds without torch.is_autocast_enabled(device_type)."""
    for enabled, dtype in ((False, torch.bfloat16), (True, torch.bfloat16), (True, torch.float16)):
        with torch.autocast("cpu", dtype=dtype, enabled=enabled):
            assert _autocast.per_device_is_enabled("cpu") == torch.is_autocast_enabled("cpu") == enabled
            assert _autocast.per_device_get_dtype("cpu") == torch.get_autocast_dtype("cpu") == dtype
            assert _autocast.per_device_is_enabled("cuda") is False


def test_no_cast_outside_autocast_or_on_other_devices():
    x, w = torch.randn(3, 4), torch.randn(2, 4)
    assert _autocast.cast_inputs("linear", x, w)[0] is x
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert TF.linear(x, w).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        double = torch.randn(3, 4, dtype=torch.float64)
        assert _autocast.cast_inputs("linear", double)[0] is double  # float64 is not autocast-eligible
        assert _autocast.output_dtype("softmax", x, None) is None     # no CPU policy for softmax


class _SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.act = torch.nn.ReLU()
        self.pool = torch.nn.MaxPool2d(2)
        self.fc = torch.nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.bn(self.conv(x)))).flatten(1))


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_converted_model_trains_under_autocast_and_grad_scaler(compiled):
    """A converted model under bf16 autocast, eager and torch.compile(fullgraph=True), with
    GradScaler and tkernels AdamW, against the same loop in torch: logits, loss, parameters, their
    gradients and the running statistics. NumPy backend (bf16 tl.dot is wrong on the interpreter)."""
    torch.manual_seed(0)
    theirs = _SmallNet()
    ours = tkernels.nn.convert(_SmallNet(), fuse=True)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(6, 3, 8, 8)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    results = []
    for model, opt_cls, backend in ((ours, tkernels.optim.AdamW, "numpy"), (theirs, torch.optim.AdamW, "auto")):
        opt = opt_cls(model.parameters(), lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        loss_fn = TF.cross_entropy if model is ours else F.cross_entropy
        forward = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled and model is ours else model
        history = []
        with tkernels.use_backend(backend):
            for _ in range(2):
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = forward(x)
                    loss = loss_fn(logits, target)
                history.append((logits.detach(), loss.detach()))
                scaler.scale(loss).backward()
                grads = [p.grad.detach().clone() for p in model.parameters()]
                scaler.step(opt)
                scaler.update()
        results.append((history, grads, model))
    (ours_hist, our_grads, _), (their_hist, their_grads, _) = results
    for (logits, loss), (t_logits, t_loss) in zip(ours_hist, their_hist):
        assert logits.dtype == t_logits.dtype == torch.bfloat16 and loss.dtype == t_loss.dtype == torch.float32
        assert_close(logits, t_logits, reduction=27, scale=2.0, msg="logits")
        assert_close(loss, t_loss, dtype=torch.bfloat16, msg="loss")
    for (name, p), q, g, h in zip(ours.named_parameters(), theirs.parameters(), our_grads, their_grads):
        assert p.dtype == torch.float32 and g.dtype == torch.float32
        assert_close(g, h, dtype=torch.bfloat16, reduction=100, scale=2.0, msg=f"grad of {name}")
        assert_close(p, q, dtype=torch.bfloat16, msg=f"param {name}")
    bn_ours = [m for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    assert bn_ours.running_mean.dtype == torch.float32
    assert_close(bn_ours.running_mean, theirs.bn.running_mean, dtype=torch.bfloat16, msg="running_mean")
    assert_close(bn_ours.running_var, theirs.bn.running_var, dtype=torch.bfloat16, msg="running_var")
