"""How an op call reaches its implementation: straight in eager mode, through torch.library otherwise.

Every op is a ``torch.library.custom_op`` so that torch.compile, export, fake tensors, opcheck and
autocast see an opaque operator with a fake (meta) function. In plain eager mode that machinery is
pure cost: a call through the dispatcher and the custom-op wrappers takes tens of microseconds,
several times what torch spends on a small layer. So:

* :func:`custom_op` registers the op as usual and returns a callable that runs the Python
  implementation directly when the call is plain eager, and the registered op otherwise;
* :func:`run_function` runs an ``autograd.Function``: through ``Function.apply`` when a gradient may be
  needed, and as a direct call of ``forward`` (with a context that drops what forward saves) when
  none can be, e.g. under ``torch.no_grad()`` or for inputs that do not require grad.

"Plain eager" (:func:`plain_eager`) means: not tracing for torch.compile/export, no
``TorchDispatchMode`` active (fake tensors, make_fx, FlopCounter...), no functorch transform, no
forward-mode AD level entered (``torch.autograd.forward_ad.dual_level``), and a first tensor
argument that is an ordinary CPU or CUDA tensor (not a subclass, not on the meta device).
Everything else keeps the exact torch.library behaviour. Forward AD is excluded because a dual
tensor need not require grad: the direct call of ``forward`` would return a result without its
tangent, where ``Function.apply`` raises torch's error for a Function without ``jvp``. Autocast
needs no exception: the public functions cast their inputs before any op runs (ops/_autocast.py),
and the custom ops have no Autocast kernel.

A forward that :func:`run_function` runs eagerly has just been checked, so the custom ops it calls
skip the check (a per-thread flag, ``_inside``), and an op it calls through
:meth:`EagerCustomOp.in_forward` on the forward's own first argument goes straight to the
implementation; anything a forward runs through ``run_function`` again takes the full ``Function.apply``.

The direct path keeps one thing the dispatcher did: arguments the op declares as mutated get their
version counter bumped (a Triton kernel writing in place does not), so autograd still detects an
in-place change to a tensor saved for backward.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def _first_tensor(args: Sequence[Any]):
    for a in args:
        if isinstance(a, Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], Tensor):
            return a[0]
    return None


# bound once: each is read on every op call
_is_compiling = torch.compiler.is_compiling
_dispatch_stack_depth = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active
_increment_version = torch.autograd.graph.increment_version
# forward_ad._current_level is -1 outside every dual_level (dynamo's guards read it too): one module
# attribute read, ~10 ns, where asking each tensor for its tangent would cost per argument
_forward_ad = torch.autograd.forward_ad


def eager_device(args: Sequence[Any]) -> Optional[str]:
    """'cpu' or 'cuda' when a call with these arguments may skip torch.library's dispatch (see the
    module docstring), with the device type its first tensor is on; None when it must dispatch."""
    if _is_compiling() or _dispatch_stack_depth() or _functorch_active() or _forward_ad._current_level >= 0:
        return None
    t = args[0] if args and isinstance(args[0], Tensor) else _first_tensor(args)
    if t is None:
        return "cpu"
    if type(t) not in _PLAIN_TYPES:
        return None
    # (is_cuda / is_cpu: t.device.type builds a device and then its type string, ~0.4 us)
    return "cuda" if t.is_cuda else ("cpu" if t.is_cpu else None)


def plain_eager(args: Sequence[Any]) -> bool:
    return eager_device(args) is not None


def _mutated_arguments(fn: Callable, mutates_args: Sequence[str]) -> Tuple[Tuple[int, str], ...]:
    """(position, name) of each mutated argument."""
    names = list(fn.__code__.co_varnames[:fn.__code__.co_argcount])
    return tuple((names.index(name), name) for name in mutates_args)


class EagerCustomOp:
    """A registered custom op (``.op``) that runs its implementation directly in plain eager mode.

    Attribute access (``register_fake``, ``register_autocast``, ...) goes to the registered op.
    """

    def __init__(self, qualname: str, op, impl: Callable, mutated: Tuple[Tuple[int, str], ...]):
        self.qualname = qualname
        self.op = op
        self.impl = impl
        self.cuda_impl = impl  # ops/_common.guard_custom_ops puts the device guard here
        self.mutated = mutated
        namespace, name = qualname.split("::")
        self.packet = getattr(getattr(torch.ops, namespace), name)  # what tracing sees, as before

    def __call__(self, *args, **kwargs):
        first = args[0] if args and isinstance(args[0], Tensor) else _first_tensor(args)
        # Called by a forward that run_function runs eagerly, on its plain tensors: checked there.
        # (The flag is also still set while autograd runs saved-tensor hooks after forward, which may
        # call ops on other tensors or under a mode: those take the full check.)
        if (_inside.forward and type(first) in _PLAIN_TYPES and (first.is_cuda or first.is_cpu)
                and not _dispatch_stack_depth()):
            cuda = first.is_cuda
        else:
            device = eager_device(args)
            if device is None:
                return self.packet(*args, **kwargs)
            cuda = device == "cuda"
        result = (self.cuda_impl if cuda else self.impl)(*args, **kwargs)
        if self.mutated:
            self._bump_versions(args, kwargs)
        return result

    def in_forward(self, *args):
        """The op called from an ``autograd.Function`` forward on that forward's own (checked)
        arguments: the implementation directly while :func:`run_function` runs the forward eagerly,
        the op otherwise (tracing, fake tensors, a forward run by plain ``apply``)."""
        first = args[0]
        # (an identity test, not the flag alone: autograd runs saved-tensor hooks inside the eager
        # apply, and an op a hook calls on other tensors or under a mode needs the full check)
        if _inside.checked is not first or _dispatch_stack_depth():
            return self(*args)
        result = (self.cuda_impl if first.is_cuda else self.impl)(*args)
        if self.mutated:
            self._bump_versions(args, {})
        return result

    def _bump_versions(self, args, kwargs) -> None:
        for i, name in self.mutated:
            value = args[i] if i < len(args) else kwargs.get(name)
            for t in (value if isinstance(value, (list, tuple)) else (value,)):
                if t is not None:
                    _increment_version(t)

    def __getattr__(self, name: str):
        return getattr(self.op, name)


def custom_op(qualname: str, *, mutates_args: Sequence[str]):
    """``torch.library.custom_op(qualname, mutates_args=...)`` with the eager fast path."""
    def register(fn: Callable) -> EagerCustomOp:
        op = torch.library.custom_op(qualname, mutates_args=tuple(mutates_args))(fn)
        return EagerCustomOp(qualname, op, fn, _mutated_arguments(fn, mutates_args))
    return register


class _NoGradContext:
    """Stands in for autograd's ctx when no gradient can be needed: what forward saves is dropped."""

    def __init__(self, n_inputs: int):
        self.needs_input_grad = (False,) * n_inputs

    def save_for_backward(self, *tensors) -> None:
        pass

    def mark_dirty(self, *tensors) -> None:
        pass

    def mark_non_differentiable(self, *tensors) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass


# autograd.Function.apply's C++ half. The Python half only binds default arguments for functions
# with a separate setup_context (ours have none) and handles functorch transforms (excluded by
# plain_eager); calling the C++ half directly saves several microseconds per op.
_C_APPLY = torch._C._FunctionBase.__dict__["apply"]
_grad_enabled = torch.is_grad_enabled


class _Inside(threading.local):
    """Per thread: whether the code running is a forward that run_function called eagerly (its
    custom ops then skip the plain-eager check run_function has just made), and the first tensor
    argument of that forward, which run_function checked."""
    forward = False
    checked: Optional[Tensor] = None


_inside = _Inside()


def _eager_apply(function: type):
    apply = function.__dict__.get("_eager_apply")
    if apply is None:
        apply = _C_APPLY.__get__(None, function)
        setattr(function, "_eager_apply", apply)
    return apply


def run_function(function: type, *args):
    """``function.apply(*args)``, or ``function.forward`` called directly when no gradient can be needed."""
    inside = _inside
    if inside.forward or eager_device(args) is None:
        return function.apply(*args)
    inside.forward = True
    inside.checked = args[0]
    try:
        if _grad_enabled():
            for a in args:
                if isinstance(a, Tensor) and a.requires_grad:
                    return _eager_apply(function)(*args)
        return function.forward(_NoGradContext(len(args)), *args)
    finally:
        inside.forward = False
        inside.checked = None
