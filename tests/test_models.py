"""MiT / SegFormer / PVTv2 Semantic FPN: sizes, names, the forward contract, the folded head,
the attention's strided inputs, backends, and torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel, rel_err

import transkd_fast
import transkd_fast.models.mit as mit_module
from transkd_fast.models import (
    MODELS,
    MixVisionTransformer,
    SegFormer,
    SemanticFPN,
    build_model,
    mit_b0,
    mit_b1,
    mit_b2,
    mit_b3,
    mit_b4,
    mit_b5,
    pvt_v2_b0,
    pvt_v2_b2,
    pvt_v2_b5,
)


def n_params(m: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in m.parameters()) / 1e6, 2)


@pytest.mark.parametrize("name, millions", [
    ("segformer_b0", 3.72), ("segformer_b2", 27.36), ("pvt_v2_b0", 7.53), ("pvt_v2_b2", 29.10)])
def test_param_counts_at_20_classes(name, millions):
    with torch.device("meta"):
        assert n_params(build_model(name, num_classes=20)) == millions


def test_backbone_param_counts_and_configs():
    with torch.device("meta"):
        assert n_params(pvt_v2_b0()) == 3.41
        assert n_params(pvt_v2_b2()) == 24.85
        for ctor, dims, depths in [(mit_b0, [32, 64, 160, 256], [2, 2, 2, 2]), (mit_b1, [64, 128, 320, 512], [2] * 4),
                                   (mit_b2, [64, 128, 320, 512], [3, 4, 6, 3]), (mit_b3, None, [3, 4, 18, 3]),
                                   (mit_b4, None, [3, 8, 27, 3]), (mit_b5, None, [3, 6, 40, 3])]:
            m = ctor()
            assert [len(getattr(m, f"block{i}")) for i in range(1, 5)] == depths
            assert m.embed_dims == (dims or [64, 128, 320, 512])
            assert m.block1[0].mlp.fc1.out_features == 4 * m.embed_dims[0]
        b5 = pvt_v2_b5()
        assert [b5.block1[0].mlp.fc1.out_features, b5.block3[0].mlp.fc1.out_features] == [4 * 64, 4 * 320]
        b0 = pvt_v2_b0()
        assert [b0.block1[0].mlp.fc1.out_features, b0.block3[0].mlp.fc1.out_features] == [8 * 32, 4 * 160]
    zoo = [f"segformer_b{i}" for i in range(6)] + [f"pvt_v2_b{i}" for i in range(6)] + ["lvt"]
    assert sorted(MODELS) == sorted(zoo)
    with pytest.raises(ValueError, match="unknown model 'segformer_b9'"):
        build_model("segformer_b9")


def test_nvlabs_names_eps_and_stochastic_depth():
    m = mit_b0()
    keys = set(m.state_dict())
    for k in ["patch_embed1.proj.weight", "patch_embed4.norm.bias", "block1.0.norm1.weight", "block1.0.attn.q.bias",
              "block1.1.attn.kv.weight", "block1.0.attn.sr.weight", "block1.0.attn.norm.weight",
              "block3.1.attn.proj.weight", "block2.0.norm2.bias", "block4.1.mlp.fc1.weight",
              "block4.1.mlp.dwconv.dwconv.weight", "block4.1.mlp.fc2.bias", "norm1.weight", "norm4.bias"]:
        assert k in keys, k
    assert "block4.0.attn.sr.weight" not in keys and "block4.0.attn.norm.weight" not in keys  # sr = 1
    assert m.block1[0].attn.kv.weight.shape == (64, 32) and m.block1[0].attn.sr.kernel_size == (8, 8)
    assert m.block1[0].norm1.eps == 1e-6 and m.norm1.eps == 1e-6 and m.block2[1].norm2.eps == 1e-6
    assert m.block1[0].attn.norm.eps == 1e-5 and m.patch_embed1.norm.eps == 1e-5
    assert m.patch_embed1.proj.stride == (4, 4) and m.patch_embed2.proj.kernel_size == (3, 3)
    rates = [getattr(blk.drop_path, "p", 0.0) for i in range(1, 5) for blk in getattr(m, f"block{i}")]
    assert rates == pytest.approx([0.1 * i / 7 for i in range(8)])
    # NVlabs init: Linear trunc_normal(std .02) (cut at ±2, as timm's), zero bias;
    # conv normal(0, sqrt(2 / fan_out)).
    fc = m.block4[0].mlp.fc1
    assert 0.019 < fc.weight.std() < 0.021 and not fc.bias.any()
    dw = m.block1[0].mlp.dwconv.dwconv.weight  # fan_out = 9 · 128 / 128
    assert 0.8 * (2 / 9) ** 0.5 < dw.std() < 1.2 * (2 / 9) ** 0.5


@pytest.mark.parametrize("name", ["segformer_b0", "pvt_v2_b0"])
def test_forward_contract(name):
    model = build_model(name, num_classes=7).eval()
    assert isinstance(model, SegFormer if name.startswith("segformer") else SemanticFPN)
    assert isinstance(model.backbone, MixVisionTransformer)
    assert model.embed_dims == [32, 64, 160, 256] and model.num_classes == 7 and model.variant == name
    x = torch.randn(2, 3, 60, 100)  # sizes not divisible by 32: stage sizes round up
    with torch.no_grad():
        logits = model(x)
        feats, logits2, embeds = model(x, return_features=True)
        bfeats, bembeds = model.backbone(x)
        head = model.decode_head(feats) if name.startswith("segformer") else model.decode_head(model.neck(feats))
    assert logits.shape == (2, 7, 15, 25) and logits.is_contiguous()
    sizes = [(15, 25), (8, 13), (4, 7), (2, 4)]
    assert [tuple(f.shape) for f in feats] == [(2, c, h, w) for c, (h, w) in zip(model.embed_dims, sizes)]
    assert [tuple(e.shape) for e in embeds] == [(2, h * w, c) for c, (h, w) in zip(model.embed_dims, sizes)]
    for a, b in zip(feats + embeds + [logits2, head], bfeats + bembeds + [logits, logits]):
        assert torch.equal(a, b)
    # patch embeddings are the tokens right after patch_embed{i}'s LayerNorm
    with torch.no_grad():
        tok, H, W = model.backbone.patch_embed2(feats[0])
    assert (H, W) == sizes[1] and torch.equal(tok, embeds[1])
    assert embeds[0].abs().mean(-1).mean().item() == pytest.approx(0.8, abs=0.15)  # unit-variance LN output


def test_segformer_folded_head_matches_original_in_eval_and_train():
    model = build_model("segformer_b0", num_classes=5)
    with torch.no_grad():  # non-trivial BN statistics and affine so the eval fold is exercised
        bn = model.decode_head.linear_fuse.bn
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    x = torch.randn(2, 3, 48, 80)
    model.eval()
    with torch.no_grad():
        folded = model(x)
        model.decode_head.fold = False
        original = model(x)
    assert_close_rel(folded, original, 1e-5, "eval logits")

    model.train()
    grads = {}
    r = torch.randn_like(original)
    for fold in (True, False):
        model.decode_head.fold = fold
        model.zero_grad()
        torch.manual_seed(123)  # same drop-path and Dropout2d masks on both paths
        out = model(x)
        (out * r).sum().backward()
        grads[fold] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert_close_rel(grads[True][0], grads[False][0], 1e-5, "train logits")
    flat = {fold: torch.cat([g.flatten() for g in grads[fold][1].values()]) for fold in grads}
    assert_close_rel(flat[True], flat[False], 1e-5, "all gradients")
    # Per tensor for the head's weights (its biases and norm4's get ~0 gradient: the training-mode
    # BatchNorm removes any per-channel constant, so their relative error means nothing).
    for n, g in grads[False][1].items():
        if n.startswith("decode_head") and n.endswith("weight"):
            assert_close_rel(grads[True][1][n], g, 1e-4, f"grad {n}")


@pytest.mark.parametrize("tile_elems", [1, 3 * 24 * 64 + 1, 1 << 20])  # a row per tile; partial last tile; one tile
@pytest.mark.parametrize("hw", [(48, 80), (93, 187), (64, 96)])
@pytest.mark.parametrize("fused", [True, False], ids=["c-kernel", "aten"])
def test_tiled_inference_head_matches_original(hw, tile_elems, fused, monkeypatch):
    """CPU inference runs the folded head in tiles of stage-1 rows (SegFormerHead._tiled_logits):
    the original head's logits (unfolded, BN in eval) within 1e-5, at odd sizes (stage maps of
    odd height and width, the bilinear weights computed as ATen does) and any tiling; taken only
    under inference (not with autograd, in training, with a hook or under the reference backend).
    Both routes of a tile's middle: the C kernel (upsample_add_relu) and the ATen ops
    (``TRANSKD_FAST_CPU_KERNELS=0``), each checked to be the one that ran."""
    from transkd_fast import use_backend
    from transkd_fast.models import segformer
    from transkd_fast.ops import upsample_add_relu as uar

    monkeypatch.setenv("TRANSKD_FAST_CPU_KERNELS", "1" if fused else "0")
    assert uar.kernel_available() == fused, "the C kernel must build here (a C compiler, as Triton needs)"
    kernel_calls, real_kernel = [], uar.upsample_add_relu
    monkeypatch.setattr(uar, "upsample_add_relu", lambda *a, **k: kernel_calls.append(1) or real_kernel(*a, **k))
    monkeypatch.setattr(segformer, "HEAD_TILE_ELEMS", tile_elems)
    torch.manual_seed(hw[0])
    model = build_model("segformer_b0", num_classes=7, decoder_dim=64).eval()
    head = model.decode_head
    with torch.no_grad():
        bn = head.linear_fuse.bn
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    x = torch.randn(2, 3, *hw)
    calls, real = [], segformer.SegFormerHead._tiled_logits
    monkeypatch.setattr(segformer.SegFormerHead, "_tiled_logits", lambda self, f: calls.append(1) or real(self, f))
    with torch.inference_mode():
        tiled = model(x)
        assert calls == [1]
        head.fold = False
        original = model(x)
        head.fold = True
        with use_backend("reference"):
            reference = model(x)
    assert calls == [1]  # neither unfolded nor under the reference backend
    assert bool(kernel_calls) == fused
    assert tiled.is_contiguous() and tiled.shape == original.shape
    assert_close_rel(tiled, original, 1e-5, "tiled head vs original")
    assert_close_rel(tiled, reference, 1e-5, "tiled head vs reference backend")
    untiled = model(x).detach()  # autograd on: the untiled fold
    assert calls == [1]
    assert_close_rel(untiled, original, 1e-5, "untiled fold")
    handle = head.linear_pred.register_forward_hook(lambda *a: None)
    with torch.no_grad():
        model(x)
    handle.remove()
    model.train()
    with torch.no_grad():
        model(x)
    assert calls == [1]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("p_drop", [0.1, 0.0])
def test_fused_head_tail_matches_modules(momentum, p_drop):
    # _HeadTail (BN train → ReLU → Dropout2d → linear_pred on tokens) against the plain modules:
    # logits, every gradient, the running statistics and the batch counter, same dropout masks.
    from transkd_fast.models.mit import nchw_to_tokens, tokens_to_nchw

    torch.manual_seed(0)
    heads = {}
    for kind in ("fused", "plain"):
        torch.manual_seed(0)
        h = build_model("segformer_b0", num_classes=6, dropout=p_drop).decode_head.train()
        h.linear_fuse.bn.momentum = momentum
        with torch.no_grad():
            h.linear_fuse.bn.weight.uniform_(0.5, 1.5)
            h.linear_fuse.bn.bias.normal_()
        heads[kind] = h
    x0 = torch.randn(2, 5 * 7, 256) * 2 + 0.5
    g = torch.randn(2, 6, 5, 7)
    res = {}
    for kind, h in heads.items():
        x = x0.clone().requires_grad_()
        for step in range(2):  # twice: the running statistics and the counter accumulate
            torch.manual_seed(10 + step)
            if kind == "fused":
                assert h._train_tail_applies(x)
                out = h._train_tail(x, 5, 7)
            else:
                y = h.dropout(F.relu(h.linear_fuse.bn(tokens_to_nchw(x, 5, 7))))
                out = tokens_to_nchw(F.linear(nchw_to_tokens(y), h.linear_pred.weight.flatten(1),
                                              h.linear_pred.bias), 5, 7).contiguous()
        out.backward(g)
        bn = h.linear_fuse.bn
        res[kind] = [out, x.grad, bn.weight.grad, bn.bias.grad, h.linear_pred.weight.grad, h.linear_pred.bias.grad,
                     bn.running_mean, bn.running_var]
        assert int(bn.num_batches_tracked) == 2
    names = ["logits", "d x", "d gamma", "d beta", "d W", "d b", "running_mean", "running_var"]
    for name, a, b in zip(names, res["fused"], res["plain"]):
        assert_close_rel(a, b, 1e-5, name)


def test_fused_head_tail_gradcheck_float64():
    from transkd_fast.models.segformer import _HeadTail

    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    gamma = torch.rand(5, dtype=torch.float64).add_(0.5).requires_grad_()
    beta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.25, 0.0, 1.25, 1.25, 1.25], [0.0, 1.25, 1.25, 0.0, 1.25]], dtype=torch.float64)[:, None]

    def fn(x, gamma, beta, w, b):
        rm, rv = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
        return _HeadTail.apply(x, gamma, beta, w, b, mask, rm, rv, 0.1, 1e-5)

    assert torch.autograd.gradcheck(fn, (x, gamma, beta, w, b))


def test_fused_head_tail_not_for_synchronized_bn():
    from transkd_fast.engine.distributed import GlobalBatchNorm

    head = build_model("segformer_b0", num_classes=4).decode_head.train()
    acc = torch.randn(1, 12, 256)
    assert head._train_tail_applies(acc)
    bn = head.linear_fuse.bn
    head.linear_fuse.bn = GlobalBatchNorm(bn.num_features)
    assert not head._train_tail_applies(acc)  # cross-rank statistics: the module's own forward
    head.linear_fuse.bn = bn
    with torch.no_grad():
        assert not head._train_tail_applies(acc)
    # A single value per channel (1×1 map, batch 1): the module path, which raises as BN does.
    assert not head._train_tail_applies(torch.randn(1, 1, 256))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        head([torch.randn(1, c, 1, 1) for c in (32, 64, 160, 256)])


def test_attention_receives_strided_kv_views(monkeypatch):
    real = mit_module.efficient_attention
    seen = []

    def spy(q, k, v, scale=None, backend=None):
        seen.append(dict(q=q.is_contiguous(), k=k.is_contiguous(), v=v.is_contiguous(),
                         offset=(v.data_ptr() - k.data_ptr()) // k.element_size(), C=k.shape[2] * k.shape[3],
                         same=k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr(),
                         scale=scale, D=q.shape[-1]))
        return real(q, k, v, scale)

    monkeypatch.setattr(mit_module, "efficient_attention", spy)
    model = build_model("segformer_b0").eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 128))
    assert len(seen) == 8
    for s in seen:
        assert s["q"] and not s["k"] and not s["v"] and s["same"]
        assert s["offset"] == s["C"]  # v starts C elements after k in the same kv row
        assert s["scale"] == pytest.approx(s["D"] ** -0.5)


def test_reference_and_torch_backends_agree():
    model = build_model("segformer_b0", num_classes=11).eval()
    x = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        with transkd_fast.use_backend("reference"):
            ref = model(x)
        with transkd_fast.use_backend("torch"):
            out = model(x)
    assert_close_rel(out, ref, 1e-5, "torch vs reference backend")


@pytest.mark.parametrize("ctor", [pvt_v2_b0, pvt_v2_b2])
def test_pvt_v2_semantic_fpn_forward_backward(ctor):
    model = SemanticFPN(ctor(), num_classes=20).train()
    x = torch.randn(1, 3, 128, 256)
    feats, logits, embeds = model(x, return_features=True)
    assert logits.shape == (1, 20, 32, 64)
    assert [f.shape[-2:] for f in feats] == [(32, 64), (16, 32), (8, 16), (4, 8)]
    (logits.square().mean() + sum(e.mean() for e in embeds)).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


@pytest.mark.slow
def test_torch_compile_matches_eager():
    """torch.compile (inductor, CPU) of a small SegFormer-B0 (one block per stage) matches eager."""
    from transkd_fast.models.mit import MIT_CONFIGS

    dims, _, heads, ratios, srs = MIT_CONFIGS["b0"]
    model = SegFormer(MixVisionTransformer(dims, (1, 1, 1, 1), heads, ratios, srs), num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    compiled = torch.compile(model)
    # One compile worker: on a 2-core machine the worker pool's start-up costs more than it saves.
    with torch.no_grad(), torch._inductor.config.patch(compile_threads=1):
        eager = model(x)
        out = compiled(x)
    assert_close_rel(out, eager, 1e-5, "compiled vs eager")


def _hook_targets(model):
    blk = model.backbone.block1[0]
    head = model.decode_head
    return {"q": blk.attn.q, "kv": blk.attn.kv, "proj": blk.attn.proj, "fc1": blk.mlp.fc1,
            "dwconv": blk.mlp.dwconv.dwconv, "fc2": blk.mlp.fc2, "linear_c1": head.linear_c1.proj,
            "fuse_bn": head.linear_fuse.bn, "linear_pred": head.linear_pred}


def _run(model, x, train: bool):
    torch.manual_seed(7)  # the same drop-path and Dropout2d masks in every run
    if train:
        feats, logits, _ = model(x, return_features=True)
        (logits.square().mean() + sum(f.mean() for f in feats)).backward()
        return [logits.detach()] + [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():
        feats, logits, _ = model(x, return_features=True)
    return [logits] + list(feats)


@pytest.mark.parametrize("train", [False, True], ids=["no-grad-eval", "train"])
def test_forward_hooks_fire_on_fast_paths(train):
    """The fast paths (oneDNN matmuls, lean MixFFN, fused residuals, folded head and its fused
    training tail) read weights without calling the modules; with a hook registered they call
    the modules instead: every hook fires, and a recording hook leaves the results unchanged."""
    torch.manual_seed(0)
    model = build_model("segformer_b0", num_classes=5).train(train)
    x = torch.randn(2, 3, 64, 96)
    plain = _run(model, x, train)
    model.zero_grad(set_to_none=True)
    fired = set()
    handles = [m.register_forward_hook(lambda mod, inp, out, name=name: fired.add(name))
               for name, m in _hook_targets(model).items()]
    try:
        hooked = _run(model, x, train)
    finally:
        for h in handles:
            h.remove()
    assert fired == set(_hook_targets(model))
    for a, b in zip(hooked, plain):
        if b.norm() > 1e-6:
            assert_close_rel(a, b, 1e-5, "hooked vs unhooked")
        else:  # the linear_c biases feed a training-mode BN: their true gradient is 0 (rounding noise here)
            assert (a - b).abs().max() <= 1e-6


def test_forward_hook_output_is_used_and_global_hooks_count():
    torch.manual_seed(0)
    model = build_model("segformer_b0", num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        base = model(x)
        h = model.backbone.block4[-1].mlp.fc2.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        try:
            zeroed = model(x)
        finally:
            h.remove()
        assert rel_err(zeroed, base) > 1e-3  # the hook's output replaced fc2's

        seen = []
        g = torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o: seen.append(m) if m is model.backbone.block1[0].attn.q else None)
        try:
            again = model(x)
        finally:
            g.remove()
    assert seen, "a global forward hook did not see attn.q"
    assert_close_rel(again, base, 1e-5, "global hook run vs plain")
