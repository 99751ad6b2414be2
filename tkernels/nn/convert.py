"""``convert(model)``: put tkernels twins in place of the torch.nn layers of an existing model.

The swap happens in place, container by container, and keeps the model's state:
the twin adopts the very ``Parameter`` and buffer objects of the layer it replaces
(so an optimizer built before the conversion keeps working, and devices and dtypes
cannot change), its training flag, its hooks and any attributes set on it.

With ``fuse=True``, a Linear / Conv2d / BatchNorm followed directly by an activation
inside an ``nn.Sequential`` becomes one fused layer, and the activation's slot becomes
``nn.Identity``: indices and state_dict keys stay what they were.

What is converted is data: :data:`RULES` maps a torch class to the name of its twin in
:mod:`tkernels.nn` and the constructor arguments to copy. A twin that does not exist (yet)
is looked up at call time, so such layers are simply left alone and reported.
"""
from __future__ import annotations

import inspect
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

from torch import nn

from ..activations import Activation, resolve_activation

__all__ = ["convert", "ConversionReport", "RULES"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rule:
    """How to build the tkernels twin of one torch class: the twin's name in tkernels.nn and the
    constructor arguments, read from the module's attribute of the same name. Specials:
    ``bias`` (whether the layer has one); ``affine_bias`` (``bias=False`` for an affine norm layer
    without bias, omitted otherwise, since torch < 2.5 has no such argument); ``weight`` (a loss's
    class weights: passed as None, the buffer itself is adopted); ``device``/``dtype`` (the twin
    is built on the meta device, then adopts the original tensors)."""

    twin: str
    args: Tuple[str, ...] = ()


_BN = ("num_features", "eps", "momentum", "affine", "track_running_stats", "affine_bias", "device", "dtype")
_STATEFUL = ("device", "dtype")

RULES: Dict[type, Rule] = {
    nn.Linear: Rule("Linear", ("in_features", "out_features", "bias", *_STATEFUL)),
    nn.Conv2d: Rule("Conv2d", ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                               "groups", "bias", "padding_mode", *_STATEFUL)),
    nn.BatchNorm1d: Rule("BatchNorm1d", _BN),
    nn.BatchNorm2d: Rule("BatchNorm2d", _BN),
    nn.SyncBatchNorm: Rule("SyncBatchNorm", (*_BN, "process_group")),
    nn.MaxPool2d: Rule("MaxPool2d", ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")),
    nn.AvgPool2d: Rule("AvgPool2d", ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                     "divisor_override")),
    nn.AdaptiveAvgPool2d: Rule("AdaptiveAvgPool2d", ("output_size",)),
    nn.ReLU: Rule("ReLU", ("inplace",)),
    nn.LeakyReLU: Rule("LeakyReLU", ("negative_slope", "inplace")),
    nn.GELU: Rule("GELU", ("approximate",)),
    nn.SiLU: Rule("SiLU", ("inplace",)),
    nn.Sigmoid: Rule("Sigmoid"),
    nn.Tanh: Rule("Tanh"),
    nn.Softmax: Rule("Softmax", ("dim",)),
    nn.LogSoftmax: Rule("LogSoftmax", ("dim",)),
    nn.Dropout: Rule("Dropout", ("p", "inplace")),
    nn.CrossEntropyLoss: Rule("CrossEntropyLoss", ("weight", "ignore_index", "reduction", "label_smoothing")),
    nn.MSELoss: Rule("MSELoss", ("reduction",)),
}

# Activations that a preceding layer can absorb (resolve_activation reads their parameters).
_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh)
# Leaves that compute nothing worth a kernel; containers are recursed into, never reported.
_PASSTHROUGH = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Sequential, nn.ModuleList, nn.ModuleDict)
# Per-instance state that a twin takes over from the layer it replaces, besides its tensors.
_HOOK_ATTRS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks", "_is_full_backward_hook", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


@dataclass(frozen=True)
class Converted:
    name: str
    source: str  # e.g. "torch.nn.Conv2d"
    twin: str  # e.g. "tkernels.nn.Conv2d"


@dataclass(frozen=True)
class Fused:
    layer: str  # qualified name of the layer that now applies the activation
    activation_slot: str  # qualified name of the slot that became nn.Identity
    activation: str


@dataclass(frozen=True)
class LeftAlone:
    name: str
    type_name: str
    reason: str


@dataclass
class ConversionReport:
    """What :func:`convert` did: the layers it converted, the activations it fused, and the layers
    it left alone with the reason (``str(report)`` is a readable summary)."""

    converted: List[Converted] = field(default_factory=list)
    fused: List[Fused] = field(default_factory=list)
    left_alone: List[LeftAlone] = field(default_factory=list)

    @property
    def fully_converted(self) -> bool:
        return not self.left_alone

    def summary(self) -> str:
        return (f"converted {len(self.converted)} layer(s), fused {len(self.fused)} activation(s), "
                f"left {len(self.left_alone)} layer(s) alone")

    def __str__(self) -> str:
        lines = [self.summary()]
        lines += [f"  fused   {f.layer} + {f.activation_slot} ({f.activation})" for f in self.fused]
        lines += [f"  kept    {m.name} ({m.type_name}): {m.reason}" for m in self.left_alone]
        return "\n".join(lines)


class _Refused(Exception):
    """A twin could not take this layer's place; the message says why."""


def _twin_class(rule: Rule) -> Optional[type]:
    from .. import nn as tnn  # at call time: twins that land later are picked up

    return getattr(tnn, rule.twin, None)


def _qualified(name: str) -> str:
    return name or "(model)"


def _type_name(cls: type) -> str:
    module = "torch.nn" if cls.__module__.startswith("torch.nn") else cls.__module__
    module = "tkernels.nn" if module.startswith("tkernels.nn") else module
    return f"{module}.{cls.__name__}"


def _rule_for(module: nn.Module) -> Tuple[Optional[type], Optional[Rule]]:
    """(torch class, rule) when ``module`` is exactly a torch class of the table or exactly its twin."""
    cls = type(module)
    if cls in RULES:
        return cls, RULES[cls]
    for torch_cls, rule in RULES.items():
        if cls is _twin_class(rule) and cls is not None:
            return torch_cls, rule
    return None, None


def _constructor_kwargs(module: nn.Module, rule: Rule) -> dict:
    tensors = list(module.parameters(recurse=False)) + [b for b in module.buffers(recurse=False)]
    kwargs = {}
    for arg in rule.args:
        if arg == "bias":
            kwargs[arg] = module.bias is not None
        elif arg == "affine_bias":  # torch >= 2.5 norms: pass bias=False only for an affine norm without bias
            if module.affine and module.bias is None:
                kwargs["bias"] = False
        elif arg == "weight":
            kwargs[arg] = None
        elif arg == "device":
            kwargs[arg] = "meta"
        elif arg == "dtype":
            floating = [t for t in tensors if t.is_floating_point()]
            kwargs[arg] = floating[0].dtype if floating else None
        else:
            kwargs[arg] = getattr(module, arg)
    return kwargs


def _accepts_activation(cls: type) -> bool:
    try:
        return "activation" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


def _build_twin(module: nn.Module, rule: Rule, twin_cls: type, activation: Optional[Activation] = None) -> nn.Module:
    """A twin of ``module`` that owns the module's own Parameter and buffer objects."""
    kwargs = _constructor_kwargs(module, rule)
    if activation is not None:
        kwargs["activation"] = activation
    try:
        twin = twin_cls(**kwargs)
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as exc:
        raise _Refused(f"{_type_name(twin_cls)} does not support this configuration ({exc})") from exc
    if set(twin._parameters) != set(module._parameters) or set(twin._buffers) != set(module._buffers):
        raise _Refused(f"{_type_name(twin_cls)} holds parameters {sorted(twin._parameters)} and buffers "
                       f"{sorted(twin._buffers)}, but the layer has {sorted(module._parameters)} and "
                       f"{sorted(module._buffers)}")
    twin._parameters.update(module._parameters)
    twin._buffers.update(module._buffers)
    twin._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    leftover = [n for n, t in [*twin.named_parameters(recurse=False), *twin.named_buffers(recurse=False)]
                if t is not None and t.is_meta]
    if leftover:
        raise _Refused(f"{_type_name(twin_cls)} keeps tensors of its own ({leftover}) that the layer has not")
    twin.training = module.training
    for attr in _HOOK_ATTRS:
        if attr in module.__dict__:
            twin.__dict__[attr] = module.__dict__[attr]
    for attr, value in module.__dict__.items():  # attributes a user set on the instance
        twin.__dict__.setdefault(attr, value)
    return twin


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, attr, None) for attr in
               ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


class _Converter:
    def __init__(self, model: nn.Module, fuse: bool):
        self.fuse = fuse
        self.report = ConversionReport()
        self.memo: Dict[int, Tuple[nn.Module, nn.Module]] = {}
        # A layer reachable twice (shared weights) must behave the same everywhere: never fuse it.
        self.uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))

    def visit(self, module: nn.Module, name: str) -> nn.Module:
        if id(module) in self.memo:
            return self.memo[id(module)][1]
        result = self._visit(module, name)
        # the original stays referenced, so its id cannot be reused by a new module meanwhile
        self.memo[id(module)] = (module, result)
        if result is not module:
            self.uses[id(result)] = self.uses[id(module)]
        return result

    def _visit(self, module: nn.Module, name: str) -> nn.Module:
        torch_cls, rule = _rule_for(module)
        if rule is not None:
            return self._convert_leaf(module, name, torch_cls, rule)
        table_base = next((cls for cls in RULES if isinstance(module, cls)), None)
        if table_base is not None:
            self.report.left_alone.append(LeftAlone(
                _qualified(name), _type_name(type(module)),
                f"a subclass of {_type_name(table_base)} (its forward may differ; convert only exact classes)"))
            return module
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            new_child = self.visit(child, f"{name}.{child_name}" if name else child_name)
            if new_child is not child:
                module._modules[child_name] = new_child
        if self.fuse and isinstance(module, nn.Sequential):
            self._fuse_sequential(module, name)
        if not module._modules and not isinstance(module, _PASSTHROUGH) and not self._is_twin(module):
            self.report.left_alone.append(LeftAlone(_qualified(name), _type_name(type(module)),
                                                    "no tkernels twin for this layer type"))
        return module

    @staticmethod
    def _is_twin(module: nn.Module) -> bool:
        return type(module).__module__.startswith("tkernels.")

    def _convert_leaf(self, module, name, torch_cls, rule) -> nn.Module:
        twin_cls = _twin_class(rule)
        if type(module) is twin_cls:
            return module  # already a twin
        if twin_cls is None:
            self.report.left_alone.append(LeftAlone(_qualified(name), _type_name(type(module)),
                                                    f"tkernels.nn.{rule.twin} is not available"))
            return module
        try:
            twin = _build_twin(module, rule, twin_cls)
        except _Refused as exc:
            self.report.left_alone.append(LeftAlone(_qualified(name), _type_name(type(module)), str(exc)))
            return module
        self.report.converted.append(Converted(_qualified(name), _type_name(torch_cls), _type_name(twin_cls)))
        return twin

    def _fusible_pair(self, layer: nn.Module, act: nn.Module) -> Optional[Activation]:
        """The activation that ``layer`` can absorb from ``act``, or None."""
        _, rule = _rule_for(layer)
        if rule is None or type(layer) is not _twin_class(rule) or not _accepts_activation(type(layer)):
            return None
        current = getattr(layer, "activation", None)
        if not isinstance(current, Activation) or not current.is_identity:
            return None
        act_torch_cls, _ = _rule_for(act)
        if act_torch_cls not in _ACTIVATIONS:
            return None
        if self.uses[id(layer)] > 1 or self.uses[id(act)] > 1 or _has_hooks(layer) or _has_hooks(act):
            return None
        return resolve_activation(act)

    def _fuse_sequential(self, seq: nn.Sequential, name: str) -> None:
        keys = list(seq._modules)
        i = 0
        while i + 1 < len(keys):
            layer, act = seq._modules[keys[i]], seq._modules[keys[i + 1]]
            activation = None if layer is None or act is None else self._fusible_pair(layer, act)
            if activation is None:
                i += 1
                continue
            _, rule = _rule_for(layer)
            try:
                fused = _build_twin(layer, rule, type(layer), activation=activation)
            except _Refused:
                i += 1
                continue
            seq._modules[keys[i]], seq._modules[keys[i + 1]] = fused, nn.Identity()
            prefix = f"{name}." if name else ""
            slot = f"{prefix}{keys[i + 1]}"
            self.report.converted = [c for c in self.report.converted if c.name != slot]
            self.report.fused.append(Fused(f"{prefix}{keys[i]}", slot, str(activation)))
            i += 2


def convert(model: nn.Module, *, fuse: bool = True,
            return_report: bool = False) -> Union[nn.Module, Tuple[nn.Module, ConversionReport]]:
    """Replace every supported ``torch.nn`` layer of ``model`` by its :mod:`tkernels.nn` twin.

    Containers are modified in place and the model is returned (a new object only when ``model``
    is itself a convertible layer). The twins adopt the original Parameter and buffer objects, so
    values, devices, dtypes, ``requires_grad`` and optimizers built beforehand are unaffected; each
    twin keeps its layer's training flag and hooks.

    Only layers whose type is exactly a supported torch class are converted; subclasses (whose
    forward may differ), layers without a twin and configurations a twin refuses are left alone.
    Functional calls inside a custom ``forward`` (``F.relu(x)``, ``x + y``) are not seen.

    Args:
        fuse: fold an activation module that directly follows a Linear, Conv2d or BatchNorm
            inside an ``nn.Sequential`` into that layer (its slot becomes ``nn.Identity``).
            Pairs with hooks, or layers reachable from two places, are not fused.
        return_report: also return the :class:`ConversionReport`.

    The summary (and the layers left alone) is logged at INFO level on ``tkernels.nn.convert``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected a torch.nn.Module, but got {type(model).__name__}")
    converter = _Converter(model, fuse)
    result = converter.visit(model, "")
    report = converter.report
    logger.info("convert: %s", report)
    return (result, report) if return_report else result
