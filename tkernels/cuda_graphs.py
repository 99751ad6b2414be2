"""A whole training step (forward, loss, backward, optimizer step) replayed as one CUDA graph.

This is torch's "whole network capture" recipe (torch.cuda.graphs docs) packaged for a model, a
loss and an optimizer:

1. the first ``warmup`` steps run eagerly on a side stream, with the real batches: they compile and
   autotune every kernel (tuning cannot run during capture, see ops/_tuning.py), create the
   optimizer state and the ``.grad`` tensors;
2. the next step is captured into a CUDA graph, reading its batch from static input buffers and
   writing its loss and logits to static outputs; every tensor it allocates comes from the graph's
   private memory pool, so replays find them at the same addresses;
3. every later step copies its batch into the static buffers and replays the graph: one launch
   from the host for the whole step.

The captured step zeroes the existing gradients and lets backward accumulate into them, so the
gradients live outside the graph's pool and are the very tensors the optimizer reads; it needs the
batch shape it was captured with (a smaller last batch must be run another way or dropped). Anything
that reads a tensor on the host, or builds a tensor from host data, cannot be in the step: it would
either fail during capture or be frozen into the graph. The capture machinery is a parameter so the
rest can be tested on the CPU (``GraphApi``).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor


class GraphApi:
    """What GraphedTrainStep needs from CUDA: a side stream for warm-up, and capture of a callable
    into a replayable graph. :meth:`capture` returns (replay, outputs of the captured call)."""

    def __init__(self, device: torch.device):
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(f"CUDA graphs need a CUDA device, but the model is on {device}"
                               + ("" if torch.cuda.is_available() else " and this machine has no CUDA device"))
        self.device = device

    @contextlib.contextmanager
    def side_stream(self):
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def capture(self, fn: Callable[[], Tuple[Tensor, ...]]):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = fn()
        return graph.replay, outputs


class GraphedTrainStep:
    """``step(x, y) -> (loss, logits)``: one training step, replayed from a CUDA graph after warm-up.

    The returned tensors are the graph's static outputs: the next step overwrites them, so detach
    and copy (or accumulate on the device) what you keep.
    """

    def __init__(self, model: torch.nn.Module, criterion: Callable, optimizer: torch.optim.Optimizer, *,
                 warmup: int = 3, api: Optional[GraphApi] = None):
        if warmup < 1:
            raise ValueError(f"GraphedTrainStep: warmup must be at least 1 step (tuning and state creation "
                             f"cannot happen during capture), but got {warmup}")
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.warmup = warmup
        self.api = api if api is not None else GraphApi(next(model.parameters()).device)
        self.steps = 0
        self.static_input: Optional[Tensor] = None
        self.static_target: Optional[Tensor] = None
        self.static_outputs: Optional[Tuple[Tensor, Tensor]] = None
        self._replay: Optional[Callable[[], None]] = None

    @property
    def captured(self) -> bool:
        return self._replay is not None

    def _body(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """The step itself: no host reads, no host-built tensors, gradients zeroed in place."""
        self.optimizer.zero_grad(set_to_none=False)
        logits = self.model(x)
        loss = self.criterion(logits, y)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), logits.detach()

    def __call__(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        self.steps += 1
        if self.steps <= self.warmup:
            with self.api.side_stream():
                return self._body(x, y)
        if not self.captured:
            self.static_input, self.static_target = x.clone(), y.clone()
            if any(p.grad is None for p in self.model.parameters() if p.requires_grad):
                raise RuntimeError("GraphedTrainStep: every trainable parameter needs a gradient after warm-up; "
                                   "a parameter the loss does not reach cannot be in a captured step")
            self._replay, self.static_outputs = self.api.capture(
                lambda: self._body(self.static_input, self.static_target))
        elif x.shape != self.static_input.shape or y.shape != self.static_target.shape:
            raise RuntimeError(f"GraphedTrainStep: the graph was captured for input {tuple(self.static_input.shape)} "
                               f"and target {tuple(self.static_target.shape)}, but got {tuple(x.shape)} and "
                               f"{tuple(y.shape)}; a CUDA graph replays fixed shapes (drop or pad the last batch)")
        else:
            self.static_input.copy_(x)
            self.static_target.copy_(y)
        self._replay()
        return self.static_outputs
