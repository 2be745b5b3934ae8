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
- Whole-distiller files (the original TransKD's ``build_kd_trans`` checkpoints, or a state dict of
  our distillers): the ``student.*`` part loads into a plain model, in any naming above; the KD
  modules' (and teacher's) keys are reported as ``ignored``. The whole distiller loads with
  :meth:`transkd_fast.distill.TransKD.load_original`.

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
from typing import Optional, Sequence, Union

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
class LoadReport:
    """What :func:`load_pretrained` did.

    ``loaded`` and ``missing`` use the model's names, ``unexpected`` and ``ignored`` the
    checkpoint's; ``format`` is ``"nvlabs"`` or ``"hf"``. ``total`` is the number of the model's
    tensors (parameters and buffers, ``num_batches_tracked`` left out, as in ``missing``), so
    ``len(loaded) + len(missing) == total``. ``complete``: nothing missing; ``fraction``: the share
    of the model's tensors that loaded; :meth:`summary`: one line for logs. A report with missing
    keys (e.g. a backbone-only file loaded into a SegFormer: the head is missing) is *partial*;
    the caller decides whether to accept it (``--allow-partial-weights``).
    """

    format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    total: int = 0

    @property
    def fraction(self) -> float:
        return len(self.loaded) / self.total if self.total else 0.0

    @property
    def complete(self) -> bool:
        return not self.missing

    def summary(self) -> str:
        """One line: how many of the model's tensors loaded, from which naming, and what is
        missing / unexpected / ignored, grouped by module (e.g. ``missing 15 (decode_head: 15)``)."""
        parts = [f"loaded {len(self.loaded)}/{self.total} model tensors ({100 * self.fraction:.1f}%) "
                 f"from a checkpoint in {self.format} naming"]
        for what, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("ignored", self.ignored)):
            if keys:
                parts.append(f"{what} {len(keys)} ({_group(keys)})")
        return "; ".join(parts)

    def __str__(self) -> str:
        parts = [f"{self.format} checkpoint: loaded {len(self.loaded)} of {self.total} tensors"]
        if self.missing:
            parts.append(f"missing {len(self.missing)}: {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)}: {', '.join(self.unexpected)}")
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)}: {', '.join(self.ignored)}")
        return "; ".join(parts)


LoadResult = LoadReport  # the name this class had before it reported totals


def _group(keys: Sequence[str], limit: int = 4) -> str:
    """``decode_head: 15, backbone.block4: 2``: counts per module (first component, or the first
    two under ``backbone``), the largest groups first."""
    counts: dict[str, int] = {}
    for k in keys:
        parts = k.removeprefix("module.").split(".")
        g = ".".join(parts[:2]) if parts[0] == "backbone" and len(parts) > 2 else parts[0]
        counts[g] = counts.get(g, 0) + 1
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    out = ", ".join(f"{g}: {n}" for g, n in items[:limit])
    return out + (f", {len(items) - limit} more groups" if len(items) > limit else "")


def _load_object(path_or_state_dict):
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        return torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
    return path_or_state_dict


def _recorded_model_name(obj) -> Optional[str]:
    """The model name a transkd_fast file records (``model.pt``: ``meta.model``; ``last.pt``:
    ``config.model``), else None."""
    if isinstance(obj, Mapping):
        for holder in ("meta", "config"):
            rec = obj.get(holder)
            if isinstance(rec, Mapping) and isinstance(rec.get("model"), str):
                return rec["model"]
    return None


def _read(path_or_state_dict) -> dict[str, torch.Tensor]:
    obj = _load_object(path_or_state_dict)
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


def student_part(tensors: Mapping[str, torch.Tensor], model: Optional[nn.Module] = None
                 ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The student's tensors of a whole-distiller checkpoint (the original TransKD's
    ``build_kd_trans`` files, or a state dict of our distillers): ``student.*`` keys with the prefix
    dropped, and the other keys (KD modules, teacher), which belong to no module of a plain model.
    A checkpoint without ``student.`` keys, or a ``model`` that itself has them (a distiller), is
    returned as it is, with no other keys. DataParallel's ``module.`` is dropped first when every
    key has it."""
    keys = list(tensors)
    wrapped = bool(keys) and all(k.startswith("module.") for k in keys)
    plain = {(k[len("module."):] if wrapped else k): v for k, v in tensors.items()}
    if not any(k.startswith("student.") for k in plain):
        return dict(tensors), []
    if model is not None and any(k.startswith("student.") for k in model.state_dict()):
        return dict(tensors), []
    student = {k[len("student."):]: v for k, v in plain.items() if k.startswith("student.")}
    others = [k for k in tensors if not (k[len("module."):] if wrapped else k).startswith("student.")]
    return student, others


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


def _architecture(tensors: Mapping[str, torch.Tensor]) -> Optional[tuple]:
    """``(dims, depths, mlp_ratios, head)`` of a checkpoint in our naming (``backbone.`` keys),
    ``head`` in ``"segformer"`` | ``"fpn"`` | None (backbone only); None when it is no MiT/PVTv2."""
    try:
        dims = tuple(int(tensors[f"backbone.patch_embed{i}.proj.weight"].shape[0]) for i in range(1, 5))
        ratios = tuple(int(tensors[f"backbone.block{i}.0.mlp.fc1.weight"].shape[0]) // dims[i - 1]
                       for i in range(1, 5))
    except (KeyError, IndexError):
        return None
    depths = []
    for i in range(1, 5):
        idx = {int(m[1]) for k in tensors if (m := re.match(rf"^backbone\.block{i}\.(\d+)\.", k))}
        depths.append(max(idx) + 1 if idx else 0)
    head = ("segformer" if any(k.startswith("decode_head.linear_c") for k in tensors)
            else "fpn" if any(k.startswith(("neck.", "decode_head.scale_heads.")) for k in tensors) else None)
    return dims, tuple(depths), ratios, head


def _num_outputs(tensors: Mapping[str, torch.Tensor]) -> Optional[int]:
    for key in ("decode_head.linear_pred.weight", "decode_head.conv_seg.weight"):
        if key in tensors and tensors[key].dim() >= 1:
            return int(tensors[key].shape[0])
    return None


def guess_model_names(path_or_state_dict) -> list[str]:
    """Every zoo name (:func:`transkd_fast.models.build_model`'s: ``segformer_b0``…``b5``,
    ``pvt_v2_b0``…``b5``) a checkpoint fits; see :func:`guess_model_name`."""
    from transkd_fast.models.mit import MIT_CONFIGS
    from transkd_fast.models.pvt_v2 import PVT_V2_CONFIGS

    obj = _load_object(path_or_state_dict)
    recorded = _recorded_model_name(obj)
    if recorded is not None:
        return [recorded]
    try:
        tensors, _, _ = convert_state_dict(student_part(_read(obj))[0])
    except (CheckpointError, TypeError):
        return []
    arch = _architecture(tensors)
    if arch is None:
        return []
    dims, depths, ratios, head = arch
    out = []
    for prefix, configs, family in (("segformer_", MIT_CONFIGS, "segformer"), ("pvt_v2_", PVT_V2_CONFIGS, "fpn")):
        if head not in (None, family):
            continue
        for variant, (c_dims, c_depths, _heads, c_ratios, _srs) in configs.items():
            if (tuple(c_dims), tuple(c_depths), tuple(c_ratios)) == (dims, depths, ratios):
                out.append(prefix + variant)
    return out


def guess_model_name(path_or_state_dict) -> Optional[str]:
    """The zoo model a checkpoint (a path, a state dict, or a file's whole object) belongs to,
    or None when it is not recognized or ambiguous.

    A transkd_fast ``model.pt`` / ``last.pt`` records its model (``meta.model`` /
    ``config.model``): that name is returned. Otherwise the name is inferred from the tensors in
    any naming :func:`load_pretrained` reads: the stage widths (``patch_embed{i}.proj``), depths
    (block indices) and MLP ratios (``fc1`` rows / width; 4 for MiT, 8 for PVTv2 b0–b4), and
    the head (SegFormer's ``linear_c*`` or the FPN's ``neck``). A bare backbone file gives the
    model built on it (``segformer_b1`` for an ``mit_b1.pth``). Bare MiT-B5 and PVTv2-B5
    backbones have the same shapes: None.
    """
    names = guess_model_names(path_or_state_dict)
    return names[0] if len(names) == 1 else None


def model_name(model: nn.Module) -> Optional[str]:
    """The zoo name of a built model (``segformer_b0``, ``pvt_v2_b2``; ``mit_b0`` / ``pvt_v2_b0``
    for a bare backbone), or None when it was not built from the zoo."""
    from transkd_fast.models.mit import MixVisionTransformer

    backbone = model if isinstance(model, MixVisionTransformer) else getattr(model, "backbone", None)
    variant = getattr(backbone, "variant", "") or ""
    if not variant:
        return None
    if backbone is model:
        return variant
    if variant.startswith("mit_") and hasattr(model, "decode_head") and hasattr(model.decode_head, "linear_pred"):
        return "segformer_" + variant[len("mit_"):]
    return variant  # Semantic FPN: named after its PVTv2 backbone


def _same_architecture(a: str, b: str) -> bool:
    """``segformer_b1`` and ``mit_b1`` (its backbone) are one architecture; so are equal names."""
    def strip(n: str) -> str:
        return n.lower().replace("-", "_").removeprefix("segformer_").removeprefix("mit_")

    return strip(a) == strip(b)


def _foreign_hint(obj, tensors: Mapping[str, torch.Tensor], model: nn.Module) -> str:
    """A sentence naming the model the checkpoint is for, when that can be told; else ''."""
    target = model_name(model)
    names = guess_model_names(obj)
    outputs = _num_outputs(tensors)
    model_outputs = _num_outputs({"decode_head." + k: v for k, v in getattr(model, "decode_head", nn.Module())
                                  .state_dict().items()})
    what = f"{target} ({model_outputs} outputs)" if target and model_outputs else (target or type(model).__name__)
    if len(names) == 1:
        name = names[0]
        if target is not None and name.removeprefix("segformer_").removeprefix("mit_") == \
                target.removeprefix("segformer_").removeprefix("mit_"):
            if outputs is not None and model_outputs is not None and outputs != model_outputs:
                return (f"the checkpoint is a {name} with {outputs} outputs, the model has {model_outputs}: "
                        f"build it with num_classes={outputs} (or load a checkpoint for {model_outputs} outputs)")
            return ""
        out = f" with {outputs} outputs" if outputs is not None else ""
        build = ("mit_" + name[len("segformer_"):] if target and target.startswith("mit_")
                 and name.startswith("segformer_") else name)  # a bare backbone: its backbone's name
        return f"the checkpoint is for {name}{out}, the model is {what}: build {build} to load it"
    if len(names) > 1:
        return f"the checkpoint fits {' or '.join(names)}, the model is {what}"
    return ""


def load_pretrained(model: nn.Module, path_or_state_dict: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
                    strict: bool = False) -> LoadReport:
    """Load a checkpoint file (``torch.load(..., weights_only=True)``) or state dict into ``model``
    and return a :class:`LoadReport` (what loaded, what is missing / unexpected / ignored, of how
    many model tensors; ``report.summary()`` is one line for the log).

    ``model``: a SegFormer, a Semantic FPN, or a bare backbone. The file may hold the state dict
    itself or wrap it under ``"state_dict"`` / ``"model"``. Raises :class:`CheckpointError`,
    loading nothing, when

    - a tensor's shape differs from the model's (the message names the keys and both shapes, and
      the model the checkpoint is for when :func:`guess_model_name` can tell: another zoo size,
      another number of outputs);
    - none of the model's tensors is in the checkpoint (a foreign file);
    - ``strict=True`` and any key is missing or unexpected (named).

    Otherwise missing keys are reported, not raised: a backbone-only file loads into a SegFormer
    with ``report.complete`` False and the head's keys in ``report.missing``; callers that need
    the whole model check ``report.complete``.
    """
    from transkd_fast.models.mit import MixVisionTransformer

    obj = _load_object(path_or_state_dict)
    raw = _read(obj)
    # A whole-distiller file (the original TransKD's, or ours): its student part loads, the KD
    # modules' and teacher's keys are reported as ignored.
    raw, distiller_keys = student_part(raw, model)
    tensors, origin, fmt = convert_state_dict(raw)
    if isinstance(model, MixVisionTransformer):  # a bare backbone: drop our "backbone." prefix
        tensors = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in tensors.items()}
        origin = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in origin.items()}
    target = model.state_dict()
    result = LoadReport(fmt, total=sum(1 for k in target if not k.endswith("num_batches_tracked")))
    result.ignored.extend(distiller_keys)
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
    full_names = convert_state_dict(raw)[0]
    if mismatched:
        hint = _foreign_hint(obj, full_names, model)
        shown = "; ".join(mismatched[:6]) + (f"; and {len(mismatched) - 6} more" if len(mismatched) > 6 else "")
        raise CheckpointError((f"{hint}\n" if hint else "") + f"shape mismatch ({len(mismatched)} tensors): {shown}")
    result.missing = [k for k in target if k not in accepted and not k.endswith("num_batches_tracked")]
    result.loaded = sorted(k for k in accepted if not k.endswith("num_batches_tracked"))
    if not result.loaded:
        hint = _foreign_hint(obj, full_names, model)
        some = ", ".join(list(raw)[:5]) + (", ..." if len(raw) > 5 else "")
        raise CheckpointError(
            f"nothing loaded: 0 of {type(model).__name__}'s {result.total} tensors are in the checkpoint "
            f"({len(raw)} tensor{'s' * (len(raw) != 1)}, {fmt} naming, e.g. {some}); it is not a checkpoint of "
            "this model" + (f"\n{hint}" if hint else ""))
    target_name = model_name(model)
    fits = guess_model_names(obj)
    if target_name and fits and not any(_same_architecture(n, target_name) for n in fits):
        # Every shape that overlaps agrees, yet the file is another model's (e.g. a deeper MiT):
        # loading its first blocks into this model would run silently wrong.
        raise CheckpointError(
            f"{_foreign_hint(obj, full_names, model)}\n(its tensors that {target_name} also has would load, "
            f"{len(result.loaded)}/{result.total}, with {len(result.unexpected)} unexpected: "
            f"{_group(result.unexpected) or 'none'}; nothing was loaded)")
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
