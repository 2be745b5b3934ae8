"""The original TransKD recipe as options (issue #15 item 3): --lr-schedule poly-epoch,
--embed-stages, --cwd-norm / --cwd-divergence. Each changes what it names and nothing else.

Expected values are written here from the math (the original's ``PolynomialLRDecay`` stepped
per epoch, its ``nn.MSELoss`` on one stage, its ``CriterionCWD``), not from our code.
"""

from __future__ import annotations

import copy
from dataclasses import asdict

import pytest
import torch

from transkd_fast.distill import CWD, TransKD
from transkd_fast.distill.losses import cwd_loss, feature_loss
from transkd_fast.engine import TrainConfig, distill, train
from transkd_fast.engine.checkpoint import load_checkpoint
from transkd_fast.engine.config import ConfigError, validate_train_config
from transkd_fast.engine.trainer import _changed_settings, distiller_kwargs, lr_factor
from transkd_fast.models import build_model
from transkd_fast.models.checkpoints import CheckpointError
from transkd_fast.ops.kl_div import kd_kl_div

TINY = dict(model="segformer_b0", batch_size=2, synthetic_train_size=8, synthetic_val_size=4, synthetic_height=32,
            synthetic_width=64, log_every=1, progress=False, eval_at_end=False)
LR = 6e-5


# -- 1. --lr-schedule poly-epoch ----------------------------------------------------------------


def _epoch_lr(step: int, spe: int, max_decay: int, power: float) -> float:
    """PolynomialLRDecay(max_decay_steps=M, end_learning_rate=0, power=p), scheduler.step() once per
    epoch: its constructor steps once, so epoch 1 runs at last_step = 1; past M it no longer
    changes the lr, which stays at the value set at last_step = M (the end lr, 0)."""
    last_step = step // spe + 1
    if last_step > max_decay:
        last_step = max_decay
    return LR * (1 - last_step / max_decay) ** power


POLY_EPOCH = dict(lr_schedule="poly-epoch", steps_per_epoch=3, max_decay_steps=3, poly_power=2.0, lr=LR)


def _lrs(res) -> list:
    return [r["lr"] for r in res.history]


def test_poly_epoch_lr_per_step_resume_and_extend(tmp_path):
    # 10 steps of 3 per epoch: epochs 1-3 decay, epoch 4 (step 10) past max_decay_steps stays at 0
    a = train(TrainConfig(output_dir=str(tmp_path / "a"), steps=10, **TINY, **POLY_EPOCH))
    want = [_epoch_lr(s, 3, 3, 2.0) for s in range(10)]
    assert _lrs(a) == pytest.approx(want, rel=1e-12, abs=0)
    # constant within an epoch; epoch 1 at (1 - 1/3)^2, not 1; clamped at 0 after max_decay_steps
    assert want[:3] == pytest.approx([LR * 4 / 9] * 3, rel=1e-12) and want[-1] == 0.0
    # the default is not 3 here (8 images / batch 2 = 4 steps per epoch): the flag really was read
    assert _lrs(a) != pytest.approx([_epoch_lr(s, 4, 3, 2.0) for s in range(10)])

    # resume in the middle of epoch 2: every step's lr and the final weights equal the uninterrupted run's
    b1 = train(TrainConfig(output_dir=str(tmp_path / "b"), steps=10, stop_at=4, **TINY, **POLY_EPOCH))
    with pytest.raises(ConfigError, match="--lr-schedule"):
        train(TrainConfig(output_dir=str(tmp_path / "b"), steps=10, resume="auto", **TINY,
                          **{**POLY_EPOCH, "lr_schedule": "poly", "steps_per_epoch": None, "max_decay_steps": 1500}))
    with pytest.raises(ConfigError, match="--max-decay-steps"):
        train(TrainConfig(output_dir=str(tmp_path / "b"), steps=10, resume="auto", **TINY,
                          **{**POLY_EPOCH, "max_decay_steps": 4}))
    b2 = train(TrainConfig(output_dir=str(tmp_path / "b"), steps=10, resume="auto", **TINY, **POLY_EPOCH))
    assert _lrs(b1) + _lrs(b2) == _lrs(a)
    wa = torch.load(a.weights, weights_only=False)["model"]
    wb = torch.load(b2.weights, weights_only=False)["model"]
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []

    # --extend-steps: a 7-step run continued to 10 follows the same per-epoch lr (it does not
    # depend on the run's length)
    c1 = train(TrainConfig(output_dir=str(tmp_path / "c"), steps=7, **TINY, **POLY_EPOCH))
    c2 = train(TrainConfig(output_dir=str(tmp_path / "c"), steps=10, resume="auto", extend_steps=True, **TINY,
                           **POLY_EPOCH))
    assert _lrs(c1) + _lrs(c2) == _lrs(a)
    assert load_checkpoint(c2.checkpoint)["scheduler"]["last_epoch"] == 10


def test_lr_factor_and_default_epoch_length():
    # poly is unchanged: (1 - s/steps)^power, every step
    assert [lr_factor(s, "poly", 4, 2.0) for s in range(4)] == [1.0, 0.5625, 0.25, 0.0625]
    # poly-epoch with the original's setting: epoch 1 already at 1 - 1/1500
    assert lr_factor(0, "poly-epoch", 10, 1.0, 1500, 1488) == 1 - 1 / 1500
    assert lr_factor(1487, "poly-epoch", 10, 1.0, 1500, 1488) == 1 - 1 / 1500
    assert lr_factor(1488, "poly-epoch", 10, 1.0, 1500, 1488) == 1 - 2 / 1500
    # the original's 1000 epochs end at lr/3
    assert lr_factor(1000 * 1488 - 1, "poly-epoch", 10, 1.0, 1500, 1488) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="lr schedule"):
        lr_factor(0, "cosine", 10, 1.0)


def test_default_steps_per_epoch_is_the_loader_length(tmp_path):
    # 6 images, batch 2: 3 steps per epoch, as len(DataLoader(batch_size=2)) in the original
    res = train(TrainConfig(output_dir=str(tmp_path / "d"), steps=4, **{**TINY, "synthetic_train_size": 6},
                            **{**POLY_EPOCH, "steps_per_epoch": None}))
    assert _lrs(res) == pytest.approx([_epoch_lr(s, 3, 3, 2.0) for s in range(4)], rel=1e-12, abs=0)


def test_schedule_flags_are_validated():
    def check(**kw):
        validate_train_config(TrainConfig(**{**TINY, **kw}))

    check(lr_schedule="poly-epoch", max_decay_steps=2, steps_per_epoch=1)
    for kw, flag in ((dict(lr_schedule="cosine"), "--lr-schedule"),
                     (dict(lr_schedule="poly-epoch", max_decay_steps=1), "--max-decay-steps"),
                     (dict(lr_schedule="poly-epoch", steps_per_epoch=0), "--steps-per-epoch"),
                     (dict(max_decay_steps=100), "--max-decay-steps"),   # ignored by poly: refused
                     (dict(steps_per_epoch=5), "--steps-per-epoch")):
        with pytest.raises(ConfigError, match=flag):
            check(**kw)


def test_resume_from_a_checkpoint_older_than_the_options_is_refused_when_they_change():
    # a checkpoint config without the new keys ran the per-step poly schedule, all stages, channel KL
    cfg = TrainConfig(**TINY, lr_schedule="poly-epoch", steps_per_epoch=3)
    old = {k: v for k, v in asdict(TrainConfig(**TINY)).items()
           if k not in ("lr_schedule", "max_decay_steps", "steps_per_epoch", "embed_stages", "cwd_norm",
                        "cwd_divergence")}
    assert [k for k, _, _ in _changed_settings(old, cfg, "train")] == ["lr_schedule"]
    assert _changed_settings(old, TrainConfig(**TINY), "train") == []
    kd = TrainConfig(**TINY, embed_stages="2", cwd_norm="channel_mean")
    assert [k for k, _, _ in _changed_settings(old, kd, "distill")] == ["embed_stages", "cwd_norm"]
    assert _changed_settings(old, kd, "train") == []


# -- 2. --embed-stages --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    student = build_model("segformer_b0", num_classes=5, drop_path_rate=0.0, dropout=0.0)
    torch.manual_seed(1)
    teacher = build_model("segformer_b1", num_classes=5)
    return student, teacher


def _kd(nets, seed=2, cls=TransKD, **kw):
    student, teacher = nets
    torch.manual_seed(seed)
    return cls(copy.deepcopy(student), teacher, **kw)


def _data(b=2, h=32, w=64):
    g = torch.Generator().manual_seed(3)
    return torch.randn(b, 3, h, w, generator=g), torch.randint(0, 5, (b, h // 4, w // 4), generator=g)


def _embeds(kd, images):
    _, _, s_embeds = kd.student(images, return_features=True)
    with torch.no_grad():
        _, t_embeds = kd.teacher.backbone(images)
    return s_embeds, t_embeds


def test_embed_stage_2_is_the_plain_stage_2_mse(nets):
    images, labels = _data()
    kd = _kd(nets, embed_stages=2)
    assert kd.embed_stage == 2
    assert [n for n, _ in kd.named_parameters() if n.startswith("pea.")] == ["pea.proj.1.weight", "pea.proj.1.bias"]
    out = kd(images, labels)
    s_embeds, t_embeds = _embeds(kd, images)
    w, b = kd.pea.proj[1].weight, kd.pea.proj[1].bias
    by_hand = ((s_embeds[1] @ w.T + b - t_embeds[1]) ** 2).mean()   # nn.MSELoss(), weight 1 as the original
    torch.testing.assert_close(out["embed"], by_hand, rtol=1e-6, atol=0)
    out["embed"].backward()
    grads = {n for n, p in kd.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    # the embedding loss reaches stage 2's projection and what the student computes up to its
    # stage-2 patch embedding, nothing of stages 3-4, the head or CSF
    upstream = ("pea.proj.1.", "student.backbone.patch_embed1.", "student.backbone.block1.",
                "student.backbone.norm1.", "student.backbone.patch_embed2.")
    assert {"pea.proj.1.weight", "pea.proj.1.bias"} <= grads
    assert any(n.startswith("student.backbone.patch_embed2.") for n in grads)
    assert [n for n in grads if not n.startswith(upstream)] == []
    # a one-entry embed_weights scales it
    kd3 = _kd(nets, embed_stages="2", embed_weights=(0.3,))
    torch.testing.assert_close(kd3(images, labels)["embed"], 0.3 * out["embed"].detach(), rtol=1e-6, atol=0)


def test_embed_stages_none_has_no_pea_and_changes_nothing_else(nets):
    images, labels = _data()
    full, none = _kd(nets), _kd(nets, embed_stages="none")
    assert none.pea is None and not [n for n, _ in none.named_parameters() if "pea" in n]
    assert not [k for k in none.state_dict() if "pea" in k]
    n_pea = sum(p.numel() for p in full.pea.parameters())
    assert sum(p.numel() for p in none.trainable_parameters()) == sum(p.numel() for p in full.trainable_parameters()) \
        - n_pea
    a, b = full(images, labels), none(images, labels)
    assert b["embed"].item() == 0.0 and a["embed"].item() > 0
    assert torch.equal(a["ce"], b["ce"]) and torch.equal(a["feature"], b["feature"])
    torch.testing.assert_close(b["loss"], a["loss"] - a["embed"])


def test_embed_stages_refusals(nets):
    for kw, match in ((dict(variant="gl", embed_stages=4), "base variant"),
                      (dict(variant="ea", embed_stages="none"), "base variant"),
                      (dict(embed_stages="none", embed_weights=(1.0,)), "embed_weights"),
                      (dict(embed_stages=2, embed_weights=(0.1, 0.1, 0.5, 1.0)), "embed_weights"),
                      (dict(embed_stages=5), "embed_stages")):
        with pytest.raises(ValueError, match=match):
            _kd(nets, **kw)


def test_single_stage_distiller_loads_the_originals_embed_k_file(nets):
    kd = _kd(nets, embed_stages=3)
    sd = {"student." + k: v.clone() for k, v in nets[0].state_dict().items()}
    w, b = torch.randn(320, 160), torch.randn(320)
    sd["embed1_linearproject.weight"], sd["embed1_linearproject.bias"] = w, b   # the original's --embed 3 naming
    report = kd.load_original(sd)  # no embed_stage: the distiller's own
    assert torch.equal(kd.pea.proj[2].weight.detach(), w) and torch.equal(kd.pea.proj[2].bias.detach(), b)
    assert not report.unexpected and not [k for k in report.missing if k.startswith("pea.")]
    with pytest.raises(CheckpointError, match="embed_stages=3"):
        kd.load_original(sd, embed_stage=2)


# -- 3. --cwd-norm / --cwd-divergence ----------------------------------------------------------


def _criterion_cwd(s, t, norm, divergence, T):
    """CriterionCWD(norm_type, divergence, temperature) written from its definition, fp64:
    the temperature is used only with KL; 'channel' = softmax over the H·W positions of each
    channel, 'channel_mean' = the channel's mean; KL = Σ target·(log target − log student) over
    targets > 0 (PyTorch 1.7's kl_div), MSE = Σ squared difference; / (N·C), × T²."""
    T = T if divergence == "kl" else 1.0
    n, c, h, w = s.shape
    s, t = s.double().reshape(n, c, h * w) / T, t.double().reshape(n, c, h * w) / T
    if norm == "channel":
        qs = torch.exp(s) / torch.exp(s).sum(-1, keepdim=True)
        qt = torch.exp(t) / torch.exp(t).sum(-1, keepdim=True)
    else:
        qs, qt = s.sum(-1) / (h * w), t.sum(-1) / (h * w)
    if divergence == "kl":
        total = sum(float(b) * (float(torch.log(b)) - float(torch.log(a)))
                    for a, b in zip(qs.flatten(), qt.flatten()) if b > 0)
    else:
        total = float(((qs - qt) ** 2).sum())
    return total / (n * c) * T * T


@pytest.mark.parametrize("norm,divergence", [("channel", "kl"), ("channel", "mse"), ("channel_mean", "kl"),
                                             ("channel_mean", "mse")])
def test_cwd_variants_equal_criterion_cwd(norm, divergence):
    s = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    t = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    if norm == "channel_mean" and divergence == "kl":   # log of channel means: positive maps (as after a ReLU)
        s, t = s.exp(), t.exp()
    got = cwd_loss(s, t, temperature=2.0, norm=norm, divergence=divergence)
    assert got.item() == pytest.approx(_criterion_cwd(s, t, norm, divergence, 2.0), rel=1e-12)


def test_cwd_channel_mean_kl_counts_a_non_positive_teacher_mean_as_zero():
    s = torch.rand(1, 3, 2, 2, dtype=torch.float64) + 0.1
    t = torch.rand(1, 3, 2, 2, dtype=torch.float64) + 0.1
    t[0, 1] = -t[0, 1]                     # channel 1: teacher mean < 0, left out as PyTorch 1.7 did
    got = cwd_loss(s, t, 1.0, "channel_mean", "kl")
    qs, qt = s.mean((2, 3))[0], t.mean((2, 3))[0]
    want = sum(qt[c] * (qt[c].log() - qs[c].log()) for c in (0, 2)) / 3
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_cwd_default_is_the_fused_op_and_variants_train_the_student_only():
    s = torch.randn(2, 4, 6, 5, requires_grad=True)
    t = torch.randn(2, 4, 6, 5, requires_grad=True)
    assert torch.equal(cwd_loss(s, t, 1.5), kd_kl_div(s, t, temperature=1.5, mode="channel"))
    two = [torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)]
    assert torch.equal(feature_loss("cwd", [s, two[0]], [t, two[1]], 1.5),
                       kd_kl_div(s, t, temperature=1.5, mode="channel")
                       + kd_kl_div(two[0], two[1], temperature=1.5, mode="channel"))
    # the fused op agrees with the transcription too
    assert cwd_loss(s, t, 1.5).item() == pytest.approx(_criterion_cwd(s.detach(), t.detach(), "channel", "kl", 1.5),
                                                       rel=1e-5)
    for norm, div in (("channel", "mse"), ("channel_mean", "mse")):
        s.grad = t.grad = None
        cwd_loss(s, t, 1.0, norm, div).backward()
        assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    with pytest.raises(ValueError, match="CWD normalization"):
        cwd_loss(s, t, 1.0, "spatial")
    with pytest.raises(ValueError, match="'cwd' feature loss only"):
        feature_loss("hcl", [s], [t], cwd_divergence="mse")


def test_cwd_baseline_and_transkd_cwd_use_the_variant(nets):
    images, labels = _data()
    kd = _kd(nets, cls=CWD, norm="channel_mean", divergence="mse", temperature=3.0, weight=0.5)
    out = kd(images, labels)
    s_feats, _, _ = kd.student(images, return_features=True)
    with torch.no_grad():
        t_feats, _ = kd.teacher.backbone(images)
    aligned = kd.aligners[0](s_feats[-1])
    want = 0.5 * _criterion_cwd(aligned.detach(), t_feats[-1], "channel_mean", "mse", 3.0)
    assert out["feature"].item() == pytest.approx(want, rel=1e-5)
    default = _kd(nets, cls=CWD, temperature=3.0, weight=0.5)(images, labels)
    assert default["feature"].item() != pytest.approx(out["feature"].item(), rel=1e-3)
    torch.testing.assert_close(default["ce"], out["ce"])

    tk = _kd(nets, feature_loss="cwd", cwd_divergence="mse")
    out = tk(images, labels)
    fused = tk.csf(s_feats)
    want = sum(_criterion_cwd(f.detach(), t, "channel", "mse", 1.0) for f, t in zip(fused, t_feats))
    assert out["feature"].item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="feature_loss='cwd' only"):
        _kd(nets, cwd_norm="channel_mean")          # TransKD's default feature loss is HCL


# -- 4. the flags reach the distiller, or are refused ---------------------------------------------


def test_distiller_kwargs_from_flags():
    def kw(**c):
        return distiller_kwargs(TrainConfig(**{**TINY, **c}))

    assert kw() == {}
    assert kw(embed_stages="2") == {"embed_stages": "2"}
    assert kw(method="cwd", cwd_norm="channel_mean", cwd_divergence="mse") == {"norm": "channel_mean",
                                                                               "divergence": "mse"}
    assert kw(distill_kwargs={"feature_loss": "cwd"}, cwd_divergence="mse") == {"feature_loss": "cwd",
                                                                                "cwd_divergence": "mse"}
    assert kw(embed_stages="3", distill_kwargs={"embed_stages": 3}) == {"embed_stages": "3"}
    for c, match in ((dict(method="logit_kd", embed_stages="none"), "--embed-stages none: --method logit_kd"),
                     (dict(method="review_kd", cwd_norm="channel_mean"), "channel_mean: --method review_kd has"),
                     (dict(cwd_divergence="mse"), "--method transkd_base is 'hcl'"),
                     (dict(embed_stages="2", distill_kwargs={"embed_stages": "3"}), "conflicts"),
                     (dict(method="cwd", cwd_norm="channel_mean", distill_kwargs={"norm": "channel"}), "conflicts")):
        with pytest.raises(ConfigError, match=match):
            kw(**c)
    with pytest.raises(ConfigError, match="--embed-stages"):
        validate_train_config(TrainConfig(**TINY, embed_stages="5"))
    with pytest.raises(ConfigError, match="--cwd-divergence"):
        validate_train_config(TrainConfig(**TINY, cwd_divergence="js"))


def test_distill_run_with_embed_stages_none(tmp_path):
    res = distill(TrainConfig(output_dir=str(tmp_path / "n"), steps=2, teacher="segformer_b0", embed_stages="none",
                              **TINY))
    assert [r["terms"]["embed"] for r in res.history] == [0.0, 0.0]
    assert all(r["terms"]["feature"] > 0 for r in res.history)
    ckpt = load_checkpoint(res.checkpoint)
    assert not [k for k in ckpt["model"] if k.startswith("pea.")] and any(k.startswith("csf.") for k in ckpt["model"])
    with pytest.raises(ConfigError, match="--embed-stages"):
        distill(TrainConfig(output_dir=str(tmp_path / "n"), steps=2, teacher="segformer_b0", resume="auto", **TINY))
