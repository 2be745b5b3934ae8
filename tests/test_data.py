"""Datasets on tiny trees generated in the exact real layouts, transforms, synthetic data, sampler."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from transkd_fast.data import (
    ACDC,
    LABEL_ID_TO_TRAIN_ID,
    VOC2012,
    Cityscapes,
    DatasetLayoutError,
    SegTransform,
    Synthetic,
    build_dataset,
    label_ids_to_train_ids,
)
from transkd_fast.data.sampler import ShardedEvalSampler, StepBatchSampler
from transkd_fast.data.voc import VOC_PALETTE

H, W = 32, 64


def _png(path: str, arr: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def _rgb(rng) -> np.ndarray:
    return rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)


# Every Cityscapes label id 0..33 at least once, so the whole table is exercised.
def _label_ids(rng) -> np.ndarray:
    ids = np.concatenate([np.arange(34), rng.integers(0, 34, size=H * W - 34)]).astype(np.uint8)
    return rng.permutation(ids).reshape(H, W)


def _official_train_id(i: int) -> int:
    # cityscapesScripts labels.py, spelled out independently of the module's table.
    table = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
             27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    return table.get(i, 255)


def make_cityscapes(root: str, split: str = "val", train_ids: bool = True, n_cities: int = 2):
    rng = np.random.default_rng(1)
    out = []
    for c in range(n_cities):
        city = f"city{c}"
        for f in range(2):
            stem = f"{city}_000000_{f:06d}"
            _png(os.path.join(root, "leftImg8bit", split, city, f"{stem}_leftImg8bit.png"), _rgb(rng))
            ids = _label_ids(rng)
            _png(os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_labelIds.png"), ids)
            if train_ids:
                _png(os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_labelTrainIds.png"),
                     label_ids_to_train_ids(ids))
            out.append(ids)
    return out


def test_label_table_matches_official():
    assert len(LABEL_ID_TO_TRAIN_ID) == 19
    assert sorted(LABEL_ID_TO_TRAIN_ID.values()) == list(range(19))
    ids = np.arange(256, dtype=np.uint8)
    mapped = label_ids_to_train_ids(ids)
    for i in range(256):
        assert mapped[i] == _official_train_id(i), i


@pytest.mark.parametrize("train_ids", [True, False])
def test_cityscapes_layout_and_mapping(tmp_path, train_ids):
    ids = make_cityscapes(str(tmp_path), "val", train_ids=train_ids)
    ds = Cityscapes(str(tmp_path), "val")
    assert len(ds) == 4 and ds.num_classes == 19
    assert all(s[2] == (not train_ids) for s in ds.samples)  # read labelIds only when trainIds are absent
    img, lab = ds.load(0)
    assert img.size == (W, H) and lab.shape == (H, W)
    expect = np.vectorize(_official_train_id)(ids[0]).astype(np.uint8)
    np.testing.assert_array_equal(lab, expect)
    assert (lab == 255).any() and set(np.unique(lab)) == set(range(19)) | {255}
    # void → id 19 for the 20-output recipe, or kept as 255 to be ignored
    x, y = SegTransform(void_id=19, label_scale=1)(img, lab, np.random.default_rng(0))
    assert x.shape == (3, H, W) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64
    np.testing.assert_array_equal(y.numpy(), np.where(expect == 255, 19, expect))
    _, y2 = SegTransform(void_id=None, label_scale=1)(img, lab, np.random.default_rng(0))
    np.testing.assert_array_equal(y2.numpy(), expect)


def test_cityscapes_missing_dirs(tmp_path):
    with pytest.raises(DatasetLayoutError, match="directory not found") as e:
        Cityscapes(str(tmp_path / "nope"), "train")
    assert str(tmp_path / "nope") in str(e.value) and "leftImg8bit" in str(e.value)
    make_cityscapes(str(tmp_path), "val")
    with pytest.raises(DatasetLayoutError) as e:
        Cityscapes(str(tmp_path), "train")
    assert os.path.join(str(tmp_path), "leftImg8bit", "train") in str(e.value)
    assert "expected layout" in str(e.value) and "_gtFine_labelTrainIds.png" in str(e.value)
    # an image without its label names the label files it looked for
    os.remove(os.path.join(tmp_path, "gtFine", "val", "city0", "city0_000000_000000_gtFine_labelIds.png"))
    os.remove(os.path.join(tmp_path, "gtFine", "val", "city0", "city0_000000_000000_gtFine_labelTrainIds.png"))
    with pytest.raises(DatasetLayoutError, match="city0_000000_000000_gtFine_labelTrainIds.png"):
        Cityscapes(str(tmp_path), "val")


def make_acdc(root: str, split: str = "train", conds=("fog", "night", "rain", "snow"), label_ids: bool = False):
    rng = np.random.default_rng(2)
    for cond in conds:
        seq = "GOPR0475"
        stem = f"{seq}_frame_000041"
        _png(os.path.join(root, "rgb_anon", cond, split, seq, f"{stem}_rgb_anon.png"), _rgb(rng))
        ids = _label_ids(rng)
        if label_ids:
            _png(os.path.join(root, "gt", cond, split, seq, f"{stem}_gt_labelIds.png"), ids)
        else:
            _png(os.path.join(root, "gt", cond, split, seq, f"{stem}_gt_labelTrainIds.png"),
                 label_ids_to_train_ids(ids))


@pytest.mark.parametrize("label_ids", [False, True])
def test_acdc(tmp_path, label_ids):
    make_acdc(str(tmp_path), label_ids=label_ids)
    ds = ACDC(str(tmp_path), "train")
    assert len(ds) == 4
    img, lab = ds.load(3)
    assert img.size == (W, H) and lab.max() == 255 and lab[lab != 255].max() <= 18
    assert len(ACDC(str(tmp_path), "train", conditions=("night",))) == 1
    with pytest.raises(DatasetLayoutError) as e:
        ACDC(str(tmp_path), "val")
    assert os.path.join(str(tmp_path), "rgb_anon", "fog", "val") in str(e.value)
    assert "_rgb_anon.png" in str(e.value)


def make_voc(root: str, ids=("2007_000032", "2007_000039"), split="train"):
    rng = np.random.default_rng(3)
    for i in ids:
        os.makedirs(os.path.join(root, "JPEGImages"), exist_ok=True)
        Image.fromarray(_rgb(rng)).save(os.path.join(root, "JPEGImages", f"{i}.jpg"), quality=95)
        lab = rng.integers(0, 21, size=(H, W)).astype(np.uint8)
        lab[0, :] = 255  # object boundary
        os.makedirs(os.path.join(root, "SegmentationClass"), exist_ok=True)
        im = Image.frombytes("P", (W, H), lab.tobytes())
        pal = np.zeros((256, 3), np.uint8)
        pal[:21] = VOC_PALETTE
        pal[255] = (224, 224, 192)
        im.putpalette(pal.reshape(-1).tolist())
        im.save(os.path.join(root, "SegmentationClass", f"{i}.png"))
    os.makedirs(os.path.join(root, "ImageSets", "Segmentation"), exist_ok=True)
    with open(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")


def test_voc(tmp_path):
    make_voc(str(tmp_path))
    ds = VOC2012(str(tmp_path), "train")
    assert len(ds) == 2 and ds.num_classes == 21
    img, lab = ds.load(1)
    with Image.open(os.path.join(tmp_path, "SegmentationClass", "2007_000039.png")) as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(lab, np.array(im))  # palette indices, not colors
    assert (lab[0] == 255).all() and lab[1:].max() <= 20
    # 21 classes, 255 ignored: no void mapping
    _, y = SegTransform(label_scale=1)(img, lab, np.random.default_rng(0))
    assert (y[0] == 255).all()
    with pytest.raises(DatasetLayoutError) as e:
        VOC2012(str(tmp_path), "val")
    assert os.path.join("ImageSets", "Segmentation", "val.txt") in str(e.value)
    os.remove(os.path.join(tmp_path, "JPEGImages", "2007_000032.jpg"))
    with pytest.raises(DatasetLayoutError, match="2007_000032.jpg"):
        VOC2012(str(tmp_path), "train")
    with pytest.raises(DatasetLayoutError, match="SegmentationClass"):
        VOC2012(str(tmp_path / "empty"), "train")


def test_build_dataset_names(tmp_path):
    assert isinstance(build_dataset("synthetic", "val", num_samples=3), Synthetic)
    with pytest.raises(ValueError, match="data root"):
        build_dataset("cityscapes", "train")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("kitti", "train", root=str(tmp_path))


def _block_pair(lh: int, lw: int, scale: int):
    """A label and an image whose (scale×scale) block under label pixel (i, j) has value label+1."""
    rng = np.random.default_rng(4)
    lab = rng.integers(0, 19, size=(lh, lw)).astype(np.uint8)
    img = np.kron(lab + 1, np.ones((scale, scale), np.uint8)) * 10
    return Image.fromarray(np.repeat(img[..., None], 3, axis=2)), lab


@pytest.mark.parametrize("label_scale", [4, 1])
def test_transform_alignment_flip_translate(label_scale):
    image, lab = _block_pair(9, 17, 4)  # image 36×68
    if label_scale == 1:
        lab = np.kron(lab, np.ones((4, 4), np.uint8))
    t = SegTransform(train=True, label_scale=label_scale, max_translate=2, void_id=None)
    shifted = flipped = 0
    for seed in range(12):
        x, y = t(image, lab, np.random.default_rng(seed))
        assert x.shape == (3, 36, 68) and y.shape == ((9, 17) if label_scale == 4 else (36, 68))
        img = (x[0] * 255).round().numpy()
        s = 4 if label_scale == 4 else 1
        centers = img[s // 2::s, s // 2::s][: y.shape[0], : y.shape[1]]
        valid = y.numpy() != 255
        np.testing.assert_array_equal(centers[valid], (y.numpy()[valid] + 1) * 10)  # image and label aligned
        assert (centers[~valid] == 0).all()  # uncovered: image 0, label void
        shifted += int((~valid).any())
        flipped += int(not np.array_equal(y.numpy()[valid], lab[valid]))
    assert shifted >= 6 and flipped >= 3
    # evaluation transform: deterministic, no augmentation
    x0, y0 = SegTransform(train=False, label_scale=4)(image, lab if label_scale == 4 else lab[::4, ::4],
                                                       np.random.default_rng(0))
    assert y0.shape == (9, 17)


def test_transform_resize_to_height():
    img = Image.fromarray(np.random.default_rng(5).integers(0, 255, (64, 128, 3), dtype=np.uint8))
    lab = np.random.default_rng(6).integers(0, 19, (64, 128)).astype(np.uint8)
    x, y = SegTransform(height=30, label_scale=4)(img, lab, np.random.default_rng(0))
    assert x.shape == (3, 30, 60) and y.shape == (8, 15)  # ⌈30/4⌉ × ⌈60/4⌉, SegFormer's logit size
    x, y = SegTransform(height=30, label_scale=1)(img, lab, np.random.default_rng(0))
    assert y.shape == (30, 60) and set(np.unique(y.numpy())) <= set(range(19))
    with pytest.raises(ValueError, match="label_scale"):
        SegTransform(label_scale=2)


def test_synthetic_deterministic_and_varied():
    a = Synthetic("train", num_samples=6, height=H, width=W, seed=0)
    b = Synthetic("train", num_samples=6, height=H, width=W, seed=0, cache=False)
    c = Synthetic("train", num_samples=6, height=H, width=W, seed=1)
    v = Synthetic("val", num_samples=6, height=H, width=W, seed=0)
    for i in range(6):
        ia, la = a.load(i)
        ib, lb = b.load(i)
        np.testing.assert_array_equal(np.asarray(ia), np.asarray(ib))
        np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(np.asarray(a.load(0)[0]), np.asarray(c.load(0)[0]))
    assert not np.array_equal(np.asarray(a.load(0)[0]), np.asarray(v.load(0)[0]))
    big = Synthetic("train", num_samples=24, height=64, width=128, seed=0)
    labels = np.stack([big.load(i)[1] for i in range(24)])
    present = set(np.unique(labels)) - {255}
    assert present == set(range(9))  # background + 8 shape×texture classes
    assert 0.005 < (labels == 255).mean() < 0.2  # void outlines
    assert 0.05 < ((labels != 0) & (labels != 255)).mean() < 0.7
    x, y = big[(3, 123)]
    x2, y2 = big[(3, 123)]
    assert torch.equal(x, x2) and torch.equal(y, y2)  # augmentation seeded by the key


def test_step_sampler_sharding_and_resume():
    full = StepBatchSampler(10, 4, total_steps=7, seed=3)
    ranks = [StepBatchSampler(10, 4, total_steps=7, seed=3, rank=r, world_size=2) for r in range(2)]
    batches = list(full)
    assert len(batches) == 7
    for step, (b, b0, b1) in enumerate(zip(batches, *ranks)):
        assert b == b0 + b1
    # each epoch is a permutation
    idx = [i for b in batches for i, _ in b]
    assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:20]) == list(range(10))
    assert list(StepBatchSampler(10, 4, total_steps=7, seed=3, start_step=4)) == batches[4:]
    assert list(StepBatchSampler(10, 4, total_steps=7, seed=4))[0] != batches[0]
    with pytest.raises(ValueError, match="divisible"):
        StepBatchSampler(10, 3, total_steps=2, world_size=2)
    shards = [list(ShardedEvalSampler(7, 2, r, 2)) for r in range(2)]
    assert sorted(i for s in shards for b in s for i in b) == list(range(7))
