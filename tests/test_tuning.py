"""Autotuning happens once: bucketed keys, the cross-process disk cache, no tuning during capture.

The launcher is exercised with fakes of Triton's JIT kernel and autotuner (no GPU here): the fake
autotuner "benchmarks" by recording the call and picking a config chosen by the test.
"""
import json

import pytest
import torch
import triton

from tkernels.ops._tuning import BucketedLauncher, DiskCache, bucket, bucketed_key


class FakeKernel:
    arg_names = ["x_ptr", "M", "N", "HAS_BIAS", "BLOCK"]

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


class FakeAutotuner:
    def __init__(self, winner: triton.Config):
        self.winner = winner
        self.tunings = []
        self.best_config = None

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.tunings.append(args)
            self.best_config = self.winner
        return run


WINNER = triton.Config({"BLOCK_M": 64}, num_warps=8, num_stages=2)


def make(tmp_path, capturing=False, winner=WINNER):
    kernel, tuner = FakeKernel(), FakeAutotuner(winner)
    launcher = BucketedLauncher("fake_kernel", kernel, tuner, ["M", "N", "HAS_BIAS"], "FakeGPU sm_90",
                                cache=DiskCache(str(tmp_path / "autotune.json")), is_capturing=lambda: capturing)
    return launcher, kernel, tuner


def launch(launcher, M, N=32, has_bias=True, dtype=torch.float16):
    launcher[(1,)](torch.empty(1, dtype=dtype), M, N, has_bias, BLOCK=16)


def test_bucket_rounds_sizes_up_to_powers_of_two_and_keeps_flags():
    assert [bucket(v) for v in (0, 1, 2, 3, 5, 64, 65, 1000)] == [0, 1, 2, 4, 8, 64, 128, 1024]
    assert bucket(True) is True and bucket(False) is False
    assert bucket(0.5) == 0.5 and bucket("relu") == "relu"


def test_bucketed_key_holds_named_keys_and_tensor_dtypes():
    x = torch.empty(1, dtype=torch.bfloat16)
    key = bucketed_key(FakeKernel.arg_names, ["M", "N", "HAS_BIAS"], (x, 50, 7, False), {"BLOCK": 16})
    assert key == (64, 8, False, "torch.bfloat16")


def test_new_batch_sizes_in_a_bucket_reuse_the_tuned_config(tmp_path):
    launcher, kernel, tuner = make(tmp_path)
    launch(launcher, 50)  # tunes
    for m in (33, 48, 64, 50):  # same bucket (64): no tuning, bare kernel with the winner's meta
        launch(launcher, m)
    assert len(tuner.tunings) == 1
    assert len(kernel.launches) == 4
    for _, args, kwargs in kernel.launches:
        assert kwargs["BLOCK_M"] == 64 and kwargs["num_warps"] == 8 and kwargs["num_stages"] == 2
        assert kwargs["BLOCK"] == 16  # the caller's own keyword arguments pass through
    launch(launcher, 65)  # next bucket: tuned again
    launch(launcher, 64, dtype=torch.float32)  # another dtype: tuned again
    launch(launcher, 64, has_bias=False)  # a flag is exact
    assert len(tuner.tunings) == 4


def test_tuned_configs_survive_the_process_through_the_disk_cache(tmp_path):
    first, _, tuner = make(tmp_path)
    launch(first, 100)
    assert len(tuner.tunings) == 1
    stored = json.loads((tmp_path / "autotune.json").read_text())
    (entry_key, entry), = stored.items()
    assert entry_key.startswith("fake_kernel|FakeGPU sm_90|triton-" + triton.__version__ + "|")
    assert entry == {"kwargs": {"BLOCK_M": 64}, "num_warps": 8, "num_stages": 2, "num_ctas": 1}
    # a "new process": fresh launcher and fresh cache object reading the same file
    second, kernel, tuner2 = make(tmp_path, winner=triton.Config({"BLOCK_M": 16}, num_warps=2))
    launch(second, 120)
    assert tuner2.tunings == []
    assert kernel.launches[0][2]["BLOCK_M"] == 64 and kernel.launches[0][2]["num_warps"] == 8


def test_tile_families_of_one_kernel_never_take_each_others_tuned_configs(tmp_path):
    """Two Tuned families of one kernel (same name and key, e.g. tf32 and exact fp32 matmul tiles)
    share the disk cache but not its entries: each list is tuned for itself; the same list again
    (a new process) reuses its own entry, and an edited list is tuned afresh."""
    cache = DiskCache(str(tmp_path / "autotune.json"))
    wide = [triton.Config({"BLOCK_M": 128}, num_warps=8), WINNER]
    narrow = [triton.Config({"BLOCK_M": 16}, num_warps=2), triton.Config({"BLOCK_M": 32}, num_warps=2)]

    def family(configs, winner):
        kernel, tuner = FakeKernel(), FakeAutotuner(winner)
        launcher = BucketedLauncher("fake_kernel", kernel, tuner, ["M", "N", "HAS_BIAS"], "FakeGPU sm_90",
                                    cache=cache, is_capturing=lambda: False, configs=configs)
        return launcher, kernel, tuner

    first, _, tuner_wide = family(wide, WINNER)
    launch(first, 100)
    second, kernel, tuner_narrow = family(narrow, narrow[0])
    launch(second, 100)
    assert len(tuner_wide.tunings) == len(tuner_narrow.tunings) == 1
    assert kernel.launches == []  # (it tuned: the autotuner launched, not the bare kernel)
    launch(second, 100)
    assert kernel.launches[0][2]["BLOCK_M"] == 16  # its own winner, not the wide family's
    again, kernel_again, tuner_again = family(list(wide), triton.Config({"BLOCK_M": 999}))
    launch(again, 100)
    assert tuner_again.tunings == [] and kernel_again.launches[0][2]["BLOCK_M"] == 64
    edited, _, tuner_edited = family(wide[:1], wide[0])
    launch(edited, 100)
    assert len(tuner_edited.tunings) == 1


def test_disk_cache_keys_include_the_gpu_and_ignore_a_corrupt_file(tmp_path):
    path = tmp_path / "autotune.json"
    path.write_text("{not json")
    cache = DiskCache(str(path))
    assert cache.get("k", "A100 sm_80", (64,)) is None
    cache.put("k", "A100 sm_80", (64,), WINNER)
    assert cache.get("k", "H100 sm_90", (64,)) is None
    assert DiskCache(str(path)).get("k", "A100 sm_80", (64,)).kwargs == {"BLOCK_M": 64}


def test_a_miss_during_graph_capture_raises_instead_of_tuning(tmp_path):
    launcher, kernel, tuner = make(tmp_path, capturing=True)
    with pytest.raises(RuntimeError, match="capturing a graph.*warm-up"):
        launch(launcher, 50)
    assert tuner.tunings == [] and kernel.launches == []


def test_a_warmed_up_bucket_launches_during_capture(tmp_path):
    launcher, kernel, tuner = make(tmp_path)
    launch(launcher, 50)
    launcher.is_capturing = lambda: True
    launch(launcher, 60)
    assert len(tuner.tunings) == 1 and len(kernel.launches) == 1
