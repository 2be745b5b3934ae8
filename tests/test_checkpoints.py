"""Checkpoint loading (NVlabs / TransKD / mmseg / Hugging Face namings) and HF export."""

from __future__ import annotations

import copy
import functools
import os
import pickle

import pytest
import torch
from helpers import assert_close_rel

from transkd_fast.models import MixVisionTransformer, build_model, load_pretrained, mit_b0, to_hf_state_dict
from transkd_fast.models.checkpoints import CheckpointError

transformers = pytest.importorskip("transformers")
from transformers import SegformerConfig, SegformerForSemanticSegmentation  # noqa: E402


@functools.lru_cache(maxsize=None)
def _template(name: str, num_classes: int, kw: tuple) -> torch.nn.Module:
    return build_model(name, num_classes=num_classes, **dict(kw))


def make(name: str = "segformer_b0", num_classes: int = 20, **kw) -> torch.nn.Module:
    """A new model: a copy of a cached template with every parameter and BN statistic redrawn
    (cheaper than building one, and different from every other call's)."""
    m = copy.deepcopy(_template(name, num_classes, tuple(sorted(kw.items()))))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for n, b in m.named_buffers():
            if n.endswith("running_var"):
                b.uniform_(0.5, 2.0)
            elif n.endswith("running_mean"):
                b.normal_()
    return m


HF_CONFIGS = {
    "b0": dict(),
    "b2": dict(depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=768),
}


def random_hf(variant: str, num_labels: int = 20) -> SegformerForSemanticSegmentation:
    """A randomly initialized HF SegFormer (offline) with every tensor perturbed, BN stats included,
    so a wrong mapping of any bias, norm or statistic shows in the logits."""
    hf = SegformerForSemanticSegmentation(SegformerConfig(num_labels=num_labels, **HF_CONFIGS[variant])).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in hf.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                b.normal_()
    return hf


def hf_logits(hf, x):
    with torch.no_grad():
        return hf(pixel_values=x).logits


@pytest.mark.parametrize("variant", ["b0", "b2"])
def test_hf_weights_give_hf_logits_and_round_trip(variant):
    hf = random_hf(variant)
    x = torch.randn(2, 3, 64, 128) if variant == "b0" else torch.randn(1, 3, 64, 96)
    ref = hf_logits(hf, x)
    # HF's port uses LayerNorm eps 1e-5 where NVlabs uses 1e-6 (see checkpoints' docstring).
    model = build_model(f"segformer_{variant}", num_classes=20, norm_eps=1e-5).eval()
    result = load_pretrained(model, hf.state_dict(), strict=True)
    assert result.format == "hf" and not result.missing and not result.unexpected
    with torch.no_grad():
        folded = model(x)
        model.decode_head.fold = False
        original = model(x)
    assert_close_rel(folded, ref, 1e-5, "folded head vs HF")
    assert_close_rel(original, ref, 1e-5, "original head vs HF")

    fresh = copy.deepcopy(hf)
    with torch.no_grad():
        for t in fresh.state_dict().values():
            t.fill_(float("nan") if t.is_floating_point() else -1)
    fresh.load_state_dict(to_hf_state_dict(model), strict=True)
    assert_close_rel(hf_logits(fresh, x), ref, 1e-7, "HF after our export")


def test_hub_file_naming_v4_loads_in_transformers_and_back(tmp_path):
    from safetensors.torch import save_file

    model = make("segformer_b0", 20, norm_eps=1e-5).eval()
    sd = to_hf_state_dict(model, style="v4")
    assert "segformer.encoder.block.0.0.attention.self.query.weight" in sd
    assert "decode_head.linear_c.3.proj.weight" in sd and "decode_head.batch_norm.running_var" in sd
    SegformerConfig(num_labels=20).save_pretrained(tmp_path)
    save_file(sd, os.path.join(tmp_path, "model.safetensors"), metadata={"format": "pt"})
    hf, info = SegformerForSemanticSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours = model(x)
    assert_close_rel(hf_logits(hf.eval(), x), ours, 1e-5, "transformers reading our v4 file")

    again = make("segformer_b0", 20, norm_eps=1e-5).eval()
    assert load_pretrained(again, sd, strict=True).format == "hf"
    assert torch.equal(again.backbone.block2[1].attn.kv.weight, model.backbone.block2[1].attn.kv.weight)


def test_missing_and_unexpected_keys_are_named():
    src = make("segformer_b0", 20)
    sd = src.state_dict()
    del sd["backbone.block2.1.attn.kv.bias"]
    sd["backbone.block2.1.attn.extra.weight"] = torch.randn(3)
    model = make("segformer_b0", 20)
    before = model.backbone.block1[0].attn.q.weight.clone()
    with pytest.raises(CheckpointError, match=r"backbone\.block2\.1\.attn\.kv\.bias.*backbone\.block2\.1\.attn\.extra"):
        load_pretrained(model, sd, strict=True)
    assert torch.equal(model.backbone.block1[0].attn.q.weight, before)  # a refused strict load changes nothing
    result = load_pretrained(model, sd)
    assert result.missing == ["backbone.block2.1.attn.kv.bias"]
    assert result.unexpected == ["backbone.block2.1.attn.extra.weight"]
    assert "backbone.block2.1.attn.kv.bias" in str(result)
    assert torch.equal(model.backbone.block1[0].attn.q.weight, src.backbone.block1[0].attn.q.weight)


def test_shape_mismatch_names_key_and_shapes():
    sd = make("segformer_b0", 20).state_dict()
    model = make("segformer_b0", 19)
    shapes = r"decode_head\.linear_pred\.weight.*\(20, 256, 1, 1\).*\(19, 256, 1, 1\)"
    with pytest.raises(CheckpointError, match=shapes):
        load_pretrained(model, sd)
    hf_sd = random_hf("b0", num_labels=20).state_dict()
    with pytest.raises(CheckpointError, match=r"decode_head\.classifier\.weight.*\(20, 256, 1, 1\)"):
        load_pretrained(model, hf_sd)  # the checkpoint's own name is reported


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_prefixes_and_flat_namings():
    src = make("segformer_b0", 20)
    sd = src.state_dict()
    # DataParallel over mmseg naming, plus mmseg's unused conv_seg (ignored, not an error)
    wrapped = {"module." + k: v for k, v in sd.items()}
    wrapped["module.decode_head.conv_seg.weight"] = torch.randn(20, 256, 1, 1)
    model = make("segformer_b0", 20)
    result = load_pretrained(model, wrapped, strict=True)
    assert result.format == "nvlabs" and result.ignored == ["module.decode_head.conv_seg.weight"]
    assert _same(model, src)
    # TransKD's flat SegFormer: backbone and head keys at the top level
    flat = {k.split(".", 1)[1]: v for k, v in sd.items()}
    assert "linear_fuse.conv.weight" in flat and "patch_embed1.proj.weight" in flat
    model = make("segformer_b0", 20)
    load_pretrained(model, flat, strict=True)
    assert _same(model, src)


def test_bare_backbone_checkpoints():
    src = make("segformer_b0", 20)
    bare = dict(src.backbone.state_dict())
    bare["head.weight"], bare["head.bias"] = torch.randn(1000, 256), torch.randn(1000)  # ImageNet classifier
    model = make("segformer_b0", 20)
    result = load_pretrained(model, bare)
    assert sorted(result.ignored) == ["head.bias", "head.weight"] and not result.unexpected
    assert result.missing and all(k.startswith("decode_head.") for k in result.missing)
    assert _same(model.backbone, src.backbone)
    backbone = mit_b0()
    assert isinstance(backbone, MixVisionTransformer)
    load_pretrained(backbone, bare, strict=True)
    assert _same(backbone, src.backbone)
    # a whole-model file into a bare backbone: the head's keys are unexpected, named as in the file
    result = load_pretrained(mit_b0(), src.state_dict())
    assert "decode_head.linear_pred.weight" in result.unexpected and not result.missing


def test_pvt_transkd_naming_with_head_prefix():
    src = make("pvt_v2_b0", 20)
    sd = {("head." + k[len("decode_head."):] if k.startswith("decode_head.") else k): v
          for k, v in src.state_dict().items()}
    assert "head.scale_heads.3.4.conv.weight" in sd and "neck.fpn_convs.0.conv.bias" in sd
    model = make("pvt_v2_b0", 20)
    load_pretrained(model, sd, strict=True)
    assert _same(model, src)
    with pytest.raises(TypeError, match="SemanticFPN"):
        to_hf_state_dict(model)


class _NotATensor:
    pass


def test_files_load_with_weights_only(tmp_path):
    src = make("segformer_b0", 20)
    for i, wrap in enumerate([lambda sd: sd, lambda sd: {"state_dict": sd, "epoch": 3, "meta": {"lr": 6e-5}},
                              lambda sd: {"model": sd, "optimizer": {"state": {}}}]):
        path = tmp_path / f"ckpt{i}.pth"
        torch.save(wrap(src.state_dict()), path)
        model = make("segformer_b0", 20)
        load_pretrained(model, str(path), strict=True)
        assert _same(model, src)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"state_dict": src.state_dict(), "obj": _NotATensor()}, unsafe)
    with pytest.raises(pickle.UnpicklingError):
        load_pretrained(make("segformer_b0", 20), unsafe)


def test_training_gradients_match_hf():
    """Backward through our model (in-place residual sums, fused kv, folded head, train-mode BN)
    equals backward through HF's with the same weights; drop path and dropout off."""
    hf = SegformerForSemanticSegmentation(SegformerConfig(num_labels=6, drop_path_rate=0.0,
                                                          classifier_dropout_prob=0.0)).train()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = build_model("segformer_b0", num_classes=6, norm_eps=1e-5, drop_path_rate=0.0, dropout=0.0).train()
    load_pretrained(model, hf.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    r = torch.randn(2, 6, 16, 16)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    (hf(pixel_values=xs[0]).logits * r).sum().backward()
    (model(xs[1]) * r).sum().backward()
    assert_close_rel(xs[1].grad, xs[0].grad, 1e-5, "input gradient")
    theirs = {n: p.grad for n, p in hf.named_parameters()}
    ours = hf_named_grads(model, theirs.keys())
    assert ours.keys() == theirs.keys()
    for n in ["segformer.stages.0.blocks.0.attention.k_proj.weight", "segformer.stages.0.blocks.1.mlp.fc1.weight",
              "segformer.stages.3.blocks.1.attention.v_proj.bias", "segformer.stages.2.patch_embeddings.proj.weight",
              "decode_head.linear_fuse.weight", "decode_head.linear_projections.1.proj.weight"]:
        assert_close_rel(ours[n], theirs[n], 1e-4, n)
    flat = [torch.cat([d[n].flatten() for n in sorted(theirs)]) for d in (ours, theirs)]
    assert_close_rel(flat[0], flat[1], 1e-5, "all parameter gradients")


def hf_named_grads(model, names):
    """Our parameter gradients under HF names (exported as if they were the weights)."""
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad)
    grads = to_hf_state_dict(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    return {n: g for n, g in grads.items() if n in names}


def test_bare_mit_to_and_from_hf_segformer_model():
    from transformers import SegformerModel

    backbone = mit_b0(norm_eps=1e-5).eval()
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = to_hf_state_dict(backbone)
    assert "stages.0.blocks.0.attention.q_proj.weight" in sd and not any(k.startswith("segformer.") for k in sd)
    hf = SegformerModel(SegformerConfig()).eval()
    hf.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats, _ = backbone(x)
        last = hf(pixel_values=x).last_hidden_state
    assert_close_rel(feats[3], last, 1e-5, "stage 4 vs SegformerModel")
    again = mit_b0(norm_eps=1e-5)
    assert load_pretrained(again, hf.state_dict(), strict=True).format == "hf"
    assert _same(again, backbone)
    v4 = to_hf_state_dict(backbone, style="v4")
    assert "encoder.block.3.1.attention.self.key.bias" in v4
    assert load_pretrained(mit_b0(norm_eps=1e-5), v4, strict=True).format == "hf"
