"""LVT, the original TransKD code's third student (issue #15 item 2): construction, names, the two
attentions against references written from their definitions, forward/backward, B2 → LVT TransKD."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel

import transkd_fast
from transkd_fast.distill import TransKD
from transkd_fast.models import build_model, load_pretrained
from transkd_fast.models.lvt import LVT_CONFIG, ConvolutionalSelfAttention, RecursiveAtrousSelfAttention

NUM_CLASSES = 20


@functools.lru_cache(maxsize=None)
def _template(name: str = "lvt"):
    return build_model(name, num_classes=NUM_CLASSES)


def _lvt():
    return copy.deepcopy(_template())


def _count(params) -> int:
    return sum(p.numel() for p in params)


def lvt_params_from_config(num_classes: int) -> int:
    """The original's construction counted by hand (train/models/lvt/backbone.py, class ``lvt``:
    widths [64, 64, 160, 256], depths 2 each, heads [2, 2, 5, 8], MLP ratios [4, 8, 4, 4], depthwise
    MLPs in stages 2-4, sr [8, 4, 2, 1], attention CSA then RASA, qkv_bias False, decoder 256).

    - patch embedding: conv k·k·C_in·C + C, LayerNorm 2C (k = 7 for stage 1, else 3);
    - block: 2 LayerNorms 4C; MLP (hidden h = ratio·C): fc1 C·h + h, fc2 h·C + C, plus the 3×3
      depthwise conv 9h + h when ``mlp_depconv``;
    - CSA (stage 1, k = 3, k² = 9): ``attn`` Linear C → 81·heads (+ bias), ``weight`` grouped 1×1
      conv (9C)·(9C)/9 = 9C² (no bias), ``proj`` C² + C;
    - RASA: q C², kv 2C² (no bias), proj C² + C, ``ds`` depthwise 3×3 weight 9C (no bias), and when
      sr > 1 the ``sr`` conv sr²·C² + C with its LayerNorm 2C;
    - head: linear_c{i} C_i·256 + 256, linear_fuse 1×1 conv 1024·256 (no bias) + BN 2·256,
      linear_pred 256·K + K.
    """
    dims, depths, heads = LVT_CONFIG["embed_dims"], LVT_CONFIG["depths"], LVT_CONFIG["num_heads"]
    ratios, depconv, srs, kinds = (LVT_CONFIG[k] for k in ("mlp_ratios", "mlp_depconv", "sr_ratios", "sa_layers"))
    total, c_in = 0, 3
    for i, c in enumerate(dims):
        k = 7 if i == 0 else 3
        total += k * k * c_in * c + c + 2 * c
        h = ratios[i] * c
        mlp = c * h + h + h * c + c + (9 * h + h if depconv[i] else 0)
        if kinds[i] == "csa":
            attn = (c * 81 * heads[i] + 81 * heads[i]) + 9 * c * c + (c * c + c)
        else:
            attn = 3 * c * c + (c * c + c) + 9 * c + ((srs[i] ** 2 * c * c + c + 2 * c) if srs[i] > 1 else 0)
        total += depths[i] * (4 * c + mlp + attn)
        c_in = c
    e = LVT_CONFIG["decoder_dim"]
    total += sum(c * e + e for c in dims) + 4 * e * e + 2 * e + e * num_classes + num_classes
    return total


def test_params_equal_the_original_construction():
    model = _template()
    assert lvt_params_from_config(NUM_CLASSES) == 3_837_176  # the arithmetic above, evaluated once by hand
    assert _count(model.parameters()) == lvt_params_from_config(NUM_CLASSES)
    # ADE20K's 150 classes: under 4 M with the decoder, as the LVT paper states
    ade = _count(build_model("lvt", num_classes=150).parameters())
    assert ade == lvt_params_from_config(150) and ade < 4_000_000
    assert model.embed_dims == [64, 64, 160, 256] and model.num_classes == NUM_CLASSES


def test_names_are_the_originals_and_an_original_checkpoint_loads():
    model = _template()
    keys = set(model.state_dict())
    for k in ["backbone.0.0.proj.weight", "backbone.0.0.norm.bias", "backbone.0.1.1.attn.attn.weight",
              "backbone.0.1.0.attn.weight.weight", "backbone.0.1.0.mlp.fc1.weight", "backbone.1.1.0.attn.q.weight",
              "backbone.1.1.1.attn.kv.weight", "backbone.1.1.0.attn.sr.weight", "backbone.2.1.0.attn.norm.weight",
              "backbone.3.1.1.attn.ds.weight", "backbone.3.1.0.mlp.depconv.weight", "backbone.2.1.1.mlp.fc2.bias",
              "decode_head.linear_c4.proj.weight", "decode_head.linear_fuse.conv.weight",
              "decode_head.linear_fuse.bn.running_var", "decode_head.linear_pred.weight"]:
        assert k in keys, k
    assert not any(".attn.q.bias" in k or ".attn.kv.bias" in k or "ds.bias" in k or "sr." in k and "backbone.3" in k
                   for k in keys)
    # The original LVT file: backbone names as ours, head at the top level.
    g = torch.Generator().manual_seed(1)
    sd = {(k.split(".", 1)[1] if k.startswith("decode_head.") else k):
          (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
          for k, v in model.state_dict().items()}
    fresh = _lvt()
    report = load_pretrained(fresh, sd, strict=True)
    assert report.complete and len(report.loaded) == report.total
    assert torch.equal(fresh.decode_head.linear_c2.proj.weight, sd["linear_c2.proj.weight"])
    assert torch.equal(fresh.backbone[2][1][0].attn.ds.weight, sd["backbone.2.1.0.attn.ds.weight"])


def csa_by_definition(m: ConvolutionalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """CSA from its definition, one window and one position at a time (tiny sizes only).

    Windows l at stride s over the zero-padded map, k² positions j each. Weights: a_l =
    softmax_j(scale · attn(mean of the s×s cell of l)) per head, a k²×k² matrix (row i, column j);
    values v_{l,j} = W_j u_{l,j}, u the input pixel at position j of window l (0 outside);
    o_{l,i} = Σ_j a_l[i, j] v_{l,j}; output pixel = Σ of the o_{l,i} whose position lands on it."""
    B, H, W, C = x.shape
    k, s, p, heads = m.kernel_size, m.stride, m.padding, m.num_heads
    K, d = k * k, C // heads
    h, w = math.ceil(H / s), math.ceil(W / s)
    Wj = m.weight.weight.view(K, C, C)
    out = torch.zeros(B, H, W, C, dtype=x.dtype)
    for wy in range(h):
        for wx in range(w):
            cell = x[:, wy * s:(wy + 1) * s, wx * s:(wx + 1) * s].mean(dim=(1, 2))  # ceil-mode pooling
            a = F.linear(cell, m.attn.weight, m.attn.bias).view(B, heads, K, K)
            a = (a * m.scale).softmax(dim=-1)
            v = torch.zeros(B, K, C, dtype=x.dtype)
            pos = []
            for j in range(K):
                y, xx = wy * s - p + j // k, wx * s - p + j % k
                pos.append((y, xx))
                if 0 <= y < H and 0 <= xx < W:
                    v[:, j] = x[:, y, xx] @ Wj[j].T
            vh = v.view(B, K, heads, d)
            for i, (y, xx) in enumerate(pos):
                if 0 <= y < H and 0 <= xx < W:
                    o = torch.einsum("bhj,bjhd->bhd", a[:, :, i], vh).reshape(B, C)
                    out[:, y, xx] += o
    return F.linear(out, m.proj.weight, m.proj.bias)


@pytest.mark.parametrize("H,W", [(4, 6), (5, 7)])
def test_csa_matches_its_definition(H, W):
    m = ConvolutionalSelfAttention(8, 2).double()
    x = torch.randn(2, H, W, 8, dtype=torch.float64)
    assert_close_rel(m(x), csa_by_definition(m, x), 1e-12, "CSA")


def rasa_by_definition(m: RecursiveAtrousSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """RASA written out: inner(x) = proj(softmax(q kᵀ/√d) v), q = Σ_r SiLU(dwconv_r(x W_qᵀ)),
    k, v from sr-reduced + LayerNorm'd x; out = SiLU(inner(SiLU(inner(x)) + x))."""
    def inner(x):
        B, H, W, C = x.shape
        h, d = m.num_heads, C // m.num_heads
        q = (x @ m.q.weight.T).permute(0, 3, 1, 2)
        q = sum(F.silu(F.conv2d(q, m.ds.weight, None, 1, r, r, C)) for r in m.ds.dilations)
        q = q.flatten(2).transpose(1, 2).reshape(B, H * W, h, d).transpose(1, 2)
        src = x.reshape(B, H * W, C)
        if m.sr_ratio > 1:
            src = F.conv2d(x.permute(0, 3, 1, 2), m.sr.weight, m.sr.bias, stride=m.sr_ratio).flatten(2).transpose(1, 2)
            src = F.layer_norm(src, (C,), m.norm.weight, m.norm.bias, m.norm.eps)
        kv = src @ m.kv.weight.T
        k = kv[..., :C].reshape(B, -1, h, d).transpose(1, 2)
        v = kv[..., C:].reshape(B, -1, h, d).transpose(1, 2)
        a = (q @ k.transpose(-2, -1) / math.sqrt(d)).softmax(-1)
        o = (a @ v).transpose(1, 2).reshape(B, H, W, C)
        return o @ m.proj.weight.T + m.proj.bias
    return F.silu(inner(F.silu(inner(x)) + x))


@pytest.mark.parametrize("sr,H,W", [(1, 3, 5), (2, 6, 8), (4, 8, 12)])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_rasa_matches_its_definition_through_efficient_attention(sr, H, W, backend, monkeypatch):
    import transkd_fast.models.lvt as lvt_mod

    m = RecursiveAtrousSelfAttention(10, 2, sr_ratio=sr)
    x = torch.randn(2, H, W, 10)
    calls = []
    real = lvt_mod.efficient_attention
    monkeypatch.setattr(lvt_mod, "efficient_attention", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    with transkd_fast.use_backend(backend):
        out = m(x)
    assert calls == [torch.Size([2, H * W, 2, 5])] * 2  # two recursions, q as [B, N, heads, D]
    assert_close_rel(out, rasa_by_definition(m, x), 2e-5, f"RASA sr={sr}")


def test_forward_contract_and_backward():
    """At a size no stage divides evenly (CSA's ceil-mode pooling and fold, odd grids)."""
    H, W = 36, 52
    model = _lvt().train()
    x = torch.randn(1, 3, H, W)
    feats, logits, embeds = model(x, return_features=True)
    sizes = [(math.ceil(H / 4), math.ceil(W / 4))]
    for _ in range(3):
        sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
    assert [tuple(f.shape) for f in feats] == [(1, c, *s) for c, s in zip(model.embed_dims, sizes)]
    assert [tuple(e.shape) for e in embeds] == [(1, s[0] * s[1], c) for c, s in zip(model.embed_dims, sizes)]
    assert tuple(logits.shape) == (1, NUM_CLASSES, *sizes[0])
    # embeddings are the patch-embedding conv's tokens before its LayerNorm, as the original returns them
    conv = model.backbone[1][0].proj
    assert_close_rel(embeds[1], conv(feats[0]).flatten(2).transpose(1, 2), 1e-6, "stage-2 embedding")
    (logits.square().mean() + sum(e.mean() for e in embeds)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sum(int(p.grad.abs().sum() > 0) for p in model.parameters()) == len(list(model.parameters()))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x, return_features=True)[1])


def test_b2_to_lvt_transkd_step():
    student, teacher = _lvt(), build_model("segformer_b2", num_classes=NUM_CLASSES)
    kd = TransKD(student, teacher, variant="base")
    s, t = [64, 64, 160, 256], [64, 128, 320, 512]
    assert kd.student_dims == s and kd.teacher_dims == t
    # PEA: Linear per stage; CSF: 1×1 conv + BN to 64, 3×3 conv + BN to the teacher width, and on the
    # three fusing stages the squeeze (64 → 32, with and without BN) and two 32 → 64 convs with bias.
    pea = sum(a * b + b for a, b in zip(s, t))
    csf = sum(c * 64 + 128 + 64 * 9 * ct + 2 * ct for c, ct in zip(s, t)) + 3 * (2 * 64 * 32 + 64 + 2 * (32 * 64 + 64))
    assert _count(kd.kd_parameters()) == pea + csf
    opt = torch.optim.AdamW(kd.trainable_parameters(), lr=1e-3)
    images = torch.randn(2, 3, 32, 64)  # the smallest input LVT takes: stage 2's 4×8 grid meets its sr = 4
    labels = torch.randint(0, NUM_CLASSES, (2, 8, 16))
    before = student.backbone[0][1][0].attn.attn.weight.detach().clone()
    out = kd(images, labels)
    for k in ("loss", "ce", "feature", "embed"):
        assert torch.isfinite(out[k]) and out[k] > 0, k
    assert_close_rel(out["loss"], out["ce"] + out["feature"] + out["embed"], 1e-6, "loss = ce + feature + embed")
    out["loss"].backward()
    # every KD parameter learns, except CSF's batch-1 squeeze (fc1: the batch here is 2)
    assert [n for n, p in kd.csf.named_parameters() if p.grad is None] == [f"stages.{i}.fc1.0.weight" for i in range(3)]
    assert all(p.grad is not None for p in kd.pea.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    opt.step()
    assert not torch.equal(student.backbone[0][1][0].attn.attn.weight, before)


def test_flops_paper_convention_leaves_out_both_attentions():
    from transkd_fast import flops

    model = _lvt().eval()
    H, W = 32, 64
    c = flops.analyze(model, torch.randn(1, 3, H, W))
    assert not {k: v for k, v in c.unsupported.items() if k.startswith("transkd_fast::")}
    # CSA (stage 1, 8×16 map, 4×8 windows of 9 positions): weights @ values = L·81·C multiply-adds per block;
    # RASA: q kᵀ and P v = 2·N·Nkv·C per pass, 2 passes per block; N, Nkv from the stage grids and sr.
    grids = [(8, 16), (4, 8), (2, 4), (1, 2)]
    expected = 2 * (4 * 8) * 81 * 64
    for i in range(1, 4):
        (h, w), sr, ch = grids[i], LVT_CONFIG["sr_ratios"][i], LVT_CONFIG["embed_dims"][i]
        n, nkv = h * w, (h // sr or 1) * (w // sr or 1) if sr > 1 else h * w
        expected += 2 * 2 * (2 * n * nkv * ch)
    assert c.attention == expected
    assert c.full - c.paper == expected and c.paper > 0
