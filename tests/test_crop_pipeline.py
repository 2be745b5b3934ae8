"""Images of different sizes (real Pascal VOC): the random scale + crop + pad training pipeline and
padded evaluation batches, through the sampler/DataLoader path the trainer uses."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from transkd_fast.data import SegTransform, build_dataset, pad_collate
from transkd_fast.data.sampler import ShardedEvalSampler, StepBatchSampler
from transkd_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from transkd_fast.data.voc import VOC_PALETTE

SIZES = [(40, 56), (28, 36), (52, 44), (24, 30)]  # (H, W): all different, some smaller than the crop
EVAL_SIZES = [(40, 56), (28, 36), (52, 44)]


def make_voc_sizes(root: str, split: str = "train", sizes=SIZES) -> list[str]:
    rng = np.random.default_rng(11)
    ids = []
    for n, (h, w) in enumerate(sizes):
        i = f"2008_{n:06d}"
        ids.append(i)
        os.makedirs(os.path.join(root, "JPEGImages"), exist_ok=True)
        os.makedirs(os.path.join(root, "SegmentationClass"), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            os.path.join(root, "JPEGImages", f"{i}.jpg"), quality=95)
        lab = rng.integers(0, 21, size=(h, w)).astype(np.uint8)
        lab[:, 0] = 255
        im = Image.frombytes("P", (w, h), lab.tobytes())
        pal = np.zeros((256, 3), np.uint8)
        pal[:21] = VOC_PALETTE
        im.putpalette(pal.reshape(-1).tolist())
        im.save(os.path.join(root, "SegmentationClass", f"{i}.png"))
    os.makedirs(os.path.join(root, "ImageSets", "Segmentation"), exist_ok=True)
    with open(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")
    return ids


def _train_loader(root: str, seed: int, steps: int = 3, crop=(32, 32), scale=(0.5, 2.0)):
    ds = build_dataset("voc", "train", root=root)
    ds.transform = SegTransform(train=True, label_scale=4, crop_size=crop, scale_range=scale,
                                mean=IMAGENET_MEAN, std=IMAGENET_STD)
    sampler = StepBatchSampler(len(ds), 2, total_steps=steps, seed=seed)
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, generator=torch.Generator().manual_seed(seed))


def test_voc_of_varying_sizes_trains_in_batches_of_two(tmp_path):
    make_voc_sizes(str(tmp_path))
    ds = build_dataset("voc", "train", root=str(tmp_path))
    assert ds.default_crop_size == (512, 512) and ds.default_scale_range == (0.5, 2.0)
    assert len({ds.load(i)[0].size for i in range(len(ds))}) == len(SIZES)
    batches = list(_train_loader(str(tmp_path), seed=0))
    assert len(batches) == 3
    for x, y in batches:
        assert x.shape == (2, 3, 32, 32) and y.shape == (2, 8, 8) and y.dtype == torch.int64
        assert set(torch.unique(y).tolist()) <= set(range(21)) | {255}
    # a pure function of (seed, step): the same batches again, other ones for another seed
    again = list(_train_loader(str(tmp_path), seed=0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    other = list(_train_loader(str(tmp_path), seed=1))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(batches, other))
    # the same step of a resumed sampler gives the same batch
    ds2 = build_dataset("voc", "train", root=str(tmp_path))
    ds2.transform = _train_loader(str(tmp_path), 0).dataset.transform
    resumed = torch.utils.data.DataLoader(ds2, batch_sampler=StepBatchSampler(len(ds2), 2, 3, seed=0, start_step=2))
    x2, y2 = next(iter(resumed))
    assert torch.equal(x2, batches[2][0]) and torch.equal(y2, batches[2][1])


def _coded_pair(h: int, w: int, seed: int, block: int = 4):
    """A label of block×block squares and an image whose pixels encode the label: (label + 1) · 10."""
    rng = np.random.default_rng(seed)
    lab = np.kron(rng.integers(0, 19, size=(h // block, w // block)),
                  np.ones((block, block), np.int64)).astype(np.uint8)
    img = ((lab.astype(np.int64) + 1) * 10).astype(np.uint8)
    return Image.fromarray(np.repeat(img[..., None], 3, axis=2)), lab


@pytest.mark.parametrize("label_scale", [1, 4])
def test_crop_keeps_image_and_label_aligned_and_pads_with_void(label_scale):
    image, lab = _coded_pair(24, 40, 0)  # smaller than the crop in height, larger in width
    t = SegTransform(train=True, label_scale=label_scale, crop_size=(32, 32))
    crops = set()
    for seed in range(16):
        x, y = t(image, lab, np.random.default_rng(seed))
        assert x.shape == (3, 32, 32) and y.shape == ((32, 32) if label_scale == 1 else (8, 8))
        img = (x[0] * 255).round().numpy()
        s = label_scale
        centers = img[s // 2::s, s // 2::s]
        yy = y.numpy()
        valid = yy != 255
        np.testing.assert_array_equal(centers[valid], (yy[valid] + 1) * 10)  # aligned
        assert (centers[~valid] == 0).all()  # padding: image 0, label void
        assert (~valid).any() and not valid[-1].any()  # the bottom rows are padding (24 < 32)
        crops.add(yy.tobytes())
    assert len(crops) > 2  # the crop moves (and flips)


def test_random_scale_changes_size_and_keeps_alignment():
    image, lab = _coded_pair(64, 96, 3, block=16)
    t = SegTransform(train=True, label_scale=1, crop_size=48, scale_range=(0.5, 2.0), hflip=False)
    padded_seen = full_seen = 0
    for seed in range(12):
        x, y = t(image, lab, np.random.default_rng(seed))
        assert x.shape == (3, 48, 48) and y.shape == (48, 48)
        img = (x[0] * 255).round().numpy()
        yy = y.numpy()
        valid = yy != 255
        # bilinear image vs nearest label after rescaling: they agree away from block edges
        agree = (img[valid] == (yy[valid] + 1) * 10).mean()
        assert agree > 0.6
        padded_seen += int((~valid).any())
        full_seen += int(valid.all())
    assert padded_seen and full_seen  # scale < 0.75 pads (64·s < 48), larger scales crop


def test_normalized_padding_is_the_mean_colour():
    image, lab = _coded_pair(16, 16, 1)
    x, y = SegTransform(train=True, label_scale=1, crop_size=(24, 20), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                        hflip=False)(image, lab, np.random.default_rng(0))
    assert x.shape == (3, 24, 20)
    assert (x[:, 16:] == 0).all() and (x[:, :, 16:] == 0).all()  # 0 after normalization: the mean
    assert (y[16:] == 255).all() and (y[:, 16:] == 255).all()
    assert (y[:16, :16] != 255).all()


def test_crop_arguments_are_checked():
    with pytest.raises(ValueError, match="training"):
        SegTransform(train=False, crop_size=32)
    with pytest.raises(ValueError, match="crop_size"):
        SegTransform(train=True, scale_range=(0.5, 2.0))
    with pytest.raises(ValueError, match="scale_range"):
        SegTransform(train=True, crop_size=32, scale_range=(2.0, 0.5))


def test_pad_collate():
    a = (torch.rand(3, 8, 12), torch.randint(0, 5, (2, 3)))
    b = (torch.rand(3, 6, 16), torch.randint(0, 5, (2, 4)))
    x, y = pad_collate([a, b])
    assert x.shape == (2, 3, 8, 16) and y.shape == (2, 2, 4)
    assert torch.equal(x[0, :, :, :12], a[0]) and (x[0, :, :, 12:] == 0).all()
    assert torch.equal(x[1, :, :6], b[0]) and (x[1, :, 6:] == 0).all()
    assert torch.equal(y[0, :, :3], a[1]) and (y[0, :, 3:] == 255).all() and torch.equal(y[1], b[1])
    same = [(torch.rand(3, 4, 4), torch.randint(0, 5, (4, 4))) for _ in range(3)]
    ref = torch.utils.data.default_collate(same)
    got = pad_collate(same)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_evaluation_of_varying_sizes_with_padded_batches(tmp_path):
    from transkd_fast.engine.trainer import evaluate

    make_voc_sizes(str(tmp_path), split="val", sizes=EVAL_SIZES)
    ds = build_dataset("voc", "val", root=str(tmp_path))
    ds.transform = SegTransform(train=False, label_scale=4)
    # a stand-in with SegFormer's 1/4-resolution logits (a real one costs seconds per new shape on CPU)
    model = torch.nn.Sequential(torch.nn.AvgPool2d(4, ceil_mode=True), torch.nn.Conv2d(3, 21, 1)).eval()
    padded = torch.utils.data.DataLoader(ds, batch_sampler=ShardedEvalSampler(len(ds), 2), collate_fn=pad_collate)
    x, y = next(iter(padded))
    assert x.shape[0] == 2 and y.shape[-2:] == (-(-x.shape[-2] // 4), -(-x.shape[-1] // 4))
    single = torch.utils.data.DataLoader(ds, batch_sampler=ShardedEvalSampler(len(ds), 1))
    m_pad, m_one = evaluate(model, padded), evaluate(model, single)
    expected = sum(int((ds[i][1] != 255).sum()) for i in range(len(ds)))
    assert m_pad["pixels"] == m_one["pixels"] == expected  # padding is never counted
