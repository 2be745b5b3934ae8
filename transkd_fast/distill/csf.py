"""CSF: Cross Selective Fusion of the student's stage maps (TransKD; the original calls it SK).

The student's stage maps are walked from the deepest to the shallowest. Per stage i with
student channels ``C_i``, ``mid`` channels (64) and squeeze width ``L = max(mid // 16, 32)``::

    x = BN(Conv1x1(C_i → mid, no bias)(feat_i))                       [B, mid, H_i, W_i]
    if not deepest:
        g = mean_hw(x + up(y))                  y = res_{i+1}, up = legacy nearest   [B, mid]
        z = ReLU(BN(W_fc g))                    batch size 1: z = ReLU(W_fc1 g)      [B, L]
        a = softmax_over_branches([W_0 z + b_0, W_1 z + b_1])                      [B, 2, mid]
        x = a0 · x + a1 · up(y)
    out_i = BN(Conv3x3(mid → C_teacher_i, pad 1, no bias)(x));  res_i = x

The two passes over the ``[B, mid, H, W]`` maps are the fused ops
:func:`~transkd_fast.ops.selective_fusion.selective_pool` and
:func:`~transkd_fast.ops.selective_fusion.selective_fuse`: neither ``up(y)`` nor the stacked
``[B, 2, mid, H, W]`` tensors of the original are materialized.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from transkd_fast.backend import hooks_registered
from transkd_fast.ops.selective_fusion import selective_fuse, selective_pool


class CSFStage(nn.Module):
    """One stage of CSF (the original ``SK`` block).

    ``conv1``: 1×1 conv (no bias) + BN, student channels → ``mid``. ``conv2``: 3×3 conv (no
    bias) + BN, ``mid`` → teacher channels. With ``fuse`` (every stage but the deepest) the
    squeeze MLP ``fc`` (1×1 conv no bias + BN + ReLU) and the two excitation convs ``fcs``
    (1×1 with bias) give per-channel branch weights.

    Batch-size-1 path, kept from the original: BatchNorm over a batch of one pooled vector is
    undefined in training, so with ``B == 1`` the squeeze MLP is ``fc1`` = 1×1 conv (no bias)
    + ReLU, *without* BN, a separate set of weights from ``fc`` (the original has both and picks
    by batch size, in training and evaluation alike). Only one of ``fc``/``fc1`` gets a gradient
    in a given step. The batch size that decides is the *global* one: ``data_parallel_size``
    (set by the trainer to the DDP world size; each rank holds an equal share) times the local
    batch, so 2 ranks × 1 image take the BN branch as 1 rank × 2 images does (its BatchNorm
    synchronized across ranks).

    Initialization as the original: ``conv1`` and ``conv2`` weights ``kaiming_uniform_(a=1)``;
    everything else keeps PyTorch's default init.

    Names follow the original's module names (``conv1``, ``conv2``, ``fc``, ``fc1``, ``fcs``) so
    its checkpoints map one-to-one.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool,
                 squeeze_min: int = 32, reduction: int = 16) -> None:
        super().__init__()
        squeeze = max(mid_channels // reduction, squeeze_min)
        self.fuse = fuse
        self.mid_channels = mid_channels
        self.data_parallel_size = 1  # ranks the batch is split over (the branch follows the global batch)
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid_channels),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        if fuse:
            self.fc = nn.Sequential(
                nn.Conv2d(mid_channels, squeeze, kernel_size=1, bias=False),
                nn.BatchNorm2d(squeeze),
                nn.ReLU(inplace=True),
            )
            self.fc1 = nn.Sequential(
                nn.Conv2d(mid_channels, squeeze, kernel_size=1, bias=False),
                nn.ReLU(inplace=True),
            )
            self.fcs = nn.ModuleList([nn.Conv2d(squeeze, mid_channels, kernel_size=1) for _ in range(2)])
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def branch_weights(self, g: torch.Tensor) -> torch.Tensor:
        """Squeeze-excite on the pooled map ``g`` ``[B, mid]`` → softmax branch weights ``[B, 2, mid]``.

        The 1×1 convs act on 1×1 maps: they are applied as matmuls with the same weights (as
        module calls when a forward hook is registered on one of them, so that it fires).
        """
        B = g.shape[0] * self.data_parallel_size
        if hooks_registered(*self.fc, *self.fc1, *self.fcs):
            z = (self.fc1 if B == 1 else self.fc)(g[:, :, None, None])
            return torch.stack([fc(z).flatten(1) for fc in self.fcs], dim=1).softmax(dim=1)
        if B == 1:
            conv = self.fc1[0]
            z = F.relu(F.linear(g, conv.weight.flatten(1)))
        else:
            conv, bn = self.fc[0], self.fc[1]
            z = F.linear(g, conv.weight.flatten(1))
            z = F.relu(bn(z[:, :, None, None]).flatten(1))
        logits = torch.stack([F.linear(z, fc.weight.flatten(1), fc.bias) for fc in self.fcs], dim=1)
        return logits.softmax(dim=1)

    def forward(self, feat: torch.Tensor, res_low: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``feat`` ``[B, C_i, H, W]``, ``res_low`` the fused map of the stage below ``[B, mid, h, w]``.

        Returns ``(out [B, C_teacher_i, H, W], res [B, mid, H, W])``.
        """
        x = self.conv1(feat)
        if self.fuse:
            if res_low is None:
                raise ValueError("a fusing CSF stage needs the fused map of the deeper stage (res_low)")
            g = selective_pool(x, res_low)
            a = self.branch_weights(g).to(x.dtype)
            x = selective_fuse(x, res_low, a)
        return self.conv2(x), x


class CSF(nn.Module):
    """Cross Selective Fusion over all stages; see the module docstring for the math.

    ``student_channels`` / ``teacher_channels``: per-stage widths, shallow → deep (B0 → B2:
    ``[32, 64, 160, 256]`` → ``[64, 128, 320, 512]``). ``stages[i]`` handles stage i; the
    deepest stage does not fuse. :meth:`forward` takes the student's stage maps shallow → deep
    and returns the aligned maps shallow → deep, each with the teacher's width and the
    student's spatial size.
    """

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int],
                 mid_channels: int = 64) -> None:
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise ValueError(f"CSF: student has {len(student_channels)} stages, teacher "
                             f"{len(teacher_channels)}; they must match")
        n = len(student_channels)
        self.mid_channels = mid_channels
        self.stages = nn.ModuleList(
            CSFStage(cs, mid_channels, ct, fuse=i < n - 1)
            for i, (cs, ct) in enumerate(zip(student_channels, teacher_channels))
        )

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != len(self.stages):
            raise ValueError(f"CSF expects {len(self.stages)} stage maps, got {len(feats)}")
        outs: list[torch.Tensor] = [None] * len(feats)  # type: ignore[list-item]
        res = None
        for i in reversed(range(len(feats))):
            outs[i], res = self.stages[i](feats[i], res)
        return outs
