"""README.md's promises a CPU user meets first: the CPU variant of the 30-second example runs as written."""
import re
from pathlib import Path

import tkernels

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def python_block_after(marker: str) -> str:
    start = README.index(marker)
    return re.search(r"```python\n(.*?)```", README[start:], re.S).group(1)


def test_cpu_variant_of_the_30_second_example_runs():
    code = python_block_after("Without a GPU, keep the tensors on the CPU")
    assert "cuda" not in code
    namespace = {}
    with tkernels.use_backend("numpy"):  # what a CPU user without TRITON_INTERPRET gets
        exec(compile(code, "README.md", "exec"), namespace)
    layer = namespace["layer"]
    assert namespace["y"].shape == (64, 256) and layer.weight.grad is not None and layer.bias.grad is not None
