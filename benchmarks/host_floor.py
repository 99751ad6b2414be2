"""The least host cost a Python op can have, next to torch eager and to tkernels, per call (issue 12).

`tkernels bench --host-overhead` measures tkernels' per-call host cost against torch's. This script
measures the floor under it: the same call reduced to what any Python implementation must do, with
no checks, no dispatch decision and no backend choice.

* Linear forward (a module whose weight needs a gradient): ``autograd.Function.apply`` (its C++
  half, as tkernels calls it) with a forward that allocates y, saves its tensors and makes one
  launch with the real argument list.
* cross_entropy forward without a gradient: two allocations (loss, statistics), the host range
  check of a CPU target, one launch with the real argument list.

Launches are stubbed as in the host-overhead benchmark; both sides run on one thread, timed in
thread CPU time, fastest of alternating rounds. The floor's ratio to torch is what no amount of
Python tuning can beat: the 2x targets of issue 12 leave the rest of a real op (checks, autocast,
the eager/compile decision) the difference between the floor and 2x.

    python3 benchmarks/host_floor.py
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the stubbed launches need the interpreter

import torch  # noqa: E402

import tkernels  # noqa: E402
from tkernels._threads import cpu_threads  # noqa: E402
from tkernels.bench.host_overhead import CLOCKS, HOST, launches_stubbed, time_pair  # noqa: E402
from tkernels.ops import losses  # noqa: E402
from tkernels.ops._common import cdiv  # noqa: E402
from tkernels.ops._dispatch import _C_APPLY  # noqa: E402
from tkernels.ops.matmul import _launch  # noqa: E402


class _FloorLinear(torch.autograd.Function):
    """y = x @ W^T + b with nothing but what autograd and the launch need."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        M, K = x.shape
        N = weight.shape[0]
        y = x.new_empty((M, N))
        kernel, kwargs = _launch(x, x.dtype, "matmul", (True, 0, False, False, 0, False, 1))
        sx, sw, sy = x.stride(), weight.stride(), y.stride()
        kernel[lambda m: (cdiv(M, m["BLOCK_M"]) * cdiv(N, m["BLOCK_N"]), 1)](
            x, weight, y, bias, x, y, y, M, N, K, *sx, sw[1], sw[0], *sy, *sx, sy[0], sy[1], M * N, M, 0.0, **kwargs)
        ctx.save_for_backward(x, weight, bias)
        return y


class _FloorLinearModule(torch.nn.Linear):
    _apply_floor = _C_APPLY.__get__(None, _FloorLinear)

    def forward(self, x):
        return self._apply_floor(x, self.weight, self.bias)


def _floor_cross_entropy(x, target):
    rows, classes = x.shape
    loss = x.new_empty(())
    stats = x.new_empty((2 * rows + 2,), dtype=torch.float32)
    low, high = torch.aminmax(target)
    if int(low) < 0 or int(high) >= classes:
        raise IndexError("target out of range")
    plan = losses._ce_plan(x, target)
    kernel, meta = losses._CE_FORWARD.launcher(x)
    kernel[plan.grid](x, target, x, loss, loss, stats, stats, *plan.launch_args(), rows, *plan.strides[0], x.stride(1),
                      *plan.strides[1], 0, -100, 0.0, PROB=False, HAS_WEIGHT=False, SMOOTH=False, REDUCTION=1,
                      ONE_PROGRAM=True, CHECK=False, BLOCK_R=plan.BLOCK_R, BLOCK_C=plan.BLOCK_C, **meta)
    return loss


def main() -> None:
    _, clock, statistic = CLOCKS[HOST]
    torch.manual_seed(0)
    theirs = torch.nn.Linear(16, 8)
    floor, ours = _FloorLinearModule(16, 8), tkernels.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    logits, labels = torch.randn(4, 10), torch.randint(0, 10, (4,))
    cases = [
        ("Linear fwd", lambda: floor(x), lambda: ours(x), lambda: theirs(x)),
        ("cross_entropy fwd", lambda: _floor_cross_entropy(logits, labels),
         lambda: tkernels.functional.cross_entropy(logits, labels),
         lambda: torch.nn.functional.cross_entropy(logits, labels)),
    ]
    print("per call, µs (thread CPU time, fastest of alternating rounds, launches stubbed, 1 thread)")
    print(f"{'call':20s} {'floor':>8s} {'tkernels':>9s} {'torch':>8s} {'floor/torch':>12s} {'tkernels/torch':>15s}")
    with cpu_threads(1), tkernels.use_backend("triton"), launches_stubbed():
        for name, floor_call, ours_call, torch_call in cases:
            floor_s, torch_s = time_pair(floor_call, torch_call, 9, 30.0, clock=clock, statistic=statistic)
            ours_s, torch_s2 = time_pair(ours_call, torch_call, 9, 30.0, clock=clock, statistic=statistic)
            print(f"{name:20s} {floor_s * 1e6:8.2f} {ours_s * 1e6:9.2f} {torch_s * 1e6:8.2f} "
                  f"{floor_s / torch_s:11.2f}x {ours_s / torch_s2:14.2f}x")


if __name__ == "__main__":
    main()
