"""tkernels.nn.convert: plain torch.nn models keep their outputs, gradients, buffers and state.

Equivalence runs in float64 on the NumPy backend (tight tolerances: any wrong formula shows),
plus one float32 model, and one small forward/backward through Triton's interpreter.
"""
import copy
import inspect
import logging

import pytest
import torch
from torch import nn

import tkernels
import tkernels.nn as tnn
from tkernels.nn.convert import ConversionReport
from helpers import assert_close, noise_magnitude


# tiny tensors: thread hand-offs cost more than they save on 2 shared CI cores (fixture in conftest)
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


# ---------------------------------------------------------------------------------------------
# Models written in plain torch.nn
# ---------------------------------------------------------------------------------------------
class Residual(nn.Module):
    """A basic residual block: the add and the last relu are in forward, out of convert's reach."""

    def __init__(self, channels_in, channels_out, stride=1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(channels_out), nn.ReLU(inplace=True),
            nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False), nn.BatchNorm2d(channels_out))
        self.shortcut = (nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(channels_out))
                         if stride != 1 or channels_in != channels_out else nn.Identity())
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict({
            "a": nn.Sequential(nn.Linear(7, 16), nn.SiLU(), nn.Linear(16, 9), nn.Sigmoid()),
            "b": nn.Sequential(nn.Linear(7, 9, bias=False), nn.GELU(approximate="tanh")),
        })
        self.heads = nn.ModuleList([nn.Sequential(nn.Linear(9, 5), nn.Tanh()), nn.Linear(9, 5)])
        self.act = nn.LeakyReLU(0.1)  # used in forward, not after a layer in a Sequential: converted, not fused

    def forward(self, x):
        h = self.encoders["a"](x) * self.encoders["b"](x)
        return self.heads[0](h) + self.act(self.heads[1](h))


def cnn():
    """Bias-free conv + BN + ReLU, pooling, conv with bias + LeakyReLU, BN1d + ReLU, Linear + GELU."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 6, 3, bias=True), nn.LeakyReLU(0.2),
        nn.AvgPool2d(2, stride=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(6, 12, bias=False), nn.BatchNorm1d(12), nn.ReLU(),
        nn.Linear(12, 4), nn.GELU(),
    )


def resnet():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         Residual(4, 4), Residual(4, 8, stride=2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def bn_relu_mlp():
    return nn.Sequential(nn.Linear(5, 11), nn.BatchNorm1d(11), nn.ReLU(), nn.Linear(11, 3), nn.ReLU())


CASES = {
    "cnn": (cnn, (5, 3, 10, 10)),
    "resnet": (resnet, (4, 2, 9, 9)),
    "nested": (Nested, (6, 7)),
    "bn_relu_mlp": (bn_relu_mlp, (7, 5)),
}
FUSED = {"cnn": 4, "resnet": 3, "nested": 4, "bn_relu_mlp": 2}  # layer+activation pairs in Sequentials


def _run(model, x, grad_out):
    """Forward + backward; returns (output, input grad, {name: param grad})."""
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(grad_out)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


def _assert_same_step(ours, theirs, x, dtype, reduction=200, scale=1.0):
    """One training-mode step then one eval-mode step: outputs, all gradients and all buffers agree."""
    with torch.no_grad():
        theirs.eval()  # eval mode: finding the output shape must not touch running statistics
        grad_out = torch.randn_like(theirs(x))
    theirs.zero_grad(set_to_none=True)
    for mode in ("train", "eval"):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        out, dx, grads = _run(ours, x, grad_out)
        out_t, dx_t, grads_t = _run(theirs, x, grad_out)
        assert_close(out, out_t, dtype=dtype, reduction=reduction, scale=scale, msg=f"{mode} output")
        assert_close(dx, dx_t, dtype=dtype, reduction=reduction, scale=scale, msg=f"{mode} input gradient")
        assert grads.keys() == grads_t.keys()
        for name in grads:
            assert_close(grads[name], grads_t[name], dtype=dtype, reduction=reduction, scale=scale,
                         magnitude=noise_magnitude(grads_t, name), msg=f"{mode} gradient of {name}")
        buffers_t = dict(theirs.named_buffers())
        for name, buf in ours.named_buffers():
            if buf.is_floating_point():
                assert_close(buf, buffers_t[name], dtype=dtype, reduction=reduction, msg=f"{mode} buffer {name}")
            else:
                assert torch.equal(buf, buffers_t[name]), f"{mode} buffer {name}"


def _all_leaves_tkernels(model):
    return [f"{name}: {type(m).__name__}" for name, m in model.named_modules()
            if not m._modules and not type(m).__module__.startswith("tkernels.")
            and not isinstance(m, (nn.Identity, nn.Flatten))]


@pytest.mark.parametrize("case", CASES)
def test_converted_model_matches_torch_float64(case):
    build, shape = CASES[case]
    torch.manual_seed(0)
    reference = build().double()
    model, report = tnn.convert(copy.deepcopy(reference), return_report=True)
    assert _all_leaves_tkernels(model) == [], report
    assert len(report.fused) == FUSED[case], report
    with tkernels.use_backend("numpy"):
        _assert_same_step(model, reference, torch.randn(*shape, dtype=torch.float64), torch.float64)


def test_converted_model_matches_torch_float32():
    torch.manual_seed(0)
    reference = cnn()
    model = tnn.convert(copy.deepcopy(reference))
    with tkernels.use_backend("numpy"):
        # the NumPy backend computes in float64 and rounds once; torch rounds every fp32 op
        _assert_same_step(model, reference, torch.randn(5, 3, 10, 10), torch.float32, reduction=200, scale=10)


def test_fused_slots_become_identity_and_state_dict_keys_stay():
    torch.manual_seed(0)
    reference = cnn()
    keys = list(reference.state_dict())
    model, report = tnn.convert(copy.deepcopy(reference), return_report=True)
    assert list(model.state_dict()) == keys
    assert len(model) == len(reference)
    assert [type(model[i]) for i in (2, 5, 11, 13)] == [nn.Identity] * 4
    assert type(model[1]) is tnn.BatchNorm2d and str(model[1].activation) == "relu"
    assert type(model[4]) is tnn.Conv2d and str(model[4].activation) == "leaky_relu(negative_slope=0.2)"
    assert type(model[10]) is tnn.BatchNorm1d and str(model[10].activation) == "relu"
    assert type(model[12]) is tnn.Linear and str(model[12].activation) == "gelu"
    assert [(f.layer, f.activation_slot) for f in report.fused] == [("1", "2"), ("4", "5"), ("10", "11"), ("12", "13")]
    # fuse=False: every layer converted, the activations stay separate tkernels modules
    unfused = tnn.convert(copy.deepcopy(reference), fuse=False)
    assert [type(unfused[i]) for i in (2, 5, 11, 13)] == [tnn.ReLU, tnn.LeakyReLU, tnn.ReLU, tnn.GELU]
    assert unfused[5].negative_slope == 0.2
    assert model[0].activation.is_identity  # conv followed by BN: nothing to fuse


def test_parameters_and_buffers_are_the_same_objects_so_optimizers_keep_working():
    torch.manual_seed(0)
    model = resnet()
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built BEFORE the conversion
    converted = tnn.convert(model)
    assert converted is model  # containers are converted in place
    assert all(p is params[name] for name, p in converted.named_parameters())
    assert all(b is buffers[name] for name, b in converted.named_buffers())
    before = {name: p.detach().clone() for name, p in params.items()}
    with tkernels.use_backend("numpy"):
        converted(torch.randn(4, 2, 9, 9)).square().mean().backward()
    optimizer.step()
    changed = [name for name, p in converted.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == len(before)


def test_training_mode_device_dtype_hooks_and_attributes_are_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.BatchNorm1d(6), nn.Tanh()), nn.Linear(6, 2))
    model.double()
    model[1].eval()  # a frozen BN inside a training model
    model[2].weight.requires_grad_(False)
    model[2].tag = "head"
    calls = []
    model[2].register_forward_hook(lambda mod, inp, out: calls.append(out.shape))
    model = tnn.convert(model)
    assert model.training and not model[1].training and not model[1][0].training
    assert type(model[1][0]) is tnn.BatchNorm1d and str(model[1][0].activation) == "tanh"
    assert type(model[2]) is tnn.Linear and model[2].tag == "head"
    assert not model[2].weight.requires_grad
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in model.parameters())
    with tkernels.use_backend("numpy"):
        y = model(torch.randn(3, 4, dtype=torch.float64))
    assert y.dtype == torch.float64 and calls == [torch.Size([3, 2])]


def test_hooks_and_shared_layers_block_fusion():
    shared = nn.Linear(3, 3)
    act = nn.ReLU()
    act.register_forward_hook(lambda *a: None)  # a hook expects to see the activation run
    model = nn.Sequential(nn.Sequential(shared, nn.ReLU()), nn.Sequential(shared, nn.Sigmoid()),
                          nn.Linear(3, 3), act)
    model, report = tnn.convert(model, return_report=True)
    assert report.fused == []
    assert model[0][0] is model[1][0] and type(model[0][0]) is tnn.Linear  # still shared, converted once
    assert type(model[3]) is tnn.ReLU and len(model[3]._forward_hooks) == 1
    assert sum(c.source == "torch.nn.Linear" for c in report.converted) == 2


class MyLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_report_lists_layers_left_alone_and_logs_them(caplog):
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), MyLinear(4, 4), nn.PReLU(), nn.Flatten())
    with caplog.at_level(logging.INFO, logger="tkernels.nn.convert"):
        model, report = tnn.convert(model, return_report=True)
    assert isinstance(report, ConversionReport) and not report.fully_converted
    kept = {m.name: m for m in report.left_alone}
    assert set(kept) == {"1", "2", "3"}  # Flatten computes nothing: not reported
    assert kept["1"].type_name == "torch.nn.LayerNorm"
    assert "subclass of torch.nn.Linear" in kept["2"].reason and type(model[2]) is MyLinear
    assert type(model[0]) is tnn.Linear and type(model[1]) is nn.LayerNorm
    assert "left 3 layer(s) alone" in str(report) and "PReLU" in str(report)
    assert "torch.nn.LayerNorm" in caplog.text and "converted 1 layer(s)" in caplog.text


def test_twin_not_available_is_left_alone(monkeypatch):
    monkeypatch.delattr(tnn, "Conv2d")
    model, report = tnn.convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), return_report=True)
    assert type(model[0]) is nn.Conv2d and type(model[1]) is tnn.ReLU
    assert [(m.name, m.reason) for m in report.left_alone] == [("0", "tkernels.nn.Conv2d is not available")]


def test_leaf_model_is_replaced_and_conversion_is_idempotent():
    layer = nn.Linear(3, 2)
    twin = tnn.convert(layer)
    assert type(twin) is tnn.Linear and twin.weight is layer.weight and twin.bias is layer.bias
    model = tnn.convert(nn.Sequential(nn.Linear(3, 2), nn.ReLU()))
    again, report = tnn.convert(model, return_report=True)
    assert again is model and report.converted == [] and report.fused == [] and report.left_alone == []
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        tnn.convert(torch.zeros(3))


@pytest.mark.skipif("bias" not in inspect.signature(nn.BatchNorm2d).parameters,
                    reason="torch < 2.5 has no BatchNorm(bias=False)")
def test_affine_batchnorm_without_bias_is_converted():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, bias=False), nn.SiLU(),
                              nn.BatchNorm2d(3, affine=False), nn.BatchNorm2d(3, track_running_stats=False)).double()
    model, report = tnn.convert(copy.deepcopy(reference), return_report=True)
    assert report.left_alone == [] and type(model[1]) is tnn.BatchNorm2d and model[1].bias is None
    assert model[3].weight is None and model[4].running_mean is None
    with tkernels.use_backend("numpy"):
        _assert_same_step(model, reference, torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.float64)


def test_loss_class_weights_are_kept():
    weight = torch.rand(4)
    loss = nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)
    twin = tnn.convert(loss)
    assert type(twin) is tnn.CrossEntropyLoss and twin.weight is loss.weight and twin.label_smoothing == 0.1
    logits, target = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 4, (6,))
    loss.weight, twin.weight = weight.double(), weight.double()
    with tkernels.use_backend("numpy"):
        assert_close(twin(logits, target), loss(logits, target), dtype=torch.float64)


def test_sync_batchnorm_is_converted_and_runs_like_batchnorm_outside_distributed():
    torch.manual_seed(0)
    reference = nn.SyncBatchNorm.convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU())).double()
    model, report = tnn.convert(copy.deepcopy(reference), return_report=True)
    assert type(model[1]) is tnn.SyncBatchNorm and type(model[2]) is nn.Identity, report
    with tkernels.use_backend("numpy"):
        _assert_same_step(model, reference, torch.randn(4, 2, 6, 6, dtype=torch.float64), torch.float64)


TRITON_MODELS = {
    "conv_bn_pool_linear": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                                                  nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3),
                                                  nn.Tanh()), (3, 2, 4, 4)),
    "cnn": CASES["cnn"],
    "bn_relu_mlp": CASES["bn_relu_mlp"],
}


def _train_and_eval_step(model, x, grad_out, backend):
    """Per mode (train, eval): output, input gradient, parameter gradients and buffers, on `backend`."""
    results = []
    with tkernels.use_backend(backend):
        for mode in (True, False):
            model.train(mode)
            out, dx, grads = _run(model, x, grad_out)
            results.append((out, dx, grads, {n: b.clone() for n, b in model.named_buffers()}))
    return results


@pytest.mark.parametrize("name", TRITON_MODELS)
def test_converted_model_on_triton_interpreter(name, launches):
    """convert() on small models, run on the Triton backend: one train and one eval step agree with
    the torch model and with the converted model on the NumPy backend, at fp32 tolerances."""
    if not tkernels.INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on CPU machines)")
    torch.manual_seed(0)
    factory, shape = TRITON_MODELS[name]
    reference = factory()
    model = tnn.convert(copy.deepcopy(reference))
    numpy_model = copy.deepcopy(model)
    x = torch.randn(*shape)
    with torch.no_grad():
        grad_out = torch.randn_like(reference.eval()(x))
    ours = _train_and_eval_step(model, x, grad_out, "triton")
    launches.assert_ran("bn_apply_kernel", "matmul_kernel")
    launched = set(launches.names)
    launches.clear()
    theirs = {"numpy": _train_and_eval_step(numpy_model, x, grad_out, "numpy"),
              "torch": _train_and_eval_step(reference, x, grad_out, "auto")}
    assert not launches.names, f"the numpy and torch runs launched Triton kernels: {set(launches.names)}"
    assert launched, "the triton run launched nothing"
    for other, results in theirs.items():
        for mode, (got, expected) in zip(("train", "eval"), zip(ours, results)):
            for what, a, b in (("output", got[0], expected[0]), ("input gradient", got[1], expected[1])):
                assert_close(a, b, dtype=torch.float32, reduction=50, msg=f"{mode} {what} vs {other}")
            assert got[2].keys() == expected[2].keys()
            for key in got[2]:
                assert_close(got[2][key], expected[2][key], dtype=torch.float32, reduction=50,
                             magnitude=noise_magnitude(expected[2], key), msg=f"{mode} gradient of {key} vs {other}")
            for key, buf in got[3].items():
                if buf.is_floating_point():
                    assert_close(buf, expected[3][key], dtype=torch.float32, reduction=50,
                                 msg=f"{mode} buffer {key} vs {other}")
                else:
                    assert torch.equal(buf, expected[3][key]), f"{mode} buffer {key} vs {other}"
