"""oneDNN CPU inference paths (transkd_fast.ops.onednn) against the plain ATen ops.

The fast path must give the plain path's values up to rounding, be taken exactly when it
should (fp32 CPU, no autograd, not tracing, not the reference backend), and the MiT blocks
built on it must match the reference backend.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

import transkd_fast
from transkd_fast.models import build_model
from transkd_fast.models.mit import MixFFN
from transkd_fast.ops import onednn

pytestmark = pytest.mark.skipif(not onednn.AVAILABLE, reason="this PyTorch build has no oneDNN pointwise ops")


@pytest.mark.parametrize("shape,n", [((37, 13), 29), ((2, 45, 64), 256), ((3, 7, 5, 33), 17), ((1, 1, 8), 1)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
def test_linear_matches_aten(shape, n, with_bias, with_residual):
    torch.manual_seed(n)
    x = torch.randn(shape)
    w = torch.randn(n, shape[-1]) * 0.2
    b = torch.randn(n) if with_bias else None
    r = torch.randn(*shape[:-1], n) if with_residual else None
    ref = F.linear(x, w, b) + (r if r is not None else 0)
    with torch.no_grad():
        assert onednn.fast_path(x)
        out = onednn.linear(x, w, b, r)
    assert out.shape == ref.shape and out.is_contiguous() and not out._is_view()
    assert rel_err(out, ref) <= 1e-6


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_with_autograd_matches_aten(with_bias):
    # Training: oneDNN forward, ATen backward; every gradient as F.linear's, the output a base
    # tensor (the MiT block adds its residual into it in place).
    torch.manual_seed(1)
    x = torch.randn(2, 33, 24, requires_grad=True)
    w = torch.randn(40, 24, requires_grad=True)
    b = torch.randn(40, requires_grad=True) if with_bias else None
    g = torch.randn(2, 33, 40)
    leaves = [t for t in (x, w, b) if t is not None]
    out = onednn.linear(x, w, b)
    assert out.grad_fn is not None and "_Linear" in type(out.grad_fn).__name__ and not out._is_view()
    grads = torch.autograd.grad(out, leaves, g)
    ref = F.linear(x, w, b)
    ref_grads = torch.autograd.grad(ref, leaves, g)
    assert rel_err(out, ref) <= 1e-6
    for a, r in zip(grads, ref_grads):
        assert rel_err(a, r) <= 1e-6
    out2 = onednn.linear(x, w, b, residual=torch.ones(2, 33, 40))
    assert rel_err(out2, ref + 1) <= 1e-6
    with transkd_fast.use_backend("reference"):  # the baseline keeps F.linear
        assert onednn.linear(x, w, b).grad_fn.name() == F.linear(x, w, b).grad_fn.name()


def test_linear_strided_input_takes_plain_path():
    x = torch.randn(8, 40)[:, ::2]  # non-contiguous: F.linear, same result
    w, r = torch.randn(6, 20), torch.randn(8, 6)
    with torch.no_grad():
        out = onednn.linear(x, w, None, r)
    assert torch.equal(out, F.linear(x, w) + r)


@pytest.mark.parametrize("B,C,H,W", [(2, 24, 9, 13), (1, 5, 1, 1), (2, 64, 16, 32)])
def test_dwconv_gelu_matches_aten(B, C, H, W):
    torch.manual_seed(C)
    x = torch.randn(B, C, H, W).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(C, 1, 3, 3) * 0.4, torch.randn(C) * 0.1
    ref = F.gelu(F.conv2d(x, w, b, 1, 1, 1, C))
    with torch.no_grad():
        out = onednn.dwconv_gelu(x, w, b)
        plain = onednn.dwconv_gelu(x.contiguous(), w, b)  # NCHW input: the ATen ops
    assert rel_err(out, ref) <= 1e-6
    assert torch.equal(plain, F.gelu(F.conv2d(x.contiguous(), w, b, 1, 1, 1, C)))


def test_fast_path_conditions():
    x = torch.randn(4, 8)
    assert not onednn.fast_path(x)  # autograd on
    with torch.no_grad():
        assert onednn.fast_path(x)
        assert not onednn.fast_path(x.double())
        assert not onednn.fast_path(x.half())
        assert onednn.fast_path(x.bfloat16()) is onednn.BF16_AVAILABLE  # bf16 primitives where the CPU has them
        with transkd_fast.use_backend("reference"):  # the original-style baseline stays plain ATen
            assert not onednn.fast_path(x)
        with transkd_fast.use_backend("torch"):
            assert onednn.fast_path(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in bf16, as autocast's F.linear
            assert onednn.compute_dtype(x) == (torch.bfloat16 if onednn.BF16_AVAILABLE else None)
        with torch.autocast("cpu", dtype=torch.float16):  # any other autocast dtype: ATen's ops
            assert not onednn.fast_path(x)


def test_mixffn_residual_needs_fast_path():
    m = MixFFN(8, 16).eval()
    x = torch.randn(1, 6, 8)
    with pytest.raises(RuntimeError, match="oneDNN inference path"):
        m(x, 2, 3, residual=x)  # autograd on: no fused residual


def test_mit_no_grad_matches_reference_and_uses_fused_residuals(monkeypatch):
    torch.manual_seed(0)
    model = build_model("segformer_b0", num_classes=7).eval()
    x = torch.randn(2, 3, 64, 96)
    calls = {"residual": 0, "plain": 0}
    real = onednn.linear

    def spy(x, w, b=None, residual=None):
        calls["residual" if residual is not None else "plain"] += 1
        return real(x, w, b, residual)

    monkeypatch.setattr(onednn, "linear", spy)
    with torch.no_grad():
        feats, logits, embeds = model(x, return_features=True)
        with transkd_fast.use_backend("reference"):
            r_feats, r_logits, r_embeds = model(x, return_features=True)
    blocks = sum(model.backbone.depths)
    assert calls["residual"] == 2 * blocks  # proj and fc2 of every block, in the fast run only
    for a, b in zip(feats + embeds + [logits], r_feats + r_embeds + [r_logits]):
        assert rel_err(a, b) <= 1e-5
