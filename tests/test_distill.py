"""TransKD modules, the distiller and the baselines (issue #4 items 2-4)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel
from torch import nn

from transkd_fast.distill import (
    CITYSCAPES_CLASS_WEIGHTS,
    DISTILLERS,
    PEA,
    EmbeddingAssistant,
    GLMixer,
    TransKD,
    build_distiller,
)
from transkd_fast.models import build_model
from transkd_fast.ops.hcl import hcl_loss_reference
from transkd_fast.ops.kl_div import kd_kl_div_reference
from transkd_fast.ops.weighted_mse import weighted_mse_reference

NUM_CLASSES = 20
H, W = 64, 128


@pytest.fixture(scope="module")
def teacher_b2():
    return build_model("segformer_b2", num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def teacher():
    """MiT-B1: the stage widths of B2 ([64, 128, 320, 512]), so the KD modules are exactly those of
    B0 → B2, at about half B2's CPU time. Parameter counts and the optimizer step use B2 itself."""
    return build_model("segformer_b1", num_classes=NUM_CLASSES)


_TEMPLATES: dict = {}


def _student(**kw):
    key = tuple(sorted(kw.items()))
    if key not in _TEMPLATES:
        _TEMPLATES[key] = build_model("segformer_b0", num_classes=NUM_CLASSES, **kw)
    return copy.deepcopy(_TEMPLATES[key])


def _batch(b=2):
    images = torch.randn(b, 3, H, W)
    labels = torch.randint(0, NUM_CLASSES, (b, H // 4, W // 4))
    return images, labels


def _count(params):
    return sum(p.numel() for p in params)


# -- parameter counts (design §1 table: student + KD modules, teacher excluded) ---------------

# PEA 193536 + CSF 650304 = 843840; GL-Mixer: qkv 196608 + proj 65792 + 2 Conv1d 393728 + α, β;
# EA: 4 patch embeddings 970944 + 8 scalars.
KD_PARAMS = {"base": 843840, "gl": 843840 + 656130, "ea": 843840 + 970952}
PAPER_M = {"base": 4.56, "gl": 5.22, "ea": 5.53}


@pytest.mark.parametrize("variant", ["base", "gl", "ea"])
def test_parameter_counts(variant, teacher_b2):
    student = _student()
    kd = TransKD(student, teacher_b2, variant=variant)
    n_kd = _count(kd.kd_parameters())
    assert n_kd == KD_PARAMS[variant]
    total = _count(kd.trainable_parameters())
    assert total == _count(student.parameters()) + n_kd
    assert round(total / 1e6, 2) == PAPER_M[variant], f"{variant}: {total / 1e6:.4f} M"
    assert round(_count(student.parameters()) / 1e6, 2) == 3.72
    # The deployable student carries none of the KD modules.
    assert kd.student_model() is student
    assert not any(p.data_ptr() in {q.data_ptr() for q in student.parameters()} for p in kd.kd_parameters())


# -- module details --------------------------------------------------------------------------


def test_pea_and_gl_mixer_and_ea_init():
    pea = PEA([32, 64, 160, 256], [64, 128, 320, 512])
    assert [tuple(p.weight.shape) for p in pea.proj] == [(64, 32), (128, 64), (320, 160), (512, 256)]
    e = [torch.randn(2, n, c) for n, c in zip([512, 128, 32, 8], [32, 64, 160, 256])]
    assert [tuple(o.shape) for o in pea(e)] == [(2, n, c) for n, c in zip([512, 128, 32, 8], [64, 128, 320, 512])]

    gl = GLMixer(256, num_heads=8)
    assert gl.qkv.bias is None and gl.proj.bias is not None
    assert gl.alpha.item() == 1.0 and gl.beta.item() == 1.0
    ea = EmbeddingAssistant([32, 64, 160, 256], [64, 128, 320, 512])
    assert [w.item() for w in ea.fuse_weights] == pytest.approx([0.1 * (j + 1) for j in range(8)])
    assert [tuple(m.proj.weight.shape) for m in ea.embeds] == [(64, 3, 7, 7), (128, 32, 3, 3), (320, 64, 3, 3),
                                                               (512, 160, 3, 3)]
    assert all(m.proj.bias.abs().max() == 0 for m in ea.embeds)


def test_gl_mixer_matches_unfused_math():
    torch.manual_seed(1)
    gl = GLMixer(64, num_heads=8).double()
    with torch.no_grad():
        gl.alpha.fill_(0.7)
        gl.beta.fill_(-1.3)
    e = torch.randn(2, 13, 64, dtype=torch.float64)
    B, N, C = e.shape
    q, k, v = gl.qkv(e).reshape(B, N, 3, 8, C // 8).permute(2, 0, 3, 1, 4)
    att = ((q @ k.transpose(-2, -1)) * (C // 8) ** -0.5).softmax(-1)
    glob = gl.proj((att @ v).transpose(1, 2).reshape(B, N, C))
    et = e.transpose(1, 2)
    loc = (gl.conv1(et) * torch.sigmoid(gl.conv2(et))).transpose(1, 2)
    ref = 0.7 * glob - 1.3 * loc
    assert_close_rel(gl(e), ref, 1e-10, "GL-Mixer")
    gl.residual = True
    assert_close_rel(gl(e), ref + e, 1e-10, "GL-Mixer residual")
    with pytest.raises(ValueError, match=r"expects \[B, N, 64\]"):
        gl(torch.randn(2, 13, 32, dtype=torch.float64))


def test_ea_fuses_pea_and_assistant():
    ea = EmbeddingAssistant([32, 64, 160, 256], [64, 128, 320, 512])
    images = torch.randn(1, 3, H, W)
    feats = [torch.randn(1, c, H // s, W // s) for c, s in zip([32, 64, 160, 256], [4, 8, 16, 32])]
    aligned = [torch.randn(1, (H // s) * (W // s), c) for c, s in zip([64, 128, 320, 512], [4, 8, 16, 32])]
    out = ea(images, feats, aligned)
    inputs = [images, *feats[:3]]
    for i in range(4):
        assist = ea.embeds[i](inputs[i])[0]
        assert_close_rel(out[i], 0.1 * (i + 1) * aligned[i] + 0.1 * (i + 5) * assist, 1e-6, f"EA stage {i + 1}")


# -- the distiller's contract ------------------------------------------------------------------


def test_losses_match_references_and_total(teacher):
    """Each term is the design §2 loss of the right tensors, and the total is their sum."""
    student = _student()
    kd = TransKD(student, teacher, variant="gl", logit_loss="kl", temperature=2.0,
                 class_weights=CITYSCAPES_CLASS_WEIGHTS)
    kd.eval()  # deterministic student (no drop path) so the terms can be recomputed
    images, labels = _batch(2)
    labels[0, :3] = 19    # void: weight 0
    labels[1, 0] = 255    # ignored
    with torch.no_grad():
        out = kd(images, labels)
        s_feats, s_logits, s_embeds = student(images, return_features=True)
        t_feats, t_logits, t_embeds = teacher(images, return_features=True)
        fused = kd.csf(s_feats)
        e = list(s_embeds)
        e[-1] = kd.gl_mixer(e[-1])
        aligned = kd.pea(e)
        ce = F.cross_entropy(s_logits, labels, weight=torch.tensor(CITYSCAPES_CLASS_WEIGHTS), ignore_index=255)
        feature = hcl_loss_reference(fused, t_feats)
        embed = weighted_mse_reference(aligned, list(t_embeds), [0.1, 0.1, 0.5, 1.0])
        logit = kd_kl_div_reference(s_logits, t_logits, temperature=2.0, mode="spatial")
    assert set(out) == {"loss", "ce", "feature", "embed", "logit", "logits"}
    assert_close_rel(out["logits"], s_logits, 1e-6, "logits")
    assert_close_rel(out["ce"], ce, 1e-5, "ce")
    assert_close_rel(out["feature"], feature, 1e-5, "feature")
    assert_close_rel(out["embed"], embed, 1e-5, "embed")
    assert_close_rel(out["logit"], logit, 1e-5, "logit")
    assert_close_rel(out["loss"], out["ce"] + out["feature"] + out["embed"] + out["logit"], 1e-6, "total")


def test_teacher_head_runs_only_for_logit_loss(teacher):
    calls = []
    handle = teacher.decode_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        images, labels = _batch(1)
        student = _student()
        with torch.no_grad():
            for kind in ("transkd_base", "transkd_gl", "transkd_ea", "cwd", "review_kd"):
                build_distiller(kind, student, teacher)(images, labels)
            assert calls == [], "the teacher's decode head ran although no loss consumes its logits"
            TransKD(student, teacher, logit_loss="kl")(images, labels)
            assert len(calls) == 1
            build_distiller("logit_kd", student, teacher)(images, labels)
            assert len(calls) == 2
    finally:
        handle.remove()


def test_one_step_updates_student_and_kd_not_teacher(teacher_b2):
    """With a logit loss, so the teacher's head (and its BatchNorm) runs too; its buffers must not move."""
    teacher = teacher_b2
    # No stochastic depth: every student parameter then gets a non-zero gradient.
    student = _student(drop_path_rate=0.0)
    kd = TransKD(student, teacher, variant="ea", logit_loss="kl")
    kd.train()
    assert kd.student.training and not kd.teacher.training
    assert not any(m.training for m in kd.teacher.modules())
    assert not any(p.requires_grad for p in kd.teacher.parameters())
    grad_modes = []
    handle = teacher.backbone.register_forward_hook(lambda *a: grad_modes.append(torch.is_grad_enabled()))
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = {id(p): p.detach().clone() for p in kd.trainable_parameters()}
    opt = torch.optim.AdamW(kd.trainable_parameters(), lr=1e-3)

    out = kd(*_batch(2))
    handle.remove()
    assert grad_modes == [False], "the teacher must run under no_grad"
    opt.zero_grad()
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    opt.step()

    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), f"teacher {k} changed"
    names = {id(p): n for n, p in kd.named_parameters()}
    unchanged = [names[id(p)] for p in kd.trainable_parameters() if torch.equal(p.detach(), before[id(p)])]
    # At batch 2 only CSF's batch-size-1 squeeze MLP (fc1) has no gradient.
    assert all(".fc1." in n for n in unchanged), unchanged
    assert len(unchanged) == 3
    assert any(n.startswith("student.") for n in names.values())
    changed_kd = [n for n in names.values() if n.split(".")[0] in ("csf", "pea", "ea") and n not in unchanged]
    assert {n.split(".")[0] for n in changed_kd} == {"csf", "pea", "ea"}


RUNS = [
    ("transkd_base", {}),
    ("transkd_gl", {"gl_residual": True}),
    ("transkd_ea", {}),
    ("transkd_base", {"feature_loss": "cwd", "temperature": 4.0}),
    ("transkd_base", {"feature_loss": "kl", "logit_loss": "kl"}),
    ("logit_kd", {"temperature": 4.0}),
    ("cwd", {}),
    ("cwd", {"stages": (0, 1, 2, 3)}),
    ("review_kd", {}),
]


def test_runs_cover_every_distiller():
    assert {k for k, _ in RUNS} == set(DISTILLERS)


@pytest.mark.parametrize("kind,kw", RUNS)
def test_every_distiller_forward_backward(kind, kw, teacher):
    student = _student()
    kd = build_distiller(kind, student, teacher, **kw)
    kd.train()
    images, labels = _batch(2)
    out = kd(images, labels)
    assert {"loss", "ce", "feature", "embed", "logits"} <= set(out)
    assert out["logits"].shape == (2, NUM_CLASSES, H // 4, W // 4)
    assert torch.isfinite(out["loss"]) and out["loss"].dim() == 0
    terms = [v for k, v in out.items() if k not in ("loss", "logits")]
    assert_close_rel(out["loss"], sum(terms), 1e-6, "total")
    out["loss"].backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    kd_params = list(kd.kd_parameters())
    if kind != "logit_kd":
        assert kd_params and any(p.grad is not None and p.grad.abs().sum() > 0 for p in kd_params)
        assert out["feature"].requires_grad
    else:
        assert kd_params == [] and "logit" in out
    if kind.startswith("transkd"):
        assert out["embed"].item() > 0


def test_autocast_bf16_runs(teacher):
    """Under autocast the student's maps are bf16 and the teacher's LayerNorm outputs fp32: the
    losses promote to one dtype and return fp32 scalars."""
    kd = TransKD(_student(), teacher, variant="ea", logit_loss="kl")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kd(*_batch(2))
    assert all(out[k].dtype == torch.float32 and torch.isfinite(out[k]) for k in ("loss", "ce", "feature", "embed"))
    out["loss"].backward()
    assert kd.csf.stages[0].conv1[0].weight.grad is not None


def test_batch_one_runs_and_uses_fc1(teacher):
    kd = TransKD(_student(), teacher)
    out = kd(*_batch(1))
    out["loss"].backward()
    for stage in kd.csf.stages[:3]:
        assert stage.fc1[0].weight.grad is not None and stage.fc[0].weight.grad is None


# -- bad input ---------------------------------------------------------------------------------


class _ThreeStages(nn.Module):
    embed_dims = [64, 128, 320]
    num_classes = NUM_CLASSES


class _NineteenClasses(nn.Module):
    embed_dims = [64, 128, 320, 512]
    num_classes = 19


class _Shrunk(nn.Module):
    """A teacher whose stage maps and tokens are half the student's spatial size."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.embed_dims, self.num_classes = inner.embed_dims, inner.num_classes

    def backbone(self, x):
        return self.inner.backbone(F.avg_pool2d(x, 2))


def test_bad_inputs(teacher):
    with pytest.raises(ValueError, match="different stage counts: 4 .* vs 3"):
        TransKD(_student(), _ThreeStages())
    with pytest.raises(ValueError, match="unknown TransKD variant"):
        TransKD(_student(), teacher, variant="xl")
    with pytest.raises(ValueError, match="unknown feature_loss"):
        TransKD(_student(), teacher, feature_loss="mse")
    with pytest.raises(ValueError, match="unknown distiller"):
        build_distiller("fitnet", _student(), teacher)
    with pytest.raises(ValueError, match="a logit loss needs the same classes: the student has 20 outputs, the "
                                         "teacher 19"):
        TransKD(_student(), _NineteenClasses(), logit_loss="kl")
    with pytest.raises(ValueError, match="class_weights has 19 entries but the student has 20"):
        TransKD(_student(), teacher, class_weights=CITYSCAPES_CLASS_WEIGHTS[:19])

    kd = TransKD(_student(), _Shrunk(teacher))
    with pytest.raises(ValueError, match=r"stage maps stage 1: student spatial size \(H, W\) \(16, 32\) differs "
                                         r"from the teacher's \(8, 16\)"):
        kd(*_batch(1))

    kd = TransKD(_student(), teacher)
    images, labels = _batch(1)
    with pytest.raises(ValueError, match=r"labels must have shape \[B, h, w\] = \[1, 16, 32\]"):
        kd(images, torch.randint(0, NUM_CLASSES, (1, H, W)))
    with pytest.raises(ValueError, match=r"labels must have shape .* got \[2, 16, 32\]"):
        kd(images, torch.randint(0, NUM_CLASSES, (2, H // 4, W // 4)))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        kd(images, labels.float())
    with pytest.raises(ValueError, match=r"images must be a floating \[B, C, H, W\] tensor"):
        kd(images[0], labels)
    # [B, 1, h, w] labels (the original's targets layout) are accepted.
    kd(images, labels[:, None])
