"""BatchNorm1d / BatchNorm2d / SyncBatchNorm: torch's classes (same constructor arguments,
state_dict keys, momentum=None cumulative average, num_batches_tracked, affine and
track_running_stats switches) whose forward and backward are the tkernels kernels, with an
optional fused activation after the affine step.

SyncBatchNorm merges statistics across processes with torch.distributed: each process computes
its per-channel (count, mean, M2) with the kernels, the stats are all-gathered, and the same
combine kernel merges them with Chan's parallel formula (stable, unlike summing x and x^2).
In backward the two per-channel sums that dx needs are all-reduced; dweight/dbias stay local, as
in torch (data parallelism then reduces them like any other gradient).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..activations import ActivationLike, resolve_activation
from ..ops import batch_norm as bn_ops


def _bias_kwargs(bias: bool) -> dict:
    # torch added the `bias` switch to the norm layers after 2.4: only pass it when it matters.
    return {} if bias else {"bias": False}


class _BatchNormMixin:
    """The forward of torch's ``_BatchNorm`` (buffers, momentum, training/eval choices) calling the
    tkernels batch norm; subclasses choose how a training batch is normalised (``_normalize``)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 activation: ActivationLike = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **_bias_kwargs(bias))
        self.activation = resolve_activation(activation)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # (each parameter and buffer read once: every read goes through Module.__getattr__)
        training, weight, bias = self.training, self.weight, self.bias
        running_mean, running_var = self.running_mean, self.running_var
        bn_training = training or (running_mean is None and running_var is None)
        # Buffers are passed only to be updated (training, tracked) or to normalise (eval).
        if training and not self.track_running_stats:
            running_mean = running_var = None
        # Check before num_batches_tracked moves: bad input must leave the module untouched.
        bn_ops.validate(input, running_mean, running_var, weight, bias, bn_training, 0.0, self.eps,
                        single_value_ok=self._single_value_ok())
        factor = 0.0 if self.momentum is None else self.momentum
        if training and self.track_running_stats:
            batches = self.num_batches_tracked
            if batches is not None:
                batches.add_(1)
                factor = 1.0 / float(batches) if self.momentum is None else self.momentum
        return self._normalize(input, running_mean, running_var, weight, bias, bn_training, factor)

    def _single_value_ok(self) -> bool:
        return False

    def _normalize(self, input: Tensor, running_mean, running_var, weight, bias, bn_training: bool,
                   factor: float) -> Tensor:
        return bn_ops.batch_norm_validated(input, running_mean, running_var, weight, bias, bn_training, factor,
                                           self.eps, activation=self.activation)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.activation.is_identity else f"{text}, activation={self.activation}"


class BatchNorm1d(_BatchNormMixin, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on (N, C) or (N, C, L) input, with an optional fused activation."""


class BatchNorm2d(_BatchNormMixin, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on (N, C, H, W) input (any layout), with an optional fused activation."""


class SyncBatchNorm(_BatchNormMixin, torch.nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm``: training statistics over every process of ``process_group``.

    Unlike torch's, it runs on any device the kernels run on (CPU with gloo included); without
    an initialised process group, or with one process, it is a plain batch norm.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Optional[Any] = None, device=None, dtype=None, *,
                 bias: bool = True, activation: ActivationLike = None) -> None:
        torch.nn.SyncBatchNorm.__init__(self, num_features, eps, momentum, affine, track_running_stats,
                                        process_group, device=device, dtype=dtype, **_bias_kwargs(bias))
        self.activation = resolve_activation(activation)

    def _group(self):
        """(process group, world size) when this batch must be synchronised, else None."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        world = dist.get_world_size(group)
        return (group, world) if world > 1 else None

    def _single_value_ok(self) -> bool:
        return self._group() is not None  # one value here may be many across processes, as in torch

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        return super().forward(input)

    def _normalize(self, input: Tensor, running_mean, running_var, weight, bias, bn_training: bool,
                   factor: float) -> Tensor:
        sync = self._group() if bn_training else None
        if sync is None:
            return super()._normalize(input, running_mean, running_var, weight, bias, bn_training, factor)
        group, world = sync
        return SyncBatchNormFunction.apply(input, weight, bias, running_mean, running_var, self.eps, factor,
                                           self.activation.name, self.activation.param, group, world)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group: Optional[Any] = None) -> torch.nn.Module:
        """Like torch's: every ``BatchNorm*d`` (torch's or tkernels') in ``module`` becomes a tkernels
        SyncBatchNorm sharing its parameters and buffers; a fused activation is kept."""
        output = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            output = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                         process_group, bias=module.bias is not None or not module.affine,
                         activation=getattr(module, "activation", None))
            if module.affine:
                with torch.no_grad():
                    output.weight = module.weight
                    output.bias = module.bias
            output.running_mean = module.running_mean
            output.running_var = module.running_var
            output.num_batches_tracked = module.num_batches_tracked
            output.training = module.training
            if hasattr(module, "qconfig"):
                output.qconfig = module.qconfig
        for name, child in module.named_children():
            output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return output


class SyncBatchNormFunction(torch.autograd.Function):
    """Training batch norm over all processes of a group: kernels per process, collectives between."""

    @staticmethod
    def forward(ctx, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], eps: float, momentum: float, activation: str, param: float,
                process_group, world_size: int):
        local = bn_ops.batch_norm_stats(input, None, None, 0.0, eps)
        # all_gather, not all_reduce: (count, mean, M2) triples merge by Chan's formula, not by a sum
        parts = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(parts, local, group=process_group)
        stats = bn_ops.batch_norm_gather_stats(torch.stack(parts), running_mean, running_var, momentum,
                                               eps)
        y = bn_ops.batch_norm_apply(input, stats, weight, bias, None, None, True, eps, activation, param)
        ctx.save_for_backward(input, weight, bias, stats)
        ctx.bn_config = (True, eps, activation, param)
        ctx.process_group = process_group
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        input, weight, bias, stats = ctx.saved_tensors

        def all_reduce(sums: Tensor) -> Tensor:
            dist.all_reduce(sums, group=ctx.process_group)
            return sums

        dx, dw, db = bn_ops.backward(ctx, grad, input, weight, bias, stats, None, None, reduce_hook=all_reduce)
        return dx, dw, db, None, None, None, None, None, None, None, None
