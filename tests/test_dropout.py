"""dropout: keep-rate statistics, scaling, reproducibility under torch.manual_seed, the backward's
recomputed mask, torch's special cases (p=0, p=1, eval, in place), layouts, errors, module, opcheck."""
import math

import pytest
import torch
import triton
import triton.language as tl

import tkernels
import tkernels.functional as F
from tkernels.ops import dropout as dropout_ops
from tkernels.reference import dropout as ref
from helpers import assert_close, canary, device_for, skip_unsupported, to_numpy64


def _nonzero_randn(*shape, device):
    """Random values with no exact zeros, so y == 0 identifies a dropped element."""
    x = torch.randn(*shape, device=device)
    return torch.where(x == 0, torch.ones_like(x), x)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.85])
def test_keep_rate_and_scaling(backend, p):
    dev = device_for(backend)
    n = 8192
    x = _nonzero_randn(n, device=dev).requires_grad_()
    y = F.dropout(x, p)
    keep = y.detach() != 0
    kept = int(keep.sum())
    # binomial(n, 1 - p): 6 standard deviations make a false failure astronomically unlikely
    mean, sd = n * (1 - p), math.sqrt(n * p * (1 - p))
    assert abs(kept - mean) < 6 * sd, f"kept {kept} of {n} at p={p}, expected {mean:.0f} +- {6 * sd:.0f}"
    assert_close(y, ref.dropout(to_numpy64(x), keep.cpu().numpy(), p))
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(dx != 0, keep), "backward must drop exactly the elements forward dropped"
    assert_close(dx, ref.dropout_backward(to_numpy64(g), keep.cpu().numpy(), p))


def _binomial_bound(n: int, q: float, sigmas: float = 6.0):
    """(mean, half-width): a Binomial(n, q) count lies within mean +- half-width but with odds ~1e-9."""
    return n * q, sigmas * math.sqrt(n * q * (1 - q)) + 1


def _assert_binomial(count: int, n: int, q: float, what: str) -> None:
    mean, width = _binomial_bound(n, q)
    assert abs(count - mean) < width, f"{what}: {count} of {n}, expected {mean:.0f} +- {width:.0f}"


def _kernel_keep(n: int, seed: int, p: float = 0.5) -> torch.Tensor:
    """The kernel's keep mask for elements 0..n-1 under `seed`, launched directly on ones."""
    x = torch.ones(n, device=device_for("triton"))
    y = torch.empty_like(x)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=x.device)
    dropout_ops.dropout_kernel[(math.ceil(n / dropout_ops.BLOCK),)](
        x, y, seed_t, p, 1.0 / (1.0 - p), n, 1, 1, 1, *([0] * 8), DENSE=True, WIDE=False, BLOCK=dropout_ops.BLOCK)
    assert set(torch.unique(y).tolist()) <= {0.0, 1.0 / (1.0 - p)}, "every element is dropped or scaled"
    return (y != 0).cpu()


def test_masks_differ_across_seeds_offsets_and_blocks(launches):
    """Statistically, the mask is a fresh Bernoulli draw per seed, per element and per block: two
    independent p=0.5 masks disagree on half the elements, and neighbours agree as often as chance."""
    n = 4 * dropout_ops.BLOCK
    first, second = _kernel_keep(n, 123), _kernel_keep(n, 124)
    launches.assert_ran("dropout_kernel")
    _assert_binomial(int(first.sum()), n, 0.5, "kept at p=0.5")
    _assert_binomial(int((first != second).sum()), n, 0.5, "seeds 123 and 124 disagree")
    _assert_binomial(int((first[1:] != first[:-1]).sum()), n - 1, 0.5, "neighbouring offsets disagree")
    blocks = first.reshape(4, dropout_ops.BLOCK)
    for a in range(4):
        for b in range(a + 1, 4):
            _assert_binomial(int((blocks[a] != blocks[b]).sum()), dropout_ops.BLOCK, 0.5,
                             f"blocks {a} and {b} disagree")


def test_backward_uses_the_forward_mask_with_the_rate_drawn(backend):
    """dx = g * keep / (1 - p) with the forward's keep: with g = 1 and x free of zeros, dx must be
    (y != 0) / (1 - p) exactly, and the mask must have the binomial keep-rate (so a backward that
    draws a new mask, or keeps everything, fails)."""
    p, n = 0.3, 6000
    x = _nonzero_randn(n, device=device_for(backend)).requires_grad_()
    y = F.dropout(x, p)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    keep = y.detach() != 0
    _assert_binomial(int(keep.sum()), n, 1 - p, "kept")
    assert torch.equal(dx, keep.to(dx.dtype) / (1 - p)), "backward dropped other elements than forward"
    assert_close(y, ref.dropout(to_numpy64(x), keep.cpu().numpy(), p))


def test_mask_is_not_stored_only_the_seed(backend):
    x = torch.randn(64, 33, device=device_for(backend), requires_grad=True)
    y = F.dropout(x, 0.3)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].numel() == 1 and saved[0].dtype == torch.int64


def test_reproducible_under_manual_seed(backend):
    dev = device_for(backend)
    x = _nonzero_randn(40, 50, device=dev)
    torch.manual_seed(1234)
    first = F.dropout(x, 0.4)
    torch.manual_seed(1234)
    second = F.dropout(x, 0.4)
    third = F.dropout(x, 0.4)
    assert torch.equal(first, second)
    assert not torch.equal(first != 0, third != 0), "a new call draws a new mask"
    torch.manual_seed(1234)
    module = tkernels.nn.Dropout(0.4)
    assert torch.equal(module(x), first)


@pytest.mark.parametrize("layout", ["canary", "channels_last", "transposed"])
def test_layouts_keep_the_logical_mask(backend, layout):
    dev = device_for(backend)
    base = _nonzero_randn(3, 5, 7, 9, device=dev)
    if layout == "canary":
        x = canary(base)
    elif layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    else:
        x = base.transpose(1, 3)
    torch.manual_seed(7)
    y = F.dropout(x, 0.5)
    torch.manual_seed(7)
    expected = F.dropout(x.contiguous(), 0.5)
    assert torch.equal(y, expected), "the mask is a function of the logical index, not of the layout"
    if layout == "channels_last" and backend == "triton":
        assert y.is_contiguous(memory_format=torch.channels_last)
    x = x.detach().requires_grad_()
    torch.manual_seed(8)
    y = F.dropout(x, 0.5)
    g = torch.randn_like(y).transpose(0, 1).contiguous().transpose(0, 1)  # a gradient in yet another layout
    (dx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(dx != 0, y != 0)
    assert_close(dx, g * (y != 0) * 2.0)


def test_inplace(backend):
    dev = device_for(backend)
    x = _nonzero_randn(17, 33, device=dev)
    torch.manual_seed(5)
    expected = F.dropout(x, 0.3)
    a = x.clone()
    torch.manual_seed(5)
    out = F.dropout(a, 0.3, inplace=True)
    assert out is a and torch.equal(a, expected)
    leaf = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="leaf"):
        F.dropout(leaf, 0.3, inplace=True)
    assert torch.equal(leaf, x), "the refused call must not have written anything"
    h = leaf * 1.0
    torch.manual_seed(6)
    out = F.dropout(h, 0.3, inplace=True)
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, leaf, g)
    assert torch.equal(dx != 0, out != 0)
    assert_close(dx, g * (out != 0) / 0.7)
    strided = canary(x)[:, ::2]
    torch.manual_seed(5)
    expected = F.dropout(strided.clone(), 0.3)
    torch.manual_seed(5)
    F.dropout(strided, 0.3, inplace=True)
    assert torch.equal(strided, expected)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's inf * 0, which is the point of the test
def test_special_cases_follow_torch(backend):
    dev = device_for(backend)
    x = torch.randn(5, 7, device=dev, requires_grad=True)
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0) is x
    assert F.dropout(x, 0.4, training=False, inplace=True) is x
    empty = torch.randn(0, 3, device=dev)
    assert F.dropout(empty, 0.5) is empty
    y = F.dropout(x, 1.0)
    assert torch.equal(y, torch.zeros_like(y))
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(dx, torch.zeros_like(dx))
    special = torch.tensor([float("inf"), float("nan"), 1.0] * 20, device=dev)
    ours, theirs = F.dropout(special, 1.0), torch.nn.functional.dropout(special.cpu(), 1.0)
    assert torch.equal(torch.isnan(ours.cpu()), torch.isnan(theirs)), "p=1 multiplies by zero: inf and NaN give NaN"
    y = F.dropout(special, 0.5)
    dropped_inf = (special == float("inf")) & ~torch.isinf(y)
    assert torch.isnan(y[dropped_inf]).all(), "a dropped inf is inf * 0 = NaN, as in torch"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(backend, dtype):
    skip_unsupported(backend, dtype)
    x = _nonzero_randn(8, 129, device=device_for(backend)).to(dtype).requires_grad_()
    y = F.dropout(x, 0.25)
    assert y.dtype == dtype
    keep = (y.detach() != 0).cpu().numpy()
    _assert_binomial(int(keep.sum()), keep.size, 0.75, f"kept in {dtype}")
    assert_close(y, ref.dropout(to_numpy64(x), keep, 0.25), dtype=dtype)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert_close(dx, ref.dropout_backward(to_numpy64(torch.ones_like(y)), keep, 0.25), dtype=dtype)


def test_wide_counter_path_matches_below_two_to_the_31():
    """Past 2**31 elements the kernel folds the counter's high bits into the key; below, both agree."""
    x = _nonzero_randn(3000, device=device_for("triton"))
    seed = torch.tensor([987654321], dtype=torch.int64, device=x.device)
    outs = []
    for wide in (False, True):
        y = torch.empty_like(x)
        dropout_ops.dropout_kernel[(3,)](x, y, seed, 0.5, 2.0, x.numel(), 1, 1, 1, *([0] * 8), DENSE=True, WIDE=wide,
                                         BLOCK=dropout_ops.BLOCK)
        outs.append(y)
    assert torch.equal(outs[0], outs[1])
    assert 0.4 < float((outs[0] != 0).float().mean()) < 0.6


@triton.jit
def _philox_uniforms(seed_ptr, out_ptr, QUARTER: tl.constexpr):
    """out[b*4Q + j*Q + t] = output j of tl.rand4x(seed, b*Q + t): the layout dropout_kernel promises."""
    t = tl.arange(0, QUARTER)
    b = tl.program_id(0)
    u0, u1, u2, u3 = tl.rand4x(tl.load(seed_ptr), b * QUARTER + t)
    base = out_ptr + b * 4 * QUARTER + t
    tl.store(base, u0)
    tl.store(base + QUARTER, u1)
    tl.store(base + 2 * QUARTER, u2)
    tl.store(base + 3 * QUARTER, u3)


def test_mask_uses_all_four_philox_outputs_per_counter():
    """Each Philox call decides four elements: the mask is exactly u >= p for the four outputs of
    tl.rand4x at counter b*BLOCK/4 + t, laid out one contiguous quarter per output; forward and
    backward agree on it, and an odd size masks the tail of the last block."""
    dev = device_for("triton")
    n = 2 * dropout_ops.BLOCK + 333
    x = _nonzero_randn(n, device=dev).requires_grad_()
    torch.manual_seed(7)
    y = F.dropout(x, 0.5)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.manual_seed(7)  # the same draw as dropout's
    seed = dropout_ops.draw_seed(x.device)
    blocks = triton.cdiv(n, dropout_ops.BLOCK)
    u = torch.full((blocks * dropout_ops.BLOCK,), float("nan"), device=dev)
    _philox_uniforms[(blocks,)](seed, u, QUARTER=dropout_ops.BLOCK // 4)
    expected = u[:n] >= 0.5
    assert torch.equal(y.detach() != 0, expected)
    assert torch.equal(dx != 0, expected)
    quarter = dropout_ops.BLOCK // 4
    quarters = expected[:dropout_ops.BLOCK].view(4, quarter)
    assert all(not torch.equal(quarters[0], quarters[j]) for j in (1, 2, 3)), "each output is a different stream"


def test_errors(backend):
    dev = device_for(backend)
    x = torch.randn(3, device=dev)
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match=f"dropout probability has to be between 0 and 1, but got {p}"):
            F.dropout(x, p)
        with pytest.raises(ValueError):
            tkernels.nn.Dropout(p)
    with pytest.raises(RuntimeError, match="floating-point.*torch.int64"):
        F.dropout(torch.ones(3, dtype=torch.long, device=dev), 0.5)
    with pytest.raises(TypeError, match="must be a Tensor"):
        F.dropout([1.0, 2.0], 0.5)


def test_triton_backend_refuses_float64():
    with tkernels.use_backend("triton"):
        with pytest.raises(RuntimeError, match="float64 runs on the numpy backend"):
            F.dropout(torch.randn(3, dtype=torch.float64, device=device_for("triton")), 0.5)


def test_module_train_and_eval(backend):
    ours, theirs = tkernels.nn.Dropout(0.3, inplace=False), torch.nn.Dropout(0.3)
    assert isinstance(ours, torch.nn.Dropout) and repr(ours) == repr(theirs)
    x = _nonzero_randn(10, 20, device=device_for(backend))
    y = ours(x)
    assert (y == 0).any() and torch.allclose(y[y != 0], x[y != 0] / 0.7)
    ours.eval()
    assert ours(x) is x


def test_opcheck(backend):
    dev = device_for(backend)
    x = torch.randn(6, 7, device=dev)
    seed = torch.tensor([42], dtype=torch.int64, device=dev)
    torch.library.opcheck(torch.ops.tkernels.dropout.default, (x, seed, 0.3))
    torch.library.opcheck(torch.ops.tkernels.dropout.default, (x.t(), seed, 1.0))
    torch.library.opcheck(torch.ops.tkernels.dropout_.default, (x.clone(), seed, 0.6))
    torch.library.opcheck(torch.ops.tkernels.dropout_backward.default, (x, seed, 0.3, backend))
    torch.library.opcheck(torch.ops.tkernels.dropout_backward.default, (x, seed, 0.3, ""))
