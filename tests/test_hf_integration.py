"""transkd_fast as a Hugging Face attention backend: a stock HF SegFormer switched to
"transkd_fast" gives the eager logits and gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rel

transformers = pytest.importorskip("transformers")

import transkd_fast.integrations.hf as tkf_hf  # noqa: E402
from transkd_fast.backend import use_backend  # noqa: E402


def _segformer(**overrides):
    cfg = transformers.SegformerConfig(
        num_channels=3, num_encoder_blocks=4, depths=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1],
        hidden_sizes=[16, 32, 64, 128], num_attention_heads=[1, 2, 4, 4], decoder_hidden_size=32,
        num_labels=5, **overrides)
    return transformers.SegformerForSemanticSegmentation(cfg)


@pytest.fixture
def calls(monkeypatch):
    """Count the calls that reach efficient_attention through the HF function."""
    seen = []
    real = tkf_hf.efficient_attention

    def spy(q, k, v, scale=None, backend=None):
        seen.append((tuple(q.shape), tuple(k.shape), q.stride(), scale, backend))
        return real(q, k, v, scale=scale, backend=backend)

    monkeypatch.setattr(tkf_hf, "efficient_attention", spy)
    yield seen
    tkf_hf.disable()


def _logits_and_grads(model, x, impl):
    model.set_attn_implementation(impl)
    model.zero_grad()
    logits = model(pixel_values=x).logits
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stock_segformer_same_logits_and_grads_as_eager(calls, backend):
    model = _segformer().eval()
    x = torch.randn(2, 3, 64, 96)
    ref, ref_grads = _logits_and_grads(model, x, "eager")
    assert tkf_hf.enable() == "transkd_fast"
    with use_backend(backend):
        out, grads = _logits_and_grads(model, x, "transkd_fast")
    assert model.config._attn_implementation == "transkd_fast"
    # one call per block (4 stages × depth 1), on [B, N, H, D] views with the head's scaling
    assert len(calls) == 4
    assert calls[0][:2] == ((2, 384, 1, 16), (2, 6, 1, 16)) and calls[0][3] == pytest.approx(0.25)
    assert calls[0][2] == (384 * 16, 16, 16, 1)  # the q_proj output itself, not a copy
    assert_close_rel(out, ref, 1e-5, f"logits ({backend})")
    assert ref_grads.keys() == grads.keys()
    for n in ref_grads:
        if n.endswith("k_proj.bias"):
            # exactly 0 in exact math (a key bias shifts every score of a row alike): both
            # must be rounding noise next to the q bias gradient
            scale = ref_grads[n.replace("k_proj", "q_proj")].norm()
            assert grads[n].norm() <= 1e-5 * scale and ref_grads[n].norm() <= 1e-5 * scale
        else:
            assert_close_rel(grads[n], ref_grads[n], 1e-5, f"grad {n} ({backend})")


def test_pinned_backend_and_refusals(calls):
    model = _segformer().eval()
    x = torch.randn(1, 3, 32, 32)
    tkf_hf.enable(backend="reference")
    model.set_attn_implementation("transkd_fast")
    model(pixel_values=x)
    assert {c[4] for c in calls} == {"reference"}

    attn = model.segformer.stages[0].blocks[0].attention
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="takes no attention_mask"):
        tkf_hf.attention_forward(attn, q, q, q, torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="as many key/value heads as query heads"):
        tkf_hf.attention_forward(attn, torch.randn(1, 2, 8, 16), q, q, None)
    attn.train()
    with pytest.raises(NotImplementedError, match="no attention dropout"):
        tkf_hf.attention_forward(attn, q, q, q, None, dropout=0.1)
    out, weights = tkf_hf.attention_forward(attn, q, q, q, None, dropout=0.0)
    assert out.shape == (1, 8, 1, 16) and weights is None

    tkf_hf.disable()
    with pytest.raises(KeyError, match="transkd_fast"):
        model(pixel_values=x)
