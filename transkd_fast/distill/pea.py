"""PEA: Patch Embedding Alignment (TransKD).

Per stage i, a Linear ``C_student_i → C_teacher_i`` on the student's patch embedding
``[B, N_i, C_student_i]`` (the tokens right after the stage's overlapping patch embedding),
so that it can be compared with the teacher's ``[B, N_i, C_teacher_i]`` by MSE.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class PEA(nn.Module):
    """One ``nn.Linear(C_student_i, C_teacher_i)`` (with bias) per stage.

    Initialization as the original: PyTorch's default ``nn.Linear`` init (the original's
    ``embed{i}_linearproject`` are plain Linears never re-initialized). ``proj[i]`` maps stage i.
    """

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int]) -> None:
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise ValueError(f"PEA: student has {len(student_channels)} stages, teacher "
                             f"{len(teacher_channels)}; they must match")
        self.proj = nn.ModuleList(nn.Linear(cs, ct) for cs, ct in zip(student_channels, teacher_channels))

    def forward_stage(self, i: int, embed: torch.Tensor) -> torch.Tensor:
        """Align stage ``i``: ``[B, N, C_student_i]`` → ``[B, N, C_teacher_i]``."""
        return self.proj[i](embed)

    def forward(self, embeds: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(embeds) != len(self.proj):
            raise ValueError(f"PEA expects {len(self.proj)} patch embeddings, got {len(embeds)}")
        return [p(e) for p, e in zip(self.proj, embeds)]
