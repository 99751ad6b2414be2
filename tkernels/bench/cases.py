"""Per-op benchmark cases: inputs, the tkernels and torch callables, and what each op costs.

Each op is an :class:`OpSpec` in :data:`OPS`: how to read its dims, its parameters with
defaults, and a builder that gives a :class:`Case` for one shape, dtype and device. An op is
*available* only when tkernels exports it under torch's name (``tkernels.functional.<name>``
or ``tkernels.optim.<name>``), so ops appear in the CLI as the engineers adding them land.

FLOPs count multiply-adds as 2 (only for the GEMM-like ops; the others are memory-bound and
report GB/s). Bytes are each op's minimum traffic: every input read once and every output
written once, per pass, assuming whatever can be recomputed cheaply (dropout masks from the
seed, pooling argmaxes) is recomputed. ``fwd+bwd`` counts the forward and backward minima.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import BenchError
from .suites import PARAMETER_LISTS

MODES = ("fwd", "bwd", "fwd+bwd")
STEP = "step"  # the one mode of optimizers


@dataclass
class Case:
    """One op at one shape, dtype and device. ``make_inputs(requires_grad)`` draws a fresh input
    set (every provider gets sets from here, so requires_grad always matches); ``tkernels`` and
    ``torch`` map an input set to the output (functional ops) or to an optimizer (optimizers)."""

    kind: str  # "functional" | "optimizer"
    make_inputs: Callable[[bool], tuple]
    tkernels: Callable[..., Any]
    torch: Callable[..., Any]
    flops: Dict[str, Optional[float]]
    bytes: Dict[str, float]
    grad_argnums: Tuple[int, ...] = ()
    custom_check: Optional[str] = None  # "dropout": outputs are random, checked by their statistics
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Shape:
    """Dims plus the parameters that differ from the op's defaults; ``str`` is the --shapes token."""

    dims: Tuple[int, ...]
    params: Tuple[Tuple[str, Any], ...] = ()
    label: str = ""

    def __str__(self) -> str:
        parts = ["x".join(map(str, self.dims))] if self.dims else []
        parts += [f"{k}={v}" for k, v in self.params]
        return ":".join(parts)


@dataclass(frozen=True)
class OpSpec:
    name: str
    kind: str  # "functional" | "optimizer"
    dims: Optional[Tuple[str, ...]]  # None: any rank (pointwise ops)
    defaults: Dict[str, Any]
    builder: Callable[..., Case]
    doc: str

    @property
    def modes(self) -> Tuple[str, ...]:
        return (STEP,) if self.kind == "optimizer" else MODES

    def available(self) -> bool:
        module = _tkernels_module(self.kind)
        return module is not None and hasattr(module, self.name)

    def implementation(self):
        return getattr(_tkernels_module(self.kind), self.name)

    def dims_help(self) -> str:
        if self.kind == "optimizer":
            return "NUMELxCOUNT or " + "|".join(PARAMETER_LISTS)
        return "x".join(self.dims) if self.dims else "any shape, e.g. 64x4096"

    def shape(self, dims: Sequence[int], params: Optional[Dict[str, Any]] = None, label: str = "") -> Shape:
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            valid = ", ".join(f"{k}={v}" for k, v in self.defaults.items()) or "none"
            raise BenchError(f"{self.name}: unknown parameter(s) {', '.join(unknown)}; valid (with defaults): {valid}")
        model = params.get("model")
        if self.kind == "optimizer" and model:
            if model not in PARAMETER_LISTS:
                raise BenchError(f"{self.name}: unknown parameter list {model!r}; known: {', '.join(PARAMETER_LISTS)}")
            if dims:
                raise BenchError(f"{self.name}: give either dims NUMELxCOUNT or model={model}, not both")
        elif self.dims is not None and len(dims) != len(self.dims):
            raise BenchError(f"{self.name}: expected {len(self.dims)} dims {self.dims_help()}, but got "
                             f"{'x'.join(map(str, dims)) or 'none'}")
        elif not dims:
            raise BenchError(f"{self.name}: expected dims ({self.dims_help()}), but got none")
        if any(d < 1 for d in dims):
            raise BenchError(f"{self.name}: dims must be positive, but got {'x'.join(map(str, dims))}")
        chosen = tuple((k, v) for k, v in params.items() if v != self.defaults[k])
        return Shape(tuple(int(d) for d in dims), chosen, label)

    def parse_shape(self, token: str) -> Shape:
        """'64x128x256:activation=relu' -> Shape. Parts with '=' are parameters, the other is the dims."""
        dims: Tuple[int, ...] = ()
        params: Dict[str, Any] = {}
        for part in filter(None, token.strip().split(":")):
            if "=" in part:
                key, value = part.split("=", 1)
                params[key.strip()] = _parse_value(value.strip())
            elif self.kind == "optimizer" and part in PARAMETER_LISTS:
                params["model"] = part
            else:
                try:
                    dims = tuple(int(d) for d in part.lower().split("x"))
                except ValueError:
                    raise BenchError(f"{self.name}: cannot read shape {token!r}; expected {self.dims_help()} "
                                     "with optional ':name=value' parameters") from None
        return self.shape(dims, params)

    def build(self, shape: Shape, dtype: torch.dtype, device: torch.device) -> Case:
        params = {**self.defaults, **dict(shape.params)}
        case = self.builder(self, shape.dims, params, dtype, torch.device(device))
        case.params = params
        return case


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _tkernels_module(kind: str):
    name = "tkernels.optim" if kind == "optimizer" else "tkernels.functional"
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _rand(shape, dtype, device, requires_grad=False, scale=1.0) -> torch.Tensor:
    t = (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _pointwise_costs(n: int, es: int, fwd_tensors: int = 2, bwd_tensors: int = 3) -> Dict[str, float]:
    fwd, bwd = fwd_tensors * n * es, bwd_tensors * n * es
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _gemm_flops(per_pass: float) -> Dict[str, float]:
    """Forward is one GEMM; backward two (input and weight gradients)."""
    return {"fwd": per_pass, "bwd": 2 * per_pass, "fwd+bwd": 3 * per_pass}


NO_FLOPS = {"fwd": None, "bwd": None, "fwd+bwd": None, STEP: None}

# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------
# torch's own computation of each activation, for the torch side of a fused layer
TORCH_ACTIVATIONS = {
    "identity": lambda z, p: z,
    "relu": lambda z, p: F.relu(z),
    "leaky_relu": lambda z, p: F.leaky_relu(z, p),
    "gelu": lambda z, p: F.gelu(z),
    "gelu_tanh": lambda z, p: F.gelu(z, approximate="tanh"),
    "silu": lambda z, p: F.silu(z),
    "sigmoid": lambda z, p: torch.sigmoid(z),
    "tanh": lambda z, p: torch.tanh(z),
}


def _linear(spec, dims, p, dtype, device) -> Case:
    from ..activations import resolve_activation

    M, N, K = dims
    try:
        act = resolve_activation(p["activation"])
    except ValueError as exc:
        raise BenchError(f"linear: {exc}") from None
    fn, torch_act, has_bias = spec.implementation(), TORCH_ACTIVATIONS[act.name], bool(p["bias"])

    def make(rg):
        return (_rand((M, K), dtype, device, rg), _rand((N, K), dtype, device, rg, K ** -0.5),
                _rand((N,), dtype, device, rg) if has_bias else None)

    # backward reads y (relu, sigmoid, tanh) or the pre-activation z, which forward then also writes
    es, saved = _size(dtype), 0 if act.is_identity else M * N
    extra_write = 0 if act.is_identity or act.grad_from_output else M * N
    fwd = (M * K + N * K + N * has_bias + M * N + extra_write) * es
    bwd = (M * N + M * K + N * K + saved + M * K + N * K + N * has_bias) * es
    return Case("functional", make, lambda x, w, b: fn(x, w, b, activation=act),
                lambda x, w, b: torch_act(F.linear(x, w, b), act.param),
                _gemm_flops(2.0 * M * N * K), {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}, (0, 1, 2))


def _conv2d(spec, dims, p, dtype, device) -> Case:
    N, C, H, W, K, R = dims
    stride, groups, has_bias = int(p["stride"]), int(p["groups"]), bool(p["bias"])
    padding = R // 2 if p["padding"] == "half" else int(p["padding"])
    if C % groups or K % groups:
        raise BenchError(f"conv2d: in_channels={C} and out_channels={K} must be divisible by groups={groups}")
    P, Q = (H + 2 * padding - R) // stride + 1, (W + 2 * padding - R) // stride + 1
    if P < 1 or Q < 1:
        raise BenchError(f"conv2d: a {R}x{R} kernel with padding {padding} does not fit a {H}x{W} input")
    fn, kw = spec.implementation(), dict(stride=stride, padding=padding, groups=groups)

    def make(rg):
        fan_in = C // groups * R * R
        return (_rand((N, C, H, W), dtype, device, rg),
                _rand((K, C // groups, R, R), dtype, device, rg, fan_in ** -0.5),
                _rand((K,), dtype, device, rg) if has_bias else None)

    es, n_in, n_w, n_out = _size(dtype), N * C * H * W, K * (C // groups) * R * R, N * K * P * Q
    fwd = (n_in + n_w + K * has_bias + n_out) * es
    bwd = (n_out + n_in + n_w + n_in + n_w + K * has_bias) * es
    return Case("functional", make, lambda x, w, b: fn(x, w, b, **kw), lambda x, w, b: F.conv2d(x, w, b, **kw),
                _gemm_flops(2.0 * n_out * (C // groups) * R * R), {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd},
                (0, 1, 2))


def _batch_norm(spec, dims, p, dtype, device) -> Case:
    N, C, H, W = dims
    fn = spec.implementation()
    kw = dict(training=bool(p["training"]), momentum=float(p["momentum"]), eps=float(p["eps"]))
    layout = torch.channels_last if int(p["channels_last"]) else torch.contiguous_format

    def make(rg):
        x = _rand((N, C, H, W), dtype, device).contiguous(memory_format=layout).requires_grad_(rg)
        return (x, torch.zeros(C, dtype=dtype, device=device),
                torch.ones(C, dtype=dtype, device=device), (1 + 0.1 * _rand((C,), dtype, device)).requires_grad_(rg),
                _rand((C,), dtype, device, rg))

    return Case("functional", make, lambda x, rm, rv, w, b: fn(x, rm, rv, w, b, **kw),
                lambda x, rm, rv, w, b: F.batch_norm(x, rm, rv, w, b, **kw), dict(NO_FLOPS),
                _pointwise_costs(N * C * H * W, _size(dtype)), (0, 3, 4))


def _pool_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _pool(torch_fn):
    def build(spec, dims, p, dtype, device) -> Case:
        N, C, H, W = dims
        fn = spec.implementation()
        if spec.name == "adaptive_avg_pool2d":
            kw = dict(output_size=int(p["output_size"]))
            P = Q = kw["output_size"]
        else:
            kw = dict(kernel_size=int(p["kernel_size"]), stride=int(p["stride"]), padding=int(p["padding"]))
            P, Q = (_pool_out(s, kw["kernel_size"], kw["stride"], kw["padding"]) for s in (H, W))
            if P < 1 or Q < 1 or 2 * kw["padding"] > kw["kernel_size"]:
                raise BenchError(f"{spec.name}: {kw} does not fit a {H}x{W} input (padding must be at most half "
                                 "the kernel size)")
        es, n_in, n_out = _size(dtype), N * C * H * W, N * C * P * Q
        costs = {"fwd": (n_in + n_out) * es, "bwd": (n_out + n_in) * es}
        costs["fwd+bwd"] = costs["fwd"] + costs["bwd"]
        return Case("functional", lambda rg: (_rand((N, C, H, W), dtype, device, rg),), lambda x: fn(x, **kw),
                    lambda x: torch_fn(x, **kw), dict(NO_FLOPS), costs, (0,))
    return build


def _softmax(torch_fn):
    def build(spec, dims, p, dtype, device) -> Case:
        fn, dim = spec.implementation(), int(p["dim"])
        return Case("functional", lambda rg: (_rand(dims, dtype, device, rg),), lambda x: fn(x, dim=dim),
                    lambda x: torch_fn(x, dim=dim), dict(NO_FLOPS), _pointwise_costs(math.prod(dims), _size(dtype)),
                    (0,))
    return build


def _cross_entropy(spec, dims, p, dtype, device) -> Case:
    N, C = dims
    fn, kw = spec.implementation(), dict(reduction=p["reduction"], label_smoothing=float(p["label_smoothing"]))

    def make(rg):
        return _rand((N, C), dtype, device, rg), torch.randint(0, C, (N,), device=device)

    es = _size(dtype)
    fwd, bwd = N * C * es + 8 * N, 2 * N * C * es + 8 * N
    return Case("functional", make, lambda x, t: fn(x, t, **kw), lambda x, t: F.cross_entropy(x, t, **kw),
                dict(NO_FLOPS), {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}, (0,))


def _mse_loss(spec, dims, p, dtype, device) -> Case:
    fn, reduction = spec.implementation(), p["reduction"]
    return Case("functional", lambda rg: (_rand(dims, dtype, device, rg), _rand(dims, dtype, device)),
                lambda x, t: fn(x, t, reduction=reduction), lambda x, t: F.mse_loss(x, t, reduction=reduction),
                dict(NO_FLOPS), _pointwise_costs(math.prod(dims), _size(dtype), 2, 3), (0,))


def _dropout(spec, dims, p, dtype, device) -> Case:
    fn, prob = spec.implementation(), float(p["p"])
    if not 0.0 <= prob < 1.0:
        raise BenchError(f"dropout: p must be in [0, 1) for a benchmark, but got {prob}")
    return Case("functional", lambda rg: (_rand(dims, dtype, device, rg),), lambda x: fn(x, p=prob, training=True),
                lambda x: F.dropout(x, p=prob, training=True), dict(NO_FLOPS),
                _pointwise_costs(math.prod(dims), _size(dtype), 2, 2), (0,), custom_check="dropout")


def _activation(torch_fn, keyword: Optional[str] = None):
    def build(spec, dims, p, dtype, device) -> Case:
        fn = spec.implementation()
        kw = {keyword: p[keyword]} if keyword else {}
        return Case("functional", lambda rg: (_rand(dims, dtype, device, rg),), lambda x: fn(x, **kw),
                    lambda x: torch_fn(x, **kw), dict(NO_FLOPS), _pointwise_costs(math.prod(dims), _size(dtype)), (0,))
    return build


def _optimizer(state_tensors: Callable[[Dict[str, Any]], int], hyper_keys: Sequence[str]):
    """Optimizer steps: `state_tensors(params)` is how many per-parameter tensors besides the
    parameter and its gradient the step reads and writes (momentum, Adam moments)."""

    def build(spec, dims, p, dtype, device) -> Case:
        shapes = PARAMETER_LISTS[p["model"]]() if p["model"] else [(dims[0],)] * dims[1]
        hyper = {k: p[k] for k in hyper_keys}
        torch_cls = getattr(torch.optim, spec.name)

        def make(rg):
            params = []
            for s in shapes:
                t = _rand(s, dtype, device, True, 0.1)
                t.grad = _rand(s, dtype, device, scale=0.01)
                params.append(t)
            return (params,)

        n = sum(math.prod(s) for s in shapes)
        step_bytes = (2 * state_tensors(p) + 3) * n * _size(dtype)  # read p, g, state; write p, state
        return Case("optimizer", make, lambda params: spec.implementation()(params, **hyper),
                    lambda params: torch_cls(params, **hyper), dict(NO_FLOPS), {STEP: step_bytes})
    return build


_IMAGE = ("N", "C", "H", "W")
_OPT_DIMS = ("NUMEL", "COUNT")
OPS: Dict[str, OpSpec] = {s.name: s for s in [
    OpSpec("linear", "functional", ("M", "N", "K"), {"activation": "gelu", "bias": 1}, _linear,
          "act(x @ W^T + b): x (M, K), W (N, K)"),
    OpSpec("conv2d", "functional", ("N", "C", "H", "W", "K", "R"),
          {"stride": 1, "padding": "half", "groups": 1, "bias": 0}, _conv2d,
          "input (N, C, H, W) * weight (K, C/groups, R, R); padding 'half' = R // 2"),
    OpSpec("batch_norm", "functional", _IMAGE, {"training": 1, "momentum": 0.1, "eps": 1e-5, "channels_last": 0},
          _batch_norm, "batch norm over (N, H, W) with running stats, affine; channels_last=1 for that layout"),
    OpSpec("max_pool2d", "functional", _IMAGE, {"kernel_size": 3, "stride": 2, "padding": 1}, _pool(F.max_pool2d),
          "max pooling"),
    OpSpec("avg_pool2d", "functional", _IMAGE, {"kernel_size": 2, "stride": 2, "padding": 0}, _pool(F.avg_pool2d),
          "average pooling"),
    OpSpec("adaptive_avg_pool2d", "functional", _IMAGE, {"output_size": 1}, _pool(F.adaptive_avg_pool2d),
          "adaptive average pooling to output_size x output_size"),
    OpSpec("softmax", "functional", None, {"dim": -1}, _softmax(F.softmax), "softmax over dim"),
    OpSpec("log_softmax", "functional", None, {"dim": -1}, _softmax(F.log_softmax), "log-softmax over dim"),
    OpSpec("cross_entropy", "functional", ("N", "C"), {"reduction": "mean", "label_smoothing": 0.0},
          _cross_entropy, "logits (N, C), int64 targets (N,)"),
    OpSpec("mse_loss", "functional", None, {"reduction": "mean"}, _mse_loss, "mean squared error"),
    OpSpec("dropout", "functional", None, {"p": 0.5}, _dropout, "dropout in training mode"),
    OpSpec("relu", "functional", None, {}, _activation(F.relu), "relu"),
    OpSpec("leaky_relu", "functional", None, {"negative_slope": 0.01}, _activation(F.leaky_relu, "negative_slope"),
          "leaky relu"),
    OpSpec("gelu", "functional", None, {"approximate": "none"}, _activation(F.gelu, "approximate"), "gelu"),
    OpSpec("silu", "functional", None, {}, _activation(F.silu), "silu"),
    OpSpec("sigmoid", "functional", None, {}, _activation(torch.sigmoid), "sigmoid"),
    OpSpec("tanh", "functional", None, {}, _activation(torch.tanh), "tanh"),
    OpSpec("SGD", "optimizer", _OPT_DIMS, {"model": "", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
          _optimizer(lambda p: 1 if p["momentum"] else 0, ("lr", "momentum", "weight_decay")),
          "one SGD step over COUNT tensors of NUMEL values (or model=resnet50's parameters)"),
    OpSpec("AdamW", "optimizer", _OPT_DIMS, {"model": "", "lr": 1e-3, "weight_decay": 1e-2},
          _optimizer(lambda p: 2, ("lr", "weight_decay")),
          "one AdamW step over COUNT tensors of NUMEL values (or model=resnet50's parameters)"),
]}


def get_op(name: str) -> OpSpec:
    spec = OPS.get(name)
    if spec is None:
        raise BenchError(f"unknown op {name!r}; known ops: {', '.join(OPS)} (see `tkernels bench --list`)")
    return spec


def available_ops() -> List[str]:
    return [name for name, spec in OPS.items() if spec.available()]
