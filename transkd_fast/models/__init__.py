"""Segmentation models: SegFormer (MiT-B0…B5) and Semantic FPN on PVTv2-B0…B5.

``build_model(name, num_classes=19, **kw)`` builds ``segformer_b0``…``segformer_b5`` or
``pvt_v2_b0``…``pvt_v2_b5`` (Semantic FPN). ``mit_b*()`` / ``pvt_v2_b*()`` build bare backbones.
``load_pretrained`` reads NVlabs/TransKD/mmseg and Hugging Face checkpoints.

The variant-string builders ``mit(variant)``, ``segformer(variant, num_classes)`` and
``pvt_v2(variant)`` live in their submodules (``transkd_fast.models.segformer.segformer``): exported
here they would shadow the submodules of the same names.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from transkd_fast.models.checkpoints import LoadResult, load_pretrained, to_hf_state_dict
from transkd_fast.models.lvt import lvt as _lvt
from transkd_fast.models.mit import (
    MIT_CONFIGS,
    MixVisionTransformer,
    mit_b0,
    mit_b1,
    mit_b2,
    mit_b3,
    mit_b4,
    mit_b5,
)
from transkd_fast.models.pvt_v2 import (
    PVT_V2_CONFIGS,
    FPNHead,
    SemanticFPN,
    pvt_v2_b0,
    pvt_v2_b1,
    pvt_v2_b2,
    pvt_v2_b3,
    pvt_v2_b4,
    pvt_v2_b5,
    semantic_fpn,
)
from transkd_fast.models.segformer import SegFormer, SegFormerHead
from transkd_fast.models.segformer import segformer as _segformer

MODELS: dict[str, Callable[..., nn.Module]] = {}
for _k in MIT_CONFIGS:
    MODELS[f"segformer_{_k}"] = (lambda k: lambda num_classes=19, **kw: _segformer(k, num_classes, **kw))(_k)
for _k in PVT_V2_CONFIGS:
    MODELS[f"pvt_v2_{_k}"] = (lambda k: lambda num_classes=19, **kw: semantic_fpn(k, num_classes, **kw))(_k)
MODELS["lvt"] = lambda num_classes=19, **kw: _lvt(num_classes, **kw)  # the original TransKD's LVT student


def build_model(name: str, num_classes: int = 19, **kwargs) -> nn.Module:
    """Build a segmentation model by name (see :data:`MODELS`); extra keyword arguments go to
    the builder (``decoder_dim``, ``dropout``) or on to the backbone (``drop_path_rate``, ``norm_eps``)."""
    key = name.lower().replace("-", "_")
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[key](num_classes=num_classes, **kwargs)


__all__ = [
    "MODELS", "build_model", "LoadResult", "load_pretrained", "to_hf_state_dict",
    "MixVisionTransformer", "mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5",
    "SegFormer", "SegFormerHead",
    "SemanticFPN", "FPNHead", "semantic_fpn",
    "pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2", "pvt_v2_b3", "pvt_v2_b4", "pvt_v2_b5",
]
