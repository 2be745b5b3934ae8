"""The training, distillation and evaluation loops.

``train(cfg)`` trains one network with the class-weighted CE; ``distill(cfg)`` trains a
student through a distiller (``cfg.method``) against a frozen teacher; ``evaluate(...)``
computes mIoU / per-class IoU / pixel accuracy. All three run on one process or under
``torchrun`` (DDP: gloo on CPU, nccl on CUDA).

Exactness. A step's batch and augmentation depend only on ``(seed, step)``
(:class:`~transkd_fast.data.sampler.StepBatchSampler`), the DataLoader has its own generator
(creating its iterator does not touch the global RNG), and checkpoints hold every RNG, so
``resume`` continues bit for bit. Under DDP, ``train``'s CE is normalized by the *global*
Σ weight(label) (all-reduced), BatchNorm statistics are synchronized across ranks, and the
logged terms are all-reduced: W ranks reproduce the 1-rank run with the same global batch up
to float summation order. (A distiller's own CE is a per-rank weighted mean: with void pixels
unevenly split between ranks, its DDP loss differs slightly from one rank's.)

A non-finite loss term stops the run *before* the optimizer step with
:class:`NonFiniteLossError` naming the step and the term; the last checkpoint on disk is the
last good one (checkpoints are written atomically).
"""

from __future__ import annotations

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

from transkd_fast.data import SegTransform, build_dataset
from transkd_fast.data.sampler import ShardedEvalSampler, StepBatchSampler
from transkd_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from transkd_fast.engine.checkpoint import (
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    save_weights,
    set_rng_state,
)
from transkd_fast.engine.config import EvalConfig, TrainConfig
from transkd_fast.engine.distributed import (
    all_reduce_sum,
    barrier,
    convert_sync_batchnorm,
    env_world,
    init_distributed,
    is_distributed,
)
from transkd_fast.engine.metrics import ConfusionMatrix
from transkd_fast.engine.viz import plot_curves, save_predictions
from transkd_fast.runtime import tune_cpu_allocator

VOID = 255


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN/Inf; the message names the step and the term."""


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
    if amp in (None, "none"):
        return nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"amp must be none | bf16 | fp16, got {amp!r}")
    if device.type != "cuda":
        raise ValueError(f"AMP ({amp}) is CUDA-only; this run is on {device.type} (use --amp none)")
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


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


def make_transform(cfg, train: bool, num_classes: int, label_scale: Optional[int] = None) -> SegTransform:
    if cfg.void not in ("class", "ignore"):
        raise ValueError(f"void must be 'class' or 'ignore', got {cfg.void!r}")
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if cfg.normalize else (None, None)
    return SegTransform(height=cfg.height, train=train, label_scale=label_scale or cfg.label_scale,
                        max_translate=cfg.max_translate, hflip=cfg.hflip,
                        void_id=num_classes if cfg.void == "class" else None, mean=mean, std=std)


def make_dataset(cfg, split: str, train: bool, label_scale: Optional[int] = None, size: Optional[int] = None):
    kwargs = {}
    if cfg.dataset == "synthetic":
        kwargs = dict(num_samples=size or (cfg.synthetic_train_size if train else cfg.synthetic_val_size),
                      height=cfg.synthetic_height, width=cfg.synthetic_width, seed=cfg.data_seed)
    ds = build_dataset(cfg.dataset, split, root=cfg.data_root, **kwargs)
    ds.transform = make_transform(cfg, train, ds.num_classes, label_scale)
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
def _predict(model: nn.Module, images: torch.Tensor, out_size, amp: str, device: torch.device) -> torch.Tensor:
    with autocast_context(amp, device):
        logits = model(images)
    if isinstance(logits, (tuple, list)):
        logits = logits[1] if len(logits) == 3 else logits[0]
    logits = logits.float()
    if tuple(logits.shape[-2:]) != tuple(out_size):
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
    return logits.argmax(1)


def evaluate(model_or_cfg: Union[nn.Module, EvalConfig], loader=None, *, num_classes: Optional[int] = None,
             class_names=None, device: Optional[torch.device] = None, amp: str = "none",
             progress: bool = False, desc: str = "eval") -> dict:
    """mIoU, per-class IoU and pixel accuracy (see :mod:`transkd_fast.engine.metrics`).

    ``evaluate(model, loader)``: ``loader`` yields ``(images, labels)``; the logits are
    upsampled (bilinear) to the labels' size when they differ, so labels at 1/4 resolution
    give the paper's metric and full-size labels the full-resolution one. Classes are
    ``num_classes`` (default: the loader's dataset's, else the model's); a label
    ``≥ num_classes`` (void) is not counted. Under DDP each rank evaluates its shard and the
    confusion matrices are all-reduced. A distiller is evaluated through its student.

    ``evaluate(EvalConfig)``: builds the model and data and evaluates in the configured
    resolution(s); returns ``{"quarter": metrics, "full": metrics}``.
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
        for images, labels in it:
            images, labels = images.to(device), labels.to(device)
            conf.update(_predict(model, images, labels.shape[-2:], amp, device), labels)
    finally:
        model.train(was_training)
    conf.all_reduce()
    return conf.compute(class_names)


def _eval_loader(ds, batch_size: int, num_workers: int = 0):
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if is_distributed() else (0, 1)
    return torch.utils.data.DataLoader(ds, batch_sampler=ShardedEvalSampler(len(ds), batch_size, rank, world),
                                       num_workers=num_workers)


def _vis_rows(model, ds, n: int, device, amp) -> list:
    rows = []
    model_was = model.training
    model.eval()
    for i in range(min(n, len(ds))):
        img, lab = ds[i]
        pred = _predict(model, img[None].to(device), lab.shape[-2:], amp, device)[0].cpu()
        rows.append((img, lab, pred))
    model.train(model_was)
    return rows


def _evaluate_config(cfg: EvalConfig) -> dict:
    device = resolve_device(cfg.device)
    rank, _world = init_distributed(device)
    probe = make_dataset(cfg, cfg.split, train=False)
    info = data_info(cfg, probe)
    model = build_network(cfg.model, info.num_outputs)
    if cfg.weights:
        load_weights(model, cfg.weights)
    else:
        print("warning: evaluate without --weights: the model is randomly initialized")
    model.to(device).eval()
    modes = {"quarter": 4, "full": 1}
    wanted = list(modes) if cfg.resolution == "both" else [cfg.resolution]
    results = {}
    for mode in wanted:
        if mode not in modes:
            raise ValueError(f"resolution must be quarter | full | both, got {cfg.resolution!r}")
        ds = make_dataset(cfg, cfg.split, train=False, label_scale=modes[mode])
        results[mode] = evaluate(model, _eval_loader(ds, cfg.batch_size, cfg.num_workers),
                                 num_classes=info.num_classes, class_names=info.class_names, device=device,
                                 amp=cfg.amp, progress=cfg.progress and rank == 0, desc=f"eval {mode}")
    if cfg.output_dir and rank == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "eval.json"), "w", encoding="utf-8") as f:
            json.dump({"config": asdict(cfg), "results": results}, f, indent=2)
        if cfg.num_vis > 0:
            ds = make_dataset(cfg, cfg.split, train=False)
            save_predictions(os.path.join(cfg.output_dir, "predictions.png"),
                             _vis_rows(model, ds, cfg.num_vis, device, cfg.amp), info.palette, info.num_classes,
                             info.mean, info.std)
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
    """Ctrl-C sets a flag; the loop checkpoints at the next step boundary and stops. A second
    Ctrl-C interrupts at once (the last checkpoint on disk is still whole)."""

    def __init__(self):
        self.stop = False
        self._prev = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.getsignal(signal.SIGINT)

            def handler(signum, frame):
                if self.stop:
                    raise KeyboardInterrupt
                self.stop = True
                print("\ninterrupt: stopping after this step and writing a checkpoint (Ctrl-C again to abort)",
                      flush=True)

            signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)
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
        raise ValueError("distill needs a teacher model (--teacher, e.g. segformer_b2)")
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


def _run(cfg: TrainConfig, kind: str) -> RunResult:
    device = resolve_device(cfg.device)
    if cfg.cpu_allocator not in ("tuned", "default"):
        raise ValueError(f"cpu_allocator must be 'tuned' or 'default', got {cfg.cpu_allocator!r}")
    if device.type == "cpu" and cfg.cpu_allocator == "tuned":
        tune_cpu_allocator()
    rank, world = init_distributed(device)
    main = rank == 0
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} (global) must be divisible by the {world} ranks")
    if cfg.amp != "none":
        autocast_context(cfg.amp, device)  # validates early
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)

    train_ds = make_dataset(cfg, cfg.train_split, train=True)
    val_ds = make_dataset(cfg, cfg.val_split, train=False)
    info = data_info(cfg, train_ds)
    weight = torch.tensor(info.class_weights, dtype=torch.float32, device=device) if info.class_weights else None

    model = build_network(cfg.model, info.num_outputs, cfg.drop_path_rate, cfg.dropout)
    if cfg.weights:
        load_weights(model, cfg.weights)
    if kind == "distill":
        from transkd_fast.distill import build_distiller

        teacher = build_network(cfg.teacher, info.num_outputs, 0.0, 0.0)
        if cfg.teacher_weights:
            load_weights(teacher, cfg.teacher_weights)
        elif main:
            print("warning: distilling from a randomly initialized teacher (no --teacher-weights)")
        module = build_distiller(cfg.method, model, teacher, class_weights=info.class_weights,
                                 ignore_index=info.ignore_index, **cfg.distill_kwargs)
    else:
        module = model
    module.to(device)
    if world > 1 and cfg.sync_bn:
        module = convert_sync_batchnorm(module, device)
        model = module.student_model() if kind == "distill" else module
    params = list(module.trainable_parameters()) if kind == "distill" else \
        [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                               weight_decay=cfg.weight_decay)
    total, power = cfg.steps, cfg.poly_power
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / total) ** power)
    scaler = torch.amp.GradScaler("cuda") if (cfg.amp == "fp16" and device.type == "cuda") else None

    os.makedirs(cfg.output_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.output_dir, "last.pt")
    weights_path = os.path.join(cfg.output_dir, "model.pt")
    log_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    start_step, restored_rng = 0, None
    resume = cfg.resume
    if resume == "auto":
        resume = ckpt_path if os.path.isfile(ckpt_path) else None
    if resume:
        ckpt = load_checkpoint(resume)
        if ckpt.get("kind") != kind:
            raise ValueError(f"{resume} is a {ckpt.get('kind')!r} checkpoint; this is a {kind!r} run")
        module.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_step = int(ckpt["step"])
        states = ckpt["rng"]
        restored_rng = states[rank] if len(states) == world else states[0]
        if main:
            print(f"resumed from {resume} at step {start_step}")
    elif main:
        open(log_path, "w").close()

    net = module
    if world > 1:
        # Depthwise-conv grads come back channels-last; DDP copies them into its buckets (harmless).
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        net = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None,
            # KD modules may skip parameters on some steps (e.g. CSF's BN at local batch 1).
            find_unused_parameters=kind == "distill")
    sampler = StepBatchSampler(len(train_ds), cfg.batch_size, total, seed=cfg.seed, start_step=start_step,
                               rank=rank, world_size=world)
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, num_workers=cfg.num_workers,
                                         pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(cfg.seed))
    # Everything random from here on (dropout, drop path) comes from the global generators.
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
                            scaler=scaler, rng=states, config=asdict(cfg))
        barrier()
        last_saved = step

    def log(rec: dict) -> None:
        if main:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

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
                        out = net(images, labels)
                        terms = {k: v for k, v in out.items() if k != "logits" and torch.is_tensor(v) and v.dim() == 0}
                if inject_step == step:
                    t = inject_term or "loss"
                    if t not in terms:
                        raise ValueError(f"inject_nan: no loss term {t!r} (terms: {', '.join(terms)})")
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
                        raise KeyboardInterrupt
                    return RunResult(cfg.output_dir, ckpt_path, weights_path, step, None, history, model, module,
                                     info)
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
    return RunResult(cfg.output_dir, ckpt_path, weights_path, final_step, result_metrics, history, model, module, info)
