"""Triton kernels of the hierarchical context loss (HCL) of TransKD, one stage per launch.

Per stage, with d = fs − ft of shape ``[N, C, H, W]`` (strided) and the levels of (4, 2, 1)
that survive the original's skip rule ``l >= H`` (always a tail of the tuple)::

    P_l[n, c, i, j] = mean of d[n, c, rows_i, cols_j]       rows_i = [⌊iH/l⌋, ⌈(i+1)H/l⌉), cols_j alike
    loss_stage      = c0 · Σ d²  +  Σ_l c_l · Σ P_l²         c0 = 1/(tot·NCHW), c_l = cnt_l/(tot·NC·l²)

Since pooling is linear, pool(fs) − pool(ft) = pool(d): the forward reads fs and ft once.
The bins of all levels share one table of 8 slots per axis (4 + 2 + 1 + an empty pad), so a
tile's bin sums are two masked reductions (over its columns into column slots, then over its
rows into row slots); exact adaptive-pool bins, which overlap when H or W is not divisible by l.

Two layouts, each read along its contiguous axis (the launcher picks by ``fs``'s strides):

- **planes** (W innermost: contiguous NCHW): ``_hcl_fwd_kernel`` / ``_hcl_bwd_kernel``. One
  program per (n, c) plane, or per row group of it when the planes are too few to fill the
  GPU, walks its rows in [BLOCK_H, BLOCK_W] tiles, vectorized along W.
- **channels innermost** (channels_last, what the MiT stages and CSF produce):
  ``_hcl_fwd_cl_kernel`` / ``_hcl_bwd_cl_kernel``. One program per (n, block of BLOCK_C
  channels, band of rows × band of column tiles) walks its rows one at a time in
  [BLOCK_W pixels, BLOCK_C channels] tiles, vectorized along C; the bin sums of each (n, c)
  accumulate over the program's pixel tiles as an [8, 8, BLOCK_C] table.

Forward: a program that covers whole planes writes their pooled means P (21 slots per (n, c):
16 for l = 4, 4 for l = 2, 1 for l = 1; active levels only) and their shares of loss_stage; a
program of a split plane writes partial sums (21 bin sums + Σd² per (n, c, group)) that
``_hcl_combine_kernel`` adds in a fixed order (deterministic) before doing the same. The caller
sums the shares of all planes of all stages in one reduction. Nothing of input size is written.
Backward: one program per tile band recomputes d and writes
∂loss/∂fs = g · (2·c0·d + Σ_l Σ_{bins ∋ (h,w)} 2·c_l·P_l[i, j] / area_ij), and −that for ft,
into gradients of any strides (the ops allocate them in the inputs' layouts).

Bins are applied with ``tl.where``, never by multiplying with a 0/1 mask, so an inf or NaN
reaches exactly the bins that contain it, as in the eager reference. The loss coefficients
are computed in the kernel from N, C, H, W in the accumulation dtype (fp64 for fp64 inputs).

Every int argument may arrive as a ``constexpr`` 1 at a GPU launch (the JIT specializes ints
equal to 1: batch 1, H = 1, W = 1, unit strides, one row tile): the kernels only combine them
with tensors, or turn them into tensors with ``tl.full`` before calling tensor methods.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._device import sm_count

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
    # N, C, H, W are constexpr 1 at launches where they equal 1: make tensors of them first
    # (``(H > 4).to(...)`` on a constexpr is a Python bool, ``N.to(...)`` an AttributeError).
    h = tl.full([], H, tl.int32)
    w = tl.full([], W, tl.int32)
    k = tl.arange(0, NS)
    lvl = tl.where(k < 4, 4, tl.where(k < 6, 2, 1))
    b = tl.where(k < 4, k, tl.where(k < 6, k - 4, 0))
    rs = (b * h) // lvl
    re = tl.where(k < 7, ((b + 1) * h + lvl - 1) // lvl, 0)
    cs = (b * w) // lvl
    ce = tl.where(k < 7, ((b + 1) * w + lvl - 1) // lvl, 0)
    li = lvl[:, None]
    used = (li == lvl[None, :]) & (k[:, None] < 7) & (k[None, :] < 7) & (li < h)
    slot = tl.where(li == 4, 0, tl.where(li == 2, 16, 20)) + b[:, None] * li + b[None, :]
    area = tl.where(used, (re - rs)[:, None] * (ce - cs)[None, :], 1)
    nl = (h > 4).to(tl.int32) + (h > 2).to(tl.int32) + (h > 1).to(tl.int32)
    # position of the level among the active ones: cnt = 0.5^(position + 1)
    pos = tl.where(li == 4, 0, tl.where(li == 2, 1, 2)) - (3 - nl)
    cnt = tl.exp2(-(pos + 1).to(ACC))
    tot = 2.0 - tl.exp2(-nl.to(ACC))
    nc = tl.full([], N, tl.int64) * C
    coef = cnt / (tot * nc.to(ACC) * (li * li).to(ACC))
    c0 = 1.0 / (tot * (nc * h * w).to(ACC))
    return rs, re, cs, ce, used, slot, area, coef, c0


# ---------------------------------------------------------------------------------------
# Planes: W innermost.


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
    sgn, sgc, sgh, sgw,
    sun, suc, suh, suw,
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
    gs_plane = gfs_ptr + n * sgn + c * sgc
    gt_plane = gft_ptr + n * sun + c * suc
    hr = tl.arange(0, BLOCK_H)
    wr = tl.arange(0, BLOCK_W)
    for r in range(0, row_tiles):
        h = (tl.program_id(1) * row_tiles + r) * BLOCK_H + hr
        hm = h < H
        h64 = h.to(tl.int64)[:, None]
        rm = (h[:, None] >= rs[None, :]) & (h[:, None] < re[None, :])
        t = tl.sum(tl.where(rm[:, :, None], q[None, :, :], 0.0), axis=1)  # [BH, NS]: per row, per col slot
        for w0 in range(0, W, BLOCK_W):
            w = w0 + wr
            m = hm[:, None] & (w < W)[None, :]
            w64 = w.to(tl.int64)[None, :]
            a = tl.load(fs_plane + h64 * sfh + w64 * sfw, mask=m, other=0.0).to(ACC)
            b = tl.load(ft_plane + h64 * sth + w64 * stw, mask=m, other=0.0).to(ACC)
            cm = (w[:, None] >= cs[None, :]) & (w[:, None] < ce[None, :])
            grad = a0 * (a - b) + tl.sum(tl.where(cm[None, :, :], t[:, None, :], 0.0), axis=2)
            tl.store(gs_plane + h64 * sgh + w64 * sgw, grad.to(gfs_ptr.dtype.element_ty), mask=m)
            if write_ft:
                tl.store(gt_plane + h64 * suh + w64 * suw, (-grad).to(gft_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------
# Channels innermost (channels_last).


@triton.jit
def _hcl_fwd_cl_kernel(
    fs_ptr, ft_ptr, pooled_ptr, share_ptr, part_ptr,
    N, C, H, W,
    sfn, sfc, sfh, sfw,
    stn, stc, sth, stw,
    rows_per_group, col_tiles, col_groups,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    NS: tl.constexpr = 8
    rs, re, cs, ce, used, slot, area, coef, c0 = _bin_table(N, C, H, W, NS, ACC)
    c_blocks = tl.cdiv(C, BLOCK_C)
    unit = tl.program_id(0)
    n = (unit // c_blocks).to(tl.int64)
    c = (unit % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c64 = c.to(tl.int64)[None, :]
    fs_base = fs_ptr + n * sfn + c64 * sfc
    ft_base = ft_ptr + n * stn + c64 * stc
    group = tl.program_id(1)
    row0 = (group // col_groups) * rows_per_group
    tile0 = (group % col_groups) * col_tiles
    wr = tl.arange(0, BLOCK_W)
    sq = tl.zeros([BLOCK_W, BLOCK_C], ACC)
    acc = tl.zeros([NS, NS, BLOCK_C], ACC)  # acc[i, j, c]: Σ d over row bin i × col bin j of channel c
    for r in range(0, rows_per_group):
        h = row0 + r
        h64 = h.to(tl.int64)
        # Rows past H (the last band) load nothing. One scalar per row; ``(w < W) & (h < H)`` would
        # also do on a GPU, but the interpreter turns a scalar-and-block ``&`` into an int mask
        # ("mask has unsupported dtype").
        w_end = tl.where(h < H, W, 0)
        row = tl.zeros([NS, BLOCK_C], ACC)  # per col slot: Σ d over this row's pixels in the bin
        for t in range(0, col_tiles):
            w = (tile0 + t) * BLOCK_W + wr
            m = (w < w_end)[:, None] & c_ok[None, :]
            w64 = w.to(tl.int64)[:, None]
            a = tl.load(fs_base + h64 * sfh + w64 * sfw, mask=m, other=0.0).to(ACC)
            b = tl.load(ft_base + h64 * sth + w64 * stw, mask=m, other=0.0).to(ACC)
            d = a - b
            sq += d * d
            # tl.where, not a 0/1 product: an inf or NaN reaches only the bins that contain it.
            cm = (w[:, None] >= cs[None, :]) & (w[:, None] < ce[None, :])  # [BW, NS]
            row += tl.sum(tl.where(cm[:, :, None], d[:, None, :], 0.0), axis=0)
        rm = (h >= rs) & (h < re)  # [NS]: the row slots this row belongs to (none past H)
        acc += tl.where(rm[:, None, None], row[None, :, :], 0.0)
    sq_c = tl.sum(sq, axis=0)
    plane = (n * C + c64)  # [1, BC]
    groups = tl.num_programs(1)
    m3 = used[:, :, None] & c_ok[None, None, :]
    if groups == 1:
        p = acc / area[:, :, None].to(ACC)
        tl.store(pooled_ptr + plane[None, :, :] * 21 + slot[:, :, None], p, mask=m3)
        share = c0 * sq_c + tl.sum(tl.sum(tl.where(m3, coef[:, :, None] * p * p, 0.0), axis=1), axis=0)
        tl.store(share_ptr + tl.reshape(plane, [BLOCK_C]), share, mask=c_ok)
    else:
        # Partial bin sums (slots 0-20) and Σd² (slot 21) per (n, c, group), combined in a fixed
        # order by _hcl_combine_kernel (the planes' layout of partials).
        base = (plane * groups + group) * 22
        tl.store(part_ptr + base[None, :, :] + slot[:, :, None], acc, mask=m3)
        tl.store(part_ptr + tl.reshape(base, [BLOCK_C]) + 21, sq_c, mask=c_ok)


@triton.jit
def _hcl_bwd_cl_kernel(
    fs_ptr, ft_ptr, pooled_ptr, gout_ptr, gfs_ptr, gft_ptr,
    N, C, H, W,
    sfn, sfc, sfh, sfw,
    stn, stc, sth, stw,
    sgn, sgc, sgh, sgw,
    sun, suc, suh, suw,
    write_ft, rows_per_group, col_tiles, col_groups,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    NS: tl.constexpr = 8
    rs, re, cs, ce, used, slot, area, coef, c0 = _bin_table(N, C, H, W, NS, ACC)
    c_blocks = tl.cdiv(C, BLOCK_C)
    unit = tl.program_id(0)
    n = (unit // c_blocks).to(tl.int64)
    c = (unit % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c64 = c.to(tl.int64)[None, :]
    g = tl.load(gout_ptr).to(ACC)
    # q[i, j, c] = ∂loss/∂(bin sum) = 2·coef·g·P[i, j, c] / area; zero off the active bins.
    m3 = used[:, :, None] & c_ok[None, None, :]
    p = tl.load(pooled_ptr + (n * C + c64)[None, :, :] * 21 + slot[:, :, None], mask=m3, other=0.0).to(ACC)
    q = tl.where(m3, (2.0 * g) * coef[:, :, None] * p / area[:, :, None].to(ACC), 0.0)
    a0 = 2.0 * c0 * g
    fs_base = fs_ptr + n * sfn + c64 * sfc
    ft_base = ft_ptr + n * stn + c64 * stc
    gs_base = gfs_ptr + n * sgn + c64 * sgc
    gt_base = gft_ptr + n * sun + c64 * suc
    group = tl.program_id(1)
    row0 = (group // col_groups) * rows_per_group
    tile0 = (group % col_groups) * col_tiles
    wr = tl.arange(0, BLOCK_W)
    for r in range(0, rows_per_group):
        h = row0 + r
        h64 = h.to(tl.int64)
        w_end = tl.where(h < H, W, 0)  # rows past H store nothing (see the forward)
        rm = (h >= rs) & (h < re)
        t_row = tl.sum(tl.where(rm[:, None, None], q, 0.0), axis=0)  # [NS, BC]: this row, per col slot
        for t in range(0, col_tiles):
            w = (tile0 + t) * BLOCK_W + wr
            m = (w < w_end)[:, None] & c_ok[None, :]
            w64 = w.to(tl.int64)[:, None]
            a = tl.load(fs_base + h64 * sfh + w64 * sfw, mask=m, other=0.0).to(ACC)
            b = tl.load(ft_base + h64 * sth + w64 * stw, mask=m, other=0.0).to(ACC)
            cm = (w[:, None] >= cs[None, :]) & (w[:, None] < ce[None, :])
            grad = a0 * (a - b) + tl.sum(tl.where(cm[:, :, None], t_row[None, :, :], 0.0), axis=1)
            tl.store(gs_base + h64 * sgh + w64 * sgw, grad.to(gfs_ptr.dtype.element_ty), mask=m)
            if write_ft:
                tl.store(gt_base + h64 * suh + w64 * suw, (-grad).to(gft_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------
# Launch helpers (torch tensors in, nothing from transkd_fast imported).


def num_levels(H: int) -> int:
    """How many of (4, 2, 1) survive the original's ``if l >= H: continue``."""
    return sum(1 for lv in LEVELS if lv < H)


# Planes: [BLOCK_H, BLOCK_W] tiles by map width; three shapes keep the compile matrix small. 512
# elements, except narrow maps: 16×32 spills on sm_90 (ptxas keeps it at 80 registers), 8×32 does not.
TILES = ((32, (8, 32)), (64, (8, 64)), (None, (4, 128)))
# Channels innermost: [BLOCK_W, BLOCK_C] tiles of CL_TILE elements, BLOCK_C = C rounded up to a
# power of two, at most CL_MAX_C: 16 channels are one whole 32-byte sector of fp16 (two of fp32)
# per pixel, and small channel blocks give many programs per sample, so the forward fills the GPU
# with groups of many pixels (its partial sums, 22 fp32 per channel and group, stay few).
CL_TILE = 512
CL_MAX_C = 16
# Grids: split the work until about this many programs per SM run. The forward's groups write
# partial sums, so a channel-innermost group keeps at least CL_MIN_GROUP_PIXELS pixels (partials
# ≤ 17% of the fp16 input bytes; the plane kernels' groups are whole rows of long planes).
FWD_PROGRAMS_PER_SM = 8
BWD_PROGRAMS_PER_SM = 16
CL_MIN_GROUP_PIXELS = 256
# SMs assumed for CPU tensors (the interpreter): few, so small test maps still take the split paths.
INTERPRET_SMS = 2
# Test speed only: the interpreter pays per program iteration, not per element, so under it the
# tiles grow to cover whole planes / rows (up to INTERPRET_TILE elements). The GPU tiles above are
# what the compile check builds, and tests run them in the interpreter too (monkeypatched).
INTERPRET_TILE = 4096


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tile(H: int, W: int) -> tuple[int, int]:
    """[BLOCK_H, BLOCK_W] of the plane kernels."""
    if _interpreting():  # test speed (see INTERPRET_TILE)
        bw = triton.next_power_of_2(W)
        if bw <= INTERPRET_TILE:
            return max(1, min(triton.next_power_of_2(H), INTERPRET_TILE // bw)), bw
    for max_w, shape in TILES:
        if max_w is None or W <= max_w:
            return shape
    raise AssertionError("unreachable")


def _cl_tile(C: int, W: int) -> tuple[int, int]:
    """[BLOCK_W, BLOCK_C] of the channels-innermost kernels."""
    if _interpreting():  # test speed (see INTERPRET_TILE)
        bc = min(triton.next_power_of_2(C), 64)
        return max(1, min(triton.next_power_of_2(W), INTERPRET_TILE // bc)), bc
    bc = min(triton.next_power_of_2(C), CL_MAX_C)
    return CL_TILE // bc, bc


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def channels_inner(t: torch.Tensor) -> bool:
    """Whether ``t`` [N, C, H, W] has its channels innermost in memory (channels_last), so the
    channel-tiled kernels read it along its contiguous axis."""
    N, C, H, W = t.shape
    return C > 1 and t.stride(1) == 1 and (W == 1 or t.stride(3) != 1)


def _row_groups(N: int, C: int, H: int, bh: int, min_programs: int) -> tuple[int, int]:
    """(groups, row tiles per group): split planes into row groups until about ``min_programs``."""
    tiles = triton.cdiv(H, bh)
    groups = max(1, min(tiles, triton.cdiv(min_programs, N * C)))
    row_tiles = triton.cdiv(tiles, groups)
    return triton.cdiv(tiles, row_tiles), row_tiles


def _cl_groups(units: int, H: int, W: int, bw: int, min_programs: int,
               min_pixels: int = 0) -> tuple[int, int, int, int]:
    """(row groups, rows per group, column groups, column tiles per group) of the channel-tiled
    grid: bands of rows first, then bands of column tiles, until about ``min_programs`` programs
    (and, when given, no fewer than ``min_pixels`` pixels per group)."""
    col_tiles = triton.cdiv(W, bw)
    want = triton.cdiv(min_programs, units)
    if min_pixels:
        want = min(want, max(1, (H * W) // min_pixels))
    row_groups = max(1, min(H, want))
    rows = triton.cdiv(H, row_groups)
    row_groups = triton.cdiv(H, rows)
    col_groups = max(1, min(col_tiles, triton.cdiv(want, row_groups)))
    tiles = triton.cdiv(col_tiles, col_groups)
    return row_groups, rows, triton.cdiv(col_tiles, tiles), tiles


def hcl_stage_forward(fs: torch.Tensor, ft: torch.Tensor, pooled: torch.Tensor, share: torch.Tensor) -> None:
    """One stage: fill ``pooled`` [N·C·21] and ``share`` [N·C] (fp32, or fp64 for fp64 inputs).

    ``share.sum()`` is this stage's loss_stage; ``pooled`` holds the pooled means of d that
    backward needs (only the active levels' slots are written). Work too small to fill the GPU is
    split into groups whose partial sums a second small launch combines. The kernel reads along
    fs's contiguous axis: W (planes) or C (channels_last).
    """
    N, C, H, W = fs.shape
    acc = _acc(fs.dtype)
    min_programs = FWD_PROGRAMS_PER_SM * sm_count(fs.device, INTERPRET_SMS)
    if channels_inner(fs):
        bw, bc = _cl_tile(C, W)
        units = N * triton.cdiv(C, bc)
        row_groups, rows, col_groups, tiles = _cl_groups(units, H, W, bw, min_programs, CL_MIN_GROUP_PIXELS)
        groups = row_groups * col_groups
        part = pooled.new_empty(N * C * groups * 22) if groups > 1 else pooled
        _hcl_fwd_cl_kernel[(units, groups)](
            fs, ft, pooled, share, part, N, C, H, W, *fs.stride(), *ft.stride(), rows, tiles, col_groups,
            BLOCK_W=bw, BLOCK_C=bc, ACC=acc, num_warps=NUM_WARPS,
        )
    else:
        bh, bw = _tile(H, W)
        groups, row_tiles = _row_groups(N, C, H, bh, min_programs)
        part = pooled.new_empty(N * C * groups * 22) if groups > 1 else pooled
        _hcl_fwd_kernel[(N * C, groups)](
            fs, ft, pooled, share, part, N, C, H, W, *fs.stride(), *ft.stride(), row_tiles,
            BLOCK_H=bh, BLOCK_W=bw, ACC=acc, num_warps=NUM_WARPS,
        )
    if groups > 1:
        _hcl_combine_kernel[(N * C,)](part, pooled, share, N, C, H, W, groups, ACC=acc, num_warps=1)


def hcl_stage_backward(grad_out: torch.Tensor, fs: torch.Tensor, ft: torch.Tensor, pooled: torch.Tensor,
                       gfs: torch.Tensor, gft: Optional[torch.Tensor]) -> None:
    """Write ∂loss/∂fs into ``gfs`` and, when given, −that into ``gft`` (any strides: the ops
    pass gradients in the inputs' layouts).

    ``grad_out`` is the 0-d gradient of the loss, read on the device (no host sync).
    """
    N, C, H, W = fs.shape
    gt = gfs if gft is None else gft
    min_programs = BWD_PROGRAMS_PER_SM * sm_count(fs.device, INTERPRET_SMS)
    args = (fs, ft, pooled, grad_out, gfs, gt, N, C, H, W,
            *fs.stride(), *ft.stride(), *gfs.stride(), *gt.stride(), int(gft is not None))
    if channels_inner(fs):
        bw, bc = _cl_tile(C, W)
        units = N * triton.cdiv(C, bc)
        row_groups, rows, col_groups, tiles = _cl_groups(units, H, W, bw, min_programs)
        _hcl_bwd_cl_kernel[(units, row_groups * col_groups)](
            *args, rows, tiles, col_groups, BLOCK_W=bw, BLOCK_C=bc, ACC=_acc(fs.dtype), num_warps=NUM_WARPS,
        )
    else:
        bh, bw = _tile(H, W)
        groups, row_tiles = _row_groups(N, C, H, bh, min_programs)
        _hcl_bwd_kernel[(N * C, groups)](
            *args, row_tiles, BLOCK_H=bh, BLOCK_W=bw, ACC=_acc(fs.dtype), num_warps=NUM_WARPS,
        )
