"""Runs lose nothing and say when something is off (#14, engine side).

Rerunning into a folder that holds a run, SIGTERM, SIGKILL + resume, the distill checkpoint's
teacher, changed settings on resume, strict JSON, the run header line.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from transkd_fast.engine import NonFiniteLossError, TrainConfig, distill, train
from transkd_fast.engine.checkpoint import load_checkpoint, save_weights

TINY = dict(model="segformer_b0", batch_size=2, synthetic_train_size=8, synthetic_val_size=4, synthetic_height=32,
            synthetic_width=64, log_every=1, progress=False, eval_at_end=False)
CLI = str(Path(sys.executable).parent / "transkd-fast")
TINY_ARGS = ["--model", "segformer_b0", "--batch-size", "2", "--synthetic-train-size", "8", "--synthetic-val-size",
             "2", "--synthetic-height", "32", "--synthetic-width", "64", "--log-every", "1", "--no-progress",
             "--no-eval-at-end"]


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _records(path) -> list:
    return [_strict_json(line) for line in open(path, encoding="utf-8") if line.strip()]


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    return env


# -- 1. a folder that holds a run ---------------------------------------------------------------


def test_rerun_into_a_run_folder_refuses_and_overwrite_moves_it_aside(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(output_dir=str(out), steps=2, **TINY))
    before = {n: (out / n).read_bytes() for n in ("last.pt", "model.pt", "metrics.jsonl")}
    # a second run that would crash at step 2 must not touch the first one
    with pytest.raises(ValueError, match=r"--resume.*--overwrite|--overwrite.*--resume"):
        train(TrainConfig(output_dir=str(out), steps=2, seed=1, inject_nan="2", **TINY))
    assert {n: (out / n).read_bytes() for n in before} == before
    res = train(TrainConfig(output_dir=str(out), steps=2, seed=1, overwrite=True, **TINY))
    assert res.steps == 2
    moved = [p for p in out.iterdir() if p.is_dir() and p.name.startswith("previous-")]
    assert len(moved) == 1, list(out.iterdir())
    assert {n: (moved[0] / n).read_bytes() for n in before} == before
    assert (out / "model.pt").read_bytes() != before["model.pt"]
    # a third overwrite keeps both older runs
    train(TrainConfig(output_dir=str(out), steps=1, seed=2, overwrite=True, **TINY))
    assert len([p for p in out.iterdir() if p.name.startswith("previous-")]) == 2
    with pytest.raises(ValueError, match="--overwrite"):
        train(TrainConfig(output_dir=str(out), steps=1, resume="auto", overwrite=True, **TINY))


# -- 2. SIGTERM -----------------------------------------------------------------------------------


def _start(tmp_path, out, *extra):
    return subprocess.Popen([CLI, "train", *TINY_ARGS, "--steps", "100000", "--output-dir", str(out), *extra],
                            env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(proc, log: Path, n: int, timeout: float = 240.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.returncode}\n{proc.stderr.read()[-3000:]}")
        if log.exists() and sum(1 for r in _records(log) if r.get("event") == "train") >= n:
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the run did not reach the wanted step in time")


def test_sigterm_checkpoints_then_exits_143(tmp_path):
    out = tmp_path / "term"
    proc = _start(tmp_path, out)
    _wait_for_steps(proc, out / "metrics.jsonl", 3)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, (proc.returncode, stderr[-3000:])
    steps = [r["step"] for r in _records(out / "metrics.jsonl") if r.get("event") == "train"]
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert ckpt["step"] == steps[-1] >= 3   # nothing since the last log line was lost
    assert "Traceback" not in stderr
    assert "last.pt" in stdout + stderr


# -- 3. SIGKILL, resume, stale .tmp -----------------------------------------------------------


def test_resume_after_sigkill_truncates_the_log_and_cleans_tmp(tmp_path):
    out = tmp_path / "kill"
    proc = _start(tmp_path, out, "--ckpt-every", "2")
    _wait_for_steps(proc, out / "metrics.jsonl", 5)
    # Kill it while the log holds steps after the last checkpoint (the case to recover from). The
    # run is frozen (SIGSTOP) to look; a kill that would land right after a checkpoint waits a bit.
    for _ in range(50):
        proc.send_signal(signal.SIGSTOP)
        logged = [r["step"] for r in _records(out / "metrics.jsonl") if r.get("event") == "train"]
        ckpt_step = load_checkpoint(str(out / "last.pt"))["step"]
        if logged[-1] > ckpt_step:
            break
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    proc.kill()
    proc.communicate(timeout=60)
    assert logged[-1] > ckpt_step  # steps after the checkpoint are in the log
    (out / "last.pt.tmp").write_bytes(b"partial checkpoint write")  # a kill during the write
    cfg = {**TINY, "batch_size": 2, "synthetic_val_size": 2}
    res = train(TrainConfig(output_dir=str(out), steps=100000, resume="auto", stop_at=ckpt_step + 2, **cfg))
    assert res.steps == ckpt_step + 2
    assert not (out / "last.pt.tmp").exists()
    recs = _records(out / "metrics.jsonl")
    steps = [r["step"] for r in recs if r.get("event") == "train"]
    assert steps == list(range(1, ckpt_step + 3)), steps
    assert any(r.get("event") == "resume" and r["step"] == ckpt_step for r in recs)


# -- 4. the distill checkpoint holds no teacher ---------------------------------------------------


def _teacher_file(path: Path, seed: int) -> str:
    from transkd_fast.engine.trainer import build_network

    torch.manual_seed(seed)
    net = build_network("segformer_b0", 10, 0.0, 0.0)
    save_weights(net, str(path), meta={"model": "segformer_b0", "num_outputs": 10, "num_classes": 9, "void": "class"})
    return str(path)


def test_distill_checkpoint_has_student_and_teacher_identity_only(tmp_path):
    t1, t2 = _teacher_file(tmp_path / "t1.pt", 1), _teacher_file(tmp_path / "t2.pt", 2)
    kd = dict(TINY, teacher="segformer_b0", teacher_weights=t1, steps=4)
    full = distill(TrainConfig(output_dir=str(tmp_path / "full"), **kd))
    part = distill(TrainConfig(output_dir=str(tmp_path / "part"), stop_at=2, **kd))
    ckpt = load_checkpoint(part.checkpoint)
    assert ckpt["model"] and not any(k.startswith("teacher.") for k in ckpt["model"])
    assert any(k.startswith("csf.") for k in ckpt["model"]) and any(k.startswith("student.") for k in ckpt["model"])
    assert ckpt["teacher"]["weights"] == os.path.abspath(t1) and len(ckpt["teacher"]["sha256"]) == 64
    with pytest.raises(ValueError, match="teacher"):
        distill(TrainConfig(output_dir=str(tmp_path / "part"), resume="auto", **{**kd, "teacher_weights": t2}))
    done = distill(TrainConfig(output_dir=str(tmp_path / "part"), resume="auto", **kd))
    a = torch.load(full.weights, weights_only=False)["model"]
    b = torch.load(done.weights, weights_only=False)["model"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


# -- 15. changed settings on resume ---------------------------------------------------------------


def test_resume_refuses_changed_settings(tmp_path):
    out = str(tmp_path / "r")
    train(TrainConfig(output_dir=out, steps=4, stop_at=2, **TINY))
    for change, flag in ((dict(seed=3), "--seed"), (dict(batch_size=4), "--batch-size"), (dict(lr=1e-3), "--lr"),
                         (dict(steps=6), "--steps")):
        with pytest.raises(ValueError, match=flag):
            train(TrainConfig(output_dir=out, resume="auto", **{**TINY, "steps": 4, **change}))
    with pytest.raises(ValueError, match="--seed.*--lr|--lr.*--seed"):
        train(TrainConfig(output_dir=out, resume="auto", **{**TINY, "steps": 4, "seed": 5, "lr": 1e-4}))
    res = train(TrainConfig(output_dir=out, resume="auto", extend_steps=True, **{**TINY, "steps": 6}))
    assert res.steps == 6 and load_checkpoint(res.checkpoint)["step"] == 6


# -- 16. strict JSON ---------------------------------------------------------------------------


def test_metrics_and_eval_json_have_no_bare_nan(tmp_path):
    from transkd_fast.engine import EvalConfig, evaluate
    from transkd_fast.engine.trainer import json_safe

    assert json_safe({"a": [float("nan"), float("inf"), -float("inf"), 1.5], "b": (2, None)}) == \
        {"a": [None, None, None, 1.5], "b": [2, None]}
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError):
        train(TrainConfig(output_dir=str(out), steps=3, inject_nan="2:ce", **TINY))
    recs = _records(out / "metrics.jsonl")  # strict parser: raises on NaN / Infinity
    bad = next(r for r in recs if r.get("event") == "nonfinite")
    assert bad["terms"]["ce"] is None and bad["terms"]["loss"] is None
    # one tiny validation image: some classes are absent, their IoU is NaN inside
    res = train(TrainConfig(output_dir=str(tmp_path / "t"), steps=1, **{**TINY, "synthetic_val_size": 1,
                                                                        "eval_at_end": True, "num_vis": 0}))
    evals = [r for r in _records(tmp_path / "t" / "metrics.jsonl") if r.get("event") == "eval"]
    assert evals and None in evals[-1]["iou"] and any(math.isnan(v) for v in res.metrics["iou"])
    evaluate(EvalConfig(model="segformer_b0", weights=res.weights, synthetic_val_size=1, synthetic_height=32,
                        synthetic_width=64, progress=False, output_dir=str(tmp_path / "e"), num_vis=0))
    doc = _strict_json((tmp_path / "e" / "eval.json").read_text())
    assert None in doc["results"]["quarter"]["iou"]


# -- 17. what ran where ---------------------------------------------------------------------------


def test_first_log_line_states_device_backends_dtype_threads(tmp_path):
    import transkd_fast.ops  # noqa: F401  (registers every op)
    from transkd_fast.backend import registered_ops

    out = subprocess.run([CLI, "train", *TINY_ARGS, "--steps", "1", "--threads", "1", "--output-dir",
                          str(tmp_path / "h")], env={**_env(), "OMP_NUM_THREADS": "2"}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    first = out.stdout.splitlines()[0]
    assert "device cpu" in first and "float32" in first and "threads 1" in first, first
    ops = registered_ops()
    assert len(ops) >= 6
    for op in ops:
        assert f"{op}=torch" in first, (op, first)
    header = _records(tmp_path / "h" / "metrics.jsonl")[0]
    assert header["event"] == "run" and header["threads"] == 1 and header["device"] == "cpu"
