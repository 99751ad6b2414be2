"""The one registry of activations that fused ops accept.

Each activation has
  * a small integer ``code``, a ``tl.constexpr`` that selects its branch inside
    the Triton device functions :func:`apply_activation` / :func:`activation_grad`
    (the branch is resolved at compile time, so an unused activation costs nothing);
  * a NumPy forward and derivative, from :mod:`tkernels.reference.activations`;
  * whether its derivative can be computed from the *output* y (relu, sigmoid,
    tanh): then backward keeps y, which the caller holds anyway, and no extra
    pre-activation tensor is written. Otherwise the pre-activation z is kept.

Users name an activation by string ("relu", "gelu_tanh", ...), by an
:class:`Activation` carrying its parameter, or by a torch.nn module instance
(``nn.ReLU()``, ``nn.LeakyReLU(0.2)``, ``nn.GELU(approximate="tanh")``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch
import triton
import triton.language as tl

from .reference import activations as np_act


@dataclass(frozen=True)
class ActivationKind:
    name: str
    code: int
    grad_from_output: bool
    numpy_forward: Callable
    numpy_grad: Callable  # (saved, param) -> derivative, saved is y or z per grad_from_output
    default_param: float = 0.0
    aliases: tuple = ()


IDENTITY, RELU, LEAKY_RELU, GELU, GELU_TANH, SILU, SIGMOID, TANH = range(8)

_KINDS = [
    ActivationKind("identity", IDENTITY, True, np_act.identity, np_act.identity_grad, aliases=("none", "linear")),
    ActivationKind("relu", RELU, True, np_act.relu, np_act.relu_grad_from_output),
    ActivationKind("leaky_relu", LEAKY_RELU, False, np_act.leaky_relu, np_act.leaky_relu_grad, default_param=0.01),
    ActivationKind("gelu", GELU, False, np_act.gelu, np_act.gelu_grad, aliases=("gelu_erf",)),
    ActivationKind("gelu_tanh", GELU_TANH, False, np_act.gelu_tanh, np_act.gelu_tanh_grad),
    ActivationKind("silu", SILU, False, np_act.silu, np_act.silu_grad, aliases=("swish",)),
    ActivationKind("sigmoid", SIGMOID, True, np_act.sigmoid, np_act.sigmoid_grad_from_output),
    ActivationKind("tanh", TANH, True, np_act.tanh, np_act.tanh_grad_from_output),
]
REGISTRY = {k.name: k for k in _KINDS}
_CODES = {k.name: k.code for k in _KINDS}
_GRAD_FROM_OUTPUT = {k.name: k.grad_from_output for k in _KINDS}
_BY_ALIAS = {alias: k for k in _KINDS for alias in (k.name, *k.aliases)}
_BY_CODE = {k.code: k for k in _KINDS}


@dataclass(frozen=True)
class Activation:
    """An activation with its parameter (only leaky_relu has one: negative_slope)."""

    name: str
    param: float = 0.0

    # (one dict read each: every op reads these on every call. Not functools.cached_property: on
    # Python 3.11 it takes a lock, which torch.compile cannot trace.)
    @property
    def kind(self) -> ActivationKind:
        return REGISTRY[self.name]

    @property
    def code(self) -> int:
        return _CODES[self.name]

    @property
    def is_identity(self) -> bool:
        return self.name == "identity"

    @property
    def grad_from_output(self) -> bool:
        return _GRAD_FROM_OUTPUT[self.name]

    def numpy_forward(self, z):
        return self.kind.numpy_forward(z, self.param)

    def numpy_grad(self, saved):
        return self.kind.numpy_grad(saved, self.param)

    def __str__(self) -> str:
        if self.name == "leaky_relu":
            return f"leaky_relu(negative_slope={self.param:g})"
        return self.name


ActivationLike = Union[None, str, Activation, torch.nn.Module]


def _from_module(module: torch.nn.Module) -> Optional[Activation]:
    nn = torch.nn
    if isinstance(module, nn.Identity):
        return Activation("identity")
    if isinstance(module, nn.ReLU):
        return Activation("relu")
    if isinstance(module, nn.LeakyReLU):
        return Activation("leaky_relu", float(module.negative_slope))
    if isinstance(module, nn.GELU):
        return Activation("gelu_tanh" if module.approximate == "tanh" else "gelu")
    if isinstance(module, nn.SiLU):
        return Activation("silu")
    if isinstance(module, nn.Sigmoid):
        return Activation("sigmoid")
    if isinstance(module, nn.Tanh):
        return Activation("tanh")
    return None


def valid_names() -> str:
    return ", ".join(sorted(_BY_ALIAS))


_IDENTITY = Activation("identity")
_BY_SPELLING: Dict[str, Activation] = {}  # every op resolves its activation name on every call


def resolve_activation(spec: ActivationLike) -> Activation:
    """Turn any accepted activation spelling into an :class:`Activation`."""
    if spec is None:
        return _IDENTITY
    if type(spec) is str and spec in _BY_SPELLING:
        return _BY_SPELLING[spec]
    if isinstance(spec, Activation):
        if spec.name not in REGISTRY:
            raise ValueError(f"unknown activation {spec.name!r}; valid: {valid_names()}")
        return spec
    if isinstance(spec, str):
        kind = _BY_ALIAS.get(spec.lower())
        if kind is None:
            raise ValueError(f"unknown activation {spec!r}; valid: {valid_names()}")
        act = _BY_SPELLING[spec] = Activation(kind.name, kind.default_param)
        return act
    if isinstance(spec, torch.nn.Module):
        act = _from_module(spec)
        if act is None:
            raise ValueError(
                f"unsupported activation module {type(spec).__name__}; supported: Identity, ReLU, LeakyReLU, "
                f"GELU, SiLU, Sigmoid, Tanh, or a name among {valid_names()}"
            )
        return act
    raise TypeError(f"activation must be None, a name, an Activation or an nn.Module, not {type(spec).__name__}")


def from_code(code: int, param: float = 0.0) -> Activation:
    return Activation(_BY_CODE[code].name, param)


# ----------------------------------------------------------------------------------------------
# Triton device functions. `z` is fp32; ACT is one of the integer codes above.
# There is no tl.tanh and the interpreter has no libdevice, so tanh is built from tl.exp. Every
# formula keeps its relative error at a few fp32 ulps over the whole range, NaN propagates, and
# +-inf give torch's limits: tanh(u) = 2*sigmoid(2u) - 1 would lose all digits near 0
# (19% at u = 1e-7), so small |u| takes a polynomial.
# ----------------------------------------------------------------------------------------------
_SQRT_2_OVER_PI = 0.7978845608028654
_INV_SQRT_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@triton.jit
def _half_one_plus_minus_tanh(u):
    """((1 + tanh(u)) / 2, (1 - tanh(u)) / 2), i.e. (sigmoid(2u), sigmoid(-2u)), from one exp and one
    reciprocal: with e = exp(-2|u|) <= 1 and r = 1 / (1 + e) they are (r, e r) for u >= 0 and (e r, r)
    below, so neither overflows nor cancels (1 - tanh(u) computed as a difference would lose every
    digit where tanh is near 1). One exp and one division keep the fused epilogues and gated GEMM
    prologues that inline this within their register budget."""
    e = tl.exp(-2.0 * tl.abs(u))
    r = 1.0 / (1.0 + e)
    er = e * r
    positive = u >= 0.0
    return tl.where(positive, r, er), tl.where(positive, er, r)


@triton.jit
def _tanh(u):
    """tanh(u): for |u| < 0.625 Cephes' odd minimax polynomial u + u^3 P(u^2) (about 1 ulp, and exact
    to the last bit as u -> 0); beyond, sign(u) (1 - 2e / (1 + e)) with e = exp(-2|u|) <= 0.29,
    whose only rounding is in a term below 0.45, so the result is within an ulp or two."""
    a = tl.abs(u)
    s = u * u
    poly = ((((-5.70498872745e-3 * s + 2.06390887954e-2) * s - 5.37397155531e-2) * s + 1.33314422036e-1) * s
            - 3.33332819422e-1)
    small = u + u * s * poly
    e = tl.exp(-2.0 * a)
    large = 1.0 - 2.0 * e / (1.0 + e)
    return tl.where(a < 0.625, small, tl.where(u < 0.0, -large, large))


@triton.jit
def apply_activation(z, ACT: tl.constexpr, param):
    """act(z) for an fp32 tile."""
    if ACT == 1:  # relu: torch's threshold (z <= 0 -> 0), so NaN stays NaN
        return tl.where(z <= 0.0, 0.0, z)
    elif ACT == 2:  # leaky_relu
        return tl.where(z > 0.0, z, z * param)
    elif ACT == 3:  # gelu (erf)
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 4:  # gelu (tanh approximation): 0.5 z (1 + tanh(inner)), 1 + tanh without cancellation
        half_one_plus_t, _ = _half_one_plus_minus_tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        return z * half_one_plus_t
    elif ACT == 5:  # silu
        return z * tl.sigmoid(z)
    elif ACT == 6:  # sigmoid
        return tl.sigmoid(z)
    elif ACT == 7:  # tanh
        return _tanh(z)
    else:
        return z


@triton.jit
def activation_grad(saved, ACT: tl.constexpr, param):
    """act'(.) for an fp32 tile; `saved` is y for relu/sigmoid/tanh, z for the others."""
    if ACT == 1:  # relu, from y: torch's threshold_backward passes the gradient where y is NaN
        return tl.where(saved <= 0.0, 0.0, 1.0)
    elif ACT == 2:  # leaky_relu, from z
        return tl.where(saved > 0.0, 1.0, param)
    elif ACT == 3:  # gelu: Phi(z) + z * phi(z)
        cdf = 0.5 * (1.0 + tl.math.erf(saved * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * saved * saved)
        return cdf + saved * pdf
    elif ACT == 4:  # gelu_tanh: (1 + t)/2 + z/2 (1 - t^2) inner', with (1 - t^2)/4 = (1 + t)/2 (1 - t)/2
        inner = 0.7978845608028654 * (saved + 0.044715 * saved * saved * saved)
        e = tl.exp(-2.0 * tl.abs(inner))  # (1 + t)/2 = r or e r, and (1 - t^2)/4 = e r^2 for either sign
        r = 1.0 / (1.0 + e)
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * saved * saved)
        return tl.where(inner >= 0.0, r, e * r) + 2.0 * saved * (e * r * r) * dinner
    elif ACT == 5:  # silu: s * (1 + z * (1 - s))
        s = tl.sigmoid(saved)
        return s * (1.0 + saved * (1.0 - s))
    elif ACT == 6:  # sigmoid, from y
        return saved * (1.0 - saved)
    elif ACT == 7:  # tanh, from y
        return 1.0 - saved * saved
    else:
        return tl.full(saved.shape, 1.0, tl.float32)
