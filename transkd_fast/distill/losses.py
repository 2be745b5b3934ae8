"""The distillers' loss terms: thin wrappers over the fused loss ops (design §2).

Nothing is re-implemented here: HCL, the spatial/channel KL and the multi-stage weighted
MSE are :func:`~transkd_fast.ops.hcl.hcl_loss`, :func:`~transkd_fast.ops.kl_div.kd_kl_div` and
:func:`~transkd_fast.ops.weighted_mse.weighted_mse`, which dispatch by backend. This file
adds the argument checks that name the stage at fault, and the class-weighted CE.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from transkd_fast.data.cityscapes import CITYSCAPES_CLASS_WEIGHTS as _TRAIN_ID_WEIGHTS
from transkd_fast.ops.hcl import hcl_loss
from transkd_fast.ops.kl_div import kd_kl_div
from transkd_fast.ops.weighted_mse import weighted_mse

FEATURE_LOSSES = ("hcl", "cwd", "kl")

# ERFNet's hand-set Cityscapes class weights used by the original TransKD training scripts:
# the 19 train ids (one table, in transkd_fast.data.cityscapes), then void (id 19) with weight 0.
CITYSCAPES_CLASS_WEIGHTS = _TRAIN_ID_WEIGHTS + (0.0,)


def check_stage_pairs(what: str, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                      spatial_dims: int, compare_channels: bool = True) -> None:
    """Raise ``ValueError`` naming the stage when the student/teacher lists do not pair up.

    ``spatial_dims``: 2 for NCHW maps (H and W must agree), 1 for ``[B, N, C]`` embeddings (N
    must agree). ``compare_channels``: also require equal shapes (for already-aligned pairs).
    """
    if len(student) != len(teacher):
        raise ValueError(f"{what}: the student gives {len(student)} stages, the teacher {len(teacher)}; "
                         "student and teacher must have the same number of stages")
    for i, (s, t) in enumerate(zip(student, teacher)):
        if s.dim() != t.dim() or s.shape[0] != t.shape[0]:
            raise ValueError(f"{what} stage {i + 1}: student {tuple(s.shape)} and teacher {tuple(t.shape)} "
                             "differ in rank or batch")
        if spatial_dims == 2:
            ss, ts = tuple(s.shape[-2:]), tuple(t.shape[-2:])
        else:
            ss, ts = tuple(s.shape[1:2]), tuple(t.shape[1:2])
        if ss != ts:
            kind = "spatial size (H, W)" if spatial_dims == 2 else "token count N"
            raise ValueError(f"{what} stage {i + 1}: student {kind} {ss} differs from the teacher's {ts} "
                             f"(student {tuple(s.shape)}, teacher {tuple(t.shape)}); student and teacher must "
                             "downsample by the same factors")
        if compare_channels and s.shape != t.shape:
            raise ValueError(f"{what} stage {i + 1}: aligned student {tuple(s.shape)} does not match the "
                             f"teacher {tuple(t.shape)}")


def _one_dtype(*lists: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Cast every tensor to the promoted dtype of all of them (the ops take one dtype throughout).

    Under autocast the student's maps can be bf16/fp16 while the teacher's LayerNorm outputs are
    fp32; promoting (never demoting) keeps the targets' precision. A no-op when dtypes agree.
    """
    dtype = None
    for lst in lists:
        for t in lst:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return [[t if t.dtype == dtype else t.to(dtype) for t in lst] for lst in lists]


def feature_loss(kind: str, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor],
                 temperature: float = 1.0) -> torch.Tensor:
    """Stage-map distillation of aligned student maps against the teacher's.

    - ``hcl``: hierarchical context loss over all stages (one op).
    - ``cwd``: Σ_stages channel-wise KL (softmax over H·W per channel), as the original's
      ``CriterionCWD(norm_type="channel", divergence="kl")`` summed over stages.
    - ``kl``: Σ_stages pixel-wise KL (softmax over channels per pixel).
    """
    check_stage_pairs("feature loss", student_feats, teacher_feats, spatial_dims=2)
    student_feats, teacher_feats = _one_dtype(student_feats, teacher_feats)
    if kind == "hcl":
        return hcl_loss(list(student_feats), list(teacher_feats))
    if kind in ("cwd", "kl"):
        mode = "channel" if kind == "cwd" else "spatial"
        terms = [kd_kl_div(s, t, temperature=temperature, mode=mode) for s, t in zip(student_feats, teacher_feats)]
        return torch.stack(terms).sum()
    raise ValueError(f"unknown feature loss {kind!r}; choose one of {', '.join(FEATURE_LOSSES)}")


def embedding_loss(student_embeds: Sequence[torch.Tensor], teacher_embeds: Sequence[torch.Tensor],
                   weights: Sequence[float], pea: Optional[torch.nn.Module] = None) -> torch.Tensor:
    """Σ_i w_i · mse(a_i, e_t_i) with a_i = ``pea.proj[i]``(e_s_i) when ``pea`` is given, else e_s_i."""
    if len(weights) != len(student_embeds):
        raise ValueError(f"embedding loss: {len(weights)} weights for {len(student_embeds)} stages")
    aligned = list(pea(student_embeds)) if pea is not None else list(student_embeds)
    check_stage_pairs("embedding loss", aligned, teacher_embeds, spatial_dims=1)
    aligned, targets = _one_dtype(aligned, teacher_embeds)
    return weighted_mse(aligned, targets, [float(w) for w in weights])


def logit_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Pixel-wise KD: KL(p_t ‖ p_s) with p = softmax(logits / T) over classes, per pixel, × T²."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit loss: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ (same classes and output size needed)")
    (s,), (t,) = _one_dtype([student_logits], [teacher_logits])
    return kd_kl_div(s, t, temperature=temperature, mode="spatial")


def segmentation_ce(logits: torch.Tensor, labels: torch.Tensor, class_weights: Optional[torch.Tensor] = None,
                    ignore_index: int = 255) -> torch.Tensor:
    """Class-weighted cross entropy of ``logits`` ``[B, K, h, w]`` against ``labels`` ``[B, h, w]``.

    With weights, the mean is over Σ weight(label), as ``nn.NLLLoss(weight)`` in the original.
    Computed in fp32 whatever the logits' dtype.
    """
    w = class_weights.float() if class_weights is not None else None
    return F.cross_entropy(logits.float(), labels, weight=w, ignore_index=ignore_index)
