"""Baseline distillers for comparison runs, on the :class:`~transkd_fast.distill.transkd.Distiller` contract.

- :class:`LogitKD`: pixel-wise KD on the logits, KL(p_t ‖ p_s) per pixel with
  p = softmax(logits / T) over classes, × T² (Hinton KD applied per pixel).
- :class:`CWD`: channel-wise distillation (Shu et al.) on stage maps: per selected stage a
  1×1 conv (no bias) + BN + ReLU aligner maps the student's map to the teacher's width, then
  KL over H·W per channel, × T², summed over the stages (or another of the original's
  ``CriterionCWD`` variants: ``norm="channel_mean"``, ``divergence="mse"``). The default stage
  set is the last one only, as in TransKD's CWD baseline (``Conv_FeaturesProj``).
- :class:`ReviewKD` ("KR", Chen et al. 2021; TransKD's main baseline): attention-based fusion
  (ABF) walking deep → shallow, then HCL against the teacher's stage maps.

:func:`build_distiller` builds any distiller of this package by name.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from transkd_fast.distill.losses import check_cwd_options, feature_loss, logit_loss
from transkd_fast.distill.transkd import Distiller, TransKD


class LogitKD(Distiller):
    """Pixel-wise logit KD: ``loss = ce + weight · KL_T(teacher ‖ student)`` over the 1/4-res logits.

    The teacher runs in full (its head gives the targets). No KD modules: nothing besides the
    student trains.
    """

    uses_teacher_logits = True

    def __init__(self, student: nn.Module, teacher: nn.Module, temperature: float = 1.0, weight: float = 1.0,
                 class_weights: Optional[Sequence[float]] = None, ignore_index: int = 255) -> None:
        super().__init__(student, teacher, class_weights=class_weights, ignore_index=ignore_index)
        if getattr(student, "num_classes", None) != getattr(teacher, "num_classes", None):
            raise ValueError(f"logit KD needs the same classes: the student has {student.num_classes} outputs, "
                             f"the teacher {teacher.num_classes}")
        self.temperature = float(temperature)
        self.weight = float(weight)

    def distill_terms(self, images, s_feats, s_logits, s_embeds, t_feats, t_logits, t_embeds) -> dict:
        return {"logit": self.weight * logit_loss(s_logits, t_logits, self.temperature)}


class CWD(Distiller):
    """Channel-wise distillation on stage maps.

    ``stages``: 0-based stage indices to distill (default ``(-1,)``, the last stage, as the
    original). Aligners: ``aligners[k]`` = Conv2d 1×1 (no bias) + BatchNorm2d + ReLU, student →
    teacher width of ``stages[k]``; PyTorch's default init. ``loss = ce + weight · Σ_k
    CWD(aligner_k(student_k), teacher_k)`` with CWD = :func:`~transkd_fast.distill.losses.cwd_loss`
    (``norm``, ``divergence``); the default ``"channel"`` / ``"kl"`` is
    ``KL_channel,T(teacher_k ‖ aligner_k(student_k))``.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, stages: Sequence[int] = (-1,),
                 temperature: float = 1.0, weight: float = 1.0, class_weights: Optional[Sequence[float]] = None,
                 ignore_index: int = 255, norm: str = "channel", divergence: str = "kl") -> None:
        check_cwd_options(norm, divergence)
        super().__init__(student, teacher, class_weights=class_weights, ignore_index=ignore_index)
        self.norm, self.divergence = norm, divergence
        n = len(self.student_dims)
        idx = []
        for s in stages:
            if not -n <= s < n:
                raise ValueError(f"CWD stage {s} out of range for {n} stages")
            idx.append(s % n)
        if len(set(idx)) != len(idx) or not idx:
            raise ValueError(f"CWD stages must be distinct and non-empty, got {tuple(stages)}")
        self.stages = tuple(idx)
        self.temperature = float(temperature)
        self.weight = float(weight)
        self.aligners = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(self.student_dims[i], self.teacher_dims[i], kernel_size=1, bias=False),
                nn.BatchNorm2d(self.teacher_dims[i]),
                nn.ReLU(),
            )
            for i in self.stages
        )

    def distill_terms(self, images, s_feats, s_logits, s_embeds, t_feats, t_logits, t_embeds) -> dict:
        aligned = [a(s_feats[i]) for a, i in zip(self.aligners, self.stages)]
        target = [t_feats[i] for i in self.stages]
        return {"feature": self.weight * feature_loss("cwd", aligned, target, self.temperature, self.norm,
                                                      self.divergence)}


class ABF(nn.Module):
    """ReviewKD's attention-based fusion for one stage.

    ``x = BN(Conv1x1(C_s → mid)(feat))``; if fusing: ``y = nearest_up(res_low)``,
    ``z = sigmoid(Conv1x1(2·mid → 2, bias)([x, y]))`` (per-pixel weights), ``x = z0·x + z1·y``;
    ``out = BN(Conv3x3(mid → C_t)(x))``. Init as the original: ``kaiming_uniform_(a=1)`` on the
    two main convs, PyTorch's defaults elsewhere.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, feat: torch.Tensor, res_low: Optional[torch.Tensor] = None):
        x = self.conv1(feat)
        if self.att_conv is not None:
            y = F.interpolate(res_low, size=x.shape[-2:], mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0:1] + y * z[:, 1:2]
        return self.conv2(x), x


class ReviewKD(Distiller):
    """Knowledge Review (KR): ABF over the student's stages (deep → shallow) + HCL, × ``weight``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, mid_channels: int = 64, weight: float = 1.0,
                 class_weights: Optional[Sequence[float]] = None, ignore_index: int = 255) -> None:
        super().__init__(student, teacher, class_weights=class_weights, ignore_index=ignore_index)
        n = len(self.student_dims)
        self.weight = float(weight)
        self.abfs = nn.ModuleList(
            ABF(cs, mid_channels, ct, fuse=i < n - 1)
            for i, (cs, ct) in enumerate(zip(self.student_dims, self.teacher_dims))
        )

    def distill_terms(self, images, s_feats, s_logits, s_embeds, t_feats, t_logits, t_embeds) -> dict:
        outs: list[torch.Tensor] = [None] * len(s_feats)  # type: ignore[list-item]
        res = None
        for i in reversed(range(len(s_feats))):
            outs[i], res = self.abfs[i](s_feats[i], res)
        return {"feature": self.weight * feature_loss("hcl", outs, t_feats)}


DISTILLERS = ("transkd_base", "transkd_gl", "transkd_ea", "logit_kd", "cwd", "review_kd")


def build_distiller(kind: str, student: nn.Module, teacher: nn.Module, **kwargs) -> Distiller:
    """Build a distiller by name: one of :data:`DISTILLERS`; ``kwargs`` go to its constructor.

    ``transkd_<variant>`` is :class:`~transkd_fast.distill.transkd.TransKD` with that variant.
    """
    if kind.startswith("transkd_"):
        variant = kind[len("transkd_"):]
        if kind not in DISTILLERS:
            raise ValueError(f"unknown distiller {kind!r}; choose one of {', '.join(DISTILLERS)}")
        return TransKD(student, teacher, variant=variant, **kwargs)
    classes = {"logit_kd": LogitKD, "cwd": CWD, "review_kd": ReviewKD}
    if kind not in classes:
        raise ValueError(f"unknown distiller {kind!r}; choose one of {', '.join(DISTILLERS)}")
    return classes[kind](student, teacher, **kwargs)
