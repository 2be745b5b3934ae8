"""PVTv2-B0…B5 backbones and the Semantic FPN segmentation model built on them.

PVTv2 (whai362/PVT ``pvt_v2.py``) uses the very blocks of MiT (overlapping patch embedding,
spatial-reduction attention, Mix-FFN with a depthwise conv) and the same parameter names, so the
backbone is :class:`~transkd_fast.models.mit.MixVisionTransformer` with PVTv2's settings:
MLP ratios [8, 8, 4, 4] (B5: [4, 4, 4, 4]), heads [1, 2, 5, 8], sr [8, 4, 2, 1], qkv_bias,
LayerNorm eps 1e-6, drop_path 0.1.

Semantic FPN (mmseg ``FPN`` neck + ``FPNHead``, as TransKD's PVTv2 experiments configure them:
no norm layers, so every conv has a bias)::

    l_i = lateral_convs[i].conv(f_i)                        1×1, C_i → 256
    l_i += nearest(l_{i+1}, size of l_i)   for i = 3, 2, 1  top-down, deepest first
    p_i = fpn_convs[i].conv(l_i)                            3×3 pad 1, 256 → 256, no activation
    s_i = scale_heads[i](p_i)      max(1, i) × [3×3 conv (→128) + ReLU, then ×2 bilinear when i > 0]
    y   = s_0 + Σ_{i>0} bilinear(s_i, size of s_0)          align_corners=False
    logits = conv_seg(Dropout2d(y))                         1×1, 128 → classes, 1/4 input size

Names follow mmseg: ``backbone.*``, ``neck.lateral_convs.{i}.conv``, ``neck.fpn_convs.{i}.conv``,
``decode_head.scale_heads.{i}.{k}.conv``, ``decode_head.conv_seg``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from transkd_fast.models.mit import MixVisionTransformer
from transkd_fast.models.segformer import ConvModule

# name: (embed_dims, depths, num_heads, mlp_ratios, sr_ratios)
PVT_V2_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "b0": ((32, 64, 160, 256), (2, 2, 2, 2), (1, 2, 5, 8), (8, 8, 4, 4), (8, 4, 2, 1)),
    "b1": ((64, 128, 320, 512), (2, 2, 2, 2), (1, 2, 5, 8), (8, 8, 4, 4), (8, 4, 2, 1)),
    "b2": ((64, 128, 320, 512), (3, 4, 6, 3), (1, 2, 5, 8), (8, 8, 4, 4), (8, 4, 2, 1)),
    "b3": ((64, 128, 320, 512), (3, 4, 18, 3), (1, 2, 5, 8), (8, 8, 4, 4), (8, 4, 2, 1)),
    "b4": ((64, 128, 320, 512), (3, 8, 27, 3), (1, 2, 5, 8), (8, 8, 4, 4), (8, 4, 2, 1)),
    "b5": ((64, 128, 320, 512), (3, 6, 40, 3), (1, 2, 5, 8), (4, 4, 4, 4), (8, 4, 2, 1)),
}


def pvt_v2(variant: str, **kwargs) -> MixVisionTransformer:
    """PVTv2 backbone ``variant`` in b0…b5; keyword arguments override the defaults."""
    key = variant.lower().removeprefix("pvt_v2_")
    if key not in PVT_V2_CONFIGS:
        raise ValueError(f"unknown PVTv2 variant {variant!r}; choose one of "
                         f"{', '.join('pvt_v2_' + k for k in PVT_V2_CONFIGS)}")
    dims, depths, heads, ratios, srs = PVT_V2_CONFIGS[key]
    return MixVisionTransformer(dims, depths, heads, ratios, srs, variant=f"pvt_v2_{key}", **kwargs)


def pvt_v2_b0(**kwargs) -> MixVisionTransformer:
    return pvt_v2("b0", **kwargs)


def pvt_v2_b1(**kwargs) -> MixVisionTransformer:
    return pvt_v2("b1", **kwargs)


def pvt_v2_b2(**kwargs) -> MixVisionTransformer:
    return pvt_v2("b2", **kwargs)


def pvt_v2_b3(**kwargs) -> MixVisionTransformer:
    return pvt_v2("b3", **kwargs)


def pvt_v2_b4(**kwargs) -> MixVisionTransformer:
    return pvt_v2("b4", **kwargs)


def pvt_v2_b5(**kwargs) -> MixVisionTransformer:
    return pvt_v2("b5", **kwargs)


class FPN(nn.Module):
    """FPN neck: 1×1 laterals, nearest top-down sums, 3×3 output convs; returns 4 maps of ``out_channels``."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256):
        super().__init__()
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1, act=False) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3, padding=1, act=False)
                                       for _ in in_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="nearest")
        return [conv(x) for conv, x in zip(self.fpn_convs, laterals)]


class FPNHead(nn.Module):
    """Semantic FPN head (mmseg ``FPNHead`` without norm): per-scale conv+ReLU(+×2 up) towers, summed."""

    def __init__(self, in_channels: Sequence[int] = (256, 256, 256, 256), channels: int = 128,
                 num_classes: int = 19, feature_strides: Sequence[int] = (4, 8, 16, 32), dropout: float = 0.1):
        super().__init__()
        self.num_classes = num_classes
        self.scale_heads = nn.ModuleList()
        for i, stride in enumerate(feature_strides):
            length = max(1, (stride // feature_strides[0]).bit_length() - 1)
            layers: list[nn.Module] = []
            for k in range(length):
                layers.append(ConvModule(in_channels[i] if k == 0 else channels, channels, 3, padding=1))
                if stride != feature_strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        out = self.scale_heads[0](inputs[0])
        for i in range(1, len(inputs)):
            s = self.scale_heads[i](inputs[i])
            if s.shape[-2:] != out.shape[-2:]:
                s = F.interpolate(s, size=out.shape[-2:], mode="bilinear", align_corners=False)
            out = out + s
        return self.conv_seg(self.dropout(out)).contiguous()


class SemanticFPN(nn.Module):
    """``backbone`` (PVTv2) + ``neck`` (:class:`FPN`) + ``decode_head`` (:class:`FPNHead`).

    Same contract as :class:`~transkd_fast.models.segformer.SegFormer`: ``model(x)`` → logits at 1/4
    size; ``model(x, return_features=True)`` → ``(stage_features, logits, patch_embeddings)``;
    ``model.backbone(x)`` → ``(stage_features, patch_embeddings)``;
    ``model.decode_head(model.neck(stage_features))`` → logits.
    """

    def __init__(self, backbone: MixVisionTransformer, num_classes: int = 19, neck_channels: int = 256,
                 head_channels: int = 128, dropout: float = 0.1, variant: str = ""):
        super().__init__()
        self.backbone = backbone
        self.neck = FPN(backbone.embed_dims, neck_channels)
        self.decode_head = FPNHead((neck_channels,) * 4, head_channels, num_classes, dropout=dropout)
        self.embed_dims = list(backbone.embed_dims)
        self.num_classes = num_classes
        self.variant = variant

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features, embeds = self.backbone(x)
        logits = self.decode_head(self.neck(features))
        if return_features:
            return features, logits, embeds
        return logits


def semantic_fpn(variant: str, num_classes: int = 19, dropout: float = 0.1, **backbone_kwargs) -> SemanticFPN:
    """Semantic FPN on PVTv2-``variant`` (b0…b5); extra keyword arguments go to the backbone."""
    key = variant.lower().removeprefix("pvt_v2_")
    backbone = pvt_v2(key, **backbone_kwargs)
    return SemanticFPN(backbone, num_classes, dropout=dropout, variant=f"pvt_v2_{key}")
