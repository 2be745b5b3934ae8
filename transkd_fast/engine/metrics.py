"""Segmentation metrics from a confusion matrix.

``conf[t, p]`` counts pixels of true class ``t`` predicted as ``p`` over the ``K`` evaluated
classes; pixels whose label is outside ``[0, K)`` (void, 255, or the void output id of the
20-output recipe when ``K = 19``) are not counted. Predictions outside ``[0, K)`` (a pixel
predicted as void) count as wrong for their true class: they add to its FN but to no
class's FP.

- IoU_c = TP_c / (TP_c + FP_c + FN_c). A class that appears neither in the labels nor in the
  predictions has 0/0: what happens to it is the *absent-class convention* ``absent``:

  - ``"skip"`` (ours, the default; mmseg's ``nanmean``): its IoU is NaN and it is left out of
    the mean. A class predicted but absent from the labels has IoU 0 and counts.
  - ``"zero"`` (the original TransKD, ``evaluate --protocol transkd``): its IoU is 0 and the
    mean is over all K classes. The original's ``iouEval.getIoU`` (``eval/iouEval.py``, the same
    file in ``train/``) computes ``tp / (tp + fp + fn + 1e-15)`` per class and ``torch.mean`` over
    its 19 classes (``NUM_CLASSES = 20`` less the ignore index 19); here the 0/0 case is 0 exactly
    and the others have no ``1e-15`` in the denominator (a relative difference ≤ 1e-15). Labels
    = predictions = ``[[0, 0], [0, 1]]`` with K = 19: 2/19 = 0.105 there, 1.0 with ``"skip"``.
    The original counts pixels as here: a void label is no pixel, a prediction of the void
    output (19) is an FN of the true class.

- mIoU = mean of the IoUs (``"skip"``: of the non-NaN ones; NaN when there is none).
- Acc_c = TP_c / (TP_c + FN_c), the class's pixel accuracy (recall); NaN for a class absent from
  the labels, whatever the convention (no pixel to be right about). mAcc = mean of the non-NaN
  Acc_c (mmseg's ``mAcc``).
- pixel accuracy = Σ TP / number of counted pixels.
- ``"table"``: one row per class, ``{"id", "name", "iou", "acc", "pixels" (TP + FN: label
  pixels), "predicted" (TP + FP)}``, the per-class table ``evaluate`` prints and writes.

NaN. The metrics dict keeps NaN as a float where a value is undefined (so arithmetic and
``math.isnan`` work): ``"miou"`` (no class present at all), ``"pixel_acc"`` (no pixel counted),
``"macc"`` (no class in the labels), entries of ``"iou"`` (a class absent from both labels and
predictions, under ``"skip"``) and ``"acc"`` (a class absent from the labels), and the same
values in the rows of ``"table"`` — the keys in :data:`NAN_ENTRIES`. ``"per_class"`` already
holds None there, ``"pixels"`` is an int. JSON has no NaN (``json.dumps`` writes a bare ``NaN``
that strict parsers reject): write ``json_safe(metrics)``, which turns every NaN / ±inf into
None (``null``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import torch

# Entries of :func:`metrics_from_confusion`'s dict that can be NaN (``"iou"``, ``"acc"``: their
# elements; ``"table"``: its rows' ``"iou"`` and ``"acc"``).
NAN_ENTRIES = ("miou", "pixel_acc", "iou", "macc", "acc", "table")

# The absent-class conventions of :func:`metrics_from_confusion` (see the module docstring).
ABSENT_CONVENTIONS = ("skip", "zero")


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

    def compute(self, class_names: Optional[Sequence[str]] = None, absent: str = "skip") -> dict:
        return metrics_from_confusion(self.mat, self.missed, class_names, absent=absent)


def _nanmean(v: torch.Tensor) -> float:
    keep = ~torch.isnan(v)
    return v[keep].mean().item() if keep.any() else float("nan")


def metrics_from_confusion(conf: torch.Tensor, missed: Optional[torch.Tensor] = None,
                           class_names: Optional[Sequence[str]] = None, absent: str = "skip") -> dict:
    """``{"miou", "pixel_acc", "macc", "iou": [K], "acc": [K], "per_class": {name: iou},
    "table": [K rows], "pixels"}`` from ``conf [K, K]`` (and ``missed [K]``: pixels of each true
    class predicted outside ``[0, K)``); ``absent`` is the absent-class convention, ``"skip"``
    or ``"zero"`` (see the module docstring)."""
    if absent not in ABSENT_CONVENTIONS:
        raise ValueError(f"absent must be one of {ABSENT_CONVENTIONS}, got {absent!r}")
    conf = conf.double().cpu()
    tp = conf.diag()
    fn = conf.sum(1) - tp
    if missed is not None:
        fn = fn + missed.double().cpu()
    fp = conf.sum(0) - tp
    denom = tp + fp + fn
    undefined = torch.full_like(tp, float("nan") if absent == "skip" else 0.0)
    iou = torch.where(denom > 0, tp / denom.clamp_min(1), undefined)
    class_acc = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), torch.full_like(tp, float("nan")))
    miou = _nanmean(iou)  # "zero": no NaN left, the mean over all K
    total = conf.sum() + (missed.double().sum().cpu() if missed is not None else 0.0)
    acc = (tp.sum() / total).item() if total > 0 else float("nan")
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    ious, accs = [float(v) for v in iou.tolist()], [float(v) for v in class_acc.tolist()]
    names += [str(c) for c in range(len(names), len(ious))]
    table = [{"id": c, "name": names[c], "iou": ious[c], "acc": accs[c], "pixels": int(tp[c] + fn[c]),
              "predicted": int(tp[c] + fp[c])} for c in range(len(ious))]
    return {
        "miou": miou,
        "pixel_acc": acc,
        "macc": _nanmean(class_acc),
        "iou": ious,
        "acc": accs,
        "per_class": {n: (None if math.isnan(v) else v) for n, v in zip(names, ious)},
        "table": table,
        "pixels": int(total.item()) if torch.is_tensor(total) else int(total),
    }
