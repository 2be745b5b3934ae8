"""Engine: exact resume, DDP (2 gloo ranks) vs 1 rank, non-finite stop, CE normalization, evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from transkd_fast.engine import EvalConfig, NonFiniteLossError, TrainConfig, evaluate, train
from transkd_fast.engine.checkpoint import load_checkpoint
from transkd_fast.engine.trainer import global_weighted_ce

TINY = dict(model="segformer_b0", batch_size=2, synthetic_train_size=8, synthetic_val_size=4, synthetic_height=32,
            synthetic_width=64, log_every=1, progress=False, eval_at_end=False)


def _weights(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_resume_is_bitwise_exact(tmp_path):
    a = train(TrainConfig(output_dir=str(tmp_path / "a"), steps=6, **TINY))
    b1 = train(TrainConfig(output_dir=str(tmp_path / "b"), steps=6, stop_at=3, **TINY))
    assert b1.steps == 3 and load_checkpoint(b1.checkpoint)["step"] == 3
    assert not os.path.exists(tmp_path / "b" / "model.pt")
    b2 = train(TrainConfig(output_dir=str(tmp_path / "b"), steps=6, resume="auto", **TINY))
    wa, wb = _weights(a.weights), _weights(b2.weights)
    assert wa.keys() == wb.keys()
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"weights differ after resume: {diff[:5]}"
    # dropout / drop path were active (defaults 0.1): the RNG states really had to be restored
    assert TINY.get("drop_path_rate") is None
    la = [r["terms"]["loss"] for r in a.history]
    lb = [r["terms"]["loss"] for r in b1.history + b2.history]
    assert la == lb
    ca, cb = load_checkpoint(a.checkpoint), load_checkpoint(b2.checkpoint)
    assert ca["optimizer"]["state"][0]["step"] == cb["optimizer"]["state"][0]["step"] == 6
    assert ca["scheduler"]["last_epoch"] == cb["scheduler"]["last_epoch"] == 6


def test_nonfinite_stops_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError) as e:
        train(TrainConfig(output_dir=str(out), steps=4, ckpt_every=1, inject_nan="3:ce", **TINY))
    msg = str(e.value)
    assert "step 3" in msg and "'ce'" in msg and "last good checkpoint" in msg and "step 2" in msg
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (out / "model.pt").exists()
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert recs[-1]["event"] == "nonfinite" and recs[-1]["term"] == "ce"
    # the run continues from the good checkpoint once the cause is gone
    res = train(TrainConfig(output_dir=str(out), steps=4, resume="auto", **TINY))
    assert res.steps == 4 and (out / "model.pt").exists()


def test_global_weighted_ce_matches_cross_entropy():
    logits = torch.randn(2, 5, 7, 9, dtype=torch.float64).float()
    labels = torch.randint(0, 5, (2, 7, 9))
    labels[0, :2] = 255
    w = torch.rand(5) + 0.5
    ref = F.cross_entropy(logits, labels, weight=w, ignore_index=255)
    torch.testing.assert_close(global_weighted_ce(logits, labels, w, 255), ref)
    torch.testing.assert_close(global_weighted_ce(logits, labels, None, 255),
                               F.cross_entropy(logits, labels, ignore_index=255))


def test_evaluate_quarter_and_full(tmp_path):
    res = train(TrainConfig(output_dir=str(tmp_path / "t"), steps=1, **{**TINY, "eval_at_end": True, "num_vis": 2}))
    assert (tmp_path / "t" / "predictions.png").exists() and (tmp_path / "t" / "curves.png").exists()
    assert 0.0 <= res.metrics["miou"] <= 1.0 and len(res.metrics["iou"]) == 9
    out = evaluate(EvalConfig(model="segformer_b0", weights=res.weights, synthetic_val_size=4, synthetic_height=32,
                              synthetic_width=64, progress=False, output_dir=str(tmp_path / "e"), num_vis=1))
    assert set(out) == {"quarter", "full"}
    assert out["quarter"]["pixels"] * 16 == pytest.approx(out["full"]["pixels"], rel=0.1)
    assert (tmp_path / "e" / "eval.json").exists()
    with pytest.raises(ValueError, match="CUDA-only"):  # fp16 autocast: CUDA only (bf16 runs on CPU too)
        train(TrainConfig(output_dir=str(tmp_path / "amp"), steps=1, amp="fp16", device="cpu", **TINY))


def _torchrun() -> str:
    exe = Path(sys.executable).parent / "torchrun"
    if not exe.exists():
        pytest.skip(f"no torchrun next to {sys.executable}")
    return str(exe)


def test_ddp_two_ranks_match_one_rank(tmp_path):
    """2 gloo ranks × batch 2 vs 1 rank × batch 4: same loss curve within 1e-5 relative.

    Dropout and drop path are off (their random masks are drawn per rank), everything else is
    the real recipe: augmentation (with void-filled translations), class-weighted CE with void,
    and the SegFormer head's BatchNorm, synchronized across ranks."""
    cli = str(Path(sys.executable).parent / "transkd-fast")
    common = ["train", "--model", "segformer_b0", "--steps", "3", "--batch-size", "4", "--synthetic-train-size", "8",
              "--synthetic-val-size", "2", "--synthetic-height", "32", "--synthetic-width", "64", "--log-every", "1",
              "--no-progress", "--no-eval-at-end", "--drop-path-rate", "0", "--dropout", "0", "--lr", "6e-4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    one = subprocess.run([sys.executable, cli, *common, "--output-dir", str(tmp_path / "one")], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([_torchrun(), "--standalone", "--nproc_per_node=2", cli, *common,
                          "--output-dir", str(tmp_path / "two")], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]

    def curve(d):
        recs = [json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")]
        return [r["terms"]["loss"] for r in recs if r["event"] == "train"]

    c1, c2 = curve("one"), curve("two")
    assert len(c1) == len(c2) == 3
    for a, b in zip(c1, c2):
        assert abs(a - b) <= 1e-5 * abs(a), (c1, c2)
    assert c1[0] != c1[-1]  # it did train
