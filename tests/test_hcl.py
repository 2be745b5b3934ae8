"""HCL loss: every backend against a float64 reference written straight from design §2.

The float64 reference below pools with explicit bins (start = ⌊i·H/l⌋, end = ⌈(i+1)·H/l⌉)
rather than F.adaptive_avg_pool2d, so it checks the original's pooling too. Tensors live on
``helpers.DEVICE``: the CPU by default, where Triton runs in its interpreter (conftest sets
TRITON_INTERPRET=1) and picks tiles covering whole planes / rows (a test-speed choice; the GPU
tile shapes run here too, monkeypatched, and the compile check builds them), or the GPU in CUDA
test mode (``TRANSKD_TEST_DEVICE=cuda``), where the compiled kernels run with the same assertions.

Both memory layouts are covered forward and backward: contiguous NCHW (the plane kernels, W
innermost) and channels_last (what the MiT stages and CSF hand to HCL: the channel-tiled
kernels, C innermost), and the triton backend's gradients keep each input's layout.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, assert_close_rel, assert_low_precision_ok, needs_cpu, needs_interpreter, rel_err

from transkd_fast.backend import BackendError
from transkd_fast.ops.hcl import hcl_loss, hcl_loss_reference

BACKENDS = ("reference", "torch", "triton")
LAYOUTS = ("contiguous", "channels_last")
# The odd maps of the brief: overlapping adaptive-pool bins (13×27, 5×9), H = 1 (no pooled level),
# 1×1 and 1×7, H ≤ 4 (l = 4 skipped: 3×5); batch 1 and 2; channel counts that are no power of two.
ODD = [(2, 3, 13, 27), (1, 4, 1, 1), (2, 3, 1, 7), (1, 5, 3, 5), (2, 3, 5, 9)]


def _fmt(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def _pool64(x: torch.Tensor, lv: int) -> torch.Tensor:
    """Adaptive average pooling to lv×lv with explicit (possibly overlapping) bins."""
    H, W = x.shape[-2:]
    rows = []
    for i in range(lv):
        hs, he = (i * H) // lv, -((-(i + 1) * H) // lv)
        cols = []
        for j in range(lv):
            ws, we = (j * W) // lv, -((-(j + 1) * W) // lv)
            cols.append(x[..., hs:he, ws:we].mean(dim=(-2, -1)))
        rows.append(torch.stack(cols, -1))
    return torch.stack(rows, -2)


def hcl64(student, teacher) -> torch.Tensor:
    """Design §2 in float64: per stage, tot and cnt restart; stage losses are summed."""
    total = 0.0
    for fs, ft in zip(student, teacher):
        fs, ft = fs.double(), ft.double()
        H = fs.shape[2]
        loss = (fs - ft).pow(2).mean()
        cnt, tot = 1.0, 1.0
        for lv in (4, 2, 1):
            if lv >= H:
                continue
            cnt /= 2
            loss = loss + (_pool64(fs, lv) - _pool64(ft, lv)).pow(2).mean() * cnt
            tot += cnt
        total = total + loss / tot
    return total


def original_hcl(student, teacher):
    """The original TransKD ops run in the inputs' dtype: PyTorch's own error at that dtype."""
    total = 0.0
    for fs, ft in zip(student, teacher):
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft)
        cnt, tot = 1.0, 1.0
        for lv in (4, 2, 1):
            if lv >= h:
                continue
            cnt /= 2.0
            loss = loss + F.mse_loss(F.adaptive_avg_pool2d(fs, (lv, lv)), F.adaptive_avg_pool2d(ft, (lv, lv))) * cnt
            tot += cnt
        total = total + loss / tot
    return total


def _pairs(shapes, dtype=torch.float32, ft_grad=False, layout="contiguous"):
    """Fresh random student / teacher maps on DEVICE in ``layout`` (never zeros)."""
    fmt = _fmt(layout)
    fs = [torch.randn(s, device=DEVICE).to(dtype).contiguous(memory_format=fmt).requires_grad_() for s in shapes]
    ft = [(0.5 * torch.randn(s, device=DEVICE) + 0.3).to(dtype).contiguous(memory_format=fmt).requires_grad_(ft_grad)
          for s in shapes]
    return fs, ft


def _ref_with_grads(fn, tensors, *args):
    """fn on float64 leaf copies (so the reference gradients are float64 too)."""
    copies = [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    n = len(tensors) // 2
    ref = fn(copies[:n], copies[n:], *args)
    return ref, torch.autograd.grad(ref, [c for c in copies if c.requires_grad])


def _assert_grad_layout(backend, grads, leaves):
    """The triton backend hands every gradient back in its input's layout (dense inputs: the
    very strides; strided views: the view's memory format)."""
    if backend != "triton":
        return
    for i, (g, t) in enumerate(zip(grads, leaves)):
        want = torch.empty_like(t).stride()
        assert g.stride() == want, (i, tuple(t.shape), t.stride(), g.stride())


def _check(shapes, backend, ft_grad=True, make=None, dtype=torch.float32, layout="contiguous", tol=1e-5):
    fs, ft = _pairs(shapes, dtype=dtype, ft_grad=ft_grad, layout=layout)
    if make is not None:
        fs, ft = make(fs, ft)
    ref, ref_grads = _ref_with_grads(hcl64, fs + ft)
    leaves = [t for t in fs + ft if t.requires_grad]
    out = hcl_loss(fs, ft, backend=backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == acc and out.dim() == 0 and out.device == fs[0].device
    assert_close_rel(out, ref, tol, f"{backend} loss {shapes}")
    grads = torch.autograd.grad(out, leaves)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == dtype
        assert_close_rel(g, r, tol, f"{backend} grad {i} {shapes}")
    _assert_grad_layout(backend, grads, leaves)


SMALL = [(2, 3, 4, 8), (2, 3, 3, 5), (2, 3, 13, 27), (1, 2, 2, 3), (1, 2, 1, 6), (1, 2, 9, 1), (2, 3, 8, 12)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_stages_fp32(backend):
    # 4×8 and 3×5 skip l = 4 (H ≤ 4); 13×27 has overlapping bins; 2×3 keeps only l = 1;
    # 1×6 keeps no level; 9×1 pools a single column into 4 overlapping bins; 8×12 takes the torch
    # backend's grid path (H, W divisible by 4).
    _check(SMALL, backend)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=("fp32", "fp64"))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_sizes_both_layouts(backend, layout, dtype):
    # Forward and backward of every odd map at once, each layout; fp64 computes in fp64.
    _check(ODD, backend, layout=layout, dtype=dtype, tol=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_wide_map_several_tiles(backend):
    # More than one interpreter tile (2×2048 per tile for W = 1100): planes split into row groups,
    # partial bin sums combined by the second launch; bins across tiles.
    _check([(1, 2, 5, 1100)], backend, ft_grad=False)


def test_gpu_tiles_in_interpreter(monkeypatch):
    # The GPU tile shapes and grid splits (run by the interpreter on CPU; on CUDA they are the
    # real ones). Planes: column chunks (W = 300 > 128), row groups + combine, the narrow tile.
    # Channels innermost: 40 channels = two full blocks of 16 and a partial one, 32-pixel column
    # tiles, a forward split into row groups (combine) and a backward split into row × column
    # bands (the grids below are the interpreter's: 2 SMs assumed for CPU tensors).
    from transkd_fast.kernels import hcl as kernels

    monkeypatch.setattr(kernels, "_interpreting", lambda: False)
    assert kernels._tile(13, 300) == (4, 128) and kernels._tile(16, 32) == (8, 32)
    assert kernels._cl_tile(40, 30) == (32, 16) and kernels._cl_tile(5, 9) == (64, 8)
    assert kernels._row_groups(1, 2, 13, 4, 16) == (4, 1)
    assert kernels._cl_groups(3, 30, 40, 32, 16, kernels.CL_MIN_GROUP_PIXELS) == (4, 8, 1, 2)
    assert kernels._cl_groups(3, 30, 40, 32, 32) == (10, 3, 2, 1)
    _check([(1, 2, 13, 300), (1, 2, 16, 32), (1, 1, 32, 64), (1, 2, 3, 5)], "triton", ft_grad=True)
    _check([(1, 40, 30, 40), (1, 5, 5, 9)], "triton", ft_grad=True, layout="channels_last")


def test_channels_last_forward_split_and_combine(monkeypatch):
    # The channel-tiled forward split into row and column groups (partial sums combined), with
    # the interpreter's wide tiles: groups are forced by lowering the pixels per group.
    from transkd_fast.kernels import hcl as kernels

    monkeypatch.setattr(kernels, "CL_MIN_GROUP_PIXELS", 16)
    _check([(2, 6, 13, 27), (1, 3, 9, 1)], "triton", ft_grad=True, layout="channels_last")


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_strided_views(backend):
    # channels_last student, a channel-strided teacher slice (stride 16 planes), a transposed pair.
    def make(fs, ft):
        a = fs[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        big = torch.randn(1, 48, 13, 27, device=DEVICE)
        b = big[:, ::16]
        c = fs[1].detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
        return [a, c], [b, ft[1].detach()]

    _check([(1, 3, 13, 27), (2, 3, 7, 6)], backend, ft_grad=False, make=make)


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_mixed_layouts(backend):
    # A channels_last student against a contiguous teacher that needs grad, and the reverse: each
    # gradient in its own input's layout (triton), values as the reference.
    def make(fs, ft):
        cl, cf = torch.channels_last, torch.contiguous_format
        return ([fs[0].detach().contiguous(memory_format=cl).requires_grad_(), fs[1].detach().requires_grad_()],
                [ft[0].detach().contiguous(memory_format=cf).requires_grad_(),
                 ft[1].detach().contiguous(memory_format=cl).requires_grad_()])

    _check([(2, 6, 13, 27), (1, 4, 5, 9)], backend, ft_grad=True, make=make)


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_channels_last_pairs(backend):
    # Both maps channels_last (what CSF and the MiT stages produce). triton: channel-tiled kernels,
    # channels_last gradients at every size; torch: its grid path keeps channels_last, the
    # 13×27 map takes the other path (contiguous gradients).
    shapes = [(2, 16, 8, 12), (2, 5, 32, 64), (1, 3, 13, 27)]
    _check(shapes, backend, ft_grad=True, layout="channels_last")
    fs, ft = _pairs(shapes, ft_grad=True, layout="channels_last")
    grads = torch.autograd.grad(hcl_loss(fs, ft, backend=backend), fs + ft)
    for i, g in enumerate(grads):
        cl = backend == "triton" or i % 3 != 2
        assert g.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format), (i, g.stride())


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_transkd_stage_32x64_c64(backend):
    for layout in LAYOUTS:
        _check([(1, 64, 32, 64)], backend, ft_grad=False, layout=layout)


def test_transkd_stage_32x64_large_c_triton():
    # C = 128/320/512 at 32×64: every 32nd channel of each (the interpreter pays per plane), so the
    # kernel sees the real channel strides (up to 512·2048 elements per sample).
    def make(fs, ft):
        students = [torch.randn(1, c, 32, 64, device=DEVICE)[:, ::32].requires_grad_() for c in (128, 320, 512)]
        teachers = [torch.randn(1, c, 32, 64, device=DEVICE)[:, 5::32] for c in (128, 320, 512)]
        return students, teachers

    _check([(1, 1, 1, 1)], "triton", ft_grad=False, make=make)


def test_transkd_stages_channels_last_triton():
    # The TransKD stage widths at reduced maps, channels_last: many channel blocks per sample.
    _check([(1, 128, 8, 16), (2, 320, 4, 8), (1, 512, 2, 4)], "triton", ft_grad=False, layout="channels_last")


@pytest.mark.parametrize("c", (128, 320, 512))
def test_transkd_stage_32x64_large_c_torch(c):
    _check([(1, c, 32, 64)], "torch", ft_grad=False)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("fp16", "bf16"))
@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_low_precision_within_2x_pytorch(dtype, backend, layout):
    shapes = ODD + [(1, 2, 32, 64)]
    fs, ft = _pairs(shapes, dtype=dtype, layout=layout)
    ref, ref_g = _ref_with_grads(hcl64, fs + ft)
    theirs = original_hcl(fs, ft)
    theirs_g = torch.autograd.grad(theirs, fs)
    ours = hcl_loss(fs, ft, backend=backend)
    assert ours.dtype == torch.float32
    ours_g = torch.autograd.grad(ours, fs)
    assert_low_precision_ok(ours, theirs, ref, f"{backend} {dtype} loss")
    for i, (o, t, r) in enumerate(zip(ours_g, theirs_g, ref_g)):
        assert o.dtype == dtype
        assert_low_precision_ok(o, t, r, f"{backend} {dtype} grad {i}")
    _assert_grad_layout(backend, ours_g, fs)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_gradcheck_float64(backend, layout):
    fs, ft = _pairs([(1, 2, 3, 5), (1, 3, 6, 7)], dtype=torch.float64, ft_grad=True, layout=layout)
    assert torch.autograd.gradcheck(lambda *t: hcl_loss(list(t[:2]), list(t[2:]), backend=backend),
                                    (*fs, *ft), eps=1e-6, atol=1e-8, fast_mode=True)


def test_teacher_without_grad_gets_none_and_student_grad_matches():
    for layout in LAYOUTS:
        fs, ft = _pairs([(1, 2, 13, 27), (1, 2, 3, 5)], ft_grad=False, layout=layout)
        ft[1].requires_grad_(True)
        out = hcl_loss(fs, ft, backend="triton")
        out.backward()
        assert ft[0].grad is None
        assert ft[1].grad is not None
        torch.testing.assert_close(ft[1].grad, -fs[1].grad, rtol=0, atol=0)


def test_loss_value_by_hand():
    # One 2×2 stage, one channel, d = [[1, 2], [3, 4]]: only l = 1 survives (l = 2 ≥ H).
    # mse = 30/4; pooled mean = 2.5 → mse 6.25 · cnt 1/2; tot = 3/2.
    fs = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], device=DEVICE)
    ft = torch.zeros_like(fs)
    expected = (30 / 4 + 6.25 * 0.5) / 1.5
    for backend in BACKENDS:
        assert math.isclose(hcl_loss([fs], [ft], backend=backend).item(), expected, rel_tol=1e-6), backend


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_matches_reference_backend(backend):
    for layout in LAYOUTS:
        fs, ft = _pairs([(2, 5, 16, 32), (2, 3, 7, 9)], layout=layout)
        torch.testing.assert_close(hcl_loss(fs, ft, backend=backend), hcl_loss_reference(fs, ft), rtol=1e-5, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ((1, 2, 13, 27), (1, 2, 1, 5), (2, 3, 5, 9)))
def test_nan_propagates_like_reference(backend, shape, layout):
    # One NaN in one input element: the loss is NaN, and the gradients are NaN exactly where the
    # reference's are (the bins holding it: its whole (n, c) plane when l = 1 is active, only the
    # element itself at H = 1), finite and right elsewhere.
    fs, ft = _pairs([shape, (1, 1, 4, 4)], ft_grad=True, layout=layout)
    with torch.no_grad():
        fs[0][0, 1, 0, 3] = float("nan")
    ref = hcl_loss_reference(fs, ft)
    ref_g = torch.autograd.grad(ref, fs + ft)
    out = hcl_loss(fs, ft, backend=backend)
    assert torch.isnan(ref) and torch.isnan(out)
    for g, r in zip(torch.autograd.grad(out, fs + ft), ref_g):
        assert torch.equal(torch.isnan(g), torch.isnan(r))
        keep = ~torch.isnan(r)
        assert rel_err(g[keep], r[keep]) < 1e-5 if keep.any() and r[keep].norm() > 0 else True


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_writes_every_output_element(layout):
    from transkd_fast.kernels.hcl import channels_inner, hcl_stage_backward, hcl_stage_forward, num_levels

    fmt = _fmt(layout)
    fs = torch.randn(2, 3, 13, 27, device=DEVICE).contiguous(memory_format=fmt)
    ft = torch.randn(2, 3, 13, 27, device=DEVICE).contiguous(memory_format=fmt)
    assert channels_inner(fs) == (layout == "channels_last")
    pooled = torch.full((6 * 21,), float("nan"), device=DEVICE)
    share = torch.full((6,), float("nan"), device=DEVICE)
    hcl_stage_forward(fs, ft, pooled, share)
    assert num_levels(13) == 3 and torch.isfinite(pooled).all() and torch.isfinite(share).all()
    gfs, gft = torch.full_like(fs, float("nan")), torch.full_like(ft, float("nan"))
    hcl_stage_backward(torch.ones((), device=DEVICE), fs, ft, pooled, gfs, gft)
    assert torch.isfinite(gfs).all() and torch.equal(gft, -gfs)


ODD_OPCHECK = [(1, 2, 13, 27), (1, 3, 1, 1), (2, 2, 1, 7), (1, 3, 3, 5), (1, 2, 5, 9)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_opcheck_custom_op(backend, layout):
    # Schema, fake impl (shapes, dtypes and the gradients' strides) and autograd registration of
    # both custom ops at the odd sizes, in each layout.
    fs, ft = _pairs(ODD_OPCHECK, ft_grad=True, layout=layout)
    torch.library.opcheck(torch.ops.transkd_fast.hcl_loss.default, (fs, ft, backend),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    pooled = torch.ops.transkd_fast.hcl_loss(fs, ft, backend)[1]
    fs_d, ft_d = [t.detach() for t in fs], [t.detach() for t in ft]
    torch.library.opcheck(torch.ops.transkd_fast.hcl_loss_backward.default,
                          (torch.ones((), device=DEVICE), fs_d, ft_d, pooled, [True] * len(ft), backend),
                          test_utils=("test_schema", "test_faketensor"))


def test_opcheck_backward_channels_last():
    # The fake impl declares the gradients' memory format per backend and path (torch: grid path
    # channels_last, other path contiguous; triton: the inputs' layouts); opcheck compares it with
    # the real outputs.
    cl = torch.channels_last
    fs = [torch.randn(2, 4, 8, 12, device=DEVICE).contiguous(memory_format=cl),
          torch.randn(1, 2, 13, 27, device=DEVICE).contiguous(memory_format=cl)]
    ft = [torch.randn_like(f) for f in fs]
    pooled = torch.ops.transkd_fast.hcl_loss(fs, ft, "torch")[1]
    for backend in ("torch", "triton"):
        torch.library.opcheck(torch.ops.transkd_fast.hcl_loss_backward.default,
                              (torch.ones((), device=DEVICE), fs, ft, pooled, [True, True], backend),
                              test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_messages():
    a, b = torch.randn(1, 2, 8, 8, device=DEVICE), torch.randn(1, 2, 8, 8, device=DEVICE)
    differ = r"stage 0: student and teacher shapes differ: \(1, 2, 8, 8\) vs \(1, 3, 8, 8\)"
    with pytest.raises(ValueError, match=differ):
        hcl_loss([a], [torch.randn(1, 3, 8, 8, device=DEVICE)])
    with pytest.raises(ValueError, match="same number of stages, got 2 and 1"):
        hcl_loss([a, a], [b])
    with pytest.raises(TypeError, match=r"student_feats\[0\] must be a floating tensor, got torch.int64"):
        hcl_loss([a.long()], [b])
    with pytest.raises(ValueError, match=r"teacher_feats\[0\] must have 4 dimensions, got shape \(2, 8, 8\)"):
        hcl_loss([a], [b[0]])
    with pytest.raises(TypeError, match="must share one dtype"):
        hcl_loss([a], [b.double()])
    with pytest.raises(TypeError, match="must be a list or tuple"):
        hcl_loss(a, b)
    with pytest.raises(ValueError, match="at least one stage"):
        hcl_loss([], [])


@needs_cpu
def test_triton_refused_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a = torch.randn(1, 2, 8, 8)
    with pytest.raises(BackendError, match="hcl_loss: backend 'triton' refused.*need CUDA tensors"):
        hcl_loss([a], [a], backend="triton")


@needs_interpreter
def test_interpreter_tiles_are_test_speed_only():
    # Under the interpreter the tiles cover whole planes / rows (fewer, wider program iterations);
    # the GPU tiles are separate constants, built by the compile check below.
    from transkd_fast.kernels import hcl as kernels

    assert kernels._tile(13, 27) == (16, 32) and kernels._cl_tile(5, 27) == (32, 8)
    assert kernels._cl_tile(600, 27) == (32, 64)


# ---------------------------------------------------------------------------------------
# Compile check of the recorded launches of the odd suite (sm_80, sm_90; fp32/fp16/bf16; both
# layouts): no failures, no spills, the value-1 specializations of a real launch exercised, and
# channels_last launches reading and writing along C as wide as contiguous ones along W.


def test_compile_check_hcl():
    from transkd_fast.compile_check import check_in_subprocess

    rows = check_in_subprocess(("hcl",), suites=("odd",))
    assert rows and {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    bad = [(r["kernel"], r.get("config"), r["cases"][:1], r.get("error", "")[:300] or r["spill_bytes"])
           for r in rows if "error" in r or r["spill_bytes"] != 0]
    assert not bad, bad
    kernels = {r["kernel"] for r in rows}
    assert {"_hcl_fwd_kernel", "_hcl_bwd_kernel", "_hcl_fwd_cl_kernel", "_hcl_bwd_cl_kernel",
            "_hcl_combine_kernel"} <= kernels, kernels
    consts = [set(r["specialized"].split(";")[0].removeprefix("const ").split(",")) for r in rows]
    for one in ("N=1", "H=1", "W=1", "write_ft=1"):
        assert any(one in c for c in consts), one

    def widest(kind, layout, dtype):
        pick = [r for r in rows if r["kernel"] in ("_hcl_fwd_kernel", "_hcl_bwd_kernel", "_hcl_fwd_cl_kernel",
                                                    "_hcl_bwd_cl_kernel")
                and any(f"hcl odd {layout} " in c and " C=16 13x27 " in c and f"{dtype} as-recorded" in c
                        for c in r["cases"])]
        assert pick, (kind, layout, dtype)
        return max(int(w) for r in pick for w in r["access_bits"][kind])

    # The 16-channel 13×27 case: W = 27 has no aligned vectors, C = 16 does. channels_last must
    # reach at least the contiguous width (before: scalar loads along the stride-C W axis).
    for dtype in ("float32", "float16", "bfloat16"):
        for kind in ("ld", "st"):
            cl, contig = widest(kind, "channels_last", dtype), widest(kind, "contiguous", dtype)
            assert cl >= contig, (dtype, kind, cl, contig)
        assert widest("ld", "channels_last", dtype) >= 64, dtype
