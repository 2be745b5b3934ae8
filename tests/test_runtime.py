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


_INFER_FAULTS = """
    import resource, sys
    import torch
    from transkd_fast import runtime
    from transkd_fast.models import build_model

    if sys.argv[1] == "tuned":
        assert runtime.tune_cpu_allocator() is True
    torch.manual_seed(0)
    model = build_model("segformer_b0", num_classes=5).eval()
    x = torch.randn(1, 3, 512, 1024)  # the head's [1, 128·256, 256] fp32 maps: 32 MiB each
    faults = []
    with torch.inference_mode():
        for _ in range(4):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            model(x)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(faults[-1])
"""


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
@pytest.mark.skipif(PRELOADED_MALLOC, reason="another malloc is preloaded (LD_PRELOAD): glibc's heap is not used")
def test_tuned_allocator_reuses_blocks_above_the_mmap_threshold():
    # Blocks of 32 MiB and more are above the highest M_MMAP_THRESHOLD glibc accepts: only
    # M_MMAP_MAX = 0 keeps them in the heap. Default: one fresh 32 MiB mmap per call (8192 pages).
    default = int(_run(_INFER_FAULTS, "default"))
    tuned = int(_run(_INFER_FAULTS, "tuned"))
    assert default >= 8000, (default, tuned)
    assert tuned * 10 < default, (default, tuned)
