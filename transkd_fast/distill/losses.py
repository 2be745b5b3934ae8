"""The distillers' loss terms: thin wrappers over the fused loss ops (design §2).

HCL, the spatial/channel KL and the multi-stage weighted MSE are
:func:`~transkd_fast.ops.hcl.hcl_loss`, :func:`~transkd_fast.ops.kl_div.kd_kl_div` and
:func:`~transkd_fast.ops.weighted_mse.weighted_mse`, which dispatch by backend. This file adds
the argument checks that name the stage at fault, the class-weighted CE, and the original's
other CWD variants (:func:`cwd_loss`: ``channel_mean`` normalization, ``mse`` divergence) in
plain PyTorch: they reduce a map to ``[N, C]`` or read it once, too cheap for a kernel.
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
CWD_NORMS = ("channel", "channel_mean")
CWD_DIVERGENCES = ("kl", "mse")

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


def check_cwd_options(norm: str, divergence: str) -> None:
    if norm not in CWD_NORMS:
        raise ValueError(f"unknown CWD normalization {norm!r}; choose one of {', '.join(CWD_NORMS)}")
    if divergence not in CWD_DIVERGENCES:
        raise ValueError(f"unknown CWD divergence {divergence!r}; choose one of {', '.join(CWD_DIVERGENCES)}")


def cwd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, norm: str = "channel",
             divergence: str = "kl") -> torch.Tensor:
    """Channel-wise distillation of one stage, the original's ``CriterionCWD(norm, divergence, T)``.

    ``student`` and ``teacher``: ``[N, C, H, W]``; the teacher is detached. With
    ``T' = T`` for ``kl`` and ``T' = 1`` for ``mse`` (the original uses the temperature only with
    KL) and ``x' = x / T'``, per (n, c):

    - ``norm="channel"``: ``q = softmax(x' over H·W)`` (a distribution over the H·W positions);
    - ``norm="channel_mean"``: ``q = mean(x' over H·W)`` (one number per channel);

    then ``loss = D(q_s, q_t) / (N·C) · T'²`` with ``D`` summed over every element:

    - ``divergence="kl"``: ``Σ_{q_t > 0} q_t · (log q_t − log q_s)``: ``KLDivLoss(reduction="sum")``
      of ``log q_s`` under the original's PyTorch 1.7.1, whose ``kl_div`` counts an element with
      target ≤ 0 as 0 (today's PyTorch gives NaN for a negative target);
    - ``divergence="mse"``: ``Σ (q_s − q_t)²``.

    ``channel`` + ``kl`` (the paper's CWD) is the fused :func:`~transkd_fast.ops.kl_div.kd_kl_div`
    (``mode="channel"``, log-softmax); the other three are computed here in fp32 (fp64 for fp64
    inputs). ``channel_mean`` + ``kl`` takes the log of the student's channel means, as the
    original does: a student mean ≤ 0 where the teacher's is > 0 gives inf/NaN (a training run then
    stops, naming the non-finite ``feature`` term); it suits maps after a ReLU.
    """
    check_cwd_options(norm, divergence)
    if norm == "channel" and divergence == "kl":
        return kd_kl_div(student, teacher, temperature=temperature, mode="channel")
    if student.dim() != 4 or student.shape != teacher.shape:
        raise ValueError(f"CWD: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must be equal "
                         "[N, C, H, W] shapes")
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    t_eff = float(temperature) if divergence == "kl" else 1.0
    n, c = student.shape[:2]
    s = student.to(acc).flatten(2) / t_eff
    t = teacher.detach().to(acc).flatten(2) / t_eff
    if norm == "channel":
        q_s, q_t = s.softmax(dim=-1), t.softmax(dim=-1)
    else:
        q_s, q_t = s.mean(dim=-1), t.mean(dim=-1)
    if divergence == "kl":
        # where(), not F.kl_div: the original's PyTorch counted a target ≤ 0 as 0; q_t needs no grad
        d = torch.where(q_t > 0, q_t * (q_t.log() - q_s.log()), q_s.new_zeros(())).sum()
    else:
        d = F.mse_loss(q_s, q_t, reduction="sum")
    return d / (n * c) * t_eff ** 2


def feature_loss(kind: str, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor],
                 temperature: float = 1.0, cwd_norm: str = "channel", cwd_divergence: str = "kl") -> torch.Tensor:
    """Stage-map distillation of aligned student maps against the teacher's.

    - ``hcl``: hierarchical context loss over all stages (one op).
    - ``cwd``: Σ_stages :func:`cwd_loss` (``cwd_norm``, ``cwd_divergence``); the default is the
      channel-wise KL (softmax over H·W per channel), the original's
      ``CriterionCWD(norm_type="channel", divergence="kl")`` summed over stages.
    - ``kl``: Σ_stages pixel-wise KL (softmax over channels per pixel).

    ``cwd_norm`` / ``cwd_divergence`` other than the defaults are refused for ``hcl`` and ``kl``.
    """
    check_stage_pairs("feature loss", student_feats, teacher_feats, spatial_dims=2)
    if kind != "cwd" and (cwd_norm, cwd_divergence) != ("channel", "kl"):
        raise ValueError(f"cwd_norm / cwd_divergence ({cwd_norm!r}, {cwd_divergence!r}) apply to the 'cwd' feature "
                         f"loss only, not {kind!r}")
    student_feats, teacher_feats = _one_dtype(student_feats, teacher_feats)
    if kind == "hcl":
        return hcl_loss(list(student_feats), list(teacher_feats))
    if kind == "cwd":
        terms = [cwd_loss(s, t, temperature, cwd_norm, cwd_divergence) for s, t in zip(student_feats, teacher_feats)]
        return torch.stack(terms).sum()
    if kind == "kl":
        terms = [kd_kl_div(s, t, temperature=temperature, mode="spatial") for s, t in zip(student_feats, teacher_feats)]
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
