"""tkernels: fused Triton kernels for the layers of classic deep networks.

CUDA tensors run the Triton kernels; CPU tensors run the NumPy reference, or the Triton
kernels through Triton's interpreter when ``TRITON_INTERPRET=1`` is set before import.

``import tkernels`` is cheap: it reads ``TRITON_INTERPRET`` and ``TKERNELS_BACKEND`` (a bad value is an
error here), while torch, triton and the kernels load on first use of any submodule below
(``tkernels.nn``...), all at once and in this order. So ``tkernels --help`` and argument errors answer
without importing torch.
"""
import importlib
import os

# Pinned before triton compiles anything: its default for FMA contraction changes in 3.10.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from . import _backend  # noqa: E402
from ._backend import INTERPRET, get_backend, set_backend, use_backend  # noqa: E402

__version__ = "0.1.0"
_SUBMODULES = ("activations", "ops", "functional", "nn", "optim", "models")  # models after nn: they use its layers
__all__ = ["use_backend", "set_backend", "get_backend", "INTERPRET", *_SUBMODULES]


def _load() -> None:
    with _backend.interpret_as_read():
        for name in _SUBMODULES:
            importlib.import_module(f"{__name__}.{name}")


def __getattr__(name: str):
    if name not in _SUBMODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _load()
    try:
        return globals()[name]
    except KeyError:  # asked for by a submodule while it is itself being imported
        return importlib.import_module(f"{__name__}.{name}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
