"""mIoU / per-class IoU / pixel accuracy against hand-computed confusion matrices."""

from __future__ import annotations

import math

import pytest
import torch

from transkd_fast.engine.metrics import ConfusionMatrix, metrics_from_confusion


def test_hand_computed_with_absent_void_and_out_of_range():
    # K = 4 evaluated classes. Class 3 appears in neither labels nor predictions (IoU NaN, left
    # out of the mean); class 2 is predicted but never labeled (IoU 0, counted). Label 255 is void
    # (not counted); label 4 (the void *output* of a 20-output style model) is not counted either;
    # prediction 4 (predicted void) on a labeled pixel is a miss for its class.
    label = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0, 255, 4, 1, 0])
    pred = torch.tensor([0, 0, 1, 1, 1, 2, 0, 0, 3, 1, 4, 2])
    cm = ConfusionMatrix(4)
    cm.update(pred[:6], label[:6])
    cm.update(pred[6:], label[6:])
    expected = torch.zeros(4, 4, dtype=torch.int64)
    # (t, p) pairs among counted pixels: (0,0)x3 [idx 0,1,7], (0,1) [2], (1,1)x2 [3,4], (1,2) [5], (1,0) [6], (0,2) [11]
    expected[0, 0] = 3
    expected[0, 1] = 1
    expected[1, 1] = 2
    expected[1, 2] = 1
    expected[1, 0] = 1
    expected[0, 2] = 1
    assert torch.equal(cm.mat, expected)
    assert cm.missed.tolist() == [0, 1, 0, 0]  # idx 10: label 1 predicted 4
    m = cm.compute(["a", "b", "c", "d"])
    # class 0: TP 3, FP 1 (from class 1), FN 2 -> 3/6; class 1: TP 2, FP 1, FN 3 (incl. the miss) -> 2/6
    # class 2: TP 0, FP 2, FN 0 -> 0; class 3: 0/0 -> NaN
    assert m["iou"][0] == pytest.approx(3 / 6)
    assert m["iou"][1] == pytest.approx(2 / 6)
    assert m["iou"][2] == 0.0
    assert math.isnan(m["iou"][3]) and m["per_class"]["d"] is None
    assert m["miou"] == pytest.approx((3 / 6 + 2 / 6 + 0) / 3)
    # 10 counted pixels (void 255 and label 4 excluded), 5 correct
    assert m["pixels"] == 10 and m["pixel_acc"] == pytest.approx(5 / 10)


def test_perfect_and_empty():
    cm = ConfusionMatrix(3)
    y = torch.randint(0, 3, (2, 5, 7))
    cm.update(y.clone(), y)
    m = cm.compute()
    assert m["pixel_acc"] == 1.0 and m["miou"] == 1.0
    empty = metrics_from_confusion(torch.zeros(3, 3, dtype=torch.int64))
    assert math.isnan(empty["miou"]) and all(math.isnan(v) for v in empty["iou"])


def test_matches_bruteforce_random():
    g = torch.Generator().manual_seed(7)
    k = 6
    label = torch.randint(0, k + 1, (3, 11, 13), generator=g)
    label[label == k] = 255
    pred = torch.randint(0, k - 1, (3, 11, 13), generator=g)  # class k-1 never predicted
    cm = ConfusionMatrix(k)
    cm.update(pred, label)
    m = cm.compute()
    for c in range(k):
        valid = label != 255
        tp = ((pred == c) & (label == c)).sum().item()
        fp = ((pred == c) & (label != c) & valid).sum().item()
        fn = ((pred != c) & (label == c)).sum().item()
        expect = tp / (tp + fp + fn) if tp + fp + fn else float("nan")
        assert (math.isnan(expect) and math.isnan(m["iou"][c])) or m["iou"][c] == pytest.approx(expect)
    with pytest.raises(ValueError, match="pixels"):
        cm.update(pred[:1], label)


def test_nan_entries_serialise_as_null():
    import json

    from transkd_fast.engine.metrics import NAN_ENTRIES, json_safe

    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]))  # class 2: absent from labels and predictions
    m = cm.compute(["a", "b", "c"])
    assert math.isnan(m["iou"][2])  # NaN stays NaN for arithmetic (see the module docstring)
    with pytest.raises(ValueError):
        json.dumps(m, allow_nan=False)
    safe = json.loads(json.dumps(json_safe(m), allow_nan=False))
    assert safe["iou"][2] is None and safe["iou"][:2] == pytest.approx(m["iou"][:2])
    assert safe["miou"] == pytest.approx(m["miou"]) and safe["per_class"]["c"] is None
    empty = json.loads(json.dumps(json_safe(metrics_from_confusion(torch.zeros(2, 2, dtype=torch.int64))),
                                  allow_nan=False))
    assert empty["miou"] is None and empty["pixel_acc"] is None and empty["iou"] == [None, None]
    assert set(NAN_ENTRIES) == {"miou", "pixel_acc", "iou", "macc", "acc", "table"}
    # nested records (as the trainer logs them) and tensors / numpy scalars
    rec = json_safe({"event": "eval", "terms": {"x": float("inf")}, "v": [torch.tensor(float("nan")), 1]})
    assert rec == {"event": "eval", "terms": {"x": None}, "v": [None, 1]}
