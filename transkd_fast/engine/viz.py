"""PNG outputs: the training curves and colorized predictions (image | label | prediction)."""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np
import torch

VOID_COLOR = (255, 255, 255)


def colorize(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Class ids → RGB; ids outside the palette (void, 255) are white."""
    label = np.asarray(label, dtype=np.int64)
    out = np.empty(label.shape + (3,), np.uint8)
    out[...] = VOID_COLOR
    ok = (label >= 0) & (label < len(palette))
    out[ok] = palette[label[ok]]
    return out


def _image_uint8(img: torch.Tensor, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> np.ndarray:
    x = img.detach().float().cpu()
    if mean is not None:
        x = x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def _nearest(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    ys = (np.arange(h) * arr.shape[0] // h)
    xs = (np.arange(w) * arr.shape[1] // w)
    return arr[ys][:, xs]


@torch.no_grad()
def save_predictions(path: str, rows: Sequence[tuple], palette: np.ndarray, num_classes: int,
                     mean=None, std=None, titles: Sequence[str] = ("image", "label", "prediction")) -> None:
    """``rows``: ``(image [3,H,W], label [h,w], *predictions [h',w'])``; one row per image, label
    ids ≥ ``num_classes`` (void) drawn white. Writes a PNG grid with matplotlib (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = len(rows[0])
    fig, axes = plt.subplots(len(rows), ncol, figsize=(3.2 * ncol, 1.9 * len(rows) + 0.4), squeeze=False)
    for r, row in enumerate(rows):
        img = _image_uint8(row[0], mean, std)
        h, w = img.shape[:2]
        panels = [img]
        for lab in row[1:]:
            lab = lab.cpu().numpy() if torch.is_tensor(lab) else np.asarray(lab)
            lab = np.where(lab >= num_classes, 255, lab)
            panels.append(_nearest(colorize(lab, palette), h, w))
        for c, p in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(p, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and c < len(titles):
                ax.set_title(titles[c], fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(jsonl_paths: dict, png_path: str, title: str = "training") -> None:
    """Loss terms per step (log scale) and validation mIoU for one or several runs
    (``{label: metrics.jsonl}``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(11, 3.8))
    for label, path in jsonl_paths.items():
        recs = read_jsonl(path)
        train = [r for r in recs if r.get("event") == "train"]
        evals = [r for r in recs if r.get("event") == "eval"]
        if train:
            steps = [r["step"] for r in train]
            keys = [k for k in train[-1].get("terms", {}) if k != "loss"]
            line, = ax_loss.plot(steps, [r["terms"]["loss"] for r in train], label=f"{label}: loss")
            for k in keys:
                vals = [r["terms"].get(k, float("nan")) for r in train]
                if any(v > 0 for v in vals if v == v):
                    ax_loss.plot(steps, vals, "--", color=line.get_color(), alpha=0.6, label=f"{label}: {k}")
        if evals:
            ax_miou.plot([r["step"] for r in evals], [100 * r["miou"] for r in evals], "o-", label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=7)
    ax_loss.set_title(f"{title}: loss")
    ax_miou.set_xlabel("step")
    ax_miou.set_ylabel("val mIoU (%)")
    ax_miou.set_title("validation mIoU")
    if ax_miou.has_data():
        ax_miou.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
