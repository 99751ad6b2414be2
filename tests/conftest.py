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
