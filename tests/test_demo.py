"""The demo's synthetic task (``scenes``) and the demo protocol: report keys, the teacher cache."""

import json
import os

import numpy as np
import pytest

from transkd_fast.data import build_dataset
from transkd_fast.data.synthetic import (
    SCENE_CLASSES,
    SYNTHETIC_CLASSES,
    Synthetic,
    render_scene,
    synthetic_task,
)


def _labels(n=24, h=64, w=64, split="train"):
    ds = Synthetic(split, num_samples=n, height=h, width=w, seed=0, task="scenes")
    pairs = [ds.load(i) for i in range(n)]
    return np.stack([np.asarray(im) for im, _ in pairs]), np.stack([lab for _, lab in pairs])


def test_scenes_labels_cover_the_classes_at_full_resolution():
    images, labels = _labels()
    assert images.shape == (24, 64, 64, 3) and labels.shape == (24, 64, 64)  # labels at the image's size
    assert set(np.unique(labels)) == set(range(len(SCENE_CLASSES)))  # every class, no void
    per_image = [len(set(np.unique(lab)) - {0}) for lab in labels]
    assert min(per_image) >= 1 and np.mean(per_image) >= 1.8  # several objects per image
    fg = (labels != 0).mean()
    assert 0.1 < fg < 0.6, fg
    # Objects are shapes, not speckle: most object pixels have all 4 neighbours of the same class.
    inner = (labels[:, 1:-1, 1:-1] == labels[:, :-2, 1:-1]) & (labels[:, 1:-1, 1:-1] == labels[:, 2:, 1:-1]) & \
            (labels[:, 1:-1, 1:-1] == labels[:, 1:-1, :-2]) & (labels[:, 1:-1, 1:-1] == labels[:, 1:-1, 2:])
    obj = labels[:, 1:-1, 1:-1] != 0
    assert inner[obj].mean() > 0.8


def _colour_lookup_accuracy(train_imgs, train_labs, test_imgs, test_labs, bits=4):
    """A per-pixel colour → class table (majority class per quantized colour) fitted on the
    first images, applied to the others: accuracy on the object pixels (class ≠ background)."""
    def codes(imgs):
        q = (imgs.astype(np.int64) >> (8 - bits))
        return (q[..., 0] << (2 * bits)) | (q[..., 1] << bits) | q[..., 2]

    k = len(SCENE_CLASSES)
    table = np.zeros((1 << (3 * bits), k), np.int64)
    np.add.at(table, (codes(train_imgs).ravel(), train_labs.ravel()), 1)
    pred = table.argmax(1)[codes(test_imgs)]
    obj = test_labs != 0
    return float((pred[obj] == test_labs[obj]).mean())


def test_scenes_are_not_colour_separable():
    images, labels = _labels(n=12)
    # Fitted on an image, the table knows that image's colours well (so the check can fail) ...
    own = _colour_lookup_accuracy(images[:1], labels[:1], images[:1], labels[:1])
    assert own > 0.6, own
    # ... and on another image (or eleven others) it labels few object pixels right.
    other = _colour_lookup_accuracy(images[:1], labels[:1], images[1:2], labels[1:2])
    many = _colour_lookup_accuracy(images[1:], labels[1:], images[:1], labels[:1])
    assert other < 0.2 and many < 0.35, (other, many)


def test_scenes_distractors_share_shapes_and_textures_with_objects():
    # Background pixels hold textures too (textured clutter) and flat copies of the shapes:
    # a high local contrast does not mean "object".
    rng = np.random.default_rng(3)
    img, lab = render_scene(rng, 64, 64, objects=(0, 0), occluders=(0, 0), noise=0.0)
    assert (lab == 0).all()  # no objects: everything drawn is background
    dx = np.abs(np.diff(img.astype(np.int64), axis=1)).sum(-1)
    assert (dx > 100).mean() > 0.01  # yet the image has textured / edged things in it


def test_task_selection_keeps_the_old_default():
    assert Synthetic("val", num_samples=1).class_names == SYNTHETIC_CLASSES
    assert build_dataset("synthetic", "val", num_samples=1).task == "textures"
    with synthetic_task("scenes"):
        ds = build_dataset("synthetic", "val", num_samples=1, height=32, width=32)
        assert ds.task == "scenes" and ds.class_names == SCENE_CLASSES and ds.num_classes == 7
        assert Synthetic("val", num_samples=1, task="textures").class_names == SYNTHETIC_CLASSES
    assert Synthetic("val", num_samples=1).task == "textures"  # restored after the block
    with pytest.raises(ValueError, match="task"):
        Synthetic("val", task="nope")
    with pytest.raises(ValueError, match="task"):
        with synthetic_task("nope"):
            pass


TINY = dict(teacher="segformer_b0", height=32, width=32, teacher_train_size=8, train_size=4, val_size=2,
            test_size=4, teacher_steps=2, student_steps=2, batch_size=2, teacher_batch_size=2, step_bench=1,
            progress=False, threads=1)


def test_tiny_demo_writes_the_report_and_reuses_the_cached_teacher(tmp_path):
    from transkd_fast.engine import demo

    cfg = demo.DemoConfig(output_dir=str(tmp_path / "demo"), **TINY)
    report = demo.run_demo(cfg)
    out = tmp_path / "demo"
    for name in ("report.json", "report.md", "predictions.png", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "report.json").read_text())
    assert saved["task"] == "scenes" and saved["class_names"] == list(SCENE_CLASSES)
    kinds = [r["kind"] for r in saved["rows"]]
    assert kinds == ["teacher", "transkd_base", "plain"]
    for r in saved["rows"]:
        for key in ("miou", "miou_full", "per_class_iou", "params_m", "gflops", "train_s_per_step"):
            assert key in r, key
        assert set(r["gflops"]) == {"full", "paper"} and r["gflops"]["full"] > r["gflops"]["paper"] > 0
        assert set(r["per_class_iou"]) == set(SCENE_CLASSES)
    assert saved["rows"][1]["train_params_m"] > saved["rows"][1]["params_m"]  # KD modules counted while training
    s = saved["summary"]
    assert len(s["kd_minus_plain_miou"]) == 1 and s["kd_wins"] in (0, 1)
    assert s["methods"]["transkd_base"]["kd_minus_plain_miou"] == s["kd_minus_plain_miou"]
    bench = saved["step_time"]
    assert bench["ours"] > 0 and bench["original_as_published"] > 0 and bench["original_teacher_no_grad"] > 0
    assert "mIoU" in saved["verdict"] and "%" in saved["verdict"]
    assert saved["teacher_cache"]["reused"] is False
    tdir = saved["teacher_cache"]["dir"]
    assert os.path.dirname(tdir) == str(out / "cache")
    weights = os.path.join(tdir, "model.pt")
    stamp = os.stat(weights).st_mtime_ns

    # A rerun (students over with --overwrite) takes the teacher from the cache: not retrained.
    again = demo.run_demo(demo.DemoConfig(output_dir=str(out), overwrite=True, **{**TINY, "step_bench": 0}))
    assert again["teacher_cache"] == {**report["teacher_cache"], "reused": True}
    assert os.stat(weights).st_mtime_ns == stamp
    assert not os.path.exists(os.path.join(tdir, "previous-1"))
    assert again["rows"][0]["miou"] == report["rows"][0]["miou"]
    assert again["step_time"] is None

    # Another teacher setting is another cache entry.
    assert demo.teacher_dir(demo.DemoConfig(output_dir=str(out), **{**TINY, "teacher_steps": 3})) != tdir


def test_teacher_settings_are_checked_up_front(tmp_path):
    from transkd_fast.engine import demo
    from transkd_fast.engine.config import ConfigError

    for bad, match in (({"teacher_label_scale": 2}, "--teacher-label-scale must be 1"),
                       ({"teacher_batch_size": 0}, "--teacher-batch-size must be ≥ 1"),
                       ({"student_steps": 0}, "--student-steps must be ≥ 1")):
        with pytest.raises(ConfigError, match=match):
            demo.run_demo(demo.DemoConfig(output_dir=str(tmp_path), **{**TINY, **bad}))
    assert not any(tmp_path.iterdir()), "a refused demo must not start training"
    key = demo.teacher_key(demo.DemoConfig(output_dir=str(tmp_path), **TINY))
    assert key["batch_size"] == TINY["teacher_batch_size"] and key["label_scale"] == 1
    # the teacher's batch and label scale are part of its cache key
    other = demo.teacher_dir(demo.DemoConfig(output_dir=str(tmp_path), **{**TINY, "teacher_label_scale": 4}))
    assert other != demo.teacher_dir(demo.DemoConfig(output_dir=str(tmp_path), **TINY))
