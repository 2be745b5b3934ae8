"""CSF built from the fused selective-fusion ops against an unfused module written from design §2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel
from torch import nn

from transkd_fast.distill.csf import CSF

STUDENT = [32, 64, 160, 256]   # MiT-B0
TEACHER = [64, 128, 320, 512]  # MiT-B2
# Stage sizes of a 64×128 input, and odd sizes where the upsampling ratio is not 2 (15×31 from 8×16).
SIZES = {
    "64x128": [(16, 32), (8, 16), (4, 8), (2, 4)],
    "odd": [(15, 31), (8, 16), (3, 5), (2, 3)],
}


class UnfusedStage(nn.Module):
    """Design §2 verbatim: the upsampled map and the [B, 2, mid, H, W] stacks are materialized."""

    def __init__(self, cin: int, mid: int, cout: int, fuse: bool):
        super().__init__()
        L = max(mid // 16, 32)
        self.fuse = fuse
        self.conv1 = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.conv2 = nn.Sequential(nn.Conv2d(mid, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))
        if fuse:
            self.fc = nn.Sequential(nn.Conv2d(mid, L, 1, bias=False), nn.BatchNorm2d(L), nn.ReLU())
            self.fc1 = nn.Sequential(nn.Conv2d(mid, L, 1, bias=False), nn.ReLU())
            self.fcs = nn.ModuleList([nn.Conv2d(L, mid, 1), nn.Conv2d(L, mid, 1)])

    def forward(self, feat, res_low=None):
        x = self.conv1(feat)
        if self.fuse:
            y = F.interpolate(res_low, size=x.shape[-2:], mode="nearest")
            u = torch.stack([x, y], dim=1)                                   # [B, 2, mid, H, W]
            g = u.sum(dim=1).mean(dim=(2, 3), keepdim=True)                  # [B, mid, 1, 1]
            z = self.fc1(g) if x.shape[0] == 1 else self.fc(g)
            a = torch.stack([fc(z) for fc in self.fcs], dim=1).softmax(dim=1)  # [B, 2, mid, 1, 1]
            x = (u * a).sum(dim=1)
        return self.conv2(x), x


class UnfusedCSF(nn.Module):
    def __init__(self, cs, ct, mid=64):
        super().__init__()
        self.stages = nn.ModuleList(UnfusedStage(a, mid, b, i < len(cs) - 1) for i, (a, b) in enumerate(zip(cs, ct)))

    def forward(self, feats):
        outs, res = [None] * len(feats), None
        for i in reversed(range(len(feats))):
            outs[i], res = self.stages[i](feats[i], res)
        return outs


def _randomize_bn_(module):
    """Random BN affine parameters and running statistics.

    At init (γ = 1, β = 0) a batch-1 BN output has per-channel spatial mean exactly 0, so the
    pooled vector g is pure rounding noise and the ReLU mask of the squeeze MLP (hence every
    gradient through it) is decided by noise: no two correct implementations agree there.
    """
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)


def _feats(batch, sizes, requires_grad=True, dtype=torch.float32):
    return [torch.randn(batch, c, h, w, dtype=dtype, requires_grad=requires_grad)
            for c, (h, w) in zip(STUDENT, sizes)]


def _run(module, feats, weights):
    """Outputs, input gradients and parameter gradients (None where unused) of Σ ⟨out_i, w_i⟩."""
    feats = [f.detach().clone().requires_grad_(True) for f in feats]
    module.zero_grad(set_to_none=True)
    outs = module(feats)
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    grads = {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in module.named_parameters()}
    bufs = {n: b.detach().clone() for n, b in module.named_buffers() if b.is_floating_point()}
    return [o.detach() for o in outs], [f.grad for f in feats], grads, bufs


def _pair(batch, sizes):
    fused = CSF(STUDENT, TEACHER)
    _randomize_bn_(fused)
    unfused = UnfusedCSF(STUDENT, TEACHER)
    keys = unfused.load_state_dict(fused.state_dict(), strict=True)
    assert not keys.missing_keys and not keys.unexpected_keys
    fused.train()
    unfused.train()
    feats = _feats(batch, SIZES[sizes], dtype=torch.float64)
    shapes = [(batch, c, h, w) for c, (h, w) in zip(TEACHER, SIZES[sizes])]
    weights = [torch.randn(s, dtype=torch.float64) for s in shapes]
    return fused, unfused, feats, weights, shapes


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _compare(got, ref, batch, tol, what):
    outs, dfeats, grads, bufs = got
    outs_r, dfeats_r, grads_r, bufs_r = ref
    for i in range(len(outs)):
        assert_close_rel(outs[i], outs_r[i], tol, f"{what} stage {i + 1} output")
        assert_close_rel(dfeats[i], dfeats_r[i], tol, f"{what} stage {i + 1} input grad")
    assert grads.keys() == grads_r.keys()
    compared = 0
    for name, g in grads.items():
        # The squeeze MLP not taken at this batch size (fc at B=1, fc1 at B>1) gets no gradient.
        if (".fc." in name and batch == 1) or (".fc1." in name and batch > 1):
            assert g is None and grads_r[name] is None, name
            continue
        assert g is not None and grads_r[name] is not None, name
        assert_close_rel(g, grads_r[name], tol, f"{what} grad {name}")
        compared += 1
    # Every parameter but the unused squeeze MLP of the 3 fusing stages (fc: conv + BN affine; fc1: conv).
    assert compared == len(grads) - (9 if batch == 1 else 3)
    for name, b in bufs.items():  # running statistics follow the same batch statistics
        assert_close_rel(b, bufs_r[name], tol, f"{what} buffer {name}")


@pytest.mark.parametrize("sizes", list(SIZES), ids=list(SIZES))
@pytest.mark.parametrize("batch", [1, 2])
def test_csf_fused_matches_unfused(batch, sizes):
    """Same weights, same inputs: outputs, input and parameter gradients, BN running statistics.

    float64, training mode (batch statistics): the two agree to rounding, so the math is the same.
    float32 to 1e-5 in evaluation mode. In training mode at batch 2 the squeeze MLP's BatchNorm
    normalizes 2 values per channel, which amplifies rounding by 1 / |z_1 − z_2|: measured fp32
    gradient errors against float64 are 1e-5…2e-3 for the unfused module and the reference backend
    alike, so fp32 agreement there measures conditioning, not the implementation.
    """
    fused, unfused, feats, weights, shapes = _pair(batch, sizes)
    state_f, state_u = _snapshot(fused), _snapshot(unfused)
    fused.double()
    unfused.double()
    got, ref = _run(fused, feats, weights), _run(unfused, feats, weights)
    assert [tuple(o.shape) for o in got[0]] == shapes
    _compare(got, ref, batch, 1e-10, "fp64 train")

    unfused.load_state_dict(state_u)
    unfused.eval()
    ref = _run(unfused, feats, weights)  # float64, evaluation mode
    fused.float().load_state_dict(state_f)
    fused.eval()
    got32 = _run(fused, [f.float() for f in feats], [w.float() for w in weights])
    _compare(got32, ref, batch, 1e-5, "fp32 eval")


def test_csf_eval_mode_matches_unfused():
    fused, unfused = CSF(STUDENT, TEACHER), UnfusedCSF(STUDENT, TEACHER)
    _randomize_bn_(fused)  # eval-mode BN then is not the identity
    unfused.load_state_dict(fused.state_dict())
    fused.eval()
    unfused.eval()
    feats = _feats(3, SIZES["odd"], requires_grad=False)
    for o, ou in zip(fused(feats), unfused(feats)):
        assert_close_rel(o, ou, 1e-5, "eval output")


def test_csf_initialization_and_sizes():
    csf = CSF(STUDENT, TEACHER)
    # Deepest stage does not fuse; squeeze width L = max(64 // 16, 32) = 32.
    assert [s.fuse for s in csf.stages] == [True, True, True, False]
    st = csf.stages[0]
    assert st.fc[0].weight.shape == (32, 64, 1, 1) and st.fc1[0].weight.shape == (32, 64, 1, 1)
    assert st.fcs[0].weight.shape == (64, 32, 1, 1) and st.fcs[0].bias is not None
    assert not hasattr(csf.stages[3], "fc")
    # kaiming_uniform_(a=1): U(±sqrt(3 / fan_in)) (gain sqrt(2 / (1 + a²)) = 1).
    for s in csf.stages:
        w = s.conv2[0].weight
        bound = (3.0 / w[0].numel()) ** 0.5
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    n = sum(p.numel() for p in csf.parameters())
    assert n == 650304  # B0 → B2: conv1+BN 33280, conv2+BN 591872, 3 × squeeze/excite 8384


def test_csf_bad_input():
    csf = CSF(STUDENT, TEACHER)
    with pytest.raises(ValueError, match="expects 4 stage maps"):
        csf(_feats(1, SIZES["64x128"])[:3])
    with pytest.raises(ValueError, match="student has 4 stages, teacher 3"):
        CSF(STUDENT, TEACHER[:3])


@pytest.mark.parametrize("batch", [1, 2])
def test_squeeze_mlp_hooks_fire(batch):
    """The squeeze MLP's 1×1 convs run as matmuls; with a hook registered they are called as
    modules: the hooks fire and, in float64 training mode, everything matches the hook-free run."""
    fused, _, feats, weights, _ = _pair(batch, "odd")
    fused.double()
    state = _snapshot(fused)
    plain = _run(fused, feats, weights)
    fused.load_state_dict(state)  # the same running statistics before the second run
    stage = fused.stages[0]
    fired = []
    squeeze = stage.fc1[0] if batch == 1 else stage.fc[0]
    handles = [m.register_forward_hook(lambda mod, i, o, name=name: fired.append(name))
               for name, m in (("squeeze", squeeze), ("fcs0", stage.fcs[0]), ("fcs1", stage.fcs[1]))]
    try:
        hooked = _run(fused, feats, weights)
    finally:
        for h in handles:
            h.remove()
    assert sorted(fired) == ["fcs0", "fcs1", "squeeze"]
    _compare(hooked, plain, batch, 1e-10, "hooked vs plain")
