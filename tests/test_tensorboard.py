"""``--tensorboard`` (issue #16 item 6): event files under <output_dir>/tensorboard whose scalars,
read back with TensorBoard's own EventAccumulator, equal metrics.jsonl's; a resume does not
duplicate steps; --overwrite moves the event files aside; a missing package is a ConfigError."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

from transkd_fast.engine import NonFiniteLossError, TrainConfig, train
from transkd_fast.engine.config import ConfigError

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TINY = dict(model="segformer_b0", batch_size=2, synthetic_train_size=4, synthetic_val_size=2, synthetic_height=32,
            synthetic_width=32, log_every=1, progress=False, num_vis=0, tensorboard=True, threads=1)


def _tb(out) -> dict:
    """{tag: [(step, value), ...]} in file order, every event kept (size_guidance 0)."""
    acc = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _jsonl(out) -> dict:
    """The same {tag: [(step, value)]} built from metrics.jsonl by hand (values as float32, what an
    event file stores; null as NaN)."""
    from transkd_fast.data.synthetic import SYNTHETIC_CLASSES

    want: dict = {}

    def put(tag, step, v):
        want.setdefault(tag, []).append((step, float(np.float32(math.nan if v is None else v))))

    for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8"):
        r = json.loads(line)
        if r.get("event") == "train":
            for k, v in r["terms"].items():
                put(f"train/{k}", r["step"], v)
            put("train/lr", r["step"], r["lr"])
        elif r.get("event") == "eval":
            put("eval/miou", r["step"], r["miou"])
            put("eval/pixel_acc", r["step"], r["pixel_acc"])
            for k, v in enumerate(r["iou"]):
                put(f"eval/iou/{k:02d}_{SYNTHETIC_CLASSES[k].replace(' ', '_')}", r["step"], v)
    return want


def _same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for tag in want:
        g = sorted(got[tag], key=lambda sv: sv[0])
        w = want[tag]
        assert [s for s, _ in g] == [s for s, _ in w], tag
        for (_, a), (_, b) in zip(g, w):
            assert a == b or (math.isnan(a) and math.isnan(b)), (tag, a, b)


def test_event_scalars_equal_the_jsonl(tmp_path):
    out = str(tmp_path / "run")
    train(TrainConfig(output_dir=out, steps=3, eval_every=2, **TINY))
    got, want = _tb(out), _jsonl(out)
    _same(got, want)
    assert {"train/loss", "train/ce", "train/lr", "eval/miou", "eval/pixel_acc"} <= set(got)
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3] and [s for s, _ in got["eval/miou"]] == [2, 3]
    # --overwrite moves the old event files aside with the rest of the run
    train(TrainConfig(output_dir=out, steps=2, overwrite=True, **TINY))
    assert os.path.isdir(os.path.join(out, "previous-1", "tensorboard"))
    assert [s for s, _ in _tb(out)["train/loss"]] == [1, 2]


def test_resume_does_not_duplicate_steps(tmp_path):
    out = str(tmp_path / "run")
    # a checkpoint at step 3, steps 1..4 logged (an evaluation at 2 and 4), then a NaN at step 5
    # stops the run: the resume goes back to step 3, and step 4 of the first attempt must leave
    # the curves as it leaves metrics.jsonl
    with pytest.raises(NonFiniteLossError):
        train(TrainConfig(output_dir=out, steps=6, ckpt_every=3, inject_nan="5", eval_every=2, **TINY))
    first = _tb(out)
    assert [s for s, _ in first["train/loss"]] == [1, 2, 3, 4]  # on disk although the run died
    assert [s for s, _ in first["eval/miou"]] == [2, 4]
    res = train(TrainConfig(output_dir=out, steps=6, ckpt_every=3, eval_every=2, resume="auto", **TINY))
    assert res.steps == 6
    got = _tb(out)
    _same(got, _jsonl(out))
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in got["eval/miou"]] == [2, 4, 6]
    assert len(os.listdir(os.path.join(out, "tensorboard"))) == 2  # one file per attempt


def test_resume_of_a_run_without_tensorboard_replays_the_jsonl(tmp_path):
    out = str(tmp_path / "run")
    train(TrainConfig(output_dir=out, steps=4, stop_at=2, **{**TINY, "tensorboard": False}))
    assert not os.path.exists(os.path.join(out, "tensorboard"))
    train(TrainConfig(output_dir=out, steps=4, resume="auto", **TINY))
    got = _tb(out)
    _same(got, _jsonl(out))
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4]


def test_missing_package_is_a_config_error_before_the_run(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"pip install 'transkd-fast\[tensorboard\]'"):
        train(TrainConfig(output_dir=str(out), steps=1, **TINY))
    assert not out.exists()
    from transkd_fast.cli import main

    assert main(["train", "--tensorboard", "--steps", "1", "--no-progress", "--output-dir", str(out)]) == 2
    assert not out.exists()
