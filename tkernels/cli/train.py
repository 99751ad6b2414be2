"""``tkernels train``: train a reference model on scikit-learn's digits with tkernels layers.

    tkernels train                                  # LeNet, NumPy backend on CPU / Triton on CUDA
    tkernels train --model resnet --optimizer adamw --compare --plot curves.png

``--compare`` trains the plain torch.nn twin of the same model alongside (same seed, same
initial weights, same batches) and prints both side by side.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

DEFAULT_LR = {"sgd": 0.05, "adamw": 2e-3}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=("mlp", "lenet", "resnet"), default="lenet",
                        help="reference model (default: lenet)")
    parser.add_argument("--epochs", type=int, default=5, help="passes over the training set (default: 5)")
    parser.add_argument("--batch-size", type=int, default=64, help="minibatch size (default: 64)")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"learning rate (default: {DEFAULT_LR['sgd']} for sgd, {DEFAULT_LR['adamw']} for adamw)")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                        help="sgd (momentum 0.9) or adamw (default: sgd)")
    parser.add_argument("--backend", choices=("auto", "triton", "numpy"), default="auto",
                        help="auto: Triton kernels on CUDA, NumPy reference on CPU (default: auto)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--compile", action="store_true", help="wrap the model(s) in torch.compile")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="capture forward, backward and optimizer step into one CUDA graph after 3 eager "
                             "warm-up steps and replay it (CUDA only; a smaller last batch is skipped)")
    parser.add_argument("--compare", action="store_true",
                        help="also train the plain torch.nn twin (same seed, init and batches), side by side")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG of the loss and accuracy curves (matplotlib)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, the init and the batch order")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="use only the first N training and N test images (quick smoke runs)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch and NumPy's BLAS (default: 1 on CPU, where the tiny "
                             "tensors of this model make thread hand-offs cost more than they save; 0: "
                             "the libraries' defaults)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


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
    steps: List[int] = field(default_factory=list)


@dataclass
class Run:
    label: str
    model: torch.nn.Module  # what is called (torch.compile's wrapper under --compile)
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    history: History = field(default_factory=History)
    graphed: Optional[Callable] = None  # a GraphedTrainStep under --cuda-graphs


def _optimizer(kind: str, params, lr: float, use_tkernels: bool, capturable: bool = False) -> torch.optim.Optimizer:
    if use_tkernels:
        from .. import optim as namespace
    else:
        namespace = torch.optim
    if kind == "sgd":
        return namespace.SGD(params, lr=lr, momentum=0.9)
    # torch's AdamW keeps its step count on the host unless capturable; ours always keeps it on the device
    extra = {"capturable": True} if capturable and not use_tkernels else {}
    return namespace.AdamW(params, lr=lr, weight_decay=0.01, **extra)


def make_run(label: str, model: torch.nn.Module, *, optimizer: str = "sgd", lr: Optional[float] = None,
             seed: int = 0, use_tkernels: bool = True, compile: bool = False, cuda_graphs: bool = False) -> Run:
    """Bundle a model with its loss (tkernels' or torch's) and optimizer, and a seeded batch order;
    with ``cuda_graphs`` the training step is captured into a CUDA graph after warm-up."""
    if use_tkernels:
        from .. import nn as tnn

        criterion = tnn.CrossEntropyLoss()
    else:
        criterion = torch.nn.CrossEntropyLoss()
    opt = _optimizer(optimizer, model.parameters(), DEFAULT_LR[optimizer] if lr is None else lr, use_tkernels,
                     capturable=cuda_graphs)
    called = torch.compile(model) if compile else model
    run = Run(label, called, criterion, opt, torch.Generator().manual_seed(seed))
    if cuda_graphs:
        from ..cuda_graphs import GraphedTrainStep

        run.graphed = GraphedTrainStep(called, criterion, opt)
    return run


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
    seen = steps = 0
    batches = list(minibatches(x.shape[0], batch_size, run.generator))
    for i, idx in enumerate(batches):
        if idx.numel() < 2:  # batch norm cannot train on a single sample
            continue
        if run.graphed is not None and idx.numel() != batch_size:
            continue  # a graph replays one batch shape
        idx = idx.to(x.device)
        xb, yb = x[idx], y[idx]
        if run.graphed is not None:
            loss, logits = run.graphed(xb, yb)
        else:
            logits = run.model(xb)
            loss = run.criterion(logits, yb)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
        steps += 1
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
    run.history.steps.append(steps)


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


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
def _resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available on this machine; use --device cpu")
    return device


def _check_backend(backend: str, device: torch.device) -> Optional[str]:
    """An error message when the backend cannot run on the device, else None."""
    from .._backend import INTERPRET

    if backend == "numpy" and device.type != "cpu":
        return f"--backend numpy runs on the CPU only, but --device is {device}; use --backend triton or auto"
    if backend == "triton" and device.type == "cpu" and not INTERPRET:
        return ("--backend triton on the CPU needs Triton's interpreter: run with TRITON_INTERPRET=1 "
                "in the environment (very slow), or use --backend numpy")
    return None


def _check_cuda_graphs(args: argparse.Namespace, device: torch.device) -> Optional[str]:
    if not args.cuda_graphs:
        return None
    if device.type != "cuda":
        return (f"--cuda-graphs needs a CUDA device, but the run is on {device}: a CUDA graph records GPU "
                "launches, and there is nothing to record on the CPU; drop --cuda-graphs or use --device cuda")
    if args.compile:
        return ("--cuda-graphs and --compile are two ways to cut launch overhead; pick one "
                "(torch.compile's own graphs: mode='reduce-overhead')")
    return None


def _backend_label(backend: str, device: torch.device) -> str:
    from .._backend import INTERPRET

    if backend == "auto":
        backend = "triton" if device.type == "cuda" or INTERPRET else "numpy"
    return f"{backend} backend" + (" (interpreter)" if backend == "triton" and device.type == "cpu" else "")


@contextlib.contextmanager
def _cpu_threads(threads: Optional[int], device: torch.device):
    """Limit torch's intra-op threads and NumPy's BLAS threads for the run, then restore them."""
    if threads is None:
        threads = 1 if device.type == "cpu" else 0
    if threads <= 0:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        try:
            from threadpoolctl import threadpool_limits  # installed with scikit-learn
        except ImportError:
            yield
        else:
            with threadpool_limits(limits=threads, user_api="blas"):
                yield
    finally:
        torch.set_num_threads(previous)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    import tkernels
    from ..data import load_digits
    from ..models import build_model

    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            print(f"tkernels train: --{name.replace('_', '-')} must be at least 1, but got "
                  f"{getattr(args, name)}", file=sys.stderr)
            return 2
    try:
        device = _resolve_device(args.device)
    except (RuntimeError, ValueError) as exc:
        print(f"tkernels train: {exc}", file=sys.stderr)
        return 2
    problem = _check_backend(args.backend, device) or _check_cuda_graphs(args, device)
    if problem:
        print(f"tkernels train: {problem}", file=sys.stderr)
        return 2

    with tkernels.use_backend(args.backend), _cpu_threads(args.threads, device):
        data = load_digits(seed=args.seed, device=device, limit=args.limit)
        torch.manual_seed(args.seed)
        model = build_model(args.model).to(device)
        runs = [make_run("tkernels", model, optimizer=args.optimizer, lr=args.lr, seed=args.seed,
                         compile=args.compile, cuda_graphs=args.cuda_graphs)]
        if args.compare:
            twin = build_model(args.model, impl="torch").to(device)
            twin.load_state_dict(model.state_dict())  # same initial weights, whatever the init consumed
            runs.append(make_run("torch.nn", twin, optimizer=args.optimizer, lr=args.lr, seed=args.seed,
                                 use_tkernels=False, compile=args.compile, cuda_graphs=args.cuda_graphs))
        lr = DEFAULT_LR[args.optimizer] if args.lr is None else args.lr
        print(f"tkernels train: {args.model} on digits ({data.x_train.shape[0]} train / {data.x_test.shape[0]} "
              f"test images), {_backend_label(args.backend, device)} on {device}, {args.optimizer} lr={lr:g}, "
              f"batch {args.batch_size}, {args.epochs} epoch(s){', compiled' if args.compile else ''}"
              f"{', CUDA graphs' if args.cuda_graphs else ''}", flush=True)
        fit(runs, data, args.epochs, args.batch_size, progress=not args.no_progress,
            report=lambda line: print(line, flush=True))

    for run_ in runs:
        h = run_.history
        print(f"final test accuracy ({run_.label}): {100 * h.test_acc[-1]:.1f}%  "
              f"[{sum(h.seconds):.1f} s training, {sum(h.steps) / max(sum(h.seconds), 1e-9):.1f} steps/s]")
    if args.compare:
        diff = max(abs(a - b) for a, b in zip(runs[0].history.train_loss, runs[1].history.train_loss))
        print(f"largest difference in epoch loss between tkernels and torch.nn: {diff:.2e}")
    if args.plot:
        write_plot(args.plot, runs)
        print(f"wrote {args.plot}")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0
