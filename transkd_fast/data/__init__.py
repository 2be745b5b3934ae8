"""Datasets and transforms.

``build_dataset(name, split, root=..., transform=..., label_resize=False, conditions=None)`` with
``name`` in ``synthetic`` (the default, procedural, no files) | ``cityscapes`` | ``acdc`` | ``voc`` |
``nyuv2`` (NYUv2-40: splits ``train`` / ``test``, raw label 0 is void).
Every dataset yields train ids with 255 for void before the transform; the transform's
:class:`VoidMapping` decides whether void becomes an extra output id or stays ignored.

Bad data raises :class:`DataError` (a ``ValueError``) naming the file: unreadable files,
RGB or otherwise multi-channel labels, ids outside ``[0, K) ∪ {255}``, a label whose size differs
from its image (unless ``label_resize=True``). Missing files and directories raise
:class:`DatasetLayoutError`, which is both a ``FileNotFoundError`` and a :class:`DataError`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from transkd_fast.data.base import VOID, DataError, DatasetLayoutError, SegmentationDataset
from transkd_fast.data.cityscapes import (
    ACDC,
    ACDC_CONDITIONS,
    CITYSCAPES_CLASS_WEIGHTS,
    CITYSCAPES_CLASSES,
    LABEL_ID_TO_TRAIN_ID,
    Cityscapes,
    label_ids_to_train_ids,
)
from transkd_fast.data.nyuv2 import NYUV2_CLASSES, NYUv2
from transkd_fast.data.synthetic import SYNTHETIC_CLASSES, Synthetic
from transkd_fast.data.transforms import SegTransform, VoidMapping, pad_collate
from transkd_fast.data.voc import VOC2012, VOC_CLASSES

DATASETS = ("synthetic", "cityscapes", "acdc", "voc", "nyuv2")


def build_dataset(name: str, split: str, root: Optional[str] = None, transform=None, *, label_resize: bool = False,
                  conditions: Union[None, str, Sequence[str]] = None, **kwargs) -> SegmentationDataset:
    """A dataset by name.

    Args:
        name: ``synthetic`` | ``cityscapes`` | ``acdc`` | ``voc`` (``voc2012``) | ``nyuv2``.
        split: the split (``train`` / ``val`` / ...; NYUv2 has ``train`` / ``test``).
        root: the data root (every dataset but ``synthetic``).
        transform: a :data:`~transkd_fast.data.base.Transform` (e.g. :class:`SegTransform`), or
            None (plain tensors); it may also be set later as ``ds.transform``.
        label_resize: resize (nearest) a label whose size differs from its image's instead of
            raising :class:`DataError` (``--label-resize``). Synthetic labels always match.
        conditions: ACDC only (``--acdc-conditions``): a sequence or comma-separated string of
            ``fog`` / ``night`` / ``rain`` / ``snow``; None uses every condition present for the
            split (see ``ds.conditions``). Given for another dataset: ``ValueError``.
        kwargs: go to the class (e.g. ``num_samples``, ``height`` for synthetic).
    """
    name = name.lower()
    if conditions is not None and name != "acdc":
        raise ValueError(f"conditions={conditions!r} applies to the ACDC dataset only, not {name!r}")
    if name == "synthetic":
        return Synthetic(split=split, transform=transform, **kwargs)
    if root is None:
        raise ValueError(f"dataset {name!r} needs a data root (--data-root)")
    if name == "cityscapes":
        return Cityscapes(root, split, transform, label_resize=label_resize, **kwargs)
    if name == "acdc":
        return ACDC(root, split, transform, conditions=conditions, label_resize=label_resize, **kwargs)
    if name in ("voc", "voc2012"):
        return VOC2012(root, split, transform, label_resize=label_resize, **kwargs)
    if name == "nyuv2":
        return NYUv2(root, split, transform, label_resize=label_resize, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


__all__ = [
    "ACDC", "ACDC_CONDITIONS", "CITYSCAPES_CLASSES", "CITYSCAPES_CLASS_WEIGHTS", "Cityscapes", "DATASETS",
    "DataError", "DatasetLayoutError", "LABEL_ID_TO_TRAIN_ID", "NYUV2_CLASSES", "NYUv2", "SYNTHETIC_CLASSES",
    "SegTransform", "SegmentationDataset", "Synthetic", "VOC2012", "VOC_CLASSES", "VOID", "VoidMapping",
    "build_dataset", "label_ids_to_train_ids", "pad_collate",
]
