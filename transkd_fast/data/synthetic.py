"""A procedural segmentation dataset: textured shapes on cluttered backgrounds.

Sample ``i`` of split ``s`` is drawn from ``numpy.random.default_rng([seed, split_id, i])``:
deterministic for a given seed, with no files and no downloads.

Classes: ``background`` plus every (shape, texture) pair of 4 shapes (disk, square,
triangle, cross) × 2 textures (stripes, checker) = 9 classes. Colors are random per
object, so neither color nor texture alone names the class: the model has to see the
outline *and* the texture. The background is cluttered with low-frequency color noise,
random lines and *distractors* — thin bars and small blobs carrying the same textures —
which are labeled background. Objects vary in size and rotation, overlap (later ones on
top), and their outlines (a 1-pixel band where the label changes) are void (255), as
Cityscapes' ambiguous borders are. Gaussian pixel noise is added last.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image

from transkd_fast.data.base import VOID, SegmentationDataset, Transform

SHAPES = ("disk", "square", "triangle", "cross")
TEXTURES = ("stripes", "checker")
SYNTHETIC_CLASSES = ("background",) + tuple(f"{s}-{t}" for s in SHAPES for t in TEXTURES)
SYNTHETIC_PALETTE = np.array([
    (0, 0, 0), (230, 25, 75), (245, 130, 48), (255, 225, 25), (60, 180, 75),
    (70, 240, 240), (0, 130, 200), (145, 30, 180), (240, 50, 230),
], dtype=np.uint8)
_SPLITS = {"train": 0, "val": 1, "test": 2}


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Mask of ``shape`` of radius ``r`` in rotated coordinates (u, v) centered on the object."""
    if shape == "disk":
        return u * u + v * v <= r * r
    if shape == "square":
        s = r * 0.85
        return (np.abs(u) <= s) & (np.abs(v) <= s)
    if shape == "triangle":
        # Equilateral, circumradius r: inside the three half-planes at distance r/2 from the center.
        m = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = np.pi / 2 + 2 * np.pi * k / 3
            m &= (u * np.cos(a) + v * np.sin(a)) <= r / 2
        return m
    if shape == "cross":
        t = r * 0.38
        return ((np.abs(u) <= r) & (np.abs(v) <= t)) | ((np.abs(v) <= r) & (np.abs(u) <= t))
    raise ValueError(shape)


def _texture(kind: str, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A {0, 1} pattern of random period and orientation."""
    period = rng.uniform(3.0, 7.0)
    a = rng.uniform(0, np.pi)
    u = xx * np.cos(a) + yy * np.sin(a)
    if kind == "stripes":
        return (np.floor(u / period) % 2).astype(np.float32)
    v = -xx * np.sin(a) + yy * np.cos(a)
    return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)


def _color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def render_sample(rng: np.random.Generator, height: int, width: int, min_objects: int = 2, max_objects: int = 6,
                  n_distractors: int = 6, noise: float = 12.0):
    """One (image uint8 [H, W, 3], label uint8 [H, W]) pair drawn from ``rng``."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # Low-frequency color noise: a coarse random grid upsampled bilinearly.
    gh, gw = max(2, height // 16), max(2, width // 16)
    coarse = rng.uniform(30, 225, size=(gh, gw, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.float32).copy()
    label = np.zeros((height, width), np.uint8)
    scale = min(height, width)

    def paint(mask: np.ndarray, texture_kind: str) -> None:
        pattern = _texture(texture_kind, yy, xx, rng)[..., None]
        c0, c1 = _color(rng), _color(rng)
        while np.abs(c0 - c1).sum() < 120:  # keep the texture visible
            c1 = _color(rng)
        img[mask] = (c0 * (1 - pattern) + c1 * pattern)[mask]

    for _ in range(int(rng.integers(3, 7))):  # random lines
        x0, x1 = rng.uniform(0, width, 2)
        y0, y1 = rng.uniform(0, height, 2)
        d = np.abs((y1 - y0) * xx - (x1 - x0) * yy + x1 * y0 - y1 * x0) / (np.hypot(y1 - y0, x1 - x0) + 1e-6)
        img[d <= rng.uniform(0.5, 1.5)] = _color(rng)
    for _ in range(n_distractors):  # textured clutter that is still background
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        a = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
        v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
        if rng.random() < 0.5:
            mask = (np.abs(u) <= rng.uniform(0.25, 0.6) * scale) & (np.abs(v) <= rng.uniform(1.5, 3.0))
        else:
            r = rng.uniform(0.04, 0.08) * scale
            mask = (u / r) ** 2 + (v / (0.6 * r)) ** 2 <= 1.0
        paint(mask, TEXTURES[int(rng.integers(len(TEXTURES)))])
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        s, t = int(rng.integers(len(SHAPES))), int(rng.integers(len(TEXTURES)))
        r = rng.uniform(0.12, 0.3) * scale
        cy, cx = rng.uniform(r * 0.5, height - r * 0.5), rng.uniform(r * 0.5, width - r * 0.5)
        a = rng.uniform(0, 2 * np.pi)
        u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
        v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
        mask = _shape_mask(SHAPES[s], u, v, r)
        paint(mask, TEXTURES[t])
        label[mask] = 1 + s * len(TEXTURES) + t
    img += rng.normal(0, noise, size=img.shape).astype(np.float32)
    # Void outlines: pixels whose label differs from a 4-neighbour.
    edge = np.zeros_like(label, dtype=bool)
    edge[:-1] |= label[:-1] != label[1:]
    edge[1:] |= label[1:] != label[:-1]
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    label[edge] = VOID
    return np.clip(img, 0, 255).astype(np.uint8), label


class Synthetic(SegmentationDataset):
    """Procedural textured shapes (see the module docstring); ``split`` in train | val | test."""

    class_names = SYNTHETIC_CLASSES
    palette = SYNTHETIC_PALETTE

    def __init__(self, split: str = "train", num_samples: int = 256, height: int = 64, width: int = 128,
                 seed: int = 0, transform: Optional[Transform] = None, cache: bool = True):
        super().__init__(transform)
        if split not in _SPLITS:
            raise ValueError(f"synthetic split must be one of {', '.join(_SPLITS)}, got {split!r}")
        self.split, self.num_samples, self.height, self.width, self.seed = split, num_samples, height, width, seed
        self._cache: Optional[dict] = {} if cache else None

    def __len__(self) -> int:
        return self.num_samples

    def load(self, index: int):
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        if self._cache is not None and index in self._cache:
            img, lab = self._cache[index]
        else:
            rng = np.random.default_rng([self.seed, _SPLITS[self.split], index])
            img, lab = render_sample(rng, self.height, self.width)
            if self._cache is not None:
                self._cache[index] = (img, lab)
        return Image.fromarray(img), lab.copy()
