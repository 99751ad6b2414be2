"""The eager fast path (ops/_dispatch.py): plain eager calls skip torch.library's dispatch and
autograd.Function when nothing needs them; tracing, fake tensors and autocast still get the
registered custom op; mutated arguments still get their version counter bumped."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import tkernels
import tkernels.functional as TF
from tkernels.ops import _dispatch
from tkernels.ops import elementwise, linear as linear_ops


@pytest.fixture
def op_calls(monkeypatch):
    """Counts, per path, the calls of the linear and in-place activation custom ops."""
    calls = {"direct": 0, "registered": 0}
    for op in (linear_ops.linear_forward, elementwise.activation_forward_inplace):
        impl, packet = op.impl, op.packet

        def direct(*args, impl=impl):
            calls["direct"] += 1
            return impl(*args)

        def registered(*args, packet=packet):
            calls["registered"] += 1
            return packet(*args)
        monkeypatch.setattr(op, "impl", direct)
        monkeypatch.setattr(op, "packet", registered)
    return calls


def test_plain_eager_calls_run_the_implementation_directly(op_calls):
    x, w = torch.randn(3, 5), torch.randn(4, 5, requires_grad=True)
    y = TF.linear(x, w)
    assert op_calls == {"direct": 1, "registered": 0}
    y.sum().backward()  # the autograd graph is still built
    torch.testing.assert_close(w.grad, x.sum(0).expand(4, 5))


def test_fake_tensors_go_through_the_registered_op(op_calls):
    with FakeTensorMode():
        y = TF.linear(torch.randn(3, 5), torch.randn(4, 5))
    assert y.shape == (3, 4) and op_calls == {"direct": 0, "registered": 1}


def test_autocast_casts_before_the_fast_path(op_calls):
    """Autocast is applied by the Python entry points (ops/_autocast.py), so the op itself may run
    directly and sees the cast inputs."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with tkernels.use_backend("numpy"):
            y = TF.linear(torch.randn(3, 5), torch.randn(4, 5))
    assert y.dtype == torch.bfloat16 and op_calls == {"direct": 1, "registered": 0}


def test_meta_tensors_go_through_the_registered_op():
    y = TF.linear(torch.randn(3, 5, device="meta"), torch.randn(4, 5, device="meta"))
    assert y.device.type == "meta" and y.shape == (3, 4)


def test_torch_compile_traces_the_registered_op(op_calls):
    compiled = torch.compile(lambda x, w: TF.linear(x, w), fullgraph=True, backend="eager")
    x, w = torch.randn(3, 5), torch.randn(4, 5)
    torch.testing.assert_close(compiled(x, w), x @ w.t(), rtol=1e-5, atol=1e-5)
    assert op_calls["registered"] >= 1


def test_no_grad_calls_skip_autograd_function(monkeypatch):
    applied = []
    original = _dispatch._eager_apply

    def recording(function):
        applied.append(function.__name__)
        return original(function)
    monkeypatch.setattr(_dispatch, "_eager_apply", recording)
    x, w = torch.randn(3, 5), torch.randn(4, 5, requires_grad=True)
    with torch.no_grad():
        y = TF.linear(x, w)
    assert applied == [] and not y.requires_grad
    TF.linear(x, w.detach())
    assert applied == []
    y = TF.linear(x, w)
    assert applied == ["LinearFunction"] and y.requires_grad


def test_in_place_ops_bump_the_version_counter_on_the_direct_path(op_calls):
    """autograd must still see an in-place change to a tensor saved for backward."""
    x = torch.randn(4, requires_grad=True)
    y = x.exp()  # exp saves its output
    before = y._version
    with torch.no_grad():
        TF.relu(y, inplace=True)
    assert op_calls["direct"] == 1 and y._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_optimizer_steps_bump_the_parameters_versions():
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    optimizer = tkernels.optim.SGD([p], lr=0.1)
    before = p._version
    optimizer.step()
    assert p._version > before


def test_the_direct_path_of_every_op_keeps_the_device_guard_on_cuda():
    import importlib
    import pkgutil

    import tkernels.ops as ops_package
    from tkernels.ops import _common

    modules = [importlib.import_module(f"tkernels.ops.{m.name}") for m in pkgutil.iter_modules(ops_package.__path__)]
    eager_ops = {v.qualname: v for m in modules for v in vars(m).values() if isinstance(v, _dispatch.EagerCustomOp)}
    assert len(eager_ops) >= 29 and set(eager_ops) == set(_common.GUARDED_OPS)
    for name, op in eager_ops.items():
        assert op.cuda_impl is _common.GUARDED_OPS[name] and op.impl is not op.cuda_impl, name
