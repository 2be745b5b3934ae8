"""Scores of a batch of images under an inference mode: whole, sliding window, test-time augmentation.

One entry point, :func:`infer`::

    scores = infer(model, images, Inference("slide", crop=1024, stride=768), out_size=(h, w))
    pred = scores.argmax(1)

``images [B, 3, H, W]`` → ``scores [B, C, h, w]`` (float32), whose argmax over ``C`` is the
prediction; ``out_size=None`` gives the mode's own size (below). A model returning a tuple (a
distiller's student wrapper) gives its logits: element 1 of a triple, else element 0.

**whole** — one forward. The model's logits (SegFormer: ``⌈H/4⌉ × ⌈W/4⌉``), resized bilinearly
(``align_corners=False``) to ``out_size`` when that differs.

**slide** — mmseg's ``slide_inference``. Square crops of ``crop`` pixels, cut at
``y = i · stride`` for ``i < n_H = max(⌈(H − crop) / stride⌉, 0) + 1`` (mmseg writes it
``max(H − crop + stride − 1, 0) // stride + 1``), each crop clipped to the image and then moved
back so that it ends where it did (``y0 = max(min(i·stride + crop, H) − crop, 0)``): the last crop
lies flush with the border. Same along W. An image side shorter than ``crop`` gets one crop of
that side's length — the smaller patch is fed as it is, not padded (mmseg: "the small patch will
be used to decode without padding"; padding would show the model content that is not there).
Each crop's logits are resized bilinearly to the crop's pixel size and added into an ``H × W``
buffer; the sum is divided by the number of crops covering each pixel. The average is taken at
*full (input) resolution*, as mmseg does, because the crops' logit grids do not line up at the
logit resolution: a flush last crop starts at ``H − crop``, in general not a multiple of the
model's output stride (4), so its logit rows fall between the image's. At input resolution every
crop lands exactly on the pixels it was cut from. The result (``B × C × H × W``) is then resized
to ``out_size`` if given. ``stride ≤ crop`` is required (a larger stride leaves pixels no crop
sees); every pixel is covered at least once.

**TTA** (``tta_scales``; mmseg's ``MultiScaleFlipAug`` + ``SegTTAModel.merge_preds``) — views
``s × {no flip, horizontal flip}`` for each scale ``s`` (``flip=False``: no flipped views). A
view resizes the batch bilinearly (``align_corners=False``) to ``⌊s·H + ½⌋ × ⌊s·W + ½⌋`` (mmcv's
rounding)
(scales are relative to the image as it is given, i.e. after ``--height``), flips it, runs the
inner mode (whole or slide) with its logits resized to the output size (``out_size``, default
``H × W``), flips them back and takes the softmax over ``C``; the scores are the *mean of the
softmax probabilities* over the views. That is mmseg's rule (``logits += seg_logit.softmax(dim=0)``,
then ``logits /= len(data_samples)``; mmseg 0.x ``aug_test`` also averages the softmax outputs of
``inference``); averaging the raw logits instead would let one over-confident view outvote the
rest. Each view's logits are resized straight to the output size (mmseg goes through the view's
input size first, a second interpolation). Without TTA the scores are logits, with TTA
probabilities; the argmax is what the metrics use.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from transkd_fast.engine.config import ConfigError

MODES = ("whole", "slide")


def parse_scales(text) -> tuple[float, ...]:
    """``"0.5,0.75,1.0"`` (or a sequence of numbers) → ``(0.5, 0.75, 1.0)``; :class:`ConfigError`
    naming ``--tta-scales`` for an empty list, a word or a scale that is not a positive number."""
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    scales = []
    for t in items:
        try:
            v = float(t)
        except (TypeError, ValueError):
            raise ConfigError(f"--tta-scales must be comma-separated positive numbers, got {text!r}") from None
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"--tta-scales: every scale must be a positive number, got {t!r} in {text!r}")
        scales.append(v)
    if not scales:
        raise ConfigError(f"--tta-scales needs at least one scale, got {text!r}")
    return tuple(scales)


@dataclass(frozen=True)
class Inference:
    """How :func:`infer` turns images into scores (see the module docstring).

    ``mode``: ``"whole"`` | ``"slide"``; ``crop``, ``stride``: the sliding window (pixels), used
    by ``"slide"``; ``tta_scales``: None (no TTA) or the scales; ``flip``: TTA also averages the
    horizontally flipped view of every scale. Bad values raise :class:`ConfigError` naming the
    ``evaluate`` flag.
    """

    mode: str = "whole"
    crop: int = 1024
    stride: int = 768
    tta_scales: Optional[tuple[float, ...]] = None
    flip: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"--inference must be 'whole' or 'slide', got {self.mode!r}")
        for flag, v in (("--slide-crop", self.crop), ("--slide-stride", self.stride)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{flag} must be an integer ≥ 1, got {v!r}")
        if self.stride > self.crop:
            raise ConfigError(f"--slide-stride ({self.stride}) must be ≤ --slide-crop ({self.crop}): a larger "
                              "stride leaves pixels that no crop covers")
        if self.tta_scales is not None:
            object.__setattr__(self, "tta_scales", parse_scales(self.tta_scales))

    @classmethod
    def from_config(cls, cfg) -> "Inference":
        """From an :class:`~transkd_fast.engine.config.EvalConfig`, or anything with its
        ``inference``, ``slide_crop``, ``slide_stride`` (None: the default), ``tta``, ``tta_scales``
        (``predict``'s parsed arguments); the scales are checked even without ``--tta``."""
        scales = parse_scales(cfg.tta_scales)
        stride = cfg.slide_stride if cfg.slide_stride is not None else _default_stride(cfg.slide_crop)
        return cls(mode=cfg.inference, crop=cfg.slide_crop, stride=stride,
                   tta_scales=scales if cfg.tta else None)

    @property
    def views(self) -> list[tuple[float, bool]]:
        """``(scale, flipped)`` of every TTA view (one unflipped view at 1.0 without TTA)."""
        if self.tta_scales is None:
            return [(1.0, False)]
        return [(s, f) for s in self.tta_scales for f in ((False, True) if self.flip else (False,))]

    def describe(self) -> dict:
        """What ``eval.json`` records."""
        d = {"mode": self.mode}
        if self.mode == "slide":
            d.update(crop=self.crop, stride=self.stride, average="logits at input resolution")
        d["tta"] = None if self.tta_scales is None else {
            "scales": list(self.tta_scales), "flip": self.flip, "views": len(self.views),
            "average": "softmax probabilities"}
        return d


def _default_stride(crop) -> int:
    """``--slide-stride``'s default: mmseg's 768, or the crop itself when it is smaller (a stride
    above the crop would leave pixels uncovered). A non-integer crop is passed through for
    :class:`Inference` to refuse."""
    return min(768, crop) if isinstance(crop, int) and not isinstance(crop, bool) else crop


def slide_windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` of every crop of :func:`infer`'s slide mode over an ``h × w`` image,
    row by row (mmseg's arithmetic, see the module docstring)."""
    def starts(n: int) -> list[tuple[int, int]]:
        grids = max(n - crop + stride - 1, 0) // stride + 1
        out = []
        for i in range(grids):
            end = min(i * stride + crop, n)
            out.append((max(end - crop, 0), end))
        return out

    return [(y0, y1, x0, x1) for y0, y1 in starts(h) for x0, x1 in starts(w)]


def model_logits(model: nn.Module, images: torch.Tensor, what: str = "the image") -> torch.Tensor:
    """The model's logits ``[B, C, h, w]`` in float32 (a tuple output: element 1 of three, else 0).
    A model that cannot take the input's size (too small for its kernels) raises ValueError
    saying which input (``what``) it was."""
    try:
        out = model(images)
    except RuntimeError as e:
        if isinstance(e, torch.cuda.OutOfMemoryError) or "size" not in str(e).lower():
            raise
        h, w = images.shape[-2:]
        raise ValueError(f"the model cannot run on {what} ({h}×{w} pixels): {e}") from e
    if isinstance(out, (tuple, list)):
        out = out[1] if len(out) == 3 else out[0]
    if out.dim() != 4 or out.shape[0] != images.shape[0]:
        raise ValueError(f"the model returned logits of shape {tuple(out.shape)} for images "
                         f"{tuple(images.shape)}; expected [B, C, h, w]")
    return out.float()


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    size = tuple(int(v) for v in size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _slide(model: nn.Module, images: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    b, _, h, w = images.shape
    total = count = None
    for y0, y1, x0, x1 in slide_windows(h, w, crop, stride):
        crop_ = images[:, :, y0:y1, x0:x1]
        logits = _resize(model_logits(model, crop_, f"a --slide-crop {crop} crop"), (y1 - y0, x1 - x0))
        if total is None:
            total = logits.new_zeros((b, logits.shape[1], h, w))
            count = logits.new_zeros((1, 1, h, w))
        total[:, :, y0:y1, x0:x1] += logits
        count[:, :, y0:y1, x0:x1] += 1
    return total / count


def _single(model: nn.Module, images: torch.Tensor, inference: Inference, out_size,
            what: str = "the image") -> torch.Tensor:
    if inference.mode == "slide":
        logits = _slide(model, images, inference.crop, inference.stride)
    else:
        logits = model_logits(model, images, what)
    return logits if out_size is None else _resize(logits, out_size)


@torch.no_grad()
def infer(model: nn.Module, images: torch.Tensor, inference: Optional[Inference] = None,
          out_size: Optional[Sequence[int]] = None, amp: str = "none", precision: str = "fp32") -> torch.Tensor:
    """Scores ``[B, C, h, w]`` (float32) of ``images [B, 3, H, W]`` under ``inference`` (default:
    whole, no TTA), at ``out_size`` ``(h, w)`` — default: the model's logit grid (whole), ``H × W``
    (slide, TTA). Logits without TTA, mean softmax probabilities with it (module docstring).
    ``amp``: ``"none"`` | ``"bf16"`` (CUDA or CPU) | ``"fp16"`` (CUDA only) autocast.
    ``precision``: ``"bf16"`` runs inside :func:`transkd_fast.precision.inference_context` (pair it
    with a model from ``prepare_for_inference``). The model is used as it is: put it in eval mode
    first."""
    from transkd_fast.engine.trainer import autocast_context  # the trainer imports this module
    from transkd_fast.precision import inference_context

    inference = inference or Inference()
    if not torch.is_tensor(images) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError("infer: images must be a float tensor [B, 3, H, W], got "
                         f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")
    with autocast_context(amp, images.device), \
            (inference_context(precision, images.device) if precision != "fp32" else contextlib.nullcontext()):
        if inference.tta_scales is None:
            return _single(model, images, inference, out_size)
        h, w = images.shape[-2:]
        size = (h, w) if out_size is None else tuple(int(v) for v in out_size)
        probs = None
        for scale, flipped in inference.views:
            x = _resize(images, (max(1, int(scale * h + 0.5)), max(1, int(scale * w + 0.5))))
            if flipped:
                x = x.flip(-1)
            logits = _single(model, x, inference, size, f"the --tta-scales {scale:g} view")
            if flipped:
                logits = logits.flip(-1)
            p = logits.softmax(1)
            probs = p if probs is None else probs + p
        return probs / len(inference.views)
