"""The dataset protocol shared by every loader.

A dataset knows how to *load* sample ``i`` as ``(PIL RGB image, uint8 label array)`` where
the label holds train ids ``0..num_classes-1`` and ``255`` for void. Augmentation is not
drawn from a global RNG: ``ds[(i, aug_seed)]`` applies the transform with
``numpy.random.default_rng(aug_seed)``, so a batch is a pure function of the indices and
seeds the sampler hands out (this is what makes ``--resume`` and DDP runs exact).
``ds[i]`` (an int) uses seed ``i``.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

VOID = 255

# (image PIL, label uint8 [H, W], rng) -> (image float [3, H, W], label int64 [h, w])
Transform = Callable[[Image.Image, np.ndarray, np.random.Generator], Tuple[torch.Tensor, torch.Tensor]]


class DatasetLayoutError(FileNotFoundError):
    """A dataset directory or file is missing; the message names it and the expected layout."""


def require_dir(path: str, layout: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DatasetLayoutError(f"{what}: directory not found: {path}\nexpected layout:\n{layout}")


def require_file(path: str, layout: str, what: str) -> None:
    if not os.path.isfile(path):
        raise DatasetLayoutError(f"{what}: file not found: {path}\nexpected layout:\n{layout}")


class SegmentationDataset(torch.utils.data.Dataset):
    """Base class: subclasses set ``class_names``/``palette`` and implement ``__len__``/``load``."""

    class_names: Sequence[str] = ()
    palette: np.ndarray = np.zeros((0, 3), np.uint8)
    # Per-class CE weights the original recipe uses for this dataset (None: uniform).
    class_weights: Optional[Sequence[float]] = None

    def __init__(self, transform: Optional[Transform] = None):
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load(self, index: int) -> Tuple[Image.Image, np.ndarray]:
        raise NotImplementedError

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, key)
        image, label = self.load(int(index))
        if self.transform is None:
            from transkd_fast.data.transforms import to_tensors

            return to_tensors(image, label)
        return self.transform(image, label, np.random.default_rng(int(seed)))


def read_label(path: str) -> np.ndarray:
    """A label PNG as uint8 indices (palette images give their indices, not colors)."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            im = im.convert("L")
        arr = np.array(im)
    return arr.astype(np.uint8) if arr.dtype != np.uint8 else arr


def read_image(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")
