"""Benchmark of weighted_mse (forward + backward) at the TransKD shapes, B2 → B0, 512×1024, batch 2.

The four patch embeddings of the student (after PEA, at the teacher B2 widths) against the
teacher's: [2, 32768, 64], [2, 8192, 128], [2, 2048, 320], [2, 512, 512], weights
(0.1, 0.1, 0.5, 1.0); the teacher's need no grad. Reference, torch and (on CUDA) triton run
in one session; ``extra_info`` records shapes, dtype, device, modeled FLOPs and bytes moved:

- reference / torch: the sum over every ATen op they run (forward and backward) of the
  bytes of its tensor inputs and outputs, views free (``transkd_fast.traffic.count_bytes``);
- triton: the inputs + outputs of its custom ops (forward reads x and y and writes the
  loss; backward reads x and y and writes ∂/∂x).

Byte counts run on fake tensors (no data). Run: ``pytest benchmarks/test_weighted_mse.py
--benchmark-only``. The interpreter is not a benchmark: triton runs only on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from transkd_fast import traffic
from transkd_fast.backend import BackendError, resolve
from transkd_fast.ops import weighted_mse as wmse_ops
from transkd_fast.ops.weighted_mse import weighted_mse, weighted_mse_reference

SHAPES = [(2, 32768, 64), (2, 8192, 128), (2, 2048, 320), (2, 512, 512)]
WEIGHTS = [0.1, 0.1, 0.5, 1.0]
BACKENDS = ("reference", "torch", "triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.bfloat16) if DEVICE.type == "cuda" else (torch.float32,)


def _inputs(dtype, device=DEVICE):
    xs = [torch.randn(s, device=device).to(dtype).requires_grad_() for s in SHAPES]
    ys = [(0.5 * torch.randn(s, device=device) + 0.1).to(dtype) for s in SHAPES]
    return xs, ys


def _modeled_bytes(dtype) -> dict:
    """Bytes moved by one forward + backward of each backend, counted on fake tensors."""
    with traffic._fake():
        xs, ys = _inputs(dtype, device="cpu")

        def step(fn):
            for t in xs:
                t.grad = None
            fn().backward()

        ref, _ = traffic.count_bytes(lambda: step(lambda: weighted_mse_reference(xs, ys, WEIGHTS)))
        fused, _ = traffic.count_bytes(
            lambda: step(lambda: torch.ops.transkd_fast.weighted_mse(xs, ys, WEIGHTS, "triton")), only=traffic._custom)

        def torch_internals():
            loss = wmse_ops._torch_forward(xs, ys, WEIGHTS)
            wmse_ops._torch_backward(torch.ones_like(loss), xs, ys, WEIGHTS, [False] * len(xs))

        with torch.no_grad():
            eager, _ = traffic.count_bytes(torch_internals)
    return {"reference": ref, "torch": eager, "triton": fused}


_BYTES: dict = {}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_mse_fwd_bwd(benchmark, backend, dtype):
    xs, ys = _inputs(dtype)
    try:
        resolve("weighted_mse", xs[0], backend=backend)
    except BackendError as e:
        pytest.skip(str(e))
    if dtype not in _BYTES:
        _BYTES[dtype] = _modeled_bytes(dtype)
    bytes_ = _BYTES[dtype]
    n = sum(t.numel() for t in xs)
    benchmark.extra_info.update({
        "op": "weighted_mse", "what": "forward+backward, 4 stages", "shapes": [list(s) for s in SHAPES],
        "weights": WEIGHTS, "dtype": str(dtype).replace("torch.", ""), "device": str(DEVICE), "backend": backend,
        # forward: sub, square-accumulate; backward: sub, scale.
        "flops_modeled": 5 * n,
        "bytes_modeled": bytes_[backend],
        "bytes_reference": bytes_["reference"],
        "bytes_fused_io": bytes_["triton"],
    })
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def run():
        for t in xs:
            t.grad = None
        weighted_mse(xs, ys, WEIGHTS, backend=backend).backward()
        sync()

    rounds = 20 if DEVICE.type == "cuda" else 3
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in xs)
