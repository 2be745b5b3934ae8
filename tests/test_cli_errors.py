"""CLI user errors are one line ``transkd-fast: error: …`` with exit code 2 (#14), weight files
report what they loaded (#8), ``python -m`` works (#12), ``--label-scale 1`` distills (#13),
the ops package exports its ops (#19)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transkd_fast.cli import main

CLI = str(Path(sys.executable).parent / "transkd-fast")
TINY = ["--model", "segformer_b0", "--batch-size", "2", "--synthetic-train-size", "8", "--synthetic-val-size", "2",
        "--synthetic-height", "32", "--synthetic-width", "64", "--log-every", "1", "--no-progress",
        "--no-eval-at-end"]


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    return env


def run_main(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line_error(rc, err, *words):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in lines if line.startswith("transkd-fast: error: ")]
    assert len(errors) == 1 and len(lines) == 1, err[-3000:]
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


# -- 9 / 14: bad numbers --------------------------------------------------------------------------


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--steps", "0"), ("--steps", "-5"),
                                        ("--eval-batch-size", "0"), ("--lr", "-1e-3"), ("--lr", "0"),
                                        ("--threads", "0"), ("--ckpt-every", "-1")])
def test_bad_numbers_are_one_line_errors(tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    rc, _, err = run_main(["train", *TINY, "--steps", "2", "--output-dir", str(out), flag, value], capsys)
    assert_one_line_error(rc, err, flag)
    assert not (out / "model.pt").exists() and not (out / "last.pt").exists()


def test_negative_number_is_taken_as_a_value(capsys):
    from transkd_fast.cli import build_parser

    args = build_parser().parse_args(["train", "--lr", "-1e-3", "--grad-clip", "-.5"])
    assert args.lr == -1e-3 and args.grad_clip == -0.5


def test_real_entry_point_no_traceback_and_debug_shows_it(tmp_path):
    base = [CLI, "train", *TINY, "--steps", "-5", "--output-dir", str(tmp_path / "x")]
    out = subprocess.run(base, env=_env(), capture_output=True, text=True, timeout=300)
    assert_one_line_error(out.returncode, out.stderr, "--steps")
    assert not (tmp_path / "x" / "model.pt").exists() and "last.pt" not in out.stdout
    dbg = subprocess.run(base + ["--debug"], env=_env(), capture_output=True, text=True, timeout=300)
    assert dbg.returncode == 2 and "Traceback" in dbg.stderr


# -- 14: resume / weights of something else ------------------------------------------------------


@pytest.fixture(scope="module")
def b1_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("b1") / "run"
    assert main(["train", *TINY, "--model", "segformer_b1", "--steps", "1", "--output-dir", str(out)]) == 0
    return out


def test_weights_of_another_model_name_the_model(tmp_path, capsys, b1_run):
    rc, _, err = run_main(["train", *TINY, "--steps", "1", "--weights", str(b1_run / "model.pt"),
                           "--output-dir", str(tmp_path / "o")], capsys)
    line = assert_one_line_error(rc, err, "model.pt", "--model segformer_b1")
    assert len(line) < 400
    rc, _, err = run_main(["evaluate", "--model", "segformer_b1", "--void", "ignore", "--weights",
                           str(b1_run / "model.pt"), "--synthetic-val-size", "1", "--no-progress"], capsys)
    assert_one_line_error(rc, err, "--void class")
    # a bare state dict of another model (no metadata): one line, not 190 size mismatches
    sd = torch.load(b1_run / "model.pt", weights_only=False)["model"]
    torch.save(sd, tmp_path / "b1_state.pth")
    rc, _, err = run_main(["train", *TINY, "--steps", "1", "--weights", str(tmp_path / "b1_state.pth"),
                           "--output-dir", str(tmp_path / "o2")], capsys)
    line = assert_one_line_error(rc, err, "b1_state.pth", "segformer_b1")
    assert len(line) < 400


def test_resume_with_another_method_is_one_line(tmp_path, capsys, b1_run):
    out = tmp_path / "kd"
    kd = ["distill", *TINY, "--teacher", "segformer_b1", "--teacher-weights", str(b1_run / "model.pt"),
          "--steps", "2", "--output-dir", str(out)]
    assert main(kd + ["--stop-at", "1"]) == 0
    capsys.readouterr()
    rc, _, err = run_main(kd + ["--resume", "auto", "--method", "transkd_gl"], capsys)
    assert_one_line_error(rc, err, "--method")
    rc, _, err = run_main(["train", *TINY, "--steps", "2", "--output-dir", str(out), "--resume", "auto"], capsys)
    assert_one_line_error(rc, err, "distill")


# -- 8: weights that match nothing ---------------------------------------------------------------


def test_foreign_and_partial_weights_are_refused(tmp_path, capsys, b1_run):
    foreign = {"encoder.conv.weight": torch.randn(8, 3, 3, 3), "fc.weight": torch.randn(4, 8)}
    torch.save(foreign, tmp_path / "foreign.pth")
    sd = torch.load(b1_run / "model.pt", weights_only=False)["model"]
    five = dict(list(sd.items())[:5])  # 5 tensors of the model, 2 of something else
    torch.save({**foreign, **five}, tmp_path / "few.pth")
    ev = ["evaluate", "--model", "segformer_b1", "--synthetic-val-size", "1", "--synthetic-height", "32",
          "--synthetic-width", "64", "--no-progress"]
    rc, _, err = run_main(ev + ["--weights", str(tmp_path / "foreign.pth")], capsys)
    assert_one_line_error(rc, err, "foreign.pth", "--weights")
    rc, _, err = run_main(ev + ["--weights", str(tmp_path / "few.pth")], capsys)
    line = assert_one_line_error(rc, err, "few.pth", "--allow-partial-weights")
    assert "loaded 5/191" in line and "unexpected 2" in line
    rc, out, _ = run_main(ev + ["--weights", str(tmp_path / "few.pth"), "--allow-partial-weights"], capsys)
    assert rc == 0 and "loaded 5/191" in out
    # backbone only: the head would be random
    torch.save({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}, tmp_path / "bb.pth")
    rc, _, err = run_main(ev + ["--weights", str(tmp_path / "bb.pth")], capsys)
    assert_one_line_error(rc, err, "bb.pth", "decode head")
    rc, out, _ = run_main(ev + ["--weights", str(b1_run / "model.pt")], capsys)
    assert rc == 0 and "missing 0" in out and "unexpected 0" in out
    # train from a backbone-only file: the usual ImageNet start, accepted and reported
    rc, out, _ = run_main(["train", *TINY, "--model", "segformer_b1", "--steps", "1", "--weights",
                           str(tmp_path / "bb.pth"), "--output-dir", str(tmp_path / "t")], capsys)
    assert rc == 0 and "decode head" in out
    rc, _, err = run_main(["distill", *TINY, "--teacher", "segformer_b1", "--teacher-weights",
                           str(tmp_path / "foreign.pth"), "--steps", "1", "--output-dir", str(tmp_path / "d")], capsys)
    assert_one_line_error(rc, err, "foreign.pth", "--teacher-weights")


# -- 14: a corrupt PNG in the middle of training ------------------------------------------------


@pytest.mark.parametrize("workers", ["0", "1"])  # 1: the error comes back through a DataLoader worker
def test_corrupt_label_png_is_one_line_naming_the_file(tmp_path, capsys, workers):
    root = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [f"img{i}" for i in range(4)]
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        Image.fromarray(rng.integers(0, 21, (32, 64), dtype=np.uint8)).save(root / "SegmentationClass" / f"{i}.png")
    (root / "SegmentationClass" / "img2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("img0\n")
    rc, _, err = run_main(["train", "--dataset", "voc", "--data-root", str(root), "--model", "segformer_b0",
                           "--batch-size", "1", "--steps", "8", "--no-progress", "--no-eval-at-end",
                           "--num-workers", workers, "--output-dir", str(tmp_path / "o")], capsys)
    assert_one_line_error(rc, err, "img2.png")


# -- 12: python -m ---------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["transkd_fast.cli", "transkd_fast"])
def test_python_dash_m(module, tmp_path):
    out = subprocess.run([sys.executable, "-m", module, "train", *TINY, "--steps", "1", "--output-dir",
                          str(tmp_path / "m")], env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "m" / "model.pt").exists()


# -- 13: distill at full label resolution ----------------------------------------------------------


def test_distill_label_scale_1(tmp_path):
    from transkd_fast.engine import TrainConfig, distill

    res = distill(TrainConfig(output_dir=str(tmp_path / "kd1"), model="segformer_b0", teacher="segformer_b0",
                              steps=2, batch_size=2, label_scale=1, synthetic_train_size=4, synthetic_val_size=2,
                              synthetic_height=32, synthetic_width=64, log_every=1, progress=False, num_vis=1))
    assert res.steps == 2 and 0.0 <= res.metrics["miou"] <= 1.0
    assert all(np.isfinite(r["terms"]["loss"]) for r in res.history)
    assert res.metrics["pixels"] > 2 * 8 * 16  # evaluated at the full-resolution labels, not the 8x16 grid


# -- 19: the ops package ---------------------------------------------------------------------------


def test_ops_package_exports_the_ops():
    import transkd_fast.ops as ops
    from transkd_fast.ops import (  # noqa: F401
        efficient_attention,
        hcl_loss,
        kd_kl_div,
        selective_fuse,
        selective_pool,
        weighted_mse,
    )
    from transkd_fast.ops.hcl import hcl_loss as direct

    assert ops.hcl_loss is direct
    assert {"efficient_attention", "selective_pool", "selective_fuse", "hcl_loss", "kd_kl_div",
            "weighted_mse"} <= set(ops.__all__)
