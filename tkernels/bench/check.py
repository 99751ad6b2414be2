"""Correctness at benchmark sizes: tkernels, element by element, against float64 torch.

The reference is torch itself run on float64 copies of the same inputs. Every element of every
compared tensor (the output, each gradient, each mutated buffer such as running stats) must lie
within the tolerance model the tests use (tkernels/testing.py): ``rtol*|ref| + atol``, with
rtol a few units of the dtype's roundoff and atol a fraction of max|ref| that grows with the
length of the sums behind the tensor. That length is ``flops / (2 * numel)`` for the GEMM-like
ops (K for the output, N for the input gradient, M for the weight gradient) and the largest
input's size over the tensor's size for the others (a loss sums everything, batch norm's weight
gradient N*H*W). ``err`` is the worst element's error over its tolerance (pass: ``err <= tol
= 1``); torch's own error in the same dtype is reported the same way for comparison. Dropout
is random, so its keep-rate is checked statistically and its kept values and gradient
elementwise; optimizers by the update of three steps, against a float64 run that rounds the
parameters and state to the dtype after each step as the kernels store them (each element also
allowed the rounding of the parameter it is stored in, once per step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .. import testing
from .cases import Case

OPTIMIZER_STEPS = 3
DROPOUT_MAX_Z = 6.0


@dataclass
class CheckResult:
    err: float
    torch_err: Optional[float]
    tol: float
    ok: bool
    detail: str


def violation(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, reduction: int = 1,
              product: str = "none", stored_in: Optional[torch.Tensor] = None) -> float:
    """Worst |actual - expected| / tolerance over the elements (<= 1 passes; inf for NaN). An
    update of OPTIMIZER_STEPS steps `stored_in` a parameter is also allowed the parameter's
    rounding at each step (relative to the parameter, not to the much smaller update)."""
    expected = expected.detach().double()
    if expected.numel() == 0:
        return 0.0
    actual = actual.detach().double().to(expected.device)
    finite = expected[expected.isfinite()]
    expected_max = float(finite.abs().max()) if finite.numel() else 0.0
    key = testing.dtype_key(dtype, expected.device, product)
    tol = testing.tolerance(key, expected_max, reduction, device=expected.device)
    extra = (None if stored_in is None else
             OPTIMIZER_STEPS * testing.UNIT_ROUNDOFF[dtype] * stored_in.detach().double().abs().to(expected.device))
    return tol.violation(actual, expected, extra)


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


def _reduction(case: Case, inputs: Sequence, tensor: torch.Tensor) -> int:
    """The length of the sums behind `tensor` (see the module docstring)."""
    numel = max(1, tensor.numel())
    flops = case.flops.get("fwd")
    if flops:
        return max(1, round(flops / (2 * numel)))
    largest = max((t.numel() for t in inputs if isinstance(t, torch.Tensor)), default=1)
    return max(1, largest // numel)


def _worst(case: Case, inputs, tensors, reference, dtype) -> Tuple[float, str]:
    product = "any" if case.flops.get("fwd") else "none"  # GEMM-like: linear (matmul) or conv
    errors = [(violation(a, r, dtype, _reduction(case, inputs, r), product), name)
              for (name, a), (_, r) in zip(tensors, reference)]
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
    err, where = _worst(case, inputs, tk, ref, dtype)
    torch_err, _ = _worst(case, inputs, th, ref, dtype)
    return _verdict(err, torch_err, f"worst: {where}")


def _verdict(err: float, torch_err: Optional[float], detail: str, extra_ok: bool = True) -> CheckResult:
    return CheckResult(err, torch_err, 1.0, bool(err <= 1.0 and extra_ok), detail)


def _dropout_stats(fn, x: torch.Tensor, p: float) -> Tuple[float, float, float]:
    """(worst elementwise error of kept values and of the gradient against float64, z-score of the
    dropped fraction, that fraction)."""
    y = fn(x)
    grad_out = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, [x], grad_out)
    keep = y != 0
    scale = 1.0 / (1.0 - p)
    err = max(violation(y[keep], x.detach()[keep].double() * scale, x.dtype),
              violation(dx, grad_out.double() * keep * scale, x.dtype))
    dropped = 1.0 - keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / max(1, x.numel()))
    z = abs(dropped - p) / sigma if sigma else (0.0 if dropped == 0 else math.inf)
    return err, z, dropped


def _check_dropout(case: Case, dtype: torch.dtype) -> CheckResult:
    p = float(case.params["p"])
    (x,) = case.make_inputs(True)
    err, z, dropped = _dropout_stats(case.tkernels, x, p)
    torch_err, _, _ = _dropout_stats(case.torch, x, p)
    return _verdict(err, torch_err, f"dropped {dropped:.4f} for p={p} (z={z:.1f})", z <= DROPOUT_MAX_Z)


def _optimizer_run(factory, params: List[torch.Tensor], dtype: Optional[torch.dtype],
                   storage: Optional[torch.dtype] = None):
    """(update of each parameter over OPTIMIZER_STEPS steps, final parameters). With `storage`,
    parameters and state are rounded to that dtype after each step, as a kernel storing them in
    the parameter's dtype does (fp16 AdamW state underflows; the reference must too)."""
    copies = []
    for p in params:
        c = p.detach().clone().to(dtype or p.dtype).requires_grad_(True)
        c.grad = p.grad.detach().clone().to(c.dtype)
        copies.append(c)
    before = [c.detach().clone() for c in copies]
    optimizer = factory(copies)
    for _ in range(OPTIMIZER_STEPS):
        optimizer.step()
        if storage is not None and storage != dtype:
            with torch.no_grad():
                for c in copies:
                    c.copy_(c.to(storage))
                    for value in optimizer.state[c].values():
                        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim():
                            value.copy_(value.to(storage))
    return [c.detach().double() - b.double() for c, b in zip(copies, before)], [c.detach() for c in copies]


def _worst_update(updates, reference, final_reference, dtype) -> Tuple[float, str]:
    errors = [(violation(u, r, dtype, stored_in=f), f"update of parameter {i}")
              for i, (u, r, f) in enumerate(zip(updates, reference, final_reference))]
    return max(errors) if errors else (0.0, "")


def _check_optimizer(case: Case, dtype: torch.dtype) -> CheckResult:
    (params,) = case.make_inputs(True)
    tk, _ = _optimizer_run(case.tkernels, params, None)
    th, _ = _optimizer_run(case.torch, params, None)
    ref, final = _optimizer_run(case.torch, params, torch.float64, storage=dtype)
    err, where = _worst_update(tk, ref, final, dtype)
    torch_err, _ = _worst_update(th, ref, final, dtype)
    return _verdict(err, torch_err, f"worst: {where} after {OPTIMIZER_STEPS} steps")
