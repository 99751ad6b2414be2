"""Correctness at benchmark sizes: tkernels against torch, both against a float64 reference.

The float64 reference is torch itself run on float64 copies of the same inputs. A case passes
when tkernels' error is within ``TORCH_ERROR_FACTOR`` times torch's own error in the same
dtype, or below a per-dtype floor. Errors are max|a - ref| / max|ref| per tensor (output, each
gradient, each mutated buffer such as running stats), and the worst tensor is reported.
Dropout is random, so it is checked by its statistics instead; optimizers by the update of
three steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .cases import Case

TOLERANCE_FLOOR = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}
TORCH_ERROR_FACTOR = 4.0
OPTIMIZER_STEPS = 3
DROPOUT_MAX_Z = 6.0


@dataclass
class CheckResult:
    err: float
    torch_err: Optional[float]
    tol: float
    ok: bool
    detail: str


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if expected.numel() == 0:
        return 0.0
    expected = expected.detach().double()
    diff = (actual.detach().double() - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 1e-30)
    err = diff / scale
    return err if math.isfinite(err) else math.inf


def _copy(inputs: Sequence, dtype: Optional[torch.dtype]) -> list:
    out = []
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            out.append(t.detach().clone().to(dtype or t.dtype).requires_grad_(t.requires_grad))
        else:
            out.append(t)
    return out


def _run(fn, inputs: list, grad_argnums: Tuple[int, ...], grad_out: Optional[torch.Tensor]):
    """[(name, tensor)]: the output, the gradients and every floating buffer that is not a leaf
    being differentiated (mutated buffers such as running stats)."""
    out = fn(*inputs)
    wrt = [(i, inputs[i]) for i in grad_argnums if inputs[i] is not None]
    tensors = [("output", out)]
    if wrt:
        if grad_out is None:
            grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, [t for _, t in wrt], grad_out.to(out.dtype))
        tensors += [(f"grad of input {i}", g) for (i, _), g in zip(wrt, grads)]
    tensors += [(f"buffer input {i}", t) for i, t in enumerate(inputs)
                if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.requires_grad]
    return tensors, grad_out


def _worst(tensors, reference) -> Tuple[float, str]:
    errors = [(relative_error(a, r), name) for (name, a), (_, r) in zip(tensors, reference)]
    return max(errors) if errors else (0.0, "")


def check_case(case: Case, dtype: torch.dtype) -> CheckResult:
    if case.kind == "optimizer":
        return _check_optimizer(case, dtype)
    if case.custom_check == "dropout":
        return _check_dropout(case, dtype)
    inputs = case.make_inputs(True)
    tk, grad_out = _run(case.tkernels, _copy(inputs, None), case.grad_argnums, None)
    th, _ = _run(case.torch, _copy(inputs, None), case.grad_argnums, grad_out)
    ref, _ = _run(case.torch, _copy(inputs, torch.float64), case.grad_argnums, grad_out)
    err, where = _worst(tk, ref)
    torch_err, _ = _worst(th, ref)
    return _verdict(err, torch_err, dtype, f"worst: {where}")


def _verdict(err: float, torch_err: Optional[float], dtype: torch.dtype, detail: str,
             extra_ok: bool = True) -> CheckResult:
    tol = max(TOLERANCE_FLOOR[dtype], TORCH_ERROR_FACTOR * (torch_err or 0.0))
    return CheckResult(err, torch_err, tol, bool(err <= tol and extra_ok), detail)


def _dropout_stats(fn, x: torch.Tensor, p: float) -> Tuple[float, float, float]:
    """(relative error of kept values and of the gradient, z-score of the dropped fraction, that fraction)."""
    y = fn(x)
    grad_out = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, [x], grad_out)
    keep = y != 0
    scale = 1.0 / (1.0 - p)
    err = max(relative_error(y[keep], x.detach()[keep] * scale),
              relative_error(dx, grad_out * keep.to(grad_out.dtype) * scale))
    dropped = 1.0 - keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / max(1, x.numel()))
    z = abs(dropped - p) / sigma if sigma else (0.0 if dropped == 0 else math.inf)
    return err, z, dropped


def _check_dropout(case: Case, dtype: torch.dtype) -> CheckResult:
    p = float(case.params["p"])
    (x,) = case.make_inputs(True)
    err, z, dropped = _dropout_stats(case.tkernels, x, p)
    torch_err, _, _ = _dropout_stats(case.torch, x, p)
    return _verdict(err, torch_err, dtype, f"dropped {dropped:.4f} for p={p} (z={z:.1f})", z <= DROPOUT_MAX_Z)


def _optimizer_deltas(factory, params: List[torch.Tensor], dtype: Optional[torch.dtype]) -> List[torch.Tensor]:
    copies = []
    for p in params:
        c = p.detach().clone().to(dtype or p.dtype).requires_grad_(True)
        c.grad = p.grad.detach().clone().to(c.dtype)
        copies.append(c)
    before = [c.detach().clone() for c in copies]
    optimizer = factory(copies)
    for _ in range(OPTIMIZER_STEPS):
        optimizer.step()
    return [c.detach() - b for c, b in zip(copies, before)]


def _check_optimizer(case: Case, dtype: torch.dtype) -> CheckResult:
    (params,) = case.make_inputs(True)
    tk = _optimizer_deltas(case.tkernels, params, None)
    th = _optimizer_deltas(case.torch, params, None)
    ref = _optimizer_deltas(case.torch, params, torch.float64)
    names = [f"update of parameter {i}" for i in range(len(params))]
    err, where = _worst(list(zip(names, tk)), list(zip(names, ref)))
    torch_err, _ = _worst(list(zip(names, th)), list(zip(names, ref)))
    return _verdict(err, torch_err, dtype, f"worst: {where} after {OPTIMIZER_STEPS} steps")
