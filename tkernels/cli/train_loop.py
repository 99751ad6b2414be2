"""The training loop behind ``tkernels train``: a model with its loss, optimizer and seeded batch
order, epochs with a progress bar, evaluation, the side-by-side report and the plot. Kept apart
from :mod:`tkernels.cli.train` so that parsing the command line does not import torch."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from .train import DEFAULT_LR


# ---------------------------------------------------------------------------------------------
# One training run: a model with its loss, optimizer, batch order and history.
# ---------------------------------------------------------------------------------------------
@dataclass
class History:
    train_loss: List[float] = field(default_factory=list)
    train_acc: List[float] = field(default_factory=list)
    test_loss: List[float] = field(default_factory=list)
    test_acc: List[float] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)


@dataclass
class Run:
    label: str
    model: torch.nn.Module  # what is called (torch.compile's wrapper under --compile)
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    history: History = field(default_factory=History)


def _optimizer(kind: str, params, lr: float, use_tkernels: bool) -> torch.optim.Optimizer:
    if use_tkernels:
        from .. import optim as namespace
    else:
        namespace = torch.optim
    if kind == "sgd":
        return namespace.SGD(params, lr=lr, momentum=0.9)
    return namespace.AdamW(params, lr=lr, weight_decay=0.01)


def make_run(label: str, model: torch.nn.Module, *, optimizer: str = "sgd", lr: Optional[float] = None,
             seed: int = 0, use_tkernels: bool = True, compile: bool = False) -> Run:
    """Bundle a model with its loss (tkernels' or torch's) and optimizer, and a seeded batch order."""
    if use_tkernels:
        from .. import nn as tnn

        criterion = tnn.CrossEntropyLoss()
    else:
        criterion = torch.nn.CrossEntropyLoss()
    opt = _optimizer(optimizer, model.parameters(), DEFAULT_LR[optimizer] if lr is None else lr, use_tkernels)
    called = torch.compile(model) if compile else model
    return Run(label, called, criterion, opt, torch.Generator().manual_seed(seed))


class ProgressBar:
    """A one-line bar on stderr, redrawn in place; silent when stderr is not a terminal."""

    def __init__(self, total: int, prefix: str, enabled: bool = True, width: int = 30):
        self.total, self.prefix, self.width = total, prefix, width
        self.enabled = enabled and sys.stderr.isatty()
        self._last = 0.0

    def update(self, done: int, loss: Callable[[], float]) -> None:
        """Redraw at most every 0.1 s; ``loss`` is only called then (it may wait for the GPU)."""
        now = time.perf_counter()
        if not self.enabled or (done < self.total and now - self._last < 0.1):
            return
        self._last = now
        filled = self.width * done // max(1, self.total)
        sys.stderr.write(f"\r{self.prefix} [{'#' * filled}{'.' * (self.width - filled)}] "
                         f"{done}/{self.total} loss {loss():.4f}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * (len(self.prefix) + self.width + 40) + "\r")
            sys.stderr.flush()


def train_epoch(run: Run, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                bar: Optional[ProgressBar] = None) -> None:
    from ..data import minibatches

    run.model.train()
    start = time.perf_counter()
    # Sums stay on the device, so a CUDA run is not synchronised at every step.
    total_loss = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    seen = 0
    batches = list(minibatches(x.shape[0], batch_size, run.generator))
    for i, idx in enumerate(batches):
        if idx.numel() < 2:  # batch norm cannot train on a single sample
            continue
        idx = idx.to(x.device)
        xb, yb = x[idx], y[idx]
        logits = run.model(xb)
        loss = run.criterion(logits, yb)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        total_loss += loss.detach() * idx.numel()
        correct += (logits.argmax(dim=1) == yb).sum()
        seen += idx.numel()
        if bar is not None:
            bar.update(i + 1, lambda: float(total_loss) / seen)
    if bar is not None:
        bar.close()
    run.history.train_loss.append(float(total_loss) / max(1, seen))
    run.history.train_acc.append(int(correct) / max(1, seen))
    run.history.seconds.append(time.perf_counter() - start)


@torch.no_grad()
def evaluate(run: Run, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256):
    """(mean loss, accuracy) over (x, y) in eval mode."""
    run.model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        logits = run.model(xb)
        total_loss += float(run.criterion(logits, yb)) * xb.shape[0]
        correct += int((logits.argmax(dim=1) == yb).sum())
    n = max(1, x.shape[0])
    return total_loss / n, correct / n


def fit(runs: Sequence[Run], data, epochs: int, batch_size: int, progress: bool = True,
        report=print) -> None:
    """Train every run for ``epochs`` epochs, one epoch of each in turn, reporting each epoch."""
    width = len(str(epochs))
    if len(runs) > 1:
        report(_compare_header(runs, epochs))
    for epoch in range(1, epochs + 1):
        for run in runs:
            bar = ProgressBar(math.ceil(data.x_train.shape[0] / batch_size),
                              f"epoch {epoch:>{width}}/{epochs} {run.label}", progress)
            train_epoch(run, data.x_train, data.y_train, batch_size, bar)
            test_loss, test_acc = evaluate(run, data.x_test, data.y_test)
            run.history.test_loss.append(test_loss)
            run.history.test_acc.append(test_acc)
        report(_epoch_line(runs, epoch, epochs))


def _cells(h: History, i: int) -> str:
    return (f"loss {h.train_loss[i]:.4f}  train acc {100 * h.train_acc[i]:5.1f}%  "
            f"test acc {100 * h.test_acc[i]:5.1f}%  {h.seconds[i]:5.1f} s")


def _epoch_width(epochs: int) -> int:
    return max(len("epoch"), 2 * len(str(epochs)) + 1)


def _compare_header(runs: Sequence[Run], epochs: int) -> str:
    cell = len(_cells(History([0.0], [0.0], [0.0], [0.0], [0.0]), 0))
    return f"{'epoch':<{_epoch_width(epochs)}}  " + " | ".join(f"{run.label:<{cell}}" for run in runs)


def _epoch_line(runs: Sequence[Run], epoch: int, epochs: int) -> str:
    return f"{f'{epoch}/{epochs}':<{_epoch_width(epochs)}}  " + " | ".join(
        _cells(run.history, epoch - 1) for run in runs)


def write_plot(path: str, runs: Sequence[Run]) -> None:
    """Loss and accuracy per epoch, one line style per run (matplotlib, Agg, no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install matplotlib (or 'tkernels[demo]')") from exc
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        h = run.history
        epochs = range(1, len(h.train_loss) + 1)
        style = dict(color=f"C{i}", marker="ox"[i % 2], alpha=1.0 if i == 0 else 0.7)
        for ax, train, test, scale in ((ax_loss, h.train_loss, h.test_loss, 1),
                                       (ax_acc, h.train_acc, h.test_acc, 100)):
            ax.plot(epochs, [scale * v for v in train], "-", label=f"{run.label} train", **style)
            ax.plot(epochs, [scale * v for v in test], "--", label=f"{run.label} test", **style)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
