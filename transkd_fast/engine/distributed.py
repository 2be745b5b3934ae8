"""Process-group set-up for ``torchrun`` and a BatchNorm that synchronizes on CPU too.

``torch.nn.SyncBatchNorm`` refuses CPU tensors ("expected input tensor to be on GPU"), so
under gloo every ``BatchNorm*d`` is replaced by :class:`GlobalBatchNorm`, which computes
the batch statistics over all ranks with differentiable all-reduces
(``torch.distributed.nn.functional.all_reduce``: its backward all-reduces the gradients,
so each rank gets d(Σ_ranks loss)/dx). With it, W ranks with local batch B/W compute
the same normalization as one rank with batch B. On CUDA, ``torch.nn.SyncBatchNorm``.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment (0, 0, 1 without it)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the torchrun process group if there is one; returns (rank, world_size)."""
    rank, _local, world = env_world()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        t = t.clone()
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are taken over every rank's batch (any device).

    mean = Σ_ranks Σ x / N,  var = Σ_ranks Σ (x − mean)² / N  (two passes, as BatchNorm),
    running_var updated with the unbiased N/(N−1) factor, as BatchNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        n = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device)
        n = all_reduce_sum(n).item()
        xf = x.float()
        mean = all_reduce(xf.sum(dims)) / n
        var = all_reduce(((xf - mean.view(shape)) ** 2).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    def _check_input_dim(self, x):  # any BatchNorm{1,2,3}d input
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm*d → synchronized BatchNorm (torch's on CUDA, :class:`GlobalBatchNorm` else)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_global(module)


def _convert_global(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _convert_global(child))
    return out
