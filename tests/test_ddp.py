"""A converted model with SyncBatchNorm under DistributedDataParallel: 2 CPU processes on gloo.

Run by torchrun, this file is also the worker: each process trains on its half of every batch,
and the result must equal one process training the plain torch model on the whole batch (BN
statistics synchronised, gradients averaged). The example script is smoke-tested the same way.
"""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
STEPS = 3


def _torchrun(script, *args, timeout=240):
    env = dict(os.environ, TKERNELS_BACKEND="numpy", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)  # the workers run the NumPy backend, not the slow interpreter
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(script), *map(str, args)]
    for _attempt in range(2):
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if "address already in use" not in proc.stderr.lower():  # a port taken by a concurrent run
            break
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_ddp_syncbatchnorm_matches_single_process_full_batch(tmp_path):
    _torchrun(Path(__file__), tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r in results:
        assert r["types"] == ["Conv2d", "SyncBatchNorm", "Identity", "MaxPool2d", "Flatten", "Linear"], r
        assert r["bn_activation"] == "relu"
        # float64 throughout: DDP + SyncBatchNorm over two halves == one process on the whole batch
        assert r["output_diff"] < 1e-10, r
        assert r["param_diff"] < 1e-10, r
        assert r["buffer_diff"] < 1e-10, r
        assert r["num_batches_tracked"] == STEPS
    assert results[0]["checksum"] == results[1]["checksum"]


@pytest.mark.slow
def test_ddp_example_script_trains():
    out = _torchrun(ROOT / "examples" / "ddp_train.py", "--epochs", "1", "--limit", "256", "--batch-size", "32")
    assert f"{WORLD} processes, gloo" in out
    assert "epoch 1/1" in out and "agree across 2 processes (max difference 0.0e+00)" in out


# ---------------------------------------------------------------------------------------------
# The worker, run by torchrun
# ---------------------------------------------------------------------------------------------
def _worker(out_dir: Path) -> None:
    import importlib.util

    import torch.distributed as dist
    from torch import nn

    import tkernels

    spec = importlib.util.spec_from_file_location("ddp_train", ROOT / "examples" / "ddp_train.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    DistributedDataParallel = tkernels.nn.parallel.DistributedDataParallel  # lets tkernels' SyncBatchNorm run on CPU

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                              nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).double()
    model = tkernels.nn.convert(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reference)))
    types = [type(m).__name__ for m in model]
    bn_activation = str(model[1].activation)
    ddp = DistributedDataParallel(model)
    optimizers = [tkernels.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9),
                  torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)]
    output_diff = 0.0
    for step in range(STEPS):
        x = torch.randn(8, 2, 6, 6, dtype=torch.float64)  # same global batch on every rank (same seed)
        target = torch.randint(0, 3, (8,))
        mine = slice(rank * 4, rank * 4 + 4)
        ours = ddp(x[mine])
        theirs = reference(x)
        output_diff = max(output_diff, float((ours - theirs[mine]).abs().max()))
        losses = [nn.functional.cross_entropy(ours, target[mine]), nn.functional.cross_entropy(theirs, target)]
        for opt, loss in zip(optimizers, losses):
            opt.zero_grad()
            loss.backward()
            opt.step()
    state, ref_state = model.state_dict(), reference.state_dict()

    def diff(keys):
        return max(float((state[k].double() - ref_state[k].double()).abs().max()) for k in keys)

    result = dict(
        types=types, bn_activation=bn_activation, output_diff=output_diff,
        param_diff=diff([k for k, _ in model.named_parameters()]),
        buffer_diff=diff([k for k in ("1.running_mean", "1.running_var")]),
        num_batches_tracked=int(state["1.num_batches_tracked"]),
        checksum=float(sum(t.double().sum() for t in state.values())),
    )
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    # as in examples/ddp_train.py: release DDP's reducer (it holds the group) and meet before gloo goes
    del ddp, optimizers
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
    # leave without the interpreter's teardown, where a gloo thread can abort the process now and then
    # (see the end of examples/ddp_train.py); the result files are written and closed by now
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
