"""transkd_fast.runtime: the glibc allocator setting, checked in a fresh process.

The setting is process-wide and cannot be undone, so every check runs in a child process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
# With another malloc preloaded (tcmalloc, jemalloc) glibc's heap is not used and the setting is moot.
PRELOADED_MALLOC = "malloc" in os.environ.get("LD_PRELOAD", "")


def _run(code: str, *args: str) -> str:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip()


_STEP_FAULTS = """
    import resource, sys
    import torch
    from transkd_fast import runtime
    from transkd_fast.models import build_model

    if sys.argv[1] == "tuned":
        assert not runtime.cpu_allocator_tuned()
        assert runtime.tune_cpu_allocator() is True
        assert runtime.tune_cpu_allocator() is True  # idempotent
        assert runtime.cpu_allocator_tuned()
    torch.manual_seed(0)
    model = build_model("segformer_b0", num_classes=5).train()
    x = torch.randn(2, 3, 128, 256)
    faults = []
    for _ in range(8):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(x).square().mean().backward()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(sum(faults[4:]))
"""


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
@pytest.mark.skipif(PRELOADED_MALLOC, reason="another malloc is preloaded (LD_PRELOAD): glibc's heap is not used")
def test_tuned_allocator_stops_page_faults_between_steps():
    # A small SegFormer-B0 training step, eight times: with glibc's defaults every step faults
    # thousands of fresh pages in again (its MB-sized buffers come from new mmaps); tuned, the
    # last four steps reuse the freed heap memory (the first steps fill the heap).
    default = int(_run(_STEP_FAULTS, "default"))
    tuned = int(_run(_STEP_FAULTS, "tuned"))
    assert default >= 3000, (default, tuned)
    assert tuned * 10 < default, (default, tuned)


def test_engine_rejects_unknown_allocator_setting(tmp_path):
    from transkd_fast.engine.config import TrainConfig
    from transkd_fast.engine.trainer import train

    cfg = TrainConfig(dataset="synthetic", steps=1, output_dir=str(tmp_path), cpu_allocator="jemalloc", device="cpu")
    with pytest.raises(ValueError, match="cpu_allocator must be 'tuned' or 'default'"):
        train(cfg)


def test_make_optimizer_is_fused_adamw():
    import torch

    from transkd_fast.engine.trainer import make_optimizer

    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = make_optimizer([p], lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    # Same update as the loop implementation, to rounding.
    q = torch.nn.Parameter(p.detach().clone())
    ref = torch.optim.AdamW([q], lr=1e-3, weight_decay=0.01)
    for _ in range(3):
        g = torch.randn(5, 3)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)
