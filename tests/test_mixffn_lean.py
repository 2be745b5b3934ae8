"""The memory-lean MixFFN training path (``_LeanMixFFN``) against the plain modules.

Same outputs and the same gradients (input and every parameter) to float rounding, in train
mode with grad; the plain path everywhere else (eval, no-grad, reference backend, tracing).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import rel_err

import transkd_fast
from transkd_fast.models import mit as mit_mod
from transkd_fast.models.mit import MixFFN
from transkd_fast.ops import onednn as onednn_mod


def _plain(m, x, H, W):
    return m.fc2(torch.nn.functional.gelu(m.dwconv(m.fc1(x), H, W)))


def _grads(m, x, out, gout):
    params = [m.fc1.weight, m.fc1.bias, m.dwconv.dwconv.weight, m.dwconv.dwconv.bias, m.fc2.weight, m.fc2.bias]
    return torch.autograd.grad(out, [x] + params, gout)


@pytest.mark.parametrize("onednn", [False, True])
@pytest.mark.parametrize("B,H,W,C,hidden",
                         [(2, 7, 5, 12, 40), (1, 1, 1, 3, 5), (3, 9, 13, 8, 33), (2, 16, 32, 32, 128)])
def test_lean_matches_plain_fp32(B, H, W, C, hidden, onednn, monkeypatch):
    if onednn and not onednn_mod.AVAILABLE:
        pytest.skip("this PyTorch build has no oneDNN pointwise ops")
    monkeypatch.setattr(onednn_mod, "AVAILABLE", onednn)
    torch.manual_seed(H * 100 + W)
    m = MixFFN(C, hidden).train()
    for p in m.parameters():  # default inits leave biases small but nonzero; make every term count
        torch.nn.init.normal_(p, 0.0, 0.3)
    x = torch.randn(B, H * W, C, requires_grad=True)
    gout = torch.randn(B, H * W, C)
    assert m._lean(x)
    lean_fn_calls = []
    orig = mit_mod._LeanMixFFN.apply
    mit_mod._LeanMixFFN.apply = lambda *a: (lean_fn_calls.append(1), orig(*a))[1]
    try:
        out = m(x, H, W)
    finally:
        mit_mod._LeanMixFFN.apply = orig
    assert lean_fn_calls == [1]
    ref = _plain(m, x, H, W)
    if onednn:  # oneDNN's matmuls and fused conv + GELU: the same values up to rounding
        assert rel_err(out, ref) <= 1e-6
    else:  # same ops on the same layouts: bit-identical forward
        assert torch.equal(out, ref)
    for name, g, r in zip(["x", "fc1.w", "fc1.b", "dw.w", "dw.b", "fc2.w", "fc2.b"],
                          _grads(m, x, out, gout), _grads(m, x, ref, gout)):
        assert rel_err(g, r) <= 1e-6, name


def test_lean_gradcheck_float64():
    torch.manual_seed(0)
    m = MixFFN(3, 7).double().train()
    x = torch.randn(2, 4 * 3, 3, dtype=torch.float64, requires_grad=True)
    params = [m.fc1.weight, m.fc1.bias, m.dwconv.dwconv.weight, m.dwconv.dwconv.bias, m.fc2.weight, m.fc2.bias]
    fn = lambda x, *p: mit_mod._LeanMixFFN.apply(x, *p, 4, 3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, *params))


def test_lean_saves_only_the_input():
    torch.manual_seed(1)
    m = MixFFN(8, 32).train()
    x = torch.randn(2, 6 * 5, 8, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x, 6, 5)
    big = [t for t in saved if t.numel() >= x.numel() and t.shape[-1] == 32]
    assert big == [], [tuple(t.shape) for t in big]
    assert any(t is x for t in saved)


def test_partial_grads_and_frozen_params():
    torch.manual_seed(2)
    m = MixFFN(6, 20).train()
    ref_m = copy.deepcopy(m)
    m.fc1.requires_grad_(False)
    ref_m.fc1.requires_grad_(False)
    x = torch.randn(2, 15, 6)  # no grad for x
    out = m(x, 3, 5)
    out.square().sum().backward()
    _plain(ref_m, x, 3, 5).square().sum().backward()
    assert m.fc1.weight.grad is None
    for (n, p), q in zip(m.named_parameters(), ref_m.parameters()):
        if p.requires_grad:
            assert rel_err(p.grad, q.grad) <= 1e-6, n


@pytest.mark.parametrize("case", ["eval", "no_grad", "reference"])
def test_plain_path_elsewhere(case):
    m = MixFFN(4, 8).train()
    x = torch.randn(1, 6, 4, requires_grad=True)
    if case == "eval":
        m.eval()
        assert not m._lean(x)
    elif case == "no_grad":
        with torch.no_grad():
            assert not m._lean(x)
    else:
        with transkd_fast.use_backend("reference"):
            assert not m._lean(x)
    assert m._lean(x) is (case != "eval")


def test_block_train_step_matches_plain():
    """A whole Block (residual added in place into the MixFFN output): lean path vs plain path."""
    from transkd_fast.models.mit import Block

    torch.manual_seed(3)
    blk = Block(16, 2, 4, 2).train()
    ref = copy.deepcopy(blk)
    x = torch.randn(2, 6 * 10, 16, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    ref.mlp._lean = lambda x: False
    out = blk(x, 6, 10)
    out_ref = ref(xr, 6, 10)
    gout = torch.randn_like(out)
    out.backward(gout)
    out_ref.backward(gout)
    assert rel_err(out, out_ref) <= 1e-6
    assert rel_err(x.grad, xr.grad) <= 1e-6
    for (n, p), q in zip(blk.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-6, n


def test_no_grad_path_bit_identical():
    """Without autograd GELU runs in place on the conv output: the very same values."""
    torch.manual_seed(4)
    m = MixFFN(10, 24).eval()
    x = torch.randn(2, 5 * 7, 10)
    with torch.no_grad():
        out = m(x, 5, 7)
        ref = _plain(m, x, 5, 7)
    assert torch.equal(out, ref)
