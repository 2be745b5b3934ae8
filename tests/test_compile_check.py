"""The launch-faithful compile check itself (transkd_fast.compile_check).

- The model run it records from (meta device, cuDNN's conv layouts) makes the same op calls,
  with the same shapes, strides and storage offsets, as a real run of the same models.
- A launch the JIT cannot compile is reported as a failure, never hidden: a deliberately broken
  kernel launched through the recorder gives an error row and a non-zero exit.
- The binder specializes as a real launch does: an int argument equal to 1 becomes a constexpr.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import transkd_fast
from transkd_fast import backend
from transkd_fast import compile_check as cc
from transkd_fast.distill import TransKD
from transkd_fast.models import build_model


def _calls(device: str, variant: str):
    calls = []
    torch.manual_seed(0)
    with torch.device(device):
        teacher = build_model("segformer_b2", num_classes=20).eval()
        kd = TransKD(build_model("segformer_b0", num_classes=20), teacher, variant=variant).train()
    for b in (2, 1):
        images = torch.randn(b, 3, 64, 96, device=device)
        labels = torch.randint(0, 20, (b, 16, 24), device=device) if device == "cpu" else \
            torch.empty(b, 16, 24, dtype=torch.long, device=device)
        if device == "meta":
            with transkd_fast.use_backend("triton"), backend.recording_launches(), cc._CudnnConvLayouts(), \
                    cc.record_op_calls("t", calls):
                kd(images, labels)["loss"].backward()
        else:
            # recording_launches: the CPU-only oneDNN paths (the teacher's no-grad attention) step
            # aside, as on the GPU the recording models
            with transkd_fast.use_backend("torch"), backend.recording_launches(), cc.record_op_calls("t", calls):
                kd(images, labels)["loss"].backward()
    return [(c.fn, [(a.shape, a.stride, a.offset, a.requires_grad) for a in cc._flat(c.args)]) for c in calls]


@pytest.mark.parametrize("variant", ["base", "gl", "ea"])
def test_meta_recording_matches_a_real_run(variant):
    real, meta = _calls("cpu", variant), _calls("meta", variant)
    assert {fn for fn, _ in real} >= {"efficient_attention", "selective_pool", "selective_fuse", "hcl_loss",
                                      "weighted_mse"}
    assert real == meta
    # the CSF and HCL maps really are channels_last (the layout the kernels must read natively)
    pool = next(specs for fn, specs in real if fn == "selective_pool")
    shape, stride = pool[0][0], pool[0][1]
    assert stride[1] == 1 and stride[3] == shape[1], stride


_BROKEN = textwrap.dedent('''
    import sys, json, torch, triton, triton.language as tl
    from transkd_fast import compile_check as cc

    @triton.jit
    def _broken(x_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        n64 = n.to(tl.int64)            # fails when the JIT makes n == 1 a constexpr
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n64), mask=i < n64)

    rec = cc.Recorder(80)
    with rec.active():
        x = torch.empty(64)
        for n in (64, 1):
            rec.case = f"n={n}"
            _broken[(1,)](x, n, BLOCK=64)
    rows = list(rec.builds.values())
    json.dump(rows, open(sys.argv[1], "w"))
''')


def test_a_broken_launch_is_caught(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text(_BROKEN)
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(script), str(out)], env=env, check=True, capture_output=True, timeout=300)
    rows = json.loads(out.read_text())
    by_case = {r["cases"][0]: r for r in rows}
    assert "error" not in by_case["n=64"] and by_case["n=64"]["spill_bytes"] == 0
    assert by_case["n=64"]["access_bits"]["ld"], by_case["n=64"]
    bad = by_case["n=1"]
    assert "const n=1" in bad["specialized"]
    assert "error" in bad and "to" in bad["error"]
    assert cc.bad_rows(rows) == [bad]


def test_cli_exits_nonzero_on_failures(tmp_path, monkeypatch):
    rows = [{"op": "x", "kernel": "k", "arch": "sm_80", "cases": ["c"], "error": "CompilationError: boom"}]
    monkeypatch.setattr(cc, "run", lambda *a, **k: rows)
    assert cc.main(["--ops", "hcl", "--markdown", str(tmp_path / "r.md")]) == 1
    assert cc.main(["--ops", "hcl", "--no-fail"]) == 0
    assert "FAILED" in (tmp_path / "r.md").read_text()
    rows[0] = {"op": "x", "kernel": "k", "arch": "sm_80", "cases": ["c"], "config": "", "specialized": "",
               "num_warps": 4, "num_stages": 2, "registers": 255, "spill_bytes": 8, "shared_bytes": 0,
               "access_bits": {"ld": {}, "st": {}}}
    assert cc.main(["--ops", "hcl"]) == 1


def test_access_widths_read_the_ptx():
    ptx = ("\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n"
           "\t@%p1 ld.global.b16 { %rs1 }, [ %rd2 + 0 ];\n"
           "\tst.global.v2.b32 [ %rd3 + 0 ], { %r5, %r6 };\n"
           "\tld.global.nc.v4.b16 { %rs2, %rs3, %rs4, %rs5 }, [ %rd4 + 0 ];\n")
    assert cc.access_widths(ptx) == {"ld": {16: 1, 64: 1, 128: 1}, "st": {64: 1}}
