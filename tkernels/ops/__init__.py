"""Triton kernels, their launchers, custom-op registrations and autograd Functions, one file per
op family. Importing this package registers every ``tkernels::`` op and every kernel spec that
``tkernels inspect`` compiles. Each op's CUDA implementation runs on its tensors' device
(:func:`._common.guard_custom_ops`)."""
import importlib
import pkgutil

from .._backend import interpret_as_read
from ._common import guard_custom_ops
from ._lazy_dynamo import defer_dynamo_import

with interpret_as_read():  # the kernels are defined here (see tkernels/__init__.py)
    for _module in pkgutil.iter_modules(__path__):
        if not _module.name.startswith("_"):
            guard_custom_ops(importlib.import_module(f"{__name__}.{_module.name}"))

defer_dynamo_import("tkernels")  # eager calls need not import torch._dynamo (see _lazy_dynamo)
