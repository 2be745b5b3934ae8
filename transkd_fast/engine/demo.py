"""``transkd-fast demo``: the paper's experiment in miniature, on the synthetic dataset.

1. train a teacher (SegFormer-B1 by default) from scratch;
2. distill a SegFormer-B0 student from it with TransKD-Base;
3. train the same B0 from scratch without KD, for the same steps, batch, learning rate,
   data order and augmentation (same seed);
4. evaluate all three on a held-out split (``test``, never seen in training or validation)
   and print mIoU, parameters and GFLOPs; write ``predictions.png`` (image | label |
   teacher | TransKD student | plain student), ``curves.png`` and ``report.json``.

With several ``--seeds`` the two students are trained once per seed (the teacher once, with
the first seed) and the table gives each seed and the mean ± std of the difference.
Every run checkpoints; after Ctrl-C (or SIGTERM), ``--resume`` continues the interrupted run
and skips the finished ones; ``--overwrite`` starts over (old runs are moved aside).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from transkd_fast.engine.config import TrainConfig


@dataclass
class DemoConfig:
    teacher: str = "segformer_b1"
    student: str = "segformer_b0"
    method: str = "transkd_base"
    height: int = 64
    width: int = 128
    train_size: int = 512
    val_size: int = 32
    test_size: int = 64
    teacher_steps: int = 600
    student_steps: int = 300
    batch_size: int = 8
    lr: float = 6e-4
    seeds: list = field(default_factory=lambda: [0])
    data_seed: int = 0
    output_dir: str = "runs/demo"
    device: str = "auto"
    progress: bool = True
    resume: bool = False
    overwrite: bool = False
    quick: bool = False


QUICK = dict(height=32, width=64, train_size=64, val_size=8, test_size=16, teacher_steps=20, student_steps=12,
             batch_size=4)

HELP = {
    "teacher": "teacher network",
    "student": "student network",
    "method": "distillation method for the KD student",
    "height": "synthetic image height",
    "width": "synthetic image width",
    "train_size": "synthetic training images",
    "val_size": "synthetic validation images (monitoring during training)",
    "test_size": "held-out synthetic images for the final table",
    "teacher_steps": "teacher training steps",
    "student_steps": "steps of each student (KD and plain)",
    "batch_size": "batch size of every run",
    "lr": "AdamW learning rate of every run (the paper's 6e-5 is for 100k+ steps; short runs need more)",
    "seeds": "student seeds (init, data order, augmentation); the teacher uses the first",
    "data_seed": "synthetic dataset seed",
    "output_dir": "output directory",
    "device": "auto | cpu | cuda",
    "progress": "progress bars",
    "resume": "continue interrupted runs, skip finished ones",
    "overwrite": "start over where runs exist (each old run is moved to <run>/previous-<n>/)",
    "quick": f"a much smaller setting for CI ({', '.join(f'{k}={v}' for k, v in QUICK.items())})",
}


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    for name, value in asdict(d).items():
        opt = "--" + name.replace("_", "-")
        h = HELP[name] + (f" (default: {value})" if name != "quick" else "")
        if isinstance(value, bool):
            p.add_argument(opt, dest=name, action=argparse.BooleanOptionalAction if name != "quick" else "store_true",
                           default=value, help=h)
        elif isinstance(value, list):
            p.add_argument(opt, dest=name, type=int, nargs="+", default=None, help=h)
        else:
            p.add_argument(opt, dest=name, type=type(value), default=None, help=h)


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


def _train_cfg(cfg: DemoConfig, name: str, seed: int, steps: int, **kw) -> TrainConfig:
    return TrainConfig(
        dataset="synthetic", synthetic_train_size=cfg.train_size, synthetic_val_size=cfg.val_size,
        synthetic_height=cfg.height, synthetic_width=cfg.width, data_seed=cfg.data_seed,
        steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed, device=cfg.device,
        output_dir=os.path.join(cfg.output_dir, name), progress=cfg.progress,
        eval_every=max(1, steps // 5), ckpt_every=max(1, steps // 5), log_every=max(1, steps // 50),
        resume="auto" if cfg.resume else None, overwrite=cfg.overwrite and not cfg.resume, num_vis=4, **kw)


def _finished(out_dir: str, steps: int) -> bool:
    path = os.path.join(out_dir, "model.pt")
    if not os.path.isfile(path):
        return False
    meta = torch.load(path, map_location="cpu", weights_only=False).get("meta", {})
    return meta.get("step") == steps


def run_demo(cfg: DemoConfig) -> dict:
    from transkd_fast.engine import trainer
    from transkd_fast.engine.checkpoint import load_weights
    from transkd_fast.engine.viz import plot_curves, save_predictions

    t0 = time.time()
    os.makedirs(cfg.output_dir, exist_ok=True)
    device = trainer.resolve_device(cfg.device)
    seeds = list(cfg.seeds)
    print(f"TransKD demo: synthetic {cfg.height}x{cfg.width}, {cfg.train_size} train / {cfg.test_size} held-out "
          f"images; teacher {cfg.teacher} {cfg.teacher_steps} steps; students {cfg.student} {cfg.student_steps} "
          f"steps each, batch {cfg.batch_size}, lr {cfg.lr}, seeds {seeds}; device {device}", flush=True)

    def stage(title: str, out: str, steps: int, fn, tcfg: TrainConfig) -> str:
        if cfg.resume and _finished(tcfg.output_dir, steps):
            print(f"[{title}] already finished in {out}, skipped", flush=True)
            return os.path.join(tcfg.output_dir, "model.pt")
        print(f"[{title}] {steps} steps -> {tcfg.output_dir}", flush=True)
        t = time.time()
        res = fn(tcfg)
        print(f"[{title}] done in {time.time() - t:.0f}s; val mIoU {100 * res.metrics['miou']:.2f}", flush=True)
        return res.weights

    timings = {}
    t = time.time()
    teacher_cfg = _train_cfg(cfg, "teacher", seeds[0], cfg.teacher_steps, model=cfg.teacher)
    teacher_w = stage("1/3 teacher", "teacher", cfg.teacher_steps, trainer.train, teacher_cfg)
    timings["teacher_s"] = time.time() - t
    runs = {}
    for seed in seeds:
        sfx = f"_seed{seed}" if len(seeds) > 1 else ""
        t = time.time()
        kd_cfg = _train_cfg(cfg, f"student_kd{sfx}", seed, cfg.student_steps, model=cfg.student, teacher=cfg.teacher,
                            teacher_weights=teacher_w, method=cfg.method)
        runs[("kd", seed)] = stage(f"2/3 {cfg.method} student, seed {seed}", kd_cfg.output_dir, cfg.student_steps,
                                   trainer.distill, kd_cfg)
        timings[f"student_kd_seed{seed}_s"] = time.time() - t
        t = time.time()
        plain_cfg = _train_cfg(cfg, f"student_plain{sfx}", seed, cfg.student_steps, model=cfg.student)
        runs[("plain", seed)] = stage(f"3/3 plain student, seed {seed}", plain_cfg.output_dir, cfg.student_steps,
                                      trainer.train, plain_cfg)
        timings[f"student_plain_seed{seed}_s"] = time.time() - t

    # Held-out evaluation.
    base = _train_cfg(cfg, "eval", seeds[0], 1)
    test_ds = trainer.make_dataset(base, "test", train=False, size=cfg.test_size)
    info = trainer.data_info(base, test_ds)
    loader = torch.utils.data.DataLoader(test_ds, batch_size=8, shuffle=False)

    def load(name: str, path: str):
        m = trainer.build_network(name, info.num_outputs)
        load_weights(m, path)
        return m.to(device).eval()

    def measure(m) -> dict:
        return trainer.evaluate(m, loader, num_classes=info.num_classes, class_names=info.class_names, device=device)

    from transkd_fast.distill import build_distiller

    teacher = load(cfg.teacher, teacher_w)
    t_metrics = measure(teacher)
    t_flops, flops_how = _gflops(teacher, cfg.height, cfg.width)
    rows = [{"network": f"teacher {cfg.teacher}", "seed": seeds[0], "miou": t_metrics["miou"],
             "params_m": trainer.count_params(teacher) / 1e6, "gflops": t_flops, "metrics": t_metrics}]
    students = {}
    for seed in seeds:
        for kind in ("kd", "plain"):
            m = load(cfg.student, runs[(kind, seed)])
            students[(kind, seed)] = m
            met = measure(m)
            label = f"student {cfg.student} + {cfg.method}" if kind == "kd" else f"student {cfg.student} (no KD)"
            row = {"network": label, "kind": kind, "seed": seed, "miou": met["miou"],
                   "params_m": trainer.count_params(m) / 1e6, "gflops": _gflops(m, cfg.height, cfg.width)[0],
                   "metrics": met}
            if kind == "kd":  # parameters while training, KD modules included (the paper's table counts them)
                kd = build_distiller(cfg.method, trainer.build_network(cfg.student, info.num_outputs),
                                     trainer.build_network(cfg.teacher, info.num_outputs))
                row["train_params_m"] = (trainer.count_params(kd) - trainer.count_params(kd.teacher)) / 1e6
            rows.append(row)

    # Table.
    w = max(len(r["network"]) for r in rows) + 2
    print()
    print(f"Held-out synthetic test split ({cfg.test_size} images, {info.num_classes} classes, "
          f"{cfg.height}x{cfg.width}); GFLOPs at 1x3x{cfg.height}x{cfg.width}, one multiply-add = one FLOP, "
          f"'full' counts the attention matmuls, 'paper' leaves them out as the paper's counter did")
    print(f"{'network':<{w}}{'seed':>5}{'params (M)':>13}{'GFLOPs full':>13}{'GFLOPs paper':>14}{'mIoU (%)':>10}")
    for r in rows:
        params = f"{r['params_m']:.2f}"
        if "train_params_m" in r:
            params += f" ({r['train_params_m']:.2f})"
        print(f"{r['network']:<{w}}{r['seed']:>5}{params:>13}{r['gflops']['full']:>13.3f}"
              f"{r['gflops']['paper']:>14.3f}{100 * r['miou']:>10.2f}")
    print("(params in parentheses: the student with its KD modules, as trained; the deployed student drops them)")
    deltas = [next(r["miou"] for r in rows if r.get("kind") == "kd" and r["seed"] == s)
              - next(r["miou"] for r in rows if r.get("kind") == "plain" and r["seed"] == s) for s in seeds]
    summary = {"kd_minus_plain_miou": deltas, "mean": statistics.mean(deltas),
               "std": statistics.stdev(deltas) if len(deltas) > 1 else None,
               "kd_wins": sum(d > 0 for d in deltas), "seeds": seeds}
    spread = f" ± {100 * summary['std']:.2f} (std over {len(seeds)} seeds)" if summary["std"] is not None else ""
    print(f"TransKD student − plain student: {100 * summary['mean']:+.2f} mIoU points{spread}; "
          f"KD better in {summary['kd_wins']}/{len(seeds)} seed(s)")

    # Pictures.
    vis_rows = []
    for i in range(min(4, len(test_ds))):
        img, lab = test_ds[i]
        x = img[None].to(device)
        preds = [trainer._predict(m, x, lab.shape[-2:], "none", device)[0].cpu()
                 for m in (teacher, students[("kd", seeds[0])], students[("plain", seeds[0])])]
        vis_rows.append((img, lab, *preds))
    save_predictions(os.path.join(cfg.output_dir, "predictions.png"), vis_rows, info.palette, info.num_classes,
                     info.mean, info.std,
                     titles=("image", "label", f"teacher {cfg.teacher}", f"{cfg.method} student", "plain student"))
    sfx = f"_seed{seeds[0]}" if len(seeds) > 1 else ""
    plot_curves({"teacher": os.path.join(cfg.output_dir, "teacher", "metrics.jsonl"),
                 "TransKD student": os.path.join(cfg.output_dir, f"student_kd{sfx}", "metrics.jsonl"),
                 "plain student": os.path.join(cfg.output_dir, f"student_plain{sfx}", "metrics.jsonl")},
                os.path.join(cfg.output_dir, "curves.png"), title="demo")
    wall = time.time() - t0
    report = {"config": asdict(cfg), "rows": [{k: v for k, v in r.items()} for r in rows], "summary": summary,
              "flops_counter": flops_how, "timings_s": timings, "wall_s": wall,
              "torch_threads": torch.get_num_threads(), "device": str(device)}
    with open(os.path.join(cfg.output_dir, "report.json"), "w", encoding="utf-8") as f:
        f.write(trainer.json_dumps(report, indent=2))
    print(f"wrote {cfg.output_dir}/report.json, predictions.png, curves.png; wall time {wall:.0f}s", flush=True)
    return report


def run_demo_cli(args: argparse.Namespace) -> int:
    cfg = demo_config_from_args(args)
    try:
        run_demo(cfg)
    except KeyboardInterrupt as e:
        print(f"\ninterrupted: every run's last checkpoint is in {cfg.output_dir}/<run>/last.pt; "
              "continue with `transkd-fast demo --resume` (same options)", flush=True)
        return 128 + int(getattr(e, "signum", 2))
    return 0


__all__ = ["DemoConfig", "QUICK", "add_demo_arguments", "run_demo", "run_demo_cli"]

