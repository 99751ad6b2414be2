"""One training step of the demo LeNet on the CPU: tkernels' NumPy backend against plain torch.

    python benchmarks/cpu_train_step.py [--batch-size 64] [--model lenet] [--repeats 30] [--ops] [--profile]
                                        [--clock wall|cpu] [--threads 1] [--stem-batch 2]

A step is forward, cross-entropy, backward and an SGD (momentum) update on a batch of 8x8
digits, the work `tkernels train` does per batch. Both sides use the same model, batch and
optimizer settings; the median of ``--repeats`` timed steps (after warm-up) is reported with
the ratio tkernels / torch. The goal for the NumPy path is a ratio within 3x.

``--ops`` adds a per-op table: every layer of the model at the shape it sees in the step, the
loss, the optimizer step and the ResNet-50 stem convolution (7x7, stride 2, 3 -> 64 channels,
224x224, batch ``--stem-batch``), forward and forward+backward, tkernels next to torch.

Both sides run single-threaded by default: at these sizes (a 64 x 16 x 8 x 8 activation is
65k values) thread hand-offs cost more than they save, and on a shared machine they thrash.
The two sides are timed in alternation (one tkernels call, one torch call, ...), so a change
in machine load while the benchmark runs shifts both medians alike instead of the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch

import tkernels
from tkernels._threads import cpu_threads
from tkernels.bench.cases import TORCH_ACTIVATIONS
from tkernels.models import MODELS, build_model

PROVIDERS = ("tkernels (numpy backend)", "torch (cpu)")


def step_timer(model, criterion, optimizer, x, y):
    def step():
        loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def median_seconds(calls: Dict[str, Callable[[], object]], repeats: int, clock: str = "wall",
                   warmup: int = 3) -> Dict[str, float]:
    """Median seconds per call of each callable, timed in alternation after `warmup` untimed rounds."""
    now = CLOCKS[clock]
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: Dict[str, List[float]] = {label: [] for label in calls}
    for _ in range(repeats):
        for label, call in calls.items():
            start = now()
            call()
            times[label].append(now() - start)
    return {label: statistics.median(t) for label, t in times.items()}


# ---------------------------------------------------------------------------------------------
# Per-op table
# ---------------------------------------------------------------------------------------------
def _layer_inputs(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The input each computing leaf layer sees in a forward pass of `model` (training mode)."""
    seen: Dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, args[0].detach()))
             for name, module in model.named_modules()
             if not list(module.children()) and not isinstance(module, (torch.nn.Identity, torch.nn.Flatten))]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return seen


def _calls(fn: Callable, x: torch.Tensor, params=()) -> Tuple[Callable, Callable]:
    """(forward, forward+backward) of fn on input x; backward takes the gradients of the input
    and of `params`, for a fixed random output gradient."""
    x = x.clone().requires_grad_(True)
    wrt = [x, *params]
    with torch.no_grad():
        grad_out = torch.randn_like(fn(x))

    def forward():
        with torch.no_grad():
            return fn(x)

    def forward_backward():
        return torch.autograd.grad(fn(x), wrt, grad_out)

    return forward, forward_backward


def _describe(module: torch.nn.Module, x: torch.Tensor) -> str:
    shape = "x".join(map(str, x.shape))
    name = type(module).__name__
    act = getattr(module, "activation", None)
    return f"{name}{'+' + str(act) if act is not None and not act.is_identity else ''} {shape}"


def _same_math(mine: torch.nn.Module, reference: torch.nn.Module) -> Callable:
    """torch's computation of what `mine` computes: a tkernels layer with a fused activation stands for
    torch's layer and the activation module after it, so torch's row times both."""
    act = getattr(mine, "activation", None)
    if act is None or act.is_identity or getattr(reference, "activation", None) is not None:
        return reference
    torch_act = TORCH_ACTIVATIONS[act.name]
    return lambda z: torch_act(reference(z), act.param)


def op_rows(model_name: str, batch_size: int, stem_batch: int) -> List[Tuple[str, Dict[str, Callable]]]:
    """(label, {provider: callable}) for every op the step runs, in both modes, plus the stem conv."""
    torch.manual_seed(0)
    x = torch.randn(batch_size, 1, 8, 8)
    target = torch.randint(0, 10, (batch_size,))
    ours, theirs = build_model(model_name), build_model(model_name, impl="torch")
    theirs.load_state_dict(ours.state_dict())
    ours_in, theirs_in = _layer_inputs(ours, x), _layer_inputs(theirs, x)
    ours_layers, theirs_layers = dict(ours.named_modules()), dict(theirs.named_modules())
    pairs = [(ours_layers[name], theirs_layers[name], ours_in[name]) for name in ours_in if name in theirs_in]

    stem = torch.nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    stem_ours = tkernels.nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    stem_ours.load_state_dict(stem.state_dict())
    pairs.append((stem_ours, stem, torch.randn(stem_batch, 3, 224, 224)))

    rows = []
    for mine, reference, inp in pairs:
        (f_ours, fb_ours), (f_ref, fb_ref) = (_calls(fn, inp, list(m.parameters()))
                                              for fn, m in ((mine, mine), (_same_math(mine, reference), reference)))
        label = _describe(mine, inp)
        rows.append((f"{label} fwd", dict(zip(PROVIDERS, (f_ours, f_ref)))))
        rows.append((f"{label} fwd+bwd", dict(zip(PROVIDERS, (fb_ours, fb_ref)))))

    logits = torch.randn(batch_size, 10)
    for mode in ("fwd", "fwd+bwd"):
        calls = [_calls(lambda z, loss=loss: loss(z, target), logits)[mode == "fwd+bwd"]
                 for loss in (tkernels.nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss())]
        rows.append((f"CrossEntropyLoss {batch_size}x10 {mode}", dict(zip(PROVIDERS, calls))))

    steps = []
    for model, optimizer in ((ours, tkernels.optim.SGD), (theirs, torch.optim.SGD)):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        steps.append(optimizer(model.parameters(), lr=1e-3, momentum=0.9).step)
    params = sum(p.numel() for p in ours.parameters())
    rows.append((f"SGD(momentum) step, {params} params", dict(zip(PROVIDERS, steps))))
    return rows


def print_op_table(model_name: str, batch_size: int, stem_batch: int, repeats: int, clock: str, threads: str) -> None:
    print(f"\nper-op, {clock} time, median of {repeats} (ms), both sides at {threads}:")
    print(f"  {'op and input shape':<52} {'tkernels':>9} {'torch':>9} {'ratio':>7}")
    with tkernels.use_backend("numpy"):
        for label, calls in op_rows(model_name, batch_size, stem_batch):
            ours_s, theirs_s = median_seconds(calls, repeats, clock).values()
            print(f"  {label:<52} {1e3 * ours_s:9.3f} {1e3 * theirs_s:9.3f} {ours_s / theirs_s:6.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=tuple(MODELS), default="lenet")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--ops", action="store_true",
                        help="also print per-op forward and forward+backward times at the model's layer shapes, "
                             "and the ResNet-50 stem conv")
    parser.add_argument("--stem-batch", type=int, default=2, help="batch of the ResNet-50 stem conv row (default 2)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: CPU time of the calling thread, which leaves out the time the "
                             "thread waits for a core on a busy machine (both sides compute on that one thread "
                             "when single-threaded, so it is their whole cost)")
    parser.add_argument("--profile", action="store_true",
                        help="also print where a tkernels step spends its time, per op (torch.profiler)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for torch and NumPy's BLAS, the same for both sides (default: 1, as "
                             "`tkernels train` uses on CPU); 0 keeps the libraries' defaults")
    args = parser.parse_args()
    with cpu_threads(args.threads) as counts:
        run(args, f"{counts['torch_threads']} torch / {counts['blas_threads']} BLAS thread(s)")


def run(args, threads: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 1, 8, 8)
    y = torch.randint(0, 10, (args.batch_size,))
    ours = build_model(args.model)
    theirs = build_model(args.model, impl="torch")
    theirs.load_state_dict(ours.state_dict())
    runs = dict(zip(PROVIDERS, (
        step_timer(ours, tkernels.nn.CrossEntropyLoss(), tkernels.optim.SGD(
            ours.parameters(), lr=0.05, momentum=0.9), x, y),
        step_timer(theirs, torch.nn.CrossEntropyLoss(), torch.optim.SGD(
            theirs.parameters(), lr=0.05, momentum=0.9), x, y))))
    with tkernels.use_backend("numpy"):
        results = median_seconds(runs, args.repeats, args.clock)
    print(f"{args.model} training step, batch {args.batch_size}, {threads}, {args.clock} time, "
          f"median of {args.repeats}:")
    for label, seconds in results.items():
        print(f"  {label:<26} {1e3 * seconds:8.2f} ms")
    ours_s, theirs_s = results.values()
    print(f"  ratio tkernels / torch      {ours_s / theirs_s:8.2f}x  (goal: <= 3x)", flush=True)
    if args.ops:
        print_op_table(args.model, args.batch_size, args.stem_batch, args.repeats, args.clock, threads)
    if args.profile:
        print_profile(runs[PROVIDERS[0]], args.repeats)


def print_profile(step, repeats: int) -> None:
    """Self CPU time per op of a tkernels step (custom ops include their NumPy reference)."""
    from torch.profiler import ProfilerActivity, profile

    with tkernels.use_backend("numpy"), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
