"""``transkd-fast predict``: inputs (file / folder / glob), batching by size, the PNGs it writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from transkd_fast.cli import main
from transkd_fast.data.cityscapes import CITYSCAPES_PALETTE, label_ids_to_train_ids
from transkd_fast.engine.checkpoint import save_weights
from transkd_fast.export import load_model
from transkd_fast.models import build_model
from transkd_fast.predict import batches, collect_inputs, predict

# name -> (height, width); a and d share a size (one batch), c sits in a sub-folder.
IMAGES = {"a.png": (48, 80), "b.jpg": (40, 60), os.path.join("sub", "c.png"): (37, 53), "d.png": (48, 80)}


def _tiny_model(outputs: int) -> torch.nn.Module:
    """A random SegFormer-B0 whose logits vary over the image (perturbed weights and BN stats);
    seeded, so that what earlier tests drew from the global generator cannot make it constant."""
    torch.manual_seed(0)
    m = build_model("segformer_b0", num_classes=outputs, drop_path_rate=0.0, dropout=0.0).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        m.decode_head.linear_fuse.bn.running_var.uniform_(0.5, 2.0)
    return m


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    imgs = root / "imgs"
    for name, (h, w) in IMAGES.items():
        os.makedirs(imgs / os.path.dirname(name), exist_ok=True)
        # smooth random blobs: regions the model can tell apart
        small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(imgs / name)
    (imgs / "notes.txt").write_text("not an image")
    model = _tiny_model(20)
    with torch.no_grad():  # the void output (20th, untrained in the recipe) would win everywhere if predicted
        model.decode_head.linear_pred.bias[19] += 100.0
    weights = root / "model.pt"
    save_weights(model, str(weights), meta={"model": "segformer_b0", "num_outputs": 20, "num_classes": 19,
                                            "void": "class"})
    return root, imgs, weights, model


def _reference_ids(model, path: str, classes: int) -> np.ndarray:
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    with torch.no_grad():
        lg = model(x)[:, :classes]
    return F.interpolate(lg, size=img.shape[:2], mode="bilinear", align_corners=False).argmax(1)[0].numpy()


def test_folder_writes_every_png_at_image_size(tree, tmp_path, capsys):
    root, imgs, weights, model = tree
    out = tmp_path / "out"
    rc = main(["predict", str(imgs), "--weights", str(weights), "--output-dir", str(out),
               "--outputs", "color,ids,labelids", "--overlay", "--batch-size", "2", "--progress"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "4/4" in captured.err  # the tqdm bar ran to the end
    assert "predicted 4 images in 3 batches" in captured.out  # a and d (same size) share a batch
    assert not list(out.rglob("notes*"))
    for name, (h, w) in IMAGES.items():
        stem = os.path.splitext(name)[0]
        ids = np.array(Image.open(out / f"{stem}_ids.png"))
        assert ids.shape == (h, w) and ids.dtype == np.uint8
        assert ids.max() < 19, "the void output must never be predicted"
        ref = _reference_ids(model, str(imgs / name), 19)
        # batching changes float summation order: argmax may flip at a near-tie, nowhere else
        assert (ids == ref).mean() >= 0.999, f"{name}: {(ids != ref).sum()} pixels differ from the eager model"
        assert len(np.unique(ids)) > 1, "a constant prediction would not test the colouring"
        color = np.array(Image.open(out / f"{stem}_color.png").convert("RGB"))
        assert np.array_equal(color, CITYSCAPES_PALETTE[ids])  # 19 classes: the Cityscapes palette
        img = np.array(Image.open(imgs / name).convert("RGB"), dtype=np.float64)
        overlay = np.array(Image.open(out / f"{stem}_overlay.png").convert("RGB"), dtype=np.float64)
        assert np.abs(overlay - (0.5 * color + 0.5 * img)).max() <= 0.5 + 1e-9
        label_ids = np.array(Image.open(out / f"{stem}_labelIds.png"))
        assert label_ids.shape == (h, w) and label_ids.min() >= 7 and label_ids.max() <= 33
        assert np.array_equal(label_ids_to_train_ids(label_ids), ids)  # official ids map back to the train ids


def test_glob_and_resize_keep_the_image_size(tree, tmp_path):
    root, imgs, weights, _ = tree
    out = tmp_path / "g"
    assert main(["predict", str(imgs / "*.png"), "--weights", str(weights), "--output-dir", str(out),
                 "--outputs", "ids", "--height", "32", "--no-progress"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["a_ids.png", "d_ids.png"]  # the pattern takes neither b.jpg nor sub/c.png
    assert np.array(Image.open(out / "a_ids.png")).shape == IMAGES["a.png"]


def test_batches_group_equal_sizes(tree):
    _, imgs, _, _ = tree
    items = collect_inputs([str(imgs)])
    assert [stem for _, stem in items] == ["a", "b", "d", os.path.join("sub", "c")]
    groups = batches(items, 2, None)
    assert sorted(map(sorted, groups)) == [[0, 2], [1], [3]]
    assert len(batches(items, 1, None)) == 4
    assert sorted(map(sorted, batches(items, 2, 40))) == [[0, 2], [1], [3]]  # at height 40: a, d 67 wide; b 60; c 57
    assert len(batches(items, 3, None)) == 3


def test_refusals_are_one_line_errors(tree, tmp_path):
    root, imgs, weights, _ = tree
    nine = _tiny_model(9)
    with pytest.raises(ValueError, match="19-class"):
        predict(nine, [str(imgs)], str(tmp_path), outputs=["labelids"], progress=False)
    with pytest.raises(ValueError, match="not an output"):
        predict(nine, [str(imgs)], str(tmp_path), outputs=["colour"], progress=False)
    with pytest.raises(FileNotFoundError, match="input not found"):
        collect_inputs([str(tmp_path / "missing.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        collect_inputs([str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="same output"):  # a.png twice, from two folders, by a glob
        os.makedirs(tmp_path / "x", exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "x" / "a.png")
        collect_inputs([str(imgs / "a.png"), str(tmp_path / "x" / "*.png")])
    loaded = load_model(str(weights))
    assert (loaded.name, loaded.num_outputs, loaded.num_classes, loaded.void) == ("segformer_b0", 20, 19, "class")


def test_cli_errors_are_one_line(tree, tmp_path, capsys):
    _, imgs, weights, _ = tree
    assert main(["predict", str(tmp_path / "nothing-here"), "--weights", str(weights), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "input not found" in err[0]
    assert main(["predict", str(imgs), "--weights", str(weights), "--batch-size", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size must be ≥ 1" in err[0]


def test_slide_and_tta_score_as_infer_does(tree, tmp_path):
    """--inference slide / --tta: each image's ids are the argmax of infer()'s scores (the same
    Inference evaluate uses), upsampled to the image's size; one crop covering the image = whole."""
    from transkd_fast.engine.inference import Inference, infer

    _, imgs, weights, model = tree
    path = str(imgs / "a.png")
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    whole = tmp_path / "whole"
    assert main(["predict", path, "--weights", str(weights), "--output-dir", str(whole), "--outputs", "ids",
                 "--no-progress"]) == 0
    one_crop = tmp_path / "one"  # a 96-pixel crop covers 48×80: slide equals whole (crops shrink to the image)
    assert main(["predict", path, "--weights", str(weights), "--output-dir", str(one_crop), "--outputs", "ids",
                 "--inference", "slide", "--slide-crop", "96", "--no-progress"]) == 0
    assert np.array_equal(np.array(Image.open(whole / "a_ids.png")), np.array(Image.open(one_crop / "a_ids.png")))
    for args, inference in ((["--inference", "slide", "--slide-crop", "32", "--slide-stride", "24"],
                             Inference(mode="slide", crop=32, stride=24)),
                            (["--tta", "--tta-scales", "0.75,1.25"], Inference(tta_scales=(0.75, 1.25)))):
        out = tmp_path / args[1]
        assert main(["predict", path, "--weights", str(weights), "--output-dir", str(out), "--outputs", "ids",
                     "--no-progress", *args]) == 0
        with torch.no_grad():
            scores = infer(model, x, inference)[:, :19]
        ref = F.interpolate(scores, size=img.shape[:2], mode="bilinear", align_corners=False).argmax(1)[0].numpy()
        ids = np.array(Image.open(out / "a_ids.png"))
        assert (ids == ref).mean() >= 0.999, f"{args}: {(ids != ref).sum()} pixels differ from infer()"
        assert (ids != np.array(Image.open(whole / "a_ids.png"))).any(), f"{args} gave the whole-image prediction"


def test_bad_slide_flags_are_refused(tree, tmp_path, capsys):
    _, imgs, weights, _ = tree
    assert main(["predict", str(imgs), "--weights", str(weights), "--inference", "slide", "--slide-crop", "16",
                 "--slide-stride", "32", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--slide-stride (32) must be ≤ --slide-crop (16)" in err[0]
    assert main(["predict", str(imgs), "--weights", str(weights), "--tta", "--tta-scales", "0,x",
                 "--no-progress"]) == 2
    assert "--tta-scales" in capsys.readouterr().err


def test_nyuv2_and_scenes_class_names():
    from transkd_fast.data.nyuv2 import NYUV2_CLASSES, NYUV2_PALETTE
    from transkd_fast.data.synthetic import SCENE_CLASSES
    from transkd_fast.predict import dataset_classes

    names, pal = dataset_classes(40, "nyuv2")
    assert tuple(names) == NYUV2_CLASSES and np.array_equal(pal, NYUV2_PALETTE)
    assert tuple(dataset_classes(40)[0]) == NYUV2_CLASSES  # the one known 40-class dataset
    assert tuple(dataset_classes(len(SCENE_CLASSES))[0]) == SCENE_CLASSES
    with pytest.raises(ValueError, match="nyuv2 has 40 classes, the model predicts 19"):
        dataset_classes(19, "nyuv2")
