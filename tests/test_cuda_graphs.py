"""CUDA-graph training, the parts that need no GPU: static buffers, the warm-up/capture/replay
sequence, a sync-free captured step, and clear errors (CPU device, shape change, no warm-up).

A fake graph API stands in for torch.cuda.graph: "capture" runs the step once to get its outputs
and then puts every parameter, buffer, gradient and optimizer state back (a real capture records
without executing); "replay" runs the step again on the static buffers and writes the static
outputs in place, which is what a replay does to the graph's memory.
"""
import contextlib

import pytest
import torch

import tkernels
import tkernels.nn as tnn
from tkernels.cli import main
from tkernels.cuda_graphs import GraphApi, GraphedTrainStep
from tkernels.models import LeNet
from tkernels.ops import losses

from helpers import HostSyncCounter


class FakeGraphApi:
    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self.side_stream_steps = 0
        self.captures = []

    @contextlib.contextmanager
    def side_stream(self):
        self.side_stream_steps += 1
        yield

    def _state(self):
        tensors = list(self.model.state_dict().values())
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return tensors

    def capture(self, fn):
        state = self._state()
        saved = [t.detach().clone() for t in state]
        with HostSyncCounter() as counter:
            outputs = fn()
        self.captures.append(counter.calls)
        with torch.no_grad():
            for t, s in zip(state, saved):
                t.copy_(s)

        def replay():
            new_outputs = fn()
            with torch.no_grad():
                for static, new in zip(outputs, new_outputs):
                    static.copy_(new)
        return replay, outputs


def setup(seed=0):
    torch.manual_seed(seed)
    model = LeNet(width=4)
    optimizer = tkernels.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer, tnn.CrossEntropyLoss()


def batches(n, size=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 1, 8, 8, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def test_graphed_steps_train_exactly_like_eager_steps(monkeypatch, one_cpu_thread):
    """On the Triton backend (the NumPy backend refuses CUDA tensors, so it is never captured)."""
    monkeypatch.setattr(losses, "_target_on_host", lambda target: False)  # the target lives on the GPU there
    data = batches(6)
    with tkernels.use_backend("triton"):
        model, optimizer, criterion = setup()
        eager_losses = []
        for x, y in data:
            optimizer.zero_grad(set_to_none=False)
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            eager_losses.append(loss.detach().clone())

        g_model, g_optimizer, g_criterion = setup()
        api = FakeGraphApi(g_model, g_optimizer)
        step = GraphedTrainStep(g_model, g_criterion, g_optimizer, warmup=2, api=api)
        graph_losses, input_addresses = [], set()
        for x, y in data:
            loss, logits = step(x, y)
            graph_losses.append(loss.clone())
            assert logits.shape == (3, 10)
            if step.captured:
                input_addresses.add((step.static_input.data_ptr(), step.static_target.data_ptr()))
                assert torch.equal(step.static_input, x) and torch.equal(step.static_target, y)
    assert api.side_stream_steps == 2 and len(api.captures) == 1
    assert api.captures[0] == [], "host syncs inside the captured step:\n" + "\n".join(api.captures[0])
    assert len(input_addresses) == 1, "the static input buffers moved between replays"
    for a, b in zip(eager_losses, graph_losses):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(model.state_dict().values(), g_model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_replayed_outputs_are_static_tensors_overwritten_in_place():
    model, optimizer, criterion = setup()
    step = GraphedTrainStep(model, criterion, optimizer, warmup=1, api=FakeGraphApi(model, optimizer))
    data = batches(3)
    step(*data[0])
    first_loss, _ = step(*data[1])
    kept = first_loss.clone()
    second_loss, _ = step(*data[2])
    assert second_loss is first_loss and not torch.equal(second_loss, kept)


def test_a_new_batch_shape_after_capture_is_refused():
    model, optimizer, criterion = setup()
    step = GraphedTrainStep(model, criterion, optimizer, warmup=1, api=FakeGraphApi(model, optimizer))
    for x, y in batches(2):
        step(x, y)
    x, y = batches(1, size=5)[0]
    with pytest.raises(RuntimeError, match=r"captured for input \(3, 1, 8, 8\).*got \(5, 1, 8, 8\)"):
        step(x, y)


def test_capture_needs_a_warm_up_step():
    model, optimizer, criterion = setup()
    with pytest.raises(ValueError, match="warmup must be at least 1"):
        GraphedTrainStep(model, criterion, optimizer, warmup=0, api=FakeGraphApi(model, optimizer))


def test_graph_api_refuses_a_cpu_model():
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device, but the model is on cpu"):
        GraphApi(torch.device("cpu"))


def test_train_cuda_graphs_on_cpu_is_a_clear_usage_error(capsys):
    assert main(["train", "--cuda-graphs", "--device", "cpu", "--epochs", "1", "--limit", "10"]) == 2
    err = capsys.readouterr().err
    assert "--cuda-graphs needs a CUDA device, but the run is on cpu" in err
