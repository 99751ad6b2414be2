"""Data-parallel training of a converted model with synchronised batch norm.

    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py --epochs 5

Each process trains the same LeNet on its share of every global batch of the digits. The
model is written in plain torch.nn; three lines turn it into a distributed tkernels model:
SyncBatchNorm (batch statistics over all processes' samples), tkernels.nn.convert (tkernels
layers with fused activations) and DistributedDataParallel (gradients averaged across
processes). On CPUs the processes talk over gloo and run the NumPy backend; with one GPU per
process use --dist-backend nccl and the Triton kernels run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

import tkernels
from tkernels.data import load_digits, minibatches
from tkernels.models import LeNet


# tkernels' DDP: torch's, minus the guard that refuses SyncBatchNorm on CPU processes
DistributedDataParallel = tkernels.nn.parallel.DistributedDataParallel


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split across processes")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N train/test images")
    parser.add_argument("--dist-backend", default="gloo", help="gloo (CPU) or nccl (one GPU per process)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    dist.init_process_group(args.dist_backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.dist_backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {world} processes")

    torch.manual_seed(args.seed)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    model = LeNet(impl="torch")  # stands for any model written in plain torch.nn
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model, report = tkernels.nn.convert(model, return_report=True)
    model = DistributedDataParallel(model.to(device))
    criterion = tkernels.nn.CrossEntropyLoss()
    optimizer = tkernels.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    if rank == 0:
        print(f"{world} processes, {args.dist_backend}; {report.summary()}", flush=True)

    data = load_digits(seed=args.seed, device=device, limit=args.limit)
    generator = torch.Generator().manual_seed(args.seed)  # identical on every rank: same global batches
    for epoch in range(1, args.epochs + 1):
        model.train()
        start, total, steps = time.perf_counter(), torch.zeros((), device=device), 0
        for batch in minibatches(data.x_train.shape[0], args.batch_size, generator, drop_last=True):
            mine = batch[rank::world].to(device)  # this process's share of the global batch
            loss = criterion(model(data.x_train[mine]), data.y_train[mine])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients over the processes here
            optimizer.step()
            total += loss.detach()
            steps += 1
        dist.all_reduce(total)
        model.eval()
        with torch.no_grad():
            accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean()
        if rank == 0:
            print(f"epoch {epoch}/{args.epochs}  loss {float(total) / (world * max(1, steps)):.4f}  "
                  f"test acc {100 * float(accuracy):.1f}%  {time.perf_counter() - start:.1f} s", flush=True)

    # Every process must end with the same weights and the same batch-norm statistics.
    state = torch.cat([t.detach().double().flatten() for t in model.module.state_dict().values()])
    states = [torch.empty_like(state) for _ in range(world)]
    dist.all_gather(states, state)
    if rank == 0:
        spread = max(float((s - states[0]).abs().max()) for s in states)
        print(f"final test accuracy {100 * float(accuracy):.1f}%; weights and statistics agree across "
              f"{world} processes (max difference {spread:.1e})", flush=True)
    # DDP's reducer holds the process group: release it, and let every rank arrive, before the group
    # goes (a rank tearing gloo down while its peer still talks aborted now and then on a loaded box)
    del model
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Everything is done and printed. Leave without the interpreter's teardown: with torch 2.13 a
    # gloo thread still alive then can abort the process ("terminate called without an active
    # exception", about 1 run in 50 on a loaded box), after destroy_process_group and a barrier.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
