"""Benchmark of upsample_add_relu (CPU, inference) at one tile of SegFormer-B0's head, 512×1024.

The folded head's middle for stage-1 rows 16…31 of the 128×256 grid, E = 256: acc
``[1, 16, 256, 256]`` and the composed deeper terms at their own resolution, ``[1, 64, 128, 256]``,
``[1, 32, 64, 256]``, ``[1, 16, 32, 256]``, in fp32 and bf16. Three ways, timed alternated in one
process (medians of :data:`ROUNDS` rounds) so that a slow spell of a shared machine hits them alike:

- ``reference``: the original-style eager computation, each deeper map upsampled whole by
  ``F.interpolate`` to 128×256, the rows sliced, summed, ReLU (:func:`upsample_add_relu_reference`);
- ``aten``: the head's ATen route (ATen's width upsampling of the rows the tile reads, one height
  matmul per term, ReLU; :func:`transkd_fast.models.segformer._tile_middle_aten`), what the head
  runs where the C kernel does not build (in fp32 on a copy of acc, which it updates in place);
- ``kernel``: the C kernel (:func:`upsample_add_relu`), into an output buffer kept across calls
  (the head runs it in place in its fresh acc; a fresh 4 MiB output would add page faults).

``extra_info`` records the medians and the ratios to the reference and to the ATen route, the
CPU (lscpu model name) and the thread count. Run: ``pytest benchmarks/test_upsample_add_relu.py
--benchmark-only``.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest
import torch

from transkd_fast.models import segformer
from transkd_fast.ops import upsample_add_relu as uar
from transkd_fast.ops.upsample_add_relu import upsample_add_relu, upsample_add_relu_reference

H, W, E, R0, ROWS = 128, 256, 256, 16, 16
SOURCES = [(64, 128), (32, 64), (16, 32)]
ROUNDS = 15
VARIANTS = ("reference", "aten", "kernel")
_MEASURED: dict = {}


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        return m.group(1).strip() if m else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def _calls(dtype):
    g = torch.Generator().manual_seed(0)
    acc = torch.randn(1, ROWS, W, E, generator=g).to(dtype)
    srcs = [torch.randn(1, h, w, E, generator=g).to(dtype) for h, w in SOURCES]
    terms = [(s[0], *segformer._bilinear_rows(s.shape[1], H)) for s in srcs]
    flat = acc.view(-1, E)
    out = torch.empty_like(acc)
    return {
        "reference": lambda: upsample_add_relu_reference(acc, srcs, (H, W), R0),
        # in place in an fp32 acc (as in the head, where acc is fresh): here on a copy, one pass more
        "aten": lambda: segformer._tile_middle_aten(flat.clone() if dtype == torch.float32 else flat, terms,
                                                    R0, R0 + ROWS, W).to(dtype).view(acc.shape),
        # into a buffer kept across calls, as the head writes in place into its fresh acc
        "kernel": lambda: upsample_add_relu(acc, srcs, (H, W), R0, out=out),
    }


def _side_by_side(dtype) -> dict:
    if dtype not in _MEASURED:
        calls = _calls(dtype)
        with torch.inference_mode():
            outs = {k: f() for k, f in calls.items()}
            for k in ("aten", "kernel"):
                torch.testing.assert_close(outs[k].float(), outs["reference"].float(),
                                           rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
            samples = {k: [] for k in calls}
            for _ in range(ROUNDS):
                for k, f in calls.items():
                    t0 = time.perf_counter()
                    f()
                    samples[k].append(time.perf_counter() - t0)
        _MEASURED[dtype] = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}
    return _MEASURED[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_upsample_add_relu(benchmark, variant, dtype):
    if variant == "kernel" and not uar.kernel_available():
        pytest.skip("the C kernel does not build here (see the warning)")
    med = _side_by_side(dtype)
    fn = _calls(dtype)[variant]
    benchmark.group = f"upsample_add_relu-{str(dtype).replace('torch.', '')}"
    benchmark.extra_info.update({
        "op": "upsample_add_relu", "variant": variant, "dtype": str(dtype).replace("torch.", ""),
        "device": "cpu", "cpu": _cpu_name(), "threads": torch.get_num_threads(),
        "what": f"B0 head tile at 512x1024: acc [1, {ROWS}, {W}, {E}] rows {R0}..{R0 + ROWS - 1} of {H}x{W}, "
                f"sources {SOURCES}",
        "alternated_median_s": med,
        "ratio_vs_reference": med[variant] / med["reference"], "ratio_vs_aten": med[variant] / med["aten"],
    })
    with torch.inference_mode():
        benchmark.pedantic(fn, rounds=10, warmup_rounds=2, iterations=1)
