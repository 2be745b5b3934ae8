"""Bilinear upsample + add + ReLU: the middle of the folded SegFormer head, on CPU, inference.

Math, for token-layout (channels-last) maps ``acc [B, R, W, E]`` — rows ``row_offset …
row_offset + R − 1`` of an ``H × W`` grid — and sources ``s_i [B, h_i, w_i, E]``::

    z = ReLU(acc + Σ_i bilinear(s_i → H × W)[:, row_offset : row_offset + R])

with ``bilinear`` = ``F.interpolate(mode="bilinear", align_corners=False)`` to the given size.
In the folded head (``SegFormerHead._tiled_logits``) acc is ``(W_fuse A_1) f_1`` for one tile of
stage-1 rows and s_i the deeper stages' composed projections at their own resolution.

- :func:`upsample_add_relu_reference`: ``F.interpolate`` of each whole source, sliced, summed in
  fp32 with acc, ReLU, cast to acc's dtype. The ground truth.
- :func:`upsample_add_relu`: the C kernel ``transkd_fast.kernels.upsample_add_relu`` — one pass,
  separable like ATen's bilinear (each needed source row interpolated along the width once, into
  an fp32 row kept while it is needed), sum and ReLU in fp32, one rounding of the result. What
  the ATen route costs is the passes: three width-upsampled tiles written and read, acc read and
  written once per source and by the ReLU, and in bf16 two dtype conversions of the tile.

Shapes and dtypes: 4-D CPU tensors, one dtype, fp32 or bf16; E equal everywhere; the sources'
batch is acc's; ``0 ≤ row_offset`` and ``row_offset + R ≤ H``; ``W`` is acc's width. Inference
only: no autograd (a tensor that requires grad with grad mode on is refused). Non-contiguous
inputs are copied. ``out`` (optional) receives z; it may be ``acc`` itself (in place).

The kernel runs when it can be built: ``TRANSKD_FAST_CPU_KERNELS=0`` turns it off, and without a
C compiler (or when the build fails) :func:`kernel_available` is False and warns once with the
reason; callers then take their ATen route. :func:`upsample_add_relu` itself never swaps in
another computation: it raises :class:`transkd_fast.kernels._cpu_build.CpuKernelUnavailable`.
Results equal the reference up to fp32 rounding (fused multiply-adds, another summation order),
bf16 results within one bf16 rounding of it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from transkd_fast.backend import check_tensor
from transkd_fast.kernels import _cpu_build
from transkd_fast.kernels import upsample_add_relu as _kernel
from transkd_fast.ops import _cpu

DTYPES = (torch.float32, torch.bfloat16)


def upsample_add_relu_reference(acc: torch.Tensor, sources: Sequence[torch.Tensor], size: Sequence[int],
                                row_offset: int = 0) -> torch.Tensor:
    """ReLU(acc + Σ bilinear(s_i → size) rows ``row_offset:row_offset+R``), fp32 math, acc's dtype."""
    R = acc.shape[1]
    z = acc.float()
    for s in sources:
        up = F.interpolate(s.permute(0, 3, 1, 2).float(), size=tuple(size), mode="bilinear", align_corners=False)
        z = z + up.permute(0, 2, 3, 1)[:, row_offset:row_offset + R]
    return torch.relu(z).to(acc.dtype)


def kernel_available() -> bool:
    """Whether the C kernel is on (``TRANSKD_FAST_CPU_KERNELS`` not ``0``) and builds here. The
    first call builds or loads it (a second or two once, then the cached library); a build
    failure warns once, with the reason, and stays False for the process (:mod:`._cpu`)."""
    return _cpu.available("upsample_add_relu", _kernel, "the SegFormer head runs its ATen route")


def _check(acc, sources, size, row_offset, out):
    check_tensor("acc", acc, ndim=4)
    if acc.device.type != "cpu":
        raise ValueError(f"upsample_add_relu runs on CPU tensors, got acc on {acc.device}")
    if acc.dtype not in DTYPES:
        raise TypeError(f"upsample_add_relu supports float32 and bfloat16, got {acc.dtype}")
    if not isinstance(sources, (list, tuple)):
        raise TypeError(f"sources must be a list or tuple of tensors, got {type(sources).__name__}")
    B, R, W, E = acc.shape
    if len(size) != 2:
        raise ValueError(f"size must be (H, W), got {tuple(size)}")
    H, W_out = int(size[0]), int(size[1])
    if W_out != W:
        raise ValueError(f"size {(H, W_out)}: its width must be acc's ({W}), acc has shape {tuple(acc.shape)}")
    if not (0 <= row_offset and row_offset + R <= H):
        raise ValueError(f"rows {row_offset}…{row_offset + R - 1} (row_offset {row_offset}, acc's {R} rows) "
                         f"are outside the output height {H}")
    for i, s in enumerate(sources):
        check_tensor(f"sources[{i}]", s, ndim=4)
        if s.dtype != acc.dtype or s.device != acc.device:
            raise TypeError(f"sources[{i}] is {s.dtype} on {s.device}; acc is {acc.dtype} on {acc.device}")
        if s.shape[0] != B or s.shape[3] != E or s.shape[1] < 1 or s.shape[2] < 1:
            raise ValueError(f"sources[{i}] has shape {tuple(s.shape)}; expected [{B}, h, w, {E}] "
                             f"(acc {tuple(acc.shape)})")
    if out is not None:
        if out.shape != acc.shape or out.dtype != acc.dtype or out.device != acc.device:
            raise ValueError(f"out must match acc ({tuple(acc.shape)}, {acc.dtype}), "
                             f"got {tuple(out.shape)}, {out.dtype}")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (acc, *sources)):
        raise RuntimeError("upsample_add_relu is an inference op (no backward): call it under "
                           "torch.no_grad() / torch.inference_mode(), or with tensors that do not require grad")
    return H


def upsample_add_relu(acc: torch.Tensor, sources: Sequence[torch.Tensor], size: Sequence[int],
                      row_offset: int = 0, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ReLU(acc + Σ_i bilinear(sources[i] → size)[rows of acc]) by the C kernel (module doc);
    returns ``out`` (a new tensor when None) ``[B, R, W, E]`` in acc's dtype."""
    H = _check(acc, sources, size, row_offset, out)
    if not kernel_available():
        raise _cpu_build.CpuKernelUnavailable("upsample_add_relu: " + _cpu.why_unavailable("upsample_add_relu"))
    a = acc.contiguous()
    srcs = [s.contiguous() for s in sources]
    if out is None:
        out = torch.empty_like(a)
    _kernel.launch(a, srcs, out, H, int(row_offset), torch.get_num_threads())
    return out
