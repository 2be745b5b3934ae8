"""Pascal VOC 2012 segmentation: 21 classes (background + 20), 255 = boundary/void."""

from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np

from transkd_fast.data.base import (
    DatasetLayoutError,
    SegmentationDataset,
    Transform,
    require_dir,
    require_file,
)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


def bit_palette(n: int = 21) -> np.ndarray:
    """The VOC colormap: class index bits spread over the high bits of R, G, B (n distinct colours;
    also the palette for classes of no known dataset)."""
    pal = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


VOC_PALETTE = bit_palette()

VOC_LAYOUT = """  <root>/JPEGImages/<id>.jpg
  <root>/SegmentationClass/<id>.png          (palette PNG: index = class, 255 = void)
  <root>/ImageSets/Segmentation/<split>.txt  (one <id> per line)
      (<root> is VOCdevkit/VOC2012)"""


class VOC2012(SegmentationDataset):
    """Pascal VOC 2012 segmentation (``split`` in train | val | trainval, or any list under
    ``ImageSets/Segmentation``). Labels are palette PNGs whose indices are the classes.

    VOC images differ in size, so a training batch needs the random scale + crop + pad pipeline
    (``SegTransform(train=True, crop_size=ds.default_crop_size, scale_range=ds.default_scale_range)``,
    the mmseg VOC recipe: 512×512 crops, scale 0.5–2) and evaluation either batch size 1 or
    :func:`~transkd_fast.data.transforms.pad_collate`. ``label_resize``: see
    :class:`~transkd_fast.data.base.SegmentationDataset`.
    """

    class_names = VOC_CLASSES
    palette = VOC_PALETTE
    default_crop_size: Optional[Tuple[int, int]] = (512, 512)
    default_scale_range: Optional[Tuple[float, float]] = (0.5, 2.0)

    def __init__(self, root: str, split: str = "train", transform: Optional[Transform] = None,
                 label_resize: bool = False):
        super().__init__(transform, label_resize)
        require_dir(root, VOC_LAYOUT, "VOC2012 root")
        for sub in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
            require_dir(os.path.join(root, sub), VOC_LAYOUT, f"VOC2012 {sub}")
        split_file = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
        require_file(split_file, VOC_LAYOUT, "VOC2012 split list")
        with open(split_file, encoding="utf-8") as f:
            ids = [line.strip() for line in f if line.strip()]
        if not ids:
            raise DatasetLayoutError(f"VOC2012 split list is empty: {split_file}\nexpected layout:\n{VOC_LAYOUT}")
        self.samples = []
        for i in ids:
            img = os.path.join(root, "JPEGImages", f"{i}.jpg")
            lab = os.path.join(root, "SegmentationClass", f"{i}.png")
            require_file(img, VOC_LAYOUT, "VOC2012 image")
            require_file(lab, VOC_LAYOUT, "VOC2012 label")
            self.samples.append((img, lab))

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int):
        img, lab = self.samples[index]
        return self.load_pair(img, lab, what="VOC class indices")
