"""``transkd-fast report`` and ``transkd-fast bench``.

- ``report [--model segformer_b0] [--input 512 1024] [--classes 20] [--precision fp32|bf16]``:
  params, fvcore FLOPs in both conventions (full; paper = without the attention matmuls),
  measured throughput (``bf16``: the model cast by :func:`transkd_fast.precision.prepare_for_inference`
  and timed in :func:`~transkd_fast.precision.inference_context`; FLOPs are counted on the fp32 model).
- ``report --paper``: the paper's model zoo (design §1) with our numbers beside the paper's and
  the original code's fvcore counts.
- ``report --traffic``: the MODELED memory traffic of each fused op vs its reference.
- ``bench``: ``pytest benchmarks/ --benchmark-only`` with a JSON per device under
  ``benchmarks/results/``, then the markdown summary (``benchmarks/summarize.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from transkd_fast.cli import SUBCOMMANDS


def _fmt_pct(ours: float, ref: Optional[float]) -> str:
    return "n/a" if ref is None else f"{(ours - ref) / ref * 100:+.2f}%"


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def zoo_markdown(rows: list[dict], input_size=(512, 1024)) -> str:
    """The zoo table: ours beside the paper's and the original code's fvcore counts."""
    H, W = input_size
    thr = any("images_per_s" in r for r in rows)
    lines = [
        f"TransKD model zoo at 1x3x{H}x{W}, 20 outputs (fvcore: 1 multiply-add = 1 FLOP; batch 1, eval mode, "
        "decode heads counted unfolded as in the original).",
        "GFLOPs **full** = every multiply-add; **paper** = without the attention matmuls (q@kT, attn@v), "
        "as the paper's counter.",
        "",
        "| network | params (M) ours | paper | GFLOPs full ours | original fvcore full | diff | "
        "GFLOPs paper-conv. ours | original fvcore paper-conv. | diff | paper table |" + (" images/s |" if thr else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if thr else ""),
    ]
    for r in rows:
        full, paper = r["full"] / 1e9, r["paper"] / 1e9
        line = (f"| {r['name']} | {r['params'] / 1e6:.2f} | {_fmt(r['paper_params_m'])} | {full:.2f} | "
                f"{_fmt(r['orig_full'])} | {_fmt_pct(full, r['orig_full'])} | {paper:.2f} | {_fmt(r['orig_paper'])} | "
                f"{_fmt_pct(paper, r['orig_paper'])} | {_fmt(r['paper_gflops'])} |")
        if thr:
            line += f" {r.get('images_per_s', float('nan')):.3f} |"
        lines.append(line)
    if any(r["paper_params_m"] is None for r in rows):
        lines += ["", "n/a: no such number. The paper's tables and the original repository's model zoo give no LVT "
                  "row; the original LVT's counts come from its own code traced with fvcore."]
    bad = [f"{r['name']}: {r['unsupported']}" for r in rows if r.get("unsupported")]
    if bad:
        lines += ["", "UNCOUNTED custom ops: " + "; ".join(bad)]
    return "\n".join(lines) + "\n"


def _add_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="segformer_b0", help="model name (transkd_fast.models.MODELS)")
    p.add_argument("--input", nargs=2, type=int, default=[512, 1024], metavar=("H", "W"))
    p.add_argument("--classes", type=int, default=20, help="output classes (20 = Cityscapes' 19 + void)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--paper", action="store_true", help="print the paper's model-zoo table (design §1)")
    p.add_argument("--traffic", action="store_true", help="print the MODELED memory traffic of the fused ops")
    p.add_argument("--throughput", action="store_true", help="with --paper: also time each row")
    p.add_argument("--no-throughput", action="store_true", help="single model: skip the timing")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="single model: time the network in fp32 or bf16 (weights and activations in bfloat16)")
    p.add_argument("--compile", action="store_true",
                   help=f"compile every recorded Triton launch for sm_80/sm_90 and write {COMPILE_REPORT} "
                        "(exit 1 on a failure or spill)")
    p.add_argument("--json", type=Path, help="also write the numbers as JSON here")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_report(args: argparse.Namespace) -> int:
    import torch

    from transkd_fast import flops

    result: dict = {}
    if args.compile:
        root = _repo_root() or Path.cwd()
        rows = run_compile_report(root / COMPILE_REPORT)
        bad = [r for r in rows if "error" in r or r.get("spill_bytes", 0) > 0]
        print(f"{len(rows)} builds, {len(bad)} with spills or failures -> {root / COMPILE_REPORT}")
        for r in bad:
            print(f"FAIL {r['op']} {r['kernel']} {r.get('config', '')} {r['arch']} [{r['cases'][0]}]: "
                  f"{(r.get('error') or str(r['spill_bytes']) + ' spill bytes').splitlines()[0]}")
        return 1 if bad else 0
    if args.traffic:
        from transkd_fast import traffic

        rows = traffic.traffic_table()
        print(traffic.markdown(rows))
        result["traffic"] = rows
    if args.precision != "fp32" and (args.paper or args.traffic):
        from transkd_fast.engine.config import ConfigError

        raise ConfigError(f"--precision {args.precision} times a single model: drop --paper / --traffic")
    if args.paper:
        rows = flops.zoo(tuple(args.input), num_classes=args.classes, throughput=args.throughput, device=args.device)
        print(zoo_markdown(rows, tuple(args.input)))
        result["zoo"] = rows
    if not (args.paper or args.traffic):
        from transkd_fast.models import build_model

        model = build_model(args.model, num_classes=args.classes).to(args.device).eval()
        size = (args.batch, 3, *args.input)
        timed_here = not args.no_throughput and args.precision == "fp32"
        rep = flops.report(model, size, name=args.model, throughput=timed_here, device=torch.device(args.device))
        with flops.original_head(model):
            orig = flops.analyze(model, torch.randn(size, device=args.device))
        rep.extra["precision"] = args.precision
        if not args.no_throughput and not timed_here:
            from transkd_fast.precision import inference_context, prepare_for_inference

            prepare_for_inference(model, args.precision)  # after the FLOP count, which traces the fp32 model
            with inference_context(args.precision, args.device):
                t = flops.measure_throughput(model, torch.randn(size, device=args.device))
            rep.images_per_s, rep.seconds = t["images_per_s"], t["seconds"]
        rep.extra["GFLOPs as run"] = "(the numbers above: what this model executes, e.g. its folded decode head)"
        rep.extra["GFLOPs original"] = (f"full {orig.full / 1e9:.2f}, paper {orig.paper / 1e9:.2f} "
                                        "(decode head unfolded, as the original / the paper count it)")
        print("\n".join(rep.lines()))
        result["model"] = {**rep.as_dict(), "original_full": orig.full, "original_paper": orig.paper}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        from transkd_fast.engine.metrics import json_safe

        args.json.write_text(json.dumps(json_safe(result), indent=1, default=str, allow_nan=False))
    return 0


# ---------------------------------------------------------------------------------------
# Compile report: every Triton kernel built for sm_80 / sm_90 (transkd_fast.compile_check).

COMPILE_REPORT = Path("benchmarks") / "results" / "compile_report.md"
_HASH_LINE = "Sources (sha256):"


def present_kernel_ops() -> tuple[str, ...]:
    """The ops of ``compile_check.KERNEL_OPS`` whose kernel module exists."""
    import importlib.util

    from transkd_fast.compile_check import KERNEL_OPS

    return tuple(op for op in KERNEL_OPS if importlib.util.find_spec(f"transkd_fast.kernels.{op}") is not None)


_OP_MODULES = {"attention": "attention", "selective_fusion": "selective_fusion", "hcl": "hcl", "kl_div": "kl_div",
               "weighted_mse": "weighted_mse"}


def kernel_hashes(ops: Sequence[str]) -> dict[str, str]:
    """sha256 (first 16 hex digits) of what decides the recorded launches: each op's kernel and
    launcher sources, the harness, and the recorded op calls themselves (shapes, strides, offsets
    and arguments of every call the step and odd suites make — recorded on meta, seconds), so a
    model change that changes what the ops receive makes the report stale too."""
    import hashlib
    import importlib.util

    from transkd_fast import compile_check

    def digest(*mods: str) -> str:
        h = hashlib.sha256()
        for m in mods:
            h.update(Path(importlib.util.find_spec(m).origin).read_bytes())
        return h.hexdigest()[:16]

    out = {op: digest(f"transkd_fast.kernels.{op}", f"transkd_fast.ops.{_OP_MODULES[op]}") for op in ops}
    out["harness"] = digest("transkd_fast.compile_check", "transkd_fast.kernels._device")
    calls = compile_check.collect_calls(tuple(ops), compile_check.SUITES, progress=False)
    out["calls"] = hashlib.sha256(repr(sorted(repr(c.key()) for c, _ in calls)).encode()).hexdigest()[:16]
    return out


def compile_report_markdown(rows: list[dict], ops: Sequence[str]) -> str:
    """``compile_check.markdown`` plus the source hashes it was built from."""
    from transkd_fast.compile_check import markdown

    text = markdown(rows).replace(f"python -m transkd_fast.compile_check --markdown {COMPILE_REPORT}",
                                  "transkd-fast report --compile")
    hashes = kernel_hashes(ops)
    return text + "\n" + _HASH_LINE + " " + ", ".join(f"{k}={v}" for k, v in hashes.items()) + "\n"


def committed_hashes(text: str) -> dict[str, str]:
    for line in text.splitlines():
        if line.startswith(_HASH_LINE):
            return dict(kv.split("=", 1) for kv in line[len(_HASH_LINE):].strip().split(", ") if "=" in kv)
    return {}


def run_compile_report(path: Path = COMPILE_REPORT, ops: Optional[Sequence[str]] = None) -> list[dict]:
    """Compile every recorded launch (both suites; sm_80 and sm_90, one process per arch, in
    parallel) and write the report."""
    import concurrent.futures

    from transkd_fast.compile_check import ARCHS, SUITES, check_in_subprocess

    ops = tuple(ops or present_kernel_ops())
    with concurrent.futures.ThreadPoolExecutor(len(ARCHS)) as pool:
        parts = list(pool.map(lambda a: check_in_subprocess(ops, archs=(a,), suites=SUITES, timeout=5000), ARCHS))
    rows = [r for part in parts for r in part]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(compile_report_markdown(rows, ops))
    return rows


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default benchmarks/results/<cpu|cuda>.json)")
    p.add_argument("-k", dest="keyword", default=None, help="pytest -k expression")
    p.add_argument("--summary", type=Path, default=None,
                   help="markdown summary (default: the JSON path with .md)")
    p.add_argument("pytest_args", nargs="*", help="extra arguments for pytest (after --)")


def _repo_root() -> Optional[Path]:
    here = Path(__file__).resolve().parent.parent
    return here if (here / "benchmarks").is_dir() else None


def _run_bench(args: argparse.Namespace) -> int:
    root = _repo_root() or Path.cwd()
    if not (root / "benchmarks").is_dir():
        print("transkd-fast bench: no benchmarks/ folder (run it from a source checkout)", file=sys.stderr)
        return 2
    out = args.out or root / "benchmarks" / "results" / f"{'cuda' if _cuda() else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only", f"--benchmark-json={out}", "-q",
           "-p", "no:cacheprovider"]
    if args.keyword:
        cmd += ["-k", args.keyword]
    cmd += list(args.pytest_args)
    # benchmarks/ is not a package: run with the repo root as cwd but without putting it on
    # sys.path (the top-level kernels/ folder must never be importable as `kernels`).
    env = dict(os.environ)
    env["PYTHONSAFEPATH"] = "1"
    print("+", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=root, env=env)
    if not out.exists():
        return rc or 1
    summary = args.summary or out.with_suffix(".md")
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import summarize  # benchmarks/summarize.py
    finally:
        sys.path.pop(0)
    text = summarize.summarize(json.loads(out.read_text()))
    summary.write_text(text)
    print(text)
    print(f"results: {out}\nsummary: {summary}")
    return rc


SUBCOMMANDS["report"] = ("params, FLOPs (full and paper conventions), throughput; --paper zoo; --traffic model",
                         _add_report_args, _run_report)
SUBCOMMANDS["bench"] = ("run the pytest-benchmark suite and write results JSON + markdown summary",
                        _add_bench_args, _run_bench)
