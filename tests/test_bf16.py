"""bf16 on CPU: inference precision (``transkd_fast.precision``) and CPU autocast(bf16) training.

What is checked:

- logits of SegFormer-B0 (and of the folded head and the lean MixFFN alone) in bf16 against
  fp32, within bf16 tolerance and within 2× the error of PyTorch's own bf16 computation;
- every fast path computes in bf16 when bf16 is asked for: the oneDNN Linear / conv + GELU, the
  folded head, the lean MixFFN, the CPU attention, for a bf16 model, for fp32 weights under
  autocast, and in a training step (forward and backward). A dispatch-mode recorder sees every
  ATen / oneDNN op with its operands' dtypes: a matmul-class op with an fp32 activation operand
  fails the test (weight-only products, the head's fold, are recognised by not depending on the
  batch size);
- the loss ops under autocast take bf16 maps and accumulate in fp32 (autocast's fp32 policy for
  losses);
- ``train --amp bf16`` on CPU (loss falls), ``distill --amp bf16`` (finite losses), and the CLI
  ``evaluate / predict / report --precision bf16``.

Tolerances. bf16 keeps 8 significant bits: one rounding has relative error ≤ 2^-8 ≈ 3.9e-3, about
2.3e-3 RMS. A B0 forward rounds each activation some 30 times on its way to the logits (every
Linear, conv, LayerNorm, residual sum, softmax); errors that add in quadrature give ~1e-2, which
is the bound used for whole-model logits (2e-2: measured 8e-3 here). Single ops (one or two
roundings) get 1e-2. Comparisons of two bf16 computations with each other, or against fp64,
follow design §4: ours within 2× of PyTorch's own bf16 error.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_low_precision_ok, rel_err
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import transkd_fast
from transkd_fast.cli import main
from transkd_fast.engine import TrainConfig, distill, train
from transkd_fast.engine.checkpoint import save_weights
from transkd_fast.models import build_model
from transkd_fast.models.mit import MixFFN
from transkd_fast.models.segformer import SegFormerHead
from transkd_fast.ops import attention, onednn
from transkd_fast.ops.hcl import hcl_loss
from transkd_fast.ops.kl_div import kd_kl_div
from transkd_fast.ops.selective_fusion import selective_fuse, selective_pool
from transkd_fast.ops.weighted_mse import weighted_mse
from transkd_fast.precision import PRECISIONS, inference_context, model_precision, prepare_for_inference

BF16 = torch.bfloat16
ONEDNN_BF16 = onednn.BF16_AVAILABLE  # oneDNN bf16 primitives on this CPU (else ATen's bf16 ops)
TINY = dict(model="segformer_b0", batch_size=2, synthetic_train_size=8, synthetic_val_size=4, synthetic_height=32,
            synthetic_width=64, log_every=1, progress=False, eval_at_end=False, device="cpu", threads=1)


def _b0(classes: int = 7) -> torch.nn.Module:
    """A random B0 whose head has non-trivial BN statistics (the fold folds them)."""
    m = build_model("segformer_b0", num_classes=classes, drop_path_rate=0.0, dropout=0.0).eval()
    with torch.no_grad():
        m.decode_head.linear_fuse.bn.running_var.uniform_(0.5, 2.0)
        m.decode_head.linear_fuse.bn.running_mean.normal_(0.0, 0.3)
    return m


# -- the recorder -------------------------------------------------------------------------------

_MATMUL_WORDS = ("mm", "mv", "matmul", "linear", "conv", "attention", "dot")
# Attention backward reads the forward's row log-sum-exp, fp32 by design (softmax statistics are
# accumulated in fp32): the position of that operand among the floating ones.
_LSE_OPERAND = {"transkd_fast.efficient_attention_backward.default": 5,
                "aten._scaled_dot_product_flash_attention_for_cpu_backward.default": 5}


class _Recorder(TorchDispatchMode):
    """Every dispatched op with the dtypes and shapes of its floating tensor operands."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ts = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        self.ops.append((str(func), tuple(t.dtype for t in ts), tuple(tuple(t.shape) for t in ts)))
        return func(*args, **kwargs)

    def matmuls(self) -> list[tuple[str, tuple, tuple]]:
        return [o for o in self.ops if any(w in o[0].split(".")[1] for w in _MATMUL_WORDS)]

    def fp32_matmuls(self) -> set[tuple[str, tuple]]:
        out = set()
        for name, dts, shapes in self.matmuls():
            lse = _LSE_OPERAND.get(name)
            if any(dt == torch.float32 for i, dt in enumerate(dts) if i != lse):
                out.add((name, shapes))
        return out

    def names(self) -> set[str]:
        return {o[0] for o in self.ops}


def _record(run, batch: int) -> _Recorder:
    rec = _Recorder()
    x = torch.rand(batch, 3, 32, 96)  # stage sizes 8×24, 4×12, 2×6, 1×3: no token count equals a width
    with rec:
        run(x)
    return rec


def _assert_matmuls_bf16(run) -> _Recorder:
    """Run at batch 1 and 2: a matmul-class op with an fp32 operand must be the same in both runs
    (a product of weights only, such as the head's fold), never one that sees activations."""
    one, two = _record(run, 1), _record(run, 2)
    assert one.matmuls() and two.matmuls()
    activation_fp32 = one.fp32_matmuls() ^ two.fp32_matmuls()
    assert not activation_fp32, f"matmuls on fp32 activations: {sorted(activation_fp32)[:4]}"
    for name, dts, _ in two.matmuls():
        assert set(dts) <= {BF16, torch.float32}, (name, dts)
    return two


def test_inference_matmuls_run_in_bf16_prepared_model():
    model = prepare_for_inference(_b0(), "bf16")

    def run(x):
        with inference_context("bf16", "cpu"):
            out = model(x)
        assert out.dtype == torch.float32

    rec = _assert_matmuls_bf16(run)
    names = rec.names()
    if ONEDNN_BF16:
        # every block's Linears with fused residuals, the MixFFN conv + GELU, the head's Linears
        assert {"mkldnn._linear_pointwise.default", "mkldnn._linear_pointwise.binary",
                "mkldnn._convolution_pointwise.default"} <= names
    # CPU bf16 attention without autograd: the chunked bf16 GEMMs without AMX, SDPA's flash
    # kernel (through the custom op) on bf16 operands with AMX (attention.BF16_CHUNKED)
    flash = [dts for n, dts, _ in rec.ops if "flash_attention" in n or n.startswith("transkd_fast.efficient_attention")]
    if attention.BF16_CHUNKED:
        assert not flash
        assert any(n == "aten.softmax.int" and dts == (BF16,) for n, dts, _ in rec.ops)
    else:
        assert flash and all(set(dts) == {BF16} for dts in flash), flash


def test_inference_matmuls_run_in_bf16_under_autocast_fp32_weights():
    model = _b0()

    def run(x):
        with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
            model(x)

    rec = _assert_matmuls_bf16(run)
    if ONEDNN_BF16:  # the fast paths cast as autocast does instead of stepping aside
        assert {"mkldnn._linear_pointwise.binary", "mkldnn._convolution_pointwise.default"} <= rec.names()


def test_training_step_matmuls_run_in_bf16_under_autocast():
    model = _b0().train()

    def run(x):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=BF16):
            logits = model(x)
        logits.float().square().mean().backward()

    rec = _assert_matmuls_bf16(run)
    names = rec.names()
    assert "transkd_fast.efficient_attention.default" in names  # saves the LSE for backward
    assert any("backward" in n for n in names)  # the recorder saw the backward pass too
    if ONEDNN_BF16:  # _Linear and the lean MixFFN's forward
        assert "mkldnn._linear_pointwise.default" in names
    w = model.backbone.block1[0].mlp.fc1.weight
    assert w.grad is not None and w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


# -- logits in bf16 vs fp32 ---------------------------------------------------------------------


def test_b0_logits_bf16_within_tolerance_of_fp32():
    model = _b0()
    x = torch.rand(2, 3, 32, 96)  # the recorder tests' size: oneDNN's primitives are built once
    with torch.no_grad():
        ref = model(x)
        with transkd_fast.use_backend("reference"):  # PyTorch's own bf16: plain ATen ops, eager attention
            theirs = copy.deepcopy(model).to(BF16)(x.to(BF16)).float()
    prepared = prepare_for_inference(copy.deepcopy(model), "bf16")
    with inference_context("bf16", "cpu"):
        ours = prepared(x)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert rel_err(ours, ref) <= 2e-2  # ~30 bf16 roundings in quadrature (module doc); measured 8e-3
    assert_low_precision_ok(ours, theirs, ref, "B0 logits")
    # fp32 weights under autocast (evaluate --amp bf16): the same bound
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        auto = model(x).float()
    assert rel_err(auto, ref) <= 2e-2
    assert_low_precision_ok(auto, theirs, ref, "B0 logits, autocast")


def test_folded_head_bf16():
    torch.manual_seed(1)
    head = SegFormerHead([32, 64, 160, 256], 256, 7, dropout=0.0).eval()
    with torch.no_grad():
        head.linear_fuse.bn.running_var.uniform_(0.5, 2.0)
        head.linear_fuse.bn.running_mean.normal_(0.0, 0.3)
    feats = [torch.randn(2, c, 16 // 2**i, 24 // 2**i).contiguous(memory_format=torch.channels_last)
             for i, c in enumerate((32, 64, 160, 256))]
    with torch.no_grad():
        head.fold = False
        ref = head(feats)
    unfolded = prepare_for_inference(copy.deepcopy(head), "bf16")
    folded = prepare_for_inference(copy.deepcopy(head), "bf16")
    folded.fold = True
    from transkd_fast.models import segformer

    tiled, real = [], segformer.SegFormerHead._tiled_logits
    segformer.SegFormerHead._tiled_logits = lambda self, fs: tiled.append(1) or real(self, fs)
    try:
        with inference_context("bf16", "cpu"):
            u, f = unfolded(feats), folded(feats)
    finally:
        segformer.SegFormerHead._tiled_logits = real
    assert tiled == [1] or not onednn.BF16_AVAILABLE  # the tiled inference head, bf16 matmuls
    assert f.dtype == torch.float32
    assert rel_err(f, ref) <= 1e-2  # a few roundings: features, composed weights, sums
    # the fold (composed in fp32, rounded once) is no worse than the unfolded bf16 head
    assert_low_precision_ok(f, u, ref, "folded head")


def test_lean_mixffn_under_autocast_runs_in_bf16():
    torch.manual_seed(2)
    m = MixFFN(32, 128).train()
    plain = copy.deepcopy(m)
    x = torch.randn(2, 6 * 10, 32, requires_grad=True)
    g = torch.randn(2, 60, 32)
    with torch.autocast("cpu", dtype=BF16):
        out = m(x, 6, 10)
        # the plain modules under autocast: PyTorch's own bf16 for this block
        ref16 = plain.fc2(F.gelu(plain.dwconv(plain.fc1(x), 6, 10)))
    assert "LeanMixFFN" in type(out.grad_fn).__name__ and out.dtype == BF16 and ref16.dtype == BF16
    ref32 = plain.fc2(F.gelu(plain.dwconv(plain.fc1(x), 6, 10)))
    grads = torch.autograd.grad(out, [x, *m.parameters()], g)
    grads16 = torch.autograd.grad(ref16, [x, *plain.parameters()], g)
    grads32 = torch.autograd.grad(ref32, [x, *plain.parameters()], g)
    assert_low_precision_ok(out, ref16, ref32, "lean MixFFN output")
    assert rel_err(out, ref32) <= 1e-2
    for a, b16, b32 in zip(grads, grads16, grads32):
        assert a.dtype == torch.float32  # fp32 leaves: autograd casts the bf16 gradients back
        assert_low_precision_ok(a, b16, b32, "lean MixFFN grad")


# -- single fast paths --------------------------------------------------------------------------


def test_onednn_linear_bf16_and_autocast():
    x, w, b, r = torch.randn(3, 40, 24), torch.randn(48, 24) * 0.2, torch.randn(48), torch.randn(3, 40, 48)
    ref = F.linear(x.double(), w.double(), b.double()) + r.double()
    theirs = F.linear(x.to(BF16), w.to(BF16), b.to(BF16)) + r.to(BF16)
    with torch.no_grad():
        ours = onednn.linear(x.to(BF16), w.to(BF16), b.to(BF16), r.to(BF16))  # a bf16 model's tensors
        with torch.autocast("cpu", dtype=BF16):
            auto = onednn.linear(x, w, b, r)  # fp32 tensors, autocast: cast as autocast casts F.linear's
    for out in (ours, auto):
        assert out.dtype == BF16 and out.shape == (3, 40, 48)
        assert_low_precision_ok(out, theirs, ref, "linear")
    # autograd under autocast: bf16 forward, fp32 gradients for fp32 leaves, as through F.linear
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    g = torch.randn(3, 40, 48)
    with torch.autocast("cpu", dtype=BF16):
        out = onednn.linear(*leaves)
        plain = F.linear(*leaves)
    assert out.dtype == plain.dtype == BF16
    ours_g = torch.autograd.grad(out, leaves, g)
    plain_g = torch.autograd.grad(plain, leaves, g)
    ref_g = torch.autograd.grad(F.linear(*leaves), leaves, g)
    for a, p, rg in zip(ours_g, plain_g, ref_g):
        assert a.dtype == torch.float32
        assert_low_precision_ok(a, p, rg, "linear grad")
    # autocast with another dtype: ATen's ops, which pick their own dtypes
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        assert onednn.compute_dtype(x) is None


def test_onednn_dwconv_gelu_bf16():
    C = 24
    x = torch.randn(2, C, 9, 13).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(C, 1, 3, 3) * 0.4, torch.randn(C) * 0.1
    ref = F.gelu(F.conv2d(x.double(), w.double(), b.double(), 1, 1, 1, C))
    theirs = F.gelu(F.conv2d(x.to(BF16), w.to(BF16), b.to(BF16), 1, 1, 1, C))
    rec = _Recorder()
    with torch.no_grad(), rec:
        ours = onednn.dwconv_gelu(x.to(BF16), w.to(BF16), b.to(BF16))
        with torch.autocast("cpu", dtype=BF16):
            auto = onednn.dwconv_gelu(x, w, b)
    for out in (ours, auto):
        assert out.dtype == BF16 and out.is_contiguous(memory_format=torch.channels_last)
        assert_low_precision_ok(out, theirs, ref, "dwconv_gelu")
    if ONEDNN_BF16:
        convs = [o for o in rec.ops if o[0] == "mkldnn._convolution_pointwise.default"]
        assert len(convs) == 2 and all(set(dts) == {BF16} for _, dts, _ in convs)


@pytest.mark.parametrize("B,Nq,Nkv,H,D", [(1, 300, 37, 1, 32), (2, 130, 64, 3, 16), (1, 64, 5, 2, 8)])
def test_cpu_bf16_attention(B, Nq, Nkv, H, D, monkeypatch):
    monkeypatch.setattr(attention, "_BF16_CHUNK_SCORES", 64 * 37)  # several chunks and a remainder
    C = H * D
    x = torch.randn(B, Nq, C).to(BF16)
    kv = torch.randn(B, Nkv, 2 * C).to(BF16)
    q, kv5 = x.view(B, Nq, H, D), kv.view(B, Nkv, 2, H, D)  # strided views, as MiT passes them
    k, v = kv5[:, :, 0], kv5[:, :, 1]
    scale = D ** -0.5
    ref = attention.efficient_attention_reference(q.double(), k.double(), v.double(), scale)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    theirs = (torch.softmax(qt @ kt.transpose(-1, -2) * scale, -1) @ vt).transpose(1, 2)  # eager bf16
    rec = _Recorder()
    with torch.no_grad(), rec:
        ours = attention.efficient_attention(q, k, v, scale)
    assert ours.dtype == BF16 and ours.is_contiguous() and ours.shape == (B, Nq, H, D)
    assert_low_precision_ok(ours, theirs, ref, "bf16 attention")
    assert not any("flash" in n for n in rec.names())
    assert all(set(dts) == {BF16} for _, dts, _ in rec.matmuls())
    # a query row of NaN gives NaN, as the reference
    q2 = q.clone()
    q2[0, 3] = float("nan")
    with torch.no_grad():
        out = attention.efficient_attention(q2, k, v, scale)
    assert torch.isnan(out[0, 3]).all() and torch.isfinite(out[0, 4]).all()
    # with autograd: the custom op (SDPA's flash kernels, forward and backward) in bf16
    qg = q.detach().clone().requires_grad_()
    rec = _Recorder()
    with rec:
        out = attention.efficient_attention(qg, k, v, scale)
        out.float().sum().backward()
    assert "transkd_fast.efficient_attention.default" in rec.names()
    assert qg.grad.dtype == BF16 and torch.isfinite(qg.grad).all()
    assert rel_err(out, ref) <= 1e-2


def test_loss_ops_under_autocast_accumulate_in_fp32():
    # Autocast runs losses (mse_loss, kl_div, ...) in fp32; the fused ops take the bf16 maps as they
    # come and accumulate in fp32: the same values as the fp32 op on the (exactly) upcast maps.
    fs = [torch.randn(2, 8, 12, 16).to(BF16), torch.randn(2, 8, 6, 8).to(BF16)]
    ft = [torch.randn_like(f) for f in fs]
    e_s, e_t = [torch.randn(2, 30, 16).to(BF16)], [torch.randn(2, 30, 16).to(BF16)]
    with torch.autocast("cpu", dtype=BF16):
        losses = {"hcl": hcl_loss(fs, ft), "kl": kd_kl_div(fs[0], ft[0], 2.0),
                  "cwd": kd_kl_div(fs[0], ft[0], 1.0, mode="channel"), "mse": weighted_mse(e_s, e_t, [0.5])}
    up = lambda ts: [t.float() for t in ts]  # noqa: E731
    refs = {"hcl": hcl_loss(up(fs), up(ft)), "kl": kd_kl_div(fs[0].float(), ft[0].float(), 2.0),
            "cwd": kd_kl_div(fs[0].float(), ft[0].float(), 1.0, mode="channel"),
            "mse": weighted_mse(up(e_s), up(e_t), [0.5])}
    for k, v in losses.items():
        assert v.dtype == torch.float32 and v.dim() == 0, k
        assert rel_err(v, refs[k]) <= 1e-5, k
    # CSF's selective fusion returns x's dtype: bf16 maps stay bf16 (one rounding of the result)
    x, y, a = torch.randn(2, 8, 12, 16).to(BF16), torch.randn(2, 8, 6, 8).to(BF16), torch.rand(2, 2, 8)
    with torch.autocast("cpu", dtype=BF16):
        pooled, fused = selective_pool(x, y), selective_fuse(x, y, a)
    assert pooled.dtype == fused.dtype == BF16
    assert rel_err(pooled, selective_pool(x.float(), y.float())) <= 1e-2
    assert rel_err(fused, selective_fuse(x.float(), y.float(), a)) <= 1e-2


# -- prepare_for_inference ----------------------------------------------------------------------


def test_prepare_for_inference_round_trip():
    model = _b0()
    x = torch.rand(1, 3, 32, 96)
    assert PRECISIONS == ("fp32", "bf16")
    prepare_for_inference(model, "bf16")
    prepare_for_inference(model, "bf16")  # hooks replaced, not stacked
    assert model_precision(model) == "bf16" and not model.training
    assert len(model._forward_hooks) == 1 and len(model._forward_pre_hooks) == 1
    sd = model.state_dict()
    assert all(v.dtype == BF16 for k, v in sd.items() if v.is_floating_point())
    assert sd["decode_head.linear_fuse.bn.num_batches_tracked"].dtype == torch.int64
    with torch.no_grad():  # outside inference_context too: fp32 in, fp32 out
        feats, logits, embeds = model(x, return_features=True)
    assert all(t.dtype == torch.float32 for t in [*feats, logits, *embeds])
    prepare_for_inference(model, "fp32")
    assert model_precision(model) == "fp32" and not model._forward_hooks and not model._forward_pre_hooks
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="--precision"):
        prepare_for_inference(model, "fp16")
    with pytest.raises(ValueError, match="--precision"):
        with inference_context("int8", "cpu"):
            pass


# -- engine and CLI -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """``train --amp bf16`` on CPU: the tiny synthetic config, 30 steps."""
    out = tmp_path_factory.mktemp("bf16") / "train"
    res = train(TrainConfig(output_dir=str(out), steps=30, lr=1e-3, amp="bf16", drop_path_rate=0.0, **TINY))
    return res


def test_train_amp_bf16_on_cpu_loss_falls(bf16_run):
    losses = [r["terms"]["loss"] for r in bf16_run.history]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    header = json.loads(open(os.path.join(bf16_run.output_dir, "metrics.jsonl")).readline())
    assert header["event"] == "run" and header["dtype"] == "bfloat16 autocast, float32 weights"


def test_distill_amp_bf16_on_cpu_finite(tmp_path):
    torch.manual_seed(3)
    teacher = build_model("segformer_b0", num_classes=10, drop_path_rate=0.0, dropout=0.0)
    path = tmp_path / "teacher.pt"
    save_weights(teacher, str(path), meta={"model": "segformer_b0", "num_outputs": 10, "num_classes": 9,
                                           "void": "class"})
    res = distill(TrainConfig(output_dir=str(tmp_path / "kd"), teacher="segformer_b0", teacher_weights=str(path),
                              steps=2, amp="bf16", **TINY))
    assert len(res.history) == 2
    for rec in res.history:
        assert set(rec["terms"]) >= {"loss", "ce"} and len(rec["terms"]) > 2
        assert all(np.isfinite(v) for v in rec["terms"].values()), rec


def test_cli_evaluate_precision_bf16(bf16_run, tmp_path, capsys):
    common = ["evaluate", "--weights", bf16_run.weights, "--synthetic-val-size", "4", "--synthetic-height", "32",
              "--synthetic-width", "64", "--no-progress", "--threads", "1", "--device", "cpu", "--num-vis", "0",
              "--resolution", "quarter"]
    assert main(common + ["--precision", "bf16", "--output-dir", str(tmp_path / "b")]) == 0
    assert "dtype bfloat16 weights and activations" in capsys.readouterr().out
    assert main(common + ["--output-dir", str(tmp_path / "f")]) == 0
    b = json.loads((tmp_path / "b" / "eval.json").read_text())["results"]["quarter"]
    f = json.loads((tmp_path / "f" / "eval.json").read_text())["results"]["quarter"]
    assert b["pixels"] == f["pixels"] and 0.0 <= b["miou"] <= 1.0
    # bf16 flips the argmax only where the top two logits are within ~1e-2 of each other
    assert abs(b["pixel_acc"] - f["pixel_acc"]) <= 0.05
    assert main(common + ["--precision", "fp16"]) == 2
    assert "--precision" in capsys.readouterr().err
    assert main(common + ["--precision", "bf16", "--amp", "fp16"]) == 2


def test_cli_predict_precision_bf16(bf16_run, tmp_path):
    rng = np.random.default_rng(0)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(2):
        small = rng.integers(0, 256, (5, 9, 3), dtype=np.uint8)
        Image.fromarray(small).resize((72, 40), Image.BILINEAR).save(imgs / f"im{i}.png")
    ids = {}
    for p in ("fp32", "bf16"):
        assert main(["predict", str(imgs), "--weights", bf16_run.weights, "--output-dir", str(tmp_path / p),
                     "--outputs", "ids", "--precision", p, "--no-progress", "--threads", "1", "--device", "cpu"]) == 0
        ids[p] = np.stack([np.asarray(Image.open(tmp_path / p / f"im{i}_ids.png")) for i in range(2)])
    assert ids["bf16"].shape == (2, 40, 72)
    assert (ids["bf16"] == ids["fp32"]).mean() >= 0.9  # flips only at near-ties (see evaluate)


def test_cli_report_precision_bf16(capsys):
    assert main(["report", "--model", "segformer_b0", "--input", "32", "64", "--precision", "bf16",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "precision         bf16" in out and "images/s" in out


def test_bf16_without_bf16_kernels_warns_once(monkeypatch):
    """On a CPU for which oneDNN has no bf16 primitives, asking for bf16 (prepare_for_inference,
    inference_context, --amp bf16) warns once per process that it is correct but slow; where it
    has them, and on other devices, nothing is said."""
    import warnings

    from transkd_fast import precision
    from transkd_fast.engine.trainer import autocast_context

    monkeypatch.setattr(precision, "_warned_slow_bf16", False)
    monkeypatch.setattr(onednn, "BF16_AVAILABLE", True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.warn_if_bf16_is_slow("cpu") is False
        with inference_context("bf16", "cpu"):
            pass
    monkeypatch.setattr(onednn, "BF16_AVAILABLE", False)
    assert precision.warn_if_bf16_is_slow("meta") is False
    with pytest.warns(RuntimeWarning, match="without bf16 kernels.*Use fp32"):
        prepare_for_inference(torch.nn.Linear(3, 2), "bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        with inference_context("bf16", "cpu"):
            pass
        with autocast_context("bf16", torch.device("cpu")):
            pass
    monkeypatch.setattr(precision, "_warned_slow_bf16", False)
    with pytest.warns(RuntimeWarning, match="without bf16 kernels"):
        autocast_context("bf16", torch.device("cpu"))
