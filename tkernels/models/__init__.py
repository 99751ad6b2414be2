"""Reference models for 8x8 digit images (scikit-learn's digits), built from tkernels.nn.

Each architecture is written once in plain ``torch.nn`` and turned into tkernels layers with
fused activations by :func:`tkernels.nn.convert`; ``impl="torch"`` keeps the plain-torch twin
(same layers, same state_dict keys, same initialisation for a given seed), which is what
``tkernels train --compare`` trains alongside.
"""
from __future__ import annotations

from torch import nn

from .mlp import MLP
from .lenet import LeNet
from .resnet import BasicBlock, ResNet

MODELS = {"mlp": MLP, "lenet": LeNet, "resnet": ResNet}

__all__ = ["MLP", "LeNet", "ResNet", "BasicBlock", "MODELS", "build_model"]


def build_model(name: str, num_classes: int = 10, *, impl: str = "tkernels") -> nn.Module:
    """``build_model("lenet")``: a reference model by its name (mlp, lenet or resnet)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes, impl=impl)
