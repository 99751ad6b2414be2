"""DistributedDataParallel that accepts tkernels' SyncBatchNorm on CPU processes.

torch's DDP refuses every ``nn.SyncBatchNorm`` in a CPU module because torch's own SyncBatchNorm
needs a GPU. tkernels' SyncBatchNorm (a subclass, so the check catches it) runs over gloo on CPU
too, so the check is kept for torch's class only. Everything else is torch's DDP unchanged.
"""
import torch

from .batchnorm import SyncBatchNorm


class DistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    def _passing_sync_batchnorm_handle(self, module):
        if any(isinstance(m, torch.nn.SyncBatchNorm) and not isinstance(m, SyncBatchNorm) for m in module.modules()):
            super()._passing_sync_batchnorm_handle(module)
