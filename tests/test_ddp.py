"""Several processes (#14 item 10): distill on 2 gloo ranks = 1 rank at the same global batch.

At global batch 2 each rank sees one image: CSF's batch-1 branch (its squeeze MLP without
BatchNorm) must still be chosen from the global batch (2), and the CE normalized over the
global batch, or the two runs compute different losses. Launched as ``torchrun -m transkd_fast``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transkd_fast.distill.csf import CSFStage


def _torchrun() -> str:
    exe = Path(sys.executable).parent / "torchrun"
    if not exe.exists():
        pytest.skip(f"no torchrun next to {sys.executable}")
    return str(exe)


def test_csf_branch_follows_the_global_batch():
    torch.manual_seed(0)
    stage = CSFStage(8, 16, 8, fuse=True).train()
    g = torch.randn(1, 16)
    local = stage.branch_weights(g)
    stage.data_parallel_size = 2
    with torch.no_grad():  # the BN branch at one sample per rank needs synchronized BN; eval stats here
        stage.eval()
        z_bn = stage.branch_weights(g)
        stage.data_parallel_size = 1
        z_one = stage.branch_weights(g)
    assert not torch.allclose(z_bn, z_one)  # a different branch (fc + BN) was taken at global batch 2
    assert torch.allclose(local, z_one)


def test_distill_two_ranks_match_one_rank(tmp_path):
    common = ["distill", "--model", "segformer_b0", "--teacher", "segformer_b0", "--steps", "3", "--batch-size", "2",
              "--synthetic-train-size", "8", "--synthetic-val-size", "2", "--synthetic-height", "32",
              "--synthetic-width", "64", "--log-every", "1", "--no-progress", "--no-eval-at-end",
              "--drop-path-rate", "0", "--dropout", "0", "--lr", "6e-4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    one = subprocess.run([sys.executable, "-m", "transkd_fast", *common, "--output-dir", str(tmp_path / "one")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([_torchrun(), "--standalone", "--nproc_per_node=2", "-m", "transkd_fast", *common,
                          "--output-dir", str(tmp_path / "two")], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]

    def curve(d):
        recs = [json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")]
        return [r["terms"] for r in recs if r.get("event") == "train"]

    c1, c2 = curve("one"), curve("two")
    assert len(c1) == len(c2) == 3
    # Step 1 is the same computation (observed: 1e-7 relative). Later steps drift further: Adam's
    # first updates are ≈ lr·sign(g), so a rounding difference in a near-zero gradient moves a
    # weight by up to 2·lr (observed: 3.5e-5 relative at step 3); a wrong CSF branch or a per-rank
    # CE is off by far more from step 1 on.
    for step, (a, b) in enumerate(zip(c1, c2), 1):
        tol = 1e-6 if step == 1 else 2e-4
        for k in ("loss", "ce", "feature", "embed"):
            assert abs(a[k] - b[k]) <= tol * abs(a[k]) + 1e-7, (step, k, c1, c2)
    assert c1[0]["loss"] != c1[-1]["loss"]
    assert "world 2" in two.stdout and "gloo" in two.stdout
