"""SyncBatchNorm: two gloo processes on CPU, each with part of the batch, against one batch norm
over the whole batch; plus the stable merge of per-process statistics and convert_sync_batchnorm."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tkernels
from tkernels import nn as tnn
from tkernels.reference import batch_norm as ref

from helpers import assert_close, device_for, to_numpy64

WORLD = 2
BATCH = 8
# Per step, how the batch of 8 is divided between the two processes: uneven, then one empty.
SPLITS = [(3, 5), (4, 4), (0, 8)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _compare_with_single_process(rank: int) -> None:
    torch.manual_seed(0)  # the same data in every process
    ours = tnn.SyncBatchNorm(3, momentum=0.3, activation="relu")
    single = torch.nn.BatchNorm2d(3, momentum=0.3)
    with torch.no_grad():
        for m in (ours, single):
            m.weight.copy_(torch.tensor([0.5, 1.0, 1.5]))
            m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    for step, split in enumerate(SPLITS):
        x = torch.randn(BATCH, 3, 4, 5) * (1 + step) + step
        g = torch.randn(BATCH, 3, 4, 5)
        lo = sum(split[:rank])
        hi = lo + split[rank]
        x_full = x.clone().requires_grad_()
        y_full = torch.relu(single(x_full))
        y_full.backward(g)
        x_part = x[lo:hi].clone().requires_grad_()
        y_part = ours(x_part)
        y_part.backward(g[lo:hi])
        what = f"rank {rank}, step {step}, {tkernels.get_backend()} backend"
        assert_close(y_part, y_full[lo:hi], msg=f"output, {what}")
        assert_close(x_part.grad, x_full.grad[lo:hi], reduction=BATCH * 20, msg=f"input grad, {what}")
        for name in ("weight", "bias"):
            total = getattr(ours, name).grad.clone()
            dist.all_reduce(total)  # data parallelism sums the per-process parameter gradients
            assert_close(total, getattr(single, name).grad, reduction=BATCH * 20, msg=f"{name} grad, {what}")
        for m in (ours, single):
            m.zero_grad()
    assert_close(ours.running_mean, single.running_mean, msg="running_mean")
    assert_close(ours.running_var, single.running_var, msg="running_var")
    assert int(ours.num_batches_tracked) == int(single.num_batches_tracked) == len(SPLITS)
    ours.eval()
    single.eval()
    x = torch.randn(2, 3, 4, 5)
    assert_close(ours(x), torch.relu(single(x)), msg="eval")


def _worker(rank: int, port: int, backends) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for backend in backends:
            with tkernels.use_backend(backend):
                _compare_with_single_process(rank)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one_batch_norm_over_the_whole_batch():
    # both backends in one pair of processes: starting processes costs more than the checks
    mp.spawn(_worker, args=(_free_port(), ("numpy", "triton")), nprocs=WORLD, join=True)


def test_gather_stats_merges_like_one_batch(backend):
    """Per-chunk (count, mean, M2) of chunks with very different means (and one empty chunk) merge
    into the statistics of the whole batch, and update the running stats like one batch would."""
    device = device_for(backend)
    chunks = [torch.randn(n, 2, 3) * s + m for n, s, m in ((3, 1.0, 1e3), (0, 1.0, 0.0), (5, 0.1, -2e3), (1, 2.0, 5.0))]
    whole = torch.cat(chunks).to(device)
    local = [torch.ops.tkernels.batch_norm_stats(c.to(device), None, None, 0.0, 1e-5) for c in chunks]
    rm, rv = torch.zeros(2, device=device), torch.ones(2, device=device)
    merged = torch.ops.tkernels.batch_norm_gather_stats(torch.stack(local), rm, rv, 0.5, 1e-5)
    count, mean, m2 = ref.channel_stats(to_numpy64(whole))
    assert_close(merged[0], count)
    assert_close(merged[1].double() + merged[2].double(), mean, dtype=merged.dtype, msg="mean = pivot + offset")
    assert_close(merged[3], m2, scale=10, msg="M2")
    assert_close(merged[4], ref.invstd_from_m2(count, m2, 1e-5), msg="invstd")
    rm_ref, rv_ref = ref.update_running(np.zeros(2), np.ones(2), count, mean, m2, 0.5)
    assert_close(rm, rm_ref)
    assert_close(rv, rv_ref, scale=10)


def test_without_process_group_it_is_a_batch_norm(backend):
    assert not dist.is_initialized()
    device = device_for(backend)
    ours = tnn.SyncBatchNorm(4, activation="tanh").to(device)
    theirs = torch.nn.BatchNorm1d(4)
    x = torch.randn(6, 4, 3)
    assert_close(ours(x.to(device)), torch.tanh(theirs(x)))
    assert_close(ours.running_var, theirs.running_var)
    with pytest.raises(ValueError):
        ours(torch.randn(4))  # torch's SyncBatchNorm wants at least 2-D input


def test_convert_sync_batchnorm():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4, momentum=None),
                                torch.nn.Sequential(tnn.BatchNorm1d(5, affine=False, activation="gelu")))
    bn = model[1]
    bn.train(False)
    converted = tnn.SyncBatchNorm.convert_sync_batchnorm(model)
    first, second = converted[1], converted[2][0]
    assert type(first) is tnn.SyncBatchNorm and type(second) is tnn.SyncBatchNorm
    assert first.weight is bn.weight and first.running_mean is bn.running_mean and first.momentum is None
    assert not first.training and first.activation.is_identity
    assert second.activation.name == "gelu" and second.weight is None
    assert isinstance(converted[0], torch.nn.Conv2d)
    assert list(first.state_dict()) == list(torch.nn.SyncBatchNorm(4).state_dict())
