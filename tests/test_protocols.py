"""Evaluation protocols (``evaluate --protocol ours|transkd|full``): the original TransKD's mIoU
convention and resize arithmetic, the per-class table, eval.json and the CLI end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from transkd_fast.cli import main
from transkd_fast.data.transforms import SegTransform, resized_size
from transkd_fast.engine import EvalConfig, evaluate
from transkd_fast.engine.config import ConfigError, validate_eval_config
from transkd_fast.engine.metrics import ConfusionMatrix, metrics_from_confusion

TINY = dict(synthetic_val_size=3, synthetic_height=32, synthetic_width=64, batch_size=2, progress=False,
            threads=1, num_vis=0)


class Oracle(nn.Module):
    """Logits whose argmax is a fixed class map (the same for every image)."""

    def __init__(self, pred: torch.Tensor, classes: int):
        super().__init__()
        self.register_buffer("onehot", nn.functional.one_hot(pred, classes).permute(2, 0, 1).float()[None])
        self.anchor = nn.Parameter(torch.zeros(()))  # evaluate reads the device from a parameter

    def forward(self, x):
        return self.onehot.expand(x.shape[0], -1, -1, -1)


def test_absent_classes_count_zero_under_transkd_and_are_left_out_under_ours():
    label = torch.tensor([[0, 0], [0, 1]])
    cm = ConfusionMatrix(19)
    cm.update(label, label)
    assert cm.compute(absent="zero")["miou"] == pytest.approx(2 / 19)  # the original: 0.105
    assert cm.compute()["miou"] == 1.0
    zero, skip = cm.compute(absent="zero"), cm.compute(absent="skip")
    assert zero["iou"][:2] == [1.0, 1.0] and zero["iou"][2:] == [0.0] * 17
    assert all(math.isnan(v) for v in skip["iou"][2:])
    # the same through evaluate(model, loader): predictions = labels
    loader = [(torch.zeros(1, 3, 8, 8), label[None])]
    model = Oracle(label, 20)  # 20 outputs: the void class of the paper's recipe
    assert evaluate(model, loader, num_classes=19, absent="zero")["miou"] == pytest.approx(2 / 19)
    assert evaluate(model, loader, num_classes=19)["miou"] == 1.0
    with pytest.raises(ValueError, match="absent"):
        cm.compute(absent="nan")


def test_transkd_resize_is_torchvision_resize():
    # landscape 101 × 203 at 64: the shorter edge (height) to 64, the width truncated
    assert resized_size(101, 203, 64, "shorter_edge") == (64, 128)  # int(64 · 203 / 101) = int(128.63)
    assert resized_size(101, 203, 64, "height") == (64, 129)        # ours rounds
    # portrait 203 × 101: the shorter edge is the width
    assert resized_size(203, 101, 64, "shorter_edge") == (128, 64)
    assert resized_size(203, 101, 64, "height") == (64, 32)
    assert resized_size(50, 50, 64, "shorter_edge") == (64, 64)
    assert resized_size(64, 300, 64, "shorter_edge") == (64, 300)  # already there: unchanged
    assert resized_size(1024, 2048, 512, "shorter_edge") == (512, 1024)  # Cityscapes: the two agree
    assert resized_size(1024, 2048, 512, "height") == (512, 1024)
    assert resized_size(7, 9, None, "shorter_edge") == (7, 9)
    # through the transform: the image resized, the label on our ⌈H/4⌉ × ⌈W/4⌉ grid of it
    rng = np.random.default_rng(0)
    for (h, w), expect in (((101, 203), (64, 128)), ((203, 101), (128, 64))):
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        label = rng.integers(0, 5, (h, w), dtype=np.uint8)
        x, y = SegTransform(height=64, resize="shorter_edge")(image, label, rng)
        assert tuple(x.shape[-2:]) == expect and tuple(y.shape) == (-(-expect[0] // 4), -(-expect[1] // 4))
        x, y = SegTransform(height=64)(image, label, rng)  # the default is unchanged
        assert x.shape[-2] == 64
        x, y = SegTransform(height=64, label_scale=1, native_label=True)(image, label, rng)
        assert x.shape[-2] == 64 and tuple(y.shape) == (h, w) and torch.equal(y, torch.from_numpy(label).long())
    with pytest.raises(ValueError, match="native_label"):
        SegTransform(label_scale=4, native_label=True)
    with pytest.raises(ValueError, match="resize"):
        SegTransform(resize="longer_edge")


def test_per_class_table_from_a_hand_built_confusion_matrix():
    conf = torch.tensor([[5, 1, 0, 0],
                         [2, 3, 1, 0],
                         [0, 0, 0, 0],
                         [0, 0, 0, 0]])
    missed = torch.tensor([1, 0, 0, 0])  # one class-0 pixel predicted as void
    m = metrics_from_confusion(conf, missed, ["a", "b", "c", "d"])
    # class a: TP 5, FN 1 + 1, FP 2; b: TP 3, FN 3, FP 1; c: predicted once, never labelled; d: absent
    iou = [5 / 9, 3 / 7, 0.0, float("nan")]
    acc = [5 / 7, 3 / 6, float("nan"), float("nan")]
    for row, i, a, n in zip(m["table"], iou, acc, "abcd"):
        assert row["name"] == n
        assert (math.isnan(i) and math.isnan(row["iou"])) or row["iou"] == pytest.approx(i)
        assert (math.isnan(a) and math.isnan(row["acc"])) or row["acc"] == pytest.approx(a)
    assert [r["pixels"] for r in m["table"]] == [7, 6, 0, 0]
    assert [r["predicted"] for r in m["table"]] == [7, 4, 1, 0]
    assert m["miou"] == pytest.approx((5 / 9 + 3 / 7 + 0) / 3)
    assert m["macc"] == pytest.approx((5 / 7 + 1 / 2) / 2)
    assert m["pixel_acc"] == pytest.approx(8 / 13)  # 12 counted pixels + 1 predicted void
    z = metrics_from_confusion(conf, missed, ["a", "b", "c", "d"], absent="zero")
    assert z["miou"] == pytest.approx((5 / 9 + 3 / 7) / 4) and z["table"][3]["iou"] == 0.0
    assert math.isnan(z["table"][3]["acc"])  # accuracy stays undefined without label pixels


def test_eval_json_names_the_protocol_and_holds_the_table(tmp_path):
    out = evaluate(EvalConfig(protocol="transkd", output_dir=str(tmp_path), **TINY))
    assert set(out) == {"transkd"}
    m = out["transkd"]
    assert m["miou"] == pytest.approx(sum(m["iou"]) / len(m["iou"]))  # over all K, absent = 0
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert doc["protocol"]["name"] == "transkd" and "truncated" in doc["protocol"]["resize"]
    assert doc["inference"] == {"mode": "whole", "tta": None}
    table = doc["results"]["transkd"]["table"]
    assert len(table) == 9 and {"name", "iou", "acc", "pixels"} <= set(table[0])
    # slide + TTA are recorded
    evaluate(EvalConfig(protocol="full", inference="slide", slide_crop=32, slide_stride=24, tta=True,
                        tta_scales="1.0,1.5", output_dir=str(tmp_path / "s"), **TINY))
    doc = json.loads((tmp_path / "s" / "eval.json").read_text())
    assert doc["protocol"]["name"] == "full" and set(doc["results"]) == {"full"}
    assert doc["inference"]["mode"] == "slide" and doc["inference"]["crop"] == 32
    assert doc["inference"]["tta"]["scales"] == [1.0, 1.5] and doc["inference"]["tta"]["views"] == 4


def test_full_protocol_uses_native_labels():
    # no resize: the same numbers as ours at full resolution (same random model: same seed)
    torch.manual_seed(3)
    ours = evaluate(EvalConfig(resolution="full", **TINY))["full"]
    torch.manual_seed(3)
    full = evaluate(EvalConfig(protocol="full", **TINY))["full"]
    assert full["iou"] == ours["iou"] and full["pixels"] == ours["pixels"]
    # --height 48: the images grow, the labels stay 32 × 64
    from transkd_fast.data import build_dataset

    ds = build_dataset("synthetic", "val", num_samples=3, height=32, width=64, seed=0)
    native = sum(int((ds.load(i)[1] < ds.num_classes).sum()) for i in range(3))
    assert evaluate(EvalConfig(protocol="full", height=48, **TINY))["full"]["pixels"] == native
    assert evaluate(EvalConfig(resolution="full", height=48, **TINY))["full"]["pixels"] > 2 * native


def test_protocol_flag_combinations():
    with pytest.raises(ConfigError, match="--resolution"):
        validate_eval_config(EvalConfig(protocol="transkd", resolution="quarter"))
    with pytest.raises(ConfigError, match="--resolution"):
        validate_eval_config(EvalConfig(protocol="full", resolution="full"))
    with pytest.raises(ConfigError, match="--protocol"):
        validate_eval_config(EvalConfig(protocol="mmseg"))
    validate_eval_config(EvalConfig(protocol="ours", resolution="quarter"))


def test_cli_evaluate_protocol_transkd_end_to_end(tmp_path, capsys):
    argv = ["evaluate", "--protocol", "transkd", "--synthetic-val-size", "2", "--synthetic-height", "32",
            "--synthetic-width", "64", "--threads", "1", "--no-progress", "--num-vis", "1",
            "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "protocol transkd: mIoU" in out and "mAcc" in out
    header = next(line for line in out.splitlines() if "IoU" in line and "Acc" in line and "class" in line)
    assert header.split() == ["class", "IoU", "Acc"]
    assert "background" in out and "cross-checker" in out
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert doc["protocol"]["name"] == "transkd" and (tmp_path / "predictions.png").stat().st_size > 0
    try:
        rc = main(["evaluate", "--protocol", "transkd", "--resolution", "full", "--no-progress"])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and "--resolution" in err and "Traceback" not in err


def test_native_labels_in_a_padded_batch_are_scored_per_sample():
    """Images of different sizes, labels at another scale (the full protocol with --height): each
    sample's scores are cut to its image and resized to its own label, so a batch of two gives the
    confusion matrix of two batches of one."""
    from transkd_fast.engine.trainer import _collate_sizes

    torch.manual_seed(4)
    model = nn.Conv2d(3, 4, 1).eval()  # per pixel: padding cannot leak into the valid region
    samples = [(torch.rand(3, 12, 20), torch.randint(0, 4, (9, 15))),
               (torch.rand(3, 16, 8), torch.randint(0, 4, (12, 6)))]
    batched = evaluate(model, [_collate_sizes(samples)], num_classes=4)
    one_by_one = ConfusionMatrix(4)
    for img, lab in samples:
        scores = nn.functional.interpolate(model(img[None]), size=lab.shape, mode="bilinear", align_corners=False)
        one_by_one.update(scores.argmax(1), lab)
    expect = one_by_one.compute()
    assert batched["pixels"] == 9 * 15 + 12 * 6 == expect["pixels"]
    assert batched["table"] == expect["table"]
