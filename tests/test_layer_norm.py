"""layer_norm (MiT's LayerNorms on CPU, inference): the C kernel against F.layer_norm and fp64.

Shapes: MiT-B0's rows at a small input (C = 32, 64, 160, 256: the AVX-512 path) and odd ones
(C = 24, 7, 1: the scalar path), 3-D and 2-D inputs, a strided x, fp32 and bf16 weights for a bf16
x. Fresh random data with a per-row offset and scale (the statistics matter). No backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transkd_fast.kernels import _cpu_build

from transkd_fast.ops import layer_norm as ln_ops
from transkd_fast.ops.layer_norm import layer_norm, layer_norm_reference

SHAPES = [(1, 4096, 32), (2, 1024, 64), (3, 100, 160), (1, 64, 256), (5, 37, 24), (11, 7), (9, 1)]


def _x(shape, dtype):
    x = torch.randn(*shape) * torch.rand(*shape[:-1], 1) * 4 + torch.randn(*shape[:-1], 1) * 3
    return x.to(dtype)


@pytest.fixture(autouse=True)
def _kernel_on(monkeypatch):
    monkeypatch.delenv("TRANSKD_FAST_CPU_KERNELS", raising=False)
    assert ln_ops.kernel_available(), "the C kernel must build here (a C compiler, as Triton needs)"


def _scaled_err(out, ref64, x, w):
    """|out − ref64| over the row's conditioning (|μ|/σ + 1)·|w|: the fp32 error of x − μ grows
    with |μ|/σ (a row of large offset and small spread), for ATen's kernel as for ours."""
    xd = x.double()
    cond = (xd.mean(-1, keepdim=True).abs() / xd.std(-1, keepdim=True).clamp_min(1e-30) + 1) * w.double().abs()
    return ((out.double() - ref64).abs() / cond.clamp_min(1e-30)).max().item()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_aten_and_fp64(shape):
    C = shape[-1]
    x, w, b = _x(shape, torch.float32), torch.randn(C), torch.randn(C)
    out = layer_norm(x, w, b, 1e-6)
    ref = layer_norm_reference(x, w, b, 1e-6)
    ref64 = F.layer_norm(x.double(), (C,), w.double(), b.double(), 1e-6)
    assert out.dtype == torch.float32 and out.shape == x.shape
    if C > 1:
        err, aten_err = _scaled_err(out, ref64, x, w), _scaled_err(ref, ref64, x, w)
        assert err <= max(2 * aten_err, 1e-6), (err, aten_err)
        assert err <= 2e-5
    else:  # one value per row: x − μ = 0 exactly, y = b
        assert torch.equal(out, ref) and torch.equal(out, b.expand_as(out))
    # well-conditioned rows (no offset): equal to ATen's within fp32 rounding
    xs = torch.randn(*shape)
    torch.testing.assert_close(layer_norm(xs, w, b, 1e-6), layer_norm_reference(xs, w, b, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bf16_one_rounding(shape, wdtype):
    """bf16 x (weights bf16, as a prepared model's, or fp32): fp32 statistics, one rounding.
    Against fp64 of the same values: within a bf16 rounding (2^-8 relative) plus fp32 error,
    and no worse than ATen's bf16 kernel."""
    C = shape[-1]
    x = _x(shape, torch.bfloat16)
    w, b = torch.randn(C).to(wdtype), torch.randn(C).to(wdtype)
    out = layer_norm(x, w, b, 1e-5)
    assert out.dtype == torch.bfloat16
    ref64 = F.layer_norm(x.double(), (C,), w.double(), b.double(), 1e-5)
    assert ((out.double() - ref64).abs() <= ref64.abs() * 2.0 ** -8 + 1e-4).all()
    aten = layer_norm_reference(x, w, b, 1e-5)
    assert (out.double() - ref64).abs().mean() <= (aten.double() - ref64).abs().mean() * 1.05 + 1e-7


def test_no_affine_strided_in_place_and_threads():
    x = _x((4, 33, 48), torch.float32)
    torch.testing.assert_close(layer_norm(x, None, None, 1e-5), F.layer_norm(x, (48,), eps=1e-5), rtol=1e-5, atol=1e-5)
    w, b = torch.randn(48), torch.randn(48)
    out = layer_norm(x, w, b, 1e-5)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not xt.is_contiguous()
    assert torch.equal(layer_norm(xt, w, b, 1e-5), out)
    y = x.clone()
    assert layer_norm(y, w, b, 1e-5, out=y) is y and torch.equal(y, out)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(layer_norm(x, w, b, 1e-5), out)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [32, 7])
def test_nan_and_inf_rows(dtype, C):
    """A NaN or inf in a row makes that whole row NaN, as ATen's; the other rows are untouched."""
    x = _x((6, C), dtype)
    x[1, 2] = float("nan")
    x[3, 0] = float("inf")
    x[4, 1] = float("-inf")
    w, b = torch.randn(C), torch.randn(C)
    out = layer_norm(x, w, b, 1e-6)
    ref = layer_norm_reference(x, w, b, 1e-6)
    assert torch.equal(out.isnan(), ref.isnan())
    assert out[[1, 3, 4]].isnan().all() and not out[[0, 2, 5]].isnan().any()


def test_refuses_bad_input():
    x, w, b = _x((3, 16), torch.float32), torch.randn(16), torch.randn(16)
    cases = [
        (lambda: layer_norm(x.half(), w, b, 1e-5), TypeError, "float32 and bfloat16"),
        (lambda: layer_norm(x.double(), w.double(), b.double(), 1e-5), TypeError, "float32 and bfloat16"),
        (lambda: layer_norm(x, torch.randn(15), b, 1e-5), ValueError, "weight has 15 values"),
        (lambda: layer_norm(x, w, torch.randn(2, 8), 1e-5), ValueError, "bias must have 1 dimensions"),
        (lambda: layer_norm(x, w.double(), b, 1e-5), TypeError, "weight must be float32"),
        (lambda: layer_norm(x.to("meta"), w, b, 1e-5), ValueError, "CPU tensors"),
        (lambda: layer_norm(torch.tensor(1.0), None, None, 1e-5), ValueError, "at least one dimension"),
        (lambda: layer_norm(x, w, b, -1.0), ValueError, "eps must be"),
        (lambda: layer_norm(x, w, b, 1e-5, out=torch.empty(3, 15)), ValueError, "out must be"),
        (lambda: layer_norm(x, w.requires_grad_(), b, 1e-5), RuntimeError, "inference op"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


def test_turned_off_it_raises_never_swaps(monkeypatch):
    monkeypatch.setenv("TRANSKD_FAST_CPU_KERNELS", "0")
    x = _x((3, 16), torch.float32)
    assert not ln_ops.kernel_available() and not ln_ops.fast_path(x)
    with pytest.raises(_cpu_build.CpuKernelUnavailable, match="TRANSKD_FAST_CPU_KERNELS=0"):
        layer_norm(x, None, None, 1e-5)


def test_mit_layernorm_takes_the_kernel_only_for_inference(monkeypatch):
    """MiT's LayerNorm (an nn.LayerNorm: same state dict) runs the kernel under inference only;
    with autograd, under the reference backend, or turned off it is ATen's. Same values."""
    from transkd_fast import use_backend
    from transkd_fast.models.mit import LayerNorm

    norm = LayerNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    assert isinstance(norm, torch.nn.LayerNorm) and set(norm.state_dict()) == {"weight", "bias"}
    calls, real = [], ln_ops.layer_norm
    monkeypatch.setattr(ln_ops, "layer_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 50, 32)
    ref = F.layer_norm(x, (32,), norm.weight.detach(), norm.bias.detach(), 1e-6)
    with torch.inference_mode():
        torch.testing.assert_close(norm(x), ref, rtol=1e-5, atol=1e-5)
        assert calls == [1]
        with torch.autocast("cpu", dtype=torch.bfloat16):  # layer_norm keeps its input dtype
            assert norm(x).dtype == F.layer_norm(x, (32,), norm.weight, norm.bias, 1e-6).dtype == torch.float32
        assert calls == [1, 1]
        with use_backend("reference"):
            norm(x)
        monkeypatch.setenv("TRANSKD_FAST_CPU_KERNELS", "0")
        norm(x)
        monkeypatch.delenv("TRANSKD_FAST_CPU_KERNELS")
    assert calls == [1, 1]
    y = norm(x.requires_grad_())
    y.sum().backward()  # autograd: ATen's LayerNorm, with its backward
    assert calls == [1, 1] and x.grad is not None
