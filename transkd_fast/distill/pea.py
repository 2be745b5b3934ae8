"""PEA: Patch Embedding Alignment (TransKD).

Per stage i, a Linear ``C_student_i → C_teacher_i`` on the student's patch embedding
``[B, N_i, C_student_i]`` (the tokens right after the stage's overlapping patch embedding),
so that it can be compared with the teacher's ``[B, N_i, C_teacher_i]`` by MSE.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


class NoProjection(nn.Module):
    """Placeholder of a stage PEA does not align (``stages`` leaves it out): no parameters."""

    def __init__(self, stage: int) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, embed: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"PEA has no projection for stage {self.stage + 1} (it was built for other stages)")

    def extra_repr(self) -> str:
        return f"stage={self.stage + 1}"


class PEA(nn.Module):
    """One ``nn.Linear(C_student_i, C_teacher_i)`` (with bias) per aligned stage.

    ``stages``: the 0-based stages to align (default: all). ``proj[i]`` maps stage i; a stage left
    out holds a parameter-free :class:`NoProjection`, so that the kept stages' tensors are named
    ``proj.{i}.*`` whatever the selection (the names of the all-stage PEA and of the original's
    checkpoints, see :mod:`transkd_fast.distill.original`).

    Initialization as the original: PyTorch's default ``nn.Linear`` init (the original's
    ``embed{i}_linearproject`` are plain Linears never re-initialized), created in stage order.
    """

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int],
                 stages: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise ValueError(f"PEA: student has {len(student_channels)} stages, teacher "
                             f"{len(teacher_channels)}; they must match")
        n = len(student_channels)
        chosen = tuple(range(n)) if stages is None else tuple(int(i) for i in stages)
        if not chosen or len(set(chosen)) != len(chosen) or not all(0 <= i < n for i in chosen):
            raise ValueError(f"PEA stages must be distinct 0-based indices below {n}, got {stages!r}")
        self.stages = tuple(sorted(chosen))
        self.proj = nn.ModuleList(nn.Linear(cs, ct) if i in self.stages else NoProjection(i)
                                  for i, (cs, ct) in enumerate(zip(student_channels, teacher_channels)))

    def forward_stage(self, i: int, embed: torch.Tensor) -> torch.Tensor:
        """Align stage ``i``: ``[B, N, C_student_i]`` → ``[B, N, C_teacher_i]``."""
        return self.proj[i](embed)

    def forward(self, embeds: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """All n stage embeddings in; the aligned ones of :attr:`stages` out, in stage order."""
        if len(embeds) != len(self.proj):
            raise ValueError(f"PEA expects {len(self.proj)} patch embeddings, got {len(embeds)}")
        return [self.proj[i](embeds[i]) for i in self.stages]
