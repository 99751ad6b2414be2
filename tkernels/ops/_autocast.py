"""torch.autocast for tkernels ops: each public op casts its inputs as the aten op it replaces does.

Under ``torch.autocast(device_type)``, aten ops follow per-device cast policies (aten's
``autocast_mode.h``; checked against torch on CPU in tests/test_autocast.py):

    op                        cuda                          cpu
    linear, conv2d            autocast dtype                autocast dtype
    softmax, log_softmax      float32 unless dtype= given   input dtype (not on the CPU lists)
    cross_entropy, mse_loss   float32                       float32
    batch_norm, pooling,      input dtype                   input dtype
    dropout, activations

A cast applies to the floating-point tensors on the autocast device that are not float64, as aten's
``is_eligible`` says. Batch norm needs no cast: it takes a float16/bfloat16 input with float32
parameters and running statistics, as torch does, autocast or not.

Why in the Python entry points and not as an Autocast kernel of the custom op
(``torch.library.register_autocast``): our autograd lives in ``torch.autograd.Function``s that
call the custom ops, so an Autocast kernel there would cast *inside* the Function, after autograd
recorded the float32 inputs, and backward would meet mixed dtypes. Casting before the Function is
what aten's Autocast kernels do (they sit above Autograd): the casts are ordinary differentiable
``Tensor.to`` calls, so gradients reach float32 parameters in float32. It also follows the dtype the
user picked (``register_autocast`` fixes one dtype at registration) and traces under torch.compile.
Inside, the custom ops have no Autocast kernel and fall through, and their launchers call no op on
autocast's lists, so nothing needs autocast switched off there.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.torch_version import TorchVersion

LOWER = "lower"  # the autocast dtype (aten's lower_precision_fp)
FP32 = "fp32"    # float32 (aten's fp32)
FP32_UNLESS_DTYPE = "fp32_set_opt_dtype"  # float32 output unless the call passes dtype= (aten's fp32_set_opt_dtype)

POLICIES = {
    "linear": {"cuda": LOWER, "cpu": LOWER},
    "conv2d": {"cuda": LOWER, "cpu": LOWER},
    "softmax": {"cuda": FP32_UNLESS_DTYPE},
    "log_softmax": {"cuda": FP32_UNLESS_DTYPE},
    "cross_entropy": {"cuda": FP32, "cpu": FP32},
    "mse_loss": {"cuda": FP32, "cpu": FP32},
}


def _device_generic_api() -> bool:
    try:
        torch.is_autocast_enabled("cpu")
        torch.get_autocast_dtype("cpu")
        return True
    except (TypeError, AttributeError):
        return False


def per_device_is_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled(device_type) for torch builds without the device-generic API."""
    return torch.is_autocast_cpu_enabled() if device_type == "cpu" else (
        device_type == "cuda" and torch.is_autocast_enabled())


def per_device_get_dtype(device_type: str) -> torch.dtype:
    """torch.get_autocast_dtype(device_type) for torch builds without the device-generic API."""
    return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


if _device_generic_api():
    is_enabled, get_dtype = torch.is_autocast_enabled, torch.get_autocast_dtype
else:
    is_enabled, get_dtype = per_device_is_enabled, per_device_get_dtype


# One C call that is False outside every autocast region: the common case pays ~1 us, not ~3 us.
# torch.compile must fold it as a constant: dynamo lists it in torch 2.13 and in releases before
# torch.accelerator (2.6); below 2.6, unchecked, the public per-device calls below are used instead.
_any_enabled = (getattr(torch._C, "_is_any_autocast_enabled", None)
                if TorchVersion(torch.__version__) >= (2, 6) else None)


def _policy(op: str, input) -> Tuple[Optional[str], str]:
    """(policy or None, device type) for a call whose first tensor is ``input``."""
    if (_any_enabled is not None and not _any_enabled()) or not isinstance(input, Tensor):
        return None, ""
    device_type = input.device.type
    policy = POLICIES[op].get(device_type)
    if policy is None or not is_enabled(device_type):
        return None, device_type
    return policy, device_type


def _eligible(t, device_type: str) -> bool:
    return (isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
            and t.device.type == device_type)


def cast_inputs(op: str, *tensors):
    """``tensors`` as ``op`` runs them under the active autocast (unchanged outside autocast);
    non-tensors and ineligible tensors pass through, so the op's own checks still see them."""
    policy, device_type = _policy(op, tensors[0])
    if policy is None:
        return tensors
    dtype = get_dtype(device_type) if policy == LOWER else torch.float32
    return tuple(t.to(dtype) if _eligible(t, device_type) else t for t in tensors)


def output_dtype(op: str, input, dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """The ``dtype=`` argument of a softmax-like ``op`` under the active autocast: float32 where the
    policy sets it, for an eligible input and no dtype given; else ``dtype`` unchanged."""
    policy, device_type = _policy(op, input)
    if policy == FP32_UNLESS_DTYPE and dtype is None and _eligible(input, device_type):
        return torch.float32
    return dtype
