"""CLI subcommands ``train``, ``distill``, ``evaluate`` and ``demo``.

Options are generated from the config dataclasses, so each option is the Python field name
with ``-`` for ``_`` (``TrainConfig(steps=...)`` ⇔ ``--steps``); booleans take
``--name/--no-name``; ``--distill-kwargs`` takes JSON.

Exit codes (see :mod:`transkd_fast.cli`): 0 done; 2 a user error (one line); 3 a non-finite loss
stopped the run; 130 SIGINT and 143 SIGTERM stopped it after writing a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import typing
from dataclasses import MISSING, fields
from typing import Any

from transkd_fast.cli import SUBCOMMANDS
from transkd_fast.engine.config import EvalConfig, TrainConfig

HELP = {
    "dataset": "synthetic (procedural, default) | cityscapes | acdc | voc | nyuv2 (splits train/test: "
               "--val-split test)",
    "data_root": "dataset root directory (not needed for synthetic)",
    "train_split": "training split name",
    "val_split": "validation split name",
    "split": "split to evaluate",
    "height": "resize images to this height (the Cityscapes recipe: 512); default: native size",
    "label_scale": "4: labels at 1/4 resolution vs the 1/4 logits (paper); 1: full resolution",
    "void": "class: void (255) -> extra output id K with CE weight 0 (paper: 20 outputs); "
            "ignore: K outputs, 255 ignored",
    "max_translate": "random translation range in label pixels (0 disables)",
    "hflip": "random horizontal flip in training",
    "normalize": "ImageNet mean/std normalization (the original feeds [0,1])",
    "class_weights": "dataset: the recipe's class-balancing CE weights where the dataset has them; uniform",
    "synthetic_train_size": "synthetic: training images",
    "synthetic_val_size": "synthetic: validation images",
    "synthetic_height": "synthetic: image height",
    "synthetic_width": "synthetic: image width",
    "data_seed": "synthetic: dataset seed",
    "label_resize": "resize (nearest) labels whose size differs from their image's instead of refusing them",
    "acdc_conditions": "acdc: comma-separated conditions to read, e.g. fog,night (default: fog,night,rain,snow)",
    "crop_size": "training crop of the random scale + crop + pad pipeline, for images of different sizes "
                 "(default: the dataset's, 512 with scales 0.5-2 for voc; none for fixed-size datasets)",
    "model": "segformer_b0..b5 | pvt_v2_b0..b5 | lvt",
    "weights": "initial weights (train/distill: the student's) or weights to evaluate "
               "(model.pt, last.pt, NVlabs/TransKD/mmseg/HF checkpoints)",
    "drop_path_rate": "stochastic depth rate of the backbone",
    "dropout": "decode-head dropout",
    "teacher": "teacher model, e.g. segformer_b2",
    "teacher_weights": "teacher weights (frozen)",
    "method": "transkd_base | transkd_gl | transkd_ea | logit_kd | cwd | review_kd",
    "distill_kwargs": "JSON dict of extra distiller arguments, e.g. '{\"feature_loss\": \"cwd\"}'",
    "steps": "optimizer steps",
    "batch_size": "global batch size (split across DDP ranks)",
    "lr": "AdamW learning rate",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "weight_decay": "AdamW weight decay",
    "eps": "AdamW epsilon",
    "poly_power": "polynomial decay power: lr * (1 - step/steps)^power",
    "lr_schedule": "poly: lr * (1 - step/steps)^power every step, to 0 at the end | poly-epoch: the original's "
                   "PolynomialLRDecay, stepped once per epoch over --max-decay-steps epochs",
    "max_decay_steps": "poly-epoch: epochs over which the lr decays (the original: 1500)",
    "steps_per_epoch": "poly-epoch: optimizer steps per epoch (default: the training loader's length)",
    "embed_stages": "TransKD embedding loss stages: all (the paper) | none | 1..4 "
                    "(one stage, the original's --embed k)",
    "cwd_norm": "CWD normalisation: channel (softmax over H*W per channel) | channel_mean (the original's option)",
    "cwd_divergence": "CWD divergence: kl | mse (the original's option)",
    "tensorboard": "also write TensorBoard event files to <output-dir>/tensorboard (needs the tensorboard package)",
    "protocol": "ours (--resolution) | transkd (the original: labels at 1/4, its resize and 19-class mIoU) | "
                "full (logits upsampled to full-resolution labels)",
    "inference": "whole (one forward per image) | slide (crops --slide-crop every --slide-stride, logits averaged)",
    "slide_crop": "slide: square crop size in pixels",
    "slide_stride": "slide: stride in pixels (None: 768, or the crop when smaller)",
    "tta": "multi-scale (--tta-scales) + horizontal flip test-time augmentation, softmax probabilities averaged",
    "tta_scales": "tta: comma-separated scales",
    "precision": "fp32 | bf16 (weights and activations in bfloat16, any device)",
    "grad_clip": "clip the gradient norm (default: no clipping)",
    "amp": "none | bf16 (autocast, CPU or CUDA) | fp16 (CUDA only)",
    "seed": "seed of initialization, data order and augmentation",
    "device": "auto | cpu | cuda | cuda:N",
    "num_workers": "DataLoader workers",
    "sync_bn": "synchronize BatchNorm statistics across DDP ranks",
    "cpu_allocator": "tuned (glibc keeps freed memory for the next step: no page faults) | default (CPU runs)",
    "output_dir": "where checkpoints, metrics.jsonl and PNGs go",
    "resume": "checkpoint to resume from, or 'auto' (<output-dir>/last.pt if present)",
    "ckpt_every": "checkpoint every N steps (0: only at the end)",
    "eval_every": "validate every N steps (0: only at the end)",
    "eval_batch_size": "validation batch size",
    "log_every": "write a metrics.jsonl record every N steps",
    "progress": "tqdm progress bars",
    "num_vis": "validation images drawn in predictions.png",
    "eval_at_end": "validate, plot curves and predictions at the end",
    "stop_at": "stop after this step with a checkpoint (as an interrupt; continue with --resume auto)",
    "inject_nan": "testing hook: 'STEP[:TERM]' makes that loss term NaN at that step",
    "resolution": "quarter (paper: labels at 1/4) | full (logits upsampled to full-size labels) | both",
    "overwrite": "start over in an output folder that holds a run; the old run is moved to "
                 "<output-dir>/previous-<n>/ (never deleted)",
    "extend_steps": "on --resume, accept a larger --steps than the checkpoint's run (the polynomial lr schedule "
                    "follows the new total from the resumed step on)",
    "threads": "torch threads (torch.set_num_threads); default: PyTorch's choice",
    "allow_partial_weights": "accept weight files that load < 90%% of the model's tensors (or, for evaluate and "
                             "a teacher with a logit loss, no decode head)",
}

DISTILL_ONLY = {"teacher", "teacher_weights", "method", "distill_kwargs", "embed_stages", "cwd_norm",
                "cwd_divergence"}


def _base_type(tp):
    if isinstance(tp, str):
        tp = eval(tp, vars(typing))  # dataclass annotations are strings under `from __future__ import annotations`
    args = typing.get_args(tp)
    if type(None) in args:
        tp = next(a for a in args if a is not type(None))
    return tp


def add_config_arguments(parser: argparse.ArgumentParser, cls, skip=(), defaults: dict | None = None) -> None:
    defaults = defaults or {}
    for f in fields(cls):
        if f.name in skip:
            continue
        default = defaults.get(f.name, f.default if f.default is not MISSING else f.default_factory())
        tp = _base_type(f.type)
        opt = "--" + f.name.replace("_", "-")
        help_ = HELP.get(f.name, f.name) + f" (default: {default})".replace("%", "%%")
        if tp is bool:
            parser.add_argument(opt, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif tp is dict:
            parser.add_argument(opt, dest=f.name, type=json.loads, default=default, help=help_)
        else:
            parser.add_argument(opt, dest=f.name, type=tp, default=default, help=help_)


def config_from_args(cls, args: argparse.Namespace, **overrides):
    names = {f.name for f in fields(cls)}
    kw: dict[str, Any] = {k: v for k, v in vars(args).items() if k in names}
    kw.update(overrides)
    return cls(**kw)


def _pct(v) -> str:
    return "   n/a" if v is None or v != v else f"{100 * v:6.2f}"  # v != v: NaN


def _print_metrics(title: str, m: dict) -> None:
    """mIoU, pixel accuracy, mAcc, then the per-class table (IoU and accuracy TP/(TP+FN), in %;
    n/a where undefined); a metrics dict without a ``"table"`` prints its IoUs only."""
    head = f"{title}: mIoU {_pct(m['miou']).strip()}  pixel acc {_pct(m['pixel_acc']).strip()}"
    if "macc" in m:
        head += f"  mAcc {_pct(m['macc']).strip()}"
    print(head)
    if "table" not in m:
        for name, v in m["per_class"].items():
            print(f"  {name:>20s}  {_pct(v)}")
        return
    print(f"  {'class':>20s}  {'IoU':>6s}  {'Acc':>6s}")
    for row in m["table"]:
        print(f"  {row['name']:>20s}  {_pct(row['iou'])}  {_pct(row['acc'])}")


def _run_training(kind: str, args: argparse.Namespace) -> int:
    from transkd_fast.engine import trainer

    cfg = config_from_args(TrainConfig, args)
    try:
        res = trainer.distill(cfg) if kind == "distill" else trainer.train(cfg)
    except trainer.NonFiniteLossError as e:
        print(f"transkd-fast: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + int(signum)
    from transkd_fast.engine.distributed import env_world

    if env_world()[0] == 0:
        if res.metrics is not None:
            _print_metrics(f"{kind} {cfg.model} after {res.steps} steps ({cfg.val_split})", res.metrics)
        print(f"checkpoint: {res.checkpoint}\nweights: {res.weights}\nmetrics: {cfg.output_dir}/metrics.jsonl")
    return 0


def _add_train(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, TrainConfig, skip=DISTILL_ONLY)


def _add_distill(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, TrainConfig, defaults={"output_dir": "runs/distill"})


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, EvalConfig, skip={"train_split", "val_split", "max_translate", "hflip"})


def _run_evaluate(args: argparse.Namespace) -> int:
    from transkd_fast.engine import trainer

    cfg = config_from_args(EvalConfig, args)
    results = trainer.evaluate(cfg)
    from transkd_fast.engine.distributed import env_world

    if env_world()[0] == 0:
        how = ""
        if cfg.inference == "slide":
            from transkd_fast.engine.inference import Inference

            how += f", slide {cfg.slide_crop}/{Inference.from_config(cfg).stride}"
        if cfg.tta:
            how += f", TTA scales {cfg.tta_scales} + flip"
        for key, m in results.items():
            what = f"{key} resolution" if cfg.protocol == "ours" else f"protocol {cfg.protocol}"
            _print_metrics(f"{cfg.model} on {cfg.dataset}/{cfg.split}, {what}{how}", m)
    return 0


def _add_demo(p: argparse.ArgumentParser) -> None:
    from transkd_fast.engine.demo import add_demo_arguments

    add_demo_arguments(p)


def _run_demo(args: argparse.Namespace) -> int:
    from transkd_fast.engine.demo import run_demo_cli

    return run_demo_cli(args)


SUBCOMMANDS["train"] = ("train a segmentation network (teacher or student) with the class-weighted CE",
                        _add_train, lambda a: _run_training("train", a))
SUBCOMMANDS["distill"] = ("distill a frozen teacher into a student (TransKD or a baseline)",
                          _add_distill, lambda a: _run_training("distill", a))
SUBCOMMANDS["evaluate"] = ("mIoU / per-class IoU and accuracy / pixel accuracy of a model under an evaluation "
                           "protocol (ours: 1/4 and full resolution; transkd; full)",
                           _add_evaluate, _run_evaluate)
SUBCOMMANDS["demo"] = ("synthetic end-to-end demo: teacher, TransKD student and plain student, compared",
                       _add_demo, _run_demo)
