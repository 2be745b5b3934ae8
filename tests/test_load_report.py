"""load_pretrained reports what it loaded, refuses checkpoints of nothing it knows, and names the
model a foreign checkpoint belongs to (issue #14 part B, item 8). No transformers needed."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from transkd_fast.models import build_model, load_pretrained
from transkd_fast.models.checkpoints import CheckpointError, LoadReport, LoadResult, guess_model_name


@functools.lru_cache(maxsize=None)
def _meta_state_dict(name: str, num_classes: int = 20) -> dict:
    """A zoo model's state dict with its real names and shapes, built on the meta device (no memory)."""
    with torch.device("meta"):
        return dict(build_model(name, num_classes=num_classes).state_dict())


@functools.lru_cache(maxsize=None)
def _b0_template():
    return build_model("segformer_b0", num_classes=20)


def _b0(seed: int) -> torch.nn.Module:
    m = copy.deepcopy(_b0_template())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def _n_tensors(model) -> int:
    return sum(1 for k in model.state_dict() if not k.endswith("num_batches_tracked"))


def test_full_load_reports_everything():
    src, model = _b0(0), _b0(1)
    report = load_pretrained(model, src.state_dict())
    assert isinstance(report, LoadReport) and LoadResult is LoadReport  # the old name still works
    assert report.total == _n_tensors(model) == len(report.loaded)
    assert report.fraction == 1.0 and report.complete and not report.missing and not report.unexpected
    line = report.summary()
    assert "\n" not in line and f"{report.total}/{report.total}" in line and "100.0%" in line and "nvlabs" in line


def test_backbone_only_file_is_reported_partial():
    src, model = _b0(0), _b0(1)
    report = load_pretrained(model, src.backbone.state_dict())
    assert not report.complete
    assert report.missing and all(k.startswith("decode_head.") for k in report.missing)
    assert len(report.loaded) + len(report.missing) == report.total
    assert 0.5 < report.fraction < 1.0 and report.fraction == pytest.approx(len(report.loaded) / report.total)
    line = report.summary()
    assert f"{len(report.loaded)}/{report.total}" in line and "decode_head" in line and "missing" in line
    assert torch.equal(model.backbone.block1[0].attn.q.weight, src.backbone.block1[0].attn.q.weight)


def test_foreign_checkpoint_loads_nothing_and_raises():
    model = _b0(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    resnet = {"conv1.weight": torch.randn(64, 3, 7, 7), "bn1.weight": torch.randn(64),
              "layer1.0.conv1.weight": torch.randn(64, 64, 3, 3), "fc.weight": torch.randn(1000, 2048)}
    with pytest.raises(CheckpointError, match="nothing") as e:
        load_pretrained(model, resnet)
    assert "conv1.weight" in str(e.value) and "0 of" in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # unchanged


def test_other_zoo_size_is_named():
    b2 = _meta_state_dict("segformer_b2")
    assert guess_model_name(b2) == "segformer_b2"
    with pytest.raises(CheckpointError, match="segformer_b2") as e:
        load_pretrained(_b0(1), b2)
    assert "segformer_b0" in str(e.value)  # and what the model is


def test_transkd_model_file_records_its_model():
    b2 = _meta_state_dict("segformer_b2")
    saved = {"format": "transkd_fast:weights", "model": b2, "meta": {"model": "segformer_b2", "num_outputs": 20}}
    assert guess_model_name(saved) == "segformer_b2"
    with pytest.raises(CheckpointError, match="segformer_b2"):
        load_pretrained(_b0(1), saved)


def test_num_classes_mismatch_says_so():
    sd = _b0(0).state_dict()
    sd["decode_head.linear_pred.weight"] = torch.randn(19, 256, 1, 1)
    sd["decode_head.linear_pred.bias"] = torch.randn(19)
    with pytest.raises(CheckpointError, match=r"segformer_b0 with 19 outputs.*has 20.*num_classes=19") as e:
        load_pretrained(_b0(1), sd)
    assert "decode_head.linear_pred.weight" in str(e.value)


@pytest.mark.parametrize("name", ["segformer_b0", "segformer_b1", "segformer_b2", "segformer_b3", "pvt_v2_b0",
                                  "pvt_v2_b1", "pvt_v2_b2"])
def test_guess_model_name_over_the_zoo(name):
    assert guess_model_name(_meta_state_dict(name)) == name
    # mmseg / DataParallel prefixes change nothing
    assert guess_model_name({"state_dict": {"module." + k: v for k, v in _meta_state_dict(name).items()}}) == name


def test_guess_model_name_backbone_only_and_unknown():
    bare = {k[len("backbone."):]: v for k, v in _meta_state_dict("segformer_b1").items() if k.startswith("backbone.")}
    assert guess_model_name(bare) == "segformer_b1"  # MLP ratio 4: MiT, not PVTv2 (ratio 8)
    bare_pvt = {k[len("backbone."):]: v for k, v in _meta_state_dict("pvt_v2_b1").items()
                if k.startswith("backbone.")}
    assert guess_model_name(bare_pvt) == "pvt_v2_b1"
    assert guess_model_name({"conv1.weight": torch.zeros(1)}) is None


def test_bare_backbone_model_report():
    src = _b0(0)
    report = load_pretrained(copy.deepcopy(_b0_template().backbone), src.state_dict())
    assert report.complete and report.total == len(report.loaded) and report.unexpected
    assert "unexpected" in report.summary()


def test_deeper_backbone_of_same_widths_is_refused():
    # MiT-B2's stage widths are B1's: every B1 tensor is in a B2 backbone file with the right shape
    with torch.device("meta"):
        b1 = build_model("segformer_b1", num_classes=20)
    b2_backbone = {k[len("backbone."):]: v for k, v in _meta_state_dict("segformer_b2").items()
                   if k.startswith("backbone.")}
    with pytest.raises(CheckpointError, match="segformer_b2") as e:
        load_pretrained(b1.backbone, b2_backbone)
    assert "segformer_b1" in str(e.value) or "mit_b1" in str(e.value)
    assert "unexpected" in str(e.value)
