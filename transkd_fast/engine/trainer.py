"""The training, distillation and evaluation loops.

``train(cfg)`` trains one network with the class-weighted CE; ``distill(cfg)`` trains a
student through a distiller (``cfg.method``) against a frozen teacher; ``evaluate(...)``
computes mIoU / per-class IoU / pixel accuracy. All three run on one process or under
``torchrun`` (DDP: gloo on CPU, nccl on CUDA).

Exactness. A step's batch and augmentation depend only on ``(seed, step)``
(:class:`~transkd_fast.data.sampler.StepBatchSampler`), the DataLoader has its own generator
(creating its iterator does not touch the global RNG), and checkpoints hold every RNG, so
``resume`` continues bit for bit; a resume that changes a setting exactness depends on (seed,
batch, lr, steps, model, method, data...) is refused, naming the settings (``extend_steps``
accepts a larger ``steps``: the per-step polynomial schedule then follows the new total from
the resumed step on; the per-epoch one does not depend on the total).

Several processes. The CE (``train`` and the distiller's) is normalized by the *global*
Σ weight(label) (all-reduced), BatchNorm statistics are synchronized across ranks
(``sync_bn``, the default when world > 1), CSF chooses its batch-1 branch from the global
batch, and the logged terms are all-reduced. What is *not* shared is randomness inside the
network: each rank seeds its own generator (``seed · 1000 + rank``), so dropout and drop-path
masks are drawn per rank, and a W-rank run with them on is a different (equally valid) draw
from the 1-rank run. With dropout and drop path off, W ranks with the same global batch
reproduce the 1-rank run up to float summation order (tested with 2 gloo ranks on CPU).

Safety. A run refuses an output folder that holds a run unless it resumes it (``resume``) or
``overwrite`` moves the old run to ``<output_dir>/previous-<n>/``; stale ``*.tmp`` files of a
checkpoint write cut short are removed at start; on resume ``metrics.jsonl`` is cut back to
the checkpoint's step. SIGINT and SIGTERM stop at the next step boundary with a checkpoint
(the CLI exits 130 / 143). Every JSON output writes NaN/inf as ``null``. The run's first log
line states the device, process group, dtype, threads and the backend of every op.

A non-finite loss term stops the run *before* the optimizer step with
:class:`NonFiniteLossError` naming the step and the term; the last checkpoint on disk is the
last good one (checkpoints are written atomically).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import random
import signal
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from transkd_fast.data import SegTransform, build_dataset, pad_collate
from transkd_fast.data.sampler import ShardedEvalSampler, StepBatchSampler
from transkd_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from transkd_fast.engine.checkpoint import (
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    save_weights,
    set_rng_state,
    state_fingerprint,
)
from transkd_fast.engine.config import ConfigError, EvalConfig, TrainConfig, validate_eval_config, validate_train_config
from transkd_fast.engine.distributed import (
    all_reduce_sum,
    barrier,
    convert_sync_batchnorm,
    env_world,
    init_distributed,
    is_distributed,
)
from transkd_fast.engine.inference import Inference, infer
from transkd_fast.engine.metrics import ConfusionMatrix, json_safe
from transkd_fast.engine.tb import close_tensorboard, open_tensorboard, require_tensorboard
from transkd_fast.engine.viz import plot_curves, save_predictions
from transkd_fast.precision import check_precision, prepare_for_inference, warn_if_bf16_is_slow
from transkd_fast.runtime import tune_cpu_allocator

VOID = 255


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN/Inf; the message names the step and the term."""


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run (after a checkpoint unless it came twice); ``signum`` says which."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def json_dumps(obj, **kwargs) -> str:
    """Strict JSON: NaN/inf written as null (:func:`~transkd_fast.engine.metrics.json_safe`)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# set-up helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", env_world()[1])
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", env_world()[1])
    return dev


def autocast_context(amp: str, device: torch.device):
    """``--amp``: none | bf16 (CUDA and CPU autocast) | fp16 (CUDA only: CPU fp16 matmuls are
    slow, and fp16 needs the GradScaler, which is CUDA-only here)."""
    if amp in (None, "none"):
        return nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"amp must be none | bf16 | fp16, got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError(f"--amp fp16 is CUDA-only; this run is on {device.type} (use --amp bf16 or none)")
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"--amp {amp}: autocast runs on cuda or cpu here, not {device.type} (use --amp none)")
    if amp == "bf16":
        warn_if_bf16_is_slow(device)
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@dataclass
class DataInfo:
    num_classes: int          # evaluated classes
    num_outputs: int          # model outputs (num_classes + 1 with void as a class)
    ignore_index: int         # label value the CE skips
    class_weights: Optional[list]
    class_names: tuple
    palette: np.ndarray
    mean: Optional[tuple]
    std: Optional[tuple]


def make_transform(cfg, train: bool, num_classes: int, label_scale: Optional[int] = None,
                   ds=None) -> SegTransform:
    """The run's transform; in training, datasets of varying image sizes (``ds.default_crop_size``,
    VOC) or ``--crop-size`` get the random scale + crop + pad pipeline (padding is void)."""
    if cfg.void not in ("class", "ignore"):
        raise ValueError(f"void must be 'class' or 'ignore', got {cfg.void!r}")
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if cfg.normalize else (None, None)
    crop = scale = None
    if train:
        crop = getattr(cfg, "crop_size", None) or getattr(ds, "default_crop_size", None)
        scale = getattr(ds, "default_scale_range", None) if crop is not None else None
    return SegTransform(height=cfg.height, train=train, label_scale=label_scale or cfg.label_scale,
                        max_translate=cfg.max_translate, hflip=cfg.hflip,
                        void_id=num_classes if cfg.void == "class" else None, mean=mean, std=std,
                        crop_size=crop, scale_range=scale)


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def make_dataset(cfg, split: str, train: bool, label_scale: Optional[int] = None, size: Optional[int] = None):
    kwargs = {}
    if cfg.dataset == "synthetic":
        kwargs = dict(num_samples=size or (cfg.synthetic_train_size if train else cfg.synthetic_val_size),
                      height=cfg.synthetic_height, width=cfg.synthetic_width, seed=cfg.data_seed)
    conditions = getattr(cfg, "acdc_conditions", None)
    if conditions:
        kwargs["conditions"] = tuple(c.strip() for c in str(conditions).split(",") if c.strip())
    if getattr(cfg, "label_resize", False) or _accepts(build_dataset, "label_resize"):
        if not _accepts(build_dataset, "label_resize"):
            raise ConfigError("--label-resize: this version of transkd_fast.data has no label resizing")
        kwargs["label_resize"] = bool(getattr(cfg, "label_resize", False))
    ds = build_dataset(cfg.dataset, split, root=cfg.data_root, **kwargs)
    ds.transform = make_transform(cfg, train, ds.num_classes, label_scale, ds=ds)
    return ds


def data_info(cfg, ds) -> DataInfo:
    k = ds.num_classes
    w = None
    if cfg.class_weights == "dataset" and ds.class_weights is not None:
        w = list(ds.class_weights)
    elif cfg.class_weights not in ("dataset", "uniform"):
        raise ValueError(f"class_weights must be 'dataset' or 'uniform', got {cfg.class_weights!r}")
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if cfg.normalize else (None, None)
    if cfg.void == "class":
        # The 20-output recipe: void is output k with CE weight 0.
        weights = (w if w is not None else [1.0] * k) + [0.0]
        return DataInfo(k, k + 1, VOID, weights, tuple(ds.class_names), ds.palette, mean, std)
    return DataInfo(k, k, VOID, w, tuple(ds.class_names), ds.palette, mean, std)


def build_network(name: str, num_outputs: int, drop_path_rate: float = 0.1, dropout: float = 0.1) -> nn.Module:
    from transkd_fast.models import build_model

    return build_model(name, num_classes=num_outputs, drop_path_rate=drop_path_rate, dropout=dropout)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def apply_threads(threads: Optional[int]) -> None:
    if threads:
        torch.set_num_threads(int(threads))


def run_header(what: str, device: torch.device, amp: str, world: int = 1,
               precision: str = "fp32") -> tuple[str, dict]:
    """The run's first log line and its record: device, process group, dtype (weights' precision,
    autocast), threads, and the backend each registered op resolves to for a tensor of the run's
    device and dtype."""
    from transkd_fast import get_backend
    from transkd_fast.backend import registered_ops, resolve
    from transkd_fast.ops import load_all

    load_all()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp, torch.float32)
    if precision == "bf16":
        dtype = torch.bfloat16
    probe = torch.zeros(1, 4, 1, 32, device=device, dtype=dtype)
    backends = {}
    for op in registered_ops():
        try:
            backends[op] = resolve(op, probe, probe, probe)
        except Exception as e:  # noqa: BLE001 - a refusal is what the line should show
            backends[op] = f"unavailable ({type(e).__name__})"
    dev = str(device)
    if device.type == "cuda":
        dev += f" ({torch.cuda.get_device_name(device)})"
    group = f"world {world}"
    if world > 1 and torch.distributed.is_initialized():
        group += f" ({torch.distributed.get_backend()})"
    dt = "float32" if amp in (None, "none") else f"{str(dtype).replace('torch.', '')} autocast, float32 weights"
    if precision == "bf16":  # --precision bf16: weights cast once (transkd_fast.precision), autocast(bf16) around
        dt = "bfloat16 weights and activations (bfloat16 autocast), float32 logits"
    line = (f"{what}: device {dev}, {group}, dtype {dt}, threads {torch.get_num_threads()}, "
            f"backend {get_backend()}: {', '.join(f'{k}={v}' for k, v in backends.items())}")
    rec = {"event": "run", "what": what, "device": str(device), "world": world, "dtype": dt,
           "threads": torch.get_num_threads(), "backend": get_backend(), "ops": backends,
           "torch": torch.__version__}
    return line, rec


# ---------------------------------------------------------------------------------------------
# losses


def global_weighted_ce(logits: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor],
                       ignore_index: int) -> torch.Tensor:
    """Class-weighted CE = Σ w[y]·nll / Σ w[y] over the *global* batch.

    Returns this rank's share scaled by the world size, so that DDP's gradient average gives
    the gradient of the global-batch loss (and the all-reduced mean of the returned values is
    the global loss). On one process: exactly ``F.cross_entropy(logits, labels, weight)``.
    """
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    logits = logits.float()
    nll = F.cross_entropy(logits, labels, weight=weight, ignore_index=ignore_index, reduction="sum")
    valid = labels != ignore_index
    if weight is not None:
        denom = weight.float()[labels.clamp(0, weight.numel() - 1)][valid].sum()
    else:
        denom = valid.sum().to(torch.float32)
    world = torch.distributed.get_world_size() if is_distributed() else 1
    denom = all_reduce_sum(denom.detach().double())
    return nll / denom.clamp_min(1e-12).float() * world


# ---------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor, out_size, amp: str, device: torch.device,
             inference: Optional[Inference] = None, precision: str = "fp32") -> torch.Tensor:
    """Class ids ``[B, *out_size]``: the argmax of :func:`~transkd_fast.engine.inference.infer`'s
    scores at ``out_size`` and ``precision`` (``device`` is the images'; kept for callers)."""
    return infer(model, images, inference, out_size=out_size, amp=amp, precision=precision).float().argmax(1)


# The evaluation protocols of ``evaluate --protocol`` (see :func:`_evaluate_config`): for each,
# the metrics key, the label grid (4: ⌈H/4⌉ × ⌈W/4⌉ of the resized image; 1: the resized image's
# size; "native": the dataset's own label size), the image resize and the absent-class convention.
PROTOCOLS = {
    "transkd": dict(key="transkd", labels=4, resize="shorter_edge", absent="zero"),
    "full": dict(key="full", labels="native", resize="height", absent="skip"),
}
OUR_RESOLUTIONS = {"quarter": 4, "full": 1}


def evaluate(model_or_cfg: Union[nn.Module, EvalConfig], loader=None, *, num_classes: Optional[int] = None,
             class_names=None, device: Optional[torch.device] = None, amp: str = "none",
             progress: bool = False, desc: str = "eval", inference: Optional[Inference] = None,
             absent: str = "skip", precision: str = "fp32") -> dict:
    """mIoU, per-class IoU / accuracy and pixel accuracy (see :mod:`transkd_fast.engine.metrics`).

    ``evaluate(model, loader)``: ``loader`` yields ``(images, labels)``; the scores of
    :func:`~transkd_fast.engine.inference.infer` under ``inference`` (default: one forward, no
    TTA) are resized bilinearly to the labels' size when they differ, so labels at 1/4
    resolution give the paper's metric and full-size labels the full-resolution one. A loader
    may also yield ``(images, labels, sizes)`` with ``sizes [B, 4]`` = each sample's image and
    label size ``(h, w, lh, lw)`` before padding (:func:`_eval_loader` with ``sizes=True``):
    then each sample's scores at the (padded) input size are cut to its image and resized to
    its own label (mmseg's post-processing; needed when labels are not on the image's grid).
    Classes are ``num_classes`` (default: the loader's dataset's, else the model's); a label
    ``≥ num_classes`` (void) is not counted; ``absent`` is the absent-class convention
    (``"skip"`` | ``"zero"``). Under DDP each rank evaluates its shard and the confusion matrices
    are all-reduced. A distiller is evaluated through its student.

    ``evaluate(EvalConfig)``: builds the model and data and evaluates under the configured
    protocol (:func:`_evaluate_config`): ``{"quarter": metrics, "full": metrics}`` for
    ``--protocol ours`` (``--resolution``), ``{"transkd": ...}``, ``{"full": ...}`` otherwise.
    """
    if isinstance(model_or_cfg, EvalConfig):
        return _evaluate_config(model_or_cfg)
    model = model_or_cfg
    if hasattr(model, "student_model"):
        model = model.student_model()
    if loader is None:
        raise ValueError("evaluate(model, loader): a loader is required with a model")
    if num_classes is None:
        ds = getattr(loader, "dataset", None)
        num_classes = getattr(ds, "num_classes", None) or getattr(model, "num_classes")
    if class_names is None:
        class_names = getattr(getattr(loader, "dataset", None), "class_names", None)
        if class_names is not None and len(class_names) != num_classes:
            class_names = None
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    conf = ConfusionMatrix(num_classes, device=device)
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    try:
        for batch in it:
            images, labels = batch[0].to(device), batch[1].to(device)
            if len(batch) < 3:
                conf.update(_predict(model, images, labels.shape[-2:], amp, device, inference, precision), labels)
                continue
            scores = infer(model, images, inference, out_size=images.shape[-2:], amp=amp, precision=precision).float()
            for i, (h, w, lh, lw) in enumerate(batch[2].tolist()):
                s = scores[i:i + 1, :, :h, :w]  # this image, its padding cut off
                if (h, w) != (lh, lw):
                    s = F.interpolate(s, size=(lh, lw), mode="bilinear", align_corners=False)
                conf.update(s.argmax(1), labels[i, :lh, :lw])
    finally:
        model.train(was_training)
    conf.all_reduce()
    return conf.compute(class_names, absent=absent)


def _collate_sizes(batch):
    """:func:`pad_collate`'s ``(images, labels)`` plus ``sizes [B, 4]``: each sample's image and
    label size ``(h, w, lh, lw)`` before padding."""
    images, labels = pad_collate(batch)
    sizes = torch.tensor([[*img.shape[-2:], *lab.shape[-2:]] for img, lab in batch], dtype=torch.int64)
    return images, labels, sizes


def _eval_loader(ds, batch_size: int, num_workers: int = 0, sizes: bool = False):
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if is_distributed() else (0, 1)
    # pad_collate: images of different sizes (VOC) share a batch; the padding is void, never counted
    return torch.utils.data.DataLoader(ds, batch_sampler=ShardedEvalSampler(len(ds), batch_size, rank, world),
                                       num_workers=num_workers, collate_fn=_collate_sizes if sizes else pad_collate)


def _vis_rows(model, ds, n: int, device, amp, inference: Optional[Inference] = None,
              precision: str = "fp32") -> list:
    """``(image, label, prediction)`` of the first ``n`` samples; the prediction on the label's grid."""
    rows = []
    model_was = model.training
    model.eval()
    for i in range(min(n, len(ds))):
        img, lab = ds[i]
        pred = _predict(model, img[None].to(device), lab.shape[-2:], amp, device, inference, precision)[0].cpu()
        rows.append((img, lab, pred))
    model.train(model_was)
    return rows


def _protocol_dataset(cfg: EvalConfig, labels, resize: str):
    """The evaluation split with the protocol's label grid and image resize."""
    ds = make_dataset(cfg, cfg.split, train=False, label_scale=1 if labels == "native" else labels)
    if labels == "native" or resize != "height":
        ds.transform = ds.transform.replace(resize=resize, native_label=labels == "native")
    return ds


def _protocol_record(cfg: EvalConfig, num_classes: int, inference: Inference) -> dict:
    """What ``eval.json`` says about how the numbers were computed."""
    miou = {"skip": "mean over the classes present in labels or predictions",
            "zero": f"mean over all {num_classes} classes, a class absent from labels and predictions counting 0"}
    grid = {4: "⌈H/4⌉ × ⌈W/4⌉ of the resized image (the 1/4 logits' grid)", 1: "the resized image's size",
            "native": "the dataset's native label size"}
    resize = {"height": "image height set to --height, width rounded",
              "shorter_edge": "shorter edge set to --height, the other truncated (torchvision Resize)"}
    rec = {"name": cfg.protocol, "height": cfg.height}
    if cfg.protocol == "ours":
        rec["resolution"] = cfg.resolution
        rec["labels"] = {k: grid[v] for k, v in OUR_RESOLUTIONS.items()
                         if cfg.resolution in (k, "both")}
        rec.update(resize=resize["height"], miou=miou["skip"])
    else:
        p = PROTOCOLS[cfg.protocol]
        rec.update(labels=grid[p["labels"]], resize=resize[p["resize"]], miou=miou[p["absent"]])
    return rec


def _evaluate_config(cfg: EvalConfig) -> dict:
    """Evaluate a model under ``cfg.protocol``:

    - ``ours``: ``--resolution quarter`` (labels on the ⌈H/4⌉ × ⌈W/4⌉ grid of the logits, the
      paper's setting), ``full`` (logits upsampled bilinearly to labels at the resized image's
      size) or ``both``; images resized to ``--height`` (width rounded); mIoU over the classes
      present.
    - ``transkd``: the original TransKD evaluation (``eval/eval_cityscapes_iou.py``): images
      resized with torchvision ``Resize(--height)`` semantics (the shorter edge to ``--height``,
      the other truncated: :func:`transkd_fast.data.transforms.resized_size`; the original uses
      512), labels at 1/4 — on our ⌈H/4⌉ × ⌈W/4⌉ grid (docs/fidelity.md: the original's
      ``Resize(128)`` of the label gives the same grid wherever its metric runs) — and its mIoU:
      the mean over all K classes, an absent class counting 0 (``eval/iouEval.py``,
      :mod:`transkd_fast.engine.metrics`).
    - ``full``: the SegFormer / mmseg protocol: labels at their native resolution, each image's
      logits (at the input size, padding cut off) upsampled bilinearly to them; mIoU over the
      classes present. Equals ``ours --resolution full`` when no ``--height`` resize happens.

    ``cfg.inference`` / ``slide_*`` / ``tta*`` choose how scores are computed
    (:mod:`transkd_fast.engine.inference`), for every protocol. With ``output_dir``, writes
    ``eval.json`` (config, protocol, inference and the metrics with their per-class tables) and
    ``predictions.png``.
    """
    validate_eval_config(cfg)
    inference = Inference.from_config(cfg)
    apply_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if device.type == "cpu":  # full-size inference buffers are reused, not faulted in per image
        tune_cpu_allocator()
    rank, world = init_distributed(device)
    check_precision(cfg.precision)
    if cfg.precision == "bf16" and cfg.amp == "fp16":
        raise ConfigError("--precision bf16 and --amp fp16 exclude each other (use --amp none or bf16)")
    line, _rec = run_header(f"evaluate {cfg.model}", device, cfg.amp, world, cfg.precision)
    if rank == 0:
        print(line, flush=True)
    probe = make_dataset(cfg, cfg.split, train=False)
    info = data_info(cfg, probe)
    model = build_network(cfg.model, info.num_outputs)
    if cfg.weights:
        report = load_weights(model, cfg.weights, model_name=cfg.model, num_outputs=info.num_outputs, void=cfg.void,
                              allow_partial=cfg.allow_partial_weights, require_head=True)
        if rank == 0:
            print(f"weights {report.summary()}", flush=True)
    else:
        print("warning: evaluate without --weights: the model is randomly initialized")
    model.to(device).eval()
    if cfg.precision != "fp32":
        prepare_for_inference(model, cfg.precision)
    if cfg.protocol == "ours":
        wanted = list(OUR_RESOLUTIONS) if cfg.resolution == "both" else [cfg.resolution]
        runs = [(mode, OUR_RESOLUTIONS[mode], "height", "skip") for mode in wanted]
    else:
        p = PROTOCOLS[cfg.protocol]
        runs = [(p["key"], p["labels"], p["resize"], p["absent"])]
    results = {}
    for key, labels, resize, absent in runs:
        ds = _protocol_dataset(cfg, labels, resize)
        loader = _eval_loader(ds, cfg.batch_size, cfg.num_workers, sizes=labels == "native")
        results[key] = evaluate(model, loader, num_classes=info.num_classes, class_names=info.class_names,
                                device=device, amp=cfg.amp, progress=cfg.progress and rank == 0,
                                desc=f"eval {key}", inference=inference, absent=absent, precision=cfg.precision)
    if cfg.output_dir and rank == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        doc = {"config": asdict(cfg), "protocol": _protocol_record(cfg, info.num_classes, inference),
               "inference": inference.describe(), "results": results}
        with open(os.path.join(cfg.output_dir, "eval.json"), "w", encoding="utf-8") as f:
            f.write(json_dumps(doc, indent=2))
        if cfg.num_vis > 0:
            # ours: the --label-scale grid, as before; another protocol: its own labels and resize
            ds = make_dataset(cfg, cfg.split, train=False) if cfg.protocol == "ours" else \
                _protocol_dataset(cfg, runs[0][1], runs[0][2])
            save_predictions(os.path.join(cfg.output_dir, "predictions.png"),
                             _vis_rows(model, ds, cfg.num_vis, device, cfg.amp, inference, cfg.precision),
                             info.palette, info.num_classes, info.mean, info.std)
    return results


# ---------------------------------------------------------------------------------------------
# training


@dataclass
class RunResult:
    output_dir: str
    checkpoint: str
    weights: str
    steps: int
    metrics: Optional[dict] = None
    history: list = field(default_factory=list)
    model: Optional[nn.Module] = None     # the trained (student) network, on its device
    module: Optional[nn.Module] = None    # what was optimized (the network or the distiller)
    info: Optional[DataInfo] = None


class _StopFlag:
    """SIGINT (Ctrl-C) and SIGTERM set a flag; the loop checkpoints at the next step boundary and
    stops (:class:`RunInterrupted` with the signal). A second signal interrupts at once (the last
    checkpoint on disk is still whole)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.stop = False
        self.signum: Optional[int] = None
        self._prev: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                if self.stop:
                    raise RunInterrupted(signum)
                self.stop, self.signum = True, signum
                print(f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
                      "(send it again to abort)", flush=True)

            for sig in self.SIGNALS:
                self._prev[sig] = signal.getsignal(sig)
                signal.signal(sig, handler)
        return self

    def __exit__(self, *exc):
        for sig, prev in self._prev.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        return False


def _parse_inject(spec: Optional[str]) -> tuple[Optional[int], Optional[str]]:
    if not spec:
        return None, None
    step, _, term = str(spec).partition(":")
    return int(step), (term or None)


def train(cfg: TrainConfig) -> RunResult:
    """Train ``cfg.model`` from scratch (or from ``cfg.weights``) with the class-weighted CE."""
    return _run(cfg, "train")


def distill(cfg: TrainConfig) -> RunResult:
    """Distill ``cfg.teacher`` (frozen, weights ``cfg.teacher_weights``) into ``cfg.model`` with
    ``cfg.method`` (a :data:`transkd_fast.distill.DISTILLERS` name)."""
    if not cfg.teacher:
        raise ConfigError("distill needs a teacher model (--teacher, e.g. segformer_b2)")
    return _run(cfg, "distill")


def make_optimizer(params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                   weight_decay: float = 0.01) -> torch.optim.AdamW:
    """The engine's AdamW: PyTorch's fused implementation (one kernel over every parameter,
    CPU and CUDA) when all parameters are fp32/fp16/bf16 on one CPU or CUDA device, else the
    default one. Same update rule either way (fused differs from the loop only by rounding)."""
    params = list(params)
    devices = {p.device.type for p in params}
    fused = (len(devices) == 1 and devices <= {"cpu", "cuda"}
             and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params))
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=True if fused else None)


# ---------------------------------------------------------------------------------------------
# the output folder

RUN_MARKERS = ("last.pt", "model.pt", "metrics.jsonl")
RUN_FILES = RUN_MARKERS + ("curves.png", "predictions.png", "eval.json", "tensorboard")
TMP_FILES = tuple(f"{n}.tmp" for n in ("last.pt", "model.pt", "metrics.jsonl"))

# Settings an exact resume depends on; a resume that changes one is refused.
RESUME_MUST_MATCH = (
    "model", "teacher", "method", "distill_kwargs", "seed", "batch_size", "lr", "beta1", "beta2", "weight_decay",
    "eps", "poly_power", "grad_clip", "amp", "steps", "dataset", "train_split", "height", "label_scale", "void",
    "max_translate", "hflip", "normalize", "class_weights", "synthetic_train_size", "synthetic_height",
    "synthetic_width", "data_seed", "drop_path_rate", "dropout", "label_resize", "acdc_conditions",
    "lr_schedule", "max_decay_steps", "steps_per_epoch", "embed_stages", "cwd_norm", "cwd_divergence",
)
# What a checkpoint written before a setting existed ran with (its config lacks the key).
RESUME_DEFAULTS = {"lr_schedule": "poly", "embed_stages": "all", "cwd_norm": "channel", "cwd_divergence": "kl"}
DISTILL_SETTINGS = ("teacher", "method", "distill_kwargs", "embed_stages", "cwd_norm", "cwd_divergence")
POLY_EPOCH_SETTINGS = ("max_decay_steps", "steps_per_epoch")   # read by --lr-schedule poly-epoch only


def lr_factor(step: int, schedule: str, total: int, power: float, max_decay_steps: int = 1500,
              steps_per_epoch: int = 1) -> float:
    """The lr multiplier of 0-based optimizer step ``step`` (the lr of that step is ``lr ·`` this).

    - ``"poly"``: ``(1 − step/total)^power``, to 0 at the end of the run.
    - ``"poly-epoch"``: the original's ``PolynomialLRDecay(optimizer, max_decay_steps=M,
      end_learning_rate=0, power=p)`` stepped once per epoch: its constructor already steps once
      (the first epoch runs at ``e = 1``, not 0), and past M it stops changing the lr (which is
      then the end lr, 0). So epoch ``e = step // steps_per_epoch + 1`` runs at
      ``(1 − min(e, M)/M)^p``: ``(lr − end)·(1 − e/M)^p + end`` with end = 0, constant within an
      epoch. Verified against the package (torch_poly_lr_decay at the commit the original pins)
      on PyTorch 2.13; PyTorch 1.7.1's scheduler constructor also calls ``step()`` once.
    """
    if schedule == "poly":
        return max(0.0, 1.0 - step / total) ** power
    if schedule == "poly-epoch":
        epoch = step // steps_per_epoch + 1
        return (1.0 - min(epoch, max_decay_steps) / max_decay_steps) ** power
    raise ValueError(f"unknown lr schedule {schedule!r}; choose 'poly' or 'poly-epoch'")


def default_steps_per_epoch(num_samples: int, global_batch: int) -> int:
    """One pass over the training set: ⌈N / global batch⌉ steps, the original's ``len(loader)``
    (``drop_last=False``); the same on every rank (each takes global_batch / world of a step)."""
    return max(1, math.ceil(num_samples / global_batch))


def distiller_kwargs(cfg: TrainConfig) -> dict:
    """``--distill-kwargs`` plus the recipe flags as constructor arguments of ``cfg.method``.

    ``--embed-stages`` → TransKD's ``embed_stages``; ``--cwd-norm`` / ``--cwd-divergence`` → the
    ``cwd`` baseline's ``norm`` / ``divergence`` or TransKD's ``cwd_norm`` / ``cwd_divergence``
    (with ``feature_loss="cwd"``). A non-default flag for a method without that loss, or one
    that disagrees with the same argument in ``--distill-kwargs``, is a :class:`ConfigError`."""
    kw = dict(cfg.distill_kwargs or {})
    method = cfg.method
    transkd = method.startswith("transkd_")

    def put(flag: str, key: str, value) -> None:
        if key in kw and str(kw[key]).lower() != str(value).lower():
            raise ConfigError(f"{flag} {value} conflicts with --distill-kwargs {key}={kw[key]!r}; give it once")
        kw[key] = value

    embed = str(cfg.embed_stages).strip().lower()
    if embed != "all":
        if not transkd:
            raise ConfigError(f"--embed-stages {embed}: --method {method} has no embedding loss (the TransKD methods "
                              "have one)")
        put("--embed-stages", "embed_stages", embed)
    names = ("norm", "divergence") if method == "cwd" else ("cwd_norm", "cwd_divergence")
    for flag, key, value, default in (("--cwd-norm", names[0], cfg.cwd_norm, "channel"),
                                      ("--cwd-divergence", names[1], cfg.cwd_divergence, "kl")):
        if value == default:
            continue
        if not (method == "cwd" or (transkd and kw.get("feature_loss", "hcl") == "cwd")):
            what = (f"the feature loss of --method {method} is {kw.get('feature_loss', 'hcl')!r}" if transkd
                    else f"--method {method} has no CWD loss")
            raise ConfigError(f"{flag} {value}: {what}; CWD is --method cwd, or a TransKD method with "
                              "--distill-kwargs '{\"feature_loss\": \"cwd\"}'")
        put(flag, key, value)
    return kw


def run_files(out: str) -> list[str]:
    """The files of a run in ``out`` (empty: no run there)."""
    return [n for n in RUN_MARKERS if os.path.exists(os.path.join(out, n))]


def move_run_aside(out: str) -> str:
    """Move the run's files in ``out`` to ``out/previous-<n>/`` (n = 1, 2, ...); never deletes."""
    n = 1
    while os.path.exists(os.path.join(out, f"previous-{n}")):
        n += 1
    dest = os.path.join(out, f"previous-{n}")
    os.makedirs(dest)
    for name in sorted(os.listdir(out)):
        if name in RUN_FILES or name in TMP_FILES:
            os.replace(os.path.join(out, name), os.path.join(dest, name))
    return dest


def remove_stale_tmp(out: str) -> list[str]:
    """Remove ``*.tmp`` left by a write cut short (the file it was replacing is still whole)."""
    removed = []
    for name in TMP_FILES:
        p = os.path.join(out, name)
        if os.path.isfile(p):
            os.remove(p)
            removed.append(name)
    return removed


def truncate_log(path: str, step: int) -> int:
    """Drop the ``train``/``eval`` records after ``step`` (and a torn last line) from a metrics log;
    returns how many records were dropped. Written atomically."""
    if not os.path.isfile(path):
        return 0
    keep, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if rec.get("event") in ("train", "eval") and int(rec.get("step", 0)) > step:
                dropped += 1
                continue
            keep.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return dropped


def _changed_settings(old: dict, cfg: TrainConfig, kind: str) -> list[tuple[str, object, object]]:
    now = asdict(cfg)
    out = []
    for k in RESUME_MUST_MATCH:
        if k not in now or (k not in old and k not in RESUME_DEFAULTS):
            continue
        if kind == "train" and k in DISTILL_SETTINGS:
            continue
        if k in POLY_EPOCH_SETTINGS and cfg.lr_schedule != "poly-epoch":
            continue
        if k == "steps" and cfg.extend_steps and now[k] >= old[k]:
            continue
        a, b = old.get(k, RESUME_DEFAULTS.get(k)), now[k]
        if k == "embed_stages":
            same = str(a).strip().lower() == str(b).strip().lower()
        elif isinstance(a, float) or isinstance(b, float):
            same = a is not None and b is not None and float(a) == float(b)
        else:
            same = a == b
        if not same:
            out.append((k, a, b))
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _resolve_resume(cfg: TrainConfig, ckpt_path: str) -> Optional[str]:
    """Which checkpoint this run continues (None: a fresh start), or a ConfigError when a fresh
    start would destroy a run in the output folder."""
    out = cfg.output_dir
    present = run_files(out) if os.path.isdir(out) else []
    resume = cfg.resume
    if resume == "auto":
        if os.path.isfile(ckpt_path):
            return ckpt_path
        if present:
            raise ConfigError(f"--resume auto: {out} holds a run ({', '.join(present)}) but no last.pt to continue; "
                              f"--overwrite starts over (the old files move to {out}/previous-<n>/)")
        return None
    if resume:
        if present and os.path.abspath(resume) != os.path.abspath(ckpt_path):
            raise ConfigError(f"--resume {resume}: the output folder {out} holds another run ({', '.join(present)}); "
                              "choose another --output-dir")
        return resume
    if present and not cfg.overwrite:
        raise ConfigError(f"{out} holds a run ({', '.join(present)}): continue it with --resume auto, or start "
                          f"over with --overwrite (the old run moves to {out}/previous-<n>/), or use another "
                          "--output-dir")
    return None


def _load_state(module: nn.Module, state: dict, path: str, excluded: tuple = ()) -> None:
    """A checkpoint's state into ``module``, or one ConfigError naming what does not fit."""
    target = module.state_dict()
    missing = [k for k in target if k not in state and not k.startswith(excluded)]
    unexpected = [k for k in state if k not in target]
    mism = [k for k in state if k in target and tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or mism:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", mism)):
            if keys:
                parts.append(f"{len(keys)} {what} (e.g. {keys[0]})")
        raise ConfigError(f"--resume {path} does not fit this run's network: tensors {', '.join(parts)}")
    module.load_state_dict(state, strict=not excluded)


def _teacher_identity(cfg: TrainConfig, teacher: nn.Module) -> dict:
    return {"model": cfg.teacher, "weights": os.path.abspath(cfg.teacher_weights) if cfg.teacher_weights else None,
            "sha256": state_fingerprint(teacher.state_dict())}


def _logit_grid(images: torch.Tensor) -> tuple[int, int]:
    """The student's logit size: 1/4 of the input, rounded up (stage 1's k7 s4 p3 patch embedding)."""
    h, w = images.shape[-2:]
    return (h + 3) // 4, (w + 3) // 4


def _run(cfg: TrainConfig, kind: str) -> RunResult:
    validate_train_config(cfg)
    require_tensorboard(cfg)
    kd_kwargs = distiller_kwargs(cfg) if kind == "distill" else {}  # refused flags fail before any set-up
    apply_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if device.type == "cpu" and cfg.cpu_allocator == "tuned":
        tune_cpu_allocator()
    rank, world = init_distributed(device)
    main = rank == 0
    header, header_rec = run_header(f"{kind} {cfg.model}" + (f" from {cfg.teacher} ({cfg.method})"
                                                             if kind == "distill" else ""), device, cfg.amp, world)
    if main:
        print(header, flush=True)
    if cfg.batch_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} (global) must be divisible by the {world} ranks")
    if kind == "distill" and world > 1 and not cfg.sync_bn and cfg.batch_size // world == 1:
        raise ConfigError(f"--no-sync-bn with one image per rank ({cfg.batch_size} over {world} ranks): the "
                          "distillation modules' BatchNorm would see one value per channel; use --sync-bn "
                          "(the default) or a larger --batch-size")
    if cfg.amp != "none":
        autocast_context(cfg.amp, device)  # validates early
    ckpt_path = os.path.join(cfg.output_dir, "last.pt")
    weights_path = os.path.join(cfg.output_dir, "model.pt")
    log_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    # Decide before the set-up: a run that would destroy another is refused at once.
    resume = _resolve_resume(cfg, ckpt_path)
    barrier()  # every rank has looked at the folder before rank 0 changes anything in it
    ckpt = load_checkpoint(resume) if resume else None
    if ckpt is not None:
        if ckpt.get("kind") != kind:
            raise ConfigError(f"--resume {resume} is a {ckpt.get('kind')!r} checkpoint; this is a {kind!r} run "
                              f"(continue it with `transkd-fast {ckpt.get('kind')}`)")
        changed = _changed_settings(ckpt.get("config") or {}, cfg, kind)
        if changed:
            what = ", ".join(f"{_flag(k)} {a!r} (now {b!r})" for k, a, b in changed)
            hint = "; --extend-steps accepts a larger --steps" if any(k == "steps" for k, _, _ in changed) else ""
            raise ConfigError(f"--resume {resume} was run with other settings: {what}; an exact resume needs the "
                              f"same ones (or start a new run: --overwrite or another --output-dir){hint}")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)

    train_ds = make_dataset(cfg, cfg.train_split, train=True)
    val_ds = make_dataset(cfg, cfg.val_split, train=False)
    info = data_info(cfg, train_ds)
    weight = torch.tensor(info.class_weights, dtype=torch.float32, device=device) if info.class_weights else None

    model = build_network(cfg.model, info.num_outputs, cfg.drop_path_rate, cfg.dropout)
    reports = []
    if cfg.weights:
        reports.append(("weights", load_weights(model, cfg.weights, model_name=cfg.model,
                                                num_outputs=info.num_outputs, void=cfg.void,
                                                allow_partial=cfg.allow_partial_weights)))
    teacher_id = None
    exclude: tuple = ()
    if kind == "distill":
        from transkd_fast.distill import build_distiller

        teacher = build_network(cfg.teacher, info.num_outputs, 0.0, 0.0)
        module = build_distiller(cfg.method, model, teacher, class_weights=info.class_weights,
                                 ignore_index=info.ignore_index, **kd_kwargs)
        if cfg.teacher_weights:
            reports.append(("teacher weights", load_weights(
                teacher, cfg.teacher_weights, flag="--teacher-weights", model_name=cfg.teacher,
                num_outputs=info.num_outputs, void=cfg.void, allow_partial=cfg.allow_partial_weights,
                require_head=bool(getattr(module, "uses_teacher_logits", False)))))
        elif main:
            print("warning: distilling from a randomly initialized teacher (no --teacher-weights)")
        teacher_id = _teacher_identity(cfg, teacher)
        exclude = ("teacher.",)
        # CSF's batch-1 branch is chosen from the global batch, not this rank's share.
        for m in module.modules():
            if hasattr(m, "data_parallel_size"):
                m.data_parallel_size = world
    else:
        module = model
    if main:
        for what, rep in reports:
            print(f"{what} {rep.summary()}", flush=True)
    if ckpt is not None and kind == "distill":
        old = ckpt.get("teacher")
        if old is not None and old.get("sha256") != teacher_id["sha256"]:
            raise ConfigError(f"--resume {resume} was distilled from another teacher ({old.get('model')}, weights "
                              f"{old.get('weights')}, sha256 {str(old.get('sha256'))[:12]}); this run's teacher "
                              f"({cfg.teacher}, weights {teacher_id['weights']}, sha256 {teacher_id['sha256'][:12]}) "
                              "differs: pass the same --teacher-weights")
    module.to(device)
    if world > 1 and cfg.sync_bn:
        module = convert_sync_batchnorm(module, device)
        model = module.student_model() if kind == "distill" else module
    params = list(module.trainable_parameters()) if kind == "distill" else \
        [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                               weight_decay=cfg.weight_decay)
    total = cfg.steps
    spe = cfg.steps_per_epoch or default_steps_per_epoch(len(train_ds), cfg.batch_size)

    def factor(s: int) -> float:
        return lr_factor(s, cfg.lr_schedule, total, cfg.poly_power, cfg.max_decay_steps, spe)

    if cfg.lr_schedule == "poly-epoch" and main:
        print(f"lr schedule poly-epoch: {spe} steps per epoch, decay over {cfg.max_decay_steps} epochs; this run "
              f"ends in epoch {(total - 1) // spe + 1} at lr {cfg.lr * factor(total - 1):.4g}", flush=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scaler = torch.amp.GradScaler("cuda") if (cfg.amp == "fp16" and device.type == "cuda") else None

    start_step, restored_rng = 0, None
    if ckpt is not None:
        _load_state(module, ckpt["model"], resume, tuple(ckpt.get("excluded") or ()))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_step = int(ckpt["step"])
        old_steps = (ckpt.get("config") or {}).get("steps", total)
        if old_steps != total:  # --extend-steps: the schedule follows the new total from here on
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base * factor(start_step)
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        states = ckpt["rng"]
        restored_rng = states[rank] if len(states) == world else states[0]
    # The folder: nothing in it changed until here.
    if main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        if resume is None and run_files(cfg.output_dir):
            print(f"--overwrite: moved the previous run to {move_run_aside(cfg.output_dir)}", flush=True)
        removed = remove_stale_tmp(cfg.output_dir)
        if removed:
            print(f"removed stale {', '.join(removed)} (a write cut short; the previous file is whole)", flush=True)
        if resume is not None:
            dropped = truncate_log(log_path, start_step)
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json_dumps({**header_rec, "event": "resume", "step": start_step, "from": resume,
                                    "dropped_records": dropped, "steps": total}) + "\n")
            print(f"resumed from {resume} at step {start_step}"
                  + (f" (dropped {dropped} log records after it)" if dropped else ""), flush=True)
        else:
            with open(log_path, "w", encoding="utf-8") as f:
                f.write(json_dumps({**header_rec, "step": 0, "kind": kind, "config": asdict(cfg),
                                    "teacher": teacher_id}) + "\n")
    barrier()
    tb = open_tensorboard(cfg, main, start_step, info.class_names, log_path)  # None unless --tensorboard

    net = module
    if world > 1:
        # Depthwise-conv grads come back channels-last; DDP copies them into its buckets (harmless).
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        net = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None,
            # KD modules skip parameters (CSF's batch-1 squeeze MLP at batch ≥ 2).
            find_unused_parameters=kind == "distill")
    sampler = StepBatchSampler(len(train_ds), cfg.batch_size, total, seed=cfg.seed, start_step=start_step,
                               rank=rank, world_size=world)
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, num_workers=cfg.num_workers,
                                         pin_memory=device.type == "cuda", collate_fn=pad_collate,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    # Everything random from here on (dropout, drop path) comes from the global generators,
    # seeded per rank: masks are drawn independently on each rank (see the module docstring).
    if restored_rng is not None:
        set_rng_state(restored_rng)
    else:
        torch.manual_seed(cfg.seed * 1000 + rank)
        np.random.seed(cfg.seed * 1000 + rank)
        random.seed(cfg.seed * 1000 + rank)

    inject_step, inject_term = _parse_inject(cfg.inject_nan)
    history, window = [], []
    last_saved = start_step if resume else None
    result_metrics = None
    t_start = time.time()

    def save(step: int) -> None:
        nonlocal last_saved
        states = [rng_state()]
        if is_distributed():
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, states[0])
            states = gathered
        if main:
            save_checkpoint(ckpt_path, kind=kind, step=step, model=module, optimizer=optimizer, scheduler=scheduler,
                            scaler=scaler, rng=states, config=asdict(cfg), exclude=exclude,
                            extra={"teacher": teacher_id} if teacher_id else None)
        barrier()
        last_saved = step

    def log(rec: dict) -> None:
        if main:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json_dumps(rec) + "\n")
            if tb is not None:
                tb.add(rec)

    def run_eval(step: int) -> dict:
        m = evaluate(model, _eval_loader(val_ds, cfg.eval_batch_size, cfg.num_workers),
                     num_classes=info.num_classes, class_names=info.class_names, device=device, amp=cfg.amp)
        log({"event": "eval", "step": step, "split": cfg.val_split, "miou": m["miou"], "pixel_acc": m["pixel_acc"],
             "iou": m["iou"]})
        return m

    bar = None
    if cfg.progress and main:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start_step, desc=f"{kind} {cfg.model}", dynamic_ncols=True)
    net.train()
    names: Optional[list] = None
    with _StopFlag() as stopper:
        try:
            for i, (images, labels) in enumerate(loader):
                step = start_step + i + 1
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                with autocast_context(cfg.amp, device):
                    if kind == "train":
                        logits = net(images)
                        ce = global_weighted_ce(logits, labels, weight, info.ignore_index)
                        terms = {"loss": ce, "ce": ce}
                    else:
                        # The distiller checks labels against its 1/4 logits; at --label-scale 1 it gets
                        # them on that grid, and the CE that counts is computed here, on the full-size
                        # labels, normalized over the global batch (DDP = 1 rank).
                        grid = _logit_grid(images)
                        kd_labels = labels if tuple(labels.shape[-2:]) == grid else F.interpolate(
                            labels[:, None].float(), size=grid, mode="nearest")[:, 0].long()
                        out = net(images, kd_labels)
                        ce = global_weighted_ce(out["logits"], labels, weight, info.ignore_index)
                        kd = {k: v for k, v in out.items()
                              if k not in ("loss", "ce", "logits") and torch.is_tensor(v) and v.dim() == 0}
                        loss = ce
                        for v in kd.values():
                            loss = loss + v
                        terms = {"loss": loss, "ce": ce, **kd}
                if inject_step == step:
                    t = inject_term or "loss"
                    if t not in terms:
                        raise ConfigError(f"--inject-nan: no loss term {t!r} (terms: {', '.join(terms)})")
                    terms[t] = terms[t] * float("nan")
                    if t != "loss":
                        terms["loss"] = terms["loss"] + terms[t]
                if names is None:
                    names = ["loss"] + [k for k in terms if k != "loss"]
                vec = torch.stack([terms[k].detach().float() for k in names]
                                  + [torch.tensor(float(stopper.stop), device=device)])
                vec = all_reduce_sum(vec)
                vals = (vec[:-1] / world).tolist()
                stop_now = vec[-1].item() > 0
                bad = [(k, v) for k, v in zip(names, vals) if not math.isfinite(v)]
                if bad:
                    k, v = next(((k, v) for k, v in bad if k != "loss"), bad[0])
                    where = (f"the last good checkpoint is {ckpt_path} (step {last_saved})" if last_saved
                             else "no checkpoint had been written yet")
                    msg = (f"non-finite loss at step {step}: term '{k}' = {v} "
                           f"({', '.join(f'{n}={x:.4g}' for n, x in zip(names, vals))}); stopped before the "
                           f"optimizer step; {where}")
                    log({"event": "nonfinite", "step": step, "term": k, "terms": dict(zip(names, vals))})
                    raise NonFiniteLossError(msg)
                optimizer.zero_grad(set_to_none=True)
                loss = terms["loss"]
                if scaler is not None:
                    scaler.scale(loss).backward()
                    if cfg.grad_clip:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    optimizer.step()
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                window.append(vals)
                if step % max(1, cfg.log_every) == 0 or step == total:
                    mean_vals = np.mean(np.array(window), axis=0).tolist()
                    rec = {"event": "train", "step": step, "lr": lr, "terms": dict(zip(names, mean_vals)),
                           "elapsed_s": round(time.time() - t_start, 3)}
                    history.append(rec)
                    log(rec)
                    window = []
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in zip(names, vals)}, refresh=False)
                if cfg.eval_every and step % cfg.eval_every == 0 and step != total:
                    m = run_eval(step)
                    if bar is not None:
                        bar.write(f"step {step}: val mIoU {100 * m['miou']:.2f}")
                planned_stop = cfg.stop_at is not None and step >= cfg.stop_at and step < total
                if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == total or stop_now or planned_stop:
                    save(step)
                if stop_now or planned_stop:
                    if main:
                        print(f"stopped at step {step}; checkpoint {ckpt_path} (continue with --resume auto)",
                              flush=True)
                    if stop_now:
                        raise RunInterrupted(stopper.signum or signal.SIGINT)
                    close_tensorboard(tb)
                    return RunResult(cfg.output_dir, ckpt_path, weights_path, step, None, history, model, module,
                                     info)
        except BaseException:
            close_tensorboard(tb)
            raise
        finally:
            if bar is not None:
                bar.close()

    final_step = max(start_step, total)
    if main:
        save_weights(model, weights_path, meta={"model": cfg.model, "num_outputs": info.num_outputs,
                                                "num_classes": info.num_classes, "void": cfg.void,
                                                "kind": kind, "step": final_step})
    barrier()
    if cfg.eval_at_end:
        result_metrics = run_eval(final_step)
        if main:
            plot_curves({kind: log_path}, os.path.join(cfg.output_dir, "curves.png"), title=f"{kind} {cfg.model}")
            if cfg.num_vis > 0:
                save_predictions(os.path.join(cfg.output_dir, "predictions.png"),
                                 _vis_rows(model, val_ds, cfg.num_vis, device, cfg.amp), info.palette,
                                 info.num_classes, info.mean, info.std)
    close_tensorboard(tb)
    return RunResult(cfg.output_dir, ckpt_path, weights_path, final_step, result_metrics, history, model, module, info)
