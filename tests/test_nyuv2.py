"""NYUv2-40 (issue #16 item 6) on a tiny tree written in the original TransKD layout: raw ids
0 → void, k → k - 1, split lists respected, bad values and missing files named, and a
``transkd-fast train --dataset nyuv2`` run end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from transkd_fast.data import DATASETS, DataError, DatasetLayoutError, NYUv2, SegTransform, build_dataset
from transkd_fast.data.nyuv2 import NYUV2_CLASSES, NYUV2_PALETTE

H, W = 24, 32
TRAIN = ("0003", "0001", "0007")  # deliberately unsorted: the list's order is kept
TEST = ("0002", "0005")


def _raw_label(rng) -> np.ndarray:
    """Random raw ids with every value 0..40 present."""
    ids = np.concatenate([np.arange(41), rng.integers(0, 41, size=H * W - 41)]).astype(np.uint8)
    return rng.permutation(ids).reshape(H, W)


def make_nyuv2(root: str, seed: int = 3) -> dict:
    """The original loader's layout: images/<name>.jpg|png, labels40/<name>.png, <split>.txt.
    Returns {name: (rgb, raw label)}; one image is a JPEG (the original's extension)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "labels40"))
    out = {}
    for name in TRAIN + TEST:
        rgb = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
        raw = _raw_label(rng)
        ext = "jpg" if name == "0001" else "png"
        Image.fromarray(rgb).save(os.path.join(root, "images", f"{name}.{ext}"), quality=95)
        Image.fromarray(raw).save(os.path.join(root, "labels40", f"{name}.png"))
        out[name] = (rgb, raw)
    for split, names in (("train", TRAIN), ("test", TEST)):
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.write("\n".join(names) + "\n\n")  # a trailing blank line is not a sample
    return out


def test_registered_and_class_table():
    assert "nyuv2" in DATASETS
    assert len(NYUV2_CLASSES) == 40 and len(set(NYUV2_CLASSES)) == 40
    # NYUv2-40 raw ids 1, 2, 24, 40 (train ids 0, 1, 23, 39)
    assert (NYUV2_CLASSES[0], NYUV2_CLASSES[1], NYUV2_CLASSES[23], NYUV2_CLASSES[39]) == \
        ("wall", "floor", "refridgerator", "otherprop")
    pal = np.asarray(NYUV2_PALETTE)
    assert pal.shape == (40, 3) and pal.dtype == np.uint8
    assert len({tuple(c) for c in pal}) == 40 and not (pal == 0).all(axis=1).any()  # distinct, none black
    # the bit colormap at raw ids 1, 2, 3: (128,0,0), (0,128,0), (128,128,0)
    assert pal[:3].tolist() == [[128, 0, 0], [0, 128, 0], [128, 128, 0]]


def test_train_ids_and_splits(tmp_path):
    root = str(tmp_path / "nyu")
    data = make_nyuv2(root)
    for split, names in (("train", TRAIN), ("test", TEST)):
        ds = build_dataset("nyuv2", split, root=root)
        assert isinstance(ds, NYUv2) and ds.num_classes == 40 and ds.class_weights is None
        assert ds.default_crop_size is None  # fixed-size images: the plain recipe transform
        assert len(ds) == len(names)
        assert [os.path.splitext(os.path.basename(p))[0] for p, _ in ds.samples] == list(names)
        for i, name in enumerate(names):
            rgb, raw = data[name]
            image, label = ds.load(i)
            expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
            assert label.dtype == np.uint8
            np.testing.assert_array_equal(label, expected)
            assert set(np.unique(label)) == set(range(40)) | {255}
            if name != "0001":  # PNG images are lossless
                np.testing.assert_array_equal(np.asarray(image), rgb)
            else:
                assert image.size == (W, H) and image.mode == "RGB"


def test_transform_keeps_void_and_grid(tmp_path):
    root = str(tmp_path / "nyu")
    data = make_nyuv2(root)
    ds = build_dataset("nyuv2", "test", root=root, transform=SegTransform(label_scale=1))
    img, lab = ds[0]
    assert img.shape == (3, H, W) and lab.shape == (H, W)
    raw = torch.from_numpy(data[TEST[0]][1].astype(np.int64))
    assert torch.equal(lab, torch.where(raw == 0, torch.full_like(raw, 255), raw - 1))
    img, lab = build_dataset("nyuv2", "test", root=root, transform=SegTransform(label_scale=4, void_id=40))[0]
    assert lab.shape == (H // 4, W // 4) and int(lab.max()) <= 40 and int(lab.min()) >= 0


@pytest.mark.parametrize("value", [41, 200, 255])
def test_out_of_range_raw_ids_name_the_file(tmp_path, value):
    root = str(tmp_path / "nyu")
    data = make_nyuv2(root)
    raw = data["0007"][1].copy()
    raw[0, :3] = value
    bad = os.path.join(root, "labels40", "0007.png")
    Image.fromarray(raw).save(bad)
    ds = build_dataset("nyuv2", "train", root=root)
    ds.load(0)  # the other files are fine
    with pytest.raises(DataError, match="0007.png") as e:
        ds.load(TRAIN.index("0007"))
    assert f"{value} (3 px)" in str(e.value)
    assert ("already converted to train ids" in str(e.value)) == (value == 255)
    assert [i for i, _ in enumerate(TRAIN) if ds.check_files([i])] == [TRAIN.index("0007")]


def test_sixteen_bit_and_rgb_labels_refused(tmp_path):
    root = str(tmp_path / "nyu")
    make_nyuv2(root)
    path = os.path.join(root, "labels40", "0002.png")
    arr = np.full((H, W), 5, np.uint16)
    arr[1, 1] = 300  # would be 44 as 8 bits
    Image.fromarray(arr).save(path)
    ds = build_dataset("nyuv2", "test", root=root)
    with pytest.raises(DataError, match="300"):
        ds.load(0)
    Image.fromarray(np.zeros((H, W, 3), np.uint8) + 7).save(path)
    with pytest.raises(DataError, match="single-channel"):
        ds.load(0)


def test_label_size_mismatch_and_label_resize(tmp_path):
    root = str(tmp_path / "nyu")
    make_nyuv2(root)
    big = np.kron(np.arange(1, 41, dtype=np.uint8)[:24, None] * np.ones((1, W), np.uint8), np.ones((2, 2), np.uint8))
    Image.fromarray(big).save(os.path.join(root, "labels40", "0002.png"))  # 48x64 for a 24x32 image
    with pytest.raises(DataError, match="0002.png"):
        build_dataset("nyuv2", "test", root=root).load(0)
    _, label = build_dataset("nyuv2", "test", root=root, label_resize=True).load(0)
    assert label.shape == (H, W)
    np.testing.assert_array_equal(label[:, 0], np.arange(24))  # raw 1..24 → train ids 0..23, nearest


def test_missing_files_and_splits_are_named(tmp_path):
    root = str(tmp_path / "nyu")
    make_nyuv2(root)
    with pytest.raises(DatasetLayoutError, match="val.txt") as e:
        build_dataset("nyuv2", "val", root=root)
    assert "--val-split test" in str(e.value) and "test, train" in str(e.value)
    os.remove(os.path.join(root, "labels40", "0005.png"))
    with pytest.raises(DatasetLayoutError, match=r"labels40[/\\]0005\.png"):
        build_dataset("nyuv2", "test", root=root)
    os.remove(os.path.join(root, "images", "0001.jpg"))
    with pytest.raises(DatasetLayoutError, match=r"0001\.jpg \(nor .*0001\.png\), listed in .*train\.txt"):
        build_dataset("nyuv2", "train", root=root)
    with open(os.path.join(root, "empty.txt"), "w") as f:
        f.write("\n")
    with pytest.raises(DatasetLayoutError, match="empty"):
        build_dataset("nyuv2", "empty", root=root)
    with pytest.raises(DatasetLayoutError, match="NYUv2 root"):
        build_dataset("nyuv2", "train", root=str(tmp_path / "nowhere"))
    os.rename(os.path.join(root, "labels40"), os.path.join(root, "labels"))
    with pytest.raises(DatasetLayoutError, match="NYUv2 labels"):
        build_dataset("nyuv2", "train", root=root)


def test_cli_train_end_to_end(tmp_path):
    from transkd_fast.cli import main

    root = str(tmp_path / "nyu")
    make_nyuv2(root)
    out = tmp_path / "run"
    # --height 32: 32x43 images, 8x11 at 1/4, enough for MiT's stage-1 reduction conv
    rc = main(["train", "--dataset", "nyuv2", "--data-root", root, "--val-split", "test", "--height", "32",
               "--model", "segformer_b0", "--steps", "2", "--batch-size", "2", "--log-every", "1",
               "--threads", "1", "--no-progress", "--num-vis", "1", "--output-dir", str(out)])
    assert rc == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r.get("event") == "train"] == [1, 2]
    ev = [r for r in recs if r.get("event") == "eval"]
    assert len(ev) == 1 and ev[0]["split"] == "test" and len(ev[0]["iou"]) == 40
    assert 0.0 <= ev[0]["pixel_acc"] <= 1.0
    meta = torch.load(out / "model.pt", map_location="cpu", weights_only=False)["meta"]
    assert (meta["num_classes"], meta["num_outputs"]) == (40, 41)  # + the void output (--void class)
    assert (out / "predictions.png").is_file()  # drawn with the NYUv2 palette
