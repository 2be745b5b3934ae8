"""Inference modes (transkd_fast.engine.inference): whole, slide (mmseg's window arithmetic) and
multi-scale + flip TTA (softmax average), on tiny models whose outputs can be computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transkd_fast.engine.config import ConfigError, EvalConfig, validate_eval_config
from transkd_fast.engine.inference import Inference, infer, parse_scales, slide_windows


class Stride4(nn.Module):
    """A small conv net with SegFormer's output grid: logits at ⌈H/4⌉ × ⌈W/4⌉."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 4, stride=4, padding=0),
                                  nn.ReLU(), nn.Conv2d(8, classes, 3, padding=1))

    def forward(self, x):
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % 4, 0, -h % 4))
        return self.body(x)


class SizeLogits(nn.Module):
    """Constant logits that depend only on the input's size: ``[W/10, H/10, 0]`` everywhere, on the
    1/4 grid. A TTA view of size h × w then has softmax([w/10, h/10, 0]) at every pixel."""

    def forward(self, x):
        b, _, h, w = x.shape
        v = torch.tensor([w / 10, h / 10, 0.0])
        return v.view(1, 3, 1, 1).expand(b, 3, -(-h // 4), -(-w // 4)).clone()


class PositionLogits(nn.Module):
    """Content-independent logits that depend on the column: channel 0 = column / W, channel 1 = 0.
    Not flip-equivariant: the flipped view, flipped back, is the mirror image."""

    def forward(self, x):
        b, _, h, w = x.shape
        col = torch.arange(w, dtype=torch.float32) / w
        out = torch.zeros(b, 2, h, w)
        out[:, 0] = col
        return out


def test_windows_follow_mmseg_arithmetic():
    # 11 rows, crop 4, stride 3: max(ceil(7/3), 0) + 1 = 4 rows of crops, the last flush (7..11)
    rows = sorted({(y0, y1) for y0, y1, _, _ in slide_windows(11, 4, 4, 3)})
    assert rows == [(0, 4), (3, 7), (6, 10), (7, 11)]
    # an exact fit: 10 rows, crop 4, stride 3 → 3 crops, no duplicate at the end
    assert sorted({(y0, y1) for y0, y1, _, _ in slide_windows(10, 4, 4, 3)}) == [(0, 4), (3, 7), (6, 10)]
    # a side shorter than the crop: one crop of that side's length (no padding)
    wins = slide_windows(5, 30, 8, 6)
    assert {(y0, y1) for y0, y1, _, _ in wins} == {(0, 5)}
    assert [(x0, x1) for _, _, x0, x1 in wins] == [(0, 8), (6, 14), (12, 20), (18, 26), (22, 30)]
    for h, w, crop, stride in ((11, 4, 4, 3), (37, 53, 16, 5), (8, 8, 8, 8), (9, 20, 8, 8)):
        n_h = max(math.ceil((h - crop) / stride), 0) + 1
        n_w = max(math.ceil((w - crop) / stride), 0) + 1
        wins = slide_windows(h, w, crop, stride)
        assert len(wins) == n_h * n_w
        cover = torch.zeros(h, w)
        for y0, y1, x0, x1 in wins:
            assert y1 - y0 == min(crop, h) and x1 - x0 == min(crop, w)
            cover[y0:y1, x0:x1] += 1
        assert cover.min() >= 1


def test_slide_with_one_crop_equals_whole():
    model = Stride4().eval()
    x = torch.rand(2, 3, 22, 30)
    whole = infer(model, x, Inference("whole"), out_size=(22, 30))
    for crop in (30, 64):  # exactly the long side, and larger than the image
        slide = infer(model, x, Inference("slide", crop=crop, stride=crop), out_size=(22, 30))
        assert torch.equal(slide, whole)
    # default size: slide returns the input size, whole the logit grid
    assert infer(model, x, Inference("slide", crop=64, stride=32)).shape[-2:] == (22, 30)
    assert infer(model, x).shape[-2:] == (6, 8)


def test_slide_overlapping_crops_on_a_translation_equivariant_model_equals_whole():
    torch.manual_seed(1)
    model = nn.Conv2d(3, 4, 1).eval()  # per-pixel: any crop sees what the whole image sees
    x = torch.rand(2, 3, 19, 27)
    whole = infer(model, x)
    inf = Inference("slide", crop=8, stride=5)
    assert len(slide_windows(19, 27, 8, 5)) > 9  # overlapping crops, some pixels covered 4 times
    torch.testing.assert_close(infer(model, x, inf), whole, rtol=1e-6, atol=1e-6)
    # and a model with context differs from whole under slide (the test can fail)
    ctx = Stride4().eval()
    assert not torch.allclose(infer(ctx, x, inf, out_size=(19, 27)), infer(ctx, x, out_size=(19, 27)), atol=1e-4)


def test_flip_tta_at_scale_one_on_a_flip_symmetric_model_equals_no_tta():
    torch.manual_seed(2)
    model = nn.Conv2d(3, 5, 1).eval()  # commutes with a horizontal flip
    x = torch.rand(1, 3, 12, 17)
    tta = infer(model, x, Inference(tta_scales=(1.0,)))
    torch.testing.assert_close(tta, infer(model, x).softmax(1), rtol=1e-6, atol=1e-7)
    assert torch.equal(tta.argmax(1), infer(model, x).argmax(1))


def test_tta_is_the_mean_of_the_views_softmax():
    x = torch.rand(2, 3, 20, 28)
    scales = (0.5, 0.75, 1.0, 1.5)
    out = infer(SizeLogits(), x, Inference(tta_scales=scales), out_size=(5, 7))
    expect = torch.zeros(3)
    for s in scales:
        h, w = int(s * 20 + 0.5), int(s * 28 + 0.5)
        expect += 2 * torch.tensor([w / 10, h / 10, 0.0]).softmax(0)  # flipped view: the same constants
    expect /= 2 * len(scales)
    assert out.shape == (2, 3, 5, 7)
    torch.testing.assert_close(out, expect.view(1, 3, 1, 1).expand_as(out), rtol=1e-6, atol=1e-7)
    # the softmax average, not the softmax of the mean logits (they differ here)
    mean_logits = sum(torch.tensor([int(s * 28 + 0.5) / 10, int(s * 20 + 0.5) / 10, 0.0]) for s in scales) / 4
    assert not torch.allclose(expect, mean_logits.softmax(0), atol=1e-3)


def test_flip_tta_averages_the_view_and_its_mirror():
    x = torch.rand(1, 3, 4, 6)
    p = PositionLogits()(x)
    expect = (p.softmax(1) + p.flip(-1).softmax(1)) / 2
    torch.testing.assert_close(infer(PositionLogits(), x, Inference(tta_scales=(1.0,))), expect)
    no_flip = infer(PositionLogits(), x, Inference(tta_scales=(1.0,), flip=False))
    torch.testing.assert_close(no_flip, p.softmax(1))
    assert not torch.allclose(no_flip, expect)


def test_tuple_outputs_and_bad_input():
    class Triple(nn.Module):
        def forward(self, x):
            return None, torch.ones(x.shape[0], 2, 3, 3), None

    assert infer(Triple(), torch.rand(1, 3, 12, 12)).shape == (1, 2, 3, 3)
    with pytest.raises(ValueError, match="float tensor"):
        infer(Triple(), torch.zeros(3, 12, 12))
    with pytest.raises(ValueError, match="float tensor"):
        infer(Triple(), torch.zeros(1, 3, 12, 12, dtype=torch.uint8))


@pytest.mark.parametrize("kw, flag", [
    (dict(mode="sliding"), "--inference"),
    (dict(crop=0), "--slide-crop"),
    (dict(stride=-1), "--slide-stride"),
    (dict(crop=64, stride=65), "--slide-stride"),
    (dict(tta_scales=(1.0, 0.0)), "--tta-scales"),
    (dict(tta_scales=(float("nan"),)), "--tta-scales"),
])
def test_bad_inference_settings_are_config_errors(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        Inference(**kw)


def test_eval_config_validates_inference_flags():
    assert parse_scales("0.5, 1,1.75") == (0.5, 1.0, 1.75)
    for bad in ("", "1,,2", "a", "-1"):
        with pytest.raises(ConfigError, match="--tta-scales"):
            parse_scales(bad)
    with pytest.raises(ConfigError, match="--slide-stride"):
        validate_eval_config(EvalConfig(inference="slide", slide_crop=32, slide_stride=48))
    with pytest.raises(ConfigError, match="--inference"):
        validate_eval_config(EvalConfig(inference="tiles"))
    with pytest.raises(ConfigError, match="--tta-scales"):
        validate_eval_config(EvalConfig(tta=True, tta_scales="1.0,big"))
    inf = Inference.from_config(EvalConfig(inference="slide", slide_crop=32, slide_stride=16, tta=True,
                                           tta_scales="0.5,1.0"))
    assert inf.views == [(0.5, False), (0.5, True), (1.0, False), (1.0, True)]
    assert inf.describe()["tta"]["scales"] == [0.5, 1.0]
    assert Inference.from_config(EvalConfig()).tta_scales is None
    # the stride's default follows a crop below mmseg's 768 instead of refusing it
    assert Inference.from_config(EvalConfig(inference="slide", slide_crop=512)).stride == 512
    assert Inference.from_config(EvalConfig(inference="slide")).stride == 768
