"""Datasets and transforms.

``build_dataset(name, split, root=..., transform=...)`` with ``name`` in
``synthetic`` (the default, procedural, no files) | ``cityscapes`` | ``acdc`` | ``voc``.
Every dataset yields train ids with 255 for void before the transform; the transform's
:class:`VoidMapping` decides whether void becomes an extra output id or stays ignored.
"""

from __future__ import annotations

from typing import Optional

from transkd_fast.data.base import VOID, DatasetLayoutError, SegmentationDataset
from transkd_fast.data.cityscapes import (
    ACDC,
    CITYSCAPES_CLASS_WEIGHTS,
    CITYSCAPES_CLASSES,
    LABEL_ID_TO_TRAIN_ID,
    Cityscapes,
    label_ids_to_train_ids,
)
from transkd_fast.data.synthetic import SYNTHETIC_CLASSES, Synthetic
from transkd_fast.data.transforms import SegTransform, VoidMapping
from transkd_fast.data.voc import VOC2012, VOC_CLASSES

DATASETS = ("synthetic", "cityscapes", "acdc", "voc")


def build_dataset(name: str, split: str, root: Optional[str] = None, transform=None, **kwargs) -> SegmentationDataset:
    """A dataset by name. ``kwargs`` go to the class (e.g. ``num_samples``, ``height`` for synthetic)."""
    name = name.lower()
    if name == "synthetic":
        return Synthetic(split=split, transform=transform, **kwargs)
    if root is None:
        raise ValueError(f"dataset {name!r} needs a data root (--data-root)")
    if name == "cityscapes":
        return Cityscapes(root, split, transform)
    if name == "acdc":
        return ACDC(root, split, transform, **kwargs)
    if name in ("voc", "voc2012"):
        return VOC2012(root, split, transform)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


__all__ = [
    "ACDC", "CITYSCAPES_CLASSES", "CITYSCAPES_CLASS_WEIGHTS", "Cityscapes", "DATASETS", "DatasetLayoutError",
    "LABEL_ID_TO_TRAIN_ID", "SYNTHETIC_CLASSES", "SegTransform", "SegmentationDataset", "Synthetic", "VOC2012",
    "VOC_CLASSES", "VOID", "VoidMapping", "build_dataset", "label_ids_to_train_ids",
]
