"""The dataset protocol shared by every loader, and the checks every loaded file goes through.

A dataset knows how to *load* sample ``i`` as ``(PIL RGB image, uint8 label array)`` where
the label holds train ids ``0..num_classes-1`` and ``255`` for void. Augmentation is not
drawn from a global RNG: ``ds[(i, aug_seed)]`` applies the transform with
``numpy.random.default_rng(aug_seed)``, so a batch is a pure function of the indices and
seeds the sampler hands out (this is what makes ``--resume`` and DDP runs exact).
``ds[i]`` (an int) uses seed ``i``.

Nothing is loaded silently wrong: :meth:`SegmentationDataset.load_pair` raises
:class:`DataError`, naming the file, when

- a file cannot be decoded (truncated or not an image at all);
- an image is not 8-bit (``I;16`` / ``I`` / ``F`` images would be clipped to 0..255);
- a label is not single-channel (``L``, ``P`` palette indices, or 16/32-bit ``I;16`` / ``I``):
  an RGB label is refused with a hint (a colour-coded map, or a grey map saved as RGB);
- a label holds an id outside ``[0, K) ∪ {255}`` (read at its true bit depth: a 16-bit id 263
  is 263, not 263 mod 256);
- a label's size differs from its image's, unless the dataset was built with
  ``label_resize=True`` (then the label is resized to the image, nearest).
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

# Label PNG modes that hold one class id per pixel (P: palette indices, not colours).
LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N")
# Image modes that convert to RGB without losing range (16/32-bit and float images would clip).
IMAGE_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1")


class DataError(ValueError):
    """A dataset file is unusable or would load wrongly (unreadable, wrong mode, label ids out of
    range, label size differing from its image, a missing file or directory); the message names
    the file(s)."""


class DatasetLayoutError(FileNotFoundError, DataError):
    """A dataset directory or file is missing; the message names it and the expected layout.
    (Both a ``FileNotFoundError`` and a :class:`DataError`.)"""


def require_dir(path: str, layout: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DatasetLayoutError(f"{what}: directory not found: {path}\nexpected layout:\n{layout}")


def require_file(path: str, layout: str, what: str) -> None:
    if not os.path.isfile(path):
        raise DatasetLayoutError(f"{what}: file not found: {path}\nexpected layout:\n{layout}")


class SegmentationDataset(torch.utils.data.Dataset):
    """Base class: subclasses set ``class_names``/``palette`` and implement ``__len__``/``load``.

    File-backed subclasses load through :meth:`load_pair`, which validates (see the module
    docstring). ``label_resize``: resize a label whose size differs from its image's (nearest)
    instead of raising :class:`DataError`.
    """

    class_names: Sequence[str] = ()
    palette: np.ndarray = np.zeros((0, 3), np.uint8)
    # Per-class CE weights the original recipe uses for this dataset (None: uniform).
    class_weights: Optional[Sequence[float]] = None
    # Training crop for datasets whose images differ in size (``(h, w)``, None: images share one
    # size) and the random scale range that goes with it; see ``SegTransform(crop_size=...)``.
    default_crop_size: Optional[Tuple[int, int]] = None
    default_scale_range: Optional[Tuple[float, float]] = None

    def __init__(self, transform: Optional[Transform] = None, label_resize: bool = False):
        self.transform = transform
        self.label_resize = bool(label_resize)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load(self, index: int) -> Tuple[Image.Image, np.ndarray]:
        raise NotImplementedError

    def load_pair(self, image_path: str, label_path: str, num_ids: Optional[int] = None,
                  id_map: Optional[np.ndarray] = None, what: str = "train ids") -> Tuple[Image.Image, np.ndarray]:
        """Read and validate one (image, label) pair.

        The label's ids must lie in ``[0, num_ids) ∪ {255}`` (``num_ids`` defaults to
        :attr:`num_classes`); ``id_map`` (a 256-entry lookup table) is then applied, e.g.
        Cityscapes label ids → train ids. ``what`` names the id kind in error messages.
        """
        image = read_image(image_path)
        label = read_label(label_path)
        label = check_label_ids(label, label_path, self.num_classes if num_ids is None else num_ids, what)
        if id_map is not None:
            label = id_map[label]
        w, h = image.size
        if label.shape != (h, w):
            lh, lw = label.shape
            if not self.label_resize:
                raise DataError(
                    f"label {label_path} is {lw}x{lh} (WxH) but its image {image_path} is {w}x{h}"
                    f"{' (a different aspect ratio)' if lw * h != lh * w else ''}: a label must be the size of "
                    "its image; build the dataset with label_resize=True (--label-resize) to resize labels to "
                    "their images (nearest)")
            label = np.array(Image.fromarray(label).resize((w, h), Image.NEAREST))
        return image, label

    def check_files(self, indices: Optional[Sequence[int]] = None, max_errors: Optional[int] = None) -> list[str]:
        """Load every sample (or those in ``indices``) through the checks of :meth:`load_pair`
        and return the :class:`DataError` messages, one per bad sample (empty: every file is
        good), stopping after ``max_errors``. One decode per file: a way to find every bad file
        before a long run instead of one at a time in the middle of it."""
        errors: list[str] = []
        for i in (range(len(self)) if indices is None else indices):
            try:
                self.load(int(i))
            except DataError as e:
                errors.append(f"sample {i}: {e}")
                if max_errors is not None and len(errors) >= max_errors:
                    break
        return errors

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, key)
        image, label = self.load(int(index))
        if self.transform is None:
            from transkd_fast.data.transforms import to_tensors

            return to_tensors(image, label)
        return self.transform(image, label, np.random.default_rng(int(seed)))


def _rgb_label_hint(path: str, im: Image.Image) -> str:
    arr = np.asarray(im.convert("RGB"))
    if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
        return ("its three channels are equal: a grey id map saved as RGB; re-save it as a single-channel "
                "(mode L) PNG")
    return ("it looks like a colour-coded map (e.g. Cityscapes *_gtFine_color.png, or a VOC palette PNG re-saved "
            "as RGB): use the id PNGs (*_labelTrainIds.png / *_labelIds.png, or the original palette PNG), or map "
            "the colours to class ids first")


def read_label(path: str) -> np.ndarray:
    """A label PNG as class indices at its true bit depth: uint8 for ``L`` / ``P`` (palette
    images give their indices, not colours), int32 for 16/32-bit ones. Any other mode (RGB,
    RGBA, LA, float, ...) raises :class:`DataError` naming the file."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in LABEL_MODES:
                channels = len(im.getbands())
                hint = _rgb_label_hint(path, im) if mode in ("RGB", "RGBA", "RGBX") else \
                    "save labels as single-channel class-id PNGs"
                raise DataError(f"label {path} has {channels} channel{'s' * (channels != 1)} (mode {mode}); a label "
                                f"must be a single-channel PNG of class ids (mode L, P palette or 16-bit I;16): {hint}")
            arr = np.array(im)
    except DataError:
        raise
    except Exception as e:  # truncated / not an image / unreadable
        raise DataError(f"cannot read label {path}: {type(e).__name__}: {e}") from e
    if arr.ndim != 2:
        raise DataError(f"label {path}: expected a 2-D array of class ids, got shape {arr.shape} (mode {mode})")
    return arr if arr.dtype == np.uint8 else arr.astype(np.int32)


def check_label_ids(label: np.ndarray, path: str, num_ids: int, what: str = "train ids") -> np.ndarray:
    """``label`` as uint8 after checking every id is in ``[0, num_ids) ∪ {255}``; otherwise
    :class:`DataError` naming ``path``, the offending ids and their pixel counts."""
    if label.dtype == np.uint8:
        counts = np.bincount(label.ravel(), minlength=256)
        values = np.arange(256)
    else:
        values, counts = np.unique(label, return_counts=True)
    bad = ((values < 0) | (values >= num_ids)) & (values != VOID) & (counts > 0)
    if bad.any():
        shown = ", ".join(f"{int(v)} ({int(c)} px)" for v, c in zip(values[bad][:8], counts[bad][:8]))
        more = f" and {int(bad.sum()) - 8} more" if bad.sum() > 8 else ""
        raise DataError(f"label {path} holds ids outside [0, {num_ids}) and void {VOID} ({what}): {shown}{more}")
    return label if label.dtype == np.uint8 else label.astype(np.uint8)


def read_image(path: str) -> Image.Image:
    """An image file as a PIL RGB image, decoded now; :class:`DataError` naming the file when it
    cannot be decoded or is not an 8-bit image."""
    try:
        with Image.open(path) as im:
            if im.mode not in IMAGE_MODES:
                raise DataError(f"image {path} has mode {im.mode}: only 8-bit images are read (converting it to "
                                "RGB would clip its values); convert it to 8-bit RGB first")
            return im.convert("RGB")
    except DataError:
        raise
    except Exception as e:  # truncated / not an image / unreadable
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
