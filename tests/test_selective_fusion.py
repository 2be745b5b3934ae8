"""CSF selective fusion ops: selective_pool / selective_fuse (design §2).

Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1). Ground truth is
the eager reference in float64 (after checking that PyTorch's float64 nearest index equals
its fp32 one for the sizes used: they differ at rare ratios).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel, assert_low_precision_ok

from transkd_fast.backend import BackendError
from transkd_fast.compile_check import check_in_subprocess
from transkd_fast.ops import selective_fusion as sf
from transkd_fast.ops.selective_fusion import (
    legacy_nearest_index,
    selective_fuse,
    selective_fuse_reference,
    selective_pool,
    selective_pool_reference,
)

# (B, C, H, W, h, w): the acceptance sizes plus a downsampling ratio.
CASES = [
    (1, 64, 15, 31, 8, 16),
    (3, 64, 15, 31, 8, 16),
    (3, 64, 7, 9, 7, 9),
    (1, 4, 64, 128, 32, 64),
    (1, 64, 16, 32, 8, 16),
    (2, 5, 5, 7, 9, 13),
]


def _interp_index(n_in: int, n_out: int, dtype: torch.dtype) -> np.ndarray:
    """The source index F.interpolate(mode="nearest") uses for ``dtype`` tensors (read off a ramp)."""
    ramp = torch.arange(n_in, dtype=torch.float64).to(dtype).view(1, 1, 1, n_in)
    return F.interpolate(ramp, size=(1, n_out), mode="nearest").view(-1).double().long().numpy()


def _inputs(B, C, H, W, h, w, dtype=torch.float64):
    x = torch.randn(B, C, H, W, dtype=dtype)
    y = torch.randn(B, C, h, w, dtype=dtype)
    a = torch.randn(B, 2, C, dtype=dtype).softmax(dim=1)
    return x, y, a


def _run(fn, tensors, grads):
    """Output and gradients of sum(out · grad) w.r.t. every input."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    torch.autograd.backward(out, grads.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def _check_case(backend, case, dtype=torch.float32):
    B, C, H, W, h, w = case
    for n_in, n_out in ((h, H), (w, W)):
        assert np.array_equal(_interp_index(n_in, n_out, torch.float64), legacy_nearest_index(n_in, n_out))
    x, y, a = _inputs(*case)
    gp, gf = torch.randn(B, C, dtype=torch.float64), torch.randn(B, C, H, W, dtype=torch.float64)
    ref_p, ref_pg = _run(selective_pool_reference, (x, y), gp)
    ref_f, ref_fg = _run(selective_fuse_reference, (x, y, a), gf)
    cast = [t.to(dtype) for t in (x, y, a)]
    out_p, pg = _run(lambda *t: selective_pool(*t, backend=backend), cast[:2], gp)
    out_f, fg = _run(lambda *t: selective_fuse(*t, backend=backend), cast, gf)
    return (out_p, pg, ref_p, ref_pg), (out_f, fg, ref_f, ref_fg)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}C{}_{}x{}_from_{}x{}".format(*c))
def test_fp32_matches_float64_reference(backend, case):
    (out_p, pg, ref_p, ref_pg), (out_f, fg, ref_f, ref_fg) = _check_case(backend, case)
    assert out_p.dtype == torch.float32 and out_f.dtype == torch.float32
    assert_close_rel(out_p, ref_p, 1e-5, "pool")
    assert_close_rel(pg[0], ref_pg[0], 1e-5, "pool dx")
    assert_close_rel(pg[1], ref_pg[1], 1e-5, "pool dy_low")
    assert_close_rel(out_f, ref_f, 1e-5, "fuse")
    for got, ref, what in zip(fg, ref_fg, ("dx", "dy_low", "da")):
        assert_close_rel(got, ref, 1e-5, f"fuse {what}")


@pytest.mark.parametrize("case", [(3, 64, 15, 31, 8, 16), (1, 64, 32, 64, 16, 32)], ids=["odd", "x2"])
def test_fp16_within_twice_torch_error(case):
    # C = 64 planes at least: pool and da have B·C values, and with a handful of values the
    # comparison measures rounding luck, not accuracy.
    B, C, H, W, h, w = case
    x, y, a = _inputs(*case)
    gp, gf = torch.randn(B, C, dtype=torch.float64), torch.randn(B, C, H, W, dtype=torch.float64)
    ref_p, ref_pg = _run(selective_pool_reference, (x, y), gp)
    ref_f, ref_fg = _run(selective_fuse_reference, (x, y, a), gf)
    low = [t.half() for t in (x, y, a)]
    # PyTorch's own error: the eager reference computed in fp16.
    tp, tpg = _run(selective_pool_reference, low[:2], gp)
    tf, tfg = _run(selective_fuse_reference, low, gf)
    op, opg = _run(lambda *t: selective_pool(*t, backend="triton"), low[:2], gp)
    of, ofg = _run(lambda *t: selective_fuse(*t, backend="triton"), low, gf)
    assert op.dtype == torch.float16 and of.dtype == torch.float16 and ofg[2].dtype == torch.float16
    assert_low_precision_ok(op, tp, ref_p, "pool")
    assert_low_precision_ok(of, tf, ref_f, "fuse")
    for got, theirs, ref, what in zip(opg + ofg, tpg + tfg, ref_pg + ref_fg,
                                      ("pool dx", "pool dy", "fuse dx", "fuse dy", "fuse da")):
        assert_low_precision_ok(got, theirs, ref, what)


def test_bf16_storage_path_is_fp32_math_then_one_cast():
    """bf16 in the interpreter: loads widen exactly and the math is fp32, so every kernel output
    must equal the fp32 run on the same (bf16-valued) inputs cast once to bf16. The interpreter
    casts fp32 → bf16 by truncation (the GPU rounds to nearest), so that is the cast compared
    against; a 2×-torch-error test would measure the interpreter's cast, not the kernels."""
    B, C, H, W, h, w = 3, 64, 15, 31, 8, 16
    x, y, a = (t.bfloat16() for t in _inputs(B, C, H, W, h, w))
    gp, gf = torch.randn(B, C).bfloat16(), torch.randn(B, C, H, W).bfloat16()

    def trunc(t32):
        return (t32.contiguous().view(torch.int32) >> 16).to(torch.int16)

    def outputs(dt):
        xs, ys, as_ = (t.to(dt).requires_grad_() for t in (x, y, a))
        p = selective_pool(xs, ys, backend="triton")
        o = selective_fuse(xs, ys, as_, backend="triton")
        p_dy = torch.autograd.grad(p, ys, gp.to(dt))[0]
        dx, dy, da = torch.autograd.grad(o, (xs, ys, as_), gf.to(dt))
        return p, p_dy, o, dx, dy, da

    for got, want, what in zip(outputs(torch.bfloat16), outputs(torch.float32),
                               ("pool", "pool dy", "fuse", "fuse dx", "fuse dy", "fuse da")):
        assert got.dtype == torch.bfloat16, what
        assert torch.equal(got.contiguous().view(torch.int16), trunc(want)), what


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_index_map_bit_exact_for_many_ratios(backend):
    """Forward gathers and backward preimage counts equal PyTorch's fp32 nearest map exactly."""
    pairs = [(8, 15), (16, 31), (7, 7), (32, 64), (21, 133), (42, 138), (45, 129), (9, 5), (13, 7),
             (5, 3), (1, 4), (4, 1), (3, 10), (10, 3), (25, 135), (60, 138)]
    # Long single rows/columns where fp32 rounding moves a preimage boundary down by one
    # (needs i·n_out > 2^23; found by search), up- and downsampling.
    cases = list(zip(pairs[:8], pairs[8:][::-1])) + [((1, 1), (2260, 6849)), ((5839, 5111), (1, 2))]
    a = torch.tensor([[[0.0], [1.0]]])
    for (h, H), (w, W) in cases:
        y = (torch.arange(h, dtype=torch.float32)[:, None] * w + torch.arange(w, dtype=torch.float32)).view(1, 1, h, w)
        x = torch.zeros(1, 1, H, W)
        yl = y.clone().requires_grad_()
        want = F.interpolate(yl, size=(H, W), mode="nearest")
        want.sum().backward()
        counts = yl.grad  # exact small integers
        y2 = y.clone().requires_grad_()
        got = selective_fuse(x, y2, a, backend=backend)
        got.sum().backward()
        assert torch.equal(got, want.detach()), (h, H, w, W)
        assert torch.equal(y2.grad, counts), (h, H, w, W)
        y3 = y.clone().requires_grad_()
        (selective_pool(x, y3, backend=backend) * (H * W)).sum().backward()
        assert torch.allclose(y3.grad, counts, rtol=1e-6, atol=0), (h, H, w, W)


def test_legacy_index_matches_interpolate_fp32_fp16():
    rng = np.random.default_rng(0)
    pairs = [(a, b) for a in range(1, 24) for b in range(1, 48)]
    pairs += [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(60)]
    for n_in, n_out in pairs:
        want = legacy_nearest_index(n_in, n_out)
        assert np.array_equal(_interp_index(n_in, n_out, torch.float32), want), (n_in, n_out)
        if n_in <= 256:  # fp16 ramps are exact up to 2048, bf16 up to 256
            assert np.array_equal(_interp_index(n_in, n_out, torch.float16), want), (n_in, n_out)
            assert np.array_equal(_interp_index(n_in, n_out, torch.bfloat16), want), (n_in, n_out)


def test_strided_inputs_and_layouts():
    B, C, H, W, h, w = 2, 6, 15, 31, 8, 16
    x, y, a = _inputs(B, C, H, W, h, w)
    gf = torch.randn(B, C, H, W, dtype=torch.float64)
    ref_f, ref_fg = _run(selective_fuse_reference, (x, y, a), gf)
    ref_p, ref_pg = _run(selective_pool_reference, (x, y), gf[:, :, 0, 0])
    # x channels_last, y_low a slice of a wider map, a a transposed buffer.
    xs = x.float().contiguous(memory_format=torch.channels_last)
    ybig = torch.zeros(B, C + 1, h, 2 * w, dtype=torch.float32)
    ybig[:, 1:, :, ::2] = y.float()
    ys = ybig[:, 1:, :, ::2]
    a_s = a.float().transpose(1, 2).contiguous().transpose(1, 2)
    assert not ys.is_contiguous() and not a_s.is_contiguous() and not xs.is_contiguous()
    leaves = [t.detach().requires_grad_() for t in (xs, ys, a_s)]
    out = selective_fuse(*leaves, backend="triton")
    assert out.is_contiguous(memory_format=torch.channels_last)
    # A non-contiguous incoming gradient.
    g_nc = gf.float().transpose(2, 3).contiguous().transpose(2, 3)
    out.backward(g_nc)
    assert_close_rel(out, ref_f, 1e-5, "fuse strided")
    for got, ref, what in zip([t.grad for t in leaves], ref_fg, ("dx", "dy", "da")):
        assert_close_rel(got, ref, 1e-5, f"strided {what}")
    xl, yl = xs.detach().requires_grad_(), ys.detach().requires_grad_()
    p = selective_pool(xl, yl, backend="triton")
    p.backward(gf[:, :, 0, 0].float())
    assert_close_rel(p, ref_p, 1e-5, "pool strided")
    assert_close_rel(xl.grad, ref_pg[0], 1e-5, "pool strided dx")
    assert_close_rel(yl.grad, ref_pg[1], 1e-5, "pool strided dy")


def test_kernels_write_every_element_and_gpu_tile_config():
    """Poisoned outputs, one plane per program (the GPU config) and split reductions."""
    from transkd_fast.kernels import selective_fusion as k

    B, C, H, W, h, w = 2, 1, 40, 63, 20, 32  # 3 forward tiles and 2 backward tiles of the GPU config
    x, y, a = (t.float() for t in _inputs(B, C, H, W, h, w))
    g = torch.randn(B, C, H, W)
    sh, sw = sf._scale(h, H), sf._scale(w, W)
    kh, kw = sf._axis_info(h, H)[0], sf._axis_info(w, W)[0]
    xd, yd, ad = (t.double().requires_grad_() for t in (x, y, a))
    ref = selective_fuse_reference(xd, yd, ad)
    ref.backward(g.double())
    ref_pool = selective_pool_reference(x.double(), y.double())
    for bp, split in ((1, 3), (2, 2)):
        out = torch.full_like(x, float("nan"))
        k.fuse_forward(x, y, a, out, sh, sw, bp=bp)
        assert_close_rel(out, ref, 1e-6, f"fuse bp={bp}")
        pool = torch.full((B, C), float("nan"))
        k.pool_forward(x, y, pool, sh, sw, bp=bp, split=split)
        assert_close_rel(pool, ref_pool, 1e-6, f"pool bp={bp} split={split}")
        dx, dy, da = (torch.full_like(t, float("nan")) for t in (x, y, a))
        k.fuse_backward(g, x, y, a, dx, dy, da, sh, sw, kh, kw, bp=bp, split=split)
        for got, want, what in ((dx, xd.grad, "dx"), (dy, yd.grad, "dy"), (da, ad.grad, "da")):
            assert_close_rel(got, want, 1e-6, f"{what} bp={bp} split={split}")
        gp = torch.randn(B, C)
        dyp = torch.full_like(y, float("nan"))
        k.pool_backward(gp, dyp, H, W, sh, sw, bp=bp)
        yp = y.double().requires_grad_()
        selective_pool_reference(x.double(), yp).backward(gp.double())
        assert_close_rel(dyp, yp.grad, 1e-6, f"pool dy bp={bp}")


def test_autocast_style_fp32_weights_with_fp16_maps():
    B, C, H, W, h, w = 2, 8, 15, 31, 8, 16
    x, y, a = _inputs(B, C, H, W, h, w)
    xl, yl, al = x.half().requires_grad_(), y.half().requires_grad_(), a.float().requires_grad_()
    for backend in ("triton", "torch"):
        out = selective_fuse(xl, yl, al, backend=backend)
        assert out.dtype == torch.float16
        out.float().sum().backward()
        assert al.grad.dtype == torch.float32 and xl.grad.dtype == torch.float16
        ad = a.clone().requires_grad_()
        selective_fuse_reference(x, y, ad).sum().backward()
        assert_close_rel(al.grad, ad.grad, 2e-3, f"{backend} da")
        for t in (xl, yl, al):
            t.grad = None


def test_gradcheck_float64():
    x, y, a = (t.requires_grad_() for t in _inputs(2, 3, 5, 7, 3, 4))
    for backend in ("torch", "reference"):
        assert torch.autograd.gradcheck(lambda x, y: selective_pool(x, y, backend=backend), (x, y))
        assert torch.autograd.gradcheck(lambda x, y, a: selective_fuse(x, y, a, backend=backend), (x, y, a))
    # Downsampling and a non-uniform upsampling ratio take the torch backend's general path.
    x2, y2, a2 = (t.requires_grad_() for t in _inputs(1, 2, 4, 5, 7, 3))
    assert torch.autograd.gradcheck(lambda x, y, a: selective_fuse(x, y, a, backend="torch"), (x2, y2, a2))
    assert torch.autograd.gradcheck(lambda x, y: selective_pool(x, y, backend="torch"), (x2, y2))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    dtype = torch.float64 if backend == "torch" else torch.float32
    x, y, a = (t.to(dtype).requires_grad_() for t in _inputs(2, 3, 7, 9, 4, 5))
    torch.library.opcheck(sf._pool_op, (x, y, backend))
    torch.library.opcheck(sf._fuse_op, (x, y, a, backend))
    g = torch.randn(2, 3, 7, 9, dtype=dtype)
    torch.library.opcheck(sf._fuse_backward_op, (g, x.detach(), y.detach(), a.detach(), backend))
    torch.library.opcheck(sf._pool_backward_op, (torch.randn(2, 3, dtype=dtype), 7, 9, 4, 5, backend))
    # channels_last x and an integer ratio: real outputs keep the layout the fake impls promise.
    xc = torch.randn(2, 3, 8, 10, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(sf._fuse_op, (xc, y, a, backend))
    gc = torch.randn(2, 3, 8, 10, dtype=dtype)
    torch.library.opcheck(sf._fuse_backward_op, (gc, xc.detach(), y.detach(), a.detach(), backend))


def test_bad_inputs_have_clear_errors():
    x, y, a = (t.float() for t in _inputs(2, 4, 8, 8, 4, 4))
    with pytest.raises(ValueError, match=r"y_low shape \(2, 3, 4, 4\) does not match x .*batch and channels"):
        selective_pool(x, y[:, :3])
    with pytest.raises(ValueError, match=r"y_low shape \(1, 4, 4, 4\) does not match x"):
        selective_fuse(x, y[:1], a)
    with pytest.raises(ValueError, match=r"a must have shape \[B, 2, C\] = \[2, 2, 4\].*got \(2, 3, 4\)"):
        selective_fuse(x, y, torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match=r"a must have 3 dimensions"):
        selective_fuse(x, y, torch.rand(2, 8))
    with pytest.raises(TypeError, match=r"x must be a floating tensor, got torch.int64"):
        selective_pool(x.long(), y)
    with pytest.raises(TypeError, match=r"a must be a floating tensor, got torch.int32"):
        selective_fuse(x, y, a.int())
    with pytest.raises(TypeError, match=r"x and y_low must share a dtype"):
        selective_fuse(x, y.double(), a)
    with pytest.raises(ValueError, match=r"x must have 4 dimensions"):
        selective_pool(x[0], y)
    with pytest.raises(BackendError, match=r"selective_fuse: backend 'triton' refused .*float64 is not supported"):
        selective_fuse(x.double(), y.double(), a.double(), backend="triton")
    big = torch.empty(1, 1, 2, 9000).expand(1, 1, 2, 9000)
    with pytest.raises(BackendError, match=r"selective_pool: backend 'triton' refused .*sides above 8192"):
        selective_pool(big, big[..., :10], backend="triton")


def test_auto_backend_on_cpu_is_torch_custom_op():
    x, y, a = (t.float() for t in _inputs(1, 2, 4, 4, 2, 2))
    out = selective_fuse(x, y, a)
    assert torch.allclose(out, selective_fuse_reference(x, y, a), atol=1e-6)
    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda x, y, a: selective_fuse(x, y, a))(x, y, a)
    assert "transkd_fast.selective_fuse" in gm.code


def test_compile_check_sm80_sm90_no_spills():
    rows = check_in_subprocess(("selective_fusion",))
    assert rows, "no compile specs"
    labels = {r["label"] for r in rows}
    for dt in ("fp16", "bf16", "fp32"):
        for kind in ("pool fwd", "pool bwd", "fuse fwd", "fuse bwd", "rowsum"):
            assert any(lbl.startswith(f"{kind} {dt}") for lbl in labels), (kind, dt)
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    for r in rows:
        assert "error" not in r, r
        assert r["spill_bytes"] == 0, r
