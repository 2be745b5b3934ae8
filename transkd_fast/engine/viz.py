"""PNG outputs: the training curves and colorized predictions (image | label | prediction).

``curves.png`` (:func:`plot_curves`): each loss term has its own colour (the same term keeps its
colour across runs; runs differ by line style), all in a legend; validation mIoU on the right.
Values written as JSON ``null`` (a NaN metric) are gaps, not errors.

``predictions.png`` (:func:`save_predictions`): void is drawn in one colour in every panel, both
void in the label (ignored pixels) and a prediction of the void output (id ``num_classes`` in the
20-output recipe); that colour is never a class's (:func:`void_color`). A legend names the
classes shown and void.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np
import torch

VOID_COLOR = (255, 255, 255)
# Tried in order for void when a class already has the colour before it.
_VOID_CANDIDATES = (VOID_COLOR, (224, 224, 192), (255, 0, 255), (128, 128, 128), (0, 255, 255), (255, 255, 0))
_RUN_STYLES = ("-", "--", ":", "-.")


def void_color(palette: np.ndarray) -> tuple:
    """The colour void is drawn in: white unless a class of ``palette`` is white, else the first
    of a fixed list of candidates no class uses (deterministic)."""
    used = {tuple(int(v) for v in c) for c in np.asarray(palette).reshape(-1, 3)}
    for c in _VOID_CANDIDATES:
        if c not in used:
            return c
    for v in range(256):  # a palette using all six candidates: some grey is free
        if (v, v, v) not in used:
            return (v, v, v)
    raise ValueError("the palette uses every candidate void colour")


def full_palette(palette: np.ndarray, num_classes: int) -> np.ndarray:
    """``palette`` cut or extended to ``num_classes`` colours: a class past its end gets a
    deterministic colour (evenly spaced hues) that no other class and not void has."""
    pal = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:num_classes]
    if len(pal) == num_classes:
        return pal
    import colorsys

    used = {tuple(int(v) for v in c) for c in pal} | {VOID_COLOR}
    extra, k = [], 0
    while len(pal) + len(extra) < num_classes:
        h = (k * 0.61803398875) % 1.0  # golden-ratio hue steps: well spread for any count
        c = tuple(int(round(255 * v)) for v in colorsys.hsv_to_rgb(h, 0.75, 0.55 + 0.4 * ((k // 7) % 2)))
        k += 1
        if c not in used:
            used.add(c)
            extra.append(c)
    return np.concatenate([pal, np.array(extra, np.uint8).reshape(-1, 3)])


def colorize(label: np.ndarray, palette: np.ndarray, void: Optional[tuple] = None) -> np.ndarray:
    """Class ids → RGB; ids outside the palette (void, 255, or the void output) get ``void``
    (default :func:`void_color` of the palette)."""
    label = np.asarray(label, dtype=np.int64)
    out = np.empty(label.shape + (3,), np.uint8)
    out[...] = void_color(palette) if void is None else void
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


def _known_class_names(palette: np.ndarray, num_classes: int) -> Optional[Sequence[str]]:
    """The class names of a dataset whose palette this is (Cityscapes, VOC, synthetic), else None."""
    from transkd_fast.data.cityscapes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
    from transkd_fast.data.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE
    from transkd_fast.data.voc import VOC_CLASSES, VOC_PALETTE

    pal = np.asarray(palette)[:num_classes]
    for names, known in ((CITYSCAPES_CLASSES, CITYSCAPES_PALETTE), (VOC_CLASSES, VOC_PALETTE),
                         (SYNTHETIC_CLASSES, SYNTHETIC_PALETTE)):
        if len(names) == num_classes and pal.shape == known[:num_classes].shape and (pal == known[:num_classes]).all():
            return names
    return None


@torch.no_grad()
def predictions_figure(rows: Sequence[tuple], palette: np.ndarray, num_classes: int, mean=None, std=None,
                       titles: Sequence[str] = ("image", "label", "prediction"),
                       class_names: Optional[Sequence[str]] = None):
    """The figure :func:`save_predictions` writes, and its legend entries ``[(name, (r, g, b))]``:
    the classes present in any label or prediction panel (ascending id), then ``"void"`` when
    void is drawn. ``class_names`` default: the dataset's names when ``palette`` is a known
    dataset's, else the ids. The caller closes the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    palette = full_palette(palette, num_classes)
    void = void_color(palette)
    if class_names is None:
        class_names = _known_class_names(palette, num_classes)
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    ncol = len(rows[0])
    fig, axes = plt.subplots(len(rows), ncol, figsize=(3.2 * ncol, 1.9 * len(rows) + 1.0), squeeze=False)
    present: set = set()
    any_void = False
    for r, row in enumerate(rows):
        img = _image_uint8(row[0], mean, std)
        h, w = img.shape[:2]
        panels = [img]
        for lab in row[1:]:
            lab = lab.cpu().numpy() if torch.is_tensor(lab) else np.asarray(lab)
            lab = np.asarray(lab, dtype=np.int64)
            is_void = (lab < 0) | (lab >= num_classes)
            any_void |= bool(is_void.any())
            present.update(int(v) for v in np.unique(lab[~is_void]))
            panels.append(_nearest(colorize(np.where(is_void, -1, lab), palette, void), h, w))
        for c, p in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(p, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and c < len(titles):
                ax.set_title(titles[c], fontsize=9)
    entries = [(names[i] if i < len(names) else str(i), tuple(int(v) for v in palette[i])) for i in sorted(present)]
    if any_void:
        entries.append(("void", void))
    if entries:
        handles = [Patch(facecolor=np.array(c) / 255.0, edgecolor="black", linewidth=0.5, label=n)
                   for n, c in entries]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * ((len(entries) + 5) // 6), 1, 1))
    return fig, entries


def save_predictions(path: str, rows: Sequence[tuple], palette: np.ndarray, num_classes: int,
                     mean=None, std=None, titles: Sequence[str] = ("image", "label", "prediction"),
                     class_names: Optional[Sequence[str]] = None) -> list:
    """``rows``: ``(image [3,H,W], label [h,w], *predictions [h',w'])``; one row per image. Ids
    ``≥ num_classes`` (label void, 255, and the predicted void output) are drawn in the void
    colour in every panel; a legend names the classes shown and void. Writes a PNG grid with
    matplotlib (Agg); returns the legend entries (see :func:`predictions_figure`)."""
    import matplotlib.pyplot as plt

    fig, entries = predictions_figure(rows, palette, num_classes, mean, std, titles, class_names)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return entries


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _num(v) -> float:
    """A logged value as a float; JSON null (a NaN that was written safely) is NaN."""
    return float("nan") if v is None else float(v)


def curves_figure(jsonl_paths: dict, title: str = "training"):
    """The figure :func:`plot_curves` writes (the caller closes it). Loss axis: one line per
    (run, term); the colour names the term (``loss``, then the other terms in order of first
    appearance), the line style the run; a term never positive is left out (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {label: read_jsonl(path) for label, path in jsonl_paths.items()}
    term_order: list[str] = []
    for recs in runs.values():
        for r in recs:
            if r.get("event") == "train":
                for k in ["loss"] + list(r.get("terms", {})):
                    if k not in term_order:
                        term_order.append(k)
    cmap = plt.get_cmap("tab10" if len(term_order) <= 10 else "tab20")
    colour = {k: cmap(i % cmap.N) for i, k in enumerate(term_order)}

    fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(11, 3.8))
    for run, (label, recs) in enumerate(runs.items()):
        train = [r for r in recs if r.get("event") == "train"]
        evals = [r for r in recs if r.get("event") == "eval" and r.get("miou") is not None]
        style = _RUN_STYLES[run % len(_RUN_STYLES)]
        if train:
            steps = [r["step"] for r in train]
            for k in term_order:
                vals = [_num(r.get("terms", {}).get(k)) for r in train]
                if any(v > 0 for v in vals if v == v):
                    ax_loss.plot(steps, vals, style, color=colour[k], linewidth=1.6 if k == "loss" else 1.1,
                                 label=f"{label}: {k}")
        if evals:
            ax_miou.plot([r["step"] for r in evals], [100 * float(r["miou"]) for r in evals], "o" + style,
                         label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    if ax_loss.has_data():
        ax_loss.set_yscale("log")
        ax_loss.legend(fontsize=7)
    ax_loss.set_title(f"{title}: loss")
    ax_miou.set_xlabel("step")
    ax_miou.set_ylabel("val mIoU (%)")
    ax_miou.set_title("validation mIoU")
    if ax_miou.has_data():
        ax_miou.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_curves(jsonl_paths: dict, png_path: str, title: str = "training") -> None:
    """Loss terms per step (log scale) and validation mIoU for one or several runs
    (``{label: metrics.jsonl}``), written to ``png_path``; see :func:`curves_figure`."""
    import matplotlib.pyplot as plt

    fig = curves_figure(jsonl_paths, title)
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
