"""Conv2d: forward, input/weight/bias gradients, module, errors, custom-op and compile checks.

Every case runs on both backends and is compared with the float64 NumPy reference
(tkernels/reference/conv.py) and with torch itself. Inputs and grad_out are canaries (views into
NaN-padded buffers), so an out-of-bounds read shows as NaN and a stray write is caught.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import pytest
import torch
import torch.nn.functional as TF

import tkernels
from tkernels.functional import conv2d
from tkernels.ops import conv as conv_ops
from tkernels.ops import conv_backward, matmul_tma
from tkernels.ops._tuning import BucketedLauncher
from tkernels.ops.matmul_tma import HAS_TENSOR_DESCRIPTORS
from tkernels.reference import conv as ref

from helpers import (Canary, DEVICE, assert_close, assert_not_mutated, canary, device_for, expect_kernels,
                     log_tuned_launches, randn, skip_unsupported, to_numpy64)

CL = torch.channels_last


@dataclass(frozen=True)
class Case:
    n: int
    c_in: int
    hw: Tuple[int, int]
    c_out: int
    kernel: Union[int, Tuple[int, int]]
    stride: Union[int, Tuple[int, int]] = 1
    padding: Union[int, str, Tuple[int, int]] = 0
    dilation: Union[int, Tuple[int, int]] = 1
    groups: int = 1
    activation: Optional[object] = None
    channels_last: bool = False
    bias: bool = True
    pad: int = Canary.PAD  # canary row padding; 8 keeps channels_last strides 8-aligned (the FAST kernels)

    @property
    def kernel_hw(self):
        return (self.kernel, self.kernel) if isinstance(self.kernel, int) else self.kernel


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _pads(case: Case):
    """(top, bottom, left, right), written out from torch's documented rule for the reference."""
    if case.padding == "valid":
        return (0, 0, 0, 0)
    if case.padding == "same":
        (kh, kw), (dh, dw) = case.kernel_hw, _pair(case.dilation)
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    ph, pw = _pair(case.padding)
    return (ph, ph, pw, pw)


TORCH_ACT = {  # (z, param) -> act(z)
    "identity": lambda z, p: z, "relu": lambda z, p: torch.relu(z), "leaky_relu": TF.leaky_relu,
    "gelu": lambda z, p: TF.gelu(z), "gelu_tanh": lambda z, p: TF.gelu(z, approximate="tanh"),
    "silu": lambda z, p: TF.silu(z), "sigmoid": lambda z, p: torch.sigmoid(z), "tanh": lambda z, p: torch.tanh(z),
}


def _act_name(spec) -> str:
    return tkernels.activations.resolve_activation(spec).name


CASES = {
    "3x3": Case(2, 5, (9, 7), 6, 3, padding=1),
    "3x3_cl_relu": Case(2, 5, (9, 7), 6, 3, padding=1, activation="relu", channels_last=True),
    "stride2": Case(2, 4, (9, 8), 6, 3, stride=2, activation="leaky_relu"),
    "stride_2x3_cl": Case(2, 4, (9, 10), 5, 3, stride=(2, 3), padding=1, channels_last=True),
    "padding_2x0": Case(1, 3, (7, 9), 4, 3, padding=(2, 0), activation="sigmoid"),
    "dilation2": Case(2, 3, (11, 10), 5, 3, dilation=2, padding=1),
    "dilation_1x3_cl": Case(2, 4, (9, 11), 5, (3, 2), dilation=(1, 3), channels_last=True, activation="tanh"),
    "groups3": Case(2, 6, (7, 7), 9, 3, groups=3, padding=1, activation="gelu"),
    "depthwise_cl": Case(2, 6, (7, 7), 6, 3, groups=6, padding=1, channels_last=True, activation="silu"),
    "depthwise_mult2_strided": Case(2, 4, (9, 6), 8, (3, 2), stride=2, padding=(1, 0), groups=4),
    # 8-aligned channels_last, one channel per group: x/dz tiles too move by cp.async (FAST)
    "depthwise_fast_cl": Case(2, 16, (7, 9), 16, 3, padding=1, groups=16, activation="gelu_tanh",
                              channels_last=True, pad=8),
    "depthwise_fast_cl_strided_dilated": Case(1, 24, (9, 10), 24, (3, 2), stride=(2, 1), padding=(1, 2),
                                              dilation=(1, 2), groups=24, activation="relu", channels_last=True,
                                              pad=8),
    # 17 channels: the weight rows are zero-filled up to 24; NCHW with 16 channels: not FAST
    "depthwise_c17_cl": Case(1, 17, (6, 5), 17, 3, padding=1, groups=17, channels_last=True, pad=8),
    "depthwise_nchw16_dilated": Case(2, 16, (8, 7), 16, 3, padding=2, dilation=2, groups=16, activation="sigmoid"),
    "combined_cl": Case(2, 8, (11, 9), 12, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2,
                        activation="gelu_tanh", channels_last=True),
    "combined_grouped_strided": Case(1, 34, (9, 9), 6, 3, stride=2, padding=2, dilation=2, groups=2,
                                     activation="silu"),
    "same_even": Case(2, 3, (6, 7), 4, (2, 4), padding="same", activation="relu"),
    "same_dilated_cl": Case(1, 4, (7, 6), 4, (4, 3), padding="same", dilation=(1, 2), channels_last=True),
    "valid": Case(2, 3, (6, 6), 5, 3, padding="valid", bias=False),
    "1x1": Case(2, 17, (5, 3), 7, 1, activation="relu"),
    "1x1_cl_gelu": Case(2, 17, (5, 3), 7, 1, activation="gelu", channels_last=True),
    "1x1_cl_nobias": Case(1, 20, (3, 5), 9, 1, channels_last=True, bias=False),
    "1x1_stride2_cl": Case(2, 16, (5, 5), 8, 1, stride=2, channels_last=True),
    "5x5": Case(1, 3, (9, 8), 4, 5, padding=2, activation="tanh"),
    "7x7_stem_cl": Case(2, 3, (13, 11), 8, 7, stride=2, padding=3, activation="relu", channels_last=True),
    "nonsquare_1x3": Case(2, 5, (5, 7), 3, (1, 3), padding=(0, 1)),
    "cin17": Case(1, 17, (5, 5), 18, 3, padding=1, activation=torch.nn.LeakyReLU(0.2)),
    "cin33_cl": Case(1, 33, (5, 4), 5, (2, 3), channels_last=True, activation="sigmoid"),
    # 8-aligned channels_last: the FAST (vectorised) forward, input- and weight-gradient kernels
    "fast_cl": Case(2, 16, (7, 6), 16, 3, padding=1, activation="gelu", channels_last=True, pad=8),
    "fast_cl_strided_grouped": Case(2, 32, (9, 8), 16, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2), groups=2,
                                    activation="relu", channels_last=True, pad=8),
    # NCHW (torch's default) with FAST-able channels: run on channels_last copies, output stays NCHW
    "fast_nchw": Case(2, 16, (7, 6), 16, 3, padding=1, activation="gelu"),
    "fast_nchw_strided_identity": Case(1, 24, (8, 9), 16, 3, stride=2, padding=1, bias=False),
}


def _make_inputs(case: Case, dtype, device):
    """x, weight, bias as canary views (NaN-padded buffers), and their Canary objects."""
    kh, kw = case.kernel_hw
    x = randn(case.n, case.c_in, *case.hw, dtype=dtype, device=device)
    w = randn(case.c_out, case.c_in // case.groups, kh, kw, dtype=dtype, device=device, scale=0.5)
    b = randn(case.c_out, dtype=dtype, device=device) if case.bias else None
    canaries = [Canary(x, pad=case.pad, memory_format=CL if case.channels_last else None), Canary(w)]
    canaries.append(Canary(b) if b is not None else None)
    return [c.view.requires_grad_() if c is not None else None for c in canaries], canaries


def _expected(case: Case, x, w, b, gy):
    """(y, dx, dw, db) from the NumPy reference and from torch, both in float64."""
    act = tkernels.activations.resolve_activation(case.activation)
    geometry = (_pair(case.stride), _pads(case), _pair(case.dilation), case.groups)
    args = (to_numpy64(x), to_numpy64(w), to_numpy64(b), *geometry, act.name, act.param)
    y_ref, _ = ref.conv2d_forward(*args)
    grads_ref = ref.conv2d_backward(to_numpy64(gy), *args)
    xt, wt = (t.detach().cpu().double().requires_grad_() for t in (x, w))
    bt = b.detach().cpu().double().requires_grad_() if b is not None else None
    yt = TORCH_ACT[act.name](TF.conv2d(xt, wt, bt, case.stride, case.padding, case.dilation, case.groups), act.param)
    yt.backward(gy.detach().cpu().double())
    return (y_ref, *grads_ref), (yt, xt.grad, wt.grad, bt.grad if bt is not None else None)


def _reductions(case: Case, y):
    kh, kw = case.kernel_hw
    p = y.shape[0] * y.shape[2] * y.shape[3]
    return (case.c_in // case.groups * kh * kw, case.c_out // case.groups * kh * kw, p, p)


def _run_case(case: Case, backend: str, dtype=torch.float32):
    skip_unsupported(backend, dtype, uses_dot=True)
    device = device_for(backend)
    (x, w, b), canaries = _make_inputs(case, dtype, device)
    before = [t.detach().clone() for t in (x, w, b) if t is not None]
    y = conv2d(x, w, b, case.stride, case.padding, case.dilation, case.groups, activation=case.activation)
    gy_canary = Canary(randn(*y.shape, dtype=dtype, device=device), pad=case.pad,
                       memory_format=CL if case.channels_last else None)
    gy = gy_canary.view
    before.append(gy.clone())
    y.backward(gy)
    ref_vals, torch_vals = _expected(case, x, w, b, gy)
    names = ("y", "grad_input", "grad_weight", "grad_bias")
    ours = (y, x.grad, w.grad, b.grad if b is not None else None)
    for name, got, exp_ref, exp_torch, red in zip(names, ours, ref_vals, torch_vals, _reductions(case, y)):
        if got is None:
            assert name == "grad_bias" and exp_torch is None
            continue
        assert got.dtype == dtype, f"{name} has dtype {got.dtype}"
        assert_close(got, exp_ref, dtype=dtype, reduction=red, msg=f"{name} vs reference ({backend})")
        assert_close(got, exp_torch, dtype=dtype, reduction=red, msg=f"{name} vs torch ({backend})")
    # torch puts the output in the input's memory format; so do we
    with torch.no_grad():
        torch_layout = TF.conv2d(x.detach().cpu().double(), w.detach().cpu().double(), None, case.stride,
                                 case.padding, case.dilation, case.groups)
    assert (y.is_contiguous(memory_format=CL) == torch_layout.is_contiguous(memory_format=CL)
            and y.is_contiguous() == torch_layout.is_contiguous()), "output memory format differs from torch's"
    assert_not_mutated(before, [t.detach() for t in (x, w, b) if t is not None] + [gy])
    for c in canaries + [gy_canary]:
        if c is not None:
            c.assert_untouched_outside()


@pytest.fixture
def launched(monkeypatch):
    """Names of the tuned conv kernels launched during the test (to check the path dispatch)."""
    labels = {}
    for module in (conv_ops, conv_backward):
        for name in [n for n in vars(module) if n.startswith("TUNED_")]:
            value = getattr(module, name)
            # implicit-GEMM kernels have one Tuned per (FAST, operand class) family
            # (depthwise kernels: one per FAST flag)
            family = value.items() if isinstance(value, dict) else [((False, None), value)]
            for key, tuned in family:
                fast = key[0] if isinstance(key, tuple) else key
                labels[id(tuned)] = name + ("_FAST" if fast else "")
    return log_tuned_launches(monkeypatch, labels)


class _RecordingKernel:
    """Launches `kernel` and logs (kernel name, {flag: value}) for the named constexpr flags."""

    def __init__(self, kernel, log, flags):
        self.kernel, self.log, self.flags = kernel, log, flags

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            # (a bare JIT kernel under the interpreter, a BucketedLauncher, whose .name it is, on CUDA)
            kernel = self.kernel
            name = getattr(kernel, "__name__", None) or getattr(kernel, "name", None) or kernel.fn.__name__
            self.log.append((name, {f: kwargs[f] for f in self.flags}))
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_recording_kernel_names_a_bucketed_launcher():
    """On CUDA, Tuned.launcher hands back a BucketedLauncher, not a JIT kernel: the launch log must
    still name the kernel (the TMA tests below assert on it)."""
    launches = []

    class Bare:
        arg_names = ["n", "FLAG"]

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)

    launcher = BucketedLauncher("conv2d_fwd_kernel", Bare(), None, [], "FakeGPU sm_90", is_capturing=lambda: False)
    launcher.chosen[()] = {"BLOCK": 16}  # a bucket tuned before: launches the bare kernel with its meta
    log = []
    _RecordingKernel(launcher, log, ("FLAG",))[(1,)](3, FLAG=True)
    assert log == [("conv2d_fwd_kernel", {"FLAG": True})] and launches == [{"FLAG": True, "BLOCK": 16}]


FAST_KERNELS = {"TUNED_FWD_FAST", "TUNED_DGRAD_FAST", "TUNED_WGRAD_FAST"}
# FAST-able channel counts (C_in/groups >= 16, 8-aligned) in a layout the FAST kernels cannot take
# (canary-padded strides): they run on aligned channels_last copies
COPIED_TO_CHANNELS_LAST = {"1x1_stride2_cl"}


@pytest.mark.parametrize("name", list(CASES))
def test_conv2d_cases(backend, name, launched):
    _run_case(CASES[name], backend)
    if backend == "triton":
        if name.startswith("fast") or name in COPIED_TO_CHANNELS_LAST:
            assert FAST_KERNELS <= set(launched), f"FAST kernels not all used: {launched}"
        elif name.startswith("depthwise"):
            # 8-aligned channels_last: the FAST variants, whose input tiles move by cp.async
            suffix = "_FAST" if name.startswith("depthwise_fast") else ""
            assert launched == ["TUNED_DW_FWD" + suffix, "TUNED_DW_DGRAD" + suffix, "TUNED_WGRAD"], launched
            expect_kernels("conv2d_depthwise_fwd_kernel", "conv2d_depthwise_dgrad_kernel", "conv2d_wgrad_kernel")
        elif name == "1x1_cl_gelu":  # the GEMM fast path: no conv kernel at all
            assert launched == [], launched
        else:
            assert not FAST_KERNELS & set(launched), launched
        if name.startswith("1x1_cl"):  # channels_last 1x1 convs are one GEMM
            expect_kernels("matmul_kernel")
        elif not name.startswith("depthwise"):
            expect_kernels("conv2d_fwd_kernel", "conv2d_dgrad_kernel", "conv2d_wgrad_kernel")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["3x3_cl_relu", "combined_grouped_strided", "depthwise_cl", "depthwise_fast_cl",
                                  "1x1_cl_gelu", "fast_cl", "fast_nchw"])
def test_conv2d_half_precision(backend, name, dtype):
    _run_case(CASES[name], backend, dtype)


def test_conv2d_float64_numpy():
    with tkernels.use_backend("numpy"):
        _run_case(CASES["combined_cl"], "numpy", torch.float64)


def test_every_activation_covered():
    """The case table exercises every registered activation (forward and the fused derivative)."""
    used = {_act_name(c.activation) for c in CASES.values()}
    assert used == set(tkernels.activations.REGISTRY), f"missing: {set(tkernels.activations.REGISTRY) - used}"


@pytest.mark.parametrize("n", [1, 0])
def test_batch_sizes(backend, n):
    device = device_for(backend)
    x = randn(n, 5, 7, 6, device=device).requires_grad_()
    w = randn(4, 5, 3, 3, device=device).requires_grad_()
    b = randn(4, device=device).requires_grad_()
    y = conv2d(x, w, b, stride=2, padding=1, activation="silu")
    assert y.shape == (n, 4, 4, 3)
    gy = randn(*y.shape, device=device)
    y.backward(gy)
    xt, wt, bt = (t.detach().double().cpu().requires_grad_() for t in (x, w, b))
    yt = TF.silu(TF.conv2d(xt, wt, bt, stride=2, padding=1))
    yt.backward(gy.double().cpu())
    assert_close(y, yt, reduction=45)
    assert_close(x.grad, xt.grad, reduction=36)
    assert_close(w.grad, wt.grad, reduction=max(1, n * 12))
    assert_close(b.grad, bt.grad, reduction=max(1, n * 12))
    if n == 0:
        assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_unbatched_input(backend):
    device = device_for(backend)
    x = randn(3, 8, 7, device=device).requires_grad_()
    w = randn(5, 3, 3, 3, device=device).requires_grad_()
    y = conv2d(x, w, None, padding="same", activation="relu")
    assert y.shape == (5, 8, 7)
    y.backward(torch.ones_like(y))
    xt, wt = (t.detach().double().cpu().requires_grad_() for t in (x, w))
    yt = torch.relu(TF.conv2d(xt, wt, None, padding="same"))
    yt.backward(torch.ones_like(yt))
    assert_close(y, yt, reduction=27)
    assert_close(x.grad, xt.grad, reduction=45)
    assert_close(w.grad, wt.grad, reduction=56)


def test_dense_layouts(backend):
    """Dense (non-canary) NCHW and channels_last inputs keep their format through forward and backward."""
    device = device_for(backend)
    for fmt in (torch.contiguous_format, CL):
        x = randn(2, 6, 5, 7, device=device).contiguous(memory_format=fmt).requires_grad_()
        w = randn(8, 6, 3, 3, device=device).requires_grad_()
        y = conv2d(x, w, padding=1)
        assert y.is_contiguous(memory_format=fmt)
        y.sum().backward()
        assert x.grad.is_contiguous(memory_format=fmt)
        xt, wt = (t.detach().double().cpu().requires_grad_() for t in (x, w))
        TF.conv2d(xt, wt, padding=1).sum().backward()
        assert_close(x.grad, xt.grad, reduction=72)
        assert_close(w.grad, wt.grad, reduction=70)


def test_split_weight_and_bias_reduction(monkeypatch):
    """The weight/bias gradients split over programs write partials and reduce them deterministically."""
    monkeypatch.setattr(conv_backward, "FORCE_SPLIT", 3)
    with tkernels.use_backend("triton"):
        _run_case(Case(2, 6, (9, 8), 10, 3, padding=1, activation="gelu", channels_last=True), "triton")
        _run_case(CASES["fast_cl"], "triton")
        x = randn(2, 6, 9, 8).requires_grad_()
        w = randn(10, 6, 3, 3).requires_grad_()
        b = randn(10).requires_grad_()
        grads = []
        for _ in range(2):
            y = conv2d(x, w, b, padding=1, activation="gelu")
            grads.append(torch.autograd.grad(y, (w, b), torch.ones_like(y)))
        assert all(torch.equal(a, c) for a, c in zip(*grads)), "split reduction is not deterministic"
        expect_kernels("sum_partials_kernel", "conv2d_grad_z_kernel")


# sm_90's TMA operand tiles (forced here): the FAST forward's and input gradient's weight tiles and
# the weight gradient's dz tiles. Odd shapes: C_out/groups of 8, 24 and 40 (not multiples of the
# reduction block, so weight boxes reach past a group), groups > 1, stride, dilation and pixel
# counts that no block divides.
TMA_CASES = {
    "fast_cl": CASES["fast_cl"],
    "fast_cl_strided_grouped": CASES["fast_cl_strided_grouped"],
    "fast_nchw": CASES["fast_nchw"],
    "1x1_stride2_cl": CASES["1x1_stride2_cl"],
    "cout24_grouped_strided_dilated": Case(2, 32, (9, 8), 48, 3, stride=2, padding=2, dilation=(2, 1), groups=2,
                                           activation="silu", channels_last=True, pad=8),
    "cout40_dilated": Case(1, 16, (10, 11), 40, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 3),
                           activation="relu", channels_last=True, pad=8),
    # no activation: dz is grad_out itself, a canary view whose base (67 elements into its NaN
    # buffer) is not 16-byte aligned, so the weight gradient keeps dz on cp.async
    "identity_canary_dz": Case(1, 16, (6, 7), 24, 3, padding=1, channels_last=True, pad=8),
}


needs_descriptors = pytest.mark.skipif(not HAS_TENSOR_DESCRIPTORS, reason="this triton has no device-side tensor "
                                       "descriptors (triton < 3.4): the TMA variants never launch")


def _record_gemm_launches(monkeypatch):
    """A list that gets (kernel, {"FAST": .., its TMA flag: ..}) per launch of the implicit-GEMM
    conv kernels."""
    families = ((conv_ops.TUNED_FWD, "W_TMA"), (conv_backward.TUNED_DGRAD, "W_TMA"),
                (conv_backward.TUNED_WGRAD, "DZ_TMA"))
    flags = {id(tuned): ("FAST", flag) for family, flag in families for tuned in family.values()}
    return log_tuned_launches(monkeypatch, flags, wrap=lambda kernel, names, log: _RecordingKernel(kernel, log, names))


def _tma_expected(dtype) -> bool:
    """Whether the FAST kernels take their TMA operands on the test device: always with FORCE_TMA on
    CPU tensors (the interpreter); on a GPU what a user's call gets, fp16/bf16 on sm_90 only."""
    if DEVICE.type != "cuda":
        return True
    return dtype in (torch.float16, torch.bfloat16) and torch.cuda.get_device_capability(DEVICE)[0] == 9


def _tma_log(dtype=torch.float32, dz_tma: bool = True):
    on = _tma_expected(dtype)
    return [("conv2d_fwd_kernel", {"FAST": True, "W_TMA": on}),
            ("conv2d_dgrad_kernel", {"FAST": True, "W_TMA": on}),
            ("conv2d_wgrad_kernel", {"FAST": True, "DZ_TMA": on and dz_tma})]


@needs_descriptors
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", list(TMA_CASES))
def test_tma_operand_tiles(monkeypatch, name, dtype):
    """The FAST kernels with their TMA operand tiles: forward and input-gradient weight boxes
    zero-fill past C_in/groups (resp. C_out/groups) inside a group; weight-gradient dz boxes
    zero-fill past the last pixel, and their columns of the next group are never stored."""
    monkeypatch.setattr(conv_backward, "FORCE_TMA", True)
    log = _record_gemm_launches(monkeypatch)
    with tkernels.use_backend("triton"):
        _run_case(TMA_CASES[name], "triton", dtype)
    assert log == _tma_log(dtype, dz_tma=name != "identity_canary_dz"), log


@needs_descriptors
def test_tma_switched_off_takes_the_cp_async_builds(monkeypatch):
    """TKERNELS_TMA=0 (TMA_ENABLED false) wins over FORCE_TMA: all three kernels launch without
    their TMA operand and still compute the same convolution."""
    monkeypatch.setattr(conv_backward, "FORCE_TMA", True)
    monkeypatch.setattr(matmul_tma, "TMA_ENABLED", False)
    log = _record_gemm_launches(monkeypatch)
    with tkernels.use_backend("triton"):
        _run_case(TMA_CASES["cout24_grouped_strided_dilated"], "triton")
    assert log == [("conv2d_fwd_kernel", {"FAST": True, "W_TMA": False}),
                   ("conv2d_dgrad_kernel", {"FAST": True, "W_TMA": False}),
                   ("conv2d_wgrad_kernel", {"FAST": True, "DZ_TMA": False})], log


@needs_descriptors
def test_tma_split_weight_grad(monkeypatch):
    """The split weight gradient with dz by TMA: 2*13*11 = 286 pixels in 5 tiles of 64, 2 tiles per
    split, so only the last split's last tile is cut by P (and zero-filled there)."""
    monkeypatch.setattr(conv_backward, "FORCE_TMA", True)
    monkeypatch.setattr(conv_backward, "FORCE_SPLIT", 3)
    log = _record_gemm_launches(monkeypatch)
    assert all(t.interpreter.kwargs["BLOCK_K"] == 64 for t in conv_backward.TUNED_WGRAD.values())  # as above
    with tkernels.use_backend("triton"):
        _run_case(Case(2, 16, (13, 11), 24, 3, padding=1, groups=1, activation="gelu", channels_last=True, pad=8),
                  "triton")
    assert log == _tma_log(), log
    expect_kernels("sum_partials_kernel")


@needs_descriptors
@pytest.mark.parametrize("groups, c_out, row", [(1, 24, 40), (2, 48, 64)])
def test_tma_weight_grad_dz_rows_wider_than_their_channels(monkeypatch, groups, c_out, row):
    """dz = grad_out (no activation) as the first C_out channels of a wider channels_last tensor
    whose other channels are NaN: its pixel rows lie `row` elements apart, not C_out, and the dz
    descriptor must step by that stride."""
    monkeypatch.setattr(conv_backward, "FORCE_TMA", True)
    log = _record_gemm_launches(monkeypatch)
    x = randn(2, 32, 7, 6).contiguous(memory_format=CL)
    w = randn(c_out, 32 // groups, 3, 3, scale=0.3).requires_grad_()
    wide = torch.full((2, row, 7, 6), float("nan"), device=DEVICE).contiguous(memory_format=CL)
    gy = wide[:, :c_out]
    gy.copy_(randn(2, c_out, 7, 6))
    assert gy.stride(3) == row and gy.data_ptr() % 16 == 0
    with tkernels.use_backend("triton"):
        y = conv2d(x, w, None, padding=1, groups=groups)
        dw, = torch.autograd.grad(y, (w,), gy)
    assert log[-1] == ("conv2d_wgrad_kernel", {"FAST": True, "DZ_TMA": _tma_expected(torch.float32)}), log
    wd = w.detach().double().requires_grad_()
    yd = torch.nn.functional.conv2d(x.double(), wd, padding=1, groups=groups)
    expected, = torch.autograd.grad(yd, (wd,), gy.double())
    assert_close(dw, expected, reduction=2 * 7 * 6)


@needs_descriptors
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tma_tiles_stay_in_their_group(monkeypatch, dtype):
    """The second group's weights and grad_out channels are inf. Group 0's output, input gradient
    and weight gradient stay finite and equal torch's: a TMA box that reaches past group 0's
    channels zero-fills (input gradient: 24 output channels per group, blocks of 16) or feeds only
    accumulator entries that are never stored (forward columns, weight-gradient rows)."""
    monkeypatch.setattr(conv_backward, "FORCE_TMA", True)
    log = _record_gemm_launches(monkeypatch)
    x = randn(2, 32, 7, 6, dtype=dtype).contiguous(memory_format=CL).requires_grad_()
    w = randn(48, 16, 3, 3, dtype=dtype, scale=0.5)
    w[24:] = float("inf")
    w.requires_grad_()
    with tkernels.use_backend("triton"):
        y = conv2d(x, w, None, padding=1, groups=2)
        gy = randn(*y.shape, dtype=dtype).contiguous(memory_format=CL)
        gy[:, 24:] = float("inf")
        y.backward(gy)
    assert log == _tma_log(dtype), log
    xt, wt = (t.detach().double().requires_grad_() for t in (x, w))
    yt = TF.conv2d(xt, wt, None, padding=1, groups=2)
    yt.backward(gy.double())
    for got, expected, red in ((y[:, :24], yt[:, :24], 16 * 9), (x.grad[:, :16], xt.grad[:, :16], 24 * 9),
                               (w.grad[:24], wt.grad[:24], 2 * 7 * 6)):
        assert expected.isfinite().all() and got.isfinite().all(), "group 0 was reached by group 1's infs"
        assert_close(got, expected, dtype=dtype, reduction=red)


@needs_descriptors
def test_tma_gate(monkeypatch):
    """use_tma's TMA rules (16-byte base and strides) and pixel_row_stride's (P, C) matrix check."""
    monkeypatch.setattr(conv_backward, "FORCE_TMA", True)
    t = torch.zeros(64, dtype=torch.float16)
    assert conv_backward.use_tma(t, (8,)) and conv_backward.use_tma(t, (16, 8))
    assert not conv_backward.use_tma(t[1:], (8,)), "unaligned base"
    assert not conv_backward.use_tma(t, (12,)), "stride of 24 bytes"
    monkeypatch.setattr(conv_backward, "FORCE_TMA", False)
    assert not conv_backward.use_tma(t, (8,)), "CPU tensors take TMA only when forced"
    dense = torch.zeros(2, 16, 3, 5).contiguous(memory_format=CL)
    assert conv_backward.pixel_row_stride(dense) == 16
    assert conv_backward.pixel_row_stride(dense[:, :8]) == 16  # channel slices keep the pixel rows
    assert conv_backward.pixel_row_stride(dense[:, :, :, :4]) is None  # a row of 4 pixels, stride 5
    assert conv_backward.pixel_row_stride(dense[:, :, :2]) is None  # images 3 rows apart, 2 rows each
    assert conv_backward.pixel_row_stride(Canary(dense, pad=8, memory_format=CL).view) == 24  # padded channels
    assert conv_backward.pixel_row_stride(torch.zeros(2, 12, 3, 5).contiguous(memory_format=CL)) is None


@pytest.mark.parametrize("split", [None, 3])
@pytest.mark.parametrize("layout", ["planes", "planes_unaligned", "channels_last", "gathered"])
def test_grad_z_layouts(monkeypatch, layout, split):
    """dz = dy * act'(z) and the bias gradient on each tiling of conv2d_grad_z_kernel: dense NCHW
    planes of 8-aligned size (pixel runs), 8-aligned channels_last (channel runs) and gathered
    pixels (strided, or planes of 7x5 pixels whose runs are not aligned); split over programs too
    (PLANES tiles are (image, pixel block) pairs, and a split's share crosses image borders)."""
    monkeypatch.setattr(conv_backward, "FORCE_SPLIT", split)
    log = []
    monkeypatch.setattr(conv_backward, "conv2d_grad_z_kernel",
                        _RecordingKernel(conv_backward.conv2d_grad_z_kernel, log, ("FAST", "PLANES")))
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    hw = (8, 5) if layout == "planes" else (7, 5)
    with tkernels.use_backend("triton"):
        x = randn(3, 5, *hw).contiguous(memory_format=fmt).requires_grad_()
        w = randn(16, 5, 3, 3, scale=0.5).requires_grad_()
        b = randn(16).requires_grad_()
        y = conv2d(x, w, b, padding=1, activation="silu")
        gy = randn(*y.shape).contiguous(memory_format=fmt)
        if layout == "gathered":
            gy = canary(gy)
        y.backward(gy)
    expect_kernels("conv2d_grad_z_kernel")
    flags = {"planes": {"FAST": False, "PLANES": True}, "channels_last": {"FAST": True, "PLANES": False}}
    assert log == [("conv2d_grad_z_kernel", flags.get(layout, {"FAST": False, "PLANES": False}))], log
    xt, wt, bt = (t.detach().double().requires_grad_() for t in (x, w, b))
    TF.silu(TF.conv2d(xt, wt, bt, padding=1)).backward(gy.double())
    pixels = 3 * hw[0] * hw[1]
    assert_close(x.grad, xt.grad, reduction=16 * 9)
    assert_close(w.grad, wt.grad, reduction=pixels)
    assert_close(b.grad, bt.grad, reduction=pixels)


def test_bias_grad_without_weight_grad(backend):
    """Only the bias (and input) needs a gradient: the standalone bias-gradient kernel runs."""
    device = device_for(backend)
    for kernel in (3, 1):
        x = randn(2, 4, 6, 5, device=device).contiguous(memory_format=CL).requires_grad_()
        w = randn(6, 4, kernel, kernel, device=device)
        b = randn(6, device=device).requires_grad_()
        y = conv2d(x, w, b, activation="tanh")
        gy = randn(*y.shape, device=device)
        y.backward(gy)
        bt = b.detach().double().cpu().requires_grad_()
        yt = torch.tanh(TF.conv2d(x.detach().double().cpu(), w.double().cpu(), bt))
        yt.backward(gy.double().cpu())
        assert_close(b.grad, bt.grad, reduction=yt[0, 0].numel() * 2)
        assert w.grad is None


@pytest.mark.parametrize("batch", [2, 64])  # 64 > the 4-wide output rows: batch-innermost columns
def test_numpy_backend_weight_grad_without_input_grad(batch):
    """A first layer (input without grad): the reference skips grad_x, the weight and bias grads
    still match torch, and grad_x never reaches the input."""
    x = randn(batch, 3, 8, 7, dtype=torch.float64)
    w = randn(5, 3, 3, 3, dtype=torch.float64).requires_grad_()
    b = randn(5, dtype=torch.float64).requires_grad_()
    with tkernels.use_backend("numpy"):
        y = conv2d(x, w, b, stride=2, padding=1, activation="silu")
        gy = randn(*y.shape, dtype=torch.float64)
        dw, db = torch.autograd.grad(y, (w, b), gy)
    wt, bt = (t.detach().clone().requires_grad_() for t in (w, b))
    dwt, dbt = torch.autograd.grad(TF.silu(TF.conv2d(x, wt, bt, stride=2, padding=1)), (wt, bt), gy)
    assert_close(dw, dwt, reduction=batch * y[0, 0].numel())
    assert_close(db, dbt, reduction=batch * y[0, 0].numel())
    args = (to_numpy64(gy), to_numpy64(x), to_numpy64(w), to_numpy64(b), (2, 2), (1, 1, 1, 1), (1, 1), 1, "silu")
    assert ref.conv2d_backward(*args, need_input=False)[0] is None
    assert x.grad is None


# ---------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_module_matches_torch(backend, padding_mode):
    device = device_for(backend)
    kwargs = dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=1, padding="same", dilation=(2, 1),
                  groups=2, bias=True, padding_mode=padding_mode, device=device)
    torch.manual_seed(3)
    theirs = torch.nn.Conv2d(**kwargs)
    torch.manual_seed(3)
    ours = tkernels.nn.Conv2d(**kwargs, activation="relu")
    assert isinstance(ours, torch.nn.Conv2d)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), f"initialisation of {key} differs from torch"
    assert repr(ours) == repr(theirs)[:-1] + ", activation=relu)"
    x = randn(2, 4, 7, 6, device=device).requires_grad_()
    x_theirs = x.detach().clone().requires_grad_()
    y = ours(x)
    y_theirs = torch.relu(theirs(x_theirs))
    gy = randn(*y.shape, device=device)
    y.backward(gy)
    y_theirs.backward(gy)
    assert_close(y, y_theirs, reduction=12)
    assert_close(x.grad, x_theirs.grad, reduction=18)
    assert_close(ours.weight.grad, theirs.weight.grad, reduction=84)
    assert_close(ours.bias.grad, theirs.bias.grad, reduction=84)


def test_module_state_dict_roundtrip_and_strided():
    torch.manual_seed(1)
    theirs = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False)
    ours = tkernels.nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False)
    ours.load_state_dict(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    x = randn(1, 3, 8, 7)
    with tkernels.use_backend("numpy"), torch.no_grad():
        assert_close(ours(x), theirs(x), reduction=27)


def test_module_rejects_bad_options():
    with pytest.raises(ValueError):
        tkernels.nn.Conv2d(4, 4, 3, padding_mode="mirror")
    with pytest.raises(ValueError):
        tkernels.nn.Conv2d(4, 4, 3, padding="full")
    with pytest.raises(ValueError):
        tkernels.nn.Conv2d(4, 4, 3, activation="swishy")


# ---------------------------------------------------------------------------------------------
# Errors: torch's exception types, raised before anything runs or is mutated
# ---------------------------------------------------------------------------------------------
def _x():
    return randn(2, 4, 6, 6)


def _w(*shape):
    return randn(*(shape or (6, 4, 3, 3)))


BAD_CALLS = {
    "channels_vs_groups": (lambda: (_x(), _w(6, 3, 3, 3)), {}, RuntimeError),
    "groups_not_dividing_out": (lambda: (_x(), _w(3, 2, 3, 3)), {"groups": 2}, RuntimeError),
    "kernel_larger_than_padded": (lambda: (_x(), _w(6, 4, 9, 9)), {"padding": 1}, RuntimeError),
    "dilated_kernel_too_large": (lambda: (_x(), _w()), {"dilation": 3}, RuntimeError),
    "negative_padding": (lambda: (_x(), _w()), {"padding": -1}, RuntimeError),
    "weight_3d": (lambda: (_x(), _w(6, 4, 3)), {}, RuntimeError),
    "weight_5d": (lambda: (_x(), _w(6, 4, 3, 3, 1)), {}, RuntimeError),
    "input_2d": (lambda: (randn(4, 6), _w()), {}, RuntimeError),
    "input_5d": (lambda: (randn(1, 2, 4, 6, 6), _w()), {}, RuntimeError),
    "stride_0": (lambda: (_x(), _w()), {"stride": 0}, RuntimeError),
    "stride_negative": (lambda: (_x(), _w()), {"stride": (1, -2)}, RuntimeError),
    "stride_three_values": (lambda: (_x(), _w()), {"stride": (1, 1, 1)}, RuntimeError),
    "stride_float": (lambda: (_x(), _w()), {"stride": 1.5}, TypeError),
    "dilation_0": (lambda: (_x(), _w()), {"dilation": 0}, RuntimeError),
    "groups_0": (lambda: (_x(), _w()), {"groups": 0}, RuntimeError),
    "same_with_stride": (lambda: (_x(), _w()), {"padding": "same", "stride": 2}, RuntimeError),
    "bad_padding_string": (lambda: (_x(), _w()), {"padding": "full"}, RuntimeError),
    "int_tensors": (lambda: (_x().long(), _w().long()), {}, RuntimeError),
    "dtype_mismatch": (lambda: (_x(), _w().double()), {}, RuntimeError),
    "bias_dtype_mismatch": (lambda: (_x(), _w(), randn(6).double()), {}, RuntimeError),
    "bias_wrong_size": (lambda: (_x(), _w(), randn(5)), {}, RuntimeError),
    "device_mismatch": (lambda: (_x(), torch.empty(6, 4, 3, 3, device="meta")), {}, RuntimeError),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_like_torch(name):
    make, kwargs, exc = BAD_CALLS[name]
    tensors = make()
    before = [t.clone() for t in tensors if t.device.type != "meta"]
    with pytest.raises(exc) as info:
        conv2d(*tensors, **kwargs)
    assert "conv2d" in str(info.value)
    assert_not_mutated(before, [t for t in tensors if t.device.type != "meta"])
    if name not in ("int_tensors", "device_mismatch"):  # torch's CPU conv accepts ints; meta is our choice
        with pytest.raises(exc):
            TF.conv2d(*tensors, **kwargs)


def test_unknown_activation_raises():
    with pytest.raises(ValueError):
        conv2d(_x(), _w(), activation="swishy")


def test_pixel_count_limit_is_checked():
    """Pixel indices are int32 in the kernels: a batch past 2**31 pixels is refused, not miscomputed."""
    conv_backward.check_pixel_count((8, 3, 64, 64), (8, 4, 64, 64))
    with pytest.raises(RuntimeError, match="pixels"):
        conv_backward.check_pixel_count((2**15, 3, 256, 256), (2**15, 4, 256, 256))


def test_triton_backend_refuses_float64():
    x, w = _x().double().to(DEVICE), _w().double().to(DEVICE)
    with tkernels.use_backend("triton"), pytest.raises(RuntimeError, match="float64"):
        conv2d(x, w)


# ---------------------------------------------------------------------------------------------
# torch.library and torch.compile
# ---------------------------------------------------------------------------------------------
def test_opcheck(backend):
    device = device_for(backend)
    x = randn(2, 4, 5, 6, device=device)
    x_cl = x.contiguous(memory_format=CL)
    w = randn(6, 2, 3, 2, device=device)
    w1 = randn(5, 4, 1, 1, device=device)
    b = randn(6, device=device)
    samples = [
        (x, w, b, [2, 1], [1, 1, 0, 1], [1, 2], 2, "gelu", 0.0, True, False),
        (x_cl, w1, None, [1, 1], [0, 0, 0, 0], [1, 1], 1, "relu", 0.0, False, True),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.tkernels.conv2d.default, args)
    _, z = torch.ops.tkernels.conv2d(*samples[0])
    torch.library.opcheck(torch.ops.tkernels.conv2d_backward.default,
                          (randn(*z.shape, device=device), x, w, b, z, [2, 1], [1, 1, 0, 1], [1, 2], 2, "gelu", 0.0,
                           True, True, True, False))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    model = tkernels.nn.Conv2d(4, 6, 3, padding=1, activation="silu")
    x = randn(2, 4, 6, 5).contiguous(memory_format=CL)

    def step(inp):
        return model(inp).square().sum()

    compiled = torch.compile(step, fullgraph=True)
    with tkernels.use_backend("triton"):
        x_eager = x.clone().requires_grad_()
        step(x_eager).backward()
        eager_grads = (x_eager.grad, model.weight.grad.clone())
        model.weight.grad = None
        x_comp = x.clone().requires_grad_()
        loss = compiled(x_comp)
        loss.backward()
    assert_close(x_comp.grad, eager_grads[0], reduction=54)
    assert_close(model.weight.grad, eager_grads[1], reduction=60)
    # the independent reference: the NumPy backend in float64
    model64 = copy.deepcopy(model).double()
    model64.zero_grad()
    x64 = x.detach().cpu().double().requires_grad_()
    with tkernels.use_backend("numpy"):
        model64(x64).square().sum().backward()
    assert_close(x_comp.grad, x64.grad, dtype=torch.float32, reduction=54)
    assert_close(model.weight.grad, model64.weight.grad, dtype=torch.float32, reduction=60)
