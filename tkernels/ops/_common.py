"""Plumbing shared by every op family: tuning configs, the inspect registry,
input checks and the bridge to the NumPy reference backend."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import triton
import triton.language as tl

from .. import _backend
from ._tuning import BucketedLauncher


# Set before any kernel compiles: triton 3.9 warns that its FMA-contraction default changes in
# 3.10, and contraction moves results, so we pin it (on: the fast path on every target).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

ARCHS = ("sm_80", "sm_90")


# ---------------------------------------------------------------------------------------------
# Configs: tuning configs are data, per architecture, and the interpreter gets exactly one
# (it ignores num_warps/num_stages and autotune with several configs needs a driver).
# ---------------------------------------------------------------------------------------------
def config(num_warps: int = 4, num_stages: int = 3, **meta) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


@functools.lru_cache(maxsize=None)
def _device_properties(index: int):
    return torch.cuda.get_device_properties(index)


def device_properties(device: torch.device):
    """torch.cuda.get_device_properties, cached per device: it costs microseconds per call, and
    launchers ask for it on every call."""
    return _device_properties(device.index if device.index is not None else torch.cuda.current_device())


def sm_count(device: torch.device) -> int:
    return device_properties(device).multi_processor_count


def current_arch(device: torch.device) -> str:
    return "sm_90" if device_properties(device).major >= 9 else "sm_80"


def gpu_name(device: torch.device) -> str:
    """The device model and capability, which is what a tuned config depends on."""
    props = device_properties(device)
    return f"{props.name} sm_{props.major}{props.minor}"


_NO_META: Dict[str, Any] = {}  # (one shared object: callers may key caches on the meta's identity)


class Tuned:
    """A kernel with per-architecture autotune configs and one interpreter config.

    ``tuned[device]`` gives the launchable kernel: an ``@triton.autotune`` wrapper built
    lazily per architecture on CUDA, or the bare kernel under the interpreter (where the
    caller passes ``tuned.interpreter_meta`` itself).
    """

    def __init__(self, kernel, configs_by_arch: Dict[str, List[triton.Config]], interpreter: triton.Config,
                 key: Sequence[str], restore_value: Sequence[str] = (), reset_to_zero: Sequence[str] = ()):
        self.kernel = kernel
        self.configs_by_arch = configs_by_arch
        self.interpreter = interpreter
        self.key = list(key)
        self.restore_value = list(restore_value)
        self.reset_to_zero = list(reset_to_zero)
        self._by_device: Dict[int, BucketedLauncher] = {}
        self._interpreter_meta = self.interpreter_meta

    @property
    def interpreter_meta(self) -> dict:
        return dict(self.interpreter.kwargs)

    def launcher(self, where: Union[torch.Tensor, torch.device]):
        """(kernel, meta) for a launch on ``where`` (a tensor of the launch, or its device): launch as
        ``kernel[grid](*args, **meta)``; grid may read the chosen meta. Callers unpack ``meta`` and
        never change it. (A tensor is cheaper on hot paths: ``is_cuda`` rather than the device's type string.)

        On CUDA the kernel is tuned once per bucketed key (see ops/_tuning.py)."""
        if isinstance(where, torch.Tensor):
            if not where.is_cuda:
                return self.kernel, self._interpreter_meta
            index = where.get_device()
        elif where.type != "cuda":
            return self.kernel, self._interpreter_meta
        else:
            index = where.index if where.index is not None else torch.cuda.current_device()
        fn = self._by_device.get(index)
        if fn is None:
            device = torch.device("cuda", index)
            kwargs = {}
            if self.restore_value:
                kwargs["restore_value"] = self.restore_value
            if self.reset_to_zero:
                kwargs["reset_to_zero"] = self.reset_to_zero
            configs = self.configs_by_arch[current_arch(device)]
            autotuner = triton.autotune(configs=configs, key=self.key, **kwargs)(self.kernel)
            fn = BucketedLauncher(self.kernel.__name__, self.kernel, autotuner, self.key, gpu_name(device),
                                  configs=configs)
            self._by_device[index] = fn
        return fn, _NO_META


# ---------------------------------------------------------------------------------------------
# The inspect registry: each op family declares how to compile its kernels ahead of time.
# ---------------------------------------------------------------------------------------------
@dataclass
class KernelSpec:
    """How `tkernels inspect` compiles one kernel for a GPU target without a GPU.

    ``signature`` maps each runtime argument to a Triton type; "{dtype}" is replaced by
    each entry of ``dtypes`` ("fp16", "bf16", "fp32"). ``variants`` are dicts of the
    kernel's non-tuning constexprs (activation, flags); each config is compiled with each
    variant. ``tensor_cores`` says whether fp16/bf16 builds must use HMMA/HGMMA.

    ``example_args`` gives runtime integer arguments the values a typical launch passes
    (e.g. {"K": 4096, "stride_ak": 1}); inspect specialises them as the JIT would: 1 becomes
    a constant and multiples of 16 get 16-divisibility (unit strides and aligned sizes are
    what make loads vectorise, so without them registers and spills are those of arbitrary
    strides). A variant may hold such values too, overriding these (e.g. per call site).
    Pointer arguments are always taken as 16-byte aligned. A kernel built for some targets only
    (the TMA matmul: sm_90) leaves the others out of ``configs_by_arch``.
    """

    name: str
    kernel: object
    signature: Dict[str, str]
    configs_by_arch: Dict[str, List[triton.Config]]
    variants: List[dict] = field(default_factory=lambda: [{}])
    dtypes: Sequence[str] = ("fp16", "bf16", "fp32")
    tensor_cores: bool = False
    # Constexprs that depend on the dtype, e.g. {"fp32": {"ACC_FP32": True}}
    per_dtype: Dict[str, dict] = field(default_factory=dict)
    example_args: Dict[str, int] = field(default_factory=dict)
    # The kernel takes an INPUT_PRECISION constexpr for tl.dot: fp16/bf16 build with "ieee", fp32
    # with "ieee" and "tf32" (torch's allow_tf32 flags pick one at run time, so both are reachable).
    input_precision: bool = False
    # fp32 configs per input precision, then per arch, where they differ from configs_by_arch
    # (fp32 operands take twice the registers and shared memory; exact fp32 runs on the FMA units).
    fp32_configs: Dict[str, Dict[str, List[triton.Config]]] = field(default_factory=dict)

    def configs(self, arch: str, dtype: str, precision: str = "") -> List[triton.Config]:
        """The configs a launch of this dtype and input precision autotunes over on ``arch``."""
        if dtype == "fp32" and precision in self.fp32_configs:
            return self.fp32_configs[precision][arch]
        return self.configs_by_arch[arch]


KERNEL_SPECS: Dict[str, KernelSpec] = {}


def register_kernel(spec: KernelSpec) -> KernelSpec:
    KERNEL_SPECS[spec.name] = spec
    return spec


# ---------------------------------------------------------------------------------------------
# Input checks: errors that say what was given and what was expected.
# ---------------------------------------------------------------------------------------------
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_floating(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, not {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise RuntimeError(f"{op}: {name} must be a floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), but got {t.dtype}")


def check_same(op: str, ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise RuntimeError(f"{op}: expected {name} on the same device as {ref_name} ({ref.device}), "
                               f"but it is on {t.device}")
        if t.dtype != ref.dtype:
            raise RuntimeError(f"{op}: expected {name} to have the dtype of {ref_name} ({ref.dtype}), "
                               f"but it is {t.dtype}")


def check_triton_dtype(op: str, t: torch.Tensor) -> None:
    if t.dtype not in TRITON_DTYPES:
        raise RuntimeError(f"{op}: the triton backend supports float16, bfloat16 and float32, not {t.dtype}; "
                        "float64 runs on the numpy backend")


# ---------------------------------------------------------------------------------------------
# The backend of a backward op: the one its forward ran on
# ---------------------------------------------------------------------------------------------
_is_compiling = torch.compiler.is_compiling
_dispatch_stack_depth = torch._C._len_torch_dispatch_stack
CONCRETE_BACKENDS = ("triton", "numpy")


def forward_backend(op: str, ctx, *tensors: Optional[torch.Tensor]) -> str:
    """What a Function's forward records for its backward op: the backend that runs ``op`` now.
    The two backends' forwards may keep different state (cross-entropy's NumPy forward keeps no
    statistics, dropout's masks come from different generators), so a backward must run on its
    forward's backend even if the backend was switched in between (``tkernels.use_backend``).
    '' while torch.compile or make_fx traces the call (the traced graph's ops each choose when
    they run, forward op included, so the backward op does too: a switch between a compiled forward
    and its backward is not covered) and when no gradient is needed."""
    if not any(ctx.needs_input_grad) or _is_compiling() or _dispatch_stack_depth():
        return ""
    if tensors[0].is_cuda:  # (the NumPy backend refuses CUDA tensors: no call to resolve, ~0.4 us)
        return "triton"
    return _backend.resolve(op, *tensors)


def backward_backend(op: str, recorded: str, *tensors: Optional[torch.Tensor]) -> str:
    """The backend a backward op runs on: ``recorded`` by its forward (:func:`forward_backend`),
    or, if that is '', the one in force now."""
    if not recorded:
        return _backend.resolve(op, *tensors)
    if recorded not in CONCRETE_BACKENDS:
        raise ValueError(f"{op}: the backend recorded by the forward must be '', 'triton' or 'numpy', "
                         f"but got {recorded!r}")
    return recorded


def suggests_channels_last(t: torch.Tensor) -> bool:
    """torch's suggest_memory_format for a 4-D tensor: channels_last when its strides are ordered
    C < W < H < N (dense or not) and it is not plain contiguous; never for other ranks."""
    if t.dim() != 4 or t.is_contiguous():
        return False
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return False
    smallest = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < smallest:
            return False
        if d == 0 and smallest == strides[1]:
            return False
        smallest = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` when output tiles are visited in bands of GROUP_M tile-rows:
    neighbouring programs then share the same B columns (and A rows) while they are hot in L2."""
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + ((pid % width) % group_rows), (pid % width) // group_rows


def _tf32_allowed(holders, legacy_flag: Callable[[], bool]) -> bool:
    """Whether torch allows TF32 for an op family. torch >= 2.9 has ``fp32_precision`` at each level
    (op, backend, generic): the first that is not "none" decides; reading the legacy ``allow_tf32``
    there raises once a program mixed the two APIs. Older torch has only the legacy flag."""
    for holder in holders:
        precision = getattr(holder, "fp32_precision", None)
        if precision is None:
            return legacy_flag()
        if precision != "none":
            return precision == "tf32"
    return False


# torch >= 2.9 reads each level's fp32_precision through this C getter; going through the Python
# holders (torch.backends.cuda.matmul and friends, each a __getattr__ chain) costs ~2 us per launch.
_FP32_PRECISION_GETTER = getattr(torch._C, "_get_fp32_precision_getter", None)
# (backend, op) of each holder, op level first, as _tf32_allowed walks them
_PRECISION_LEVELS = {"matmul": (("cuda", "matmul"), ("generic", "all")),
                     "conv": (("cuda", "conv"), ("cuda", "all"), ("generic", "all"))}


def _tf32_allowed_fast(op: str) -> bool:
    """_tf32_allowed through the C getter: the same holders, in the same order."""
    for backend, level in _PRECISION_LEVELS[op]:
        precision = _FP32_PRECISION_GETTER(backend, level)
        if precision != "none":
            return precision == "tf32"
    return False


def tl_input_precision(dtype: torch.dtype, op: str = "matmul") -> str:
    """``tl.dot``'s input_precision for an fp32 op, the one torch would use: matmuls (linear) follow
    ``torch.backends.cuda.matmul`` / ``torch.set_float32_matmul_precision`` (default: exact, 'ieee');
    convolutions follow cuDNN's flag ``torch.backends.cudnn.allow_tf32`` (default: 'tf32'). Half
    precisions always take 'ieee' (their products are exact in the fp32 accumulator)."""
    if dtype != torch.float32:
        return "ieee"
    if _FP32_PRECISION_GETTER is not None:
        return "tf32" if _tf32_allowed_fast("conv" if op == "conv" else "matmul") else "ieee"
    backends = torch.backends
    if op == "conv":
        allowed = _tf32_allowed((getattr(backends.cudnn, "conv", None), backends.cudnn, backends),
                                lambda: backends.cudnn.allow_tf32)
    else:
        allowed = _tf32_allowed((backends.cuda.matmul, backends), lambda: backends.cuda.matmul.allow_tf32)
    return "tf32" if allowed else "ieee"


# ---------------------------------------------------------------------------------------------
# Device guard: a Triton launch runs on the *current* CUDA device, so every op's CUDA kernel runs
# under a guard for its tensors' device (a tensor on cuda:1 while cuda:0 is current would otherwise
# be read through the wrong context: wrong results or an illegal address). The guard is entered
# only when the device differs from the current one, so the common case costs one comparison.
# ---------------------------------------------------------------------------------------------
def _first_tensor_device(args) -> Optional[torch.device]:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device
        if isinstance(arg, (list, tuple)) and arg and isinstance(arg[0], torch.Tensor):
            return arg[0].device
    return None


def on_tensor_device(fn: Callable) -> Callable:
    """``fn`` run with the device of its first tensor argument current, when that is a CUDA device
    other than the current one. (Tensors on different devices are refused before this, with the
    argument names, by each op's checks; see :func:`check_same`.)"""

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        device = _first_tensor_device(args)
        if device is not None and device.type == "cuda" and device.index is not None \
                and device.index != torch.cuda.current_device():
            with torch.cuda.device(device.index):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    guarded.device_guarded = True
    return guarded


# op name -> the guarded implementation registered for CUDA
GUARDED_OPS: Dict[str, Callable] = {}


def guard_custom_ops(module: ModuleType) -> None:
    """Register, for CUDA, each ``tkernels::`` custom op of ``module`` as its own implementation run
    under :func:`on_tensor_device`; CPU calls (NumPy reference, interpreter) do not pass through it.
    The eager fast path of the op (ops/_dispatch.py) runs CUDA calls through the same guard."""
    from torch._library.custom_ops import CustomOpDef

    from ._dispatch import EagerCustomOp

    for value in vars(module).values():
        op = value.op if isinstance(value, EagerCustomOp) else value
        if not isinstance(op, CustomOpDef) or op._namespace != "tkernels":
            continue
        name = f"tkernels::{op._name}"
        if name not in GUARDED_OPS:
            GUARDED_OPS[name] = on_tensor_device(op._init_fn)
            op.register_kernel("cuda")(GUARDED_OPS[name])
        if isinstance(value, EagerCustomOp):
            value.cuda_impl = GUARDED_OPS[name]


def operand_class(dtype: torch.dtype, precision: str) -> str:
    """The config family of a tl.dot launch: "half" for fp16/bf16 operands, else the fp32 input
    precision ("tf32" runs on tensor cores, "ieee" on the FMA units; each has its own tiles)."""
    return precision if dtype == torch.float32 else "half"


# ---------------------------------------------------------------------------------------------
# NumPy bridge: the reference computes in float64 and results are cast back to the input dtype.
# ---------------------------------------------------------------------------------------------
# dtypes NumPy can view directly: a CPU tensor of one of these converts in one NumPy cast
_NUMPY_VIEWABLE = (torch.float32, torch.float64, torch.float16)


def numpy_view(t: torch.Tensor) -> Optional[np.ndarray]:
    """A NumPy view of a CPU tensor's memory (written through by callers that mean to), or None for
    one NumPy cannot view (bfloat16, CUDA)."""
    return t.detach().numpy() if t.is_cpu and t.dtype in _NUMPY_VIEWABLE else None
_TORCH_DTYPES = {np.float64: torch.float64, np.float32: torch.float32}


def to_numpy(t: Optional[torch.Tensor], dtype=np.float64) -> Optional[np.ndarray]:
    """t's values as an array of `dtype` (float64 or float32); a CPU tensor of that dtype is viewed,
    not copied (callers do not write into it)."""
    if t is None:
        return None
    if t.is_cpu and t.dtype in _NUMPY_VIEWABLE:  # (half the cost of torch's .to())
        return (t.detach() if t.requires_grad else t).numpy().astype(dtype, copy=False)
    return t.detach().to(device="cpu", dtype=_TORCH_DTYPES[dtype]).numpy()


def product_dtype(t: torch.Tensor):
    """The precision the NumPy backend computes matrix products (linear, conv) of `t` in: float32 for
    float32 tensors, as torch's CPU kernels do (single-precision BLAS runs twice as fast as double
    here), float64 for the others. Reductions stay float64."""
    return np.float32 if t.dtype == torch.float32 else np.float64


def _wrappable(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if not a.flags.c_contiguous or not a.flags.writeable:  # (np.ascontiguousarray would turn 0-d into 1-d)
        a = a.copy()
    return a


def from_numpy(a: np.ndarray, like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return torch.from_numpy(_wrappable(a)).to(device=like.device, dtype=dtype or like.dtype)


def numpy_into(out: torch.Tensor, a: np.ndarray) -> torch.Tensor:
    """out with a's values copied in (cast to out's dtype, in out's layout): one pass, no temporary."""
    return out.copy_(torch.from_numpy(_wrappable(a)))


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


