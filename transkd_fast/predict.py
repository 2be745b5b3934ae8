"""``transkd-fast predict``: segment images (a file, a folder, a glob; any size) and write PNGs.

For each input image ``<stem>.<ext>`` it writes, under the output folder (a folder given as input
keeps its sub-folders there):

- ``<stem>_color.png`` (``color``): the prediction in the dataset's palette;
- ``<stem>_overlay.png`` (``--overlay``): that colouring blended over the image (``--alpha``);
- ``<stem>_ids.png`` (``ids``): the class ids, one 8-bit grey value per pixel (16-bit past 255);
- ``<stem>_labelIds.png`` (``labelids``): Cityscapes *label ids* (7 road, 8 sidewalk, … 33
  bicycle: train id → label id, the inverse of :data:`transkd_fast.data.LABEL_ID_TO_TRAIN_ID`),
  what the official Cityscapes test server takes (it finds each file by its
  ``<city>_<seq>_<frame>`` prefix). 19-class models only.

Inference follows ``evaluate --resolution full``: the image in [0, 1] (ImageNet-normalized when
the model was trained with ``--normalize``: read from a training checkpoint, else the flag), resized
to ``--height`` if given (bilinear, aspect kept), logits upsampled bilinearly to the image's own
size, argmax over the classes — a void output (the paper's 20-output recipe) is never predicted.
Images of equal size are batched (``--batch-size``); sizes are not padded to share a batch, since
padding changes what the model sees. ``--inference slide`` (``--slide-crop``, ``--slide-stride``)
and ``--tta`` (``--tta-scales`` + flip) score each resized image as ``evaluate`` does
(:func:`transkd_fast.engine.inference.infer`: logits, or mean softmax probabilities under TTA,
then upsampled to the image's size). ``--precision bf16`` runs the network in bfloat16
(:mod:`transkd_fast.precision`); its logits come back in fp32 before the upsampling and argmax.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
OUTPUT_KINDS = ("color", "ids", "labelids")
SUFFIX = {"color": "_color.png", "overlay": "_overlay.png", "ids": "_ids.png", "labelids": "_labelIds.png"}


def _known() -> dict:
    from transkd_fast.data.cityscapes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
    from transkd_fast.data.nyuv2 import NYUV2_CLASSES, NYUV2_PALETTE
    from transkd_fast.data.synthetic import SCENE_CLASSES, SCENE_PALETTE, SYNTHETIC_CLASSES, SYNTHETIC_PALETTE
    from transkd_fast.data.voc import VOC_CLASSES, VOC_PALETTE

    return {"synthetic": (SYNTHETIC_CLASSES, SYNTHETIC_PALETTE),
            "scenes": (SCENE_CLASSES, SCENE_PALETTE),
            "cityscapes": (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE),
            "acdc": (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE),
            "voc": (VOC_CLASSES, VOC_PALETTE),
            "nyuv2": (NYUV2_CLASSES, NYUV2_PALETTE)}


def dataset_classes(num_classes: int, dataset: Optional[str] = None) -> tuple[Optional[Sequence[str]], np.ndarray]:
    """Class names and palette: ``dataset``'s, else those of the one known dataset with
    ``num_classes`` classes (Cityscapes 19, VOC 21, NYUv2 40, synthetic textures 9, scenes 7), else
    (None, a bit palette)."""
    known = _known()
    if dataset is not None:
        key = dataset.lower()
        if key not in known:
            raise ValueError(f"--dataset {dataset!r} is not a dataset; choose one of {', '.join(known)}")
        names, pal = known[key]
        if len(names) != num_classes:
            raise ValueError(f"--dataset {dataset} has {len(names)} classes, the model predicts {num_classes}")
        return names, np.asarray(pal)
    match = [v for k, v in known.items() if len(v[0]) == num_classes and k != "acdc"]
    if len(match) == 1:
        return match[0][0], np.asarray(match[0][1])
    from transkd_fast.data.voc import bit_palette

    return None, bit_palette(num_classes)


def train_ids_to_label_ids(ids: np.ndarray) -> np.ndarray:
    """Cityscapes train ids (0..18) → official label ids (uint8); anything else → 0 (unlabeled)."""
    from transkd_fast.data.cityscapes import LABEL_ID_TO_TRAIN_ID

    lut = np.zeros(256, np.uint8)
    for label_id, train_id in LABEL_ID_TO_TRAIN_ID.items():
        lut[train_id] = label_id
    return lut[np.clip(ids, 0, 255).astype(np.uint8)]


def collect_inputs(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``[(image path, output stem relative to the output folder)]`` for files, folders (walked,
    sub-folders kept) and glob patterns; a folder or pattern with no image, a missing path, or two
    images that would write the same file are refused (:class:`ValueError` / ``FileNotFoundError``)."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = []
            for root, dirs, files in os.walk(spec):
                dirs.sort()
                found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTS)]
            if not found:
                raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) in folder {spec}")
            out += [(p, os.path.splitext(os.path.relpath(p, spec))[0]) for p in found]
        elif os.path.isfile(spec):
            out.append((spec, os.path.splitext(os.path.basename(spec))[0]))
        elif glob.has_magic(spec):
            found = [p for p in sorted(glob.glob(spec, recursive=True))
                     if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTS)]
            if not found:
                raise ValueError(f"no images match {spec!r}")
            out += [(p, os.path.splitext(os.path.basename(p))[0]) for p in found]
        else:
            raise FileNotFoundError(f"input not found: {spec}")
    seen: dict[str, str] = {}
    for path, stem in out:
        if stem in seen and os.path.abspath(seen[stem]) != os.path.abspath(path):
            raise ValueError(f"{seen[stem]} and {path} would write the same output {stem}*.png: "
                             "pass their folder instead (it keeps sub-folders apart)")
        seen[stem] = path
    uniq, done = [], set()
    for path, stem in out:
        if stem not in done:
            done.add(stem)
            uniq.append((path, stem))
    return uniq


def _image_size(path: str, height: Optional[int]) -> tuple[int, int]:
    """(h, w) of the network input: the file's size, or resized to ``height``."""
    try:
        with Image.open(path) as im:
            w0, h0 = im.size
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    if height is None or height == h0:
        return h0, w0
    return height, max(1, int(round(w0 * height / h0)))


def batches(items: Sequence[tuple[str, str]], batch_size: int, height: Optional[int]) -> list[list[int]]:
    """Indices grouped into batches of equal network-input size (first-seen order of sizes)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (path, _) in enumerate(items):
        groups.setdefault(_image_size(path, height), []).append(i)
    out = []
    for idx in groups.values():
        out += [idx[j:j + batch_size] for j in range(0, len(idx), batch_size)]
    return out


@dataclass
class PredictResult:
    images: int
    batches: int
    files: list = field(default_factory=list)


def _save_ids(ids: np.ndarray, path: str) -> None:
    # 2-D uint8 → mode L, uint16 → I;16 (PIL picks the mode from the dtype)
    Image.fromarray(ids.astype(np.uint8 if ids.max(initial=0) < 256 else np.uint16)).save(path)


def predict(model: torch.nn.Module, inputs: Sequence[str], output_dir: str, *, num_classes: Optional[int] = None,
            outputs: Sequence[str] = ("color", "ids"), overlay: bool = False, alpha: float = 0.5,
            batch_size: int = 4, height: Optional[int] = None, normalize: bool = False, dataset: Optional[str] = None,
            device: Optional[torch.device] = None, progress: bool = True, precision: str = "fp32",
            inference=None) -> PredictResult:
    """Segment ``inputs`` (files, folders, globs) with ``model`` and write the PNGs (module doc).

    ``num_classes``: the outputs that are classes (default: all of the model's); the rest (the
    void output) are never predicted. ``precision="bf16"`` casts ``model`` to bf16 in place
    (:func:`transkd_fast.precision.prepare_for_inference`) and runs it in
    :func:`~transkd_fast.precision.inference_context`. ``inference``: an
    :class:`transkd_fast.engine.inference.Inference` (default: whole image, no TTA).
    """
    from transkd_fast.data.base import read_image
    from transkd_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from transkd_fast.engine.inference import Inference, infer
    from transkd_fast.engine.viz import colorize
    from transkd_fast.precision import check_precision, prepare_for_inference

    outputs = list(dict.fromkeys(outputs))
    bad = [o for o in outputs if o not in OUTPUT_KINDS]
    if bad:
        raise ValueError(f"--outputs {bad[0]!r} is not an output; choose from {', '.join(OUTPUT_KINDS)}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1, got {batch_size}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {alpha}")
    if height is not None and height < 1:
        raise ValueError(f"--height must be ≥ 1, got {height}")
    k = num_classes or getattr(model, "num_classes", None)
    if not k:
        raise ValueError("predict: the model's class count is unknown; pass num_classes")
    if "labelids" in outputs and k != 19:
        raise ValueError(f"--outputs labelids writes Cityscapes label ids: it needs a 19-class Cityscapes model, "
                         f"this one predicts {k} classes")
    if not outputs and not overlay:
        raise ValueError("nothing to write: give --outputs and/or --overlay")
    check_precision(precision)
    inference = inference if inference is not None else Inference()
    if not isinstance(inference, Inference):
        raise TypeError(f"predict: inference must be an Inference, got {type(inference).__name__}")
    _, palette = dataset_classes(k, dataset)
    items = collect_inputs(inputs)
    groups = batches(items, batch_size, height)
    device = device or next(model.parameters()).device
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) if normalize else None
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) if normalize else None
    if precision == "fp32":
        model.eval()
    else:
        prepare_for_inference(model, precision)  # eval mode, weights cast to bf16 once
    result = PredictResult(len(items), len(groups))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="predict", unit="img", dynamic_ncols=True)
    try:
        for idx in groups:
            originals = [read_image(items[i][0]) for i in idx]
            net_in = []
            for im in originals:
                if height is not None and height != im.size[1]:
                    w = max(1, int(round(im.size[0] * height / im.size[1])))  # as SegTransform resizes
                    im = im.resize((w, height), Image.BILINEAR)
                net_in.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
            x = torch.stack(net_in)
            if mean is not None:
                x = (x - mean) / std
            # scores (infer runs under no_grad): logits (whole, slide) or mean probabilities (TTA)
            logits = infer(model, x.to(device), inference, precision=precision)[:, :k]
            for j, i in enumerate(idx):
                path, stem = items[i]
                orig = originals[j]
                w0, h0 = orig.size
                lg = logits[j:j + 1]
                if tuple(lg.shape[-2:]) != (h0, w0):
                    lg = F.interpolate(lg, size=(h0, w0), mode="bilinear", align_corners=False)
                ids = lg.argmax(1)[0].cpu().numpy()
                base = os.path.join(output_dir, stem)
                os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
                color = colorize(ids, palette) if ("color" in outputs or overlay) else None
                for kind in outputs + (["overlay"] if overlay else []):
                    target = base + SUFFIX[kind]
                    if kind == "color":
                        Image.fromarray(color).save(target)
                    elif kind == "overlay":
                        img = np.asarray(orig, dtype=np.float32)
                        Image.fromarray(np.round(alpha * color + (1 - alpha) * img).astype(np.uint8)).save(target)
                    elif kind == "ids":
                        _save_ids(ids, target)
                    else:
                        Image.fromarray(train_ids_to_label_ids(ids)).save(target)
                    result.files.append(target)
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    return result
