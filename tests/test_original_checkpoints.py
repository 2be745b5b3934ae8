"""The original TransKD code's distiller checkpoints load (issue #15 item 1).

The original's key layout is synthesized here from its documented construction (``build_kd_trans``:
``SKF(student, in_channels, out_channels, mid_channel=64, embed)``), not from our key tables:

- ``student.<key>`` in the student's own naming: TransKD's flat SegFormer (``patch_embed1``, ``block1``,
  ``norm1``, ``linear_c1``, ``linear_fuse``, ``linear_pred`` at the top level), its PVTv2 model
  (``backbone``, ``neck``, ``head``), its LVT (``backbone.{s}.{0|1}``, head flat);
- ``skfs.{j}``: ``SK(in_channels[idx], 64, out_channels[idx], fuse=idx < 3)`` built for idx = 0…3,
  then the list reversed, so ``skfs.j`` is built for idx = 3 − j;
- ``embed{i}_linearproject``: Linear(in_channels[i−1], out_channels[i−1]);
- GL: ``attn4`` (``qkv`` without bias, ``proj``), Conv1d ``conv1`` / ``conv2`` (C₄, C₄, 3),
  ``atten_weight`` / ``conv_weight`` (1 value each);
- EA: ``patch_embed{i}`` (conv k7 s4 from RGB, then k3 s2 from in_channels[i−2]; + LayerNorm) to
  out_channels[i−1], ``fuse_weights.{0…7}``.

Every tensor holds its own marker value; after the load each marker must sit in the tensor the
original's key denotes (resolved through our modules' attributes).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from transkd_fast.distill import TransKD
from transkd_fast.distill.original import is_original_distiller, original_variant
from transkd_fast.models import build_model, load_pretrained
from transkd_fast.models.checkpoints import CheckpointError

NUM_CLASSES = 20
MID = 64
SQUEEZE = max(MID // 16, 32)
BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@functools.lru_cache(maxsize=None)
def _template(name: str):
    return build_model(name, num_classes=NUM_CLASSES)


def _model(name: str):
    return copy.deepcopy(_template(name))


def _bn(prefix: str, c: int) -> dict[str, tuple]:
    return {f"{prefix}.{s}": (() if s == "num_batches_tracked" else (c,)) for s in BN_SUFFIXES}


def original_kd_shapes(cs: list[int], ct: list[int], variant: str) -> dict[str, tuple]:
    """The original distiller's KD-module keys and shapes (module docstring)."""
    shapes: dict[str, tuple] = {}
    n = len(cs)
    for j in range(n):
        idx = n - 1 - j  # skfs = [SK(idx=0), …, SK(idx=3)][::-1]
        p = f"skfs.{j}"
        shapes[f"{p}.conv1.0.weight"] = (MID, cs[idx], 1, 1)
        shapes.update(_bn(f"{p}.conv1.1", MID))
        shapes[f"{p}.conv2.0.weight"] = (ct[idx], MID, 3, 3)
        shapes.update(_bn(f"{p}.conv2.1", ct[idx]))
        if idx < n - 1:
            shapes[f"{p}.fc.0.weight"] = (SQUEEZE, MID, 1, 1)
            shapes.update(_bn(f"{p}.fc.1", SQUEEZE))
            shapes[f"{p}.fc1.0.weight"] = (SQUEEZE, MID, 1, 1)
            for b in range(2):
                shapes[f"{p}.fcs.{b}.weight"] = (MID, SQUEEZE, 1, 1)
                shapes[f"{p}.fcs.{b}.bias"] = (MID,)
    for i in range(1, n + 1):
        shapes[f"embed{i}_linearproject.weight"] = (ct[i - 1], cs[i - 1])
        shapes[f"embed{i}_linearproject.bias"] = (ct[i - 1],)
    if variant == "gl":
        c = cs[-1]
        shapes.update({"attn4.qkv.weight": (3 * c, c), "attn4.proj.weight": (c, c), "attn4.proj.bias": (c,),
                       "conv1.weight": (c, c, 3), "conv1.bias": (c,), "conv2.weight": (c, c, 3),
                       "conv2.bias": (c,), "atten_weight": (1,), "conv_weight": (1,)})
    if variant == "ea":
        inputs = [3, *cs[:-1]]
        for i in range(1, n + 1):
            k = 7 if i == 1 else 3
            shapes[f"patch_embed{i}.proj.weight"] = (ct[i - 1], inputs[i - 1], k, k)
            for s in ("proj.bias", "norm.weight", "norm.bias"):
                shapes[f"patch_embed{i}.{s}"] = (ct[i - 1],)
        for j in range(2 * n):
            shapes[f"fuse_weights.{j}"] = (1,)
    return shapes


def original_student_keys(student) -> dict[str, str]:
    """Original student key → our student key, per the original's model classes."""
    out = {}
    for k in student.state_dict():
        head, rest = k.split(".", 1)
        if student.variant.startswith("segformer_"):  # flat SegFormer: backbone and head keys at the top level
            out[rest] = k
        elif student.variant.startswith("pvt_v2_"):  # PVTv2(backbone, neck, head)
            out[("head." + rest) if head == "decode_head" else k] = k
        else:  # LVT: backbone.{s}.* as ours, head flat
            out[rest if head == "decode_head" else k] = k
    return out


def _marked(shapes: dict[str, tuple], start: int) -> dict[str, torch.Tensor]:
    """One tensor per key, each filled with its own marker start, start + 1, …"""
    out = {}
    for i, (k, shape) in enumerate(shapes.items()):
        dtype = torch.int64 if k.endswith("num_batches_tracked") else torch.float32
        out[k] = torch.full(shape, start + i, dtype=dtype)
    return out


def original_checkpoint(kd: TransKD, variant: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A synthesized original distiller state dict for ``kd``'s pair, and its student-key map."""
    s_keys = original_student_keys(kd.student)
    s_shapes = {o: tuple(kd.student.state_dict()[ours].shape) for o, ours in s_keys.items()}
    sd = {"student." + k: v for k, v in _marked(s_shapes, 1).items()}
    sd.update(_marked(original_kd_shapes(kd.student_dims, kd.teacher_dims, variant), 1 + len(sd)))
    return sd, s_keys


def resolve(kd: TransKD, key: str, s_keys: dict[str, str]) -> torch.Tensor:
    """The tensor of ours that the original's ``key`` denotes, found through module attributes."""
    n = len(kd.student_dims)
    parts = key.split(".")
    if parts[0] == "student":
        return kd.student.state_dict(keep_vars=True)[s_keys[key[len("student."):]]]
    if parts[0] in ("skfs", "csfs"):
        module, rest = kd.csf.stages[n - 1 - int(parts[1])], parts[2:]
    elif parts[0].endswith("_linearproject"):
        module, rest = kd.pea.proj[int(parts[0][len("embed"):-len("_linearproject")]) - 1], parts[1:]
    elif parts[0] == "attn4":
        module, rest = kd.gl_mixer, parts[1:]
    elif parts[0] in ("conv1", "conv2"):
        module, rest = getattr(kd.gl_mixer, parts[0]), parts[1:]
    elif key == "atten_weight":
        return kd.gl_mixer.alpha
    elif key == "conv_weight":
        return kd.gl_mixer.beta
    elif parts[0].startswith("patch_embed"):
        module, rest = kd.ea.embeds[int(parts[0][len("patch_embed"):]) - 1], parts[1:]
    elif parts[0] == "fuse_weights":
        return kd.ea.fuse_weights[int(parts[1])]
    else:
        raise KeyError(key)
    return module.state_dict(keep_vars=True)[".".join(rest)]


def _n_tensors(module) -> int:
    return sum(1 for k in module.state_dict() if not k.endswith("num_batches_tracked"))


PAIRS = {"segformer": ("segformer_b0", "segformer_b1"),  # B1 has B2's stage widths: the same KD modules
         "pvt": ("pvt_v2_b0", "pvt_v2_b1"), "lvt": ("lvt", "segformer_b1")}


def _pair(pair: str, variant: str = "base") -> TransKD:
    s, t = PAIRS[pair]
    return TransKD(_model(s), _template(t), variant=variant)


@pytest.mark.parametrize("pair,variant", [("segformer", "base"), ("segformer", "gl"), ("segformer", "ea"),
                                          ("pvt", "base"), ("lvt", "base")])
def test_original_distiller_loads_fully_and_every_tensor_lands(pair, variant):
    kd = _pair(pair, variant)
    teacher_before = {k: v.clone() for k, v in kd.teacher.state_dict().items()}
    sd, s_keys = original_checkpoint(kd, variant)
    assert is_original_distiller(sd) and original_variant(sd) == variant
    report = kd.load_original(sd)
    assert report.format == "transkd-original"
    assert not report.missing and not report.unexpected and not report.ignored, report.summary()
    expected = _n_tensors(kd) - _n_tensors(kd.teacher)
    assert report.total == expected and len(report.loaded) == expected
    for key, value in sd.items():
        got = resolve(kd, key, s_keys)
        assert torch.equal(got.detach(), value), f"{key}: marker {value.flatten()[0]} not where it belongs"
    for k, v in kd.teacher.state_dict().items():  # the teacher is not in the file and stays as it was
        assert torch.equal(v, teacher_before[k]), k


def test_csfs_naming_of_the_later_transkd_file():
    kd = _pair("segformer")
    sd, s_keys = original_checkpoint(kd, "base")
    sd = {("csfs" + k[len("skfs"):] if k.startswith("skfs.") else k): v for k, v in sd.items()}
    report = kd.load_original(sd, strict=True)
    assert not report.missing and not report.unexpected
    assert torch.equal(kd.csf.stages[3].conv1[0].weight.detach(), sd["csfs.0.conv1.0.weight"])


def test_dataparallel_wrapped_file_from_disk(tmp_path):
    kd = _pair("segformer", "ea")
    sd, s_keys = original_checkpoint(kd, "ea")
    path = tmp_path / "checkpoint_TransKD_EA.pth.tar"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    report = kd.load_original(str(path))
    assert not report.missing and not report.unexpected
    assert torch.equal(kd.ea.fuse_weights[5].detach(), sd["fuse_weights.5"])


@pytest.mark.parametrize("pair", ["segformer", "pvt", "lvt"])
def test_student_alone_loads_from_a_distiller_file(pair):
    kd = _pair(pair, "gl" if pair == "segformer" else "base")
    sd, s_keys = original_checkpoint(kd, "gl" if pair == "segformer" else "base")
    student = _model(PAIRS[pair][0])
    report = load_pretrained(student, sd)
    assert report.complete and not report.unexpected, report.summary()
    assert len(report.loaded) == report.total == _n_tensors(student)
    kd_keys = [k for k in sd if not k.startswith("student.")]
    assert sorted(report.ignored) == sorted(kd_keys)  # the KD modules' keys: reported, not loaded
    own = student.state_dict()
    for orig, ours in s_keys.items():
        assert torch.equal(own[ours], sd["student." + orig]), orig


def test_student_alone_from_a_wrapped_file(tmp_path):
    kd = _pair("segformer")
    sd, s_keys = original_checkpoint(kd, "base")
    path = tmp_path / "model_best.pth"
    torch.save({"module." + k: v for k, v in sd.items()}, path)
    student = _model("segformer_b0")
    report = load_pretrained(student, path, strict=True)
    assert report.complete
    assert torch.equal(student.backbone.block3[1].attn.kv.weight, sd["student.block3.1.attn.kv.weight"])


def test_empty_match_raises_and_loads_nothing():
    kd = _pair("segformer")
    before = {k: v.clone() for k, v in kd.state_dict().items()}
    with pytest.raises(CheckpointError, match="nothing loaded"):
        kd.load_original({"encoder.layer.0.weight": torch.ones(3), "classifier.bias": torch.ones(2)})
    # distiller-shaped, but nothing of this pair: a student of another naming, a stage index past the 4th
    foreign = {"student.encoder.layer.0.weight": torch.ones(3), "skfs.7.conv1.0.weight": torch.ones(64, 32, 1, 1),
               "embed9_linearproject.bias": torch.ones(4)}
    with pytest.raises(CheckpointError, match="nothing loaded"):
        kd.load_original(foreign)
    with pytest.raises(CheckpointError, match="nothing loaded"):
        load_pretrained(_model("segformer_b0"), foreign)
    for k, v in kd.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_shape_mismatch_raises_and_loads_nothing():
    kd = _pair("segformer")
    before = {k: v.clone() for k, v in kd.state_dict().items()}
    lvt_sd, _ = original_checkpoint(_pair("lvt"), "base")  # student widths [64, 64, 160, 256], not B0's
    with pytest.raises(CheckpointError, match="shape mismatch"):
        kd.load_original({k: v for k, v in lvt_sd.items() if not k.startswith("student.")})
    with pytest.raises(CheckpointError, match="shape mismatch"):
        kd.load_original(lvt_sd)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_pretrained(kd.student, lvt_sd)  # its head's linear_c1 is 64 → 256
    for k, v in kd.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_other_variant_is_reported_and_strict_refuses():
    kd = _pair("segformer", "base")
    sd, _ = original_checkpoint(_pair("segformer", "gl"), "gl")
    report = kd.load_original(sd)
    gl_keys = ["attn4.qkv.weight", "attn4.proj.weight", "attn4.proj.bias", "conv1.weight", "conv1.bias",
               "conv2.weight", "conv2.bias", "atten_weight", "conv_weight"]
    assert sorted(report.unexpected) == sorted(gl_keys) and not report.missing
    with pytest.raises(CheckpointError, match="TransKD-gl, the distiller a TransKD-base"):
        kd.load_original(sd, strict=True)
    kd_gl = _pair("segformer", "gl")
    base_sd, _ = original_checkpoint(kd, "base")
    report = kd_gl.load_original(base_sd)
    assert sorted(report.missing) == sorted(["gl_mixer.qkv.weight", "gl_mixer.proj.weight", "gl_mixer.proj.bias",
                                             "gl_mixer.conv1.weight", "gl_mixer.conv1.bias", "gl_mixer.conv2.weight",
                                             "gl_mixer.conv2.bias", "gl_mixer.alpha", "gl_mixer.beta"])


def test_single_stage_embedding_run():
    """``--embed 3``: one projection, named ``embed1_linearproject``, for stage 3."""
    kd = _pair("segformer")
    sd, _ = original_checkpoint(kd, "base")
    w, b = sd.pop("embed3_linearproject.weight"), sd.pop("embed3_linearproject.bias")
    for i in (1, 2, 4):
        del sd[f"embed{i}_linearproject.weight"], sd[f"embed{i}_linearproject.bias"]
    sd["embed1_linearproject.weight"], sd["embed1_linearproject.bias"] = w, b
    report = kd.load_original(sd, embed_stage=3)
    assert torch.equal(kd.pea.proj[2].weight.detach(), w) and torch.equal(kd.pea.proj[2].bias.detach(), b)
    assert sorted(report.missing) == sorted(f"pea.proj.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias"))
    assert not report.unexpected
