"""EA: Embedding Assistant (TransKD-EA).

An extra overlapping patch embedding per stage maps what the student's stage i consumes
(the image for stage 1, the student's stage-(i−1) map otherwise) straight to the teacher's
width, beside the PEA-aligned student embedding::

    EA_i(u) = LayerNorm(Conv2d(C_in, C_teacher_i, k, stride s, pad k // 2)(u)) as tokens [B, N_i, C_teacher_i]
        (k, s) = (7, 4) for stage 1, (3, 2) after — the student's own patch-embedding geometry,
        so N_i matches the student's (and the teacher's) tokens
    embed_i = w_i · PEA_i(e_s_i) + w_{i+4} · EA_i(input_i)          8 scalars w_j = 0.1 · (j + 1)
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from transkd_fast.models.mit import OverlapPatchEmbed, init_nvlabs_


class EmbeddingAssistant(nn.Module):
    """The per-stage assistant embeddings and the 8 fusion scalars of TransKD-EA.

    ``student_channels`` / ``teacher_channels``: per-stage widths, shallow → deep.
    ``embeds[i]`` (MiT's ``OverlapPatchEmbed``: conv + LayerNorm, eps 1e-5) maps stage i's input
    (3 image channels, then ``student_channels[i-1]``) to ``teacher_channels[i]``; initialized as
    the original's (which applies its ``_init_weights``): conv weight ~ N(0, sqrt(2 / (k·k·C_out))),
    biases 0, LayerNorm (1, 0). ``fuse_weights[j]``, j = 0..2n−1, start at ``0.1·(j+1)`` as in the
    original: ``fuse_weights[i]`` scales the PEA term of stage i, ``fuse_weights[i+n]`` the EA term.
    """

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int],
                 in_channels: int = 3) -> None:
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise ValueError(f"EmbeddingAssistant: student has {len(student_channels)} stages, teacher "
                             f"{len(teacher_channels)}; they must match")
        n = len(student_channels)
        inputs = [in_channels, *student_channels[:-1]]
        self.embeds = nn.ModuleList(
            OverlapPatchEmbed(cin, ct, patch_size=7 if i == 0 else 3, stride=4 if i == 0 else 2)
            for i, (cin, ct) in enumerate(zip(inputs, teacher_channels))
        )
        self.embeds.apply(init_nvlabs_)
        self.fuse_weights = nn.ParameterList(nn.Parameter(torch.full((1,), 0.1 * (j + 1))) for j in range(2 * n))

    def forward(self, images: torch.Tensor, student_feats: Sequence[torch.Tensor],
                aligned_embeds: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``images`` ``[B, 3, H, W]``; ``student_feats`` the student's stage maps (NCHW, shallow → deep);
        ``aligned_embeds`` = PEA_i(e_s_i) ``[B, N_i, C_teacher_i]``. Returns the fused embeddings."""
        n = len(self.embeds)
        if len(student_feats) != n or len(aligned_embeds) != n:
            raise ValueError(f"EmbeddingAssistant expects {n} stage maps and {n} embeddings, got "
                             f"{len(student_feats)} and {len(aligned_embeds)}")
        inputs = [images, *student_feats[:-1]]
        out = []
        for i in range(n):
            assist = self.embeds[i](inputs[i])[0]
            if assist.shape != aligned_embeds[i].shape:
                raise ValueError(f"EmbeddingAssistant stage {i + 1}: assistant tokens {tuple(assist.shape)} do not "
                                 f"match the aligned student embedding {tuple(aligned_embeds[i].shape)}")
            out.append(self.fuse_weights[i] * aligned_embeds[i] + self.fuse_weights[i + n] * assist)
        return out
