"""Eager calls of the ``tkernels::`` ops must not import ``torch._dynamo`` (about 1.5 s).

``torch.library.custom_op`` wraps every backend implementation in ``torch._disable_dynamo``,
which imports ``torch._dynamo`` on the op's first call so that, should dynamo be tracing, it does
not trace into the implementation's Python frames. Until something else imports
``torch._dynamo`` (``torch.compile``, ``opcheck``, ``torch.export``...) dynamo cannot be tracing,
so there is nothing to disable: the implementation can be called directly. Once dynamo is
imported, the first call builds torch's own disabled wrapper and every later call uses it, exactly
as torch would have.

The wrapper caches its disabled function in the wrapped function's ``__dynamo_disable`` attribute
and calls it when present; we pre-fill that attribute with a function that waits for dynamo.
Private torch internals are touched only when they are exactly what this expects (checked by the
wrapper's code object); otherwise the op is left as torch built it.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch

DISABLE_CACHE = "__dynamo_disable"  # the attribute torch._compile._disable_dynamo caches in


def _torch_disable_wrapper_code():
    disable = getattr(torch, "_disable_dynamo", None)
    if disable is None:
        return None
    return getattr(disable(lambda: None), "__code__", None)


def _until_dynamo_is_imported(fn: Callable, recursive: bool = True) -> Callable:
    """Call ``fn`` directly while ``torch._dynamo`` is not imported; afterwards behave (and cache
    ourselves away) like torch's ``_disable_dynamo`` wrapper."""
    def call(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        disabled = torch._dynamo.disable(fn, recursive, wrapping=False)
        setattr(fn, DISABLE_CACHE, disabled)
        return disabled(*args, **kwargs)
    return call


def defer_dynamo_import(namespace: str = "tkernels") -> int:
    """Pre-fill the disable cache of every backend implementation of the custom ops in ``namespace``.
    Returns how many implementations were changed (0 on torch versions built differently)."""
    from torch._library import custom_ops

    wrapper_code = _torch_disable_wrapper_code()
    opdefs = getattr(custom_ops, "OPDEFS", {})
    changed = 0
    for qualname in list(opdefs):
        if not qualname.startswith(namespace + "::"):
            continue
        for impl in getattr(opdefs[qualname], "_backend_fns", {}).values():
            inner = getattr(impl, "__wrapped__", None)
            if wrapper_code is None or getattr(impl, "__code__", None) is not wrapper_code or inner is None:
                continue
            if getattr(inner, DISABLE_CACHE, None) is None:
                setattr(inner, DISABLE_CACHE, _until_dynamo_is_imported(inner))
                changed += 1
    return changed
