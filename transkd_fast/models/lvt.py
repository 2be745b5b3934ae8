"""LVT (Lite Vision Transformer, Yang et al., CVPR 2022) with TransKD's SegFormer-style head: the
original TransKD code's third student (``train/models/lvt``, SegFormer-B2 teacher → LVT student).

Parameter names are the original's, so its checkpoints load (:func:`transkd_fast.models.load_pretrained`;
its head sits at the top level there, ``linear_c1`` …, and under ``decode_head.`` here, exactly as
TransKD's flat SegFormer files map onto our SegFormer)::

    backbone.{s}.0            patch embedding of stage s: ``proj`` Conv2d(k7 s4 p3 | k3 s2 p1), ``norm`` LayerNorm
    backbone.{s}.1.{b}        block b of stage s: ``norm1`` → ``attn`` → residual, ``norm2`` → ``mlp`` → residual
    decode_head.linear_c{i}.proj, decode_head.linear_fuse.{conv,bn}, decode_head.linear_pred

The configuration the original's ``lvt`` class fixes (and its TransKD scripts' ``rasa_cfg``):
widths [64, 64, 160, 256], depths [2, 2, 2, 2], heads [2, 2, 5, 8], MLP ratios [4, 8, 4, 4],
depthwise-conv MLPs in stages 2–4, sr [8, 4, 2, 1] (stage 1 ignores it), no qkv bias, LayerNorm eps
1e-5, no stage norms (the original's ``downstream_norms`` are identities), drop path 0 and hence no
head dropout (the original ties the head's Dropout2d to ``drop_path_rate``), decoder width 256.

Stage 1 uses **CSA** (convolutional self-attention, :class:`ConvolutionalSelfAttention`), stages 2–4
**RASA** (recursive atrous self-attention, :class:`RecursiveAtrousSelfAttention`). Per block
(tokens ``x`` ``[B, H, W, C]``)::

    CSA:  a = softmax(scale · attn(avgpool_s(x)))            [B, heads, L, k², k²], L = ⌈H/s⌉·⌈W/s⌉
          v_j = W_j · unfold_k,s(x)_j                       the k² positions j of each window, W_j C×C
          out = proj(fold(a v))                              fold sums overlapping windows back to H×W
    RASA: inner(x) = proj(attention(ds(q(x)), kv(sr(x))))   softmax(q kᵀ · scale) v per head
          ds(q)    = Σ_{d ∈ 1,3,5} SiLU(dwconv3×3_dilation d(q))   one shared depthwise weight
          out      = SiLU(inner(SiLU(inner(x)) + x))          r_num = 2 recursions, shared weights

RASA's attention is the op of :func:`transkd_fast.ops.attention.efficient_attention` (q ``[B, N, H, D]``
and k/v ``[B, Nkv, H, D]`` as strided views of the ``kv`` Linear output). CSA's attention is a
different op (k² × k² weights per window, produced by a Linear, not by q kᵀ): it runs as plain
PyTorch (:func:`csa_aggregate`).

Forward contract (the one of :class:`~transkd_fast.models.segformer.SegFormer`):
``model(x)`` → logits ``[B, K, ⌈H/4⌉, ⌈W/4⌉]``; ``model(x, return_features=True)`` →
``(stage_features, logits, patch_embeddings)``; ``model.backbone(x)`` → ``(stage_features,
patch_embeddings)``. Stage features are NCHW-shaped channels_last tensors; the patch embeddings
are the tokens of each patch-embedding conv **before** its LayerNorm, ``[B, N_i, C_i]``, as the
original returns them (MiT's include the LayerNorm).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from transkd_fast.models.mit import DropPath, init_linear_norm_
from transkd_fast.models.segformer import BackboneHead
from transkd_fast.ops.attention import efficient_attention

# The original's ``lvt`` class (train/models/lvt/backbone.py) and its TransKD scripts' RASA settings.
LVT_CONFIG: dict = {
    "embed_dims": (64, 64, 160, 256),
    "depths": (2, 2, 2, 2),
    "num_heads": (2, 2, 5, 8),
    "mlp_ratios": (4, 8, 4, 4),
    "mlp_depconv": (False, True, True, True),
    "sr_ratios": (8, 4, 2, 1),
    "sa_layers": ("csa", "rasa", "rasa", "rasa"),
    "atrous_rates": (1, 3, 5),
    "recursions": 2,
    "decoder_dim": 256,
}


def _init_conv_fan_out_(conv: nn.Conv2d) -> None:
    """normal(0, sqrt(2 / fan_out)), fan_out = k_h·k_w·out / groups; zero bias (the original's conv init)."""
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _nchw(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, W, C]`` → an NCHW view (channels_last when ``x`` is contiguous)."""
    return x.permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


class LVTPatchEmbed(nn.Module):
    """``proj`` Conv2d(k, stride s, padding k // 2) + ``norm`` LayerNorm over channels.

    ``forward(x)`` with ``x`` NCHW returns ``(tokens [B, H', W', C] after the norm, embedding
    [B, H'·W', C] before it)``."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)
        _init_conv_fan_out_(self.proj)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = _nhwc(self.proj(x))
        B, H, W, C = y.shape
        return self.norm(y), y.reshape(B, H * W, C)


def csa_aggregate(attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """CSA's weighted sum per window: ``attn`` ``[B, heads, L, k², k²]`` @ ``v`` ``[B, heads, L, k², d]``.

    Its own function so that FLOP counting can tell this attention matmul apart (paper convention)."""
    return attn @ v


class ConvolutionalSelfAttention(nn.Module):
    """CSA (LVT stage 1). Parameters as the original: ``attn`` Linear(C, k⁴·heads) (the window
    attention logits from the ``stride``-pooled map), ``weight`` Conv2d(k²C, k²C, 1, groups=k², no bias)
    (one C×C map per window position), ``proj`` Linear(C, C). No parameters in ``pool``.

    Plain PyTorch (not :func:`efficient_attention`: the attention weights come from a Linear, one
    k² × k² matrix per window, not from q kᵀ). The grouped 1×1 conv is applied as a batched matmul
    over the k² positions, with the same weights."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 3, padding: int = 1, stride: int = 2,
                 qk_scale: Optional[float] = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.kernel_size, self.padding, self.stride = kernel_size, padding, stride
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        k2 = kernel_size * kernel_size
        self.attn = nn.Linear(dim, k2 * k2 * num_heads)
        self.pool = nn.AvgPool2d(kernel_size=stride, stride=stride, ceil_mode=True)
        self.weight = nn.Conv2d(k2 * dim, k2 * dim, 1, groups=k2, bias=False)
        nn.init.normal_(self.weight.weight, 0.0, math.sqrt(2.0 / (k2 * dim)))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, H, W, C]`` → ``[B, H, W, C]``."""
        B, H, W, C = x.shape
        k, s, p, heads = self.kernel_size, self.stride, self.padding, self.num_heads
        k2, d = k * k, C // heads
        h, w = math.ceil(H / s), math.ceil(W / s)
        L = h * w
        xc = _nchw(x)
        a = self.attn(_nhwc(self.pool(xc)))                                   # [B, h, w, k⁴·heads]
        a = a.reshape(B, L, heads, k2, k2).permute(0, 2, 1, 3, 4)
        a = (a * self.scale).softmax(dim=-1)                                  # [B, heads, L, k², k²]
        v = F.unfold(xc, k, padding=p, stride=s)                              # [B, C·k², L], row c·k² + j
        if v.shape[-1] != L:
            raise ValueError(f"CSA: unfold gave {v.shape[-1]} windows for a {H}×{W} map, expected {L}")
        v = v.reshape(B, C, k2, L).permute(2, 0, 3, 1).reshape(k2, B * L, C)  # per position j: [B·L, C]
        wj = self.weight.weight.view(k2, C, C)                                # group j: C_out × C_in
        v = torch.bmm(v, wj.transpose(1, 2))                                  # v_j W_jᵀ
        v = v.view(k2, B, L, heads, d).permute(1, 3, 2, 0, 4)                 # [B, heads, L, k², d]
        out = csa_aggregate(a, v)                                             # [B, heads, L, k², d]
        out = out.permute(0, 1, 4, 3, 2).reshape(B, C * k2, L)                # row (head·d + i)·k² + j
        out = F.fold(out, output_size=(H, W), kernel_size=k, padding=p, stride=s)
        return self.proj(_nhwc(out))


class AtrousDepthwiseConv(nn.Module):
    """RASA's ``ds``: Σ_d act(depthwise 3×3 conv with dilation d, padding d), one shared ``weight``
    ``[C, 1, 3, 3]`` (and ``bias`` when asked; the original passes ``bias=qkv_bias``, i.e. none).
    Init as the original: ``kaiming_uniform_`` weight; bias U(±sqrt(1 / (9·C / groups)))."""

    def __init__(self, dim: int, dilations: Sequence[int] = (1, 3, 5), bias: bool = False):
        super().__init__()
        self.dilations = tuple(int(d) for d in dilations)
        self.weight = nn.Parameter(torch.empty(dim, 1, 3, 3))
        nn.init.kaiming_uniform_(self.weight)
        if bias:
            self.bias = nn.Parameter(torch.empty(dim))
            bound = math.sqrt(1.0 / 9.0)
            nn.init.uniform_(self.bias, -bound, bound)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for dil in self.dilations:
            y = F.silu(F.conv2d(x, self.weight, self.bias, 1, dil, dil, self.weight.shape[0]))
            out = y if out is None else out + y
        return out


class RecursiveAtrousSelfAttention(nn.Module):
    """RASA (LVT stages 2–4; the original's ``Attention`` with ``rasa_cfg``). Parameters ``q``,
    ``kv`` (fused [k | v], no bias), ``proj``; ``sr`` Conv2d(k=s=sr) + ``norm`` when sr > 1; ``ds``
    (:class:`AtrousDepthwiseConv`). ``recursions`` (the original's ``r_num``): 2.

    The attention itself is :func:`efficient_attention` (the same op as MiT's): q after ``ds`` and
    k, v are ``[B, N, heads, D]`` views."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, atrous_rates: Optional[Sequence[int]] = (1, 3, 5),
                 recursions: int = 2):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.sr_ratio = sr_ratio
        self.recursions = int(recursions)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
            _init_conv_fan_out_(self.sr)
        self.ds = AtrousDepthwiseConv(dim, atrous_rates, bias=qkv_bias) if atrous_rates is not None else None

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        """One attention pass, ``x`` ``[B, H, W, C]`` → ``[B, H, W, C]``."""
        B, H, W, C = x.shape
        h, d = self.num_heads, self.head_dim
        q = self.q(x)
        if self.ds is not None:
            q = _nhwc(self.ds(_nchw(q)))
        q = q.reshape(B, H * W, h, d)
        kv_in = x
        if self.sr_ratio > 1:
            kv_in = self.norm(_nhwc(self.sr(_nchw(x))))
        kv = self.kv(kv_in)
        kv = kv.reshape(B, -1, 2, h, d)  # row: [k heads | v heads]
        out = efficient_attention(q, kv[:, :, 0], kv[:, :, 1], self.scale)
        return self.proj(out.reshape(B, H, W, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recursions <= 1:
            return self.inner(x)
        out = F.silu(self.inner(x))
        x_in = x
        for _ in range(self.recursions - 1):
            out = out + x_in
            x_in = out
            out = F.silu(self.inner(out))
        return out


class LVTMlp(nn.Module):
    """``fc1`` → (``depconv`` 3×3 depthwise) → GELU → ``fc2``. With ``depconv`` the Linears are 1×1
    Conv2d (the original's names and shapes); without, ``nn.Linear``. PyTorch's default init."""

    def __init__(self, dim: int, hidden: int, depconv: bool):
        super().__init__()
        self.with_depconv = depconv
        if depconv:
            self.fc1 = nn.Conv2d(dim, hidden, 1)
            self.depconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
            self.fc2 = nn.Conv2d(hidden, dim, 1)
        else:
            self.fc1 = nn.Linear(dim, hidden)
            self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_depconv:
            return _nhwc(self.fc2(F.gelu(self.depconv(self.fc1(_nchw(x))))))
        return self.fc2(F.gelu(self.fc1(x)))


class LVTBlock(nn.Module):
    """x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x))); tokens ``[B, H, W, C]``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sa_layer: str, sr_ratio: int,
                 depconv: bool, drop_path: float = 0.0, atrous_rates: Sequence[int] = (1, 3, 5),
                 recursions: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if sa_layer == "csa":
            self.attn = ConvolutionalSelfAttention(dim, num_heads)
        elif sa_layer == "rasa":
            self.attn = RecursiveAtrousSelfAttention(dim, num_heads, sr_ratio, atrous_rates=atrous_rates,
                                                     recursions=recursions)
        elif sa_layer == "sa":
            self.attn = RecursiveAtrousSelfAttention(dim, num_heads, sr_ratio, atrous_rates=None, recursions=1)
        else:
            raise ValueError(f"unknown LVT attention {sa_layer!r}; choose 'csa', 'rasa' or 'sa'")
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = LVTMlp(dim, int(dim * mlp_ratio), depconv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class LVTBackbone(nn.ModuleList):
    """The four stages, ``self[s] = Sequential(patch_embed, Sequential(*blocks))`` (the original's
    ``backbone`` ModuleList, hence its names). ``forward(x)`` → ``(stage_features, patch_embeddings)``."""

    def __init__(self, embed_dims: Sequence[int], depths: Sequence[int], num_heads: Sequence[int],
                 mlp_ratios: Sequence[float], mlp_depconv: Sequence[bool], sr_ratios: Sequence[int],
                 sa_layers: Sequence[str], in_chans: int = 3, drop_path_rate: float = 0.0,
                 atrous_rates: Sequence[int] = (1, 3, 5), recursions: int = 2, variant: str = "lvt"):
        total = sum(depths)
        stages = []
        for i in range(len(depths)):
            embed = LVTPatchEmbed(in_chans if i == 0 else embed_dims[i - 1], embed_dims[i],
                                  patch_size=7 if i == 0 else 3, stride=4 if i == 0 else 2)
            blocks = [LVTBlock(embed_dims[i], num_heads[i], mlp_ratios[i], sa_layers[i], sr_ratios[i],
                               mlp_depconv[i], drop_path_rate * (j + sum(depths[:i])) / max(total - 1, 1),
                               atrous_rates, recursions)
                      for j in range(depths[i])]
            stages.append(nn.Sequential(embed, nn.Sequential(*blocks)))
        super().__init__(stages)
        self.embed_dims = list(embed_dims)
        self.depths = list(depths)
        self.variant = variant

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        features: list[torch.Tensor] = []
        embeds: list[torch.Tensor] = []
        for stage in self:
            tokens, embed = stage[0](x)
            embeds.append(embed)
            tokens = stage[1](tokens)
            x = _nchw(tokens)
            features.append(x)
        return features, embeds


class LVT(BackboneHead):
    """LVT backbone (:class:`LVTBackbone`) + SegFormer All-MLP head (``decode_head``, decoder width 256).

    Same contract as :class:`~transkd_fast.models.segformer.SegFormer`; ``embed_dims`` are the
    student widths a distiller reads ([64, 64, 160, 256])."""

    def __init__(self, backbone: LVTBackbone, num_classes: int = 19, decoder_dim: int = 256,
                 dropout: float = 0.0, variant: str = "lvt"):
        super().__init__(backbone, num_classes, decoder_dim, dropout, variant)


def lvt(num_classes: int = 19, drop_path_rate: float = 0.0, dropout: Optional[float] = None,
        decoder_dim: int = LVT_CONFIG["decoder_dim"], **kwargs) -> LVT:
    """The original's LVT segmentation model. ``dropout`` (the head's Dropout2d) defaults to
    ``drop_path_rate``, as the original ties them (both 0 in its scripts). Extra keyword arguments
    override :data:`LVT_CONFIG` entries (``atrous_rates``, ``recursions``, ...)."""
    cfg = {k: v for k, v in LVT_CONFIG.items() if k != "decoder_dim"}
    unknown = set(kwargs) - set(cfg) - {"in_chans"}
    if unknown:
        raise TypeError(f"lvt() got unexpected keyword arguments {sorted(unknown)}")
    cfg.update(kwargs)
    backbone = LVTBackbone(drop_path_rate=drop_path_rate, **cfg)
    model = LVT(backbone, num_classes, decoder_dim, drop_path_rate if dropout is None else dropout)
    model.apply(init_linear_norm_)  # the original model-level init (its convs init themselves)
    return model
