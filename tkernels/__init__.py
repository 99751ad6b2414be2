"""tkernels: fused Triton kernels for the layers of classic deep networks.

CUDA tensors run the Triton kernels; CPU tensors run the NumPy reference, or the Triton
kernels through Triton's interpreter when ``TRITON_INTERPRET=1`` is set before import.

``import tkernels`` is cheap: torch, triton and the kernels load on first use of any attribute
below (``tkernels.nn``, ``tkernels.use_backend``...), all at once and in this order, so that
``tkernels --help`` and argument errors answer without importing torch. ``TRITON_INTERPRET`` is
read at that moment, together with the kernels' compilation mode; setting it before import is
still what to do.
"""
import importlib
import os

# Pinned before triton compiles anything: its default for FMA contraction changes in 3.10.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

__version__ = "0.1.0"
_FROM_BACKEND = ("INTERPRET", "get_backend", "set_backend", "use_backend")
_SUBMODULES = ("activations", "ops", "functional", "nn", "optim", "models")  # models after nn: they use its layers
__all__ = [*_FROM_BACKEND, *_SUBMODULES]


def _load() -> None:
    backend = importlib.import_module(f"{__name__}._backend")
    for name in _FROM_BACKEND:
        globals()[name] = getattr(backend, name)
    for name in _SUBMODULES:
        importlib.import_module(f"{__name__}.{name}")


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _load()
    try:
        return globals()[name]
    except KeyError:  # asked for by a submodule while it is itself being imported
        return importlib.import_module(f"{__name__}.{name}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
