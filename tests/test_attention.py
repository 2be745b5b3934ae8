"""efficient_attention: Triton kernels vs a float64 reference, the torch and reference
backends, the custom op, the torch backend's CPU inference path (fp32 blocked oneDNN / bf16
chunked, taken inside the op, MiT through it), NaN propagation, autotune keys, refusals, and the
launch-faithful compile check.

Tensors live on ``helpers.DEVICE``: the CPU (Triton's interpreter) by default, the GPU in CUDA
test mode (``TRANSKD_TEST_DEVICE=cuda``), where the same assertions run the compiled kernels
and the CUDA torch backend (SDPA's flash / cuDNN / mem-efficient kernels)."""

from __future__ import annotations

import types

import pytest
import torch
from helpers import DEVICE, ON_CUDA, assert_close_rel, assert_low_precision_ok, needs_cpu
from transkd_fast.kernels import attention as K

from transkd_fast.backend import BackendError, resolve
from transkd_fast.ops.attention import efficient_attention, efficient_attention_reference


def _linear_views(B, Nq, Nkv, H, D, dtype=torch.float32, requires_grad=True):
    """q, k, v as MiT builds them: views of the q Linear output [B, Nq, C] and of the fused
    kv Linear output [B, Nkv, 2C] (k and v interleaved per token: strided, no copies)."""
    C = H * D
    x, y = torch.randn(B, Nq, C, device=DEVICE), torch.randn(B, Nkv, C, device=DEVICE)
    lq, lkv = torch.nn.Linear(C, C, device=DEVICE), torch.nn.Linear(C, 2 * C, device=DEVICE)
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


def _all_tables():
    q_rows = sorted({r for t in (K._FWD_TILES, K._DQ_TILES) for rows in t.values() for r in rows})
    kv_rows = sorted({(bn, *r) for bn, rows in K._DKDV_TILES.values() for r in rows})
    return q_rows, kv_rows


@pytest.mark.parametrize("D", [32, 128])
def test_every_gpu_config_computes_right(D):
    """Each autotune config of the tables (block sizes as compiled for sm_80/sm_90) computes
    right, for head dims ≤ 64 and 128."""
    q, k, v, _ = _linear_views(1, 150, 70, 1, D, requires_grad=False)
    scale = D ** -0.5
    o_ref, lse_ref = K.attention_forward(q, k, v, scale)
    do = torch.randn_like(o_ref)
    ref = _ref64(q, k, v, do)
    q_rows, kv_rows = _all_tables()
    for bm, bn, w, st in q_rows:
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
        o, lse = K.attention_forward(q, k, v, scale, config=cfg)
        assert_close_rel(o, ref[0], 1e-5, f"fwd {cfg}")
        assert_close_rel(lse, lse_ref, 1e-6, f"lse {cfg}")
        dq = K.attention_backward(do, q, k, v, o, lse, scale, split=1, config=cfg,
                                  kv_config={"BLOCK_M": 32, "BLOCK_N": 16})[0]
        assert_close_rel(dq, ref[1], 1e-5, f"dq {cfg}")
    for bn, bm, w, st in kv_rows:
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
        _, dk, dv = K.attention_backward(do, q, k, v, o_ref, lse_ref, scale, split=2,
                                         config={"BLOCK_M": 32, "BLOCK_N": 16}, kv_config=cfg)
        assert_close_rel(dk, ref[2], 1e-5, f"dk {cfg}")
        assert_close_rel(dv, ref[3], 1e-5, f"dv {cfg}")


def test_pruning_per_dtype_head_dim_and_nkv():
    """Which configs autotuning may pick, by dtype, head dim and Nkv ≤ 32 (one key tile)."""
    def picked(tuner, dtype, D, nkv, **kw):
        keep = tuner.early_config_prune(tuner.configs, {"Q": torch.empty(0, dtype=dtype), "NKV": nkv},
                                        HEAD_DIM=D, **kw)
        return sorted((c.kwargs["BLOCK_M"], c.kwargs.get("BLOCK_N"), c.num_warps, c.num_stages) for c in keep)

    fwd, dq, dkdv = K._fwd_tuned, K._dq_tuned, K._dkdv_tuned
    assert picked(fwd, torch.float32, 32, 512) == picked(fwd, torch.float32, 32, 5) == [(32, 32, 4, 2)]
    assert picked(fwd, torch.float16, 32, 13) == picked(fwd, torch.bfloat16, 64, 32) == [(128, 32, 4, 2)]
    assert picked(fwd, torch.bfloat16, 64, 512) == [(64, 64, 4, 2), (128, 64, 4, 3)]
    assert picked(fwd, torch.float16, 128, 512) == [(64, 64, 4, 2), (128, 64, 8, 2)]
    assert picked(dq, torch.float16, 128, 512) == [(64, 32, 4, 2), (64, 64, 8, 2)]
    assert picked(dq, torch.float32, 128, 33) == [(32, 32, 8, 2)]
    assert picked(dkdv, torch.float16, 32, 512) == [(32, None, 4, 3), (64, None, 4, 3)]
    assert picked(dkdv, torch.bfloat16, 128, 7) == [(32, None, 4, 2)]
    # the dkdv key tile is the host's, per (dtype, head dim, Nkv ≤ 32)
    assert [K.dkdv_block_n(dt, d, n) for dt, d, n in (
        (torch.float16, 64, 512), (torch.float16, 32, 32), (torch.float32, 64, 512), (torch.float32, 128, 512))
    ] == [64, 32, 64, 32]


class _LaunchSpy:
    """Stands in for an autotuner's JITFunction: records the kwargs of each launch."""

    def __init__(self, fn):
        self.fn, self.launches = fn, []

    def run(self, *args, **kwargs):
        self.launches.append(kwargs)
        return self.fn.run(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.fn, name)


@pytest.mark.parametrize("dtype,D,nkv", [(torch.float32, 32, 40), (torch.float32, 128, 40),
                                         (torch.float16, 32, 20), (torch.float16, 64, 70)])
def test_dkdv_split_uses_the_launched_block_n(monkeypatch, dtype, D, nkv):
    """default_split sizes the query split for the BLOCK_N the dkdv launch really uses, and
    the launch's grid is (⌈Nkv/BLOCK_N⌉, split, B·H) with that split."""
    spy = _LaunchSpy(K._dkdv_tuned.fn)
    monkeypatch.setattr(K._dkdv_tuned, "fn", spy)
    B, NQ, H = 1, 600, 1
    q, k, v, _ = _linear_views(B, NQ, nkv, H, D, dtype=dtype, requires_grad=False)
    o, lse = K.attention_forward(q, k, v, D ** -0.5)
    do = torch.randn_like(o)
    grads = K.attention_backward(do, q, k, v, o, lse, D ** -0.5)
    (launch,) = spy.launches
    block_n = K.dkdv_block_n(dtype, D, nkv)
    assert launch["BLOCK_N"] == block_n
    split = K.default_split(B, H, NQ, nkv, q.device, block_n)
    per = -(-(-(-NQ // split)) // K._SPLIT_ALIGN) * K._SPLIT_ALIGN
    assert launch["grid"] == (-(-nkv // block_n), -(-NQ // per), B * H)
    if not ON_CUDA:  # 4 "SMs" on CPU tensors: the split path runs (two 384/216-query splits)
        assert launch["grid"][1] == 2
    ref = _ref64(q, k, v, do)
    for name, a, r, t in zip(("dq", "dk", "dv"), grads, ref[1:], _eager_same_dtype(q, k, v, do)[1:]):
        if dtype == torch.float32:
            assert_close_rel(a, r, 1e-5, name)
        else:
            assert_low_precision_ok(a, t, r, name)


def test_default_split_follows_the_key_tile(monkeypatch):
    """About two waves of programs on the modeled GPU, for the key tile given."""
    monkeypatch.setattr(K, "_num_sms", lambda device: 108)
    dev = torch.device("cpu")
    # MiT stage 1, batch 2: 512 keys; 64-key tiles → 8 blocks × 2 = 16 programs per split
    assert K.default_split(2, 1, 32768, 512, dev, 64) == 14
    assert K.default_split(2, 1, 32768, 512, dev, 128) == 27  # half the key blocks → twice the splits
    assert K.default_split(2, 1, 32768, 512, dev, 32) == 7
    assert K.default_split(2, 8, 512, 512, dev, 64) == 2 and K.default_split(1, 1, 300, 512, dev, 64) == 1


def test_autotune_keys_on_buckets_not_sizes(monkeypatch):
    """A new image size in the same power-of-two buckets (B·H·Nq, Nkv) reuses the tuned
    config: no benchmark runs. A size in a new bucket tunes once."""
    calls = {}

    def counting(tuner, name):
        real = tuner.do_bench  # interpreter: the host stub; CUDA: Triton's benchmarker

        def bench(kernel_call, quantiles):
            calls[name] = calls.get(name, 0) + 1
            return real(kernel_call, quantiles)
        return bench

    for name in ("_fwd_tuned", "_dq_tuned", "_dkdv_tuned"):
        tuner = getattr(K, name)
        monkeypatch.setattr(tuner, "cache", {})
        monkeypatch.setitem(tuner.__dict__, "do_bench", counting(tuner, name))

    def step(nq, nkv):
        q, k, v, _ = _linear_views(1, nq, nkv, 1, 32, dtype=torch.float16)
        out = efficient_attention(q, k, v, backend="triton")
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        return dict(calls)

    # fp16, D = 32, Nkv > 32: two configs per kernel → each kernel benchmarks both once
    first = step(150, 40)
    assert first == {"_fwd_tuned": 2, "_dq_tuned": 2, "_dkdv_tuned": 2}
    assert step(200, 48) == first  # a new "image size", same buckets (256 rows, 64 keys): no tuning
    assert step(256, 64) == first
    assert step(300, 48) == {n: 4 for n in first}  # 512 rows: a new bucket, tuned once
    assert all(len(getattr(K, n).cache) == 2 for n in first)


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
        grads = K.attention_backward(do, q, k, v, o, lse, 32 ** -0.5, split=split,
                                     kv_config={"BLOCK_M": 16, "BLOCK_N": 16})
        for t in (o, lse, *grads):
            assert torch.isfinite(t).all()
    _check_all((o, *grads), _ref64(q, k, v, do), 1e-5, "poisoned")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 128])
def test_triton_low_precision_within_2x_torch(dtype, D):
    """fp16 and bf16 (upcast before the interpreter's dot, triton #11584) vs fp64."""
    q, k, v, _ = _linear_views(2, 100, 13 if D == 32 else 40, 2, D, dtype=dtype)
    do = torch.randn(q.shape, dtype=dtype, device=DEVICE)
    ref = _ref64(q, k, v, do)
    ours = _run(q, k, v, do)
    theirs = _eager_same_dtype(q, k, v, do)
    for name, a, t, r in zip(("out", "dq", "dk", "dv"), ours, theirs, ref):
        assert a.dtype == dtype
        assert_low_precision_ok(a, t, r, f"triton {dtype} D={D} {name}")


def test_gradcheck_float64_custom_op_and_reference():
    """The custom op's autograd (forward + backward custom ops, torch backend) and the
    reference, in float64 at a tiny size. (The triton kernels are fp32/fp16/bf16 only: their
    fp32 gradients are held to 1e-5 of the float64 reference above.)"""
    q = torch.randn(1, 5, 2, 4, dtype=torch.float64, requires_grad=True, device=DEVICE)
    k = torch.randn(1, 3, 2, 4, dtype=torch.float64, requires_grad=True, device=DEVICE)
    v = torch.randn(1, 3, 2, 4, dtype=torch.float64, requires_grad=True, device=DEVICE)
    assert torch.autograd.gradcheck(lambda *t: efficient_attention(*t, backend="torch"), (q, k, v))
    assert torch.autograd.gradcheck(lambda *t: efficient_attention(*t, backend="reference"), (q, k, v))


@pytest.mark.parametrize("nkv", [1, 13])
@pytest.mark.parametrize("D", [32, 64])
def test_reference_vs_torch_backend(nkv, D):
    """Issue #2 acceptance: Nq = 37, strided views, forward and gradients to 1e-5."""
    q, k, v, _ = _linear_views(2, 37, nkv, 2, D)
    do = torch.randn(q.shape, device=DEVICE)
    ref = _run(q, k, v, do, backend="reference")
    _check_all(_run(q, k, v, do, backend="torch"), ref, 1e-5, f"torch Nkv={nkv} D={D}")


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_non_unit_head_dim_stride_and_expanded_grad(backend):
    """Inputs whose head_dim is not contiguous, and the stride-0 gradient of ``out.sum()``
    (the fused CPU kernel silently misreads such layouts unless they are copied first)."""
    q = torch.randn(1, 40, 16, 2, device=DEVICE).transpose(-1, -2).requires_grad_()
    k = torch.randn(1, 9, 16, 2, device=DEVICE).transpose(-1, -2).requires_grad_()
    v = torch.randn(1, 9, 2, 16, requires_grad=True, device=DEVICE)
    out = efficient_attention(q, k, v, backend=backend)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref = _ref64(q, k, v, torch.ones(out.shape, device=DEVICE))
    _check_all((out.detach(), *grads), ref, 1e-5, f"{backend} strided head_dim")


@needs_cpu
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
@pytest.mark.parametrize("shape", [(1, 19, 7, 2, 16), (2, 19, 40, 1, 32), (1, 1, 5, 1, 16), (1, 45, 1, 2, 32)],
                         ids=["Nq19", "Nq19_Nkv40", "Nq1", "Nkv1"])
def test_opcheck_custom_op(backend, shape):
    """torch.library.opcheck of both custom ops at odd sizes (Nq = 19: the real LSE must have
    the [B, H, Nq] shape the fake impl declares, whatever padding the kernel uses)."""
    q, k, v, _ = _linear_views(*shape)
    args = (q.detach().requires_grad_(), k.detach().requires_grad_(), v.detach().requires_grad_(), 0.25, backend)
    torch.library.opcheck(torch.ops.transkd_fast.efficient_attention.default, args)
    out, lse = torch.ops.transkd_fast.efficient_attention(q, k, v, 0.25, backend)
    assert lse.shape == (shape[0], shape[3], shape[1]) and lse.is_contiguous()
    torch.library.opcheck(torch.ops.transkd_fast.efficient_attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(),
                           lse.detach(), 0.25, backend),
                          test_utils=("test_schema", "test_faketensor"))


def _poisoned(what, nkv, query, dtype=torch.float32):
    """Fresh q, k, v ``[1, 37|nkv, 2, 16]`` (MiT-style views, cloned) and a scale, with one defect
    ``what``: a NaN in query row ``query`` (head 1), that row's scores all -inf (``q_row_inf``:
    every key has k[..., 0] > 0 and the query is -inf there, 0 elsewhere), a NaN key or value
    element, or ``scale = nan``."""
    q, k, v, _ = _linear_views(1, 37, nkv, 2, 16, dtype=dtype, requires_grad=False)
    q, k, v = (t.clone() for t in (q, k, v))
    scale = None
    if what == "q_row":
        q[0, query, 1, 3] = float("nan")
    elif what == "q_row_inf":
        k[..., 0] = k[..., 0].abs() + 1
        q[0, query, 1] = 0
        q[0, query, 1, 0] = float("-inf")
    elif what == "k_row":
        k[0, nkv // 2, 0, 7] = float("nan")
    elif what == "v_elem":
        v[0, nkv - 1, 1, 2] = float("nan")
    else:
        scale = float("nan")
    return q, k, v, scale


def _nan_masks(out, grads):
    return [t.isnan() for t in (out, *grads)]


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("nkv", [1, 9, 40])
@pytest.mark.parametrize("what", ["q_row", "scale", "k_row", "v_elem"])
def test_nan_propagates_like_the_reference(backend, nkv, what):
    """Issue #14 item 20: a NaN in one query row, ``scale = nan``, a NaN key or value: NaN
    exactly where the reference has it, in the output and in every gradient. (SDPA's CPU flash
    kernel used to give 0 for an all-NaN score row when Nkv < 16, its SIMD width.)"""
    q, k, v, scale = _poisoned(what, nkv, query=5)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    do = torch.randn(q.shape, device=DEVICE)
    out = efficient_attention(q, k, v, scale=scale, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_out = efficient_attention_reference(q, k, v, scale)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), do)
    ours, ref = _nan_masks(out, grads), _nan_masks(ref_out, ref_grads)
    assert ref[0].any()
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert torch.equal(a, b), f"{backend} {what} Nkv={nkv} {name}: NaN at {a.sum()} places, reference {b.sum()}"
    fin = ~ref[0]
    if fin.any():  # and the rest is still right
        assert_close_rel(out.detach()[fin], ref_out.detach()[fin], 1e-5, "finite part")


@needs_cpu
def test_cpu_nan_fix_looks_at_the_lse_only():
    """The CPU fix reads the small [B, H, Nq] LSE and leaves the kernel's tensors untouched
    unless some row has LSE exactly 0; such a row with a finite score (Nkv = 1, score 0) is a
    real softmax over one key and stays as the kernel wrote it."""
    from transkd_fast.ops import attention as ops

    q, k = torch.randn(1, 50, 1, 16), torch.randn(1, 9, 1, 16)
    out, lse = torch.randn(1, 50, 1, 16), torch.randn(1, 1, 50)
    ref_out, ref_lse = out.clone(), lse.clone()
    o2, l2 = ops._cpu_nan_rows(q, k, out, lse, 0.25)
    assert o2 is out and l2 is lse and torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    q = torch.zeros(1, 6, 1, 16)
    k, v = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    out = efficient_attention(q, k, v, backend="torch")  # P = 1 over one key, LSE = 0
    assert_close_rel(out, v.expand(1, 6, 1, 16), 1e-6, "Nkv=1 with LSE 0")


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
    if not ON_CUDA:
        assert resolve("efficient_attention", q.float(), k.float(), v.float(), backend="auto") == "torch"


@needs_cpu
def test_xformers_backend_refuses_cpu_and_its_api_exists():
    q, k, v, _ = _linear_views(1, 8, 4, 2, 16, requires_grad=False)
    with pytest.raises(BackendError, match=r"'xformers' refused for cpu.*(only CUDA|not installed)"):
        efficient_attention(q, k, v, backend="xformers")
    fmha = pytest.importorskip("xformers.ops.fmha")
    assert callable(fmha.memory_efficient_attention_forward_requires_grad)
    assert callable(fmha.memory_efficient_attention_backward)
    from transkd_fast.ops import attention as ops

    assert {"torch", "triton", "xformers"} <= set(ops._FORWARD) and set(ops._FORWARD) == set(ops._BACKWARD)


@pytest.mark.slow
@needs_cpu
def test_compile_check_recorded_launches():
    """The launch-faithful check (transkd_fast.compile_check, suite ``odd``): every recorded
    attention launch binds and compiles for sm_80 and sm_90 without spills, the value-1
    specializations of the JIT (H = 1, Nkv = 1, Nq = 1) among them, and D = 128 is built.
    (CPU only: it needs no GPU, and CUDA test mode spends its device time on the kernels.)"""
    from transkd_fast.compile_check import check_in_subprocess

    rows = check_in_subprocess(("attention",), suites=("odd",))
    assert rows and all(r["op"] == "attention" for r in rows)
    failed = [f"{r['kernel']} {r['arch']} {r.get('config')}: {r['error'][:300]}" for r in rows if "error" in r]
    assert not failed, failed
    spills = [f"{r['kernel']} {r['arch']} {r['config']}: {r['spill_bytes']} B" for r in rows if r["spill_bytes"]]
    assert not spills, spills
    kernels = {"_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"}
    for arch in ("sm_80", "sm_90"):
        mine = [r for r in rows if r["arch"] == arch]
        for kern in kernels:
            for dt in ("fp32", "fp16", "bf16"):
                for D in (16, 32, 64, 128):
                    assert any(r["kernel"] == kern and r["config"].startswith(dt) and f"HEAD_DIM={D} " in r["config"]
                               for r in mine), (arch, kern, dt, D)
            for one in ("H=1", "NKV=1", "NQ=1"):  # ints equal to 1 turned constexpr by the JIT
                assert any(r["kernel"] == kern and one in r["specialized"].split("; ")[0] for r in mine), (kern, one)


def test_math_fallback_matches_reference():
    """The torch backend's math path (CUDA, where SDPA would fall back to math, e.g. fp64):
    output, LSE and gradients against the float64 reference, at an odd size."""
    from transkd_fast.ops import attention as ops

    q, k, v, _ = _linear_views(2, 19, 7, 2, 16, dtype=torch.float64, requires_grad=False)
    out, lse = ops._math_forward(q, k, v, 0.3)
    assert lse.shape == (2, 2, 19) and out.shape == q.shape and out.is_contiguous()
    do = torch.randn_like(out)
    ref = _ref64(q, k, v, do, scale=0.3)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
    assert_close_rel(lse, torch.logsumexp(s, -1), 1e-12, "lse")
    grads = ops._math_backward(do, q, k, v, out, lse, 0.3)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), ref):
        assert_close_rel(a, b, 1e-12, name)


# ---------------------------------------------------------------------------------------
# The torch backend's CPU inference path (ops._cpu_inference): fp32 blocked oneDNN matmuls,
# bf16 chunked ATen matmuls; taken inside efficient_attention, never by models directly.

_INFER_SIZES = [(Nq, Nkv) for Nq in (1, 7, 257, 1001) for Nkv in (1, 5, 49, 333)]
_INFER_HEADS = [(1, 32), (2, 16), (5, 33), (2, 24)]  # (H, D)


def _onednn_available():
    from transkd_fast.ops import onednn

    return onednn.AVAILABLE


needs_onednn = pytest.mark.skipif(not _onednn_available(), reason="this PyTorch build has no oneDNN pointwise ops")


def _spy_cpu_inference(monkeypatch):
    """Count calls of ops._cpu_inference (efficient_attention looks it up at call time)."""
    from transkd_fast.ops import attention as ops

    calls, real = [], ops._cpu_inference
    monkeypatch.setattr(ops, "_cpu_inference", lambda *a, **kw: calls.append(a[0].dtype) or real(*a, **kw))
    return calls


def _eager_attention(q, k, v, scale):
    """PyTorch's own eager attention in q's dtype (matmul, softmax, matmul) on [B, N, H, D]."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    return (torch.softmax(qt @ kt.transpose(-1, -2) * scale, -1) @ vt).transpose(1, 2)


def _small_fp32_blocks(monkeypatch, rows=16):
    """fp32 blocks of ``rows`` query rows, with no limit on their number (several blocks and a
    partial last one at these sizes, the path still taken with several threads)."""
    from transkd_fast.ops import attention as ops

    monkeypatch.setattr(ops, "_ATTN_BLOCK_ELEMS", 0)
    monkeypatch.setattr(ops, "_ATTN_MIN_ROWS", rows)
    monkeypatch.setattr(ops, "ATTN_MAX_BLOCKS", 1 << 30)
    monkeypatch.setattr(ops, "FP32_BLOCKED", True)  # the path under test, on any CPU


@needs_cpu
@needs_onednn
@pytest.mark.parametrize("H,D", _INFER_HEADS)
@pytest.mark.parametrize("Nq,Nkv", _INFER_SIZES)
def test_cpu_inference_fp32_matches_reference(Nq, Nkv, H, D, monkeypatch):
    """fp32 blocked path through the op, on strided views as MiT passes them (q a view of
    [B, Nq, H·D], k/v slices of [B, Nkv, 2, H, D]): the fp32 reference within 1e-5."""
    _small_fp32_blocks(monkeypatch)
    calls = _spy_cpu_inference(monkeypatch)
    torch.manual_seed(1000 * Nq + 10 * Nkv + H)
    q, k, v, _ = _linear_views(2, Nq, Nkv, H, D, requires_grad=False)
    assert not k.is_contiguous() and not v.is_contiguous()  # slices of the fused kv output
    scale = D ** -0.5
    with torch.no_grad():
        out = efficient_attention(q, k, v, scale)
    assert calls == [torch.float32]
    assert out.dtype == torch.float32 and out.shape == q.shape and out.is_contiguous()
    torch.testing.assert_close(out, efficient_attention_reference(q, k, v, scale), atol=1e-5, rtol=1e-5)


@needs_cpu
@pytest.mark.parametrize("H,D", _INFER_HEADS)
@pytest.mark.parametrize("Nq,Nkv", _INFER_SIZES)
def test_cpu_inference_bf16_matches_reference(Nq, Nkv, H, D, monkeypatch):
    """bf16 chunked path through the op (several chunks of ≥ 64 rows where Nq allows): within 2×
    of PyTorch's own eager bf16 attention's error against the fp64 reference."""
    from transkd_fast.ops import attention as ops

    monkeypatch.setattr(ops, "_BF16_CHUNK_SCORES", 64 * 7)
    monkeypatch.setattr(ops, "BF16_CHUNKED", True)  # the path under test, on any CPU
    calls = _spy_cpu_inference(monkeypatch)
    torch.manual_seed(1000 * Nq + 10 * Nkv + H + 1)
    q, k, v, _ = _linear_views(2, Nq, Nkv, H, D, dtype=torch.bfloat16, requires_grad=False)
    scale = D ** -0.5
    with torch.no_grad():
        out = efficient_attention(q, k, v, scale)
    assert calls == [torch.bfloat16]
    assert out.dtype == torch.bfloat16 and out.shape == q.shape and out.is_contiguous()
    ref = efficient_attention_reference(q.double(), k.double(), v.double(), scale)
    assert_low_precision_ok(out, _eager_attention(q, k, v, scale), ref, "bf16 inference attention")


@needs_cpu
@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nkv", [1, 9, 40])
@pytest.mark.parametrize("what", ["q_row", "scale", "k_row", "v_elem", "q_row_inf"])
def test_cpu_inference_nan_like_the_reference(dtype, nkv, what, monkeypatch):
    """NaN exactly where the reference has it: a row whose scores are all NaN (a NaN query row,
    scale = nan) or all -inf is NaN (softmax of such a row is NaN), in a middle block too. bf16
    takes the path this CPU takes (the chunked one without AMX, else the custom op): on AMX,
    oneDNN's bf16 matmul with an odd inner size reads one element past each row of A against B's
    zero padding, so a NaN in row i+1 also makes row i NaN (P [37, 9] @ V [9, 16]: rows 20 and
    21 for a NaN in row 21), which is why the chunked path is not taken there."""
    from transkd_fast.ops import attention as ops

    _small_fp32_blocks(monkeypatch)
    calls = _spy_cpu_inference(monkeypatch)
    q, k, v, scale = _poisoned(what, nkv, query=21, dtype=dtype)  # query 21: block 2 of 3
    with torch.no_grad():
        out = efficient_attention(q, k, v, scale=scale)
    assert calls == ([dtype] if dtype == torch.float32 or ops.BF16_CHUNKED else [])
    ref = efficient_attention_reference(q, k, v, scale)
    assert ref.isnan().any()
    assert torch.equal(out.isnan(), ref.isnan()), f"NaN at {out.isnan().sum()} places, reference {ref.isnan().sum()}"
    fin = ~ref.isnan()
    if fin.any() and dtype == torch.float32:
        torch.testing.assert_close(out[fin], ref[fin], atol=1e-5, rtol=1e-5)


@needs_cpu
@needs_onednn
def test_cpu_inference_taken_only_without_autograd(monkeypatch):
    """The op takes its CPU inference path exactly where the previous two paths applied: fp32
    with autograd off (no_grad, inference_mode), bf16 without autograd recording; not with
    autograd recording, not for other dtypes, not under the reference backend (global or per
    call), not for fp32 under autocast(bf16) (custom op, as before), not while recording launches."""
    from transkd_fast import use_backend
    from transkd_fast.backend import recording_launches
    from transkd_fast.ops import attention as ops

    monkeypatch.setattr(ops, "FP32_BLOCKED", True)
    monkeypatch.setattr(ops, "BF16_CHUNKED", True)
    calls = _spy_cpu_inference(monkeypatch)
    q, k, v, _ = _linear_views(1, 50, 7, 2, 16, requires_grad=False)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))

    def taken(*args, **kw):
        before = len(calls)
        efficient_attention(*args, **kw)
        return len(calls) > before

    with torch.no_grad():
        assert taken(q, k, v) and taken(qb, kb, vb)
        assert not taken(q.double(), k.double(), v.double())
        assert not taken(q, k, v, backend="reference")
        with use_backend("reference"):
            assert not taken(q, k, v) and not taken(qb, kb, vb)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not taken(q, k, v)
        with recording_launches():
            assert not taken(q, k, v) and not taken(qb, kb, vb)
    with torch.inference_mode():
        assert taken(q, k, v) and taken(qb, kb, vb)
    # autograd on: fp32 needs grad mode off (as the oneDNN path did); bf16 only no input
    # requiring grad (as its chunked path did)
    assert not taken(q, k, v) and taken(qb, kb, vb)
    qg, qbg = q.detach().requires_grad_(), qb.detach().requires_grad_()
    calls.clear()
    for a, b, c in ((qg, k, v), (qbg, kb, vb)):
        out = efficient_attention(a, b, c)
        out.float().sum().backward()
        assert a.grad is not None
    assert calls == []
    torch.testing.assert_close(efficient_attention(qg, k, v), efficient_attention_reference(q, k, v),
                               atol=1e-5, rtol=1e-5)


@needs_cpu
@needs_onednn
def test_cpu_inference_only_where_it_is_the_faster(monkeypatch):
    """fp32 inference takes the blocked path only on AVX-512 CPUs without AMX (FP32_BLOCKED),
    bf16 the chunked path only without AMX (BF16_CHUNKED); elsewhere the custom op (SDPA's
    flash kernel), with the reference's values (fp32 within 1e-5, bf16 within 2× of eager
    bf16 attention's error against fp64)."""
    from transkd_fast.ops import attention as ops

    amx = bool(torch.cpu._is_amx_tile_supported())
    assert ops.CPU_HAS_AMX == amx
    assert ops.FP32_BLOCKED == (torch.backends.cpu.get_cpu_capability() == "AVX512" and not amx)
    assert ops.BF16_CHUNKED == (not amx)
    monkeypatch.setattr(ops, "FP32_BLOCKED", False)
    monkeypatch.setattr(ops, "BF16_CHUNKED", True)
    calls = _spy_cpu_inference(monkeypatch)
    torch.manual_seed(3)
    q, k, v, _ = _linear_views(1, 300, 49, 2, 32, requires_grad=False)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    with torch.inference_mode():
        out = efficient_attention(q, k, v)
        assert calls == []
        efficient_attention(qb, kb, vb)
        assert calls == [torch.bfloat16]
        monkeypatch.setattr(ops, "BF16_CHUNKED", False)
        out_b = efficient_attention(qb, kb, vb)
        assert calls == [torch.bfloat16]  # the custom op this time
    torch.testing.assert_close(out, efficient_attention_reference(q, k, v), atol=1e-5, rtol=1e-5)
    ref = efficient_attention_reference(q.double(), k.double(), v.double())
    assert out_b.dtype == torch.bfloat16 and out_b.is_contiguous()
    assert_low_precision_ok(out_b, _eager_attention(qb, kb, vb, 32 ** -0.5), ref,
                            "bf16 inference attention, custom op")


def test_attention_rows_fill_a_block_per_thread():
    from transkd_fast.ops import attention as ops

    assert ops.attention_rows(512, threads=1) == 512  # 2^18 scores
    assert ops.attention_rows(512, threads=2) == 1024
    assert ops.attention_rows(100000, threads=1) == 256  # never below 256 rows
    assert ops.attention_rows(700, threads=1) == 368  # 374 rounded down to a multiple of 16


@needs_cpu
@needs_onednn
def test_cpu_inference_fp32_up_to_a_bounded_number_of_blocks(monkeypatch):
    """With several threads at most ATTN_MAX_BLOCKS fp32 blocks (batch and heads count), else
    the custom op; with one thread any number; bf16 has no such limit."""
    from transkd_fast.ops import attention as ops

    monkeypatch.setattr(ops, "ATTN_MAX_BLOCKS", 4)
    monkeypatch.setattr(ops, "FP32_BLOCKED", True)
    monkeypatch.setattr(ops, "BF16_CHUNKED", True)
    kv = torch.randn(2, 2048, 2, 3, 32)  # 2048 keys: 256 query rows per block (the minimum)

    def applies(B, N, H, dtype=torch.float32):
        k, v = kv[:B, :, 0, :H].to(dtype), kv[:B, :, 1, :H].to(dtype)
        return ops._cpu_inference_applies("torch", torch.randn(B, N, H, 32).to(dtype), k, v)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            assert applies(1, 1024, 1)  # 4 blocks
            assert not applies(1, 1025, 1)  # 5
            assert not applies(2, 1024, 1)  # 8: batch counts
            assert not applies(1, 1024, 2)  # 8: heads count
            assert applies(2, 4096, 3, torch.bfloat16)
            assert not ops._cpu_inference_applies("triton", *(torch.randn(1, 8, 1, 32),) * 3)
            torch.set_num_threads(1)  # no barriers with one thread: any number of blocks
            assert applies(2, 4096, 3)
        assert not applies(1, 512, 1)  # autograd on
    finally:
        torch.set_num_threads(threads)


@needs_cpu
@needs_onednn
def test_mit_inference_goes_through_the_op_and_matches_reference(monkeypatch):
    """SegFormer-B0 under inference_mode: every block's attention calls efficient_attention
    (the name mit.py imports), which takes its CPU inference path; the output equals the
    reference backend's within 1e-5. With autograd on, the custom op instead."""
    import transkd_fast.models.mit as mit
    from transkd_fast import use_backend
    from transkd_fast.models import build_model
    from transkd_fast.ops import attention as ops

    monkeypatch.setattr(ops, "FP32_BLOCKED", True)
    torch.manual_seed(0)
    model = build_model("segformer_b0", num_classes=3).eval()
    x = torch.randn(1, 3, 64, 96)
    blocks = sum(model.backbone.depths)
    op_calls, real_op = [], mit.efficient_attention
    monkeypatch.setattr(mit, "efficient_attention", lambda *a, **kw: op_calls.append(1) or real_op(*a, **kw))
    calls = _spy_cpu_inference(monkeypatch)
    with torch.inference_mode():
        fast = model(x)
    assert len(op_calls) == blocks and calls == [torch.float32] * blocks
    with torch.inference_mode(), use_backend("reference"):
        ref = model(x)
    assert len(op_calls) == 2 * blocks and len(calls) == blocks  # not under the reference backend
    model(x)  # autograd on: the custom op (it keeps the LSE for backward)
    assert len(op_calls) == 3 * blocks and len(calls) == blocks
    assert_close_rel(fast, ref, 1e-5, "MiT inference vs reference backend")
