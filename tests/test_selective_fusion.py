"""CSF selective fusion ops: selective_pool / selective_fuse (design §2).

Tensors live on ``helpers.DEVICE``: the CPU by default, where the Triton kernels run in the
interpreter (conftest sets TRITON_INTERPRET=1), or the GPU in CUDA test mode
(``TRANSKD_TEST_DEVICE=cuda``), where the same assertions check the compiled kernels. Ground
truth is the eager reference in float64 (after checking that PyTorch's float64 nearest index
equals its fp32 one for the sizes used: on CPU they differ at rare ratios).

Both memory formats are covered: CSF gets channels_last maps from the models, and the kernels
tile along whichever axis is contiguous; gradients must come back in their input's layout.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, ON_CUDA, assert_close_rel, assert_low_precision_ok, needs_interpreter

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

CL = torch.channels_last
LAYOUTS = ["contiguous", "channels_last"]

# (B, C, H, W, h, w): the acceptance sizes (13×27 from 7×14, 1×1, 1×5, batch 1), CSF's 2× ratio,
# an odd channel count with a downsampling ratio, and a C > 64 map (two channel blocks).
CASES = [
    (1, 64, 13, 27, 7, 14),
    (2, 64, 1, 1, 1, 1),
    (1, 64, 1, 5, 1, 3),
    (3, 64, 15, 31, 8, 16),
    (2, 64, 16, 32, 8, 16),
    (2, 5, 5, 7, 9, 13),
    (1, 80, 6, 10, 3, 5),
]


def _case_id(c):
    return "B{}C{}_{}x{}_from_{}x{}".format(*c)


def _fmt(t, layout):
    return t.contiguous(memory_format=CL) if layout == "channels_last" else t.contiguous()


def _is_layout(t, layout):
    return t.is_contiguous(memory_format=CL) if layout == "channels_last" else t.is_contiguous()


def _interp_index(n_in: int, n_out: int, dtype: torch.dtype) -> np.ndarray:
    """The source index F.interpolate(mode="nearest") uses for ``dtype`` tensors (read off a ramp)."""
    ramp = torch.arange(n_in, dtype=torch.float64, device=DEVICE).to(dtype).view(1, 1, 1, n_in)
    return F.interpolate(ramp, size=(1, n_out), mode="nearest").view(-1).double().long().cpu().numpy()


def _inputs(B, C, H, W, h, w, dtype=torch.float64):
    x = torch.randn(B, C, H, W, dtype=dtype, device=DEVICE)
    y = torch.randn(B, C, h, w, dtype=dtype, device=DEVICE)
    a = torch.randn(B, 2, C, dtype=dtype, device=DEVICE).softmax(dim=1)
    return x, y, a


def _run(fn, tensors, grads):
    """Output and gradients of sum(out · grad) w.r.t. every input."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    torch.autograd.backward(out, grads.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def _refs(case):
    B, C, H, W, h, w = case
    x, y, a = _inputs(*case)
    gp = torch.randn(B, C, dtype=torch.float64, device=DEVICE)
    gf = torch.randn(B, C, H, W, dtype=torch.float64, device=DEVICE)
    return (x, y, a, gp, gf), _run(selective_pool_reference, (x, y), gp), _run(selective_fuse_reference, (x, y, a), gf)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fp32_matches_float64_reference(backend, case, layout):
    B, C, H, W, h, w = case
    for n_in, n_out in ((h, H), (w, W)):
        assert np.array_equal(_interp_index(n_in, n_out, torch.float64), legacy_nearest_index(n_in, n_out))
    (x, y, a, gp, gf), (ref_p, ref_pg), (ref_f, ref_fg) = _refs(case)
    xs, ys = _fmt(x.float(), layout), _fmt(y.float(), layout)
    out_p, pg = _run(lambda *t: selective_pool(*t, backend=backend), (xs, ys), gp)
    out_f, fg = _run(lambda *t: selective_fuse(*t, backend=backend), (xs, ys, a.float()), gf)
    assert out_p.dtype == torch.float32 and out_f.dtype == torch.float32
    assert _is_layout(out_f, layout)
    assert_close_rel(out_p, ref_p, 1e-5, "pool")
    assert_close_rel(pg[0], ref_pg[0], 1e-5, "pool dx")
    assert_close_rel(pg[1], ref_pg[1], 1e-5, "pool dy_low")
    assert_close_rel(out_f, ref_f, 1e-5, "fuse")
    for got, ref, what in zip(fg, ref_fg, ("dx", "dy_low", "da")):
        assert_close_rel(got, ref, 1e-5, f"fuse {what}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", [(1, 64, 13, 27, 7, 14), (2, 64, 1, 5, 1, 3), (2, 5, 5, 7, 9, 13)], ids=_case_id)
def test_gradients_come_back_in_the_input_layout(backend, case, layout):
    """The backward ops return dx and dy_low in x's and y_low's layout (the model's maps are
    channels_last), and torch.autograd.grad hands them on as they are."""
    B, C, H, W, h, w = case
    x, y, a = (t.float() for t in _inputs(*case))
    x, y = _fmt(x, layout), _fmt(y, layout)
    g = _fmt(torch.randn(B, C, H, W, device=DEVICE), layout)
    dx, dy, da = sf._fuse_backward_op(g, x, y, a, backend)
    assert _is_layout(dx, layout) and _is_layout(dy, layout), (dx.stride(), dy.stride())
    assert da.shape == a.shape and da.is_contiguous()
    pdx, pdy = sf._pool_backward_op(torch.randn(B, C, device=DEVICE), H, W, h, w, sf._channels_last(y), backend)
    assert _is_layout(pdy, layout), pdy.stride()
    # the mean's gradient: a broadcast view, never written out
    assert all(st == 0 for st, n in zip(pdx.stride()[2:], pdx.shape[2:]) if n > 1), pdx.stride()
    xl, yl, al = (t.detach().requires_grad_() for t in (x, y, a))
    out = selective_fuse(xl, yl, al, backend=backend) + selective_pool(xl, yl, backend=backend)[:, :, None, None]
    gx, gy = torch.autograd.grad(out, (xl, yl), g)
    assert _is_layout(gx, layout) and _is_layout(gy, layout), (gx.stride(), gy.stride())


def _low_precision_case(case, dtype, layout):
    (x, y, a, gp, gf), (ref_p, ref_pg), (ref_f, ref_fg) = _refs(case)
    low = [_fmt(x.to(dtype), layout), _fmt(y.to(dtype), layout), a.to(dtype)]
    # PyTorch's own error: the eager reference computed in the same dtype.
    tp, tpg = _run(selective_pool_reference, low[:2], gp)
    tf, tfg = _run(selective_fuse_reference, low, gf)
    op, opg = _run(lambda *t: selective_pool(*t, backend="triton"), low[:2], gp)
    of, ofg = _run(lambda *t: selective_fuse(*t, backend="triton"), low, gf)
    assert op.dtype == dtype and of.dtype == dtype and ofg[2].dtype == dtype
    assert_low_precision_ok(op, tp, ref_p, "pool")
    assert_low_precision_ok(of, tf, ref_f, "fuse")
    for got, theirs, ref, what in zip(opg + ofg, tpg + tfg, ref_pg + ref_fg,
                                      ("pool dx", "pool dy", "fuse dx", "fuse dy", "fuse da")):
        assert_low_precision_ok(got, theirs, ref, what)


# C = 64 planes at least: pool and da have B·C values, and with a handful of values the
# comparison measures rounding luck, not accuracy.
LOW_CASES = [(3, 64, 15, 31, 8, 16), (1, 64, 32, 64, 16, 32), (1, 64, 13, 27, 7, 14)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", LOW_CASES, ids=_case_id)
def test_fp16_within_twice_torch_error(case, layout):
    _low_precision_case(case, torch.float16, layout)


@pytest.mark.skipif(not ON_CUDA, reason="the interpreter casts fp32 → bf16 by truncation (the GPU rounds); "
                                        "see test_bf16_storage_path_is_fp32_math_then_one_cast")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", LOW_CASES, ids=_case_id)
def test_bf16_within_twice_torch_error(case, layout):
    _low_precision_case(case, torch.bfloat16, layout)


@needs_interpreter
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_storage_path_is_fp32_math_then_one_cast(layout):
    """bf16 in the interpreter: loads widen exactly and the math is fp32, so every kernel output
    must equal the fp32 run on the same (bf16-valued) inputs cast once to bf16. The interpreter
    casts fp32 → bf16 by truncation (the GPU rounds to nearest), so that is the cast compared
    against; a 2×-torch-error test would measure the interpreter's cast, not the kernels (the
    CUDA test mode runs test_bf16_within_twice_torch_error instead)."""
    B, C, H, W, h, w = 3, 64, 15, 31, 8, 16
    x, y, a = (t.bfloat16() for t in _inputs(B, C, H, W, h, w))
    x, y = _fmt(x, layout), _fmt(y, layout)
    gp, gf = torch.randn(B, C).bfloat16(), _fmt(torch.randn(B, C, H, W).bfloat16(), layout)

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


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_index_map_bit_exact_for_many_ratios(backend, layout):
    """Forward gathers and backward preimage counts equal PyTorch's fp32 nearest map exactly."""
    pairs = [(8, 15), (16, 31), (7, 7), (32, 64), (21, 133), (42, 138), (45, 129), (9, 5), (13, 7),
             (5, 3), (1, 4), (4, 1), (3, 10), (10, 3), (25, 135), (60, 138)]
    # Long single rows/columns where fp32 rounding moves a preimage boundary down by one
    # (needs i·n_out > 2^23; found by search), up- and downsampling.
    cases = list(zip(pairs[:8], pairs[8:][::-1])) + [((1, 1), (2260, 6849)), ((5839, 5111), (1, 2))]
    C = 2  # two channels so that the channels_last layout is a real one
    a = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]], device=DEVICE)
    for (h, H), (w, W) in cases:
        ramp = torch.arange(h, dtype=torch.float32, device=DEVICE)[:, None] * w + torch.arange(w, device=DEVICE)
        y = _fmt(torch.stack([ramp, -ramp])[None], layout)
        x = _fmt(torch.zeros(1, C, H, W, device=DEVICE), layout)
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


def test_strided_inputs_and_mixed_layouts():
    B, C, H, W, h, w = 2, 6, 15, 31, 8, 16
    x, y, a = _inputs(B, C, H, W, h, w)
    gf = torch.randn(B, C, H, W, dtype=torch.float64, device=DEVICE)
    ref_f, ref_fg = _run(selective_fuse_reference, (x, y, a), gf)
    ref_p, ref_pg = _run(selective_pool_reference, (x, y), gf[:, :, 0, 0])
    # x channels_last, y_low a slice of a wider map, a a transposed buffer.
    xs = _fmt(x.float(), "channels_last")
    ybig = torch.zeros(B, C + 1, h, 2 * w, dtype=torch.float32, device=DEVICE)
    ybig[:, 1:, :, ::2] = y.float()
    ys = ybig[:, 1:, :, ::2]
    a_s = a.float().transpose(1, 2).contiguous().transpose(1, 2)
    assert not ys.is_contiguous() and not a_s.is_contiguous() and not xs.is_contiguous()
    leaves = [t.detach().requires_grad_() for t in (xs, ys, a_s)]
    out = selective_fuse(*leaves, backend="triton")
    assert out.is_contiguous(memory_format=CL)
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
    # contiguous x with a channels_last y_low and gradient, and the other way round
    for lx, ly in (("contiguous", "channels_last"), ("channels_last", "contiguous")):
        leaves = [_fmt(x.float(), lx).requires_grad_(), _fmt(y.float(), ly).requires_grad_(),
                  a.float().requires_grad_()]
        out = selective_fuse(*leaves, backend="triton")
        out.backward(_fmt(gf.float(), ly))
        assert_close_rel(out, ref_f, 1e-5, f"fuse x {lx} y {ly}")
        for got, ref, what in zip([t.grad for t in leaves], ref_fg, ("dx", "dy", "da")):
            assert_close_rel(got, ref, 1e-5, f"x {lx} y {ly} {what}")


@pytest.mark.parametrize("shape,layout", [
    ((2, 1, 40, 63, 20, 32), "contiguous"), ((2, 3, 40, 63, 20, 32), "channels_last"),
    ((1, 80, 13, 27, 7, 14), "channels_last"), ((1, 64, 1, 1, 1, 1), "contiguous"),
], ids=lambda v: v if isinstance(v, str) else _case_id(v))
def test_kernels_write_every_element_with_gpu_tiles(shape, layout):
    """Poisoned outputs, the GPU tiles (one plane per program / 64 channels × 16 pixels) and split
    reductions: 40×63 is 3 forward and 2 backward plane tiles, C = 80 two channel blocks (one of
    16 of 64 channels: masked). (Test time: plane tiles run C programs, so C stays small there.)"""
    from transkd_fast.kernels import selective_fusion as k

    B, C, H, W, h, w = shape
    x, y, a = (t.float() for t in _inputs(*shape))
    x, y = _fmt(x, layout), _fmt(y, layout)
    g = _fmt(torch.randn(B, C, H, W, device=DEVICE), layout)
    sh, sw = sf._scale(h, H), sf._scale(w, W)
    kh, kw = sf._axis_info(h, H)[0], sf._axis_info(w, W)[0]
    xd, yd, ad = (t.double().requires_grad_() for t in (x, y, a))
    ref = selective_fuse_reference(xd, yd, ad)
    ref.backward(g.double())
    ref_pool = selective_pool_reference(x.double(), y.double())
    gp = torch.randn(B, C, device=DEVICE)
    yp = y.double().requires_grad_()
    selective_pool_reference(x.double(), yp).backward(gp.double())

    def poisoned(t):
        return torch.full_like(t, float("nan"))  # keeps t's layout

    for split in (1, 2, 3):
        out = poisoned(x)
        k.fuse_forward(x, y, a, out, sh, sw, gpu_tile=True)
        assert_close_rel(out, ref, 1e-6, "fuse")
        pool = torch.full((B, C), float("nan"), device=DEVICE)
        k.pool_forward(x, y, pool, sh, sw, split=split, gpu_tile=True)
        assert_close_rel(pool, ref_pool, 1e-6, f"pool split={split}")
        dx, dy, da = poisoned(x), poisoned(y), poisoned(a)
        k.fuse_backward(g, x, y, a, dx, dy, da, sh, sw, kh, kw, split=split, gpu_tile=True)
        for got, want, what in ((dx, xd.grad, "dx"), (dy, yd.grad, "dy"), (da, ad.grad, "da")):
            assert_close_rel(got, want, 1e-6, f"{what} split={split}")
        dyp = poisoned(y)
        k.pool_backward(gp, dyp, H, W, sh, sw, gpu_tile=True)
        assert_close_rel(dyp, yp.grad, 1e-6, "pool dy")


NAN_CASES = [(2, 4, 13, 27, 7, 14), (1, 3, 5, 7, 9, 13), (2, 4, 6, 8, 3, 4)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("case", NAN_CASES, ids=_case_id)
def test_nan_propagates_exactly_like_the_reference(backend, case, layout):
    """One NaN in x, in y_low (at a copied and, downsampling, at an uncopied source pixel), in a,
    or in the incoming gradient: outputs and gradients are NaN exactly where the reference's are."""
    B, C, H, W, h, w = case
    src_r, src_c = sf.legacy_nearest_index(h, H), sf.legacy_nearest_index(w, W)
    unused = [(i, j) for i in range(h) for j in range(w) if i not in src_r or j not in src_c]
    poisons = [("x", (1 % B, 2, H // 2, W - 1)), ("y", (0, 1, int(src_r[-1]), int(src_c[0]))),
               ("a", (B - 1, 1, C - 1)), ("gf", (0, C - 1, H - 1, 1)), ("gp", (B - 1, 0))]
    if unused:
        poisons.append(("y", (B - 1, 0, *unused[len(unused) // 2])))
    for name, idx in poisons:
        (x, y, a, gp, gf), _, _ = _refs(case)
        t = {"x": x, "y": y, "a": a, "gf": gf, "gp": gp}
        t[name][idx] = float("nan")
        x, y, a, gp, gf = (v.float() for v in (x, y, a, gp, gf))
        x, y, gf = _fmt(x, layout), _fmt(y, layout), _fmt(gf, layout)
        want_p, want_pg = _run(selective_pool_reference, (x, y), gp)
        want_f, want_fg = _run(selective_fuse_reference, (x, y, a), gf)
        got_p, got_pg = _run(lambda *v: selective_pool(*v, backend=backend), (x, y), gp)
        got_f, got_fg = _run(lambda *v: selective_fuse(*v, backend=backend), (x, y, a), gf)
        for got, want, what in zip([got_p, *got_pg, got_f, *got_fg], [want_p, *want_pg, want_f, *want_fg],
                                   ("pool", "pool dx", "pool dy", "fuse", "fuse dx", "fuse dy", "fuse da")):
            assert torch.equal(torch.isnan(got), torch.isnan(want)), (name, idx, what)
        # not vacuous: the poison reaches something unless it sits on a source pixel nobody copies
        reached = any(torch.isnan(t).any() for t in (want_p, *want_pg, want_f, *want_fg))
        assert reached == (not (name == "y" and tuple(idx[2:]) in unused)), (name, idx)


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
    xc, yc = (_fmt(t.detach(), "channels_last").requires_grad_() for t in (x2, y2))
    assert torch.autograd.gradcheck(lambda x, y, a: selective_fuse(x, y, a, backend="torch"), (xc, yc, a2))


def _opcheck_all(backend, case, layout, dtype):
    B, C, H, W, h, w = case
    x, y, a = (t.to(dtype) for t in _inputs(*case))
    x, y = (_fmt(t, layout).requires_grad_() for t in (x, y))
    a.requires_grad_()
    torch.library.opcheck(sf._pool_op, (x, y, backend))
    torch.library.opcheck(sf._fuse_op, (x, y, a, backend))
    g = _fmt(torch.randn(B, C, H, W, dtype=dtype, device=DEVICE), layout)
    torch.library.opcheck(sf._fuse_backward_op, (g, x.detach(), y.detach(), a.detach(), backend))
    torch.library.opcheck(sf._pool_backward_op, (torch.randn(B, C, dtype=dtype, device=DEVICE), H, W, h, w,
                                                 sf._channels_last(y), backend))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", [(1, 64, 13, 27, 7, 14), (2, 3, 1, 1, 1, 1), (1, 4, 1, 5, 1, 3),
                                  (2, 3, 5, 7, 9, 13), (2, 3, 8, 10, 4, 5)], ids=_case_id)
def test_opcheck_torch_backend(case, layout):
    _opcheck_all("torch", case, layout, torch.float64)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_triton_backend(layout):
    _opcheck_all("triton", (1, 4, 13, 27, 7, 14), layout, torch.float32)


def test_bad_inputs_have_clear_errors():
    x, y, a = (t.float() for t in _inputs(2, 4, 8, 8, 4, 4))
    with pytest.raises(ValueError, match=r"y_low shape \(2, 3, 4, 4\) does not match x .*batch and channels"):
        selective_pool(x, y[:, :3])
    with pytest.raises(ValueError, match=r"y_low shape \(1, 4, 4, 4\) does not match x"):
        selective_fuse(x, y[:1], a)
    with pytest.raises(ValueError, match=r"a must have shape \[B, 2, C\] = \[2, 2, 4\].*got \(2, 3, 4\)"):
        selective_fuse(x, y, torch.rand(2, 3, 4, device=DEVICE))
    with pytest.raises(ValueError, match=r"a must have 3 dimensions"):
        selective_fuse(x, y, torch.rand(2, 8, device=DEVICE))
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
    big = torch.empty(1, 1, 2, 9000, device=DEVICE).expand(1, 1, 2, 9000)
    with pytest.raises(BackendError, match=r"selective_pool: backend 'triton' refused .*sides above 8192"):
        selective_pool(big, big[..., :10], backend="triton")


def test_auto_backend_is_a_custom_op():
    x, y, a = (t.float() for t in _inputs(1, 2, 4, 4, 2, 2))
    out = selective_fuse(x, y, a)
    assert torch.allclose(out, selective_fuse_reference(x, y, a), atol=1e-6)
    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda x, y, a: selective_fuse(x, y, a))(x, y, a)
    assert "transkd_fast.selective_fuse" in gm.code


def _launch_layout(case: str) -> str:
    """The layout of a recorded launch: odd calls are recorded in one layout and also replayed
    contiguous (the case label ends with the replay's layout)."""
    if case.endswith(" contiguous") or " odd contiguous " in case:
        return "contiguous"
    return "channels_last"


def _widest(rows, kernel, dtype, layout, kind, size=""):
    bits = [int(b) for r in rows if r["kernel"] == kernel and r["config"].startswith(dtype)
            and any(_launch_layout(c) == layout and size in c for c in r["cases"]) for b in r["access_bits"][kind]]
    return max(bits, default=0)


def test_compile_check_recorded_launches_sm80_sm90():
    """Every launch of the odd suite (13×27 from 7×14, 1×1, 1×5, batch 1, both layouts, three
    dtypes) binds as a real launch does and compiles for sm_80 and sm_90 without spills; the
    value-1 specializations were really exercised; channels_last launches get the widest global
    accesses that contiguous ones get (128-bit), even at 13×27."""
    rows = check_in_subprocess(("selective_fusion",), suites=("odd",))
    kernels = {"_selective_pool_fwd_kernel", "_selective_pool_bwd_kernel", "_selective_fuse_fwd_kernel",
               "_selective_fuse_bwd_kernel", "_rowsum_kernel"}
    assert kernels <= {r["kernel"] for r in rows}, {r["kernel"] for r in rows}
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    bad = [r for r in rows if "error" in r or r.get("spill_bytes", 0) > 0]
    assert not bad, bad[:3]
    ones = set()
    for r in rows:
        for part in r["specialized"].split("; "):
            if part.startswith("const "):
                ones |= {kv.split("=")[0] for kv in part[len("const "):].split(",")}
    for name in ("H", "W", "h", "w", "KH", "KW", "n_split", "tiles_per_split", "S", "sxc", "sxw", "n_cb"):
        assert name in ones, (name, sorted(ones))
    for kernel in kernels - {"_rowsum_kernel"}:
        for dtype in ("fp32", "fp16", "bf16"):
            for kind in ("ld", "st"):
                cl = _widest(rows, kernel, dtype, "channels_last", kind)
                cont = _widest(rows, kernel, dtype, "contiguous", kind)
                assert cl >= cont, (kernel, dtype, kind, cl, cont)
            kind = "ld" if "fwd" in kernel else "st"
            assert _widest(rows, kernel, dtype, "channels_last", kind, "13x27") == 128, (kernel, dtype, kind)
