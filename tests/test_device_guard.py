"""Multiple GPUs: every op's CUDA implementation runs on its tensors' device (a Triton launch uses the
current device), and tensors on different devices are refused with a clear error. No second GPU
exists here, so the guard is checked with a tensor that reports cuda:1 and a recording
torch.cuda.device; the refusal is checked with CPU and meta tensors."""
import contextlib

import pytest
import torch

import tkernels.functional as F
from tkernels.ops import _common


class _ReportsCuda1(torch.Tensor):
    """A CPU tensor whose .device says cuda:1, to drive the guard without a GPU."""

    @property
    def device(self):
        return torch.device("cuda", 1)


class _Entered(Exception):
    pass


@pytest.fixture
def entered(monkeypatch):
    """Current device 0; entering torch.cuda.device(i) records i and stops the call there."""
    calls = []

    def device(index):
        calls.append(torch.device("cuda", index).index if isinstance(index, int) else torch.device(index).index)
        raise _Entered

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    return calls


def _fake_cuda1():
    return torch.Tensor._make_subclass(_ReportsCuda1, torch.zeros(3))


def test_every_op_has_a_guarded_cuda_implementation():
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("tkernels::"))
    assert len(names) >= 29, names
    unguarded = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")
                 or n not in _common.GUARDED_OPS]
    assert unguarded == [], f"ops whose CUDA kernel would launch on the current device: {unguarded}"


@pytest.mark.parametrize("name", sorted(_common.GUARDED_OPS))
def test_guard_enters_the_tensor_device(entered, name):
    impl = _common.GUARDED_OPS[name]
    first = [_fake_cuda1()] if name in ("tkernels::sgd_step", "tkernels::adamw_step") else _fake_cuda1()
    with pytest.raises(_Entered):
        impl(first)
    assert entered == [1]


def test_no_guard_when_the_device_is_current(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device", lambda index: pytest.fail("guard entered needlessly"))
    ran = []
    guarded = _common.on_tensor_device(lambda x, y: ran.append((x, y)) or "result")
    assert guarded(_fake_cuda1(), 5) == "result" and len(ran) == 1
    cpu = _common.on_tensor_device(lambda x: "cpu result")
    assert cpu(torch.zeros(2)) == "cpu result"


def test_guard_is_active_while_the_implementation_runs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    state = {"current": 0}

    @contextlib.contextmanager
    def device(index):
        previous, state["current"] = state["current"], index
        yield
        state["current"] = previous

    monkeypatch.setattr(torch.cuda, "device", device)
    seen = _common.on_tensor_device(lambda x: state["current"])(_fake_cuda1())
    assert seen == 1 and state["current"] == 0


# ---- tensors on different devices --------------------------------------------------------------
def _meta(*shape):
    return torch.empty(*shape, device="meta")


MISMATCHED = {
    "linear weight": lambda: F.linear(torch.randn(2, 3), _meta(4, 3)),
    "linear bias": lambda: F.linear(torch.randn(2, 3), torch.randn(4, 3), _meta(4)),
    "conv2d weight": lambda: F.conv2d(torch.randn(1, 2, 4, 4), _meta(3, 2, 3, 3)),
    "conv2d bias": lambda: F.conv2d(torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3), _meta(3)),
    "batch_norm running_mean": lambda: F.batch_norm(torch.randn(2, 3), _meta(3), torch.ones(3), training=True),
    "batch_norm weight": lambda: F.batch_norm(torch.randn(2, 3), None, None, _meta(3), training=True),
    "cross_entropy target": lambda: F.cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long,
                                                                                 device="meta")),
    "cross_entropy weight": lambda: F.cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long),
                                                    weight=_meta(3)),
    "mse_loss target": lambda: F.mse_loss(torch.randn(2, 3), _meta(2, 3)),
}


@pytest.mark.parametrize("case", MISMATCHED)
def test_tensors_on_different_devices_are_refused(backend, case):
    with pytest.raises(RuntimeError, match=r"(?s)(meta.*cpu|cpu.*meta)") as info:
        MISMATCHED[case]()
    name = case.split()[1]
    assert name in str(info.value), f"the error should name the argument {name!r}: {info.value}"

