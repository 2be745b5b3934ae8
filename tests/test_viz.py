"""curves.png and predictions.png: every loss term its own colour and a legend; a class legend on
the predictions, void drawn alike in label and prediction and never in a class's colour."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from PIL import Image

from transkd_fast.data.cityscapes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
from transkd_fast.engine.viz import (
    VOID_COLOR,
    curves_figure,
    plot_curves,
    predictions_figure,
    save_predictions,
    void_color,
)

TERMS = ("loss", "ce", "feature", "embed")


def _jsonl(path, steps: int = 6, miou_null: bool = False) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for s in range(1, steps + 1):
            terms = {"loss": 3.0 / s, "ce": 1.0 / s, "feature": 1.5 / s, "embed": 0.5 / s}
            f.write(json.dumps({"event": "train", "step": s, "terms": terms}) + "\n")
        f.write(json.dumps({"event": "eval", "step": steps, "miou": None if miou_null else 0.25}) + "\n")
    return str(path)


def test_curves_every_term_has_its_own_colour_and_legend(tmp_path):
    import matplotlib.pyplot as plt

    fig = curves_figure({"kd": _jsonl(tmp_path / "m.jsonl")}, title="distill")
    try:
        ax = fig.axes[0]
        lines = ax.get_lines()
        labels = [ln.get_label() for ln in lines]
        assert labels == [f"kd: {t}" for t in TERMS]
        colours = [to_rgb(ln.get_color()) for ln in lines]
        assert len(set(colours)) == len(TERMS)  # not one dashed colour for ce, feature and embed
        legend = ax.get_legend()
        assert legend is not None and [t.get_text() for t in legend.get_texts()] == labels
        np.testing.assert_allclose(lines[2].get_ydata(), [1.5 / s for s in range(1, 7)])
    finally:
        plt.close(fig)


def test_curves_two_runs_terms_keep_colour_runs_change_style(tmp_path):
    import matplotlib.pyplot as plt

    fig = curves_figure({"kd": _jsonl(tmp_path / "a.jsonl"), "plain": _jsonl(tmp_path / "b.jsonl")})
    try:
        lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
        for t in TERMS:
            assert to_rgb(lines[f"kd: {t}"].get_color()) == to_rgb(lines[f"plain: {t}"].get_color())
            assert lines[f"kd: {t}"].get_linestyle() != lines[f"plain: {t}"].get_linestyle()
        styles = {(to_rgb(ln.get_color()), ln.get_linestyle()) for ln in lines.values()}
        assert len(styles) == len(lines)  # no two lines look alike
    finally:
        plt.close(fig)


def test_curves_png_and_null_metrics(tmp_path):
    png = tmp_path / "curves.png"
    plot_curves({"train": _jsonl(tmp_path / "m.jsonl", miou_null=True)}, str(png))  # JSON null mIoU: no crash
    with Image.open(png) as im:
        assert im.size[0] > 500


def _rows(num_classes: int, void_out: int):
    h, w = 16, 24
    img = torch.rand(3, 4 * h, 4 * w)
    lab = torch.full((h, w), 3, dtype=torch.int64)
    lab[:, w // 2:] = 255  # void in the label (ignored)
    pred = torch.full((h, w), 5, dtype=torch.int64)
    pred[:, : w // 2] = 3
    pred[h // 2:, w // 2:] = void_out  # the void *output* predicted
    return [(img, lab, pred)]


def _panel_colours(png: str) -> set:
    with Image.open(png) as im:
        arr = np.asarray(im.convert("RGB"))
    return {tuple(int(v) for v in c) for c in np.unique(arr.reshape(-1, 3), axis=0)}


def test_predictions_legend_and_void_alike(tmp_path):
    import matplotlib.pyplot as plt

    rows = _rows(19, void_out=19)
    fig, entries = predictions_figure(rows, CITYSCAPES_PALETTE, 19, class_names=CITYSCAPES_CLASSES)
    try:
        texts = [t.get_text() for t in fig.legends[0].get_texts()]
        assert texts == [CITYSCAPES_CLASSES[3], CITYSCAPES_CLASSES[5], "void"]  # the classes shown, then void
        assert [e[0] for e in entries] == texts
        # the label's void and the predicted void output are drawn in one colour, in both panels
        lab_panel, pred_panel = (np.asarray(ax.get_images()[0].get_array()) for ax in fig.axes[1:3])
        vc = np.array(void_color(CITYSCAPES_PALETTE[:19]), np.uint8)
        assert (lab_panel[:, lab_panel.shape[1] // 2 + 1:] == vc).all()
        assert (pred_panel[pred_panel.shape[0] // 2 + 1:, pred_panel.shape[1] // 2 + 1:] == vc).all()
        assert (lab_panel[:, :4] == CITYSCAPES_PALETTE[3]).all()
    finally:
        plt.close(fig)
    png = str(tmp_path / "predictions.png")
    save_predictions(png, rows, CITYSCAPES_PALETTE, 19, class_names=CITYSCAPES_CLASSES)
    colours = _panel_colours(png)
    for c in (CITYSCAPES_PALETTE[3], CITYSCAPES_PALETTE[5], vc):
        assert tuple(int(v) for v in c) in colours


def test_void_never_shares_a_class_colour(tmp_path):
    palette = np.array([(0, 0, 0), (255, 255, 255), (10, 200, 30), (40, 40, 200), (200, 0, 0), (0, 120, 120)],
                       np.uint8)  # class 1 is white, the default void colour
    assert VOID_COLOR == (255, 255, 255)
    vc = void_color(palette)
    assert vc not in {tuple(int(v) for v in c) for c in palette}
    import matplotlib.pyplot as plt

    rows = _rows(6, void_out=6)
    rows[0][1][0, 0] = 1  # one white class pixel in the label
    fig, entries = predictions_figure(rows, palette, 6)
    try:
        names = dict((n, c) for n, c, *_ in entries)
        assert names["void"] == vc and names["1"] == (255, 255, 255)  # ids as names when none are given
    finally:
        plt.close(fig)


@pytest.mark.parametrize("n", [19, 21])
def test_known_palettes_get_their_class_names(n):
    import matplotlib.pyplot as plt

    from transkd_fast.data.voc import VOC_CLASSES, VOC_PALETTE

    palette, names = (CITYSCAPES_PALETTE, CITYSCAPES_CLASSES) if n == 19 else (VOC_PALETTE, VOC_CLASSES)
    fig, entries = predictions_figure(_rows(n, void_out=n), palette, n)  # as the trainer calls it: no names
    try:
        assert [e[0] for e in entries][:2] == [names[3], names[5]]
    finally:
        plt.close(fig)


def test_short_palette_never_draws_a_class_as_void():
    import matplotlib.pyplot as plt

    from transkd_fast.engine.viz import full_palette

    short = np.array([(0, 0, 0), (200, 10, 10)], np.uint8)  # 2 colours for 6 classes
    pal = full_palette(short, 6)
    assert pal.shape == (6, 3) and (pal[:2] == short).all()
    colours = {tuple(int(v) for v in c) for c in pal}
    assert len(colours) == 6 and void_color(pal) not in colours
    fig, entries = predictions_figure(_rows(6, void_out=6), short, 6)
    try:
        named = dict((n, c) for n, c in entries)
        assert named["5"] != named["void"] and named["3"] != named["void"]
    finally:
        plt.close(fig)
