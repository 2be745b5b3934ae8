"""``transkd-fast demo``: the paper's experiment in miniature, on a synthetic task.

1. the **teacher** (a SegFormer-B0 by default, the student's size) stands in for the big
   pre-trained model the paper distils from: it trains longer, with a larger batch, on far more
   images (``--teacher-train-size``: 16000 against the students' 256) of the synthetic ``scenes`` task
   (:func:`transkd_fast.data.synthetic.render_scene`). Its training is **cached** in
   ``<cache-dir>/teacher-<model>-<hash>/`` (``<cache-dir>`` defaults to
   ``<output-dir>/cache``), the hash over every setting it depends on, so a rerun reuses it
   (``--retrain-teacher`` trains it again, the old run moved aside);
2. per seed, each ``--methods`` student (TransKD-Base by default; ``transkd_gl``,
   ``transkd_ea``, ``logit_kd``, ``cwd``, ``review_kd`` can be added) is distilled into a
   SegFormer-B0, and the same B0 is trained without KD: same steps, batch, learning rate, the
   same ``--train-size`` labelled images in the same order with the same augmentation;
3. all of them are evaluated on a held-out split (``test``, never seen in training or
   validation) at 1/4 resolution (the training protocol: labels on the logits' grid) and at
   full resolution (logits upsampled to the full-size labels);
4. the report: a table (mIoU, per-class IoU, params, GFLOPs in both conventions, training
   seconds per step), the TransKD-Base step of this library against the original-style step
   measured in the same process on a few steps, mean ± std over seeds and the paired
   difference KD − plain, a verdict paragraph of numbers; ``predictions.png`` (image | label |
   teacher | students, with a class legend), ``curves.png``, ``report.json`` and ``report.md``.

Every run checkpoints; after Ctrl-C (or SIGTERM), ``--resume`` continues the interrupted run
and skips the finished ones; ``--overwrite`` starts the students over (old runs are moved
aside). A folder that holds a run is refused without one of them (the teacher's cache folder
is always continued or reused: its settings are in its name).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from transkd_fast.engine.config import ConfigError, TrainConfig


@dataclass
class DemoConfig:
    task: str = "scenes"
    teacher: str = "segformer_b0"
    student: str = "segformer_b0"
    methods: list = field(default_factory=lambda: ["transkd_base"])
    height: int = 64
    width: int = 64
    teacher_train_size: int = 16000
    train_size: int = 256
    val_size: int = 32
    test_size: int = 128
    teacher_steps: int = 1400
    student_steps: int = 300
    batch_size: int = 8
    teacher_batch_size: int = 32
    teacher_label_scale: int = 1
    teacher_lr: float = 6e-3
    lr: float = 2e-3
    teacher_seed: int = 0
    seeds: list = field(default_factory=lambda: [0])
    data_seed: int = 0
    output_dir: str = "runs/demo"
    cache_dir: Optional[str] = None
    retrain_teacher: bool = False
    step_bench: int = 3
    threads: Optional[int] = None
    device: str = "auto"
    progress: bool = True
    resume: bool = False
    overwrite: bool = False
    quick: bool = False


QUICK = dict(teacher_train_size=4096, train_size=128, val_size=16, test_size=64, teacher_steps=350,
             student_steps=50, step_bench=1)

HELP = {
    "task": "synthetic task: scenes (shapes x textures with clutter, occlusion; the demo's) | textures (the "
            "older, harder one)",
    "teacher": "teacher network (stands in for the big pre-trained model)",
    "student": "student network",
    "methods": "distillation methods, one KD student each (transkd_base, transkd_gl, transkd_ea, logit_kd, cwd, "
               "review_kd)",
    "height": "synthetic image height",
    "width": "synthetic image width",
    "teacher_train_size": "synthetic training images the teacher learns from",
    "train_size": "labelled training images of every student (the first of the teacher's)",
    "val_size": "synthetic validation images (monitoring during training)",
    "test_size": "held-out synthetic images for the final table",
    "teacher_steps": "teacher training steps",
    "student_steps": "steps of each student (KD and plain)",
    "batch_size": "batch size of the students",
    "teacher_batch_size": "batch size of the teacher",
    "teacher_label_scale": "labels the teacher trains on: 1 = full resolution (logits upsampled bilinearly; learns the "
                           "shapes faster), 4 = on the 1/4 logits' grid (the paper's protocol, the students')",
    "teacher_lr": "AdamW learning rate of the teacher",
    "lr": "AdamW learning rate of the students (the paper's 6e-5 is for 100k+ steps; short runs need more)",
    "teacher_seed": "teacher seed (init, data order, augmentation)",
    "seeds": "student seeds (init, data order, augmentation)",
    "data_seed": "synthetic dataset seed",
    "output_dir": "output directory",
    "cache_dir": "where trained teachers are kept, one folder per setting (default: <output-dir>/cache)",
    "retrain_teacher": "train the teacher even when the cache holds it (the cached run is moved aside)",
    "step_bench": "timed steps of the ours vs original-style TransKD-Base step comparison (0: skip)",
    "threads": "torch threads of every run (default: PyTorch's choice; 1 when the load average is at least the "
               "core count)",
    "device": "auto | cpu | cuda",
    "progress": "progress bars",
    "resume": "continue interrupted runs, skip finished ones",
    "overwrite": "start the students over where runs exist (each old run is moved to <run>/previous-<n>/)",
    "quick": f"a much smaller setting for CI ({', '.join(f'{k}={v}' for k, v in QUICK.items())})",
}

_LIST_TYPES = {"seeds": int, "methods": str}
_OPTIONAL_TYPES = {"cache_dir": str, "threads": int}


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    for name, value in asdict(d).items():
        opts = ["--" + name.replace("_", "-")] + (["--method"] if name == "methods" else [])
        h = HELP[name] + (f" (default: {value})" if name != "quick" else "")
        if isinstance(value, bool):
            action = argparse.BooleanOptionalAction if name not in ("quick", "retrain_teacher") else "store_true"
            p.add_argument(*opts, dest=name, action=action, default=value, help=h)
        elif isinstance(value, list):
            p.add_argument(*opts, dest=name, type=_LIST_TYPES[name], nargs="+", default=None, help=h)
        elif value is None:
            p.add_argument(*opts, dest=name, type=_OPTIONAL_TYPES[name], default=None, help=h)
        else:
            p.add_argument(*opts, dest=name, type=type(value), default=None, help=h)


def demo_config_from_args(args: argparse.Namespace) -> DemoConfig:
    """Defaults, then the ``--quick`` preset, then explicitly given options."""
    cfg = DemoConfig(quick=bool(args.quick))
    if cfg.quick:
        for k, v in QUICK.items():
            setattr(cfg, k, v)
    for name in asdict(cfg):
        v = getattr(args, name, None)
        if v is not None and name != "quick":
            setattr(cfg, name, v)
    return cfg


def _gflops(model: torch.nn.Module, h: int, w: int) -> tuple[dict, str]:
    """GFLOPs (one multiply-add = one FLOP) at 1×3×h×w in both conventions."""
    from transkd_fast.flops import analyze, original_head

    x = torch.randn(1, 3, h, w, device=next(model.parameters()).device)
    # Counted as the zoo table counts: eval mode, the decode head unfolded as in the original.
    with original_head(model):
        count = analyze(model, (x,))
    return {"full": count.full / 1e9, "paper": count.paper / 1e9}, "transkd_fast.flops (fvcore + op handles)"


def _train_cfg(cfg: DemoConfig, out: str, seed: int, steps: int, train_size: int, lr: float, batch_size: int,
               resume: Optional[str], overwrite: bool, **kw) -> TrainConfig:
    return TrainConfig(
        dataset="synthetic", synthetic_train_size=train_size, synthetic_val_size=cfg.val_size,
        synthetic_height=cfg.height, synthetic_width=cfg.width, data_seed=cfg.data_seed,
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=cfg.device, threads=cfg.threads,
        output_dir=out, progress=cfg.progress,
        eval_every=max(1, steps // 5), ckpt_every=max(1, steps // 5), log_every=max(1, steps // 50),
        resume=resume, overwrite=overwrite, num_vis=4, **kw)


def _student_cfg(cfg: DemoConfig, name: str, seed: int, **kw) -> TrainConfig:
    return _train_cfg(cfg, os.path.join(cfg.output_dir, name), seed, cfg.student_steps, cfg.train_size, cfg.lr,
                      cfg.batch_size, "auto" if cfg.resume else None, cfg.overwrite and not cfg.resume,
                      model=cfg.student, **kw)


def teacher_key(cfg: DemoConfig) -> dict:
    """Every setting the cached teacher depends on (its folder name hashes this)."""
    from transkd_fast.data.synthetic import TASK_VERSIONS

    return {"task": cfg.task, "task_version": TASK_VERSIONS[cfg.task], "model": cfg.teacher,
            "height": cfg.height, "width": cfg.width, "train_size": cfg.teacher_train_size, "val_size": cfg.val_size,
            "steps": cfg.teacher_steps, "batch_size": cfg.teacher_batch_size,
            "label_scale": cfg.teacher_label_scale, "lr": cfg.teacher_lr, "seed": cfg.teacher_seed,
            "data_seed": cfg.data_seed, "device": trainer_device_type(cfg)}


def trainer_device_type(cfg: DemoConfig) -> str:
    from transkd_fast.engine.trainer import resolve_device

    return resolve_device(cfg.device).type


def teacher_dir(cfg: DemoConfig) -> str:
    key = json.dumps(teacher_key(cfg), sort_keys=True)
    h = hashlib.sha256(key.encode()).hexdigest()[:12]
    return os.path.join(cfg.cache_dir or os.path.join(cfg.output_dir, "cache"), f"teacher-{cfg.teacher}-{h}")


def _finished(out_dir: str, steps: int) -> bool:
    path = os.path.join(out_dir, "model.pt")
    if not os.path.isfile(path):
        return False
    meta = torch.load(path, map_location="cpu", weights_only=False).get("meta", {})
    return meta.get("step") == steps


def _sec_per_step(metrics_path: str) -> Optional[float]:
    """Training seconds per step from a run's log (first logged step excluded: it holds the set-up)."""
    from transkd_fast.engine.viz import read_jsonl

    recs = [r for r in read_jsonl(metrics_path) if r.get("event") == "train" and r.get("elapsed_s") is not None]
    if len(recs) < 2 or recs[-1]["step"] == recs[0]["step"]:
        return None
    return (recs[-1]["elapsed_s"] - recs[0]["elapsed_s"]) / (recs[-1]["step"] - recs[0]["step"])


def step_benchmark(cfg: DemoConfig, num_outputs: int, device: torch.device, steps: int) -> dict:
    """Median seconds of one TransKD-Base training step (student + teacher forward, KD losses,
    backward, AdamW) at this demo's batch and size, for

    - ``ours``: the default backend, folded heads, fused AdamW (as the engine trains);
    - ``original_as_published``: as ``train_TransKDBase.py`` runs it (reference backend —
      materialized attention, eager CSF and losses —, unfolded heads, per-parameter AdamW, the
      teacher's full forward after the student's, recorded by autograd and backpropagated);
    - ``original_teacher_no_grad``: the same with the teacher under ``no_grad`` (stricter).

    One process, one after another, ``steps`` timed steps after one warm-up step each.
    """
    import transkd_fast
    from transkd_fast.distill import build_distiller
    from transkd_fast.engine.trainer import build_network, make_optimizer
    from transkd_fast.flops import original_head

    g = torch.Generator().manual_seed(1)
    images = torch.rand(cfg.batch_size, 3, cfg.height, cfg.width, generator=g).to(device)
    labels = torch.randint(0, num_outputs - 1, (cfg.batch_size, (cfg.height + 3) // 4, (cfg.width + 3) // 4),
                           generator=g).to(device)
    out = {}
    for variant in ("ours", "original_as_published", "original_teacher_no_grad"):
        torch.manual_seed(0)
        d = build_distiller("transkd_base", build_network(cfg.student, num_outputs),
                            build_network(cfg.teacher, num_outputs, 0.0, 0.0)).to(device).train()
        params = list(d.trainable_parameters())
        original = variant != "ours"
        opt = torch.optim.AdamW(params, lr=cfg.lr, foreach=False) if original else make_optimizer(params, lr=cfg.lr)
        with contextlib.ExitStack() as st:
            if original:
                st.enter_context(transkd_fast.use_backend("reference"))
                st.enter_context(original_head(d.student))
                st.enter_context(original_head(d.teacher))
                d.uses_teacher_logits, d.teacher_first = True, False
            if variant == "original_as_published":
                d.teacher.requires_grad_(True)
                d.run_teacher = lambda x, t=d.teacher: t(x, return_features=True)
            times = []
            for i in range(steps + 1):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                d(images, labels)["loss"].backward()
                opt.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - t)
        out[variant] = statistics.median(times)
        del d, opt
    out["speedup_vs_original_as_published"] = out["original_as_published"] / out["ours"]
    out["speedup_vs_original_teacher_no_grad"] = out["original_teacher_no_grad"] / out["ours"]
    out["steps_timed"] = steps
    out["shape"] = [cfg.batch_size, 3, cfg.height, cfg.width]
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _pm(values: list, scale: float = 100.0) -> str:
    if len(values) > 1:
        return f"{scale * statistics.mean(values):.2f} ± {scale * statistics.stdev(values):.2f}"
    return f"{scale * values[0]:.2f}"


def validate_demo_config(cfg: DemoConfig) -> None:
    """Refuse the teacher's own settings up front (:class:`ConfigError` naming the demo's flag); the
    rest is checked by each run's :func:`transkd_fast.engine.config.validate_train_config`."""
    if cfg.teacher_label_scale not in (1, 4):
        raise ConfigError(f"--teacher-label-scale must be 1 (full resolution) or 4 (the 1/4 logits' grid), got "
                          f"{cfg.teacher_label_scale!r}")
    for name in ("teacher_batch_size", "batch_size", "teacher_steps", "student_steps"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be ≥ 1, got {v!r}")


def run_demo(cfg: DemoConfig) -> dict:
    from transkd_fast.data.synthetic import synthetic_task

    if not cfg.methods:
        raise ValueError("--methods: at least one distillation method")
    validate_demo_config(cfg)
    with synthetic_task(cfg.task):
        return _run_demo(cfg)


def _run_demo(cfg: DemoConfig) -> dict:
    from transkd_fast.distill import build_distiller
    from transkd_fast.engine import trainer
    from transkd_fast.engine.checkpoint import load_weights
    from transkd_fast.engine.viz import plot_curves, save_predictions

    t0 = time.time()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    os.makedirs(cfg.output_dir, exist_ok=True)
    if cfg.threads is None and load_start is not None and load_start[0] >= (os.cpu_count() or 1) > 1:
        # Measured on a 2-core machine at load 11: a B0 step took 13 s with 2 threads, 0.6 s with 1
        # (the threads wait for each other while other processes hold the cores).
        cfg.threads = 1
        print(f"load average {load_start[0]:.1f} ≥ {os.cpu_count()} cores: 1 torch thread (--threads N to "
              "choose)", flush=True)
    trainer.apply_threads(cfg.threads)
    device = trainer.resolve_device(cfg.device)
    seeds, methods = list(cfg.seeds), list(cfg.methods)
    print(f"TransKD demo: synthetic '{cfg.task}' {cfg.height}x{cfg.width}; teacher {cfg.teacher} "
          f"{cfg.teacher_steps} steps on {cfg.teacher_train_size} images; students {cfg.student} "
          f"{cfg.student_steps} steps each on {cfg.train_size} labelled images ({', '.join(methods)} and no KD); "
          f"batch {cfg.batch_size}, lr {cfg.lr} (teacher {cfg.teacher_lr}), seeds {seeds}; {cfg.test_size} "
          f"held-out images; device {device}, {torch.get_num_threads()} threads", flush=True)

    def stage(title: str, fn, tcfg: TrainConfig, skip: bool) -> str:
        if skip:
            print(f"[{title}] already finished in {tcfg.output_dir}, skipped", flush=True)
            return os.path.join(tcfg.output_dir, "model.pt")
        print(f"[{title}] {tcfg.steps} steps -> {tcfg.output_dir}", flush=True)
        t = time.time()
        res = fn(tcfg)
        print(f"[{title}] done in {time.time() - t:.0f}s; val mIoU {100 * res.metrics['miou']:.2f}", flush=True)
        return res.weights

    n_stages = 1 + len(seeds) * (len(methods) + 1)
    timings = {}
    # 1. The teacher, from the cache when it holds this setting.
    t = time.time()
    tdir = teacher_dir(cfg)
    reused = _finished(tdir, cfg.teacher_steps) and not cfg.retrain_teacher
    teacher_cfg = _train_cfg(cfg, tdir, cfg.teacher_seed, cfg.teacher_steps, cfg.teacher_train_size, cfg.teacher_lr,
                             cfg.teacher_batch_size, None if cfg.retrain_teacher else "auto", cfg.retrain_teacher,
                             model=cfg.teacher, label_scale=cfg.teacher_label_scale)
    if reused:
        print(f"[1/{n_stages} teacher] reused from the cache: {tdir}", flush=True)
        teacher_w = os.path.join(tdir, "model.pt")
    else:
        teacher_w = stage(f"1/{n_stages} teacher", trainer.train, teacher_cfg, False)
        with open(os.path.join(tdir, "cache_key.json"), "w", encoding="utf-8") as f:
            json.dump(teacher_key(cfg), f, indent=2, sort_keys=True)
    timings["teacher_s"] = time.time() - t

    # 2. The students: per seed, one per method and the plain one, same data and steps.
    runs, k = {}, 1
    for seed in seeds:
        for kind in methods + ["plain"]:
            k += 1
            name = f"student_{kind}_seed{seed}"
            if kind == "plain":
                scfg = _student_cfg(cfg, name, seed)
                fn, title = trainer.train, f"{k}/{n_stages} plain student, seed {seed}"
            else:
                scfg = _student_cfg(cfg, name, seed, teacher=cfg.teacher, teacher_weights=teacher_w, method=kind)
                fn, title = trainer.distill, f"{k}/{n_stages} {kind} student, seed {seed}"
            t = time.time()
            runs[(kind, seed)] = stage(title, fn, scfg, cfg.resume and _finished(scfg.output_dir, cfg.student_steps))
            timings[f"{name}_s"] = time.time() - t

    # 3. Held-out evaluation, at 1/4 resolution (the training protocol) and at full resolution.
    base = _student_cfg(cfg, "eval", seeds[0])
    test_q = trainer.make_dataset(base, "test", train=False, size=cfg.test_size)
    test_f = trainer.make_dataset(base, "test", train=False, size=cfg.test_size, label_scale=1)
    info = trainer.data_info(base, test_q)
    names = list(info.class_names)
    loaders = {res: torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)
               for res, ds in (("quarter", test_q), ("full", test_f))}

    def load(name: str, path: str):
        m = trainer.build_network(name, info.num_outputs)
        load_weights(m, path)
        return m.to(device).eval()

    def measure(m) -> dict:
        return {res: trainer.evaluate(m, ld, num_classes=info.num_classes, class_names=names, device=device)
                for res, ld in loaders.items()}

    flops: dict = {}  # per network name: the count does not depend on the weights

    def row(network: str, kind: str, seed: int, m, metrics_path: str, extra: Optional[dict] = None) -> dict:
        met = measure(m)
        arch = cfg.teacher if kind == "teacher" else cfg.student
        if arch not in flops:
            flops[arch] = _gflops(m, cfg.height, cfg.width)
        r = {"network": network, "kind": kind, "seed": seed, "miou": met["quarter"]["miou"],
             "miou_full": met["full"]["miou"], "per_class_iou": met["quarter"]["per_class"],
             "params_m": trainer.count_params(m) / 1e6, "gflops": flops[arch][0],
             "train_s_per_step": _sec_per_step(metrics_path), "metrics": met}
        r.update(extra or {})
        return r

    teacher = load(cfg.teacher, teacher_w)
    rows = [row(f"teacher {cfg.teacher}", "teacher", cfg.teacher_seed, teacher, os.path.join(tdir, "metrics.jsonl"),
                {"train_images": cfg.teacher_train_size, "steps": cfg.teacher_steps, "cached": reused})]
    flops_how = flops[cfg.teacher][1]
    students = {}
    for seed in seeds:
        for kind in methods + ["plain"]:
            m = students[(kind, seed)] = load(cfg.student, runs[(kind, seed)])
            extra = {"train_images": cfg.train_size, "steps": cfg.student_steps}
            if kind != "plain":  # parameters while training, KD modules included (the paper's table counts them)
                kd = build_distiller(kind, trainer.build_network(cfg.student, info.num_outputs),
                                     trainer.build_network(cfg.teacher, info.num_outputs))
                extra["train_params_m"] = (trainer.count_params(kd) - trainer.count_params(kd.teacher)) / 1e6
            label = f"student {cfg.student} + {kind}" if kind != "plain" else f"student {cfg.student} (no KD)"
            rows.append(row(label, kind, seed, m, os.path.join(cfg.output_dir, f"student_{kind}_seed{seed}",
                                                             "metrics.jsonl"), extra))

    # 4. Summary over seeds: each method against the plain student of the same seed.
    def miou_of(kind: str, seed: int, key: str = "miou") -> float:
        return next(r[key] for r in rows if r["kind"] == kind and r["seed"] == seed)

    summary = {"seeds": seeds, "teacher_miou": rows[0]["miou"], "teacher_miou_full": rows[0]["miou_full"],
               "plain_miou": [miou_of("plain", s) for s in seeds], "methods": {}}
    for kind in methods:
        deltas = [miou_of(kind, s) - miou_of("plain", s) for s in seeds]
        summary["methods"][kind] = {
            "miou": [miou_of(kind, s) for s in seeds], "kd_minus_plain_miou": deltas,
            "mean": statistics.mean(deltas), "std": statistics.stdev(deltas) if len(deltas) > 1 else None,
            "kd_wins": sum(d > 0 for d in deltas),
            "kd_minus_plain_miou_full": [miou_of(kind, s, "miou_full") - miou_of("plain", s, "miou_full")
                                         for s in seeds]}
    first = summary["methods"][methods[0]]  # the old keys, for the first method
    summary.update({k: first[k] for k in ("kd_minus_plain_miou", "mean", "std", "kd_wins")})

    bench = None
    if cfg.step_bench > 0:
        print(f"timing the TransKD-Base step, ours vs original-style ({cfg.step_bench} steps each)", flush=True)
        bench = step_benchmark(cfg, info.num_outputs, device, cfg.step_bench)

    lines = _report_lines(cfg, rows, summary, bench, info.num_classes, names, device)
    verdict = _verdict(cfg, rows, summary, bench)
    print()
    print("\n".join(lines))
    print()
    print(verdict)

    # 5. Pictures: image | label (full resolution) | teacher | students of the first seed.
    shown = [("teacher", cfg.teacher_seed, teacher)] + [(k, seeds[0], students[(k, seeds[0])])
                                                         for k in methods + ["plain"]]
    vis_rows = []
    for i in range(min(4, len(test_f))):
        img, lab = test_f[i]
        x = img[None].to(device)
        vis_rows.append((img, lab, *[trainer._predict(m, x, lab.shape[-2:], "none", device)[0].cpu()
                                     for _, _, m in shown]))
    titles = ["image", "label (full res.)"]
    for kind, seed, _ in shown:
        r = next(r for r in rows if r["kind"] == kind and r["seed"] == seed)
        what = f"teacher {cfg.teacher}" if kind == "teacher" else ("plain student" if kind == "plain"
                                                                    else f"{kind} student")
        titles.append(f"{what}: {100 * r['miou_full']:.1f}%")
    save_predictions(os.path.join(cfg.output_dir, "predictions.png"), vis_rows, info.palette, info.num_classes,
                     info.mean, info.std, titles=titles, class_names=names)
    curves = {"teacher": os.path.join(tdir, "metrics.jsonl")}
    for kind in methods + ["plain"]:
        curves[f"{kind} student" if kind != "plain" else "plain student"] = os.path.join(
            cfg.output_dir, f"student_{kind}_seed{seeds[0]}", "metrics.jsonl")
    plot_curves(curves, os.path.join(cfg.output_dir, "curves.png"), title=f"demo (seed {seeds[0]})")

    wall = time.time() - t0
    report = {"config": asdict(cfg), "task": cfg.task, "class_names": names, "rows": rows, "summary": summary,
              "step_time": bench, "verdict": verdict, "table": lines,
              "teacher_cache": {"dir": tdir, "reused": reused, "key": teacher_key(cfg)},
              "flops_counter": flops_how, "timings_s": timings, "wall_s": wall,
              "torch_threads": torch.get_num_threads(), "device": str(device), "cpu": _cpu_name(),
              "loadavg_start": load_start, "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None}
    with open(os.path.join(cfg.output_dir, "report.json"), "w", encoding="utf-8") as f:
        f.write(trainer.json_dumps(report, indent=2))
    with open(os.path.join(cfg.output_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("```\n" + "\n".join(lines) + "\n```\n\n" + verdict + "\n\n![predictions](predictions.png)\n\n"
                "![curves](curves.png)\n")
    print(f"wrote {cfg.output_dir}/report.json, report.md, predictions.png, curves.png; wall time {wall:.0f}s",
          flush=True)
    return report


def _report_lines(cfg: DemoConfig, rows: list, summary: dict, bench: Optional[dict], num_classes: int,
                  names: list, device) -> list:
    w = max(len(r["network"]) for r in rows) + 2
    out = [f"Held-out synthetic '{cfg.task}' test split: {cfg.test_size} images, {num_classes} classes, "
           f"{cfg.height}x{cfg.width}. mIoU at 1/4 resolution (the training protocol) and full resolution. "
           f"GFLOPs at 1x3x{cfg.height}x{cfg.width}, one multiply-add = one FLOP: 'full' counts the attention "
           "matmuls, 'paper' leaves them out as the paper's counter did. s/step: training seconds per step "
           f"measured in this run ({device}, {torch.get_num_threads()} threads).",
           f"{'network':<{w}}{'seed':>5}{'params (M)':>14}{'GFLOPs full':>13}{'GFLOPs paper':>14}{'s/step':>8}"
           f"{'mIoU 1/4':>10}{'mIoU full':>11}"]
    for r in rows:
        params = f"{r['params_m']:.2f}" + (f" ({r['train_params_m']:.2f})" if "train_params_m" in r else "")
        sps = f"{r['train_s_per_step']:.3f}" if r["train_s_per_step"] is not None else "-"
        out.append(f"{r['network']:<{w}}{r['seed']:>5}{params:>14}{r['gflops']['full']:>13.4f}"
                   f"{r['gflops']['paper']:>14.4f}{sps:>8}{100 * r['miou']:>10.2f}{100 * r['miou_full']:>11.2f}")
    out.append("(params in parentheses: the student with its KD modules, as trained; the deployed student drops them)")
    short = names
    cw = max(9, max(len(n) for n in short) + 1)
    out.append("")
    out.append("Per-class IoU (%), 1/4 resolution:")
    out.append(f"{'network':<{w}}{'seed':>5}" + "".join(f"{n:>{cw}}" for n in short))
    for r in rows:
        vals = [r["per_class_iou"].get(n) for n in names]
        out.append(f"{r['network']:<{w}}{r['seed']:>5}"
                   + "".join(f"{100 * v:>{cw}.1f}" if v is not None else f"{'-':>{cw}}" for v in vals))
    out.append("")
    seeds = summary["seeds"]
    out.append(f"Over {len(seeds)} seed(s) {seeds}: plain student {_pm(summary['plain_miou'])} mIoU")
    for kind, s in summary["methods"].items():
        spread = f" ± {100 * s['std']:.2f}" if s["std"] is not None else ""
        out.append(f"  {kind} student {_pm(s['miou'])} mIoU; paired difference {kind} − plain: "
                   f"{100 * s['mean']:+.2f}{spread} points (per seed: "
                   f"{', '.join(f'{100 * d:+.2f}' for d in s['kd_minus_plain_miou'])}); "
                   f"KD better in {s['kd_wins']}/{len(seeds)} seed(s)")
    if bench is not None:
        out.append(f"TransKD-Base training step at {'x'.join(map(str, bench['shape']))} (median of "
                   f"{bench['steps_timed']}, same process): ours {bench['ours']:.3f} s; original-style as "
                   f"published {bench['original_as_published']:.3f} s ({bench['speedup_vs_original_as_published']:.2f}x"
                   f"); original-style with the teacher under no_grad {bench['original_teacher_no_grad']:.3f} s "
                   f"({bench['speedup_vs_original_teacher_no_grad']:.2f}x)")
    return out


def _verdict(cfg: DemoConfig, rows: list, summary: dict, bench: Optional[dict]) -> str:
    t = rows[0]
    plain = summary["plain_miou"]
    seeds = summary["seeds"]
    parts = [f"The teacher ({cfg.teacher}, {t['params_m']:.2f} M params, {cfg.teacher_steps} steps on "
             f"{cfg.teacher_train_size} images{', reused from the cache' if t.get('cached') else ''}) reaches "
             f"{100 * t['miou']:.2f} % mIoU on {cfg.test_size} held-out images (full resolution "
             f"{100 * t['miou_full']:.2f} %)."]
    parts.append(f"With {cfg.student_steps} steps on the same {cfg.train_size} labelled images, the plain "
                 f"{cfg.student} ({rows[-1]['params_m']:.2f} M) reaches {_pm(plain)} %")
    for kind, s in summary["methods"].items():
        gap = statistics.mean(plain)
        closed = (statistics.mean(s["miou"]) - gap) / (t["miou"] - gap) if t["miou"] != gap else float("nan")
        spread = f" ± {100 * s['std']:.2f}" if s["std"] is not None else ""
        parts.append(f"and the {kind} student {_pm(s['miou'])} %: {100 * s['mean']:+.2f}{spread} points "
                     f"(paired over {len(seeds)} seed(s), better in {s['kd_wins']} of {len(seeds)}), "
                     f"{100 * closed:.0f} % of the teacher-student gap")
    text = " ".join(parts[:2]) + " " + "; ".join(parts[2:]) + "."
    if bench is not None:
        text += (f" One TransKD-Base step takes {bench['ours']:.3f} s here against {bench['original_as_published']:.3f}"
                 f" s original-style ({bench['speedup_vs_original_as_published']:.2f}x).")
    if len(seeds) < 3:
        text += f" {len(seeds)} seed(s) only: run --seeds 0 1 2 for a spread."
    return text


def run_demo_cli(args: argparse.Namespace) -> int:
    cfg = demo_config_from_args(args)
    try:
        run_demo(cfg)
    except KeyboardInterrupt as e:
        print(f"\ninterrupted: every run's last checkpoint is in {cfg.output_dir}/<run>/last.pt; "
              "continue with `transkd-fast demo --resume` (same options)", flush=True)
        return 128 + int(getattr(e, "signum", 2))
    return 0


__all__ = ["DemoConfig", "QUICK", "add_demo_arguments", "run_demo", "run_demo_cli", "step_benchmark",
           "teacher_dir", "teacher_key", "validate_demo_config"]
