"""Backend selection: which implementation runs an op on a given tensor.

``auto`` sends CUDA tensors to the Triton kernels and CPU tensors to the NumPy
reference, or to the Triton kernels through Triton's interpreter when
``TRITON_INTERPRET=1`` was set before import. ``triton`` and ``numpy`` force one.

The NumPy backend refuses CUDA tensors rather than silently copying them to the
host and back: a hidden device round trip would make a "GPU" model run at host
speed, which is never what a user asked for.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import TYPE_CHECKING, Iterator, Optional

if TYPE_CHECKING:  # torch is not imported here: `import tkernels` stays cheap (see tkernels/__init__.py)
    import torch

BACKENDS = ("auto", "triton", "numpy")


def _interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


# Read once, at `import tkernels`. Triton reads it again as each @triton.jit kernel is defined, which
# happens when the kernels load (on first use); interpret_as_read holds it to this value meanwhile.
INTERPRET: bool = _interpreter_enabled()


@contextlib.contextmanager
def interpret_as_read() -> Iterator[None]:
    """While the kernels are defined, TRITON_INTERPRET says what INTERPRET read at import, so that
    they run where INTERPRET sends them even if the variable changed since."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if INTERPRET else "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _validated(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"unknown tkernels backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name.lower()


class _State(threading.local):
    """Per thread: the backend chosen with use_backend/set_backend; None follows the default. (A
    class default: reading an attribute a threading.local lacks costs a failed lookup per op call.)"""
    backend: Optional[str] = None


_state = _State()
_default_backend = _validated(os.environ.get("TKERNELS_BACKEND", "auto"))


def get_backend() -> str:
    """The backend in force in this thread: 'auto', 'triton' or 'numpy'."""
    return _state.backend or _default_backend


def set_backend(name: str) -> None:
    """Set the backend for this thread (and the default for new threads)."""
    global _default_backend
    name = _validated(name)
    _default_backend = name
    _state.backend = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager: run the ops inside the block on the given backend."""
    name = _validated(name)
    previous = _state.backend
    _state.backend = name
    try:
        yield name
    finally:
        _state.backend = previous


def resolve(op: str, *tensors: torch.Tensor | None) -> str:
    """Which concrete backend ('triton' or 'numpy') runs ``op`` on these tensors."""
    choice = _state.backend or _default_backend
    if INTERPRET and choice != "numpy":  # the common cases first, without building the device set
        return "triton"
    if choice == "auto" and tensors and tensors[0] is not None and tensors[0].is_cuda:
        return "triton"
    on_cuda = False
    for t in tensors:  # (a loop, not a set of device types: this runs on every NumPy-backend call)
        if t is not None and t.is_cuda:
            on_cuda = True
            break
    if choice == "auto":
        return "triton" if on_cuda else "numpy"
    if choice == "triton":
        if not on_cuda and not INTERPRET:
            devices = sorted({t.device.type for t in tensors if t is not None})
            raise RuntimeError(
                f"{op}: the triton backend needs CUDA tensors, but got tensors on {devices}. "
                "To run the Triton kernels on CPU tensors, set TRITON_INTERPRET=1 in the environment "
                "before importing tkernels (Triton's interpreter), or use the 'numpy' backend."
            )
        return "triton"
    if on_cuda:
        raise RuntimeError(
            f"{op}: the numpy backend runs on CPU tensors only, but got a CUDA tensor. "
            "Move the tensors to the CPU, or use the 'triton' or 'auto' backend."
        )
    return "numpy"
