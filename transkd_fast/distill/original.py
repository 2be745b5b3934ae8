"""The original TransKD code's distiller checkpoints (RuipingL/TransKD ``build_kd_trans``): key tables.

The original saves the whole distiller (``model.state_dict()`` of its ``SKF`` / ``TransKD`` module,
sometimes under ``"state_dict"``, sometimes under DataParallel's ``module.``). Its keys, and ours
(:class:`~transkd_fast.distill.TransKD`), with n stages (4):

=====================================================  ==========================================
original                                               ours
=====================================================  ==========================================
``student.<student key>``                              ``student.<our student key>`` (any naming
                                                       :func:`~transkd_fast.models.load_pretrained`
                                                       reads: flat SegFormer, PVT ``head.``, LVT)
``skfs.{j}.<rest>`` (``CSF*.py``) / ``csfs.{j}.<rest>``  ``csf.stages.{n−1−j}.<rest>`` — a reversed
(``TransKD.py``)                                       list: ``skfs.0`` is the deepest stage
``embed{i}_linearproject.{weight,bias}``               ``pea.proj.{i−1}.*`` (i = 1…n)
``attn4.qkv.weight``, ``attn4.proj.*``                 ``gl_mixer.qkv.weight``, ``gl_mixer.proj.*``
``conv1.*``, ``conv2.*`` (the GLU's Conv1d)            ``gl_mixer.conv1.*``, ``gl_mixer.conv2.*``
``atten_weight``, ``conv_weight``                      ``gl_mixer.alpha``, ``gl_mixer.beta``
``patch_embed{i}.{proj,norm}.*`` (EA)                  ``ea.embeds.{i−1}.{proj,norm}.*``
``fuse_weights.{j}`` (EA, j = 0…2n−1)                  ``ea.fuse_weights.{j}``
=====================================================  ==========================================

Inside a CSF stage the names are the same (``conv1``, ``conv2``, ``fc``, ``fc1``, ``fcs``). A
single-stage embedding run (``--embed k``, k = 1…4) has one projection, always named
``embed1_linearproject``, for stage k: a ``TransKD(embed_stages=k)`` reads it as stage k's on its
own (the ``embed_stage`` argument, needed only to load such a file into an all-stage distiller,
must then agree); ``--embed 0`` files have none (``embed_stages="none"``). The teacher is not in these files
(the original loads it from its own file), so the teacher's tensors are neither loaded nor counted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Optional, Union

import torch
from torch import nn

from transkd_fast.models.checkpoints import (
    CheckpointError,
    LoadReport,
    _is_ignorable,
    _load_object,
    _read,
    convert_state_dict,
)

FORMAT = "transkd-original"
STUDENT_PREFIX = "student."
# The CSF stage list: ``skfs`` in CSF.py / CSF_GLMixer.py / CSF_EA.py, ``csfs`` in the later TransKD.py.
STAGE_LISTS = ("skfs", "csfs")
# GL-Mixer: original prefix (or whole name) → ours.
GL_MIXER_KEYS: dict[str, str] = {
    "attn4.qkv.": "gl_mixer.qkv.",
    "attn4.proj.": "gl_mixer.proj.",
    "conv1.": "gl_mixer.conv1.",
    "conv2.": "gl_mixer.conv2.",
    "atten_weight": "gl_mixer.alpha",
    "conv_weight": "gl_mixer.beta",
}

_STAGE_RE = re.compile(rf"^(?:{'|'.join(STAGE_LISTS)})\.(\d+)\.(.+)$")
_PEA_RE = re.compile(r"^embed(\d+)_linearproject\.(weight|bias)$")
_EA_EMBED_RE = re.compile(r"^patch_embed(\d+)\.((?:proj|norm)\.(?:weight|bias))$")
_EA_WEIGHT_RE = re.compile(r"^fuse_weights\.(\d+)$")


def kd_key_to_ours(key: str, n_stages: int = 4, embed_stage: Optional[int] = None) -> Optional[str]:
    """Our name for one of the original distiller's KD-module keys (not ``student.*``), or None
    when the key is none of the documented ones. ``embed_stage``: the stage (1…n) of a
    single-stage embedding run's ``embed1_linearproject``."""
    m = _STAGE_RE.match(key)
    if m:
        j = int(m[1])
        return f"csf.stages.{n_stages - 1 - j}.{m[2]}" if j < n_stages else None
    m = _PEA_RE.match(key)
    if m:
        i = int(m[1])
        if embed_stage is not None:
            if i != 1 or not 1 <= embed_stage <= n_stages:
                return None
            i = embed_stage
        return f"pea.proj.{i - 1}.{m[2]}" if 1 <= i <= n_stages else None
    for theirs, ours in GL_MIXER_KEYS.items():
        if key == theirs or (theirs.endswith(".") and key.startswith(theirs)):
            return ours + key[len(theirs):]
    m = _EA_EMBED_RE.match(key)
    if m:
        i = int(m[1])
        return f"ea.embeds.{i - 1}.{m[2]}" if 1 <= i <= n_stages else None
    m = _EA_WEIGHT_RE.match(key)
    if m:
        j = int(m[1])
        return f"ea.fuse_weights.{j}" if j < 2 * n_stages else None
    return None


def _unwrap(raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DataParallel's ``module.`` when every key has it."""
    if raw and all(k.startswith("module.") for k in raw):
        return {k[len("module."):]: v for k, v in raw.items()}
    return dict(raw)


def is_original_distiller(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True when the keys look like the original's distiller: a ``student.`` part and at least one
    documented KD-module key."""
    sd = _unwrap(state_dict)
    return (any(k.startswith(STUDENT_PREFIX) for k in sd)
            and any(kd_key_to_ours(k) is not None for k in sd if not k.startswith(STUDENT_PREFIX)))


def original_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The TransKD variant an original distiller file is of: ``"gl"`` (GL-Mixer keys), ``"ea"``
    (``fuse_weights``), else ``"base"``."""
    sd = _unwrap(state_dict)
    if "atten_weight" in sd or any(k.startswith("attn4.") for k in sd):
        return "gl"
    if any(_EA_WEIGHT_RE.match(k) for k in sd):
        return "ea"
    return "base"


def convert_original(state_dict: Mapping[str, torch.Tensor], n_stages: int = 4, embed_stage: Optional[int] = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Rename an original distiller state dict to our distiller naming.

    Returns ``(tensors, origin, unknown)``: ``origin`` maps each new name to the checkpoint key it
    came from; ``unknown`` lists the checkpoint keys that are neither ``student.*`` nor documented
    KD keys. Student keys go through :func:`~transkd_fast.models.checkpoints.convert_state_dict`."""
    sd = _unwrap(state_dict)
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unknown: list[str] = []
    student = {k[len(STUDENT_PREFIX):]: v for k, v in sd.items() if k.startswith(STUDENT_PREFIX)}
    if student:
        conv, orig, _ = convert_state_dict(student)
        for k, v in conv.items():
            tensors[STUDENT_PREFIX + k] = v
            origin[STUDENT_PREFIX + k] = " + ".join(STUDENT_PREFIX + o for o in orig[k].split(" + "))
    for k, v in sd.items():
        if k.startswith(STUDENT_PREFIX):
            continue
        ours = kd_key_to_ours(k, n_stages, embed_stage)
        if ours is None:
            unknown.append(k)
        else:
            tensors[ours] = v
            origin[ours] = k
    return tensors, origin, unknown


def load_original_distiller(distiller: nn.Module,
                            path_or_state_dict: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
                            strict: bool = False, embed_stage: Optional[int] = None) -> LoadReport:
    """Load an original TransKD distiller checkpoint into our ``distiller`` (a
    :class:`~transkd_fast.distill.TransKD`) and return a :class:`~transkd_fast.models.checkpoints.LoadReport`
    (format ``"transkd-original"``; counts over the student's and the KD modules' tensors, the
    teacher's left out). Raises :class:`~transkd_fast.models.checkpoints.CheckpointError`, loading
    nothing, on any shape mismatch, when nothing loaded, or with ``strict`` when anything is
    missing or unexpected. ``embed_stage`` defaults to the distiller's own single embedding stage
    (its ``embed_stage``, set by ``TransKD(embed_stages=k)``); a different value is refused."""
    own = getattr(distiller, "embed_stage", None)
    if embed_stage is None:
        embed_stage = own
    elif own is not None and int(embed_stage) != own:
        raise CheckpointError(f"embed_stage={embed_stage}, but this distiller was built with embed_stages={own}: "
                              "its PEA aligns that stage only")
    obj = _load_object(path_or_state_dict)
    raw = _read(obj)
    n = len(getattr(distiller, "student_dims", None) or [0, 0, 0, 0])
    tensors, origin, unknown = convert_original(raw, n, embed_stage)
    target = {k: v for k, v in distiller.state_dict().items() if not k.startswith("teacher.")}
    report = LoadReport(FORMAT, total=sum(1 for k in target if not k.endswith("num_batches_tracked")))
    report.unexpected.extend(unknown)
    accepted: dict[str, torch.Tensor] = {}
    mismatched = []
    student = getattr(distiller, "student", None)
    for key, value in tensors.items():
        if key in target:
            if tuple(value.shape) != tuple(target[key].shape):
                mismatched.append(f"{origin[key]!r} (our {key!r}): checkpoint shape {tuple(value.shape)}, "
                                  f"model shape {tuple(target[key].shape)}")
            else:
                accepted[key] = value
        elif (key.startswith(STUDENT_PREFIX) and student is not None
              and _is_ignorable(origin[key][len(STUDENT_PREFIX):], key[len(STUDENT_PREFIX):], student)):
            report.ignored.append(origin[key])
        else:
            report.unexpected.append(origin[key])
    if mismatched:
        shown = "; ".join(mismatched[:6]) + (f"; and {len(mismatched) - 6} more" if len(mismatched) > 6 else "")
        raise CheckpointError(f"original TransKD checkpoint does not fit this distiller (its student dims "
                              f"{getattr(distiller, 'student_dims', '?')}, teacher dims "
                              f"{getattr(distiller, 'teacher_dims', '?')}): shape mismatch "
                              f"({len(mismatched)} tensors): {shown}")
    report.loaded = sorted(k for k in accepted if not k.endswith("num_batches_tracked"))
    report.missing = [k for k in target if k not in accepted and not k.endswith("num_batches_tracked")]
    if not report.loaded:
        some = ", ".join(list(raw)[:5]) + (", ..." if len(raw) > 5 else "")
        raise CheckpointError(f"nothing loaded: 0 of the distiller's {report.total} student and KD-module tensors "
                              f"are in the checkpoint ({len(raw)} tensors, e.g. {some}); it is not an original "
                              "TransKD distiller checkpoint of this pair")
    if strict and (report.missing or report.unexpected):
        variant = original_variant(raw)
        ours = getattr(distiller, "variant", None)
        hint = f" (the checkpoint is a TransKD-{variant}, the distiller a TransKD-{ours})" if ours and ours != variant \
            else ""
        raise CheckpointError(f"strict load of an original TransKD checkpoint failed{hint}: missing keys: "
                              f"{report.missing or 'none'}; unexpected keys: {report.unexpected or 'none'}")
    distiller.load_state_dict(accepted, strict=False)
    return report
