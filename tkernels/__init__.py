"""tkernels: fused Triton kernels for the layers of classic deep networks.

CUDA tensors run the Triton kernels; CPU tensors run the NumPy reference, or the Triton
kernels through Triton's interpreter when ``TRITON_INTERPRET=1`` is set before import.
"""
import os

# Pinned before triton compiles anything: its default for FMA contraction changes in 3.10.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from ._backend import INTERPRET, get_backend, set_backend, use_backend  # noqa: E402
from . import activations, ops  # noqa: E402,F401
from . import functional, nn  # noqa: E402,F401
from . import optim  # noqa: E402,F401
from . import models  # noqa: E402,F401  (after nn: the models are converted to tkernels layers)

__version__ = "0.1.0"
__all__ = ["use_backend", "set_backend", "get_backend", "INTERPRET", "functional", "nn", "optim", "models",
           "activations", "ops"]
