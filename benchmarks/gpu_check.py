"""The GPU stages of ``scripts/gpu_check.sh``: op timings, first-call compile/autotune time and
TransKD-Base steps on one CUDA GPU, written as JSON fragments and merged into
``benchmarks/results/cuda-<gpu-name>.{json,md}``.

Stages (each its own process, so one crash or time-out loses only its stage)::

    python benchmarks/gpu_check.py ops     --out DIR   # every backend of every op at MiT shapes
    python benchmarks/gpu_check.py compile --out DIR   # first-call compile + autotune, two image sizes
    python benchmarks/gpu_check.py step    --out DIR   # TransKD-Base step, fp32 / bf16 autocast, per backend
    python benchmarks/gpu_check.py report  --out DIR   # merge into benchmarks/results/cuda-<gpu>.{json,md}
    python benchmarks/gpu_check.py plan                # list every case (runs on CPU: what CI checks)

Timings use ``triton.testing.do_bench`` (CUDA events, median ms), forward and forward+backward.
The attention baselines are PyTorch's SDPA with each of its kernels forced (flash, cuDNN,
mem-efficient) and xformers when installed, beside our op's backends and the eager reference,
so that a number for Triton is never reported without the best alternative beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCH, IMAGE = 2, (512, 1024)


# ---------------------------------------------------------------------------------------
# Cases: (op, label, layout, make(device, dtype) -> inputs, {backend name: fn(*inputs)}).


def _sdpa(kind: Optional[str]):
    """SDPA over [B, N, H, D] views with one kernel forced (None: PyTorch's own choice)."""
    import torch.nn.functional as F

    def run(q, k, v):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        if kind is None:
            return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                   "mem-efficient": SDPBackend.EFFICIENT_ATTENTION}[kind]
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
    return run


def _xformers():
    try:
        from xformers.ops import memory_efficient_attention
    except Exception:  # not installed, or no CUDA build
        return None
    return lambda q, k, v: memory_efficient_attention(q, k, v)


def attention_cases() -> list[dict]:
    from transkd_fast.ops.attention import efficient_attention, efficient_attention_reference

    h1, w1 = IMAGE[0] // 4, IMAGE[1] // 4
    nkv = (h1 // 8) * (w1 // 8)
    cases = []
    for label, n, heads, d in (("B0 stage 1", h1 * w1, 1, 32), ("B2 stage 1", h1 * w1, 1, 64),
                               ("B2 stage 3", (h1 // 4) * (w1 // 4), 5, 64)):
        def make(device, dtype, n=n, heads=heads, d=d):
            q = torch.randn(BATCH, n, heads, d, device=device, dtype=dtype)
            kv = torch.randn(BATCH, nkv, 2, heads, d, device=device, dtype=dtype)  # k, v: views, as in MiT
            return q, kv[:, :, 0], kv[:, :, 1]

        fns: dict[str, Callable] = {f"ours/{b}": (lambda b: lambda q, k, v: efficient_attention(q, k, v, backend=b))(b)
                                    for b in ("triton", "torch", "auto")}
        for kind in ("flash", "cudnn", "mem-efficient"):
            fns[f"sdpa/{kind}"] = _sdpa(kind)
        if _xformers() is not None:
            fns["xformers"] = _xformers()
        fns["eager"] = efficient_attention_reference
        cases.append({"op": "efficient_attention", "label": f"{label}: q [{BATCH},{n},{heads},{d}], "
                      f"k/v [{BATCH},{nkv},{heads},{d}]", "layout": "kv views", "make": make, "fns": fns})
    return cases


def _map_cases() -> list[dict]:
    import importlib

    from transkd_fast.ops import hcl, kl_div, selective_fusion

    weighted_mse = importlib.import_module("transkd_fast.ops.weighted_mse")

    h1, w1 = IMAGE[0] // 4, IMAGE[1] // 4
    ours = ("triton", "torch", "auto")
    cases = []
    for layout in ("channels_last", "contiguous"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

        def mk(*shape, device, dtype, grad=True, fmt=fmt):
            t = torch.randn(*shape, device=device, dtype=dtype)
            if len(shape) == 4:
                t = t.contiguous(memory_format=fmt)
            return t.requires_grad_(grad)

        def csf(device, dtype, mk=mk):
            return (mk(BATCH, 64, h1, w1, device=device, dtype=dtype),
                    mk(BATCH, 64, h1 // 2, w1 // 2, device=device, dtype=dtype))

        fns = {f"ours/{b}": (lambda b: lambda x, y: selective_fusion.selective_pool(x, y, backend=b))(b) for b in ours}
        fns["eager"] = selective_fusion.selective_pool_reference
        cases.append({"op": "selective_pool", "label": f"CSF stage 1: x [{BATCH},64,{h1},{w1}]", "layout": layout,
                      "make": csf, "fns": fns})

        def csf_fuse(device, dtype, csf=csf):
            x, y = csf(device, dtype)
            return x, y, torch.rand(BATCH, 2, 64, device=device, dtype=dtype).requires_grad_()

        fns = {f"ours/{b}": (lambda b: lambda x, y, a: selective_fusion.selective_fuse(x, y, a, backend=b))(b)
               for b in ours}
        fns["eager"] = selective_fusion.selective_fuse_reference
        cases.append({"op": "selective_fuse", "label": f"CSF stage 1: x [{BATCH},64,{h1},{w1}]", "layout": layout,
                      "make": csf_fuse, "fns": fns})

        t_dims = (64, 128, 320, 512)
        sizes = [(h1 >> i, w1 >> i) for i in range(4)]

        def stages(device, dtype, mk=mk):
            fs = [mk(BATCH, c, h, w, device=device, dtype=dtype) for c, (h, w) in zip(t_dims, sizes)]
            ft = [mk(BATCH, c, h, w, device=device, dtype=dtype, grad=False) for c, (h, w) in zip(t_dims, sizes)]
            return fs, ft

        fns = {f"ours/{b}": (lambda b: lambda fs, ft: hcl.hcl_loss(fs, ft, backend=b))(b) for b in ours}
        fns["eager"] = hcl.hcl_loss_reference
        cases.append({"op": "hcl_loss", "label": "4 stages of TransKD-Base (B2 widths)", "layout": layout,
                      "make": stages, "fns": fns})
        for mode in ("spatial", "channel"):
            def logits(device, dtype, mk=mk):
                return (mk(BATCH, 20, h1, w1, device=device, dtype=dtype),
                        mk(BATCH, 20, h1, w1, device=device, dtype=dtype, grad=False))

            fns = {f"ours/{b}": (lambda b, m: lambda s, t: kl_div.kd_kl_div(s, t, 4.0, m, backend=b))(b, mode)
                   for b in ours}
            fns["eager"] = (lambda m: lambda s, t: kl_div.kd_kl_div_reference(s, t, 4.0, m))(mode)
            cases.append({"op": "kd_kl_div", "label": f"{mode}: logits [{BATCH},20,{h1},{w1}]", "layout": layout,
                          "make": logits, "fns": fns})
    t_dims = (64, 128, 320, 512)

    def embeds(device, dtype):
        shapes = [(BATCH, (h1 >> i) * (w1 >> i), c) for i, c in enumerate(t_dims)]
        return ([torch.randn(*s, device=device, dtype=dtype, requires_grad=True) for s in shapes],
                [torch.randn(*s, device=device, dtype=dtype) for s in shapes])

    w = [0.1, 0.1, 0.5, 1.0]
    fns = {f"ours/{b}": (lambda b: lambda xs, ys: weighted_mse.weighted_mse(xs, ys, w, backend=b))(b) for b in ours}
    fns["eager"] = lambda xs, ys: weighted_mse.weighted_mse_reference(xs, ys, w)
    cases.append({"op": "weighted_mse", "label": "4 PEA stages [B, N, C]", "layout": "contiguous", "make": embeds,
                  "fns": fns})
    return cases


def all_cases() -> list[dict]:
    return attention_cases() + _map_cases()


# ---------------------------------------------------------------------------------------
# Stages.


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _leaves(x):
    if isinstance(x, torch.Tensor):
        return [x] if x.requires_grad else []
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _leaves(v)]
    return []


def stage_ops(out: Path, dtypes=("bfloat16", "float32")) -> None:
    from triton.testing import do_bench

    rows = []
    for case in all_cases():
        for dtype in dtypes:
            dt = getattr(torch, dtype)
            inputs = case["make"]("cuda", dt)
            leaves = _leaves(inputs)
            for name, fn in case["fns"].items():
                row = {"op": case["op"], "case": case["label"], "layout": case["layout"], "dtype": dtype,
                       "impl": name}
                try:
                    res = _first_tensor(fn(*inputs))
                    grad = torch.randn_like(res) if res.dim() else torch.ones_like(res)
                    row["fwd_ms"] = do_bench(lambda fn=fn, inputs=inputs: fn(*inputs), warmup=10, rep=50)

                    def fwd_bwd(fn=fn, inputs=inputs, leaves=leaves, grad=grad):
                        torch.autograd.grad(_first_tensor(fn(*inputs)), leaves, grad)

                    row["fwd_bwd_ms"] = do_bench(fwd_bwd, warmup=10, rep=50) if leaves else None
                except Exception as e:  # a refused or failing backend is a row with its reason
                    row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                rows.append(row)
                print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    (out / "ops.json").write_text(json.dumps(rows, indent=1))


def _step_once(kd, images, labels, opt, dtype) -> None:
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bf16" else torch.autocast("cuda", enabled=False)
    with ctx:
        loss = kd(images, labels)["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _build_step(image=IMAGE, batch=BATCH):
    from transkd_fast.distill import TransKD
    from transkd_fast.models import build_model

    torch.manual_seed(0)
    teacher = build_model("segformer_b2", num_classes=20).cuda().eval()
    student = build_model("segformer_b0", num_classes=20).cuda()
    kd = TransKD(student, teacher, variant="base").cuda().train()
    opt = torch.optim.AdamW([p for p in kd.parameters() if p.requires_grad], lr=6e-5)
    images = torch.randn(batch, 3, *image, device="cuda")
    labels = torch.randint(0, 20, (batch, image[0] // 4, image[1] // 4), device="cuda")
    return kd, opt, images, labels


def stage_step(out: Path, steps: int = 8, warmup: int = 3) -> None:
    import transkd_fast

    rows = []
    for backend in ("torch", "triton", "auto"):
        for dtype in ("fp32", "bf16"):
            row = {"backend": backend, "dtype": dtype, "batch": BATCH, "image": list(IMAGE)}
            try:
                with transkd_fast.use_backend(backend):
                    kd, opt, images, labels = _build_step()
                    for _ in range(warmup):
                        _step_once(kd, images, labels, opt, dtype)
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    times = []
                    for _ in range(steps):
                        t0 = time.perf_counter()
                        _step_once(kd, images, labels, opt, dtype)
                        torch.cuda.synchronize()
                        times.append((time.perf_counter() - t0) * 1e3)
                row.update(step_ms_median=statistics.median(times), step_ms_all=times,
                           peak_mib=torch.cuda.max_memory_allocated() / 2**20)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    (out / "step.json").write_text(json.dumps(rows, indent=1))


_FIRST_CALL = """
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from benchmarks.gpu_check import _build_step, _step_once
import transkd_fast
rows = []
with transkd_fast.use_backend("triton"):
    for image in ((512, 1024), (384, 768), (512, 1024)):
        kd, opt, images, labels = _build_step(image=image)
        torch.cuda.synchronize(); t0 = time.perf_counter()
        _step_once(kd, images, labels, opt, "bf16")
        torch.cuda.synchronize(); first = time.perf_counter() - t0
        t0 = time.perf_counter()
        _step_once(kd, images, labels, opt, "bf16")
        torch.cuda.synchronize(); second = time.perf_counter() - t0
        rows.append({"image": list(image), "first_step_s": first, "second_step_s": second})
        print(json.dumps(rows[-1]), flush=True)
json.dump(rows, open(sys.argv[2], "w"), indent=1)
"""


def stage_compile(out: Path) -> None:
    """First-call time (compile + autotune) of a triton-backend bf16 step with an empty Triton
    cache, at 512×1024, then at a second size (384×768: a retune would show here), then the
    first size again."""
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        subprocess.run([sys.executable, "-c", _FIRST_CALL, str(ROOT), str(out / "compile.json")], env=env,
                       check=True)


def gpu_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-gpu"


def stage_report(out: Path) -> Path:
    import re

    data = {"gpu": gpu_name(), "host": platform.node(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import triton
        data["triton"] = triton.__version__
    except ImportError:
        data["triton"] = None
    for part in ("env", "tests", "ops", "compile", "step"):
        p = out / f"{part}.json"
        txt = out / f"{part}.txt"
        if p.exists():
            data[part] = json.loads(p.read_text())
        elif txt.exists():
            data[part] = txt.read_text()[-6000:]
    slug = re.sub(r"[^a-z0-9]+", "-", data["gpu"].lower()).strip("-")
    dest = ROOT / "benchmarks" / "results" / f"cuda-{slug}"
    dest.with_suffix(".json").write_text(json.dumps(data, indent=1))
    dest.with_suffix(".md").write_text(markdown(data))
    return dest


def _ms(v) -> str:
    return "" if v is None else f"{v:.3f}"


def markdown(data: dict) -> str:
    lines = [f"# CUDA check on {data['gpu']}", "",
             f"Measured by `bash scripts/gpu_check.sh` on {data['date']}: torch {data['torch']}, "
             f"triton {data.get('triton')}. Times are medians of `triton.testing.do_bench` (ms) or of timed steps.", ""]
    if isinstance(data.get("tests"), str):
        lines += ["## CUDA test mode", "", "```", data["tests"].strip()[-2000:], "```", ""]
    ops = data.get("ops") or []
    if ops:
        lines += ["## Ops (forward, forward+backward)", "",
                  "| op | case | layout | dtype | impl | fwd ms | fwd+bwd ms | fwd vs best other |",
                  "|---|---|---|---|---|---|---|---|"]
        groups: dict = {}
        for r in ops:
            groups.setdefault((r["op"], r["case"], r["layout"], r["dtype"]), []).append(r)
        for (op, case, layout, dtype), rs in groups.items():
            for r in rs:
                others = [o["fwd_ms"] for o in rs if o is not r and "fwd_ms" in o and not o["impl"].startswith("ours")]
                ratio = f"{r['fwd_ms'] / min(others):.2f}×" if "fwd_ms" in r and others else ""
                lines.append(f"| {op} | {case} | {layout} | {dtype} | {r['impl']} | {_ms(r.get('fwd_ms'))} | "
                             f"{_ms(r.get('fwd_bwd_ms'))} | {ratio or r.get('error', '')[:80]} |")
        lines.append("")
    if data.get("compile"):
        lines += ["## First-call compile + autotune (triton backend, bf16 step, empty cache)", "",
                  "| image | first step s | second step s |", "|---|---|---|"]
        lines += [f"| {r['image'][0]}x{r['image'][1]} | {r['first_step_s']:.2f} | {r['second_step_s']:.3f} |"
                  for r in data["compile"]]
        lines.append("")
    if data.get("step"):
        lines += [f"## TransKD-Base step (B2 → B0, batch {BATCH}, {IMAGE[0]}×{IMAGE[1]})", "",
                  "| backend | dtype | step ms (median) | peak MiB |", "|---|---|---|---|"]
        for r in data["step"]:
            lines.append(f"| {r['backend']} | {r['dtype']} | {_ms(r.get('step_ms_median'))} | "
                         f"{r.get('peak_mib', 0):.0f} | " + (r.get("error", "") and f"{r['error'][:80]} |"))
        lines.append("")
    return "\n".join(lines) + "\n"


def plan() -> int:
    """Build every case on the CPU at small sizes: the CI-side check that the stages' code runs."""
    global BATCH, IMAGE
    BATCH, IMAGE = 1, (64, 128)
    n = 0
    for case in all_cases():
        inputs = case["make"]("cpu", torch.float32)
        for name in case["fns"]:
            print(f"ops     {case['op']:20s} {case['layout']:14s} {name:18s} {case['label']}")
            n += 1
        if "eager" in case["fns"]:
            _first_tensor(case["fns"]["eager"](*inputs))  # the reference runs anywhere
    print(f"ops     {n} timings per dtype (bfloat16, float32), forward and forward+backward")
    print("compile first-call bf16 step with an empty Triton cache at 512x1024, 384x768, 512x1024")
    print("step    TransKD-Base B2->B0 batch 2 512x1024: backends torch/triton/auto x fp32/bf16 autocast")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=("ops", "compile", "step", "report", "plan"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check_parts")
    a = ap.parse_args(argv)
    if a.stage == "plan":
        return plan()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.stage == "report":
        print(stage_report(a.out))
        return 0
    if not torch.cuda.is_available():
        print(f"gpu_check {a.stage}: no CUDA device", file=sys.stderr)
        return 2
    {"ops": stage_ops, "compile": stage_compile, "step": stage_step}[a.stage](a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
