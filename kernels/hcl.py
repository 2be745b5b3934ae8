"""Triton kernels of the hierarchical context loss (HCL) of TransKD, one stage per launch.

Per stage, with d = fs − ft of shape ``[N, C, H, W]`` (strided) and the levels of (4, 2, 1)
that survive the original's skip rule ``l >= H`` (always a tail of the tuple)::

    P_l[n, c, i, j] = mean of d[n, c, rows_i, cols_j]       rows_i = [⌊iH/l⌋, ⌈(i+1)H/l⌉), cols_j alike
    loss_stage      = c0 · Σ d²  +  Σ_l c_l · Σ P_l²         c0 = 1/(tot·NCHW), c_l = cnt_l/(tot·NC·l²)

Since pooling is linear, pool(fs) − pool(ft) = pool(d): the forward reads fs and ft once.
The bins of all levels share one table of 8 slots per axis (4 + 2 + 1 + an empty pad), so a
tile's bin sums are two masked reductions over [rows, cols, 8] and [rows, 8, 8]; exact
adaptive-pool bins, which overlap when H or W is not divisible by l.

- ``_hcl_fwd_kernel``: one program per (n, c) plane, or per row group of it when the planes
  are too few to fill the GPU, walks its rows in [BLOCK_H, BLOCK_W] tiles accumulating Σd²
  and every bin sum. A whole plane writes its pooled means P (21 slots: 16 for l = 4, 4 for
  l = 2, 1 for l = 1; active levels only) and its share of loss_stage; a row group writes
  partial sums that ``_hcl_combine_kernel`` adds in a fixed order (deterministic) before
  doing the same. The caller sums the shares of all planes of all stages in one reduction.
  Nothing of input size is written.
- ``_hcl_bwd_kernel``: one program per (plane, row group) recomputes d and writes
  ∂loss/∂fs = g · (2·c0·d + Σ_l Σ_{bins ∋ (h,w)} 2·c_l·P_l[i, j] / area_ij), and −that for ft.

Bins are applied with ``tl.where``, never by multiplying with a 0/1 mask, so an inf or NaN
reaches exactly the bins that contain it, as in the eager reference. The loss coefficients
are computed in the kernel from N, C, H, W in the accumulation dtype (fp64 for fp64 inputs).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

LEVELS = (4, 2, 1)
NUM_WARPS = 4


@triton.jit
def _bin_table(N, C, H, W, NS: tl.constexpr, ACC: tl.constexpr):
    """Every per-stage constant, in one device-function call (the interpreter pays per call).

    Bins of all levels sit in NS = 8 slots per axis: 0-3 the bins of l = 4, 4-5 those of l = 2,
    6 the one of l = 1, 7 an empty pad. Returns
    - rs, re, cs, ce [NS]: row / column bin bounds, start = ⌊b·size/l⌋, end = ⌈(b+1)·size/l⌉;
    - used [NS, NS]: (row slot, col slot) pairs that are bins of an active level (same l, l < H);
    - slot [NS, NS]: where that bin's pooled mean lives among the 21 per plane; area: its size;
    - coef [NS, NS]: c_l = cnt_l/(tot·NC·l²) of its level; c0 = 1/(tot·NCHW). The active levels
      are the tail of (4, 2, 1) with l < H (the original's skip rule); cnt halves from 1/2 at
      the first active one; tot = 1 + Σ cnt.
    """
    k = tl.arange(0, NS)
    lvl = tl.where(k < 4, 4, tl.where(k < 6, 2, 1))
    b = tl.where(k < 4, k, tl.where(k < 6, k - 4, 0))
    rs = (b * H) // lvl
    re = tl.where(k < 7, ((b + 1) * H + lvl - 1) // lvl, 0)
    cs = (b * W) // lvl
    ce = tl.where(k < 7, ((b + 1) * W + lvl - 1) // lvl, 0)
    li = lvl[:, None]
    used = (li == lvl[None, :]) & (k[:, None] < 7) & (k[None, :] < 7) & (li < H)
    slot = tl.where(li == 4, 0, tl.where(li == 2, 16, 20)) + b[:, None] * li + b[None, :]
    area = tl.where(used, (re - rs)[:, None] * (ce - cs)[None, :], 1)
    nl = (H > 4).to(tl.int32) + (H > 2).to(tl.int32) + (H > 1).to(tl.int32)
    # position of the level among the active ones: cnt = 0.5^(position + 1)
    pos = tl.where(li == 4, 0, tl.where(li == 2, 1, 2)) - (3 - nl)
    cnt = tl.exp2(-(pos + 1).to(ACC))
    tot = 2.0 - tl.exp2(-nl.to(ACC))
    nc = N.to(tl.int64) * C
    coef = cnt / (tot * nc.to(ACC) * (li * li).to(ACC))
    c0 = 1.0 / (tot * (nc * H * W).to(ACC))
    return rs, re, cs, ce, used, slot, area, coef, c0


@triton.jit
def _finish_plane(acc, sq_sum, used, slot, area, coef, c0, pooled_ptr, share_ptr, plane, ACC: tl.constexpr):
    """Pooled means of the plane's active bins, and its share c0·Σd² + Σ c_l·P² of the stage loss."""
    p = acc / area.to(ACC)
    tl.store(pooled_ptr + plane.to(tl.int64) * 21 + slot, p, mask=used)
    share = c0 * sq_sum + tl.sum(tl.sum(tl.where(used, coef * p * p, 0.0), axis=1), axis=0)
    tl.store(share_ptr + plane, share)


@triton.jit
def _hcl_fwd_kernel(
    fs_ptr, ft_ptr, pooled_ptr, share_ptr, part_ptr,
    N, C, H, W,
    sfn, sfc, sfh, sfw,
    stn, stc, sth, stw,
    row_tiles,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, ACC: tl.constexpr,
):
    NS: tl.constexpr = 8
    rs, re, cs, ce, used, slot, area, coef, c0 = _bin_table(N, C, H, W, NS, ACC)
    plane = tl.program_id(0)
    n = (plane // C).to(tl.int64)
    c = (plane % C).to(tl.int64)
    fs_base = fs_ptr + n * sfn + c * sfc
    ft_base = ft_ptr + n * stn + c * stc
    hr = tl.arange(0, BLOCK_H)
    wr = tl.arange(0, BLOCK_W)
    sq = tl.zeros([BLOCK_H, BLOCK_W], ACC)
    acc = tl.zeros([NS, NS], ACC)  # acc[i, j]: Σ d over row bin i × col bin j (cross-level pairs unused)
    group = tl.program_id(1)
    for r in range(0, row_tiles):
        h = (group * row_tiles + r) * BLOCK_H + hr
        hm = h < H
        h64 = h.to(tl.int64)
        rm = (h[:, None] >= rs[None, :]) & (h[:, None] < re[None, :])  # [BH, NS] row-bin membership
        for w0 in range(0, W, BLOCK_W):
            w = w0 + wr
            m = hm[:, None] & (w < W)[None, :]
            w64 = w.to(tl.int64)
            a = tl.load(fs_base + h64[:, None] * sfh + w64[None, :] * sfw, mask=m, other=0.0).to(ACC)
            b = tl.load(ft_base + h64[:, None] * sth + w64[None, :] * stw, mask=m, other=0.0).to(ACC)
            d = a - b
            sq += d * d
            # Separable bin sums: per row and col slot, then per row slot. tl.where, not a 0/1
            # product, so an inf or NaN reaches only the bins that contain it.
            cm = (w[:, None] >= cs[None, :]) & (w[:, None] < ce[None, :])
            per_row = tl.sum(tl.where(cm[None, :, :], d[:, :, None], 0.0), axis=1)  # [BH, NS]
            acc += tl.sum(tl.where(rm[:, :, None], per_row[:, None, :], 0.0), axis=0)
    sq_sum = tl.sum(tl.sum(sq, axis=1), axis=0)
    groups = tl.num_programs(1)
    if groups == 1:
        _finish_plane(acc, sq_sum, used, slot, area, coef, c0, pooled_ptr, share_ptr, plane, ACC)
    else:
        # Row groups of one plane: partial bin sums (slots 0-20) and Σd² (slot 21), combined
        # in a fixed order by _hcl_combine_kernel.
        base = (plane.to(tl.int64) * groups + group) * 22
        tl.store(part_ptr + base + slot, acc, mask=used)
        tl.store(part_ptr + base + 21, sq_sum)


@triton.jit
def _hcl_combine_kernel(
    part_ptr, pooled_ptr, share_ptr,
    N, C, H, W, groups,
    ACC: tl.constexpr,
):
    NS: tl.constexpr = 8
    _, _, _, _, used, slot, area, coef, c0 = _bin_table(N, C, H, W, NS, ACC)
    plane = tl.program_id(0)
    acc = tl.zeros([NS, NS], ACC)
    sq_sum = tl.zeros([], ACC)
    for g in range(0, groups):
        base = (plane.to(tl.int64) * groups + g) * 22
        acc += tl.load(part_ptr + base + slot, mask=used, other=0.0)
        sq_sum += tl.load(part_ptr + base + 21)
    _finish_plane(acc, sq_sum, used, slot, area, coef, c0, pooled_ptr, share_ptr, plane, ACC)


@triton.jit
def _hcl_bwd_kernel(
    fs_ptr, ft_ptr, pooled_ptr, gout_ptr, gfs_ptr, gft_ptr,
    N, C, H, W,
    sfn, sfc, sfh, sfw,
    stn, stc, sth, stw,
    write_ft, row_tiles,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, ACC: tl.constexpr,
):
    NS: tl.constexpr = 8
    rs, re, cs, ce, used, slot, area, coef, c0 = _bin_table(N, C, H, W, NS, ACC)
    plane = tl.program_id(0)
    n = (plane // C).to(tl.int64)
    c = (plane % C).to(tl.int64)
    g = tl.load(gout_ptr).to(ACC)
    # q[i, j] = ∂loss/∂(bin sum) = 2·coef·g·P[i, j] / area; zero off the active bins.
    p = tl.load(pooled_ptr + plane.to(tl.int64) * 21 + slot, mask=used, other=0.0).to(ACC)
    q = tl.where(used, (2.0 * g) * coef * p / area.to(ACC), 0.0)
    a0 = 2.0 * c0 * g
    fs_plane = fs_ptr + n * sfn + c * sfc
    ft_plane = ft_ptr + n * stn + c * stc
    g_plane = plane.to(tl.int64) * H * W
    hr = tl.arange(0, BLOCK_H)
    wr = tl.arange(0, BLOCK_W)
    for r in range(0, row_tiles):
        h = (tl.program_id(1) * row_tiles + r) * BLOCK_H + hr
        hm = h < H
        h64 = h.to(tl.int64)
        rm = (h[:, None] >= rs[None, :]) & (h[:, None] < re[None, :])
        t = tl.sum(tl.where(rm[:, :, None], q[None, :, :], 0.0), axis=1)  # [BH, NS]: per row, per col slot
        fs_row = fs_plane + h64[:, None] * sfh
        ft_row = ft_plane + h64[:, None] * sth
        g_row = g_plane + h64[:, None] * W
        for w0 in range(0, W, BLOCK_W):
            w = w0 + wr
            m = hm[:, None] & (w < W)[None, :]
            w64 = w.to(tl.int64)[None, :]
            a = tl.load(fs_row + w64 * sfw, mask=m, other=0.0).to(ACC)
            b = tl.load(ft_row + w64 * stw, mask=m, other=0.0).to(ACC)
            cm = (w[:, None] >= cs[None, :]) & (w[:, None] < ce[None, :])
            grad = a0 * (a - b) + tl.sum(tl.where(cm[None, :, :], t[:, None, :], 0.0), axis=2)
            tl.store(gfs_ptr + g_row + w64, grad.to(gfs_ptr.dtype.element_ty), mask=m)
            if write_ft:
                tl.store(gft_ptr + g_row + w64, (-grad).to(gft_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------
# Launch helpers (torch tensors in, nothing from transkd_fast imported).


def num_levels(H: int) -> int:
    """How many of (4, 2, 1) survive the original's ``if l >= H: continue``."""
    return sum(1 for lv in LEVELS if lv < H)


# [BLOCK_H, BLOCK_W] tiles by map width: three shapes keep the compile matrix small. 512 elements,
# except narrow maps: 16×32 spills on sm_90 (ptxas keeps it at 80 registers), 8×32 does not.
TILES = ((32, (8, 32)), (64, (8, 64)), (None, (4, 128)))
# Planes are split into row groups until about this many programs run (4-8 per SM of an H100).
# In the interpreter the tiles cover whole planes (up to 4096 elements), so larger maps alone split.
FWD_MIN_PROGRAMS = 1024
BWD_MIN_PROGRAMS = 2048


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tile(H: int, W: int) -> tuple[int, int]:
    if _interpreting():
        # The interpreter pays per program iteration, not per element: one tile per plane when it fits.
        bw = triton.next_power_of_2(W)
        if bw <= 4096:
            return max(1, min(triton.next_power_of_2(H), 4096 // bw)), bw
    for max_w, shape in TILES:
        if max_w is None or W <= max_w:
            return shape
    raise AssertionError("unreachable")


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _row_groups(N: int, C: int, H: int, bh: int, min_programs: int) -> tuple[int, int]:
    """(groups, row tiles per group): split planes into row groups until about ``min_programs``."""
    tiles = triton.cdiv(H, bh)
    groups = max(1, min(tiles, triton.cdiv(min_programs, N * C)))
    row_tiles = triton.cdiv(tiles, groups)
    return triton.cdiv(tiles, row_tiles), row_tiles


def hcl_stage_forward(fs: torch.Tensor, ft: torch.Tensor, pooled: torch.Tensor, share: torch.Tensor) -> None:
    """One stage: fill ``pooled`` [N·C·21] and ``share`` [N·C] (fp32, or fp64 for fp64 inputs).

    ``share.sum()`` is this stage's loss_stage; ``pooled`` holds the pooled means of d that
    backward needs (only the active levels' slots are written). Planes too few to fill the
    GPU are split into row groups whose partial sums a second small launch combines.
    """
    N, C, H, W = fs.shape
    bh, bw = _tile(H, W)
    groups, row_tiles = _row_groups(N, C, H, bh, FWD_MIN_PROGRAMS)
    part = pooled.new_empty(N * C * groups * 22) if groups > 1 else pooled
    acc = _acc(fs.dtype)
    _hcl_fwd_kernel[(N * C, groups)](
        fs, ft, pooled, share, part, N, C, H, W, *fs.stride(), *ft.stride(), row_tiles,
        BLOCK_H=bh, BLOCK_W=bw, ACC=acc, num_warps=NUM_WARPS,
    )
    if groups > 1:
        _hcl_combine_kernel[(N * C,)](part, pooled, share, N, C, H, W, groups, ACC=acc, num_warps=1)


def hcl_stage_backward(grad_out: torch.Tensor, fs: torch.Tensor, ft: torch.Tensor, pooled: torch.Tensor,
                       gfs: torch.Tensor, gft: Optional[torch.Tensor]) -> None:
    """Write ∂loss/∂fs into ``gfs`` (contiguous NCHW) and, when given, −that into ``gft``.

    ``grad_out`` is the 0-d gradient of the loss, read on the device (no host sync).
    """
    N, C, H, W = fs.shape
    bh, bw = _tile(H, W)
    groups, row_tiles = _row_groups(N, C, H, bh, BWD_MIN_PROGRAMS)
    _hcl_bwd_kernel[(N * C, groups)](
        fs, ft, pooled, grad_out, gfs, gfs if gft is None else gft, N, C, H, W,
        *fs.stride(), *ft.stride(), int(gft is not None), row_tiles,
        BLOCK_H=bh, BLOCK_W=bw, ACC=_acc(fs.dtype), num_warps=NUM_WARPS,
    )


def compile_specs():
    """Forward and backward × fp16/bf16/fp32 × the three tile shapes of ``TILES`` (the only
    constexprs besides the accumulation dtype), and the combine step of row-split forwards."""
    from transkd_fast.compile_check import CompileSpec

    common = {k: "i32" for k in ("N", "C", "H", "W", "sfn", "sfc", "sfh", "sfw", "stn", "stc", "sth", "stw")}
    tiled = {"BLOCK_H": "constexpr", "BLOCK_W": "constexpr", "ACC": "constexpr"}
    specs = []
    for tname in ("fp16", "bf16", "fp32"):
        ptr = f"*{tname}"
        for _, (bh, bw) in TILES:
            consts = {"BLOCK_H": bh, "BLOCK_W": bw, "ACC": tl.float32}
            fwd_sig = {"fs_ptr": ptr, "ft_ptr": ptr, "pooled_ptr": "*fp32", "share_ptr": "*fp32", "part_ptr": "*fp32",
                       **common, "row_tiles": "i32", **tiled}
            specs.append(CompileSpec(_hcl_fwd_kernel, fwd_sig, consts, num_warps=NUM_WARPS,
                                     label=f"fwd {tname} tile={bh}x{bw}"))
            bwd_sig = {"fs_ptr": ptr, "ft_ptr": ptr, "pooled_ptr": "*fp32", "gout_ptr": "*fp32",
                       "gfs_ptr": ptr, "gft_ptr": ptr, **common, "write_ft": "i32", "row_tiles": "i32", **tiled}
            specs.append(CompileSpec(_hcl_bwd_kernel, bwd_sig, consts, num_warps=NUM_WARPS,
                                     label=f"bwd {tname} tile={bh}x{bw}"))
    # The combine step reads fp32 partial sums whatever the input dtype: one build.
    comb_sig = {"part_ptr": "*fp32", "pooled_ptr": "*fp32", "share_ptr": "*fp32", "N": "i32", "C": "i32", "H": "i32",
                "W": "i32", "groups": "i32", "ACC": "constexpr"}
    specs.append(CompileSpec(_hcl_combine_kernel, comb_sig, {"ACC": tl.float32}, num_warps=1, label="combine fp32"))
    return specs
