"""Training steps per second of a reference model on a GPU, four ways (issue 12):

    python benchmarks/train_steps.py [--model lenet] [--batch-size 64] [--steps 200] [--json out.json]

* ``torch eager``             torch.nn model, torch.optim.AdamW, nn.CrossEntropyLoss;
* ``tkernels eager``          the tkernels model, tkernels.optim.AdamW, tkernels' cross-entropy;
* ``tkernels cuda graphs``    the same, the whole step replayed from one CUDA graph (tkernels.cuda_graphs);
* ``torch compile (reduce-overhead)``  the torch.nn model under torch.compile(mode="reduce-overhead"),
  torch's own CUDA graphs for forward and backward.

A step is forward, loss, backward and AdamW on one batch of random 8x8 images (the digits shape),
after ``--warmup`` untimed steps (compilation, autotuning, graph capture); the time of ``--steps``
steps is taken between two synchronisations. CUDA only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _step_eager(run):
    def step(x, y):
        run.optimizer.zero_grad(set_to_none=True)
        loss = run.criterion(run.model(x), y)
        loss.backward()
        run.optimizer.step()
    return step


def variants(model_name: str):
    from tkernels.cli.train_loop import make_run
    from tkernels.models import build_model

    def model(impl):
        torch.manual_seed(0)
        return build_model(model_name, impl=impl).cuda()

    yield "torch eager", lambda: _step_eager(make_run("torch", model("torch"), optimizer="adamw",
                                                     use_tkernels=False))
    yield "tkernels eager", lambda: _step_eager(make_run("tkernels", model("tkernels"), optimizer="adamw"))

    def graphed():
        run = make_run("tkernels", model("tkernels"), optimizer="adamw", cuda_graphs=True)
        return lambda x, y: run.graphed(x, y)
    yield "tkernels cuda graphs", graphed

    def compiled():
        run = make_run("torch", model("torch"), optimizer="adamw", use_tkernels=False)
        run.model = torch.compile(run.model, mode="reduce-overhead")
        return _step_eager(run)
    yield "torch compile (reduce-overhead)", compiled


def measure(step, batches, warmup: int, steps: int) -> float:
    for i in range(warmup):
        step(*batches[i % len(batches)])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        step(*batches[i % len(batches)])
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet", choices=("mlp", "lenet", "resnet"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("train_steps.py: needs a CUDA device (it compares GPU training throughput)", file=sys.stderr)
        return 2
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [(torch.randn(args.batch_size, 1, 8, 8, device="cuda", generator=g),
                torch.randint(0, 10, (args.batch_size,), device="cuda", generator=g)) for _ in range(8)]
    rows, failed = [], False
    for name, build in variants(args.model):
        try:
            rate = measure(build(), batches, args.warmup, args.steps)
            rows.append({"variant": name, "model": args.model, "batch_size": args.batch_size, "steps_per_s": rate})
            print(f"{name:34s} {rate:9.1f} steps/s", flush=True)
        except Exception as exc:  # report every variant even when one fails
            failed = True
            rows.append({"variant": name, "model": args.model, "batch_size": args.batch_size, "error": repr(exc)})
            print(f"{name:34s} FAILED: {exc!r}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
