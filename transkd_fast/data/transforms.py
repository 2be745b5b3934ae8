"""Joint image/label transforms of the TransKD recipe.

:class:`SegTransform` does, in order:

1. resize the image so its height is ``height`` (bilinear, aspect kept, width rounded) and the
   label to the *label grid*: ``⌈H/4⌉ × ⌈W/4⌉`` in the paper's quarter-resolution mode
   (``label_scale=4``, the size of SegFormer's 1/4-resolution logits; the original rounded,
   which differs only when H or W is 1 mod 4), or ``H × W``
   in full-resolution mode (``label_scale=1``, logits upsampled to the labels), nearest;
2. training only: horizontal flip with probability ½; a translation of ``t`` label pixels in
   x and y, ``t`` uniform in ``[-max_translate, max_translate]``, the image moved by
   ``t·label_scale`` pixels so both stay aligned, uncovered pixels filled with 0 (image) and
   void (label). (The original moved the 1/4-res label by the same number of pixels as the
   image and filled the far side of a negative shift with label 0; here both are aligned and
   void-filled);
3. image to float in ``[0, 1]`` (the original's ``ToTensor``), optionally normalized;
4. void handling (:class:`VoidMapping`): void pixels (255) become ``void_id`` — the 20th
   output of the 20-output recipe (``void_id=19``, CE weight 0) — or stay 255 to be ignored.

All randomness comes from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from transkd_fast.data.base import VOID

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class VoidMapping:
    """Where void (255) pixels go. ``void_id=None``: stay 255 (ignored via ``ignore_index``)."""

    void_id: Optional[int] = None

    def __call__(self, label: torch.Tensor) -> torch.Tensor:
        if self.void_id is None:
            return label
        return torch.where(label == VOID, torch.full_like(label, self.void_id), label)


def to_tensors(image: Image.Image, label: np.ndarray,
               mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    img = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    if mean is not None:
        m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        s = torch.tensor(std if std is not None else (1.0, 1.0, 1.0), dtype=torch.float32).view(3, 1, 1)
        img = (img - m) / s
    return img, torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))


def _shift(arr: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """Move content by (dy, dx) pixels; uncovered pixels get ``fill``."""
    out = np.full_like(arr, fill)
    h, w = arr.shape[:2]
    if abs(dy) >= h or abs(dx) >= w:
        return out
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = arr[ys, xs]
    return out


class SegTransform:
    """The recipe's transform (see the module docstring).

    Args:
        height: target image height (None: keep the size).
        train: apply the random flip and translation.
        label_scale: 4 (paper: labels at 1/4 resolution) or 1 (full resolution).
        max_translate: translation range in label pixels (the original: 2).
        void_id: where void goes (see :class:`VoidMapping`).
        mean, std: normalization (None: plain [0, 1], as the original).
    """

    def __init__(self, height: Optional[int] = None, train: bool = False, label_scale: int = 4,
                 max_translate: int = 2, hflip: bool = True, void_id: Optional[int] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        if label_scale not in (1, 4):
            raise ValueError(f"label_scale must be 1 (full resolution) or 4 (paper), got {label_scale}")
        self.height, self.train, self.label_scale = height, train, label_scale
        self.max_translate, self.hflip = max_translate, hflip
        self.void = VoidMapping(void_id)
        self.mean, self.std = mean, std

    def label_size(self, h: int, w: int) -> Tuple[int, int]:
        if self.label_scale == 1:
            return h, w
        return -(-h // 4), -(-w // 4)

    def __call__(self, image: Image.Image, label: np.ndarray, rng: np.random.Generator):
        w0, h0 = image.size
        if self.height is not None and self.height != h0:
            w = max(1, int(round(w0 * self.height / h0)))
            image = image.resize((w, self.height), Image.BILINEAR)
        w, h = image.size
        lh, lw = self.label_size(h, w)
        if label.shape != (lh, lw):
            label = np.array(Image.fromarray(label).resize((lw, lh), Image.NEAREST))
        img = np.asarray(image, dtype=np.uint8)
        if self.train:
            flip = rng.random() < 0.5
            t = self.max_translate
            ty, tx = (int(v) for v in rng.integers(-t, t + 1, size=2)) if t > 0 else (0, 0)
            if flip and self.hflip:
                img, label = img[:, ::-1], label[:, ::-1]
            if tx or ty:
                s = self.label_scale
                img = _shift(img, ty * s, tx * s, 0)
                label = _shift(label, ty, tx, VOID)
        x, y = to_tensors(Image.fromarray(np.ascontiguousarray(img)), label, self.mean, self.std)
        return x, self.void(y)
