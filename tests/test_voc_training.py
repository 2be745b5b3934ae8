"""Issue #14 item 11: real Pascal VOC (images of different sizes) trains and evaluates through the
CLI: the training transform takes the dataset's random scale + crop + pad pipeline and the
evaluation batches go through pad_collate (today's main failed at the first batch with
"stack expects each tensor to be equal size")."""

import json

from test_crop_pipeline import make_voc_sizes

from transkd_fast.cli import main


def test_voc_of_varying_sizes_trains_and_evaluates(tmp_path):
    root = tmp_path / "voc"
    make_voc_sizes(str(root))
    # whole images at evaluation: large enough for MiT's stage-1 reduction conv (8x8 at 1/4)
    make_voc_sizes(str(root), split="val", sizes=[(64, 96), (72, 80), (64, 64)])
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "voc", "--data-root", str(root), "--model", "segformer_b0",
               "--steps", "2", "--batch-size", "2", "--eval-batch-size", "3", "--crop-size", "32",
               "--log-every", "1", "--no-progress", "--output-dir", str(out)])
    assert rc == 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r.get("event") == "train"] == [1, 2]
    ev = [r for r in steps if r.get("event") == "eval"]  # the end-of-run evaluation on val (3 sizes, 1 batch)
    assert len(ev) == 1 and ev[0]["split"] == "val"
    assert ev[0]["miou"] is None or 0.0 <= ev[0]["miou"] <= 1.0
    assert 0.0 <= ev[0]["pixel_acc"] <= 1.0


def test_crop_size_only_in_training(tmp_path):
    from transkd_fast.data import build_dataset
    from transkd_fast.engine.config import TrainConfig
    from transkd_fast.engine.trainer import make_transform

    root = tmp_path / "voc"
    make_voc_sizes(str(root))
    ds = build_dataset("voc", "train", root=str(root))
    cfg = TrainConfig(dataset="voc", data_root=str(root))
    assert make_transform(cfg, True, ds.num_classes, ds=ds).crop_size == ds.default_crop_size
    assert make_transform(cfg, False, ds.num_classes, ds=ds).crop_size is None
    cfg.crop_size = 48
    assert make_transform(cfg, True, ds.num_classes, ds=ds).crop_size == (48, 48)
