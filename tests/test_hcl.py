"""HCL loss: every backend against a float64 reference written straight from design §2.

The float64 reference below pools with explicit bins (start = ⌊i·H/l⌋, end = ⌈(i+1)·H/l⌉)
rather than F.adaptive_avg_pool2d, so it checks the original's pooling too. Triton runs in
its interpreter (conftest sets TRITON_INTERPRET=1), where it picks one tile per plane; the
GPU tile shapes are covered by a map wider than a tile and by the compile check.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel, assert_low_precision_ok, rel_err

from transkd_fast.backend import BackendError
from transkd_fast.ops.hcl import hcl_loss, hcl_loss_reference

BACKENDS = ("reference", "torch", "triton")


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


def _pairs(shapes, dtype=torch.float32, ft_grad=False):
    fs = [torch.randn(s, dtype=dtype).requires_grad_() for s in shapes]
    ft = [(0.5 * torch.randn(s) + 0.3).to(dtype).requires_grad_(ft_grad) for s in shapes]
    return fs, ft


def _ref_with_grads(fn, tensors, *args):
    """fn on float64 leaf copies (so the reference gradients are float64 too)."""
    copies = [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    n = len(tensors) // 2
    ref = fn(copies[:n], copies[n:], *args)
    return ref, torch.autograd.grad(ref, [c for c in copies if c.requires_grad])


def _check_fp32(shapes, backend, ft_grad=True, make=None):
    fs, ft = _pairs(shapes, ft_grad=ft_grad)
    if make is not None:
        fs, ft = make(fs, ft)
    ref, ref_grads = _ref_with_grads(hcl64, fs + ft)
    leaves = [t for t in fs + ft if t.requires_grad]
    out = hcl_loss(fs, ft, backend=backend)
    assert out.dtype == torch.float32 and out.dim() == 0
    assert_close_rel(out, ref, 1e-5, f"{backend} loss {shapes}")
    for i, (g, r) in enumerate(zip(torch.autograd.grad(out, leaves), ref_grads)):
        assert g.dtype == torch.float32
        assert_close_rel(g, r, 1e-5, f"{backend} grad {i} {shapes}")


SMALL = [(2, 3, 4, 8), (2, 3, 3, 5), (2, 3, 13, 27), (1, 2, 2, 3), (1, 2, 1, 6), (1, 2, 9, 1), (2, 3, 8, 12)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_stages_fp32(backend):
    # 4×8 and 3×5 skip l = 4 (H ≤ 4); 13×27 has overlapping bins; 2×3 keeps only l = 1;
    # 1×6 keeps no level; 9×1 pools a single column into 4 overlapping bins; 8×12 takes the torch
    # backend's grid path (H, W divisible by 4).
    _check_fp32(SMALL, backend)


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_wide_map_several_tiles(backend):
    # More than one interpreter tile (2×2048 per tile for W = 1100): planes split into row groups,
    # partial bin sums combined by the second launch; bins across tiles.
    _check_fp32([(1, 2, 5, 1100)], backend, ft_grad=False)


def test_gpu_tiles_in_interpreter(monkeypatch):
    # The GPU tile shapes (8×32, 8×64, 4×128) and row-group splits, run by the interpreter:
    # column chunks (W = 300 > 128), row groups + combine, the narrow-map tile.
    from transkd_fast.kernels import hcl as kernels

    monkeypatch.setattr(kernels, "_interpreting", lambda: False)
    assert kernels._tile(13, 300) == (4, 128) and kernels._tile(16, 32) == (8, 32)
    assert kernels._row_groups(1, 2, 13, 4, kernels.FWD_MIN_PROGRAMS) == (4, 1)
    _check_fp32([(1, 2, 13, 300), (1, 2, 16, 32), (1, 1, 32, 64), (1, 2, 3, 5)], "triton", ft_grad=True)


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_strided_views(backend):
    # channels_last student, a channel-strided teacher slice (stride 16 planes), a transposed pair.
    def make(fs, ft):
        a = fs[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        big = torch.randn(1, 48, 13, 27)
        b = big[:, ::16]
        c = fs[1].detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
        return [a, c], [b, ft[1].detach()]

    _check_fp32([(1, 3, 13, 27), (2, 3, 7, 6)], backend, ft_grad=False, make=make)


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_channels_last_pairs(backend):
    # Both maps channels_last (what CSF and the MiT stages produce): the torch backend's grid path
    # runs in that layout and hands back channels_last gradients; 13×27 takes the other path.
    def make(fs, ft):
        cl = torch.channels_last
        return ([f.detach().contiguous(memory_format=cl).requires_grad_() for f in fs],
                [t.detach().contiguous(memory_format=cl).requires_grad_() for t in ft])

    shapes = [(2, 16, 8, 12), (2, 5, 32, 64), (1, 3, 13, 27)]
    _check_fp32(shapes, backend, ft_grad=True, make=make)
    fs, ft = make(*_pairs(shapes, ft_grad=True))
    grads = torch.autograd.grad(hcl_loss(fs, ft, backend=backend), fs + ft)
    for i, g in enumerate(grads):
        grid = backend == "torch" and i % 3 != 2
        assert g.is_contiguous(memory_format=torch.channels_last if grid else torch.contiguous_format), (i, g.stride())


def test_opcheck_backward_channels_last():
    # The fake impl declares the gradients' memory format per backend and path; opcheck compares
    # it with the real outputs.
    cl = torch.channels_last
    fs = [torch.randn(2, 4, 8, 12).contiguous(memory_format=cl), torch.randn(1, 2, 13, 27).contiguous(memory_format=cl)]
    ft = [torch.randn_like(f) for f in fs]
    pooled = torch.ops.transkd_fast.hcl_loss(fs, ft, "torch")[1]
    for backend in ("torch", "triton"):
        torch.library.opcheck(torch.ops.transkd_fast.hcl_loss_backward.default,
                              (torch.ones(()), fs, ft, pooled, [True, True], backend),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_transkd_stage_32x64_c64(backend):
    _check_fp32([(1, 64, 32, 64)], backend, ft_grad=False)


def test_transkd_stage_32x64_large_c_triton():
    # C = 128/320/512 at 32×64: every 32nd channel of each (the interpreter pays per plane), so the
    # kernel sees the real channel strides (up to 512·2048 elements per sample).
    def make(fs, ft):
        students = [torch.randn(1, c, 32, 64)[:, ::32].requires_grad_() for c in (128, 320, 512)]
        teachers = [torch.randn(1, c, 32, 64)[:, 5::32] for c in (128, 320, 512)]
        return students, teachers

    _check_fp32([(1, 1, 1, 1)], "triton", ft_grad=False, make=make)


@pytest.mark.parametrize("c", (128, 320, 512))
def test_transkd_stage_32x64_large_c_torch(c):
    _check_fp32([(1, c, 32, 64)], "torch", ft_grad=False)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_low_precision_within_2x_pytorch(dtype, backend):
    shapes = [(2, 3, 13, 27), (1, 4, 3, 5), (1, 2, 32, 64)]
    fs, ft = _pairs(shapes, dtype=dtype)
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


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_gradcheck_float64(backend):
    fs, ft = _pairs([(1, 2, 3, 5), (1, 1, 6, 7)], dtype=torch.float64, ft_grad=True)
    assert torch.autograd.gradcheck(lambda *t: hcl_loss(list(t[:2]), list(t[2:]), backend=backend),
                                    (*fs, *ft), eps=1e-6, atol=1e-8, fast_mode=True)


def test_teacher_without_grad_gets_none_and_student_grad_matches():
    fs, ft = _pairs([(1, 2, 13, 27), (1, 2, 3, 5)], ft_grad=False)
    ft[1].requires_grad_(True)
    out = hcl_loss(fs, ft, backend="triton")
    out.backward()
    assert ft[0].grad is None
    assert ft[1].grad is not None
    torch.testing.assert_close(ft[1].grad, -fs[1].grad, rtol=0, atol=0)


def test_loss_value_by_hand():
    # One 2×2 stage, one channel, d = [[1, 2], [3, 4]]: only l = 1 survives (l = 2 ≥ H).
    # mse = 30/4; pooled mean = 2.5 → mse 6.25 · cnt 1/2; tot = 3/2.
    fs = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    ft = torch.zeros_like(fs)
    expected = (30 / 4 + 6.25 * 0.5) / 1.5
    for backend in BACKENDS:
        assert math.isclose(hcl_loss([fs], [ft], backend=backend).item(), expected, rel_tol=1e-6), backend


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_matches_reference_backend(backend):
    fs, ft = _pairs([(2, 5, 16, 32), (2, 3, 7, 9)])
    torch.testing.assert_close(hcl_loss(fs, ft, backend=backend), hcl_loss_reference(fs, ft), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ((1, 2, 13, 27), (1, 2, 1, 5)))
def test_nan_propagates_like_reference(backend, shape):
    fs, ft = _pairs([shape, (1, 1, 4, 4)])
    with torch.no_grad():
        fs[0][0, 1, 0, 3] = float("nan")
    ref = hcl_loss_reference(fs, ft)
    ref_g = torch.autograd.grad(ref, fs)
    out = hcl_loss(fs, ft, backend=backend)
    assert torch.isnan(ref) and torch.isnan(out)
    for g, r in zip(torch.autograd.grad(out, fs), ref_g):
        assert torch.equal(torch.isnan(g), torch.isnan(r))
        keep = ~torch.isnan(r)
        assert rel_err(g[keep], r[keep]) < 1e-5 if keep.any() and r[keep].norm() > 0 else True


def test_kernel_writes_every_output_element():
    from transkd_fast.kernels.hcl import hcl_stage_backward, hcl_stage_forward, num_levels

    fs, ft = torch.randn(2, 3, 13, 27), torch.randn(2, 3, 13, 27)
    pooled = torch.full((6 * 21,), float("nan"))
    share = torch.full((6,), float("nan"))
    hcl_stage_forward(fs, ft, pooled, share)
    assert num_levels(13) == 3 and torch.isfinite(pooled).all() and torch.isfinite(share).all()
    gfs, gft = torch.full_like(fs, float("nan")), torch.full_like(ft, float("nan"))
    hcl_stage_backward(torch.ones(()), fs, ft, pooled, gfs, gft)
    assert torch.isfinite(gfs).all() and torch.equal(gft, -gfs)


def test_opcheck_custom_op():
    fs, ft = _pairs([(1, 2, 13, 27), (1, 2, 3, 5)], ft_grad=True)
    for backend in ("torch", "triton"):
        torch.library.opcheck(torch.ops.transkd_fast.hcl_loss.default, (fs, ft, backend),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ---------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_messages():
    a, b = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    differ = r"stage 0: student and teacher shapes differ: \(1, 2, 8, 8\) vs \(1, 3, 8, 8\)"
    with pytest.raises(ValueError, match=differ):
        hcl_loss([a], [torch.randn(1, 3, 8, 8)])
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


def test_triton_refused_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a = torch.randn(1, 2, 8, 8)
    with pytest.raises(BackendError, match="hcl_loss: backend 'triton' refused.*need CUDA tensors"):
        hcl_loss([a], [a], backend="triton")


# ---------------------------------------------------------------------------------------
# Compile check (sm_80, sm_90; fp16/bf16/fp32; every tile): no errors, no spills.


def test_compile_check_hcl():
    from transkd_fast.compile_check import check_in_subprocess

    rows = check_in_subprocess(("hcl",))
    assert len(rows) == (2 * 3 * 3 + 1) * 2  # (fwd/bwd × dtypes × tiles + combine) × archs
    bad = [r for r in rows if "error" in r or r["spill_bytes"] != 0]
    assert not bad, bad
