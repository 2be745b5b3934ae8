"""Shared test helpers (accuracy measures in the style of design §4)."""

from __future__ import annotations

import os

import pytest
import torch

# Where the op tests put their tensors: the CPU (Triton's interpreter) by default, the GPU in
# CUDA test mode (TRANSKD_TEST_DEVICE=cuda), where the compiled kernels run.
DEVICE = torch.device(os.environ.get("TRANSKD_TEST_DEVICE", "cpu"))
ON_CUDA = DEVICE.type == "cuda"
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason="runs Triton's interpreter on CPU tensors")
needs_cpu = pytest.mark.skipif(ON_CUDA, reason="CPU-only check (CUDA test mode)")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ computed in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def assert_low_precision_ok(out: torch.Tensor, torch_same_dtype: torch.Tensor, ref64: torch.Tensor,
                            what: str = "", factor: float = 2.0, floor: float = 1e-6) -> None:
    """fp16/bf16 rule: our error vs fp64 ≤ factor × PyTorch's own same-dtype error."""
    ours = rel_err(out, ref64)
    theirs = rel_err(torch_same_dtype, ref64)
    assert ours <= factor * max(theirs, floor), f"{what}: error {ours:.3e} > {factor}× torch's {theirs:.3e}"
