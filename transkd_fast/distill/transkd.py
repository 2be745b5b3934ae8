"""The TransKD distiller, and :class:`Distiller`, the contract every distiller follows.

A distiller owns a trainable student, a frozen teacher and its KD modules. Calling it with
``(images, labels)`` runs both networks and returns the loss terms::

    out = distiller(images, labels)   # images [B, 3, H, W]; labels [B, H/4, W/4] train ids
    out["loss"].backward()            # = ce + Σ the KD terms
    out["ce"], out["feature"], out["embed"], (out["logit"]), out["logits"]

``logits`` are the student's ``[B, K, H/4, W/4]``, the very tensor the CE was computed on
(not detached). ``feature`` and ``embed`` are always present (a zero tensor
for a distiller without that term) so that logging code can rely on the keys; ``logit`` is
present only when a logit term is configured.

The teacher is frozen: ``requires_grad=False``, always in eval mode (``.train()`` on the
distiller leaves it in eval), run under ``torch.no_grad()``, and it runs only what the losses
consume: without a logit term only ``teacher.backbone(images)`` is evaluated, never its
decode head (the original ran the full teacher and threw its logits away).
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from transkd_fast.distill.csf import CSF
from transkd_fast.distill.ea import EmbeddingAssistant
from transkd_fast.distill.gl_mixer import GLMixer
from transkd_fast.distill.losses import (
    FEATURE_LOSSES,
    check_cwd_options,
    check_stage_pairs,
    embedding_loss,
    feature_loss,
    logit_loss,
    segmentation_ce,
)
from transkd_fast.distill.pea import PEA

VARIANTS = ("base", "gl", "ea")
LOGIT_LOSSES = (None, "kl")
PAPER_EMBED_WEIGHTS = (0.1, 0.1, 0.5, 1.0)


def parse_embed_stages(value: Union[str, int], n_stages: int) -> tuple[str, tuple[int, ...]]:
    """``"all"`` | ``"none"`` | ``k`` (1…n, int or digit string) → (the canonical name, 0-based stages)."""
    v = str(value).strip().lower()
    if v == "all":
        return "all", tuple(range(n_stages))
    if v == "none":
        return "none", ()
    if v.isdigit() and 1 <= int(v) <= n_stages:
        return str(int(v)), (int(v) - 1,)
    raise ValueError(f"embed_stages must be 'all', 'none' or a stage 1..{n_stages}, got {value!r}")


def _stage_dims(model: nn.Module, who: str) -> list[int]:
    dims = getattr(model, "embed_dims", None)
    if dims is None:
        raise TypeError(f"the {who} ({type(model).__name__}) has no `embed_dims`: a distiller needs a "
                        "transkd_fast SegFormer-style model (stage widths in `embed_dims`)")
    return [int(d) for d in dims]


class Distiller(nn.Module):
    """Base of every distiller: freezing, the CE, the input checks and the forward contract.

    Subclasses set ``uses_teacher_logits`` and implement :meth:`distill_terms`, which gets the
    student's and the teacher's outputs and returns the KD terms (already weighted) by name.

    ``class_weights``: per-class CE weights (length = the student's ``num_classes``), e.g.
    :data:`~transkd_fast.distill.losses.CITYSCAPES_CLASS_WEIGHTS` for the paper's recipe (void id
    19 weighted 0); ``None`` = uniform. ``ignore_index``: label value left out of the CE.
    """

    uses_teacher_logits: bool = False
    # Run the frozen teacher before the student: its no-grad activations are freed before the
    # student's saved activations pile up, which lowers the step's peak memory. The teacher
    # uses no randomness, so the order does not change any value (the original ran it second).
    teacher_first: bool = True

    def __init__(self, student: nn.Module, teacher: nn.Module, class_weights: Optional[Sequence[float]] = None,
                 ignore_index: int = 255) -> None:
        super().__init__()
        if student is teacher:
            raise ValueError("student and teacher must be two different modules")
        self.student_dims = _stage_dims(student, "student")
        self.teacher_dims = _stage_dims(teacher, "teacher")
        if len(self.student_dims) != len(self.teacher_dims):
            raise ValueError(f"student and teacher have different stage counts: {len(self.student_dims)} "
                             f"(embed_dims {self.student_dims}) vs {len(self.teacher_dims)} "
                             f"(embed_dims {self.teacher_dims}); they must match stage for stage")
        self.student = student
        self.teacher = teacher
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.ignore_index = int(ignore_index)
        if class_weights is not None:
            w = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
            k = getattr(student, "num_classes", None)
            if k is not None and w.numel() != k:
                raise ValueError(f"class_weights has {w.numel()} entries but the student has {k} outputs")
            self.register_buffer("class_weights", w, persistent=False)
        else:
            self.register_buffer("class_weights", None, persistent=False)

    # -- freezing ------------------------------------------------------------------------

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()
        return self

    def student_model(self) -> nn.Module:
        """The plain deployable student (no KD modules attached)."""
        return self.student

    def kd_modules(self) -> Iterator[tuple[str, nn.Module]]:
        for name, module in self.named_children():
            if name not in ("student", "teacher"):
                yield name, module

    def kd_parameters(self) -> Iterator[nn.Parameter]:
        """The KD modules' parameters (CSF, PEA, GL-Mixer, EA, aligners...)."""
        for _, module in self.kd_modules():
            yield from module.parameters()

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Student + KD-module parameters: what the optimizer trains (the teacher is excluded)."""
        for p in self.student.parameters():
            if p.requires_grad:
                yield p
        for p in self.kd_parameters():
            if p.requires_grad:
                yield p

    # -- forward ---------------------------------------------------------------------------

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a floating [B, C, H, W] tensor, got {shape}")

    def _check_labels(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor of class ids, got {labels.dtype}")
        if labels.dim() == 4 and labels.shape[1] == 1:
            labels = labels[:, 0]
        B, _, h, w = logits.shape
        if tuple(labels.shape) != (B, h, w):
            raise ValueError(f"labels must have shape [B, h, w] = {[B, h, w]} (the student logits' size, 1/4 of "
                             f"the input; resize labels with nearest), got {list(labels.shape)}")
        return labels.long()

    def run_teacher(self, images: torch.Tensor):
        """(stage maps, logits or None, patch embeddings) of the frozen teacher, without grad."""
        with torch.no_grad():
            if self.uses_teacher_logits:
                feats, logits, embeds = self.teacher(images, return_features=True)
            else:
                feats, embeds = self.teacher.backbone(images)
                logits = None
        return feats, logits, embeds

    def distill_terms(self, images, s_feats, s_logits, s_embeds, t_feats, t_logits, t_embeds) -> dict:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_images(images)
        if self.teacher_first:
            t_feats, t_logits, t_embeds = self.run_teacher(images)
        s_feats, s_logits, s_embeds = self.student(images, return_features=True)
        labels = self._check_labels(labels, s_logits)
        if not self.teacher_first:
            t_feats, t_logits, t_embeds = self.run_teacher(images)
        check_stage_pairs("stage maps", s_feats, t_feats, spatial_dims=2, compare_channels=False)
        check_stage_pairs("patch embeddings", s_embeds, t_embeds, spatial_dims=1, compare_channels=False)
        if t_logits is not None and t_logits.shape != s_logits.shape:
            raise ValueError(f"student logits {tuple(s_logits.shape)} and teacher logits {tuple(t_logits.shape)} "
                             "differ: a logit loss needs the same classes and output size")
        terms = self.distill_terms(images, s_feats, s_logits, s_embeds, t_feats, t_logits, t_embeds)
        ce = segmentation_ce(s_logits, labels, self.class_weights, self.ignore_index)
        loss = ce
        for v in terms.values():
            loss = loss + v
        zero = ce.new_zeros(())
        out = {"loss": loss, "ce": ce, "feature": terms.get("feature", zero), "embed": terms.get("embed", zero)}
        out.update({k: v for k, v in terms.items() if k not in out})
        out["logits"] = s_logits
        return out


class TransKD(Distiller):
    """TransKD (Liu et al., arXiv 2202.13393): CSF + feature loss + PEA + embedding MSE.

    ``variant``: ``"base"`` (CSF + HCL + PEA), ``"gl"`` (+ GL-Mixer on the stage-4 embedding,
    before PEA), ``"ea"`` (+ Embedding Assistant after PEA). ``feature_loss``: ``"hcl"`` (the
    paper), ``"cwd"`` (channel-wise KL per stage, summed) or ``"kl"`` (pixel-wise KL per stage,
    summed); ``temperature`` is used by the KL terms. ``cwd_norm`` / ``cwd_divergence``: the
    ``"cwd"`` feature loss's variant (:func:`~transkd_fast.distill.losses.cwd_loss`; the defaults
    ``"channel"`` / ``"kl"`` are the paper's; other values are refused for the other feature
    losses). ``logit_loss``: ``None`` (the paper) or ``"kl"`` (pixel-wise KD on the logits,
    × ``logit_weight``; the only case where the teacher's decode head runs).

    Embedding loss, ``embed = Σ_{i ∈ stages} w_i · mse(PEA_i(e_s_i), e_t_i)``, by ``embed_stages``:

    - ``"all"`` (the paper, the original's ``--embed 5``): the n stages, ``embed_weights``
      default ``(0.1, 0.1, 0.5, 1.0)``;
    - ``k`` (1…n, the original's ``--embed k``): stage k alone, weight ``embed_weights`` (one
      entry) default ``(1.0,)``, the original's plain ``nn.MSELoss()``; PEA holds stage k's
      projection only (as the original's single ``embed1_linearproject``);
    - ``"none"`` (``--embed 0``): no embedding loss (``out["embed"]`` is 0) and no PEA at all: its
      parameters are neither created nor given to the optimizer (``embed_weights`` must be None).

    Anything but ``"all"`` is for the ``base`` variant only: GL-Mixer and EA act on embeddings that
    only the embedding loss reads, and the original's GL/EA models always align all four stages.

    Total: ``ce + feature_weight · feature + embed (+ logit_weight · logit)``.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, variant: str = "base", feature_loss: str = "hcl",
                 embed_weights: Optional[Sequence[float]] = None, temperature: float = 1.0,
                 logit_loss: Optional[str] = None, class_weights: Optional[Sequence[float]] = None,
                 ignore_index: int = 255, feature_weight: float = 1.0, logit_weight: float = 1.0,
                 mid_channels: int = 64, gl_heads: int = 8, gl_residual: bool = False,
                 embed_stages: Union[str, int] = "all", cwd_norm: str = "channel",
                 cwd_divergence: str = "kl") -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown TransKD variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        if feature_loss not in FEATURE_LOSSES:
            raise ValueError(f"unknown feature_loss {feature_loss!r}; choose one of {', '.join(FEATURE_LOSSES)}")
        if logit_loss not in LOGIT_LOSSES:
            raise ValueError(f"unknown logit_loss {logit_loss!r}; choose None or 'kl'")
        check_cwd_options(cwd_norm, cwd_divergence)
        if feature_loss != "cwd" and (cwd_norm, cwd_divergence) != ("channel", "kl"):
            raise ValueError(f"cwd_norm / cwd_divergence ({cwd_norm!r}, {cwd_divergence!r}) apply to "
                             f"feature_loss='cwd' only; this TransKD uses {feature_loss!r}")
        super().__init__(student, teacher, class_weights=class_weights, ignore_index=ignore_index)
        n = len(self.student_dims)
        self.embed_mode, self.embed_stage_ids = parse_embed_stages(embed_stages, n)
        if self.embed_mode != "all" and variant != "base":
            raise ValueError(f"embed_stages={embed_stages!r} is for the base variant only: TransKD-{variant}'s "
                             f"{'GL-Mixer' if variant == 'gl' else 'Embedding Assistant'} feeds the all-stage "
                             "embedding loss")
        if self.embed_mode == "none":
            if embed_weights is not None:
                raise ValueError("embed_weights given with embed_stages='none' (no embedding loss)")
            embed_weights = ()
        elif embed_weights is None:
            embed_weights = PAPER_EMBED_WEIGHTS if self.embed_mode == "all" else (1.0,)
        if len(embed_weights) != len(self.embed_stage_ids):
            raise ValueError(f"embed_weights has {len(embed_weights)} entries for {len(self.embed_stage_ids)} "
                             f"embedding stage(s) (embed_stages={self.embed_mode!r})")
        self.variant = variant
        self.feature_kind = feature_loss
        self.cwd_norm, self.cwd_divergence = cwd_norm, cwd_divergence
        self.embed_weights = tuple(float(w) for w in embed_weights)
        self.temperature = float(temperature)
        self.logit_kind = logit_loss
        self.feature_weight = float(feature_weight)
        self.logit_weight = float(logit_weight)
        self.uses_teacher_logits = logit_loss is not None
        if self.uses_teacher_logits and getattr(student, "num_classes", None) != getattr(teacher, "num_classes", None):
            raise ValueError(f"a logit loss needs the same classes: the student has "
                             f"{getattr(student, 'num_classes', '?')} outputs, the teacher "
                             f"{getattr(teacher, 'num_classes', '?')}")
        self.csf = CSF(self.student_dims, self.teacher_dims, mid_channels)
        # "none": no PEA module at all, so no parameter of it reaches the optimizer or the checkpoint.
        self.pea = PEA(self.student_dims, self.teacher_dims, self.embed_stage_ids) if self.embed_stage_ids else None
        if variant == "gl":
            self.gl_mixer = GLMixer(self.student_dims[-1], num_heads=gl_heads, residual=gl_residual)
        if variant == "ea":
            self.ea = EmbeddingAssistant(self.student_dims, self.teacher_dims)

    @property
    def embed_stage(self) -> Optional[int]:
        """The stage (1…n) of a single-stage embedding loss, else None."""
        return self.embed_stage_ids[0] + 1 if self.embed_mode not in ("all", "none") else None

    def align_embeddings(self, images: torch.Tensor, s_feats: Sequence[torch.Tensor],
                         s_embeds: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The student embeddings of the loss's stages (:attr:`embed_stage_ids`) as compared with
        the teacher's (GL-Mixer / PEA / EA per variant)."""
        embeds = list(s_embeds)
        if self.variant == "gl":
            embeds[-1] = self.gl_mixer(embeds[-1])
        aligned = self.pea(embeds)
        if self.variant == "ea":
            aligned = self.ea(images, s_feats, aligned)
        return aligned

    def distill_terms(self, images, s_feats, s_logits, s_embeds, t_feats, t_logits, t_embeds) -> dict:
        fused = self.csf(s_feats)
        terms = {"feature": self.feature_weight * feature_loss(self.feature_kind, fused, t_feats, self.temperature,
                                                               self.cwd_norm, self.cwd_divergence)}
        if self.embed_stage_ids:
            targets = [t_embeds[i] for i in self.embed_stage_ids]
            terms["embed"] = embedding_loss(self.align_embeddings(images, s_feats, s_embeds), targets,
                                            self.embed_weights)
        if self.logit_kind is not None:
            terms["logit"] = self.logit_weight * logit_loss(s_logits, t_logits, self.temperature)
        return terms

    def load_original(self, state_dict_or_path, strict: bool = False, embed_stage: Optional[int] = None):
        """Load a checkpoint of the original TransKD code's distiller (``build_kd_trans``: ``student.*``,
        ``skfs.*`` / ``csfs.*``, ``embed{i}_linearproject``, GL's ``attn4`` / ``conv1`` / ``conv2`` /
        ``atten_weight`` / ``conv_weight``, EA's ``patch_embed*`` / ``fuse_weights``) into this
        distiller's student and KD modules; key tables in :mod:`transkd_fast.distill.original`.

        Returns a :class:`~transkd_fast.models.checkpoints.LoadReport` (loaded / missing / unexpected
        of the student's and KD modules' tensors; the teacher is not in those files). Raises
        :class:`~transkd_fast.models.checkpoints.CheckpointError`, loading nothing, on a shape
        mismatch, when nothing loaded, or with ``strict`` when anything is missing or unexpected.
        ``embed_stage``: the stage (1…4) of a single-stage embedding run (``--embed k``); default:
        this distiller's own (``embed_stages=k``), else None (an all-stage file)."""
        from transkd_fast.distill.original import load_original_distiller

        return load_original_distiller(self, state_dict_or_path, strict=strict, embed_stage=embed_stage)
