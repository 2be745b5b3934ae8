"""CSF selective fusion: reference vs torch vs triton (CUDA) in one run.

Each benchmark times one CSF fusion step on the maps of TransKD's B0 student at 512×1024,
batch 2, mid = 64: ``p = selective_pool(x, y_low)`` then ``o = selective_fuse(x, y_low, a)``
(the squeeze MLP between them is not part of the ops), forward only and forward + backward.
Shapes (x, y_low): [2,64,128,256]/[2,64,64,128], [2,64,64,128]/[2,64,32,64],
[2,64,32,64]/[2,64,16,32]. Both memory formats: channels_last is what the models hand CSF
(the kernels then vectorize along C), contiguous NCHW the other layout the kernels are built for.

``extra_info``: shapes, dtype, device, backend, FLOPs and MODELED bytes (not measured):

- reference (the original's eager ops): materialized ``up(y)`` and every intermediate of
  ``x + up``, ``mean``, ``a0·x``, ``a1·up``, the sum, and their autograd counterparts;
- fused (torch/triton custom ops): inputs + outputs of the ops only.

With N = x.numel(), n = y_low.numel(), e = element size (a, da, p are negligible):

- forward, reference: n + N (up) + 3N (x + up) + N (mean) + 2N (a0·x) + 2N (a1·up) + 3N (sum)
  = 12N + n elements; fused: pool (N + n) + fuse (N + n + N) = 3N + 2n.
- backward, reference: fuse: a0·g (2N), a1·g (2N), g·x and its sum (4N), g·up and its sum (4N);
  pool: the x-gradient accumulation (2N), the up-gradient accumulation (2N), interpolate
  backward (N + n) = 17N + n; fused: pool backward (n) + fuse backward (g, x, dx: 3N; y, dy: 2n)
  = 3N + 3n (plus autograd's own dx accumulation, the same for every backend).

FLOPs: forward 4N (pool add; two products and a sum), backward 4N + 3n.
CPU runs reference and torch (fp32); CUDA adds triton (fp16). Never read CPU numbers as GPU speed.
"""

from __future__ import annotations

import pytest
import torch

from transkd_fast.ops.selective_fusion import selective_fuse, selective_pool

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32
SHAPES = [
    ((2, 64, 128, 256), (2, 64, 64, 128)),
    ((2, 64, 64, 128), (2, 64, 32, 64)),
    ((2, 64, 32, 64), (2, 64, 16, 32)),
]
BACKENDS = ["reference", "torch"] + (["triton"] if DEVICE.type == "cuda" else [])


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _modeled(x_shape, y_shape, backward: bool, backend: str) -> dict:
    N = torch.Size(x_shape).numel()
    n = torch.Size(y_shape).numel()
    e = torch.finfo(DTYPE).bits // 8
    if backward:
        elems = (12 * N + n) + (17 * N + n) if backend == "reference" else (3 * N + 2 * n) + (3 * N + 3 * n)
        flops = 4 * N + (4 * N + 3 * n)
    else:
        elems = 12 * N + n if backend == "reference" else 3 * N + 2 * n
        flops = 4 * N
    return {"modeled_bytes": elems * e, "flops": flops}


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: "x{}x{}".format(*s[0][2:]))
def test_csf_fusion_step(benchmark, shapes, backend, backward, layout):
    x_shape, y_shape = shapes
    B, C = x_shape[:2]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(x_shape, device=DEVICE, dtype=DTYPE).contiguous(memory_format=fmt).requires_grad_(backward)
    y = torch.randn(y_shape, device=DEVICE, dtype=DTYPE).contiguous(memory_format=fmt).requires_grad_(backward)
    a = torch.randn(B, 2, C, device=DEVICE, dtype=torch.float32).softmax(dim=1).requires_grad_(backward)
    gp = torch.randn(B, C, device=DEVICE, dtype=DTYPE)
    go = torch.randn(x_shape, device=DEVICE, dtype=DTYPE).contiguous(memory_format=fmt)

    def step():
        p = selective_pool(x, y, backend=backend)
        o = selective_fuse(x, y, a, backend=backend)
        if backward:
            torch.autograd.backward([p, o], [gp, go])
            x.grad = y.grad = a.grad = None
        _sync()
        return o

    # Bounded rounds keep the CPU run short (~2 min for the whole file).
    rounds = 5 if DEVICE.type == "cpu" else 50
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)
    benchmark.group = f"csf-step-{'x'.join(map(str, x_shape))}-{layout}-{'fwd+bwd' if backward else 'fwd'}"
    benchmark.extra_info.update({
        "device": str(DEVICE), "dtype": str(DTYPE).replace("torch.", ""), "backend": backend, "layout": layout,
        "x_shape": list(x_shape), "y_low_shape": list(y_shape), "a_shape": [B, 2, C],
        "threads": torch.get_num_threads(), **_modeled(x_shape, y_shape, backward, backend),
    })
