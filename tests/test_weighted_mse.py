"""Multi-stage weighted MSE (TransKD's embedding loss): every backend against float64.

Shapes: the four patch embeddings of a 64×128 input, student B0 aligned by PEA to the
teacher B2 widths: N = 16·32, 8·16, 4·8, 2·4 tokens with C = 64, 128, 320, 512, batch 2,
weights (0.1, 0.1, 0.5, 1.0). Triton runs in its interpreter (conftest); in CUDA test mode
(``TRANSKD_TEST_DEVICE=cuda``) the tensors are on the GPU and the compiled kernels run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, assert_close_rel, assert_low_precision_ok

from transkd_fast.backend import BackendError
from transkd_fast.ops.weighted_mse import weighted_mse, weighted_mse_reference

BACKENDS = ("reference", "torch", "triton")
WEIGHTS = (0.1, 0.1, 0.5, 1.0)
SHAPES = [(2, 16 * 32, 64), (2, 8 * 16, 128), (2, 4 * 8, 320), (2, 2 * 4, 512)]


def wmse64(xs, ys, weights) -> torch.Tensor:
    """Σ w_i · mean((x_i − y_i)²) in float64, from design §2."""
    return sum(w * (x.double() - y.double()).pow(2).mean() for x, y, w in zip(xs, ys, weights))


def original_wmse(xs, ys, weights):
    """The original's ops in the inputs' dtype: PyTorch's own error at that dtype."""
    return sum(w * F.mse_loss(x, y) for x, y, w in zip(xs, ys, weights))


def _pairs(shapes, dtype=torch.float32, y_grad=False):
    xs = [torch.randn(s, dtype=dtype, device=DEVICE).requires_grad_() for s in shapes]
    ys = [(0.7 * torch.randn(s, device=DEVICE) + 0.2).to(dtype).requires_grad_(y_grad) for s in shapes]
    return xs, ys


def _ref_with_grads(xs, ys, weights):
    """wmse64 on float64 leaf copies (so the reference gradients are float64 too)."""
    copies = [t.detach().double().requires_grad_(t.requires_grad) for t in xs + ys]
    ref = wmse64(copies[:len(xs)], copies[len(xs):], weights)
    return ref, torch.autograd.grad(ref, [c for c in copies if c.requires_grad])


def _check(xs, ys, weights, backend, tol=1e-5):
    ref, ref_grads = _ref_with_grads(xs, ys, weights)
    leaves = [t for t in xs + ys if t.requires_grad]
    out = weighted_mse(xs, ys, weights, backend=backend)
    assert out.dim() == 0 and out.dtype == (torch.float64 if xs[0].dtype == torch.float64 else torch.float32)
    assert_close_rel(out, ref, tol, f"{backend} loss")
    for i, (g, r) in enumerate(zip(torch.autograd.grad(out, leaves), ref_grads)):
        assert g.dtype == leaves[i].dtype and g.shape == leaves[i].shape
        assert_close_rel(g, r, tol, f"{backend} grad {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_transkd_embeddings_fp32(backend):
    xs, ys = _pairs(SHAPES, y_grad=True)
    _check(xs, ys, WEIGHTS, backend)


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_any_shapes_and_strided_views(backend):
    # A teacher embedding as the transposed flattened NCHW map (inner stride N), a permuted 4-D
    # pair that cannot merge into 3 dims, a channel slice, odd sizes, a scalar and a 1-element stage.
    def r(*shape):
        return torch.randn(shape, device=DEVICE)

    t_map = r(2, 40, 5, 7)
    y0 = t_map.flatten(2).transpose(1, 2)  # [2, 35, 40], strides (1400, 1, 35)
    x0 = r(2, 35, 40).requires_grad_()
    x1 = r(3, 4, 5, 6).permute(0, 2, 3, 1).detach().requires_grad_()
    y1 = r(4, 6, 3, 5).permute(2, 3, 1, 0).detach().requires_grad_()  # needs 4 dims
    x2 = r(2, 9, 33)[:, :, ::2].detach().requires_grad_()
    y2 = r(2, 9, 17)
    x3, y3 = r().requires_grad_(), r()
    x4, y4 = r(1, 1).requires_grad_(), r(1, 1)
    _check([x0, x1, x2, x3, x4], [y0, y1, y2, y3, y4], (0.3, 1.0, 2.0, 0.5, 0.25), backend)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_low_precision_within_2x_pytorch(dtype, backend):
    xs, ys = _pairs(SHAPES, dtype=dtype)
    ref, ref_g = _ref_with_grads(xs, ys, WEIGHTS)
    theirs = original_wmse(xs, ys, WEIGHTS)
    theirs_g = torch.autograd.grad(theirs, xs)
    ours = weighted_mse(xs, ys, WEIGHTS, backend=backend)
    assert ours.dtype == torch.float32
    ours_g = torch.autograd.grad(ours, xs)
    assert_low_precision_ok(ours, theirs, ref, f"{backend} {dtype} loss")
    for i, (o, t, r) in enumerate(zip(ours_g, theirs_g, ref_g)):
        assert o.dtype == dtype
        assert_low_precision_ok(o, t, r, f"{backend} {dtype} grad {i}")


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_gradcheck_float64(backend):
    xs, ys = _pairs([(2, 3, 5), (7,)], dtype=torch.float64, y_grad=True)
    assert torch.autograd.gradcheck(lambda *t: weighted_mse(list(t[:2]), list(t[2:]), (0.3, 1.7), backend=backend),
                                    (*xs, *ys), eps=1e-6, atol=1e-8, fast_mode=True)


def test_targets_without_grad_get_none():
    xs, ys = _pairs(SHAPES[:2])
    ys[1].requires_grad_(True)
    weighted_mse(xs, ys, WEIGHTS[:2], backend="triton").backward()
    assert ys[0].grad is None
    torch.testing.assert_close(ys[1].grad, -xs[1].grad, rtol=0, atol=0)


def test_grad_out_scales():
    xs, ys = _pairs([(2, 8, 16)])
    for backend in ("torch", "triton"):
        out = weighted_mse(xs, ys, (0.5,), backend=backend)
        (g,) = torch.autograd.grad(out * 3.0, xs)
        torch.testing.assert_close(g, 3.0 * 2 * 0.5 * (xs[0] - ys[0]).detach() / xs[0].numel())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_like_reference(backend):
    xs, ys = _pairs(SHAPES[2:])
    with torch.no_grad():
        ys[1][1, 3, 7] = float("nan")
    ref = weighted_mse_reference(xs, ys, WEIGHTS[2:])
    ref_g = torch.autograd.grad(ref, xs)
    out = weighted_mse(xs, ys, WEIGHTS[2:], backend=backend)
    assert torch.isnan(ref) and torch.isnan(out)
    for g, r in zip(torch.autograd.grad(out, xs), ref_g):
        assert torch.equal(torch.isnan(g), torch.isnan(r))


def test_zero_weight_keeps_nan_like_reference():
    # 0 · NaN is NaN in the reference; the fused loss must not drop a zero-weight stage.
    xs, ys = _pairs([(2, 4, 8), (2, 4, 8)])
    with torch.no_grad():
        xs[0][0, 0, 0] = float("nan")
    for backend in BACKENDS:
        assert torch.isnan(weighted_mse(xs, ys, (0.0, 1.0), backend=backend)), backend


def test_kernel_writes_every_output_element():
    from transkd_fast.kernels.weighted_mse import wmse_num_programs, wmse_stage_backward, wmse_stage_forward

    for x, y in (
        (torch.randn(2, 37, 129, device=DEVICE), torch.randn(2, 129, 37, device=DEVICE).transpose(1, 2)),
        (torch.randn(1, 13, 27, device=DEVICE), torch.randn(1, 13, 27, device=DEVICE)),  # one flat row: R = 1
        (torch.randn(3, 5000, device=DEVICE)[:, ::2], torch.randn(3, 2500, device=DEVICE)),  # 2 column tiles
    ):
        n = wmse_num_programs(x, y)
        share = torch.full((n,), float("nan"), device=DEVICE)
        wmse_stage_forward(x, y, 0.5, share)
        assert torch.isfinite(share).all()
        assert_close_rel(share.sum(), 0.5 * (x.double() - y.double()).pow(2).mean(), 1e-5, "forward")
        gx, gy = torch.full_like(x, float("nan")), torch.full(x.shape, float("nan"), device=DEVICE)
        wmse_stage_backward(torch.ones((), device=DEVICE), x, y, 0.5, gx, gy)
        assert torch.isfinite(gx).all() and torch.equal(gy, -gx)
        assert_close_rel(gx, (x.double() - y.double()) / x.numel(), 1e-6, "backward")


def test_collapse_merges_only_contiguous_dims():
    from transkd_fast.kernels.weighted_mse import collapse

    assert collapse((2, 3, 4), (12, 4, 1), (12, 4, 1)) == ([24], [[1], [1]])
    assert collapse((2, 3, 4), (12, 4, 1), (40, 4, 1)) == ([2, 12], [[12, 1], [40, 1]])
    assert collapse((2, 3, 4), (12, 4, 1), (12, 1, 3)) == ([2, 3, 4], [[12, 4, 1], [12, 1, 3]])
    assert collapse((2, 1, 4), (4, 4, 1), (8, 99, 2)) == ([8], [[1], [2]])
    assert collapse((), (), ()) == ([1], [[1], [1]])


def test_opcheck_custom_op():
    xs, ys = _pairs([(2, 5, 7), (3, 4)], y_grad=True)
    for backend in ("torch", "triton"):
        torch.library.opcheck(torch.ops.transkd_fast.weighted_mse.default, (xs, ys, [0.1, 1.0], backend),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_opcheck_torch_backend_odd_sizes():
    """Every opcheck test (schema, fake tensors, autograd registration, AOT dispatch) of both
    custom ops on the torch backend, at odd sizes, a strided target and a 1-element stage."""
    xs = [torch.randn(s, device=DEVICE, requires_grad=True) for s in ((1, 13, 27), (3, 1, 5), (1, 1))]
    ys = [torch.randn(1, 27, 13, device=DEVICE).transpose(1, 2), torch.randn(3, 1, 5, device=DEVICE),
          torch.randn(1, 1, device=DEVICE, requires_grad=True)]
    torch.library.opcheck(torch.ops.transkd_fast.weighted_mse.default, (xs, ys, [0.1, 0.5, 1.0], "torch"))
    g = torch.randn((), device=DEVICE)
    torch.library.opcheck(torch.ops.transkd_fast.weighted_mse_backward.default,
                          (g, [x.detach() for x in xs], [y.detach() for y in ys], [0.1, 0.5, 1.0],
                           [False, False, True], "torch"))


# ---------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_messages():
    a, b = torch.randn(2, 8, 16, device=DEVICE), torch.randn(2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"stage 1: input and target shapes differ: \(2, 8, 16\) vs \(2, 16, 8\)"):
        weighted_mse([a, a], [b, b.transpose(1, 2)], (0.1, 1.0))
    with pytest.raises(ValueError, match="same length, got 2, 1 and 2"):
        weighted_mse([a, a], [b], (0.1, 1.0))
    with pytest.raises(ValueError, match="same length, got 2, 2 and 4"):
        weighted_mse([a, a], [b, b], WEIGHTS)
    with pytest.raises(TypeError, match=r"targets\[0\] must be a floating tensor, got torch.int32"):
        weighted_mse([a], [b.int()], (1.0,))
    with pytest.raises(TypeError, match="must share one dtype"):
        weighted_mse([a], [b.half()], (1.0,))
    with pytest.raises(TypeError, match=r"weights\[0\] must be a number, got str"):
        weighted_mse([a], [b], ("x",))
    with pytest.raises(TypeError, match=r"weights\[0\] requires grad"):
        weighted_mse([a], [b], (torch.ones((), requires_grad=True),))
    with pytest.raises(TypeError, match="inputs must be a list or tuple"):
        weighted_mse(a, [b], (1.0,))
    with pytest.raises(ValueError, match="at least one stage"):
        weighted_mse([], [], ())


def test_triton_refused_on_cpu_without_interpreter(monkeypatch):  # CPU tensors on purpose
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a = torch.randn(2, 8, 16)
    with pytest.raises(BackendError, match="weighted_mse: backend 'triton' refused.*need CUDA tensors"):
        weighted_mse([a], [a], (1.0,), backend="triton")


# ---------------------------------------------------------------------------------------
# Compile check: the recorded launches of the odd sizes (compile_check.odd_calls) bound by
# Triton's own binder and compiled for sm_80 and sm_90, fp16/bf16/fp32.


def test_compile_check_weighted_mse():
    from transkd_fast.compile_check import check_in_subprocess

    rows = check_in_subprocess(("weighted_mse",), suites=("odd",))
    assert rows, "no launches recorded"
    bad = [(r["kernel"], r.get("config"), r.get("specialized"), r["cases"][0], r.get("error", "")[:300],
            r.get("spill_bytes")) for r in rows if "error" in r or r.get("spill_bytes", 0) > 0]
    assert not bad, bad
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert {r["kernel"] for r in rows} == {"_wmse_fwd_kernel", "_wmse_bwd_kernel"}
    # The value-1 launches were really compiled: a contiguous pair is one row (R = D1 = 1, the
    # case every launch used to fail on), a [1, 1] stage has D2 = 1 too, and batch 1 of the
    # strided pair.
    for kernel in ("_wmse_fwd_kernel", "_wmse_bwd_kernel"):
        mine = [r for r in rows if r["kernel"] == kernel]
        assert any("R=1" in r["specialized"] and "D1=1" in r["specialized"] for r in mine), kernel
        assert any("D2=1" in r["specialized"] for r in mine), kernel
        assert any(any("strided B=1" in c for c in r["cases"]) for r in mine), kernel
    # Contiguous stages are one flat run: 128-bit loads (fp32 and half types) in both kernels.
    flat = [r for r in rows if "BLOCK_R=1 BLOCK_C=2048" in r["config"] and "sx2=1" in r["specialized"]
            and "÷16" in r["specialized"] and any("[2, 4096, 16]" in c for c in r["cases"])]
    assert flat and all(max(map(int, r["access_bits"]["ld"])) == 128 for r in flat), \
        [(r["kernel"], r["config"], r["access_bits"]) for r in flat]
