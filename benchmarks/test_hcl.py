"""Benchmark of hcl_loss (forward + backward) at the TransKD shapes, B2 → B0, 512×1024, batch 2.

All four stages in one call, as the distiller runs it: student maps after CSF at the teacher
B2 widths, [2, 64, 128, 256], [2, 128, 64, 128], [2, 320, 32, 64], [2, 512, 16, 32]; the
teacher maps need no grad; contiguous, and channels_last as the models give them
(``test_hcl_loss_fwd_bwd_channels_last``). Reference, torch and (on CUDA) triton run in one session;
``extra_info`` records shapes, dtype, device, modeled FLOPs and modeled bytes moved:

- reference / torch: the sum over every ATen op they run (forward and backward) of the
  bytes of its tensor inputs and outputs, views free (``transkd_fast.traffic.count_bytes``);
- triton: the inputs + outputs of its custom ops (forward reads fs and ft and writes the
  pooled means and the loss; backward reads fs, ft and the pooled means and writes ∂/∂fs).

Byte counts run on fake tensors (no data). Run: ``pytest benchmarks/test_hcl.py
--benchmark-only``. The interpreter is not a benchmark: triton runs only on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from _list_loss import DEVICE, DTYPES, modeled_bytes, stage_inputs, time_fwd_bwd

from transkd_fast.backend import BackendError, resolve
from transkd_fast.ops import hcl as hcl_ops
from transkd_fast.ops.hcl import hcl_loss, hcl_loss_reference

SHAPES = [(2, 64, 128, 256), (2, 128, 64, 128), (2, 320, 32, 64), (2, 512, 16, 32)]
BACKENDS = ("reference", "torch", "triton")


def _modeled_bytes(dtype) -> dict:
    def internals(fs, ft):
        loss, pooled = hcl_ops._torch_forward(fs, ft)
        hcl_ops._torch_backward(torch.ones_like(loss), fs, ft, pooled, [False] * len(fs))

    return modeled_bytes(SHAPES, dtype, hcl_loss_reference,
                         lambda fs, ft: torch.ops.transkd_fast.hcl_loss(fs, ft, "triton")[0], internals)


_BYTES: dict = {}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", BACKENDS)
def test_hcl_loss_fwd_bwd(benchmark, backend, dtype):
    fs, ft = stage_inputs(SHAPES, dtype)
    try:
        resolve("hcl_loss", fs[0], backend=backend)
    except BackendError as e:
        pytest.skip(str(e))
    if dtype not in _BYTES:
        _BYTES[dtype] = _modeled_bytes(dtype)
    bytes_ = _BYTES[dtype]
    n = sum(t.numel() for t in fs)
    benchmark.extra_info.update({
        "op": "hcl_loss", "what": "forward+backward, 4 stages", "shapes": [list(s) for s in SHAPES],
        "dtype": str(dtype).replace("torch.", ""), "device": str(DEVICE), "backend": backend,
        # d = fs − ft, d² accumulate, 7 bin sums (forward); d, scale, 7 bin spreads (backward).
        "flops_modeled": 20 * n,
        "bytes_modeled": bytes_[backend],
        "bytes_reference": bytes_["reference"],
        "bytes_fused_io": bytes_["triton"],
    })
    time_fwd_bwd(benchmark, fs, lambda: hcl_loss(fs, ft, backend=backend))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", BACKENDS)
def test_hcl_loss_fwd_bwd_channels_last(benchmark, backend, dtype):
    """The same four stages in channels_last, the layout the MiT stages and CSF hand to HCL (the
    torch backend's grid path keeps it; triton reads along C and writes channels_last gradients)."""
    fs, ft = stage_inputs(SHAPES, dtype)
    cl = torch.channels_last
    fs = [t.detach().contiguous(memory_format=cl).requires_grad_() for t in fs]
    ft = [t.contiguous(memory_format=cl) for t in ft]
    try:
        resolve("hcl_loss", fs[0], backend=backend)
    except BackendError as e:
        pytest.skip(str(e))
    if dtype not in _BYTES:
        _BYTES[dtype] = _modeled_bytes(dtype)
    n = sum(t.numel() for t in fs)
    benchmark.extra_info.update({
        "op": "hcl_loss", "what": "forward+backward, 4 stages, channels_last", "shapes": [list(s) for s in SHAPES],
        "dtype": str(dtype).replace("torch.", ""), "device": str(DEVICE), "backend": backend,
        "layout": "channels_last", "flops_modeled": 20 * n,
        "bytes_reference": _BYTES[dtype]["reference"], "bytes_fused_io": _BYTES[dtype]["triton"],
    })
    time_fwd_bwd(benchmark, fs, lambda: hcl_loss(fs, ft, backend=backend))
