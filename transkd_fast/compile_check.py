"""Ahead-of-time compile check of every Triton kernel for sm_80 and sm_90, with no GPU.

Each kernel module ``transkd_fast.kernels.<op>`` exposes ``compile_specs()``: a list of
:class:`CompileSpec` (kernel, signature, constexprs, launch options) covering its dtypes
and autotune configs. This module compiles each one with ``triton.compile`` for a
``GPUTarget``, runs the PTX through the ``ptxas`` bundled with triton (``-v``) and reads
registers and spill bytes; shared memory comes from the compile metadata.

Kernels defined while ``TRITON_INTERPRET=1`` cannot be compiled, so tests call
:func:`check_in_subprocess`, which runs ``python -m transkd_fast.compile_check`` in a child
process with the interpreter switched off.

CLI: ``python -m transkd_fast.compile_check [--ops attention hcl] [--json F] [--markdown F]``
exits 1 on any spill or compile failure.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

KERNEL_OPS = ("attention", "selective_fusion", "hcl", "kl_div", "weighted_mse")
ARCHS = (80, 90)


@dataclass
class CompileSpec:
    """One kernel build: ``signature`` maps every argument to a Triton type string
    ("*fp16", "i32", "fp32", "constexpr"); ``constexprs`` gives the constexpr values."""

    kernel: Callable
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    label: str = ""  # e.g. "fwd fp16 D=64 BLOCK_M=128"
    attrs: Optional[dict] = None
    extra: dict = field(default_factory=dict)


def _ptxas(arch: int) -> str:
    """The ptxas triton itself uses for this arch (it bundles two; only one reads PTX 9.x)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers and spill bytes of every entry in ``ptx`` for ``sm_<arch>``."""
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed for {gpu}:\n{log}")
    regs = [int(m) for m in _REGS.findall(log)]
    spills = [int(a) + int(b) for a, b in _SPILL.findall(log)]
    return {"registers": max(regs) if regs else 0, "spill_bytes": sum(spills)}


def compile_one(spec: CompileSpec, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(spec.kernel, spec.signature, spec.constexprs, spec.attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    rep = ptxas_report(compiled.asm["ptx"], arch)
    return {
        "kernel": spec.kernel.fn.__name__ if hasattr(spec.kernel, "fn") else spec.kernel.__name__,
        "label": spec.label,
        "arch": f"sm_{arch}",
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "shared_bytes": int(compiled.metadata.shared),
        **rep,
    }


def run(ops: tuple[str, ...] = KERNEL_OPS, archs: tuple[int, ...] = ARCHS, progress: bool = True) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile checks need TRITON_INTERPRET unset: kernels defined while "
                           "interpreting cannot be compiled")
    rows = []
    for op in ops:
        mod = importlib.import_module(f"transkd_fast.kernels.{op}")
        specs = mod.compile_specs()
        for spec in specs:
            for arch in archs:
                try:
                    row = compile_one(spec, arch)
                except Exception as e:  # report every failure, keep going
                    row = {"kernel": getattr(spec.kernel, "__name__", "?"), "label": spec.label,
                           "arch": f"sm_{arch}", "error": f"{type(e).__name__}: {e}"[:2000]}
                row["op"] = op
                rows.append(row)
                if progress:
                    print(f"[compile] {op:16s} {row['arch']} {row.get('label', '')}: "
                          + (f"regs={row['registers']} spill={row['spill_bytes']} smem={row['shared_bytes']}"
                             if "error" not in row else row["error"].splitlines()[0]),
                          file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Triton compile report",
        "",
        "Generated by `python -m transkd_fast.compile_check --markdown benchmarks/results/compile_report.md`:",
        "every kernel built ahead of time with `triton.compile` for each target (no GPU needed),",
        "registers and spills from the bundled `ptxas -v`, shared memory from the compile metadata.",
        "",
        "| op | kernel | config | arch | warps | stages | registers | spill bytes | shared bytes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['kernel']} | {r['label']} | {r['arch']} | | | FAILED | | |")
        else:
            lines.append(f"| {r['op']} | {r['kernel']} | {r['label']} | {r['arch']} | {r['num_warps']} | "
                         f"{r['num_stages']} | {r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} |")
    bad = [r for r in rows if "error" in r or r.get("spill_bytes", 0) > 0]
    lines += ["", f"{len(rows)} builds, {len(bad)} with spills or failures."]
    return "\n".join(lines) + "\n"


def check_in_subprocess(ops: tuple[str, ...], archs: tuple[int, ...] = ARCHS, timeout: int = 1500) -> list[dict]:
    """Run the check in a fresh interpreter without ``TRITON_INTERPRET``; returns the rows."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "rows.json"
        cmd = [sys.executable, "-m", "transkd_fast.compile_check", "--ops", *ops,
               "--archs", *map(str, archs), "--json", str(out), "--no-fail"]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0 or not out.exists():
            raise RuntimeError(f"compile check process failed ({res.returncode}):\n{res.stderr[-4000:]}")
        return json.loads(out.read_text())


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", nargs="+", default=list(KERNEL_OPS))
    ap.add_argument("--archs", nargs="+", type=int, default=list(ARCHS))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--no-fail", action="store_true", help="exit 0 even with spills (the caller judges)")
    a = ap.parse_args(argv)
    rows = run(tuple(a.ops), tuple(a.archs))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    if a.markdown:
        a.markdown.parent.mkdir(parents=True, exist_ok=True)
        a.markdown.write_text(markdown(rows))
    bad = [r for r in rows if "error" in r or r.get("spill_bytes", 0) > 0]
    for r in bad:
        what = r.get("error") or f"{r['spill_bytes']} spill bytes"
        print(f"FAIL {r['op']} {r['kernel']} {r['label']} {r['arch']}: {what}", file=sys.stderr)
    return 0 if (a.no_fail or not bad) else 1


if __name__ == "__main__":
    sys.exit(main())
