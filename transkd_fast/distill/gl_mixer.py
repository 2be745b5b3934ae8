"""GL-Mixer: global + local token mixing of the student's last-stage patch embedding (TransKD-GL).

On the stage-4 embedding ``e`` ``[B, N, C]``::

    global = proj(MHSA(e))          qkv = Linear(C, 3C, no bias), heads h, scale (C/h)^-0.5
    local  = (Conv1d_1(eᵀ) · sigmoid(Conv1d_2(eᵀ)))ᵀ      Conv1d(C, C, 3, pad 1) over the token axis (a GLU)
    mixed  = α · global + β · local  (+ e when ``residual``)

then PEA aligns ``mixed`` to the teacher's width. The tokens are in row-major (H, W) order,
so the 1-D convolution mixes horizontal neighbours (and wraps rows), as the original does.
"""

from __future__ import annotations

import torch
from torch import nn

from transkd_fast.ops.attention import efficient_attention


class GLMixer(nn.Module):
    """Global (multi-head self-attention) + local (GLU over tokens) mixer.

    ``dim``: embedding width C (256 for B0's stage 4); ``num_heads`` (8 in the original).
    ``residual``: add ``e`` to the mix (the original's ``--add``, off by default).

    α (``alpha``) and β (``beta``) are scalar parameters. The original allocates them with
    ``torch.FloatTensor(1)`` and never initializes them (whatever the allocator left there).
    Here they start at ``alpha_init = beta_init = 1.0``: the mixer starts as the plain sum of
    the two branches, each at full scale, so both branches and both scalars get a gradient
    from the first step and runs are reproducible.

    Other initializations as the original: PyTorch's defaults (its attention defines a
    truncated-normal ``_init_weights`` but never applies it). The attention's ``qkv`` has no
    bias (``qkv_bias=False`` in the original), ``proj`` has one.
    """

    def __init__(self, dim: int, num_heads: int = 8, residual: bool = False,
                 alpha_init: float = 1.0, beta_init: float = 1.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"GLMixer: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.residual = dim, num_heads, residual
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.conv1 = nn.Conv1d(dim, dim, kernel_size=3, stride=1, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=1, padding=1)
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))
        self.beta = nn.Parameter(torch.full((1,), float(beta_init)))

    def global_mix(self, e: torch.Tensor) -> torch.Tensor:
        B, N, C = e.shape
        # q, k, v as strided views of the qkv output, in the [B, N, heads, head_dim] layout.
        qkv = self.qkv(e).view(B, N, 3, self.num_heads, C // self.num_heads)
        out = efficient_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return self.proj(out.reshape(B, N, C))

    def local_mix(self, e: torch.Tensor) -> torch.Tensor:
        et = e.transpose(1, 2)
        return (self.conv1(et) * torch.sigmoid(self.conv2(et))).transpose(1, 2)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        """``e`` ``[B, N, C]`` → mixed ``[B, N, C]``."""
        if e.dim() != 3 or e.shape[-1] != self.dim:
            raise ValueError(f"GLMixer expects [B, N, {self.dim}] embeddings, got shape {tuple(e.shape)}")
        mixed = self.alpha * self.global_mix(e) + self.beta * self.local_mix(e)
        return mixed + e if self.residual else mixed
