"""No host sync and no host-built tensor in a steady-state training step.

What counts as a sync here: reading a tensor's value into Python (``.item()``, ``bool()``,
``float()``, ``int()``, ``.tolist()``), copying it to the host (``.cpu()``, ``.numpy()``), and building
a tensor from host data (``torch.tensor``, ``torch.as_tensor``, ``torch.from_numpy``). On a GPU each of
these waits for the device (or copies host memory into a CUDA graph's stale buffer). This machine has
CPU tensors only, where such a read waits for nothing, so the test takes the code paths that run on
CUDA and counts every Python-level read whatever the tensor's device:

* the Triton backend (through the interpreter) is the path that runs on GPUs and must count zero.
  Cross-entropy checks a target in host memory on the host (which is no sync), so the test declares
  the target device-resident, which is what it is on a GPU, and the device-side check runs;
* the NumPy backend moves every tensor through NumPy by design (its bridge: ``.numpy()`` and
  ``torch.from_numpy``), so for it the bridge is exempt and everything else must still count zero.
"""
import pytest
import torch

import tkernels
import tkernels.nn as tnn
from tkernels.models import LeNet
from tkernels.ops import losses

from helpers import HostSyncCounter

BRIDGE = ("numpy", "from_numpy")


def syncs(counter: HostSyncCounter, exempt=()) -> list:
    """The recorded calls ("<kind> <name> at <file>:<line>"), less those named in ``exempt``."""
    return [call for call in counter.calls if call.split(" at ")[0].split()[-1] not in exempt]


def test_the_counter_sees_every_kind_of_sync():
    t = torch.ones(2)
    with HostSyncCounter() as counter:
        t.sum().item(), bool(t[0]), float(t[0]), int(t[0]), t.tolist(), t.cpu(), t.numpy()
        torch.tensor([1.0]), torch.as_tensor([1.0]), torch.from_numpy(t.numpy())
    def names(calls):
        return {call.split(" at ")[0].split()[-1] for call in calls}
    assert names(counter.calls) == set(HostSyncCounter.SYNCS + HostSyncCounter.HOST_BUILT)
    assert names(syncs(counter, exempt=BRIDGE)) == set(HostSyncCounter.SYNCS + HostSyncCounter.HOST_BUILT) - set(BRIDGE)


def lenet_step(model, optimizer, criterion, images, labels):
    optimizer.zero_grad(set_to_none=False)
    loss = criterion(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss


@pytest.mark.parametrize("backend_name", ["triton", "numpy"])
def test_a_lenet_adamw_cross_entropy_step_has_no_host_sync(backend_name, monkeypatch, one_cpu_thread):
    monkeypatch.setattr(losses, "_target_on_host", lambda target: False)
    torch.manual_seed(0)
    model = LeNet(width=4)
    optimizer = tkernels.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = tnn.CrossEntropyLoss()
    images, labels = torch.randn(3, 1, 8, 8), torch.randint(0, 10, (3,))
    with tkernels.use_backend(backend_name):
        for _ in range(2):  # the first step creates the optimizer state
            lenet_step(model, optimizer, criterion, images, labels)
        before = [p.detach().clone() for p in model.parameters()]
        with HostSyncCounter() as counter:
            loss = lenet_step(model, optimizer, criterion, images, labels)
    found = syncs(counter, exempt=BRIDGE if backend_name == "numpy" else ())
    assert found == [], "host syncs in one training step:\n" + "\n".join(found)
    assert torch.isfinite(loss.detach()).all()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters())), "the step changed nothing"


@pytest.mark.parametrize("backend_name", ["triton", "numpy"])
def test_lenet_forward_backward_and_cross_entropy_have_no_host_sync(backend_name, monkeypatch, one_cpu_thread):
    """The model and loss alone (the optimizer step is covered above)."""
    monkeypatch.setattr(losses, "_target_on_host", lambda target: False)
    torch.manual_seed(0)
    model, criterion = LeNet(width=4), tnn.CrossEntropyLoss()
    images, labels = torch.randn(3, 1, 8, 8), torch.randint(0, 10, (3,))
    with tkernels.use_backend(backend_name):
        criterion(model(images), labels).backward()
        with HostSyncCounter() as counter:
            loss = criterion(model(images), labels)
            loss.backward()
    found = syncs(counter, exempt=BRIDGE if backend_name == "numpy" else ())
    assert found == [], "host syncs in forward, loss and backward:\n" + "\n".join(found)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_device_side_target_check_raises_without_a_host_read(monkeypatch):
    """On a GPU the assert fires asynchronously; on CPU tensors torch._assert_async raises at once,
    which lets the device branch be tested here."""
    monkeypatch.setattr(losses, "_target_on_host", lambda target: False)
    logits = torch.randn(4, 3)
    bad, ignored = torch.tensor([0, 1, 3, 2]), torch.tensor([0, -100, 2, 1])
    with HostSyncCounter() as counter:
        with pytest.raises(RuntimeError, match=r"target is out of bounds: expected class indices in \[0, 2\]"):
            tkernels.functional.cross_entropy(logits, bad)
        tkernels.functional.cross_entropy(logits, ignored)  # ignore_index passes
    assert counter.calls == [], counter.report()


def test_host_target_check_still_raises_torchs_index_error():
    with pytest.raises(IndexError, match="Target 3 is out of bounds"):
        tkernels.functional.cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, 3, 2]))
