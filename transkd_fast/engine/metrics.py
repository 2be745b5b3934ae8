"""Segmentation metrics from a confusion matrix.

``conf[t, p]`` counts pixels of true class ``t`` predicted as ``p`` over the ``K`` evaluated
classes; pixels whose label is outside ``[0, K)`` (void, 255, or the void output id of the
20-output recipe when ``K = 19``) are not counted. Predictions outside ``[0, K)`` (a pixel
predicted as void) count as wrong for their true class: they add to its FN but to no
class's FP.

- IoU_c = TP_c / (TP_c + FP_c + FN_c). A class that appears neither in the labels nor in the
  predictions has 0/0: its IoU is NaN and it is left out of the mean. A class predicted
  but absent from the labels has IoU 0 and counts.
- mIoU = mean of the non-NaN IoUs (NaN when there is none).
- pixel accuracy = Σ TP / number of counted pixels.

NaN. The metrics dict keeps NaN as a float where a value is undefined (so arithmetic and
``math.isnan`` work): ``"miou"`` (no class present at all), ``"pixel_acc"`` (no pixel counted)
and entries of ``"iou"`` (a class absent from both labels and predictions) — the keys in
:data:`NAN_ENTRIES`. ``"per_class"`` already holds None there, ``"pixels"`` is an int. JSON has
no NaN (``json.dumps`` writes a bare ``NaN`` that strict parsers reject): write
``json_safe(metrics)``, which turns every NaN / ±inf into None (``null``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import torch

# Entries of :func:`metrics_from_confusion`'s dict that can be NaN (``"iou"``: its elements).
NAN_ENTRIES = ("miou", "pixel_acc", "iou")


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf; Python, numpy or 0-d tensor) replaced by
    None, recursively through dicts, lists and tuples (tuples become lists), so that
    ``json.dumps(json_safe(obj), allow_nan=False)`` succeeds. Other values are returned as they
    are (numpy / tensor scalars as Python numbers)."""
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if torch.is_tensor(obj) and obj.numel() == 1:
        obj = obj.item()
    elif hasattr(obj, "item") and hasattr(obj, "dtype") and getattr(obj, "shape", None) == ():
        obj = obj.item()  # numpy scalar
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class ConfusionMatrix:
    """Accumulates ``[K, K]`` (int64) counts; all-reducible under DDP."""

    def __init__(self, num_classes: int, device: Optional[torch.device] = None):
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.missed = torch.zeros(num_classes, dtype=torch.int64, device=device)  # predicted out of range

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        k = self.num_classes
        pred, label = pred.reshape(-1).long(), label.reshape(-1).long()
        if pred.shape != label.shape:
            raise ValueError(f"prediction has {pred.numel()} pixels, label {label.numel()}")
        valid = (label >= 0) & (label < k)
        in_range = valid & (pred >= 0) & (pred < k)
        idx = label[in_range] * k + pred[in_range]
        self.mat += torch.bincount(idx, minlength=k * k).view(k, k).to(self.mat.device)
        out = valid & ~in_range
        self.missed += torch.bincount(label[out], minlength=k).to(self.missed.device)

    def all_reduce(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.mat)
            dist.all_reduce(self.missed)

    def compute(self, class_names: Optional[Sequence[str]] = None) -> dict:
        return metrics_from_confusion(self.mat, self.missed, class_names)


def metrics_from_confusion(conf: torch.Tensor, missed: Optional[torch.Tensor] = None,
                           class_names: Optional[Sequence[str]] = None) -> dict:
    """``{"miou", "pixel_acc", "iou": [K] (NaN for absent classes), "per_class": {name: iou}}``."""
    conf = conf.double().cpu()
    tp = conf.diag()
    fn = conf.sum(1) - tp
    if missed is not None:
        fn = fn + missed.double().cpu()
    fp = conf.sum(0) - tp
    denom = tp + fp + fn
    iou = torch.where(denom > 0, tp / denom.clamp_min(1), torch.full_like(tp, float("nan")))
    present = ~torch.isnan(iou)
    miou = iou[present].mean().item() if present.any() else float("nan")
    total = conf.sum() + (missed.double().sum().cpu() if missed is not None else 0.0)
    acc = (tp.sum() / total).item() if total > 0 else float("nan")
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    return {
        "miou": miou,
        "pixel_acc": acc,
        "iou": [float(v) for v in iou.tolist()],
        "per_class": {n: (None if math.isnan(v) else float(v)) for n, v in zip(names, iou.tolist())},
        "pixels": int(total.item()) if torch.is_tensor(total) else int(total),
    }
