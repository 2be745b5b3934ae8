"""Run configurations (dataclasses). CLI options carry the same names with ``-`` for ``_``.

:func:`validate_train_config` / :func:`validate_eval_config` refuse impossible settings up
front with a :class:`ConfigError` naming the CLI flag (``--batch-size must be ≥ 1, got 0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional


class ConfigError(ValueError):
    """A setting the run cannot use; the message names the CLI flag (or file) and says what to do."""


@dataclass
class DataConfig:
    """What to read and how to transform it.

    ``void``: ``"class"`` — the paper's 20-output recipe: void (255) becomes the extra output id
    ``num_classes`` (19 on Cityscapes) with CE weight 0, left out of the mIoU; ``"ignore"`` —
    the model has ``num_classes`` outputs and void stays 255, skipped by the CE's
    ``ignore_index``. ``label_scale``: 4 (paper: labels at 1/4 resolution against the 1/4
    logits) or 1 (full resolution: logits upsampled bilinearly to the labels).
    """

    dataset: str = "synthetic"
    data_root: Optional[str] = None
    train_split: str = "train"
    val_split: str = "val"
    height: Optional[int] = None          # resize to this height (Cityscapes recipe: 512); None = native
    label_scale: int = 4
    void: str = "class"
    max_translate: int = 2                # label pixels (the original: 2)
    hflip: bool = True
    normalize: bool = False               # ImageNet mean/std; the original feeds [0, 1]
    class_weights: str = "dataset"        # "dataset" (the recipe's weights when the dataset has them) | "uniform"
    # synthetic only
    synthetic_train_size: int = 512
    synthetic_val_size: int = 64
    synthetic_height: int = 64
    synthetic_width: int = 128
    data_seed: int = 0
    label_resize: bool = False            # resize labels whose size differs from their image's (else refused)
    acdc_conditions: Optional[str] = None  # acdc only: comma-separated, e.g. "fog,night" (default: all four)
    crop_size: Optional[int] = None       # training crop of the scale/crop/pad pipeline (default: the dataset's)


@dataclass
class TrainConfig(DataConfig):
    """``train`` (one network) and ``distill`` (student + frozen teacher) runs.

    Steps are optimizer steps; ``batch_size`` is the *global* batch (split over DDP ranks).
    Optimizer AdamW(lr, betas, weight_decay, eps) (PyTorch's fused implementation: one kernel
    for all parameters) and the polynomial schedule ``lr · (1 − step/steps)^poly_power``,
    stepped every step (``lr_schedule="poly"``), or the original's per-epoch
    ``lr · (1 − min(e, max_decay_steps)/max_decay_steps)^poly_power`` for epoch e = 1, 2, …
    (``"poly-epoch"``, :func:`transkd_fast.engine.trainer.lr_factor`). On CPU, ``cpu_allocator="tuned"`` applies
    :func:`transkd_fast.runtime.tune_cpu_allocator` before the run.
    """

    model: str = "segformer_b0"
    weights: Optional[str] = None          # start from these weights (train) / the student's (distill)
    drop_path_rate: float = 0.1
    dropout: float = 0.1
    # distill only
    teacher: Optional[str] = None          # e.g. "segformer_b2"
    teacher_weights: Optional[str] = None
    method: str = "transkd_base"           # a transkd_fast.distill.DISTILLERS name
    distill_kwargs: dict = field(default_factory=dict)
    embed_stages: str = "all"              # TransKD embedding loss: "all" | "none" | "1".."4" (the original's --embed)
    cwd_norm: str = "channel"              # CWD normalisation: "channel" | "channel_mean" (the original offers both)
    cwd_divergence: str = "kl"             # CWD divergence: "kl" | "mse"
    # optimization
    steps: int = 1000
    batch_size: int = 2
    lr: float = 6e-5
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.01
    eps: float = 1e-8
    poly_power: float = 1.0
    lr_schedule: str = "poly"              # "poly" (per step, to 0 at the last) | "poly-epoch" (the original's)
    max_decay_steps: int = 1500            # poly-epoch: decay length in epochs (the original: 1500)
    steps_per_epoch: Optional[int] = None  # poly-epoch: optimizer steps per epoch (default: the train loader's length)
    grad_clip: Optional[float] = None
    amp: str = "none"                      # "none" | "bf16" | "fp16" (CUDA only)
    seed: int = 0
    device: str = "auto"                   # "auto" | "cpu" | "cuda" | "cuda:1" ...
    num_workers: int = 0
    sync_bn: bool = True                   # synchronize BatchNorm statistics under DDP
    cpu_allocator: str = "tuned"           # "tuned" (keep freed memory for reuse) | "default"; CPU runs only
    # bookkeeping
    output_dir: str = "runs/train"
    resume: Optional[str] = None           # a checkpoint path, or "auto" = <output_dir>/last.pt if it exists
    ckpt_every: int = 0                    # 0: only at the end
    eval_every: int = 0                    # 0: only at the end
    eval_batch_size: int = 8
    log_every: int = 10
    progress: bool = True
    num_vis: int = 4                       # validation images in predictions.png
    eval_at_end: bool = True
    stop_at: Optional[int] = None          # stop after this step with a checkpoint, as an interrupt would
    inject_nan: Optional[str] = None       # testing hook: "STEP[:TERM]" makes that term NaN at that step
    overwrite: bool = False                # start over in a folder that holds a run (the old run is moved aside)
    extend_steps: bool = False             # on resume, accept a larger --steps than the checkpoint's run
    threads: Optional[int] = None          # torch.set_num_threads (default: PyTorch's choice)
    allow_partial_weights: bool = False    # accept weight files that load < 90 % of the model's tensors
    tensorboard: bool = False              # also write TensorBoard event files to <output_dir>/tensorboard


@dataclass
class EvalConfig(DataConfig):
    model: str = "segformer_b0"
    weights: Optional[str] = None
    split: str = "val"
    resolution: str = "both"               # "quarter" (paper) | "full" | "both"
    protocol: str = "ours"                 # "ours" (--resolution) | "transkd" (the original's) | "full"
    inference: str = "whole"               # "whole" | "slide" (crops of --slide-crop every --slide-stride)
    slide_crop: int = 1024
    slide_stride: Optional[int] = None     # default: 768, or the crop when it is smaller
    tta: bool = False                      # multi-scale (--tta-scales) + horizontal flip, logits averaged
    tta_scales: str = "0.5,0.75,1.0,1.25,1.5,1.75"
    precision: str = "fp32"                # "fp32" | "bf16" (any device)
    batch_size: int = 8
    device: str = "auto"
    amp: str = "none"
    output_dir: Optional[str] = None       # write metrics JSON and predictions PNG here
    num_vis: int = 4
    progress: bool = True
    num_workers: int = 0
    threads: Optional[int] = None
    allow_partial_weights: bool = False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check(cfg, name: str, ok, what: str) -> None:
    v = getattr(cfg, name)
    if v is None:
        return
    try:
        good = bool(ok(v))
    except TypeError:
        good = False
    if not good:
        raise ConfigError(f"{_flag(name)} must be {what}, got {v!r}")


def _choice(cfg, name: str, choices) -> None:
    v = getattr(cfg, name)
    if v is not None and v not in choices:
        names = [repr(c) for c in choices]
        what = ", ".join(names[:-1]) + " or " + names[-1]
        raise ConfigError(f"{_flag(name)}: {name} must be {what}, got {v!r}")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _validate_data(cfg) -> None:
    for name in ("synthetic_train_size", "synthetic_val_size", "synthetic_height", "synthetic_width", "height"):
        _check(cfg, name, lambda v: v >= 1, "≥ 1")
    _check(cfg, "max_translate", lambda v: v >= 0, "≥ 0")
    _choice(cfg, "label_scale", (1, 4))
    _choice(cfg, "void", ("class", "ignore"))
    _choice(cfg, "class_weights", ("dataset", "uniform"))
    if getattr(cfg, "acdc_conditions", None) and cfg.dataset.lower() != "acdc":
        raise ConfigError(f"--acdc-conditions is for --dataset acdc (this run reads {cfg.dataset!r})")


def validate_train_config(cfg: "TrainConfig") -> None:
    """Raise :class:`ConfigError` (naming the flag) for a setting no run can use."""
    _validate_data(cfg)
    for name in ("steps", "batch_size", "eval_batch_size", "log_every", "threads", "stop_at"):
        _check(cfg, name, lambda v: v >= 1, "≥ 1")
    for name in ("ckpt_every", "eval_every", "num_workers", "num_vis"):
        _check(cfg, name, lambda v: v >= 0, "≥ 0")
    _check(cfg, "lr", lambda v: _finite(v) and v > 0, "a positive number")
    _check(cfg, "eps", lambda v: _finite(v) and v > 0, "a positive number")
    _check(cfg, "grad_clip", lambda v: _finite(v) and v > 0, "a positive number")
    _check(cfg, "weight_decay", lambda v: _finite(v) and v >= 0, "≥ 0")
    _check(cfg, "poly_power", lambda v: _finite(v) and v >= 0, "≥ 0")
    for name in ("beta1", "beta2"):
        _check(cfg, name, lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)")
    for name in ("drop_path_rate", "dropout"):
        _check(cfg, name, lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)")
    _choice(cfg, "amp", ("none", "bf16", "fp16"))
    _choice(cfg, "cpu_allocator", ("tuned", "default"))
    _validate_recipe(cfg)
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the run in "
                          f"{cfg.output_dir}, --overwrite moves it aside and starts over")


LR_SCHEDULES = ("poly", "poly-epoch")
EMBED_STAGES = ("all", "none", "1", "2", "3", "4")


def _validate_recipe(cfg: "TrainConfig") -> None:
    """The original recipe's options (issue #15): lr schedule, embedding stages, CWD variant.

    Which distillation method may take a non-default ``--embed-stages`` / ``--cwd-*`` is checked
    where the distiller is built (:func:`transkd_fast.engine.trainer.distiller_kwargs`)."""
    _choice(cfg, "lr_schedule", LR_SCHEDULES)
    _check(cfg, "max_decay_steps", lambda v: isinstance(v, int) and v >= 2,
           "an integer ≥ 2 (the original's PolynomialLRDecay needs > 1)")
    _check(cfg, "steps_per_epoch", lambda v: isinstance(v, int) and v >= 1, "an integer ≥ 1")
    if cfg.lr_schedule != "poly-epoch":
        default = TrainConfig.max_decay_steps
        if cfg.max_decay_steps != default:
            raise ConfigError(f"--max-decay-steps {cfg.max_decay_steps} is for --lr-schedule poly-epoch; this run's "
                              f"schedule is {cfg.lr_schedule!r}")
        if cfg.steps_per_epoch is not None:
            raise ConfigError(f"--steps-per-epoch {cfg.steps_per_epoch} is for --lr-schedule poly-epoch; this run's "
                              f"schedule is {cfg.lr_schedule!r}")
    if str(cfg.embed_stages).strip().lower() not in EMBED_STAGES:
        raise ConfigError(f"--embed-stages must be all, none or a stage 1..4, got {cfg.embed_stages!r}")
    _choice(cfg, "cwd_norm", ("channel", "channel_mean"))
    _choice(cfg, "cwd_divergence", ("kl", "mse"))


def validate_eval_config(cfg: "EvalConfig") -> None:
    """As :func:`validate_train_config`; also the protocol (``--resolution`` is ``--protocol
    ours``'s: another protocol fixes its labels, so a non-default ``--resolution`` is refused)
    and the inference settings (:class:`transkd_fast.engine.inference.Inference`)."""
    _validate_data(cfg)
    for name in ("batch_size", "threads"):
        _check(cfg, name, lambda v: v >= 1, "≥ 1")
    for name in ("num_vis", "num_workers"):
        _check(cfg, name, lambda v: v >= 0, "≥ 0")
    _choice(cfg, "resolution", ("quarter", "full", "both"))
    _choice(cfg, "protocol", ("ours", "transkd", "full"))
    if cfg.protocol != "ours" and cfg.resolution != "both":
        fixed = "labels at 1/4" if cfg.protocol == "transkd" else "full-resolution labels"
        raise ConfigError(f"--resolution {cfg.resolution} is for --protocol ours; --protocol {cfg.protocol} "
                          f"evaluates {fixed} (drop --resolution)")
    _choice(cfg, "amp", ("none", "bf16", "fp16"))
    from transkd_fast.engine.inference import Inference  # imports torch; config itself does not

    Inference.from_config(cfg)


def config_from_dict(cls, d: dict[str, Any]):
    """Build ``cls`` from a dict, ignoring unknown keys (e.g. an older checkpoint's config)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})
