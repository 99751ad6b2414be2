"""Fused SGD and AdamW: many steps on both backends against torch.optim (foreach off and on) and the
float64 NumPy reference; state_dict round trips both ways; launch counts; bad input."""
import contextlib
import copy

import numpy as np
import pytest
import torch

import tkernels
import tkernels.optim
from tkernels.ops import optim as optim_ops
from tkernels.reference import optim as ref
from helpers import expect_kernels, Canary, HostSyncCounter, assert_close, device_for, skip_unsupported, to_numpy64

# (0, 3) is empty, (41, 25) has 1025 elements: more than one block and (on the interpreter) one chunk.
SHAPES = [(1,), (3,), (17,), (41, 25), (0, 3)]
NEVER = 1       # this param never gets a gradient
SOMETIMES = 2   # this one only on odd steps: its state starts late and its step count lags
STEPS = 10

SGD_OPTIONS = [
    dict(lr=0.1),
    dict(lr=0.1, weight_decay=0.05, maximize=True),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
    dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.02, maximize=True),
]
ADAMW_OPTIONS = [
    dict(),  # the defaults: lr=1e-3, weight_decay=1e-2
    dict(lr=0.01, amsgrad=True),
    dict(lr=0.01, weight_decay=0.0, maximize=True),
    dict(lr=0.02, betas=(0.3, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=True, maximize=True),
]
SGD_STATE = ("momentum_buffer",)
ADAMW_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")


def _gradients(steps, dtype, device, shapes=SHAPES):
    """Fresh random gradients per step; None where a param sits the step out."""
    return [[None if i == NEVER or (i == SOMETIMES and k % 2 == 0)
             else torch.randn(s).to(dtype=dtype, device=device) for i, s in enumerate(shapes)]
            for k in range(steps)]


def _params(initial, dtype=None):
    return [torch.nn.Parameter(t.detach().clone().to(dtype=dtype or t.dtype)) for t in initial]


def _train(optimizer, params, gradients, backend=None):
    for grads in gradients:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.to(p.dtype).clone()
        with tkernels.use_backend(backend) if backend else contextlib.nullcontext():
            optimizer.step()
    return optimizer


def _reference(kind, initial, gradients, options):
    """Float64 NumPy run of the whole schedule: (params, per-param state dicts)."""
    params = [to_numpy64(t) for t in initial]
    states = [{} for _ in initial]
    for grads in gradients:
        for i, g in enumerate(grads):
            if g is None:
                continue
            s = states[i]
            if kind == "sgd":
                o = dict(dict(lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, maximize=False),
                         **options)
                params[i], buf = ref.sgd_update(params[i], to_numpy64(g), s.get("momentum_buffer"), **o)
                if buf is not None:
                    s["momentum_buffer"] = buf
            else:
                o = dict(dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False),
                         **options)
                beta1, beta2 = o.pop("betas")
                zeros = np.zeros_like(params[i])
                params[i], m, v, v_max, t = ref.adamw_update(
                    params[i], to_numpy64(g), s.get("exp_avg", zeros), s.get("exp_avg_sq", zeros),
                    s.get("max_exp_avg_sq", zeros) if o["amsgrad"] else None, s.get("step", 0.0), beta1=beta1,
                    beta2=beta2, **o)
                s.update(exp_avg=m, exp_avg_sq=v, step=t)
                if v_max is not None:
                    s["max_exp_avg_sq"] = v_max
    return params, states


def _assert_same_state(ours, theirs, params_ours, params_theirs, keys, dtype, scale=1.0, msg="", step_dtype=True):
    for i, (p, q) in enumerate(zip(params_ours, params_theirs)):
        assert (p in ours.state) == (q in theirs.state), f"param {i}: state presence differs {msg}"
        if p not in ours.state:
            continue
        mine, other = ours.state[p], theirs.state[q]
        assert set(mine) == set(other), f"param {i}: state keys {sorted(mine)} != {sorted(other)} {msg}"
        for key in keys:
            if key in other:
                if key == "step":
                    assert float(mine[key]) == float(other[key]), f"param {i} step {msg}"
                    assert mine[key].dtype == torch.float32 or not step_dtype
                else:
                    assert mine[key].dtype == p.dtype and mine[key].shape == p.shape
                    assert_close(mine[key], other[key], dtype=dtype, scale=scale, msg=f"param {i} {key} {msg}")


def _check_against_torch_and_reference(kind, backend, options, dtype=torch.float32, steps=STEPS, scale=1.0):
    skip_unsupported(backend, dtype)
    dev = device_for(backend)
    ours_cls, torch_cls = ((tkernels.optim.SGD, torch.optim.SGD) if kind == "sgd"
                           else (tkernels.optim.AdamW, torch.optim.AdamW))
    keys = SGD_STATE if kind == "sgd" else ADAMW_STATE
    initial = [torch.randn(s).to(dtype=dtype, device=dev) for s in SHAPES]
    gradients = _gradients(steps, dtype, dev)

    params = _params(initial)
    ours = _train(ours_cls(params, **options), params, gradients, backend)
    expect_kernels(*(("sgd_kernel",) if kind == "sgd" else ("adamw_prologue_kernel", "adamw_kernel")))
    assert params[NEVER].grad is None and torch.equal(params[NEVER], initial[NEVER])
    assert params[NEVER] not in ours.state

    ref_params, ref_states = _reference(kind, initial, gradients, options)
    for i, (p, expected) in enumerate(zip(params, ref_params)):
        assert p.dtype == dtype
        assert_close(p, expected, dtype=dtype, scale=scale, msg=f"param {i} vs reference")
        for key, value in ref_states[i].items():
            actual = ours.state[p][key]
            if key == "step":
                assert float(actual) == value, f"param {i} step {float(actual)} != {value}"
            else:
                assert_close(actual, value, dtype=dtype, scale=scale, msg=f"param {i} {key} vs reference")

    # torch.optim itself; float16/bfloat16 against torch in float32 (our math is float32 inside)
    for foreach in (False, True):
        twins = _params(initial, dtype=torch.float32 if dtype != torch.float64 else dtype)
        theirs = _train(torch_cls(twins, foreach=foreach, **options), twins, gradients)
        for i, (p, q) in enumerate(zip(params, twins)):
            assert_close(p, q, dtype=dtype, scale=scale, msg=f"param {i} vs torch foreach={foreach}")
        _assert_same_state(ours, theirs, params, twins, keys, dtype, scale, msg=f"foreach={foreach}")


def _ids(options):
    return ",".join(f"{k}={v}" for k, v in options.items()) or "defaults"


@pytest.mark.parametrize("options", SGD_OPTIONS, ids=_ids)
def test_sgd_matches_torch_and_reference(backend, options):
    _check_against_torch_and_reference("sgd", backend, options)


@pytest.mark.parametrize("options", ADAMW_OPTIONS, ids=_ids)
def test_adamw_matches_torch_and_reference(backend, options):
    _check_against_torch_and_reference("adamw", backend, options)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind,options", [("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
                                          ("adamw", dict(lr=0.01, amsgrad=True))])
def test_low_and_double_precision(backend, kind, options, dtype):
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("float64 runs on the numpy backend only; test_triton_refuses_float64 covers the refusal")
    # state is stored in the param dtype every step, as torch does; float32 math in between. One
    # step: one rounding of each stored value, the plain tolerance. Six steps: the float64
    # reference never rounds, so each step's rounding (a whole ulp where the interpreter's bf16
    # cast truncates) stays in the parameters and states: up to one rounding per step.
    _check_against_torch_and_reference(kind, backend, options, dtype=dtype, steps=1)
    _check_against_torch_and_reference(kind, backend, options, dtype=dtype, steps=6, scale=6.0)


def test_tensor_lr(backend):
    """A tensor lr (read by the kernels on the triton backend), changed in place between steps as a
    scheduler changes it."""
    dev = device_for(backend)
    initial = [torch.randn(s, device=dev) for s in SHAPES[:3]]
    gradients = _gradients(4, torch.float32, dev, SHAPES[:3])
    for ours_cls, torch_cls, extra in ((tkernels.optim.SGD, torch.optim.SGD, dict(momentum=0.9)),
                                       (tkernels.optim.AdamW, torch.optim.AdamW, dict(weight_decay=0.5))):
        a, b = _params(initial), _params(initial)
        ours_lr, their_lr = torch.tensor(0.05, device=dev), torch.tensor(0.05, device=dev)
        ours = ours_cls(a, lr=ours_lr, **extra)
        theirs = torch_cls(b, lr=their_lr, foreach=False, **extra)
        for k, grads in enumerate(gradients):
            if k == 2:
                ours_lr.fill_(0.02)
                their_lr.fill_(0.02)
            _train(ours, a, [grads], backend)
            _train(theirs, b, [grads])
        for p, q in zip(a, b):
            assert_close(p, q)


# ---------------------------------------------------------------------------------------------
# state_dict compatibility, both ways, and training continued identically
# ---------------------------------------------------------------------------------------------
CASES = [("sgd", dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
         ("adamw", dict(lr=0.01, amsgrad=True, maximize=True))]


@pytest.mark.parametrize("kind,options", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_round_trip(backend, kind, options, direction):
    dev = device_for(backend)
    ours_cls, torch_cls = ((tkernels.optim.SGD, torch.optim.SGD) if kind == "sgd"
                           else (tkernels.optim.AdamW, torch.optim.AdamW))
    keys = SGD_STATE if kind == "sgd" else ADAMW_STATE
    initial = [torch.randn(s, device=dev) for s in SHAPES]
    first, second = _gradients(3, torch.float32, dev), _gradients(3, torch.float32, dev)

    # the first leg trains on one side and hands its state_dict to the other side's fresh optimizer
    source_cls, target_cls = (torch_cls, ours_cls) if direction == "torch_to_ours" else (ours_cls, torch_cls)
    source_params = _params(initial)
    source = _train(source_cls(source_params, **options), source_params, first,
                    backend if source_cls is ours_cls else None)
    saved = copy.deepcopy(source.state_dict())  # as torch.save/torch.load would: no shared tensors
    if kind == "adamw" and direction == "torch_to_ours":
        # a long-trained counter (bias corrections far from 1 - beta) saved in float64, as torch does when
        # the default dtype is float64: ours moves it to a float32 counter on its next step
        for state in saved["state"].values():
            state["step"] = torch.tensor(float(state["step"]) + 12345.0, dtype=torch.float64)
        source.load_state_dict(copy.deepcopy(saved))

    target_params = [torch.nn.Parameter(p.detach().clone()) for p in source_params]
    target = target_cls(target_params, **options)
    target.load_state_dict(saved)
    assert target.state_dict()["param_groups"] == saved["param_groups"]
    _assert_same_state(target, source, target_params, source_params, keys, torch.float32, msg="after load",
                       step_dtype=False)

    # both continue; ours runs on the backend under test, torch as itself
    _train(source, source_params, second, backend if source_cls is ours_cls else None)
    _train(target, target_params, second, backend if target_cls is ours_cls else None)
    for i, (p, q) in enumerate(zip(target_params, source_params)):
        assert_close(p, q, msg=f"param {i} after continuing")
    _assert_same_state(target, source, target_params, source_params, keys, torch.float32, msg="after continuing")


def test_state_dict_layout_is_torchs():
    params_a, params_b = _params([torch.randn(3), torch.randn(2, 2)]), _params([torch.randn(3), torch.randn(2, 2)])
    for ours_cls, torch_cls in ((tkernels.optim.SGD, torch.optim.SGD), (tkernels.optim.AdamW, torch.optim.AdamW)):
        ours, theirs = ours_cls(params_a, lr=0.1), torch_cls(params_b, lr=0.1)
        assert isinstance(ours, torch_cls)
        assert ours.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]
    ours = tkernels.optim.AdamW(params_a)
    for p in params_a:
        p.grad = torch.ones_like(p)
    with tkernels.use_backend("numpy"):
        ours.step()
    state = ours.state[params_a[0]]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
    assert state["step"].dim() == 0 and state["step"].dtype == torch.float32 and float(state["step"]) == 1.0


# ---------------------------------------------------------------------------------------------
# Layouts, canaries and launch counts on the triton backend
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad-scale"])
@pytest.mark.parametrize("kind,options", CASES, ids=[c[0] for c in CASES])
def test_strided_params_and_grads_with_canaries(kind, options, scaled):
    """Params and grads inside NaN margins: dense ones (contiguous, or transposed like their param) go
    through the kernel's flat path, non-dense ones through staged copies. Results match torch and no
    margin is written. With a GradScaler's scale, every layout's grad is left unscaled in place."""
    dev = device_for("triton")
    shapes = [(17,), (5, 7), (6, 4), (32, 48)]  # the last: whole blocks only, over two chunks
    initial = [torch.randn(s, device=dev) for s in shapes]
    gradients = [[torch.randn(s, device=dev) for s in shapes] for _ in range(3)]
    canaries = [Canary(initial[0], pad=0), Canary(initial[1]), Canary(initial[2].t(), pad=0),
                Canary(initial[3], pad=0)]
    params = [torch.nn.Parameter(canaries[0].view), torch.nn.Parameter(canaries[1].view),
              torch.nn.Parameter(canaries[2].view.t()), torch.nn.Parameter(canaries[3].view)]
    assert params[2].stride() == (1, 6) and not params[1].is_contiguous()
    opt = (tkernels.optim.SGD if kind == "sgd" else tkernels.optim.AdamW)(params, **options)
    scale = 8.0 if scaled else 1.0
    if scaled:
        opt.grad_scale, opt.found_inf = torch.tensor(scale, device=dev), torch.tensor(0.0, device=dev)
    with tkernels.use_backend("triton"):
        for grads in gradients:
            scaled_grads = [g * scale for g in grads]
            grad_canaries = [Canary(scaled_grads[0], pad=0), Canary(scaled_grads[1]),
                             Canary(scaled_grads[2].t(), pad=0), Canary(scaled_grads[3], pad=0)]
            params[0].grad, params[1].grad = grad_canaries[0].view, grad_canaries[1].view
            params[2].grad, params[3].grad = grad_canaries[2].view.t(), grad_canaries[3].view
            opt.step()
            for c in grad_canaries:
                c.assert_untouched_outside()
            for i, (p, g) in enumerate(zip(params, grads)):
                assert torch.equal(p.grad, g), f"grad {i} is not left unscaled"
    twins = _params(initial)
    _train((torch.optim.SGD if kind == "sgd" else torch.optim.AdamW)(twins, **options), twins, gradients)
    for i, (p, q) in enumerate(zip(params, twins)):
        assert_close(p, q, msg=f"param {i}")
    for c in canaries:
        c.assert_untouched_outside()


class _LaunchCounter:
    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(grid)
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_one_launch_per_group_and_dtype(monkeypatch):
    counters = {name: _LaunchCounter(getattr(optim_ops, name))
                for name in ("sgd_kernel", "adamw_kernel", "adamw_prologue_kernel")}
    for name, counter in counters.items():
        monkeypatch.setattr(optim_ops, name, counter)
    dev = device_for("triton")
    many = _params([torch.randn(n, device=dev) for n in (1, 2, 3, 5, 8, 13)])
    half = _params([torch.randn(4, device=dev, dtype=torch.float16) for _ in range(3)])
    with tkernels.use_backend("triton"):
        for cls in (tkernels.optim.SGD, tkernels.optim.AdamW):
            opt = cls([{"params": many}, {"params": half}], lr=0.1)
            for p in many + half:
                p.grad = torch.randn_like(p)
            opt.step()
    # SGD: one launch per (group, dtype); AdamW: a prologue and an update each
    assert len(counters["sgd_kernel"].launches) == 2
    assert len(counters["adamw_prologue_kernel"].launches) == 2
    assert len(counters["adamw_kernel"].launches) == 2
    assert counters["sgd_kernel"].launches[0] == (6,)  # one program per chunk: six small tensors


# ---------------------------------------------------------------------------------------------
# torch.amp.GradScaler: unscale and skip inside the kernel, as torch's fused optimizers do
# ---------------------------------------------------------------------------------------------
SCALER_SHAPES = [(3,), (41, 25), (17,)]
SCALER_CASES = [("sgd", dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
                ("sgd", dict(lr=0.05, momentum=0.8, dampening=0.2)),
                ("adamw", dict(lr=0.01, amsgrad=True))]


def _scaled_training(cls, backend, options, initial, inf_step, unscale_first, counters=None):
    """Five GradScaler steps (growth every 2 good steps); at ``inf_step`` one gradient element of
    param 1 is inf. Returns per step (scale after update, params, grads) and the optimizer."""
    params = _params(initial)
    opt = cls(params, **options)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    torch.manual_seed(1)
    history = []
    for k in range(5):
        scaler.scale(torch.ones(()))  # as scaler.scale(loss) would: the scale exists from here
        for p in params:
            p.grad = torch.randn_like(p) * scaler.get_scale()
        if k == inf_step:
            params[1].grad[3, 4] = float("inf")
        before = [p.detach().clone() for p in params]
        steps_before = {i: float(s["step"]) for i, s in enumerate(opt.state[p] for p in params) if "step" in s}
        if unscale_first:
            scaler.unscale_(opt)  # as for gradient clipping: the step then gets found_inf but no scale
        with tkernels.use_backend(backend) if backend else contextlib.nullcontext():
            scaler.step(opt)
        scaler.update()
        if k == inf_step:
            assert all(torch.equal(a, b) for a, b in zip(before, params)), "a step with an inf grad moved a param"
            for i, p in enumerate(params):
                if "step" in opt.state[p]:
                    assert float(opt.state[p]["step"]) == steps_before.get(i, 0.0), "a skipped step counted"
        history.append((scaler.get_scale(), [p.detach().clone() for p in params],
                        [p.grad.detach().clone() for p in params]))
    return history, opt


SCALER_SCHEDULES = {"inf-later": (2, False), "inf-first-step": (0, False), "unscaled-first": (3, True)}
# (a skipped first step with dampening is not torch's: see test_sgd_buffer_born_on_a_skipped_step)
SCALER_RUNS = [(case, schedule) for case in SCALER_CASES for schedule in SCALER_SCHEDULES
               if not (schedule == "inf-first-step" and case[1].get("dampening"))]


@pytest.mark.parametrize("kind,options,schedule", [(k, o, s) for (k, o), s in SCALER_RUNS],
                         ids=[f"{k}{'-dampening' if o.get('dampening') else ''}-{s}" for (k, o), s in SCALER_RUNS])
def test_grad_scaler_steps_match_torch(backend, monkeypatch, kind, options, schedule):
    """Against torch's optimizers under the same GradScaler: for-loop and (when it is defined)
    fused. Scales, params and the unscaled grads left in p.grad agree step by step; the inf step
    changes no param and no step counter and halves the scale."""
    inf_step, unscale_first = SCALER_SCHEDULES[schedule]
    ours_cls, torch_cls = ((tkernels.optim.SGD, torch.optim.SGD) if kind == "sgd"
                           else (tkernels.optim.AdamW, torch.optim.AdamW))
    assert ours_cls._step_supports_amp_scaling
    counters = {name: _LaunchCounter(getattr(optim_ops, name)) for name in ("sgd_kernel", "adamw_kernel")}
    for name, counter in counters.items():
        monkeypatch.setattr(optim_ops, name, counter)
    initial = [torch.randn(s, device=device_for(backend)) for s in SCALER_SHAPES]
    ours, opt = _scaled_training(ours_cls, backend, options, initial, inf_step, unscale_first)
    if backend == "triton":
        assert len(counters[f"{kind}_kernel"].launches) == 5
    references = {"for-loop": dict(foreach=False)}
    if inf_step != 0:  # torch's fused SGD steps on from an uninitialised buffer after a skipped first step
        references["fused"] = dict(fused=True)
    for name, extra in references.items():
        theirs, _ = _scaled_training(torch_cls, None, dict(options, **extra), initial, inf_step, unscale_first)
        for k, ((scale, params, grads), (t_scale, t_params, t_grads)) in enumerate(zip(ours, theirs)):
            assert scale == t_scale, f"step {k}: scale {scale} != torch {name} {t_scale}"
            for i in range(len(params)):
                assert_close(params[i], t_params[i], msg=f"step {k} param {i} vs torch {name}")
                if k != inf_step:  # torch leaves the grads of a skipped step scaled, or half unscaled
                    assert_close(grads[i], t_grads[i], msg=f"step {k} grad {i} vs torch {name}")
    assert ours[inf_step][0] == ours[inf_step - 1][0] / 2 if inf_step else ours[0][0] == 2.0 ** 9


def test_sgd_buffer_born_on_a_skipped_step(backend):
    """torch's fused SGD leaves such a buffer uninitialised and its for-loop SGD makes none (the step
    is skipped on the host). Ours is zeros, so the next step's buffer is (1 - dampening) * d: d itself
    without dampening (what test_grad_scaler_steps_match_torch checks against torch), as here."""
    dev = device_for(backend)
    p = torch.nn.Parameter(torch.randn(5, device=dev))
    opt = tkernels.optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.25)
    opt.grad_scale, opt.found_inf = torch.tensor(4.0, device=dev), torch.tensor(1.0, device=dev)
    p.grad = torch.full_like(p, float("inf"))
    before = p.detach().clone()
    opt.step()
    assert torch.equal(p, before) and torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p))
    opt.found_inf = torch.tensor(0.0, device=dev)
    d = torch.randn_like(p)
    p.grad = d * 4.0
    opt.step()
    assert_close(opt.state[p]["momentum_buffer"], to_numpy64(d) * 0.75)
    assert_close(p, to_numpy64(before) - 0.1 * to_numpy64(d) * 0.75)


def test_grad_scaler_tensors_are_checked(backend):
    dev = device_for(backend)
    params = _params([torch.randn(3, device=dev)])
    params[0].grad = torch.randn(3, device=dev)
    opt = tkernels.optim.AdamW(params)
    opt.grad_scale = torch.ones(2, device=dev)
    before = params[0].detach().clone()
    with pytest.raises(RuntimeError, match="grad_scale must be a one-element floating-point tensor"):
        opt.step()
    assert torch.equal(params[0], before)


# ---------------------------------------------------------------------------------------------
# Steady state: the address table is built once per set of tensors; no sync, no host tensor
# ---------------------------------------------------------------------------------------------
# a LeNet-like parameter set, smaller (the interpreter runs every element)
NET_SHAPES = [(6, 1, 5, 5), (6,), (16, 6, 3, 3), (16,), (48, 64), (48,), (10, 48), (10,)]


class _BuildCounter:
    def __init__(self, build):
        self.build, self.count = build, 0

    def __call__(self, *args, **kwargs):
        self.count += 1
        return self.build(*args, **kwargs)


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("scaler", [False, True], ids=["plain", "grad-scaler"])
@pytest.mark.parametrize("cls,options", [("SGD", dict(lr=0.01, momentum=0.9)), ("AdamW", dict(lr=1e-3))])
def test_steady_state_step_reuses_its_table_and_never_syncs(monkeypatch, cls, options, scaler, tensor_lr):
    """A LeNet-like parameter set: after the steps that create state, a step builds no table, makes no
    host tensor and no host sync (counted in our code, the custom op's and torch.optim's). A
    changed set (a param moved to new storage) gets exactly one new table.

    The table holds the gradients' addresses too, so the steady state assumes each step's gradients
    sit where the last step's did: backward accumulating into kept .grad tensors, or CUDA's caching
    allocator handing a steady training loop the same blocks again (new storage costs one table)."""
    builds = _BuildCounter(optim_ops._build_table)
    monkeypatch.setattr(optim_ops, "_build_table", builds)
    monkeypatch.setattr(optim_ops, "_TABLES", optim_ops.OrderedDict())
    dev = device_for("triton")
    params = _params([torch.randn(s, device=dev) * 0.1 for s in NET_SHAPES])
    if tensor_lr:  # on the params' device, as torch's fused optimizers take it
        options = dict(options, lr=torch.tensor(options["lr"], device=dev))
    opt = getattr(tkernels.optim, cls)(params, **options)
    if scaler:  # what GradScaler.step hands the optimizer: device tensors
        opt.grad_scale = torch.full((), 256.0, device=dev)
        opt.found_inf = torch.zeros((), device=dev)

    def step():
        for p in params:
            if p.grad is None:
                p.grad = torch.randn_like(p)
            else:
                p.grad.normal_()
        opt.step()

    with tkernels.use_backend("triton"):
        step()
        step()  # SGD's first-step flags are gone from here on
        warm = builds.count
        with HostSyncCounter() as counter:
            step()
            step()
        assert counter.calls == [], "steady-state step:\n" + counter.report()
        assert builds.count == warm, "the table was rebuilt for an unchanged parameter set"
        params[4].data = params[4].data.clone()  # new storage: a new address in the table
        step()
        assert builds.count == warm + 1
        step()
        assert builds.count == warm + 1
    assert all(torch.isfinite(p).all() for p in params)


def test_table_follows_a_param_moved_to_new_storage():
    """Cached tables never point at stale storage: a param replaced between steps is updated in its
    new storage, like torch's, and the old storage is left alone."""
    dev = device_for("triton")
    initial = [torch.randn(s, device=dev) for s in ((5,), (3, 4))]
    gradients = _gradients(4, torch.float32, dev, [(5,), (3, 4)])
    ours, twins = _params(initial), _params(initial)
    opt, ref_opt = tkernels.optim.AdamW(ours, lr=0.01), torch.optim.AdamW(twins, lr=0.01)
    for k, grads in enumerate(gradients):
        if k == 2:
            old = ours[1].data
            kept = old.clone()
            ours[1].data = old.clone()
            twins[1].data = twins[1].data.clone()
        _train(opt, ours, [grads], "triton")
        _train(ref_opt, twins, [grads])
    assert torch.equal(old, kept), "a stale table wrote into a param's old storage"
    for p, q in zip(ours, twins):
        assert_close(p, q)


# ---------------------------------------------------------------------------------------------
# Bad hyperparameters and bad input
# ---------------------------------------------------------------------------------------------
BAD = [
    ("SGD", dict(lr=-0.1)), ("SGD", dict(lr=0.1, momentum=-0.5)), ("SGD", dict(lr=0.1, weight_decay=-1.0)),
    ("SGD", dict(lr=0.1, nesterov=True)), ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)),
    ("SGD", dict(lr=torch.tensor([0.1, 0.2]))),
    ("AdamW", dict(lr=-1e-3)), ("AdamW", dict(eps=-1e-8)), ("AdamW", dict(betas=(1.0, 0.999))),
    ("AdamW", dict(betas=(0.9, -0.1))), ("AdamW", dict(weight_decay=-0.01)),
    ("AdamW", dict(lr=torch.tensor([0.1, 0.2]))),
]


@pytest.mark.parametrize("name,options", BAD, ids=[f"{n}-{list(o)[-1]}" for n, o in BAD])
def test_bad_hyperparameters_raise_like_torch(name, options):
    with pytest.raises(ValueError):
        getattr(torch.optim, name)([torch.nn.Parameter(torch.randn(3))], **options)
    with pytest.raises(ValueError, match=name):
        getattr(tkernels.optim, name)([torch.nn.Parameter(torch.randn(3))], **options)


def test_defaults_match_torch():
    import inspect
    for name in ("SGD", "AdamW"):
        ours = inspect.signature(getattr(tkernels.optim, name)).parameters
        theirs = inspect.signature(getattr(torch.optim, name)).parameters
        for arg, parameter in ours.items():
            assert parameter.default == theirs[arg].default, f"{name}({arg}=...) default"
            assert parameter.kind == theirs[arg].kind


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], {id(p): dict(s) for p, s in opt.state.items()}


@pytest.mark.parametrize("cls", ["SGD", "AdamW"])
def test_bad_input_raises_before_anything_moves(backend, cls):
    dev = device_for(backend)
    good = _params([torch.randn(5, device=dev), torch.randn(3, device=dev)])
    sparse = torch.nn.Parameter(torch.randn(4, 2, device=dev))
    opt = getattr(tkernels.optim, cls)([{"params": good}, {"params": [sparse]}], lr=0.1, weight_decay=0.1)
    for p in good:
        p.grad = torch.randn_like(p)
    sparse.grad = torch.randn(4, 2, device=dev).to_sparse()
    before, _ = _snapshot(opt, good + [sparse])
    with tkernels.use_backend(backend), pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, good + [sparse]))
    assert len(opt.state) == 0


@pytest.mark.parametrize("cls", ["SGD", "AdamW"])
def test_triton_refuses_float64(cls):
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.float64, device=device_for("triton")))
    q = torch.nn.Parameter(torch.randn(4, device=device_for("triton")))
    opt = getattr(tkernels.optim, cls)([q, p], lr=0.1, momentum=0.9) if cls == "SGD" else \
        getattr(tkernels.optim, cls)([q, p], lr=0.1)
    p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
    before = q.detach().clone()
    with tkernels.use_backend("triton"), pytest.raises(RuntimeError, match="float64"):
        opt.step()
    assert torch.equal(q, before) and len(opt.state) == 0


def test_state_of_wrong_shape_raises():
    p = torch.nn.Parameter(torch.randn(4))
    opt = tkernels.optim.SGD([p], lr=0.1, momentum=0.9)
    opt.state[p]["momentum_buffer"] = torch.zeros(5)
    p.grad = torch.randn(4)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="momentum_buffer of param 0 is \\(5,\\)"):
        opt.step()
    assert torch.equal(p, before)


# ---------------------------------------------------------------------------------------------
# torch.library and torch.compile
# ---------------------------------------------------------------------------------------------
def _op_samples(dev, amsgrad=False):
    params = [torch.randn(3, device=dev), torch.randn(2, 5, device=dev)]
    grads = [torch.randn_like(p) for p in params]
    return params, grads


def test_opcheck(backend):
    dev = device_for(backend)
    with tkernels.use_backend(backend):
        params, grads = _op_samples(dev)
        bufs = [torch.randn_like(p) for p in params]
        torch.library.opcheck(torch.ops.tkernels.sgd_step.default,
                              (params, grads, bufs, [False, True], 0.1, 0.9, 0.1, 0.01, False, True))
        torch.library.opcheck(torch.ops.tkernels.sgd_step.default,
                              (params, grads, [], [], 0.1, 0.0, 0.0, 0.0, False, False))
        states = [[torch.rand_like(p) for p in params] for _ in range(3)]
        steps = [torch.tensor(3.0, device=dev), torch.tensor(1.0, device=dev)]
        torch.library.opcheck(torch.ops.tkernels.adamw_step.default,
                              (params, grads, *states, steps, 0.01, 0.9, 0.999, 1e-8, 0.01, True, False))
        # under a GradScaler (one step taken, one skipped) and with a tensor lr
        scale, lr = torch.tensor(8.0, device=dev), torch.tensor(0.05, device=dev)
        for found in (0.0, 1.0):
            found_inf = torch.tensor(found, device=dev)
            torch.library.opcheck(torch.ops.tkernels.sgd_step.default,
                                  (params, grads, bufs, [False, True], 0.0, 0.9, 0.1, 0.01, False, True, scale,
                                   found_inf, lr))
            torch.library.opcheck(torch.ops.tkernels.adamw_step.default,
                                  (params, grads, *states, steps, 0.0, 0.9, 0.999, 1e-8, 0.01, True, False, scale,
                                   found_inf, lr))


@pytest.mark.slow
def test_torch_compile_fullgraph(backend):
    dev = device_for(backend)
    initial = [torch.randn(s, device=dev) for s in ((3,), (2, 5))]
    gradients = [[torch.randn(s, device=dev) for s in ((3,), (2, 5))] for _ in range(2)]
    with tkernels.use_backend(backend):
        for ours_cls, torch_cls in ((tkernels.optim.SGD, torch.optim.SGD), (tkernels.optim.AdamW, torch.optim.AdamW)):
            torch._dynamo.reset()
            params, twins = _params(initial), _params(initial)
            kwargs = dict(momentum=0.9) if torch_cls is torch.optim.SGD else {}
            opt = ours_cls(params, lr=0.05, **kwargs)
            opt.grad_scale, opt.found_inf = torch.tensor(4.0, device=dev), torch.tensor(0.0, device=dev)
            step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
            for grads in gradients:
                for p, g in zip(params, grads):
                    p.grad = g.clone() * 4.0  # as GradScaler scales it; the step unscales
                step()
            _train(torch_cls(twins, lr=0.05, **kwargs), twins, gradients)
            for p, q in zip(params, twins):
                assert_close(p, q)
            # the independent reference: the NumPy backend, in float64
            params64 = [p.detach().cpu().double().requires_grad_() for p in initial]
            with tkernels.use_backend("numpy"):
                _train(ours_cls(params64, lr=0.05, **kwargs), params64,
                       [[g.cpu().double() for g in grads] for grads in gradients])
            for p, q in zip(params, params64):
                assert_close(p, q, dtype=torch.float32)
