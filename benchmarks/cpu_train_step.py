"""One training step of the demo LeNet on the CPU: tkernels' NumPy backend against plain torch.

    python benchmarks/cpu_train_step.py [--batch-size 64] [--model lenet] [--repeats 30]

A step is forward, cross-entropy, backward and an SGD (momentum) update on a batch of 8x8
digits, the work `tkernels train` does per batch. Both sides use the same model, batch and
optimizer settings; the median of ``--repeats`` timed steps (after warm-up) is reported with
the ratio tkernels / torch. The goal for the NumPy path is a ratio within 3x.

Both sides run single-threaded by default: at these sizes (a 64 x 16 x 8 x 8 activation is
65k values) thread hand-offs cost more than they save, and on a shared machine they thrash.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import tkernels
from tkernels.models import MODELS, build_model


def step_timer(model, criterion, optimizer, x, y):
    def step():
        loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


def median_seconds(step, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=tuple(MODELS), default="lenet")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--profile", action="store_true",
                        help="also print where a tkernels step spends its time, per op (torch.profiler)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for torch and NumPy's BLAS, the same for both sides (default: 1, as "
                             "`tkernels train` uses on CPU); 0 keeps the libraries' defaults")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        from threadpoolctl import threadpool_limits  # installed with scikit-learn

        threadpool_limits(limits=args.threads, user_api="blas")

    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 1, 8, 8)
    y = torch.randint(0, 10, (args.batch_size,))
    ours = build_model(args.model)
    theirs = build_model(args.model, impl="torch")
    theirs.load_state_dict(ours.state_dict())
    runs = {
        "tkernels (numpy backend)": step_timer(ours, tkernels.nn.CrossEntropyLoss(), tkernels.optim.SGD(
            ours.parameters(), lr=0.05, momentum=0.9), x, y),
        "torch (cpu)": step_timer(theirs, torch.nn.CrossEntropyLoss(), torch.optim.SGD(
            theirs.parameters(), lr=0.05, momentum=0.9), x, y),
    }
    results = {}
    with tkernels.use_backend("numpy"):
        for label, step in runs.items():
            results[label] = median_seconds(step, args.repeats)
    print(f"{args.model} training step, batch {args.batch_size}, {torch.get_num_threads()} torch thread(s), "
          f"median of {args.repeats}:")
    for label, seconds in results.items():
        print(f"  {label:<26} {1e3 * seconds:8.2f} ms")
    ours_s, theirs_s = results.values()
    print(f"  ratio tkernels / torch      {ours_s / theirs_s:8.2f}x  (goal: <= 3x)")
    if args.profile:
        print_profile(next(iter(runs.values())), args.repeats)


def print_profile(step, repeats: int) -> None:
    """Self CPU time per op of a tkernels step (custom ops include their NumPy reference)."""
    from torch.profiler import ProfilerActivity, profile

    with tkernels.use_backend("numpy"), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
