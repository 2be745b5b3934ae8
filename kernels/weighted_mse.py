"""Triton kernels of the multi-stage weighted MSE (TransKD's patch-embedding loss).

loss = Σ_i w_i · mean((x_i − y_i)²) over stages of any shapes. One launch per stage per
direction; each stage is seen as a strided 3-D view [D0, D1, D2] (the launch helper merges
the dimensions it can, so a contiguous pair is one flat run of D2 = numel elements), tiled
[BLOCK_R, BLOCK_C] over rows r = (i0, i1) and columns i2.

- ``_wmse_fwd_kernel``: one tile per program; writes (w/numel) · Σ (x − y)² of its tile into
  ``share``. Every stage writes into one packed buffer, so the loss is one ``sum``.
  w/numel is computed on the host (one fp32 argument).
- ``_wmse_bwd_kernel``: ∂loss/∂x = g · 2·w/numel · (x − y) into a contiguous gradient, and
  −that for y when ``write_y``. g is read on the device.

Nothing is saved for backward but the inputs: the backward re-reads x and y.

Value-1 sizes: a contiguous pair merges to [1, 1, numel], so R = D1 = 1 (and n_col_tiles,
D2 or a stride can be 1 too); the JIT turns such ints into constexprs. The kernels only
use them in arithmetic valid for both (no ``.to`` on an argument), and the flat 1×2048
tile serves every single-row view (R = 1), whatever its length.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

NUM_WARPS = 4
# (BLOCK_R, BLOCK_C): one flat row for long contiguous runs, a row tile otherwise.
FLAT_TILE = (1, 2048)
ROW_TILE = (16, 128)


@triton.jit
def _tile_offsets(pid, D1, D2, n_col_tiles, sa0, sa1, sa2, sb0, sb1, sb2, R,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = (pid // n_col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    # int64 columns: a flat stage (D2 = numel) may pass 2^31 elements.
    c64 = (pid % n_col_tiles).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    i0 = (r // D1).to(tl.int64)
    i1 = (r % D1).to(tl.int64)
    off_a = (i0 * sa0 + i1 * sa1)[:, None] + c64[None, :] * sa2
    off_b = (i0 * sb0 + i1 * sb1)[:, None] + c64[None, :] * sb2
    flat = r.to(tl.int64)[:, None] * D2 + c64[None, :]
    mask = (r < R)[:, None] & (c64 < D2)[None, :]
    return off_a, off_b, flat, mask


@triton.jit
def _wmse_fwd_kernel(
    x_ptr, y_ptr, share_ptr,
    R, D1, D2, n_col_tiles,
    sx0, sx1, sx2, sy0, sy1, sy2,
    w_numel,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    off_x, off_y, _, mask = _tile_offsets(pid, D1, D2, n_col_tiles, sx0, sx1, sx2, sy0, sy1, sy2, R,
                                          BLOCK_R, BLOCK_C)
    x = tl.load(x_ptr + off_x, mask=mask, other=0.0).to(ACC)
    y = tl.load(y_ptr + off_y, mask=mask, other=0.0).to(ACC)
    d = x - y
    tl.store(share_ptr + pid, tl.sum(tl.sum(d * d, axis=1), axis=0) * w_numel)


@triton.jit
def _wmse_bwd_kernel(
    x_ptr, y_ptr, gout_ptr, gx_ptr, gy_ptr,
    R, D1, D2, n_col_tiles,
    sx0, sx1, sx2, sy0, sy1, sy2,
    w_numel, write_y,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    off_x, off_y, flat, mask = _tile_offsets(pid, D1, D2, n_col_tiles, sx0, sx1, sx2, sy0, sy1, sy2, R,
                                             BLOCK_R, BLOCK_C)
    x = tl.load(x_ptr + off_x, mask=mask, other=0.0).to(ACC)
    y = tl.load(y_ptr + off_y, mask=mask, other=0.0).to(ACC)
    scale = tl.load(gout_ptr).to(ACC) * (2.0 * w_numel)
    grad = scale * (x - y)
    tl.store(gx_ptr + flat, grad.to(gx_ptr.dtype.element_ty), mask=mask)
    if write_y:
        tl.store(gy_ptr + flat, (-grad).to(gy_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# Launch helpers.


def collapse(shape, *stride_lists) -> tuple[list[int], list[list[int]]]:
    """Merge adjacent dimensions that are contiguous relative to each other in every tensor.

    Returns the merged sizes and each tensor's strides, at most as many dims as the input
    (size-1 dims dropped; ``[1]`` for a scalar). Row-major order of the logical shape is kept,
    so flat index r·D2 + i2 of the result is the logical flat index.
    """
    dims = [(n, [s[i] for s in stride_lists]) for i, n in enumerate(shape) if n != 1]
    if not dims:
        return [1], [[1] for _ in stride_lists]
    sizes, strides = [dims[0][0]], [list(dims[0][1])]
    for n, st in dims[1:]:
        if all(prev == cur * n for prev, cur in zip(strides[-1], st)):
            sizes[-1] *= n
            strides[-1] = list(st)
        else:
            sizes.append(n)
            strides.append(list(st))
    return sizes, [[st[k] for st in strides] for k in range(len(stride_lists))]


def as_3d(x: torch.Tensor, y: torch.Tensor):
    """(x, y, D0, D1, D2, x strides, y strides) of the pair as a merged strided 3-D view.

    Pairs that need more than three dims after merging (rare permuted views) are copied
    contiguous here: off the hot path of TransKD, whose embeddings are contiguous [B, N, C].
    """
    sizes, (sx, sy) = collapse(x.shape, x.stride(), y.stride())
    if len(sizes) > 3:
        x, y = x.contiguous(), y.contiguous()
        sizes, (sx, sy) = [x.numel()], [[1], [1]]
    pad = 3 - len(sizes)
    return x, y, [1] * pad + sizes, [0] * pad + sx, [0] * pad + sy


def _tile(R: int, D2: int) -> tuple[int, int]:
    return FLAT_TILE if R == 1 or D2 >= FLAT_TILE[1] else ROW_TILE


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _grid(sizes, tile):
    R = sizes[0] * sizes[1]
    n_col = triton.cdiv(sizes[2], tile[1])
    return R, n_col, triton.cdiv(R, tile[0]) * n_col


def wmse_num_programs(x: torch.Tensor, y: torch.Tensor) -> int:
    """Length of the ``share`` slice ``wmse_stage_forward`` writes for this pair."""
    _, _, sizes, _, _ = as_3d(x, y)
    return _grid(sizes, _tile(sizes[0] * sizes[1], sizes[2]))[2]


def wmse_stage_forward(x: torch.Tensor, y: torch.Tensor, weight: float, share: torch.Tensor) -> None:
    """Write w/numel · Σ (x − y)² per tile into ``share`` (length ``wmse_num_programs``)."""
    x, y, sizes, sx, sy = as_3d(x, y)
    tile = _tile(sizes[0] * sizes[1], sizes[2])
    R, n_col, programs = _grid(sizes, tile)
    _wmse_fwd_kernel[(programs,)](
        x, y, share, R, sizes[1], sizes[2], n_col, *sx, *sy, weight / x.numel(),
        BLOCK_R=tile[0], BLOCK_C=tile[1], ACC=_acc(x.dtype), num_warps=NUM_WARPS,
    )


def wmse_stage_backward(grad_out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight: float,
                        gx: torch.Tensor, gy: Optional[torch.Tensor]) -> None:
    """Write ∂loss/∂x into the contiguous ``gx`` and, when given, −that into ``gy``."""
    x, y, sizes, sx, sy = as_3d(x, y)
    tile = _tile(sizes[0] * sizes[1], sizes[2])
    R, n_col, programs = _grid(sizes, tile)
    _wmse_bwd_kernel[(programs,)](
        x, y, grad_out, gx, gx if gy is None else gy, R, sizes[1], sizes[2], n_col, *sx, *sy,
        weight / x.numel(), int(gy is not None),
        BLOCK_R=tile[0], BLOCK_C=tile[1], ACC=_acc(x.dtype), num_warps=NUM_WARPS,
    )
