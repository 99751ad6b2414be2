"""Which Triton kernels a test launched, and the kernel mutants of benchmarks/mutation_check.py.

The hook is test-side only: it wraps the `run` method of Triton's kernel classes (the
interpreter's `InterpretedFunction` and the compiled `JITFunction`; an autotuner calls the
latter) for the duration of one test, so the library's launch path is untouched.

Mutants (opt-in, set by benchmarks/mutation_check.py through TKERNELS_MUTANT="kernel:mode"):
* ``scale``: after the launch, every element it wrote is multiplied by 1.01 (a 1% error);
  the written elements are those of the tensor arguments whose value changed.
* ``skip``: the launch does not happen (its outputs keep whatever they held: NaN for fresh
  buffers, since the tests fill uninitialised memory with NaN).
* ``hide``: the launch happens but is not recorded, as if the kernel had been replaced by
  torch code computing the same values; only a launch assertion can catch it.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, List, Optional, Tuple

import torch

MUTANT_VARIABLE = "TKERNELS_MUTANT"
MUTANT_MODES = ("scale", "skip", "hide")


def kernel_classes() -> List[type]:
    """The Triton classes whose `run` launches a kernel (interpreted or compiled)."""
    classes = []
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - every supported triton has it
        pass
    from triton.runtime.jit import JITFunction
    classes.append(JITFunction)
    return classes


def kernel_name(kernel) -> str:
    return getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel))


def mutant() -> Optional[Tuple[str, str]]:
    value = os.environ.get(MUTANT_VARIABLE)
    if not value:
        return None
    name, _, mode = value.partition(":")
    if mode not in MUTANT_MODES:
        raise ValueError(f"{MUTANT_VARIABLE}={value!r}: expected 'kernel:mode' with mode one of {MUTANT_MODES}")
    return name, mode


class Launches:
    """Names of the kernels launched while installed, in launch order."""

    def __init__(self):
        self.names: List[str] = []
        self.modules: List[str] = []
        chosen = mutant()
        self._hidden = chosen[0] if chosen and chosen[1] == "hide" else None

    def install(self, monkeypatch) -> "Launches":
        for cls in kernel_classes():
            monkeypatch.setattr(cls, "run", self._recording(cls.run))
        return self

    def _recording(self, original: Callable) -> Callable:
        def run(kernel, *args, **kwargs):
            name = kernel_name(kernel)
            if name != self._hidden:
                self.names.append(name)
                self.modules.append(getattr(getattr(kernel, "fn", kernel), "__module__", ""))
            return original(kernel, *args, **kwargs)
        return run

    def clear(self) -> None:
        self.names.clear()
        self.modules.clear()

    def assert_ran(self, *names: str) -> None:
        """Every kernel named ran at least once since the last clear()."""
        missing = [n for n in names if n not in self.names]
        assert not missing, f"kernels {missing} did not launch; launched: {sorted(set(self.names))}"

    def assert_any(self, names: Iterable[str], what: str = "") -> None:
        names = set(names)
        assert names & set(self.names), (f"none of the {what or 'expected'} kernels {sorted(names)} launched; "
                                         f"launched: {sorted(set(self.names))}")


    def assert_any_module(self, modules: Iterable[str], what: str = "") -> None:
        modules = set(modules)
        assert modules & set(self.modules), (f"no kernel of the {what} modules {sorted(modules)} launched; "
                                             f"launched: {sorted(set(self.names))}")


# ---------------------------------------------------------------------------------------------
# Mutants: installed for a whole pytest session by tests/conftest.py when TKERNELS_MUTANT is set.
# ---------------------------------------------------------------------------------------------
def _tensors(args, kwargs) -> List[torch.Tensor]:
    return [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]


def _changed(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    same = (before == after) | (before.isnan() & after.isnan()) if before.is_floating_point() else before == after
    return ~same


def _mutating(original: Callable, target: str, mode: str) -> Callable:
    def run(kernel, *args, **kwargs):
        if kernel_name(kernel) != target or kwargs.get("warmup"):
            return original(kernel, *args, **kwargs)
        if mode == "skip":
            return None
        tensors = _tensors(args, kwargs)
        before = [t.clone() for t in tensors]
        result = original(kernel, *args, **kwargs)
        with torch.no_grad():
            for b, t in zip(before, tensors):
                written = _changed(b, t)
                if written.any():
                    if t.is_floating_point():
                        t[written] = t[written] * 1.01
                    else:  # an integer output (e.g. an index): off by one is its "1%"
                        t[written] = t[written] + 1
        return result
    return run


def install_mutant() -> Optional[str]:
    """Patch the kernel classes for the whole session if TKERNELS_MUTANT asks for it."""
    chosen = mutant()
    if chosen is None or chosen[1] == "hide":
        return None if chosen is None else f"{chosen[0]}:{chosen[1]}"
    for cls in kernel_classes():
        cls.run = _mutating(cls.run, *chosen)
    return f"{chosen[0]}:{chosen[1]}"
