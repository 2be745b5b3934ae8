"""Checkpoint loading for SegFormer / MiT / Semantic-FPN PVTv2, and export to Hugging Face names.

Accepted namings (detected per key, so a file is read whatever wrote it):

- NVlabs / TransKD / PVT / mmseg: ``patch_embed{i}.*``, ``block{i}.{j}.attn.{q,kv,sr,norm,proj}.*``,
  ``norm{i}.*``; heads ``linear_c{i}.proj``, ``linear_fuse.conv``, ``linear_fuse.bn``,
  ``linear_pred`` (SegFormer) or ``neck.*`` + ``decode_head.scale_heads`` / ``conv_seg`` (FPN),
  flat (TransKD's SegFormer; its PVT model calls the head ``head``) or under mmseg's
  ``backbone.`` / ``decode_head.`` prefixes; any of them under DataParallel's ``module.``.
  A bare backbone file (ImageNet ``mit_b*.pth`` / ``pvt_v2_b*.pth``) loads into ``model.backbone``.
- Hugging Face transformers ``SegformerForSemanticSegmentation`` / ``SegformerModel``, in the
  hub files' naming (transformers 4: ``segformer.encoder.block.0.0.attention.self.query``) and in
  transformers ≥ 5's module naming (``segformer.stages.0.blocks.0.attention.q_proj``). Their
  separate key and value Linears are fused into our ``kv`` as ``[k; v]`` (rows concatenated).

Known extras that belong to no module here are ``ignored`` (reported, never an error): ImageNet
classifier ``head.*`` / ``classifier.*``, and mmseg's unused ``decode_head.conv_seg`` in NVlabs
SegFormer checkpoints. A missing ``num_batches_tracked`` buffer is not reported.

Note: Hugging Face's port uses LayerNorm eps 1e-5 in blocks and stage norms where NVlabs uses
1e-6; build with ``norm_eps=1e-5`` to reproduce its logits to float rounding.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

# Our block-internal prefix → (transformers-4 hub name, transformers-5 module name).
_BLOCK_NAMES: dict[str, tuple[str, str]] = {
    "norm1.": ("layer_norm_1.", "layernorm_before."),
    "norm2.": ("layer_norm_2.", "layernorm_after."),
    "attn.q.": ("attention.self.query.", "attention.q_proj."),
    "attn.k.": ("attention.self.key.", "attention.k_proj."),
    "attn.v.": ("attention.self.value.", "attention.v_proj."),
    "attn.sr.": ("attention.self.sr.", "attention.sequence_reduction.sequence_reduction."),
    "attn.norm.": ("attention.self.layer_norm.", "attention.sequence_reduction.layer_norm."),
    "attn.proj.": ("attention.output.dense.", "attention.o_proj."),
    "mlp.fc1.": ("mlp.dense1.", "mlp.fc1."),
    "mlp.fc2.": ("mlp.dense2.", "mlp.fc2."),
    "mlp.dwconv.dwconv.": ("mlp.dwconv.dwconv.", "mlp.dwconv.dwconv."),
}
# Every HF block prefix → ours, longest first so no prefix shadows a longer one.
_HF_BLOCK_TO_OURS = sorted(((hf, ours) for ours, names in _BLOCK_NAMES.items() for hf in names),
                           key=lambda p: -len(p[0]))

_HF_PATTERNS = [
    (re.compile(r"^(?:segformer\.)?encoder\.patch_embeddings\.(\d+)\.(proj|layer_norm)\.(.+)$"), "patch"),
    (re.compile(r"^(?:segformer\.)?stages\.(\d+)\.patch_embeddings\.(proj|layer_norm)\.(.+)$"), "patch"),
    (re.compile(r"^(?:segformer\.)?encoder\.block\.(\d+)\.(\d+)\.(.+)$"), "block"),
    (re.compile(r"^(?:segformer\.)?stages\.(\d+)\.blocks\.(\d+)\.(.+)$"), "block"),
    (re.compile(r"^(?:segformer\.)?encoder\.layer_norm\.(\d+)\.(.+)$"), "norm"),
    (re.compile(r"^(?:segformer\.)?stages\.(\d+)\.layer_norm\.(.+)$"), "norm"),
    (re.compile(r"^decode_head\.(?:linear_c|linear_projections)\.(\d+)\.proj\.(.+)$"), "linear_c"),
    (re.compile(r"^decode_head\.linear_fuse\.(weight|bias)$"), "fuse"),
    (re.compile(r"^decode_head\.batch_norm\.(.+)$"), "bn"),
    (re.compile(r"^decode_head\.classifier\.(.+)$"), "pred"),
]
_BACKBONE_RE = re.compile(r"^(patch_embed\d|block\d|norm\d)\.")
_SEGFORMER_HEAD_RE = re.compile(r"^(linear_c\d|linear_fuse|linear_pred)\.")


class CheckpointError(RuntimeError):
    """A checkpoint does not fit the model; the message names the keys."""


@dataclass
class LoadResult:
    """What :func:`load_pretrained` did. ``missing`` uses the model's names; ``unexpected`` and
    ``ignored`` use the checkpoint's names; ``format`` is ``"nvlabs"`` or ``"hf"``."""

    format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"{self.format} checkpoint: loaded {len(self.loaded)} tensors"]
        if self.missing:
            parts.append(f"missing {len(self.missing)}: {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)}: {', '.join(self.unexpected)}")
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)}: {', '.join(self.ignored)}")
        return "; ".join(parts)


def _read(path_or_state_dict) -> dict[str, torch.Tensor]:
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        obj = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
    else:
        obj = path_or_state_dict
    if not isinstance(obj, Mapping):
        raise TypeError(f"a checkpoint must be a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError("the checkpoint holds no tensors (looked at the top level, 'state_dict' and 'model')")
    return tensors


def _strip_module(key: str, all_wrapped: bool) -> str:
    return key[len("module."):] if all_wrapped else key


def _from_hf(key: str) -> Optional[str]:
    """A Hugging Face key in our full-model naming, or None when it is not an HF key."""
    for pattern, kind in _HF_PATTERNS:
        m = pattern.match(key)
        if m is None:
            continue
        g = m.groups()
        if kind == "patch":
            return f"backbone.patch_embed{int(g[0]) + 1}.{'proj' if g[1] == 'proj' else 'norm'}.{g[2]}"
        if kind == "block":
            for hf, ours in _HF_BLOCK_TO_OURS:
                if g[2].startswith(hf):
                    return f"backbone.block{int(g[0]) + 1}.{g[1]}.{ours}{g[2][len(hf):]}"
            return None
        if kind == "norm":
            return f"backbone.norm{int(g[0]) + 1}.{g[1]}"
        if kind == "linear_c":
            return f"decode_head.linear_c{int(g[0]) + 1}.proj.{g[1]}"
        if kind == "fuse":
            return f"decode_head.linear_fuse.conv.{g[0]}"
        if kind == "bn":
            return f"decode_head.linear_fuse.bn.{g[0]}"
        if kind == "pred":
            return f"decode_head.linear_pred.{g[0]}"
    return None


def _from_nvlabs(key: str) -> str:
    if key.startswith(("backbone.", "decode_head.", "neck.")):
        return key
    if _BACKBONE_RE.match(key):
        return "backbone." + key
    if _SEGFORMER_HEAD_RE.match(key):
        return "decode_head." + key
    if key.startswith(("head.scale_heads.", "head.conv_seg.")):  # TransKD's PVT model: self.head
        return "decode_head." + key[len("head."):]
    return key


def _is_ignorable(original: str, ours: str, model: nn.Module) -> bool:
    from transkd_fast.models.segformer import SegFormer

    original = original.removeprefix("module.")
    if original in ("head.weight", "head.bias") or original.startswith("classifier."):
        return True  # ImageNet classification heads (NVlabs/PVT mit files, HF ForImageClassification)
    return isinstance(model, SegFormer) and ours.startswith("decode_head.conv_seg.")


def convert_state_dict(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Rename any accepted naming to our full-model naming.

    Returns ``(tensors, origin, format)``: ``origin`` maps each new name to the checkpoint
    name(s) it came from; HF key/value pairs are fused into ``attn.kv``.
    """
    wrapped = bool(sd) and all(k.startswith("module.") for k in sd)  # DataParallel
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    hf = False
    for original, value in sd.items():
        key = _strip_module(original, wrapped)
        ours = _from_hf(key)
        if ours is not None:
            hf = True
        else:
            ours = _from_nvlabs(key)
        out[ours] = value
        origin[ours] = original
    for k_name in [k for k in out if ".attn.k." in k]:
        v_name = k_name.replace(".attn.k.", ".attn.v.")
        if v_name not in out:
            continue
        kv_name = k_name.replace(".attn.k.", ".attn.kv.")
        out[kv_name] = torch.cat([out.pop(k_name), out.pop(v_name)], dim=0)
        origin[kv_name] = f"{origin.pop(k_name)} + {origin.pop(v_name)}"
    return out, origin, "hf" if hf else "nvlabs"


def load_pretrained(model: nn.Module, path_or_state_dict: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
                    strict: bool = False) -> LoadResult:
    """Load a checkpoint file (``torch.load(..., weights_only=True)``) or state dict into ``model``.

    ``model``: a SegFormer, a Semantic FPN, or a bare backbone. The file may hold the state dict
    itself or wrap it under ``"state_dict"`` / ``"model"``. A tensor whose shape differs from the
    model's raises :class:`CheckpointError` naming the key and both shapes (nothing is loaded).
    With ``strict=True`` any missing or unexpected key raises, naming them; otherwise they are
    returned in the :class:`LoadResult`.
    """
    from transkd_fast.models.mit import MixVisionTransformer

    tensors, origin, fmt = convert_state_dict(_read(path_or_state_dict))
    if isinstance(model, MixVisionTransformer):  # a bare backbone: drop our "backbone." prefix
        tensors = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in tensors.items()}
        origin = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in origin.items()}
    target = model.state_dict()
    result = LoadResult(fmt)
    accepted: dict[str, torch.Tensor] = {}
    mismatched = []
    for key, value in tensors.items():
        if key in target:
            if tuple(value.shape) != tuple(target[key].shape):
                mismatched.append(f"{origin[key]!r} (model key {key!r}): checkpoint shape {tuple(value.shape)}, "
                                  f"model shape {tuple(target[key].shape)}")
            else:
                accepted[key] = value
        elif _is_ignorable(origin[key], key, model):
            result.ignored.append(origin[key])
        else:
            result.unexpected.append(origin[key])
    if mismatched:
        raise CheckpointError("shape mismatch: " + "; ".join(mismatched))
    result.missing = [k for k in target if k not in accepted and not k.endswith("num_batches_tracked")]
    result.loaded = sorted(accepted)
    if strict and (result.missing or result.unexpected):
        raise CheckpointError(
            f"strict load of a {fmt} checkpoint into {type(model).__name__} failed: "
            f"missing keys: {result.missing or 'none'}; unexpected keys: {result.unexpected or 'none'}")
    model.load_state_dict(accepted, strict=False)
    return result


def _default_hf_style() -> str:
    try:
        import transformers
    except ImportError:
        return "v4"
    return "v5" if int(transformers.__version__.split(".")[0]) >= 5 else "v4"


def to_hf_state_dict(model: nn.Module, style: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Our SegFormer (or bare MiT) state dict in Hugging Face naming.

    ``style``: ``"v5"`` (transformers ≥ 5 modules: ``segformer.stages.0.blocks.0.attention.q_proj``),
    ``"v4"`` (hub files / transformers 4: ``segformer.encoder.block.0.0.attention.self.query``), or
    None for the installed transformers' own naming (v4 when it is not installed). A SegFormer maps
    to ``SegformerForSemanticSegmentation``, a bare MiT to ``SegformerModel``. ``kv`` is split into
    key (first C rows) and value (last C rows). Tensors are detached copies.
    """
    from transkd_fast.models.mit import MixVisionTransformer
    from transkd_fast.models.segformer import SegFormer

    style = style or _default_hf_style()
    if style not in ("v4", "v5"):
        raise ValueError(f"style must be 'v4' or 'v5', got {style!r}")
    v5 = style == "v5"
    if isinstance(model, SegFormer):
        backbone, prefix, head = model.backbone, "segformer.", model.decode_head
    elif isinstance(model, MixVisionTransformer):
        backbone, prefix, head = model, "", None
    else:
        raise TypeError(f"Hugging Face has SegFormer naming only; cannot export {type(model).__name__}")

    out: dict[str, torch.Tensor] = {}
    for key, value in backbone.state_dict().items():
        value = value.detach().clone()
        m = re.match(r"^patch_embed(\d)\.(proj|norm)\.(.+)$", key)
        if m:
            i, part, p = int(m[1]) - 1, "proj" if m[2] == "proj" else "layer_norm", m[3]
            out[f"{prefix}stages.{i}.patch_embeddings.{part}.{p}" if v5
                else f"{prefix}encoder.patch_embeddings.{i}.{part}.{p}"] = value
            continue
        m = re.match(r"^norm(\d)\.(.+)$", key)
        if m:
            i = int(m[1]) - 1
            out[f"{prefix}stages.{i}.layer_norm.{m[2]}" if v5 else f"{prefix}encoder.layer_norm.{i}.{m[2]}"] = value
            continue
        m = re.match(r"^block(\d)\.(\d+)\.(.+)$", key)
        if not m:
            raise KeyError(f"no Hugging Face name for backbone key {key!r}")
        i, j, rest = int(m[1]) - 1, m[2], m[3]
        base = f"{prefix}stages.{i}.blocks.{j}." if v5 else f"{prefix}encoder.block.{i}.{j}."
        if rest.startswith("attn.kv."):
            half = value.shape[0] // 2
            p = rest[len("attn.kv."):]
            out[base + _BLOCK_NAMES["attn.k."][v5] + p] = value[:half].clone()
            out[base + _BLOCK_NAMES["attn.v."][v5] + p] = value[half:].clone()
            continue
        for ours, names in _BLOCK_NAMES.items():
            if rest.startswith(ours):
                out[base + names[v5] + rest[len(ours):]] = value
                break
        else:
            raise KeyError(f"no Hugging Face name for backbone key {key!r}")
    if head is not None:
        for key, value in head.state_dict().items():
            value = value.detach().clone()
            m = re.match(r"^linear_c(\d)\.proj\.(.+)$", key)
            if m:
                i = int(m[1]) - 1
                out[f"decode_head.{'linear_projections' if v5 else 'linear_c'}.{i}.proj.{m[2]}"] = value
            elif key.startswith("linear_fuse.conv."):
                out["decode_head.linear_fuse." + key[len("linear_fuse.conv."):]] = value
            elif key.startswith("linear_fuse.bn."):
                out["decode_head.batch_norm." + key[len("linear_fuse.bn."):]] = value
            elif key.startswith("linear_pred."):
                out["decode_head.classifier." + key[len("linear_pred."):]] = value
            else:
                raise KeyError(f"no Hugging Face name for decode_head key {key!r}")
    return out
