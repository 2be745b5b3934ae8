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

import importlib

import pytest
import torch
from _list_loss import DEVICE, DTYPES, modeled_bytes, stage_inputs, time_fwd_bwd

from transkd_fast.backend import BackendError, resolve
from transkd_fast.ops.weighted_mse import weighted_mse, weighted_mse_reference

wmse_ops = importlib.import_module("transkd_fast.ops.weighted_mse")  # the package binds the function

SHAPES = [(2, 32768, 64), (2, 8192, 128), (2, 2048, 320), (2, 512, 512)]
WEIGHTS = [0.1, 0.1, 0.5, 1.0]
BACKENDS = ("reference", "torch", "triton")


def _modeled_bytes(dtype) -> dict:
    def internals(xs, ys):
        loss = wmse_ops._torch_forward(xs, ys, WEIGHTS)
        wmse_ops._torch_backward(torch.ones_like(loss), xs, ys, WEIGHTS, [False] * len(xs))

    return modeled_bytes(SHAPES, dtype, lambda xs, ys: weighted_mse_reference(xs, ys, WEIGHTS),
                         lambda xs, ys: torch.ops.transkd_fast.weighted_mse(xs, ys, WEIGHTS, "triton"), internals)


_BYTES: dict = {}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_mse_fwd_bwd(benchmark, backend, dtype):
    xs, ys = stage_inputs(SHAPES, dtype)
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
    time_fwd_bwd(benchmark, xs, lambda: weighted_mse(xs, ys, WEIGHTS, backend=backend))
