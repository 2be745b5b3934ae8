"""NYU Depth v2, 40-class semantic segmentation (Gupta et al.'s NYUv2-40 mapping): 795 training
and 654 test images, all 480×640.

Layout (the one the original TransKD ``NYUv2`` loader reads)::

  <root>/images/<name>.jpg        (or <name>.png)
  <root>/labels40/<name>.png      (single-channel: 0 = void, 1..40 = the 40 classes)
  <root>/train.txt, <root>/test.txt   (one <name> per line)

Labels: raw id ``k`` in 1..40 is train id ``k - 1`` (wall = 0 ... otherprop = 39) and raw 0 (no
annotation) is void (255), ignored by the loss and the metrics (the standard NYUv2-40 protocol).
(The original's ``label.point(lambda p: p - 1)`` does not give this: PIL clips ``0 - 1`` to 0 on
8-bit images, so its void pixels became wall.) Any other raw value raises
:class:`~transkd_fast.data.base.DataError` naming the file; in particular a raw 255 is refused,
not taken as void: it means the tree already holds train ids (0..39, void 255), and reading
those as raw ids would shift every class by one.

NYUv2 has no ``val`` split: evaluate on ``test`` (``--val-split test``), the paper's protocol.
Its images share one size, so training takes the plain resize + flip + translate transform of
the original recipe (no crop pipeline: ``default_crop_size`` is None); it has no recipe class
weights (``class_weights`` None: uniform CE).
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from transkd_fast.data.base import (
    VOID,
    DataError,
    DatasetLayoutError,
    SegmentationDataset,
    Transform,
    require_dir,
    require_file,
)
from transkd_fast.data.voc import bit_palette

# Train id k is NYUv2-40 raw id k + 1 (Gupta et al., CVPR 2013; the spelling "refridgerator" is
# the dataset's own, kept so names match other NYUv2 tools).
NYUV2_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat",
    "clothes", "ceiling", "books", "refridgerator", "television", "paper", "towel", "shower curtain", "box",
    "whiteboard", "person", "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure",
    "otherfurniture", "otherprop",
)

# The bit colormap (see voc.bit_palette) indexed by the *raw* NYUv2-40 id, train id + 1: the
# colours the NYUv2 toolkits (and the original's Colorize_NYU on raw ids) draw, with black left
# for void (raw 0) instead of for wall.
NYUV2_PALETTE = bit_palette(len(NYUV2_CLASSES) + 1)[1:]

# Raw ids 0..40 in a labels40 PNG.
NUM_RAW_IDS = len(NYUV2_CLASSES) + 1

_LUT = np.full(256, VOID, dtype=np.uint8)
_LUT[1:NUM_RAW_IDS] = np.arange(NUM_RAW_IDS - 1, dtype=np.uint8)

NYUV2_LAYOUT = """  <root>/images/<name>.jpg        (or <name>.png)
  <root>/labels40/<name>.png      (single-channel: 0 = void, 1..40 = the NYUv2-40 classes)
  <root>/<split>.txt              (one <name> per line; splits train and test)"""


def raw_ids_to_train_ids(raw: np.ndarray, path: str = "<array>") -> np.ndarray:
    """NYUv2-40 raw ids (uint8 ``[H, W]``, 0 void, 1..40) → train ids (0..39, void 255), or
    :class:`DataError` naming ``path``, the bad values and their pixel counts when a value is
    outside 0..40."""
    counts = np.bincount(np.asarray(raw, dtype=np.uint8).ravel(), minlength=256)
    bad = np.flatnonzero(counts[NUM_RAW_IDS:]) + NUM_RAW_IDS
    if bad.size:
        shown = ", ".join(f"{int(v)} ({int(counts[v])} px)" for v in bad[:8])
        more = f" and {bad.size - 8} more" if bad.size > 8 else ""
        hint = ""
        if VOID in bad and bad.size == 1:
            hint = ("; ids 0..40 plus 255 look like labels already converted to train ids (0..39, void 255): "
                    "use the raw labels40 PNGs (0 = void, 1..40)")
        raise DataError(f"label {path} holds values outside 0..40 (NYUv2-40: 0 = void, 1..40 = the classes): "
                        f"{shown}{more}{hint}")
    return _LUT[raw]


class NYUv2(SegmentationDataset):
    """NYUv2-40 (``split`` in train | test, or any ``<root>/<split>.txt``); see the module
    docstring for the layout and the id mapping. ``label_resize``: see
    :class:`~transkd_fast.data.base.SegmentationDataset`."""

    class_names = NYUV2_CLASSES
    palette = NYUV2_PALETTE

    def __init__(self, root: str, split: str = "train", transform: Optional[Transform] = None,
                 label_resize: bool = False):
        super().__init__(transform, label_resize)
        require_dir(root, NYUV2_LAYOUT, "NYUv2 root")
        image_dir, label_dir = os.path.join(root, "images"), os.path.join(root, "labels40")
        require_dir(image_dir, NYUV2_LAYOUT, "NYUv2 images")
        require_dir(label_dir, NYUV2_LAYOUT, "NYUv2 labels")
        split_file = os.path.join(root, f"{split}.txt")
        if not os.path.isfile(split_file):
            lists = sorted(n[:-4] for n in os.listdir(root) if n.endswith(".txt"))
            have = f"split lists present: {', '.join(lists)}" if lists else "no <split>.txt in the root"
            hint = " (NYUv2 has no val split: evaluate on test, --val-split test)" if split == "val" else ""
            raise DatasetLayoutError(f"NYUv2 split list: file not found: {split_file}{hint}; {have}\n"
                                     f"expected layout:\n{NYUV2_LAYOUT}")
        with open(split_file, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        if not names:
            raise DatasetLayoutError(f"NYUv2 split list is empty: {split_file}\nexpected layout:\n{NYUV2_LAYOUT}")
        self.samples: list[tuple[str, str]] = []
        for name in names:
            jpg, png = os.path.join(image_dir, f"{name}.jpg"), os.path.join(image_dir, f"{name}.png")
            image = jpg if os.path.isfile(jpg) else png
            if not os.path.isfile(image):
                raise DatasetLayoutError(f"NYUv2 image: file not found: {jpg} (nor {png}), listed in {split_file}\n"
                                         f"expected layout:\n{NYUV2_LAYOUT}")
            label = os.path.join(label_dir, f"{name}.png")
            require_file(label, NYUV2_LAYOUT, f"NYUv2 label (listed in {split_file})")
            self.samples.append((image, label))

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int):
        image_path, label_path = self.samples[index]
        # num_ids=256: the base checks decoding, mode, bit depth (a 16-bit 300 is refused) and
        # size; the NYUv2-40 range (255 included) is checked here, where 255 is not void.
        image, raw = self.load_pair(image_path, label_path, num_ids=256, what="NYUv2-40 raw ids")
        return image, raw_ids_to_train_ids(raw, label_path)
