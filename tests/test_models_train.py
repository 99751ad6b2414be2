"""Reference models, the digits data, training against plain torch, and the `tkernels train` command."""
import copy

import pytest
import torch
from torch import nn

import tkernels
import tkernels.nn as tnn
import tkernels.optim as toptim
from tkernels.cli import main
from tkernels.data import load_digits, minibatches
from tkernels.models import MODELS, build_model
from helpers import assert_close



# tiny tensors: thread hand-offs cost more than they save on 2 shared CI cores (fixture in conftest)
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


def test_digits_split_is_stratified_normalised_and_deterministic(digits):
    assert digits.x_train.shape[1:] == (1, 8, 8) and digits.x_train.dtype == torch.float32
    assert digits.x_train.shape[0] + digits.x_test.shape[0] == 1797
    assert abs(digits.x_test.shape[0] - 0.2 * 1797) < 10
    test_counts = torch.bincount(digits.y_test, minlength=10)
    assert test_counts.min() >= 34 and test_counts.max() <= 38  # every class ~20% in test
    assert abs(float(digits.x_train.mean())) < 1e-5 and abs(float(digits.x_train.std()) - 1) < 1e-3
    again = load_digits(seed=0)
    assert torch.equal(again.x_test, digits.x_test) and torch.equal(again.y_train, digits.y_train)
    other = load_digits(seed=1)
    assert not torch.equal(other.y_train, digits.y_train)
    small = load_digits(limit=10)
    assert small.x_train.shape[0] == 10 and small.x_test.shape[0] == 10
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.0)


def test_minibatches_cover_every_sample_once_in_seeded_order():
    a = list(minibatches(10, 4, torch.Generator().manual_seed(3)))
    b = list(minibatches(10, 4, torch.Generator().manual_seed(3)))
    assert [len(i) for i in a] == [4, 4, 2] and all(torch.equal(x, y) for x, y in zip(a, b))
    assert sorted(torch.cat(a).tolist()) == list(range(10))
    assert [len(i) for i in minibatches(10, 4, drop_last=True)] == [4, 4]


@pytest.mark.parametrize("name", MODELS)
def test_model_is_built_from_tkernels_layers_and_matches_its_torch_twin(name):
    torch.manual_seed(0)
    model = build_model(name).double()
    torch.manual_seed(0)
    twin = build_model(name, impl="torch").double()
    assert list(model.state_dict()) == list(twin.state_dict())
    for (key, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), f"{name}: {key} initialised differently"
    torch_leaves = [f"{n}: {type(m).__name__}" for n, m in model.named_modules()
                    if not m._modules and not type(m).__module__.startswith("tkernels.")
                    and not isinstance(m, (nn.Identity, nn.Flatten))]
    assert torch_leaves == []
    assert any(not getattr(m, "activation", None) is None and not m.activation.is_identity
               for m in model.modules()), "no fused activation"
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    with tkernels.use_backend("numpy"):
        for mode in (True, False):
            model.train(mode)
            twin.train(mode)
            out, out_t = model(x), twin(x)
            assert out.shape == (6, 10)
            assert_close(out, out_t, dtype=torch.float64, reduction=300)
            out.square().sum().backward()
            out_t.square().sum().backward()
            for (key, p), q in zip(model.named_parameters(), twin.parameters()):
                assert_close(p.grad, q.grad, dtype=torch.float64, reduction=300, msg=key)
    for (key, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert_close(a, b, dtype=torch.float64, msg=key)  # running statistics
    with pytest.raises(ValueError, match="impl"):
        build_model(name, impl="jax")


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_short_training_run_matches_plain_torch(digits, optimizer):
    """10 steps of float32 training of the LeNet, tkernels (NumPy backend: float64 math, one rounding per op) vs
    torch (fp32 math throughout), same init and batches. Tolerance: per-step losses within 1e-4
    relative + 1e-5 absolute, and so are the final weights after SGD. AdamW divides each gradient
    by its running RMS, which turns rounding differences of near-zero gradients (conv weights
    ahead of batch norm) into absolute weight differences: there the bound is 5e-5, 2.5% of one
    step of size lr=2e-3 (observed: 2e-5)."""
    torch.manual_seed(0)
    model = build_model("lenet")
    twin = build_model("lenet", impl="torch")
    twin.load_state_dict(model.state_dict())
    kwargs = dict(lr=0.05, momentum=0.9) if optimizer == "sgd" else dict(lr=2e-3, weight_decay=0.01)
    opt_cls = {"sgd": (toptim.SGD, torch.optim.SGD), "adamw": (toptim.AdamW, torch.optim.AdamW)}[optimizer]
    runs = [(model, tnn.CrossEntropyLoss(), opt_cls[0](model.parameters(), **kwargs)),
            (twin, nn.CrossEntropyLoss(), opt_cls[1](twin.parameters(), **kwargs))]
    losses = ([], [])
    batches = list(minibatches(digits.x_train.shape[0], 32, torch.Generator().manual_seed(0)))[:10]
    with tkernels.use_backend("numpy"):
        for idx in batches:
            for (net, criterion, opt), trace in zip(runs, losses):
                loss = criterion(net(digits.x_train[idx]), digits.y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                trace.append(loss.detach())
    torch.testing.assert_close(torch.stack(losses[0]), torch.stack(losses[1]), rtol=1e-4, atol=1e-5)
    assert losses[0][-1] < losses[0][0]  # it learns
    atol = 1e-5 if optimizer == "sgd" else 5e-5
    for (key, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=atol, msg=key)


TRITON_KERNELS_OF_LENET_TRAINING = {
    "conv2d_fwd_kernel", "conv2d_dgrad_kernel", "conv2d_wgrad_kernel", "bn_stats_partial_kernel", "bn_apply_kernel",
    "bn_backward_partial_kernel", "bn_backward_input_kernel", "max_pool2d_kernel", "max_pool2d_backward_kernel",
    "matmul_kernel", "cross_entropy_forward_kernel", "cross_entropy_backward_kernel"}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_lenet_training_steps_through_triton_match_torch_and_numpy(optimizer, launches):
    """Three float32 training steps of the LeNet-BN (batch 6) with tkernels' cross-entropy and
    optimizer, every op on the Triton backend (the interpreter here), against the same model on
    the NumPy backend and against its torch twin with torch's loss and optimizer. fp32 tolerances
    for losses, final weights and running statistics (reduction: the widest sum, 144 terms)."""
    if not tkernels.INTERPRET and not torch.cuda.is_available():
        pytest.skip("the Triton backend needs TRITON_INTERPRET=1 (conftest sets it on CPU machines) or a GPU")
    device = "cuda" if not tkernels.INTERPRET else "cpu"
    torch.manual_seed(0)
    triton_model = build_model("lenet").to(device)
    numpy_model = copy.deepcopy(triton_model).cpu()
    twin = build_model("lenet", impl="torch")
    twin.load_state_dict(numpy_model.state_dict())
    # AdamW's default eps makes its first step lr*sign(g): a gradient that is zero in exact math
    # (a dead ReLU channel) but 1e-9 in fp32 then moves a weight by a whole step either way.
    # eps = 1e-3 keeps the update a smooth function of the gradient, so fp32 tolerances apply.
    kwargs = dict(lr=0.05, momentum=0.9) if optimizer == "sgd" else dict(lr=2e-3, weight_decay=0.01, eps=1e-3)
    ours, theirs = {"sgd": (toptim.SGD, torch.optim.SGD), "adamw": (toptim.AdamW, torch.optim.AdamW)}[optimizer]
    runs = {"triton": (triton_model, tnn.CrossEntropyLoss(), ours(triton_model.parameters(), **kwargs), device),
            "numpy": (numpy_model, tnn.CrossEntropyLoss(), ours(numpy_model.parameters(), **kwargs), "cpu"),
            "torch": (twin, nn.CrossEntropyLoss(), theirs(twin.parameters(), **kwargs), "cpu")}
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 1, 8, 8, generator=generator), torch.randint(0, 10, (6,), generator=generator))
               for _ in range(3)]
    losses = {name: [] for name in runs}
    for name, (net, criterion, opt, dev) in runs.items():
        with tkernels.use_backend("numpy" if name == "numpy" else "triton"):
            for x, y in batches:
                loss = criterion(net(x.to(dev)), y.to(dev))
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses[name].append(loss.detach().cpu())
        if name == "triton":
            assert TRITON_KERNELS_OF_LENET_TRAINING <= set(launches.names), set(launches.names)
            launches.assert_any({"sgd_kernel", "adamw_kernel"}, "optimizer")
            launches.clear()
        else:
            assert not launches.names, f"the {name} run launched Triton kernels: {set(launches.names)}"
    for other in ("numpy", "torch"):
        assert_close(torch.stack(losses["triton"]), torch.stack(losses[other]), dtype=torch.float32,
                     reduction=144, msg=f"losses vs {other}")
        for (key, a), b in zip(triton_model.state_dict().items(), runs[other][0].state_dict().values()):
            if a.is_floating_point():
                assert_close(a, b, dtype=torch.float32, reduction=144, msg=f"{key} vs {other}")
            else:
                assert torch.equal(a.cpu(), b), key


@pytest.mark.slow
def test_torch_compile_of_builtin_model():
    torch.manual_seed(0)
    model = build_model("lenet")
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)  # no graph breaks: every layer is a custom op
    x = torch.randn(8, 1, 8, 8)
    with tkernels.use_backend("numpy"):
        out = compiled(x)
        out.square().sum().backward()
        expected = twin(x)
        expected.square().sum().backward()
    assert_close(out, expected, dtype=torch.float32)
    for (key, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_close(p.grad, q.grad, dtype=torch.float32, reduction=100, msg=key)
    # the independent reference: the torch twin of the model, in float64, with the same weights
    torch_twin = build_model("lenet", impl="torch").double()
    torch_twin.load_state_dict(twin.state_dict())
    expected = torch_twin(x.double())
    expected.square().sum().backward()
    assert_close(out, expected, dtype=torch.float32)
    for (key, p), q in zip(model.named_parameters(), torch_twin.parameters()):
        assert_close(p.grad, q.grad, dtype=torch.float32, reduction=100, msg=key)


def test_train_command_smoke(tmp_path, capsys):
    plot = tmp_path / "curves.png"
    backend_before = tkernels.get_backend()
    rc = main(["train", "--epochs", "1", "--backend", "numpy", "--device", "cpu", "--limit", "150",
               "--batch-size", "32", "--compare", "--plot", str(plot), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "lenet on digits (150 train / 150 test images), numpy backend on cpu" in out
    assert "final test accuracy (tkernels):" in out and "final test accuracy (torch.nn):" in out
    assert "largest difference in epoch loss" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tkernels.get_backend() == backend_before  # the command restores the backend


def test_train_command_rejects_bad_options(capsys):
    assert main(["train", "--epochs", "0"]) == 2
    assert "--epochs must be at least 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    if not torch.cuda.is_available() and not tkernels.INTERPRET:
        assert main(["train", "--backend", "triton", "--device", "cpu"]) == 2
    with pytest.raises(SystemExit):
        main(["train", "--model", "vgg"])
