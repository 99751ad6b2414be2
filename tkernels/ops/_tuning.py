"""Autotuning that happens once: bucketed keys, a cache shared across processes, never during capture.

Triton's ``@triton.autotune`` tunes again for every distinct value of its key, so a key holding the
batch size re-tunes for every new batch size and for the ragged last batch of an epoch, and it
forgets everything when the process exits. :class:`BucketedLauncher` sits in front of it:

* the key of a launch is *bucketed*: integer key values go to the next power of two (0 and 1 stay
  themselves, booleans are exact), and the dtypes of the tensor arguments are appended, so batch
  sizes 48, 50 and 64 share one tuned config;
* the first launch of a bucket asks the on-disk cache (JSON, keyed by kernel, GPU, bucketed key and
  Triton version) and only when it misses lets Triton's autotuner benchmark the configs; the winner
  is stored in memory and on disk;
* tuning during CUDA-graph capture would record the benchmark launches into the graph and sync
  inside the capture, so a miss while the stream is capturing raises, telling the user to warm up.

Every later launch of a bucket calls the bare ``JITFunction`` with the chosen config's meta-parameters,
skipping the autotuner's own per-call key building as well.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import triton

CACHE_ENV = "TKERNELS_CACHE_DIR"
CACHE_FILE = "autotune.json"


def bucket(value: Any) -> Any:
    """The bucket of one key value: the next power of two for sizes, exact for flags and 0/1."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 1:
        return value
    return 1 << (value - 1).bit_length()


def bucketed_key(arg_names: Sequence[str], key_names: Sequence[str], args: Sequence[Any],
                 kwargs: Dict[str, Any]) -> Tuple:
    """(bucketed key values..., dtypes of the tensor arguments...) of one launch."""
    named = dict(zip(arg_names, args))
    named.update(kwargs)
    values = [bucket(named[name]) for name in key_names if name in named]
    values += [str(a.dtype) for a in args if hasattr(a, "dtype")]
    return tuple(values)


def config_to_json(config: triton.Config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages,
            "num_ctas": getattr(config, "num_ctas", 1)}


def config_from_json(data: dict) -> triton.Config:
    extra = {"num_ctas": data["num_ctas"]} if data.get("num_ctas", 1) != 1 else {}
    return triton.Config(dict(data["kwargs"]), num_warps=data["num_warps"], num_stages=data["num_stages"], **extra)


def configs_fingerprint(configs: Sequence[triton.Config]) -> str:
    """A short hash of a config list. Tuned results are cached per list, so the tile families of one
    kernel (operand classes, FAST or generic, gated or not: several Tuned objects share a kernel
    name and key) never take each other's tiles, and an edited list is tuned afresh."""
    text = json.dumps([config_to_json(c) for c in configs], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def launch_meta(config: triton.Config) -> dict:
    """The keyword arguments that launch a JIT kernel with ``config`` (triton < 3.? lacks all_kwargs)."""
    if hasattr(config, "all_kwargs"):
        return config.all_kwargs()
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


class DiskCache:
    """Tuned configs in one JSON file: {"<kernel>|<gpu>|triton-<version>|<key>": config}.

    Read once, rewritten atomically (temp file + rename) on each new entry, so concurrent processes
    at worst lose an entry and tune it again; an unreadable file is treated as empty.
    """

    def __init__(self, path: Optional[str] = None):
        self._path = path
        self._entries: Optional[Dict[str, dict]] = None
        self._lock = threading.Lock()

    @property
    def path(self) -> str:
        if self._path is None:
            root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "tkernels")
            self._path = os.path.join(root, CACHE_FILE)
        return self._path

    def _load(self) -> Dict[str, dict]:
        if self._entries is None:
            try:
                with open(self.path) as f:
                    entries = json.load(f)
                self._entries = entries if isinstance(entries, dict) else {}
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    @staticmethod
    def entry_key(kernel: str, gpu: str, key: Tuple) -> str:
        return f"{kernel}|{gpu}|triton-{triton.__version__}|{json.dumps(list(key))}"

    def get(self, kernel: str, gpu: str, key: Tuple) -> Optional[triton.Config]:
        data = self._load().get(self.entry_key(kernel, gpu, key))
        try:
            return None if data is None else config_from_json(data)
        except (KeyError, TypeError):
            return None

    def put(self, kernel: str, gpu: str, key: Tuple, config: triton.Config) -> None:
        with self._lock:
            entries = self._load()
            entries[self.entry_key(kernel, gpu, key)] = config_to_json(config)
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    json.dump(entries, f, indent=0, sort_keys=True)
                os.replace(tmp, self.path)
            except OSError:  # a read-only home keeps the in-memory result; tuning is redone next run
                pass


DISK_CACHE = DiskCache()


def stream_is_capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class BucketedLauncher:
    """``launcher[grid](*args, **kwargs)`` for one kernel on one GPU, tuned once per bucketed key.

    ``kernel`` is the bare JIT kernel and ``autotuner`` Triton's autotune wrapper of it; ``gpu``
    names the device model for the disk cache, and ``configs`` (the autotuner's list) tags its
    entries, see :func:`configs_fingerprint`.
    """

    def __init__(self, name: str, kernel, autotuner, key_names: Sequence[str], gpu: str,
                 cache: Optional[DiskCache] = None,
                 is_capturing: Callable[[], bool] = stream_is_capturing,
                 configs: Optional[Sequence[triton.Config]] = None):
        self.name = name
        self.cache_name = name if configs is None else f"{name}#{configs_fingerprint(configs)}"
        self.kernel = kernel
        self.autotuner = autotuner
        self.key_names = list(key_names)
        self.arg_names = list(kernel.arg_names)
        self.gpu = gpu
        self.cache = cache if cache is not None else DISK_CACHE
        self.is_capturing = is_capturing
        self.chosen: Dict[Tuple, dict] = {}  # bucketed key -> launch meta of the chosen config
        self.tuned_keys = []  # bucketed keys that were benchmarked in this process (tests, reports)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def run(self, grid, args, kwargs):
        key = bucketed_key(self.arg_names, self.key_names, args, kwargs)
        meta = self.chosen.get(key)
        if meta is None:
            config = self.cache.get(self.cache_name, self.gpu, key)
            if config is None:
                return self._tune(grid, args, kwargs, key)
            meta = self.chosen[key] = launch_meta(config)
        return self.kernel[grid](*args, **kwargs, **meta)

    def _tune(self, grid, args, kwargs, key):
        if self.is_capturing():
            raise RuntimeError(
                f"tkernels: kernel {self.name} has no tuned config for key {key} on {self.gpu}, and the current "
                "CUDA stream is capturing a graph, where autotuning cannot run (it times launches and syncs). "
                "Run the captured code once eagerly before capture (a warm-up step), with the same shapes.")
        result = self.autotuner[grid](*args, **kwargs)
        config = self.autotuner.best_config
        self.chosen[key] = launch_meta(config)
        self.tuned_keys.append(key)
        self.cache.put(self.cache_name, self.gpu, key, config)
        return result
