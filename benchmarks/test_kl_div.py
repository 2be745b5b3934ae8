"""Benchmark of kd_kl_div (forward + backward) at the TransKD shapes, B2 → B0, 512×1024, batch 2.

Logits [2, 20, 128, 256] in both modes (per-pixel KD and CWD), and CWD (``channel``) on
the four stage feature maps, each contiguous and channels_last (the models' layout).
Reference, torch and (on CUDA) triton run in one session; ``extra_info`` records shapes,
layout, dtype, device, modeled FLOPs and modeled bytes moved:

- reference / torch: the sum over every ATen op they run (forward and backward) of the
  bytes of its tensor inputs and outputs, views excluded (counted with a dispatch mode);
- triton: its kernels' reads and writes: forward reads s and t and writes d = p_s − p_t
  (channel mode reads s and t twice: statistics, then log-probabilities), backward reads d
  and writes the gradient; the fused ops' inputs + outputs alone are 5 × the student's bytes.

Run: ``pytest benchmarks/test_kl_div.py --benchmark-only``. The interpreter is not a
benchmark: triton runs only on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from transkd_fast.backend import BackendError, resolve
from transkd_fast.ops import kl_div as kl_ops
from transkd_fast.ops.kl_div import kd_kl_div

TEMPERATURE = 4.0
CASES = [
    ("logits", "spatial", (2, 20, 128, 256)),
    ("logits", "channel", (2, 20, 128, 256)),
    ("stage1", "channel", (2, 64, 128, 256)),
    ("stage2", "channel", (2, 128, 64, 128)),
    ("stage3", "channel", (2, 320, 32, 64)),
    ("stage4", "channel", (2, 512, 16, 32)),
]
BACKENDS = ("reference", "torch", "triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.bfloat16) if DEVICE.type == "cuda" else (torch.float32,)


class _ByteCounter(TorchDispatchMode):
    """Bytes of the tensor inputs and outputs of every non-view op dispatched."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            leaves = tree_flatten((args, kwargs or {}, out))[0]
            self.bytes += sum(x.numel() * x.element_size() for x in leaves if isinstance(x, torch.Tensor))
            self.ops += 1
        return out


LAYOUTS = ("contiguous", "channels_last")  # the models give channels_last maps


def _inputs(shape, dtype, layout="contiguous"):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    s = (torch.randn(shape, device=DEVICE) * 3).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    t = (torch.randn(shape, device=DEVICE) * 3).to(dtype).contiguous(memory_format=fmt)
    return s, t


def _step(s, t, mode, backend):
    s.grad = None
    kd_kl_div(s, t, TEMPERATURE, mode, backend=backend).backward()


def _modeled_bytes(s, t, mode, backend) -> int:
    x = s.numel() * s.element_size()
    if backend == "triton":
        return (7 if mode == "channel" else 5) * x
    counter = _ByteCounter()
    if backend == "reference":
        with counter:
            _step(s, t, mode, backend)
        return counter.bytes
    # torch: the dispatch mode would see one custom op; count the ATen ops inside it.
    with counter, torch.no_grad():
        kl, d = kl_ops._torch_forward(s, t, TEMPERATURE, mode, True)
        d = d.view(s.shape)
        if d.dtype != s.dtype or d.stride() != s.stride():
            d = torch.empty_like(s).copy_(d)
        kl_ops._torch_backward(d, torch.ones((), device=s.device), 1.0)
    return counter.bytes


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_kd_kl_div_fwd_bwd(benchmark, case, backend, dtype, layout):
    name, mode, shape = case
    s, t = _inputs(shape, dtype, layout)
    try:
        resolve("kd_kl_div", s, t, backend=backend)
    except BackendError as e:
        pytest.skip(str(e))
    n = s.numel()
    benchmark.extra_info.update({
        "op": "kd_kl_div", "what": "forward+backward", "case": name, "mode": mode, "temperature": TEMPERATURE,
        "shape": list(shape), "layout": layout, "dtype": str(dtype).replace("torch.", ""), "device": str(DEVICE),
        "backend": backend,
        # log-softmax of both inputs (scale, max, sub, exp, sum, log, sub ≈ 7 per value each), the KL
        # terms (sub, mul, add ≈ 3) and the gradient (exp, sub, mul ≈ 3): ≈ 20 per student value.
        "flops_modeled": 20 * n,
        "bytes_modeled": _modeled_bytes(s, t, mode, backend),
        "bytes_fused_io": 5 * n * s.element_size(),
    })
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def run():
        _step(s, t, mode, backend)
        sync()

    rounds = 20 if DEVICE.type == "cuda" else 3
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    assert s.grad is not None and torch.isfinite(s.grad).all()
