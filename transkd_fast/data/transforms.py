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

With ``crop_size`` (training only; the standard pipeline for datasets whose images differ in
size, e.g. Pascal VOC: mmseg's ``Resize(ratio_range) → RandomCrop → RandomFlip → Pad``), step 2
is instead, in this order of random draws:

a. a random scale ``s ~ U(scale_range)``: the image (already at ``height``, if given) is resized
   to ``round(s·H) × round(s·W)`` (bilinear) and the label to the same size (nearest);
b. a horizontal flip with probability ½;
c. a random crop of ``crop_size`` (``(h, w)``; offsets uniform over the valid positions, 0
   along a side shorter than the crop);
d. padding at the bottom/right up to ``crop_size``: the image with 0 *after* normalization (the
   mean colour when ``mean`` is set, black otherwise), the label with void (255);

then the label goes to the label grid of the crop (nearest), so every sample has one size and a
batch stacks. There is no translation in this mode (the crop already moves the content), and no
``cat_max_ratio`` re-drawing.

Evaluation keeps whole images; batches of different sizes go through :func:`pad_collate`
(or use batch size 1, which is exact: padding changes the context the model sees).

Two evaluation protocols need other resizes (``evaluate --protocol``, defaults unchanged):

- ``resize="shorter_edge"`` (``--protocol transkd``): the original's torchvision
  ``Resize(height)`` — the *shorter* edge becomes ``height`` and the longer one
  ``int(height · long / short)``, truncated (:func:`resized_size`);
- ``native_label=True`` (``--protocol full``, the mmseg protocol): the label keeps its native size
  whatever the image resize; the predictions are resized to it.

All randomness comes from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

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


RESIZE_MODES = ("height", "shorter_edge")


def resized_size(h: int, w: int, target: Optional[int], mode: str = "height") -> Tuple[int, int]:
    """``(h', w')`` of an ``h × w`` image resized to ``target`` (None: unchanged).

    - ``"height"`` (ours): ``h' = target``, ``w' = max(1, round(w · target / h))`` — the nearest
      aspect ratio.
    - ``"shorter_edge"`` (the original TransKD's ``torchvision.transforms.Resize(target)``, in
      ``eval/eval_cityscapes_iou.py`` and the training scripts): the shorter edge becomes ``target``
      and the other ``int(target · long / short)``, truncated; unchanged when the shorter edge is
      already ``target`` (torchvision's ``_compute_resized_output_size`` / ``F_pil.resize``).
      101×203 at 64 → 64×128 there (64×129 with ``"height"``); a portrait 203×101 → 128×64.
    """
    if target is None:
        return h, w
    if mode == "height":
        return (h, w) if h == target else (target, max(1, int(round(w * target / h))))
    if mode == "shorter_edge":
        short, long = (w, h) if w <= h else (h, w)
        if short == target:
            return h, w
        new_long = int(target * long / short)  # torchvision's arithmetic, operand order included
        return (new_long, target) if w <= h else (target, new_long)
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {mode!r}")


def _nearest_resize(label: np.ndarray, h: int, w: int) -> np.ndarray:
    if label.shape == (h, w):
        return label
    return np.array(Image.fromarray(label).resize((w, h), Image.NEAREST))


def _pad_to(arr: np.ndarray, h: int, w: int, fill) -> np.ndarray:
    if arr.shape[0] >= h and arr.shape[1] >= w:
        return arr
    out = np.full((max(h, arr.shape[0]), max(w, arr.shape[1])) + arr.shape[2:], fill, dtype=arr.dtype)
    out[: arr.shape[0], : arr.shape[1]] = arr
    return out


def pad_collate(batch: Sequence[Tuple[torch.Tensor, torch.Tensor]], image_fill: float = 0.0,
                label_fill: int = VOID) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(image [3, H, W], label [h, w])`` samples of different sizes: each is padded at the
    bottom/right to the batch's largest image and label, images with ``image_fill`` (0: the mean
    colour of normalized images), labels with ``label_fill`` (255, void: ignored by the CE and by
    the metrics, whether or not void is a class). Samples of one size give exactly
    ``default_collate``'s batch. For ``DataLoader(collate_fn=pad_collate)``."""
    images, labels = zip(*batch)
    hi, wi = max(x.shape[-2] for x in images), max(x.shape[-1] for x in images)
    hl, wl = max(y.shape[-2] for y in labels), max(y.shape[-1] for y in labels)
    x = images[0].new_full((len(images), images[0].shape[0], hi, wi), image_fill)
    y = labels[0].new_full((len(labels), hl, wl), label_fill)
    for i, (img, lab) in enumerate(zip(images, labels)):
        x[i, :, : img.shape[-2], : img.shape[-1]] = img
        y[i, : lab.shape[-2], : lab.shape[-1]] = lab
    return x, y


class SegTransform:
    """The recipe's transform (see the module docstring).

    Args:
        height: target image height (None: keep the size).
        train: apply the random flip and translation.
        label_scale: 4 (paper: labels at 1/4 resolution) or 1 (full resolution).
        max_translate: translation range in label pixels (the original: 2).
        void_id: where void goes (see :class:`VoidMapping`).
        mean, std: normalization (None: plain [0, 1], as the original).
        crop_size: training crop ``(h, w)`` (an int: square) of the scale/crop/pad pipeline, for
            images of different sizes (see the module docstring; e.g. ``ds.default_crop_size``);
            None: the recipe's flip + translation. Training only (``ValueError`` with
            ``train=False``: evaluation keeps whole images, see :func:`pad_collate`).
        scale_range: ``(lo, hi)`` of the random scale with ``crop_size`` (None: no rescaling;
            e.g. ``ds.default_scale_range``, (0.5, 2.0) for VOC). Needs ``crop_size``.
        resize: how ``height`` resizes the image (:func:`resized_size`): ``"height"`` (the image
            height, width rounded) or ``"shorter_edge"`` (the original's torchvision ``Resize``).
        native_label: evaluation only (``label_scale=1``): keep the label at its native size
            instead of the resized image's (the mmseg protocol: predictions resized to the
            original annotation).
    """

    def __init__(self, height: Optional[int] = None, train: bool = False, label_scale: int = 4,
                 max_translate: int = 2, hflip: bool = True, void_id: Optional[int] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 crop_size: Union[None, int, Sequence[int]] = None,
                 scale_range: Optional[Sequence[float]] = None, resize: str = "height",
                 native_label: bool = False):
        self._init_args = dict(height=height, train=train, label_scale=label_scale, max_translate=max_translate,
                               hflip=hflip, void_id=void_id, mean=mean, std=std, crop_size=crop_size,
                               scale_range=scale_range, resize=resize, native_label=native_label)
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        if native_label and (train or label_scale != 1):
            raise ValueError("native_label is for evaluation at full resolution (train=False, label_scale=1)")
        if label_scale not in (1, 4):
            raise ValueError(f"label_scale must be 1 (full resolution) or 4 (paper), got {label_scale}")
        if crop_size is not None:
            crop = (int(crop_size), int(crop_size)) if isinstance(crop_size, (int, np.integer)) else \
                tuple(int(v) for v in crop_size)
            if len(crop) != 2 or min(crop) < 1:
                raise ValueError(f"crop_size must be a positive int or (h, w), got {crop_size!r}")
            if not train:
                raise ValueError("crop_size is a training augmentation; evaluation keeps whole images "
                                 "(batch size 1, or DataLoader(collate_fn=pad_collate))")
            crop_size = crop
        if scale_range is not None:
            if crop_size is None:
                raise ValueError("scale_range needs crop_size (the random scale is part of the scale/crop/pad "
                                 "pipeline)")
            lo, hi = (float(v) for v in scale_range)
            if not 0 < lo <= hi:
                raise ValueError(f"scale_range must be (lo, hi) with 0 < lo <= hi, got {scale_range!r}")
            scale_range = (lo, hi)
        self.crop_size: Optional[Tuple[int, int]] = crop_size
        self.scale_range: Optional[Tuple[float, float]] = scale_range
        self.height, self.train, self.label_scale = height, train, label_scale
        self.max_translate, self.hflip = max_translate, hflip
        self.void = VoidMapping(void_id)
        self.mean, self.std = mean, std
        self.resize, self.native_label = resize, bool(native_label)

    def replace(self, **changes) -> "SegTransform":
        """A copy with some constructor arguments changed (e.g. ``t.replace(resize="shorter_edge")``)."""
        return SegTransform(**{**self._init_args, **changes})

    def label_size(self, h: int, w: int) -> Tuple[int, int]:
        if self.label_scale == 1:
            return h, w
        return -(-h // 4), -(-w // 4)

    def __call__(self, image: Image.Image, label: np.ndarray, rng: np.random.Generator):
        if self.crop_size is not None:
            return self._scale_crop_pad(image, label, rng)
        w0, h0 = image.size
        h, w = resized_size(h0, w0, self.height, self.resize)
        if (h, w) != (h0, w0):
            image = image.resize((w, h), Image.BILINEAR)
        lh, lw = label.shape[:2] if self.native_label else self.label_size(h, w)
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

    def _scale_crop_pad(self, image: Image.Image, label: np.ndarray, rng: np.random.Generator):
        w, h = image.size
        h, w = resized_size(h, w, self.height, self.resize)
        if self.scale_range is not None:
            s = float(rng.uniform(*self.scale_range))
            h, w = max(1, int(round(h * s))), max(1, int(round(w * s)))
        if image.size != (w, h):
            image = image.resize((w, h), Image.BILINEAR)
        label = _nearest_resize(label, h, w)
        img = np.asarray(image, dtype=np.uint8)
        flip = rng.random() < 0.5
        if flip and self.hflip:
            img, label = img[:, ::-1], label[:, ::-1]
        ch, cw = self.crop_size
        y0 = int(rng.integers(0, max(0, h - ch) + 1))
        x0 = int(rng.integers(0, max(0, w - cw) + 1))
        img, label = img[y0:y0 + ch, x0:x0 + cw], label[y0:y0 + ch, x0:x0 + cw]
        label = _pad_to(np.ascontiguousarray(label), ch, cw, VOID)
        lh, lw = self.label_size(ch, cw)
        label = _nearest_resize(label, lh, lw)
        x, y = to_tensors(Image.fromarray(np.ascontiguousarray(img)), label, self.mean, self.std)
        if x.shape[-2:] != (ch, cw):
            padded = x.new_zeros((3, ch, cw))
            padded[:, : x.shape[1], : x.shape[2]] = x
            x = padded
        return x, self.void(y)
