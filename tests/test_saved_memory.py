"""What the fused losses keep for backward, measured with ``saved_tensors_hooks``.

Every tensor autograd saves passes through the pack hook. We split the saved bytes into
- **kept inputs**: tensors that are the op's own inputs (or views of their storage): the
  caller's tensors, kept alive but not allocated by the op;
- **saved beyond the inputs**: everything else, i.e. memory the op allocates and holds
  until backward.
The fused losses must hold no more beyond their inputs than the inputs' own bytes (in
practice: only HCL's pooled means, 21 values per plane). The reference's numbers are printed
beside them (run pytest with ``-s`` to see them).
"""

from __future__ import annotations

import pytest
import torch

from transkd_fast.ops.hcl import hcl_loss
from transkd_fast.ops.weighted_mse import weighted_mse


def saved_bytes(fn, inputs) -> tuple[int, int]:
    """(bytes saved beyond the inputs, bytes of inputs kept) by the autograd graph of ``fn()``."""
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    assert out.requires_grad
    input_storages = {x.untyped_storage().data_ptr() for x in inputs}
    seen, beyond, kept = set(), 0, 0
    for t in packed:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        nbytes = t.numel() * t.element_size()
        if t.untyped_storage().data_ptr() in input_storages:
            kept += nbytes
        else:
            beyond += nbytes
    return beyond, kept


def _report(op, dtype, backend, input_bytes, fused, ref):
    print(f"\n[saved memory] {op} {str(dtype).replace('torch.', '')} ({backend}): inputs {input_bytes / 1e6:.3f} MB; "
          f"fused saves {fused[0] / 1e6:.3f} MB beyond its inputs (+ keeps {fused[1] / 1e6:.3f} MB of inputs); "
          f"reference saves {ref[0] / 1e6:.3f} MB beyond its inputs (+ keeps {ref[1] / 1e6:.3f} MB of inputs)")


# Teacher B2 widths after CSF at a 256×512 input, batch 2 (the torch backend runs the real
# stage shapes quickly on CPU); small maps for the interpreter.
HCL_SHAPES = {"torch": [(2, 64, 64, 128), (2, 128, 32, 64), (2, 320, 16, 32), (2, 512, 8, 16)],
              "triton": [(1, 4, 16, 32), (1, 8, 8, 16), (1, 4, 13, 27)]}
MSE_SHAPES = {"torch": [(2, 64 * 128, 64), (2, 32 * 64, 128), (2, 16 * 32, 320), (2, 8 * 16, 512)],
              "triton": [(2, 16 * 32, 64), (2, 8 * 16, 128), (2, 4 * 8, 320), (2, 2 * 4, 512)]}


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_saved_memory_hcl(backend, dtype):
    shapes = HCL_SHAPES[backend]
    fs = [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]
    ft = [torch.randn(s, dtype=dtype) for s in shapes]
    input_bytes = sum(t.numel() * t.element_size() for t in fs + ft)
    fused = saved_bytes(lambda: hcl_loss(fs, ft, backend=backend), fs + ft)
    ref = saved_bytes(lambda: hcl_loss(fs, ft, backend="reference"), fs + ft)
    _report("hcl_loss", dtype, backend, input_bytes, fused, ref)
    planes = sum(s[0] * s[1] for s in shapes)
    assert fused[0] <= input_bytes
    assert fused[0] == planes * 21 * 4  # only the pooled means (fp32) beyond the inputs
    assert fused[1] <= input_bytes


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_saved_memory_weighted_mse(backend, dtype):
    shapes = MSE_SHAPES[backend]
    xs = [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]
    ys = [torch.randn(s, dtype=dtype) for s in shapes]
    input_bytes = sum(t.numel() * t.element_size() for t in xs + ys)
    weights = (0.1, 0.1, 0.5, 1.0)
    fused = saved_bytes(lambda: weighted_mse(xs, ys, weights, backend=backend), xs + ys)
    ref = saved_bytes(lambda: weighted_mse(xs, ys, weights, backend="reference"), xs + ys)
    _report("weighted_mse", dtype, backend, input_bytes, fused, ref)
    assert fused[0] == 0  # nothing beyond the inputs
    assert fused[1] <= input_bytes
