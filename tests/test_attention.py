"""efficient_attention: Triton kernels (interpreter) vs a float64 reference, the torch and
reference backends, the custom op, refusals, and the ahead-of-time compile check."""

from __future__ import annotations

import concurrent.futures
import re
import types
from pathlib import Path

import pytest
import torch
from helpers import assert_close_rel, assert_low_precision_ok
from transkd_fast.kernels import attention as K

from transkd_fast.backend import BackendError, resolve
from transkd_fast.ops.attention import efficient_attention, efficient_attention_reference

ROOT = Path(__file__).resolve().parents[1]


def _linear_views(B, Nq, Nkv, H, D, dtype=torch.float32, requires_grad=True):
    """q, k, v as MiT builds them: views of the q Linear output [B, Nq, C] and of the fused
    kv Linear output [B, Nkv, 2C] (k and v interleaved per token: strided, no copies)."""
    C = H * D
    x, y = torch.randn(B, Nq, C), torch.randn(B, Nkv, C)
    lq, lkv = torch.nn.Linear(C, C), torch.nn.Linear(C, 2 * C)
    q = lq(x).to(dtype).detach().requires_grad_(requires_grad)
    kv = lkv(y).to(dtype).detach().requires_grad_(requires_grad)
    kvv = kv.view(B, Nkv, 2, H, D)
    return q.view(B, Nq, H, D), kvv[:, :, 0], kvv[:, :, 1], (q, kv)


def _ref64(q, k, v, do, scale=None):
    """float64 reference output and gradients (w.r.t. q, k, v)."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = efficient_attention_reference(q64, k64, v64, scale)
    dq, dk, dv = torch.autograd.grad(out, (q64, k64, v64), do.double())
    return out.detach(), dq, dk, dv


def _eager_same_dtype(q, k, v, do, scale=None):
    """The original's eager attention run in q's own dtype (PyTorch's own low-precision error)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    qt, kt, vt = (t.transpose(1, 2) for t in (qs, ks, vs))
    out = (((qt @ kt.transpose(-2, -1)) * scale).softmax(-1) @ vt).transpose(1, 2)
    grads = torch.autograd.grad(out, (qs, ks, vs), do)
    return (out.detach(), *grads)


def _run(q, k, v, do, backend="triton", scale=None):
    out = efficient_attention(q, k, v, scale=scale, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return (out.detach(), *grads)


def _check_all(ours, ref, tol, what):
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        if b.norm() == 0:  # Nkv = 1: dq and dk vanish exactly; ours must be rounding-small
            assert a.abs().max() <= tol * ours[3].abs().max(), f"{what} {name}: not ~0"
        else:
            assert_close_rel(a, b, tol, f"{what} {name}")


SHAPES = {
    "B2_Nq200_Nkv13_H2_D32": (2, 200, 13, 2, 32),
    "Nkv1": (2, 45, 1, 2, 32),
    "Nq_below_block": (1, 9, 20, 3, 32),
    "D64_multi_key_blocks": (1, 70, 37, 2, 64),
    "D16": (1, 33, 17, 1, 16),
    "D128": (1, 21, 18, 1, 128),
}


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_triton_fp32_matches_fp64_reference(shape):
    q, k, v, _ = _linear_views(*shape)
    assert q.stride(1) == q.shape[2] * q.shape[3] and k.stride(1) == 2 * k.shape[2] * k.shape[3]
    out = efficient_attention(q, k, v, backend="triton")
    do = torch.randn_like(out)
    ours = _run(q, k, v, do)
    _check_all(ours, _ref64(q, k, v, do), 1e-5, f"triton fp32 {shape}")


def test_triton_lse_and_custom_scale():
    q, k, v, _ = _linear_views(1, 40, 19, 2, 32)
    o, lse = K.attention_forward(q.detach(), k.detach(), v.detach(), 0.3)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * 0.3
    assert_close_rel(lse, torch.logsumexp(s, -1), 1e-6, "lse")
    do = torch.randn_like(o)
    _check_all(_run(q, k, v, do, scale=0.3), _ref64(q, k, v, do, scale=0.3), 1e-5, "scale=0.3")


@pytest.mark.parametrize("split", [1, 2, 5])
def test_dkdv_query_split_and_explicit_blocks(split):
    """Every split count and other block sizes (several key and query tiles) agree."""
    q, k, v, _ = _linear_views(1, 150, 40, 2, 32, requires_grad=False)
    o, lse = K.attention_forward(q, k, v, 32 ** -0.5, config={"BLOCK_M": 16, "BLOCK_N": 16})
    do = torch.randn_like(o)
    ref = _ref64(q, k, v, do)
    assert_close_rel(o, ref[0], 1e-5, "out 16x16 blocks")
    grads = K.attention_backward(do, q, k, v, o, lse, 32 ** -0.5, split=split,
                                 config={"BLOCK_M": 64, "BLOCK_N": 32},
                                 kv_config={"BLOCK_M": 16, "BLOCK_N": 32})
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref[1:]):
        assert_close_rel(a, b, 1e-5, f"{name} split={split}")


def test_every_gpu_config_computes_right():
    """Each compiled autotune config (block sizes as on sm_80/sm_90), run in the interpreter."""
    import triton

    q, k, v, _ = _linear_views(1, 150, 70, 1, 32, requires_grad=False)
    scale = 32 ** -0.5
    o_ref, lse_ref = K.attention_forward(q, k, v, scale)
    do = torch.randn_like(o_ref)
    ref = _ref64(q, k, v, do)
    for bm, bn, w, st in K._Q_CONFIGS + K._Q_CONFIGS_FP32:
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
        o, lse = K.attention_forward(q, k, v, scale, config=cfg)
        assert_close_rel(o, ref[0], 1e-5, f"fwd {cfg}")
        assert_close_rel(lse, lse_ref, 1e-6, f"lse {cfg}")
        dq = K.attention_backward(do, q, k, v, o, lse, scale, split=1, config=cfg,
                                  kv_config={"BLOCK_M": 32, "BLOCK_N": 16})[0]
        assert_close_rel(dq, ref[1], 1e-5, f"dq {cfg}")
    for bn, bm, w, st in K._KV_CONFIGS + K._KV_CONFIGS_FP32:
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
        _, dk, dv = K.attention_backward(do, q, k, v, o_ref, lse_ref, scale, split=2,
                                         config={"BLOCK_M": 32, "BLOCK_N": 16}, kv_config=cfg)
        assert_close_rel(dk, ref[2], 1e-5, f"dk {cfg}")
        assert_close_rel(dv, ref[3], 1e-5, f"dv {cfg}")
    # which configs autotuning may pick, by dtype and Nkv
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
               for m, n, w, st in K._Q_CONFIGS + K._Q_CONFIGS_FP32]

    def picked(dtype, nkv):
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in
                K._prune(configs, {"Q": torch.empty(0, dtype=dtype), "NKV": nkv})]

    assert picked(torch.float32, 512) == picked(torch.float32, 5) == [(32, 32)]
    assert picked(torch.float16, 13) == picked(torch.bfloat16, 32) == [(128, 32)]
    assert picked(torch.bfloat16, 512) == [(128, 64), (64, 64)]


def test_every_output_element_is_written(monkeypatch):
    """Buffers from the launchers are NaN-poisoned: any element a kernel skips shows up."""
    real = torch

    def poisoned(fn):
        def make(*a, **kw):
            t = fn(*a, **kw)
            return t.fill_(float("nan"))
        return make

    shim = types.SimpleNamespace(**{n: getattr(real, n) for n in dir(real) if not n.startswith("__")})
    shim.empty, shim.empty_like = poisoned(real.empty), poisoned(real.empty_like)
    monkeypatch.setattr(K, "torch", shim)
    q, k, v, _ = _linear_views(2, 37, 21, 2, 32, requires_grad=False)
    o, lse = K.attention_forward(q, k, v, 32 ** -0.5)
    do = torch.randn_like(o)
    for split in (1, 3):
        grads = K.attention_backward(do, q, k, v, o, lse, 32 ** -0.5, split=split)
        for t in (o, lse, *grads):
            assert torch.isfinite(t).all()
    _check_all((o, *grads), _ref64(q, k, v, do), 1e-5, "poisoned")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision_within_2x_torch(dtype):
    """fp16 (interpreter dot) and bf16 (upcast before the interpreter's dot) vs fp64."""
    q, k, v, _ = _linear_views(2, 100, 13, 2, 32, dtype=dtype)
    do = torch.randn(q.shape, dtype=dtype)
    ref = _ref64(q, k, v, do)
    ours = _run(q, k, v, do)
    theirs = _eager_same_dtype(q, k, v, do)
    for name, a, t, r in zip(("out", "dq", "dk", "dv"), ours, theirs, ref):
        assert a.dtype == dtype
        assert_low_precision_ok(a, t, r, f"triton {dtype} {name}")


def test_gradcheck_float64_custom_op_and_reference():
    """The custom op's autograd (forward + backward custom ops, torch backend) and the
    reference, in float64 at a tiny size. (The triton kernels are fp32/fp16/bf16 only: their
    fp32 gradients are held to 1e-5 of the float64 reference above.)"""
    q = torch.randn(1, 5, 2, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: efficient_attention(*t, backend="torch"), (q, k, v))
    assert torch.autograd.gradcheck(lambda *t: efficient_attention(*t, backend="reference"), (q, k, v))


@pytest.mark.parametrize("nkv", [1, 13])
@pytest.mark.parametrize("D", [32, 64])
def test_reference_vs_torch_backend(nkv, D):
    """Issue #2 acceptance: Nq = 37, strided views, forward and gradients to 1e-5."""
    q, k, v, _ = _linear_views(2, 37, nkv, 2, D)
    do = torch.randn(q.shape)
    ref = _run(q, k, v, do, backend="reference")
    _check_all(_run(q, k, v, do, backend="torch"), ref, 1e-5, f"torch Nkv={nkv} D={D}")


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_non_unit_head_dim_stride_and_expanded_grad(backend):
    """Inputs whose head_dim is not contiguous, and the stride-0 gradient of ``out.sum()``
    (the fused CPU kernel silently misreads such layouts unless they are copied first)."""
    q = torch.randn(1, 40, 16, 2).transpose(-1, -2).requires_grad_()
    k = torch.randn(1, 9, 16, 2).transpose(-1, -2).requires_grad_()
    v = torch.randn(1, 9, 2, 16, requires_grad=True)
    out = efficient_attention(q, k, v, backend=backend)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref = _ref64(q, k, v, torch.ones(out.shape))
    _check_all((out.detach(), *grads), ref, 1e-5, f"{backend} strided head_dim")


def test_torch_backend_cpu_query_chunks(monkeypatch):
    """One (batch, head) pair and more threads: the CPU backward splits the queries into
    chunks (extra batch entries) and sums dk/dv over them; same gradients as the reference."""
    from transkd_fast.ops import attention as ops

    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert ops._cpu_query_chunks(1, 1, 1024) == 4 and ops._cpu_query_chunks(1, 1, 600) == 2
    assert ops._cpu_query_chunks(2, 2, 1024) == 1 and ops._cpu_query_chunks(1, 1, 300) == 1
    q, k, v, _ = _linear_views(1, 1024, 13, 1, 32)
    do = torch.randn(q.shape)
    _check_all(_run(q, k, v, do, backend="torch"), _run(q, k, v, do, backend="reference"), 1e-5, "chunked")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_custom_op(backend):
    q, k, v, _ = _linear_views(1, 19, 7, 2, 16)
    args = (q.detach().requires_grad_(), k.detach().requires_grad_(), v.detach().requires_grad_(), 0.25, backend)
    torch.library.opcheck(torch.ops.transkd_fast.efficient_attention.default, args)
    out = efficient_attention(q, k, v, backend=backend)
    torch.library.opcheck(torch.ops.transkd_fast.efficient_attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(),
                           torch.ops.transkd_fast.efficient_attention(q, k, v, 0.25, backend)[1].detach(),
                           0.25, backend),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs_raise_clear_errors():
    q, k, v, _ = _linear_views(1, 8, 4, 2, 16, requires_grad=False)
    with pytest.raises(ValueError, match=r"q must have 4 dimensions, got shape \(8, 2, 16\)"):
        efficient_attention(q[0], k, v)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        efficient_attention(q, k, v[:, :3])
    with pytest.raises(ValueError, match=r"does not match q .*expected \[B=1, Nkv, H=2, D=16\]"):
        efficient_attention(q, k[..., :8], v[..., :8])
    with pytest.raises(TypeError, match="q, k, v must share a dtype"):
        efficient_attention(q, k.half(), v.half())
    with pytest.raises(TypeError, match="q must be a floating tensor"):
        efficient_attention(q.int(), k, v)
    with pytest.raises(ValueError, match="at least one query and one key"):
        efficient_attention(q, k[:, :0], v[:, :0])


def test_triton_refusals_say_why():
    q, k, v, _ = _linear_views(1, 8, 4, 2, 24, requires_grad=False)
    with pytest.raises(BackendError, match=r"'triton' refused.*head_dim 24 is not one of .*16, 32, 64, 128"):
        efficient_attention(q, k, v, backend="triton")
    q, k, v, _ = _linear_views(1, 8, 4, 2, 16, dtype=torch.float64, requires_grad=False)
    with pytest.raises(BackendError, match="'triton' refused.*dtype float64 is not supported"):
        efficient_attention(q, k, v, backend="triton")
    from transkd_fast.ops.attention import _triton_check

    big = torch.empty_strided((1, 2**16, 2, 16), (2**31, 2**15, 16, 1), device="meta")  # no memory
    assert "spans ≥ 2^31 elements" in _triton_check(big, big[:, :4], big[:, :4])
    assert _triton_check(big[:, : 2**16 - 1], big[:, :4], big[:, :4]) is None
    assert resolve("efficient_attention", q.float(), k.float(), v.float(), backend="triton") == "triton"
    assert resolve("efficient_attention", q.float(), k.float(), v.float(), backend="auto") == "torch"


def test_xformers_backend_refuses_cpu_and_its_api_exists():
    q, k, v, _ = _linear_views(1, 8, 4, 2, 16, requires_grad=False)
    with pytest.raises(BackendError, match=r"'xformers' refused for cpu.*(only CUDA|not installed)"):
        efficient_attention(q, k, v, backend="xformers")
    fmha = pytest.importorskip("xformers.ops.fmha")
    assert callable(fmha.memory_efficient_attention_forward_requires_grad)
    assert callable(fmha.memory_efficient_attention_backward)
    from transkd_fast.ops import attention as ops

    assert {"torch", "triton", "xformers"} <= set(ops._FORWARD) and set(ops._FORWARD) == set(ops._BACKWARD)


def _compile_rows():
    # The two targets build in two processes at once (each is one core's worth of work).
    from transkd_fast.compile_check import check_in_subprocess

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(lambda a: check_in_subprocess(("attention",), archs=(a,)), (80, 90)))
    return parts[0] + parts[1]


@pytest.mark.slow
def test_compile_check_no_spills_sm80_sm90():
    """fwd/dq/dkdv × fp16/bf16/fp32 × D ∈ {32, 64} × every config, for sm_80 and sm_90."""
    rows = _compile_rows()
    n_specs = len(K.compile_specs())
    assert len(rows) == 2 * n_specs
    labels = {r["label"] for r in rows}
    for kind in ("fwd", "dq", "dkdv"):
        for dt in ("fp16", "bf16", "fp32"):
            for D in (32, 64):
                assert any(lb.startswith(f"{kind} {dt} D={D} ") for lb in labels), (kind, dt, D)
    for r in rows:
        assert "error" not in r, f"{r['label']} {r['arch']}: {r['error'][:500]}"
        assert r["spill_bytes"] == 0, f"{r['label']} {r['arch']}: {r['spill_bytes']} spill bytes"


def test_committed_compile_table_covers_every_build():
    table = (ROOT / "benchmarks" / "results" / "compile_report_attention.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| attention |")]
    assert len(rows) == 2 * len(K.compile_specs())
    assert not [r for r in rows if "FAILED" in r]
    assert all(re.search(r"\| sm_(80|90) \| \d+ \| \d+ \| \d+ \| 0 \| \d+ \|$", r) for r in rows)
    assert re.search(r"\d+ builds, 0 with spills or failures", table)
