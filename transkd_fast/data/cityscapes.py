"""Cityscapes (fine annotations) and ACDC, which shares Cityscapes' 19 train ids.

Labels: ``*_gtFine_labelTrainIds.png`` when present; otherwise ``*_gtFine_labelIds.png``
mapped through the official id → train-id table (:data:`LABEL_ID_TO_TRAIN_ID`, from
cityscapesScripts ``labels.py``), every id without a train id becoming void (255).
"""

from __future__ import annotations

import glob
import os
from typing import Optional, Sequence, Union

import numpy as np

from transkd_fast.data.base import (
    VOID,
    DatasetLayoutError,
    SegmentationDataset,
    Transform,
    require_dir,
)

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)

# Official Cityscapes label id -> train id (cityscapesScripts/helpers/labels.py). Ids not
# listed (0-6 unlabeled/ego/border/out-of-roi/static/dynamic/ground, 9 parking, 10 rail
# track, 14-16 guard rail/bridge/tunnel, 18 polegroup, 29 caravan, 30 trailer, and the
# license plate) have no train id: void.
LABEL_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

# Label ids in a *_labelIds.png: 0..33, and 255 (the license plate's id -1 written as 8 bits).
NUM_LABEL_IDS = 34

_LUT = np.full(256, VOID, dtype=np.uint8)
for _id, _tid in LABEL_ID_TO_TRAIN_ID.items():
    _LUT[_id] = _tid


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map a Cityscapes ``labelIds`` array to train ids (uint8), void = 255. Values outside
    0..255 raise ``ValueError`` (they are not Cityscapes ids; a cast to uint8 would wrap them)."""
    arr = np.asarray(label_ids)
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"label ids outside 0..255 (min {arr.min()}, max {arr.max()}) are not Cityscapes ids")
        arr = arr.astype(np.uint8)
    return _LUT[arr]


# The class-balancing CE weights of the TransKD training scripts (ERFNet style, 1/ln(1.02 + f)).
# The 20th output (void) gets weight 0 in the 20-output recipe.
CITYSCAPES_CLASS_WEIGHTS = (
    2.5959737, 6.741505, 3.5353868, 9.866315, 9.690922, 9.369371, 10.289124, 9.953209, 4.3098087,
    9.490392, 7.674411, 9.396925, 10.347794, 6.3928986, 10.226673, 10.241072, 10.28059, 10.396977,
    10.05567,
)

CITYSCAPES_LAYOUT = """  <root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png
      (or ..._gtFine_labelIds.png, mapped to train ids with the official table)"""


class _CityscapesLike(SegmentationDataset):
    class_names = CITYSCAPES_CLASSES
    palette = CITYSCAPES_PALETTE
    class_weights = CITYSCAPES_CLASS_WEIGHTS

    def __init__(self, transform: Optional[Transform], label_resize: bool = False):
        super().__init__(transform, label_resize)
        self.samples: list[tuple[str, str, bool]] = []  # (image, label, label is labelIds)

    def _pair(self, image_path: str, label_base: str, layout: str, what: str) -> None:
        train_ids = label_base + "labelTrainIds.png"
        label_ids = label_base + "labelIds.png"
        if os.path.isfile(train_ids):
            self.samples.append((image_path, train_ids, False))
        elif os.path.isfile(label_ids):
            self.samples.append((image_path, label_ids, True))
        else:
            raise DatasetLayoutError(
                f"{what}: no label for {image_path}: neither {train_ids} nor {label_ids} exists\n"
                f"expected layout:\n{layout}")

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int):
        image_path, label_path, is_label_ids = self.samples[index]
        if is_label_ids:
            return self.load_pair(image_path, label_path, NUM_LABEL_IDS, _LUT, what="Cityscapes labelIds")
        return self.load_pair(image_path, label_path, what="Cityscapes train ids")


class Cityscapes(_CityscapesLike):
    """Cityscapes fine: ``split`` in train | val | test. ``label_resize``: see
    :class:`~transkd_fast.data.base.SegmentationDataset` (default: a label of another size than
    its image is an error)."""

    def __init__(self, root: str, split: str = "train", transform: Optional[Transform] = None,
                 label_resize: bool = False):
        super().__init__(transform, label_resize)
        img_dir = os.path.join(root, "leftImg8bit", split)
        gt_dir = os.path.join(root, "gtFine", split)
        require_dir(root, CITYSCAPES_LAYOUT, "Cityscapes root")
        require_dir(img_dir, CITYSCAPES_LAYOUT, "Cityscapes images")
        require_dir(gt_dir, CITYSCAPES_LAYOUT, "Cityscapes labels")
        images = sorted(glob.glob(os.path.join(img_dir, "*", "*_leftImg8bit.png")))
        if not images:
            raise DatasetLayoutError(f"Cityscapes images: no *_leftImg8bit.png under {img_dir}/<city>/\n"
                                     f"expected layout:\n{CITYSCAPES_LAYOUT}")
        for path in images:
            city = os.path.basename(os.path.dirname(path))
            stem = os.path.basename(path)[: -len("leftImg8bit.png")]
            self._pair(path, os.path.join(gt_dir, city, stem + "gtFine_"), CITYSCAPES_LAYOUT, "Cityscapes labels")


ACDC_CONDITIONS = ("fog", "night", "rain", "snow")

ACDC_LAYOUT = """  <root>/rgb_anon/<condition>/<split>/<sequence>/<name>_rgb_anon.png
  <root>/gt/<condition>/<split>/<sequence>/<name>_gt_labelTrainIds.png
      (or ..._gt_labelIds.png);  condition in fog | night | rain | snow"""


def parse_conditions(conditions: Union[None, str, Sequence[str]]) -> Optional[tuple[str, ...]]:
    """``None``, a comma-separated string (``"night,fog"``) or a sequence of ACDC condition names
    as a tuple (order kept, duplicates dropped); an unknown name raises ``ValueError``."""
    if conditions is None:
        return None
    if isinstance(conditions, str):
        conditions = [c for c in conditions.split(",") if c.strip()]
    out: list[str] = []
    for c in conditions:
        c = str(c).strip().lower()
        if c not in ACDC_CONDITIONS:
            raise ValueError(f"unknown ACDC condition {c!r}; choose among {', '.join(ACDC_CONDITIONS)}")
        if c not in out:
            out.append(c)
    if not out:
        raise ValueError(f"no ACDC condition given; choose among {', '.join(ACDC_CONDITIONS)}")
    return tuple(out)


class ACDC(_CityscapesLike):
    """ACDC (adverse conditions), Cityscapes train ids.

    ``conditions``: the conditions to read (a sequence, or a comma-separated string such as
    ``"night,fog"``), each of which must be present for ``split``. ``None`` (the default): every
    condition whose ``rgb_anon/<condition>/<split>`` directory exists; the ones used are in
    :attr:`conditions`, the absent ones in :attr:`missing_conditions`. When none is present the
    error lists the directories looked for and what is there instead.
    """

    def __init__(self, root: str, split: str = "train", transform: Optional[Transform] = None,
                 conditions: Union[None, str, Sequence[str]] = None, label_resize: bool = False):
        super().__init__(transform, label_resize)
        require_dir(root, ACDC_LAYOUT, "ACDC root")
        require_dir(os.path.join(root, "rgb_anon"), ACDC_LAYOUT, "ACDC images")
        require_dir(os.path.join(root, "gt"), ACDC_LAYOUT, "ACDC labels")
        chosen = parse_conditions(conditions)
        if chosen is None:
            chosen = tuple(c for c in ACDC_CONDITIONS if os.path.isdir(os.path.join(root, "rgb_anon", c, split)))
            if not chosen:
                looked = "\n".join(f"  {os.path.join(root, 'rgb_anon', c, split)}" for c in ACDC_CONDITIONS)
                cond_dirs = [(c, os.path.join(root, "rgb_anon", c)) for c in ACDC_CONDITIONS]
                present = sorted(f"{c} ({s})" for c, d in cond_dirs if os.path.isdir(d)
                                 for s in os.listdir(d) if os.path.isdir(os.path.join(d, s)))
                raise DatasetLayoutError(
                    f"ACDC images: no condition has a {split!r} split; looked for:\n{looked}\n"
                    f"present: {', '.join(present) or 'nothing'}\nexpected layout:\n{ACDC_LAYOUT}")
        self.conditions: tuple[str, ...] = chosen
        self.missing_conditions: tuple[str, ...] = tuple(c for c in ACDC_CONDITIONS if c not in chosen
                                                         and not os.path.isdir(os.path.join(root, "rgb_anon", c,
                                                                                            split)))
        for cond in chosen:
            img_dir = os.path.join(root, "rgb_anon", cond, split)
            gt_dir = os.path.join(root, "gt", cond, split)
            require_dir(img_dir, ACDC_LAYOUT, f"ACDC images ({cond})")
            require_dir(gt_dir, ACDC_LAYOUT, f"ACDC labels ({cond})")
            for path in sorted(glob.glob(os.path.join(img_dir, "*", "*_rgb_anon.png"))):
                seq = os.path.basename(os.path.dirname(path))
                stem = os.path.basename(path)[: -len("rgb_anon.png")]
                self._pair(path, os.path.join(gt_dir, seq, stem + "gt_"), ACDC_LAYOUT, "ACDC labels")
        if not self.samples:
            raise DatasetLayoutError(f"ACDC ({', '.join(chosen)}): no *_rgb_anon.png under "
                                     f"{root}/rgb_anon/<condition>/{split}/<sequence>/\n"
                                     f"expected layout:\n{ACDC_LAYOUT}")
