"""``tkernels train``: train a reference model on scikit-learn's digits with tkernels layers.

    tkernels train                                  # LeNet, NumPy backend on CPU / Triton on CUDA
    tkernels train --model resnet --optimizer adamw --compare --plot curves.png

``--compare`` trains the plain torch.nn twin of the same model alongside (same seed, same
initial weights, same batches) and prints both side by side.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
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
# The command
# ---------------------------------------------------------------------------------------------
def _resolve_device(spec: str) -> torch.device:
    import torch

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


def _backend_label(backend: str, device: torch.device) -> str:
    from .._backend import INTERPRET

    if backend == "auto":
        backend = "triton" if device.type == "cuda" or INTERPRET else "numpy"
    return f"{backend} backend" + (" (interpreter)" if backend == "triton" and device.type == "cpu" else "")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    import torch

    import tkernels
    from .._threads import cpu_threads
    from ..data import load_digits
    from ..models import build_model
    from .train_loop import fit, make_run, write_plot

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
    problem = _check_backend(args.backend, device)
    if problem:
        print(f"tkernels train: {problem}", file=sys.stderr)
        return 2

    threads = args.threads
    if threads is None:  # one thread on the CPU (see tkernels._threads); the libraries' defaults on a GPU
        threads = 1 if device.type == "cpu" else 0
    with tkernels.use_backend(args.backend), cpu_threads(threads):
        data = load_digits(seed=args.seed, device=device, limit=args.limit)
        torch.manual_seed(args.seed)
        model = build_model(args.model).to(device)
        runs = [make_run("tkernels", model, optimizer=args.optimizer, lr=args.lr, seed=args.seed,
                         compile=args.compile)]
        if args.compare:
            twin = build_model(args.model, impl="torch").to(device)
            twin.load_state_dict(model.state_dict())  # same initial weights, whatever the init consumed
            runs.append(make_run("torch.nn", twin, optimizer=args.optimizer, lr=args.lr, seed=args.seed,
                                 use_tkernels=False, compile=args.compile))
        lr = DEFAULT_LR[args.optimizer] if args.lr is None else args.lr
        print(f"tkernels train: {args.model} on digits ({data.x_train.shape[0]} train / {data.x_test.shape[0]} "
              f"test images), {_backend_label(args.backend, device)} on {device}, {args.optimizer} lr={lr:g}, "
              f"batch {args.batch_size}, {args.epochs} epoch(s){', compiled' if args.compile else ''}", flush=True)
        fit(runs, data, args.epochs, args.batch_size, progress=not args.no_progress,
            report=lambda line: print(line, flush=True))

    for run_ in runs:
        h = run_.history
        print(f"final test accuracy ({run_.label}): {100 * h.test_acc[-1]:.1f}%  "
              f"[{sum(h.seconds):.1f} s training]")
    if args.compare:
        diff = max(abs(a - b) for a, b in zip(runs[0].history.train_loss, runs[1].history.train_loss))
        print(f"largest difference in epoch loss between tkernels and torch.nn: {diff:.2e}")
    if args.plot:
        write_plot(args.plot, runs)
        print(f"wrote {args.plot}")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0
