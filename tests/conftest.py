"""Test set-up shared by every family.

* On a machine without a GPU (the default, and CI), TRITON_INTERPRET=1 is set *before*
  tkernels is imported, so the Triton kernels run on CPU tensors through the interpreter.
  With TKERNELS_TEST_DEVICE=cuda (benchmarks/gpu_check.sh) the kernels run compiled on CUDA.
* Uninitialised memory is filled with NaN (torch's deterministic mode), so an output element a
  kernel forgets to write shows up as NaN instead of passing by luck.
"""
import os
import warnings

if os.environ.get("TKERNELS_TEST_DEVICE", "cpu") != "cuda":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import tkernels  # noqa: E402,F401

import helpers  # noqa: E402
from launches import Launches, install_mutant  # noqa: E402

MUTANT = install_mutant()  # None unless benchmarks/mutation_check.py asked for one
LAUNCH_LOG = os.environ.get("TKERNELS_LAUNCH_LOG")  # mutation_check.py: which test launches which kernel


@pytest.fixture(autouse=True)
def _nan_filled_empty_and_seed():
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    torch.manual_seed(0)
    with warnings.catch_warnings():
        # the interpreter evaluates exp() of large arguments in NumPy (sigmoid's saturated tail)
        warnings.filterwarnings("ignore", message="overflow encountered", category=RuntimeWarning)
        yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@pytest.fixture(params=["numpy", "triton"])
def backend(request):
    """Run the test body once per backend, with that backend forced."""
    with tkernels.use_backend(request.param):
        yield request.param


@pytest.fixture(scope="module")
def one_cpu_thread():
    """One torch and one BLAS thread for a module of tiny-tensor tests (threadpoolctl ships with
    scikit-learn, a dependency)."""
    import threadpoolctl

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        yield
    torch.set_num_threads(previous)


def pytest_report_header(config):
    return f"tkernels mutant: {MUTANT}" if MUTANT else None


@pytest.fixture(autouse=True)
def launches(monkeypatch, request):
    """The Triton kernels this test launched (tests/launches.py); every test gets a fresh record."""
    record = Launches().install(monkeypatch)
    helpers.COMPARISONS[0] = 0
    helpers.LAUNCHES[0] = record
    yield record
    if LAUNCH_LOG:
        with open(LAUNCH_LOG, "a") as log:
            log.write(f"{request.node.nodeid}\t{','.join(sorted(set(record.names)))}\n")


# The op family each test module checks: the kernel modules its Triton-backend tests must launch.
FAMILIES = {
    "test_activations": ("elementwise",),
    "test_linear": ("matmul", "linear"),
    "test_conv": ("conv", "conv_backward", "matmul"),  # 1x1 channels_last convs are one matmul
    "test_batch_norm": ("batch_norm_kernels",),
    "test_sync_batch_norm": ("batch_norm_kernels",),
    "test_pooling": ("pooling", "avg_pooling"),
    "test_softmax": ("softmax",),
    "test_losses": ("losses", "mse"),
    "test_dropout": ("dropout",),
    "test_optim": ("optim",),
}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A Triton-backend test that compared results must have launched its family's kernels, so
    a kernel replaced by torch (right values, no launch) fails. Tests name the exact kernels
    with `launches.assert_ran(...)` where a family has several."""
    result = yield
    record = item.funcargs.get("launches")
    params = getattr(getattr(item, "callspec", None), "params", {})
    family = FAMILIES.get(item.module.__name__.rpartition(".")[2])
    if record is not None and params.get("backend") == "triton" and family and helpers.COMPARISONS[0]:
        record.assert_any_module([f"tkernels.ops.{m}" for m in family], "family")
    return result
