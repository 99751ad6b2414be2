from torch import nn

IMPLS = ("tkernels", "torch")


def finish(model: nn.Module, impl: str) -> None:
    """Turn a model written in plain torch.nn into tkernels layers (in place) unless impl='torch'."""
    if impl not in IMPLS:
        raise ValueError(f"{type(model).__name__}: impl must be one of {', '.join(IMPLS)}, but got {impl!r}")
    if impl == "tkernels":
        from ..nn import convert

        convert(model, fuse=True)
