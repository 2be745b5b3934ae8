"""Triton kernels of the hierarchical context loss (HCL) of TransKD, one stage per launch.

Per stage, with d = fs − ft of shape ``[N, C, H, W]`` (strided) and the levels of (4, 2, 1)
that survive the original's skip rule ``l >= H`` (``NUM_LEVELS`` of them, always a tail)::

    P_l[n, c, i, j] = mean of d[n, c, rows_i, cols_j]       rows_i = [⌊iH/l⌋, ⌈(i+1)H/l⌉), cols_j alike
    loss_stage      = c0 · Σ d²  +  Σ_l c_l · Σ P_l²         c0 = 1/(tot·NCHW), c_l = cnt_l/(tot·NC·l²)

Since pooling is linear, pool(fs) − pool(ft) = pool(d): the forward reads fs and ft once.

- ``_hcl_fwd_kernel``: one program per (n, c) plane walks the plane in [BLOCK_H, BLOCK_W]
  tiles and accumulates Σd² and, per active level, the l×l bin sums (exact adaptive-pool bins,
  which overlap when H or W is not divisible by l: an element may count in several bins). It
  writes the pooled means P (21 slots per plane: 16 for l=4, 4 for l=2, 1 for l=1; only the
  active levels) and the plane's share of loss_stage. The caller sums the shares of every
  plane of every stage in one reduction; nothing of input size is written.
- ``_hcl_bwd_kernel``: one program per (plane, block of rows) recomputes d and writes
  ∂loss/∂fs = g · (2·c0·d + Σ_l Σ_{bins ∋ (h,w)} 2·c_l·P_l[i, j] / area_ij), and −that for ft.

Bins are applied with ``tl.where``, never by multiplying with a 0/1 mask, so an inf or NaN
reaches exactly the bins that contain it, as in the eager reference.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

POOLED_SLOTS = 21  # 4·4 + 2·2 + 1·1 pooled means per plane
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
def _hcl_fwd_kernel(
    fs_ptr, ft_ptr, pooled_ptr, share_ptr,
    N, C, H, W,
    sfn, sfc, sfh, sfw,
    stn, stc, sth, stw,
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
    for h0 in range(0, H, BLOCK_H):
        h = h0 + hr
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
    p = acc / area.to(ACC)
    tl.store(pooled_ptr + plane.to(tl.int64) * 21 + slot, p, mask=used)
    share = c0 * tl.sum(tl.sum(sq, axis=1), axis=0)
    share += tl.sum(tl.sum(tl.where(used, coef * p * p, 0.0), axis=1), axis=0)
    tl.store(share_ptr + plane, share)


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
BWD_MIN_PROGRAMS = 2048  # backward splits planes into row groups until about this many programs


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


def hcl_stage_forward(fs: torch.Tensor, ft: torch.Tensor, pooled: torch.Tensor, share: torch.Tensor) -> None:
    """One stage: fill ``pooled`` [N·C·21] and ``share`` [N·C] (fp32, or fp64 for fp64 inputs).

    ``share.sum()`` is this stage's loss_stage; ``pooled`` holds the pooled means of d that
    backward needs (only the active levels' slots are written).
    """
    N, C, H, W = fs.shape
    bh, bw = _tile(H, W)
    _hcl_fwd_kernel[(N * C,)](
        fs, ft, pooled, share, N, C, H, W, *fs.stride(), *ft.stride(),
        BLOCK_H=bh, BLOCK_W=bw, ACC=_acc(fs.dtype), num_warps=NUM_WARPS,
    )


def hcl_stage_backward(grad_out: torch.Tensor, fs: torch.Tensor, ft: torch.Tensor, pooled: torch.Tensor,
                       gfs: torch.Tensor, gft: Optional[torch.Tensor]) -> None:
    """Write ∂loss/∂fs into ``gfs`` (contiguous NCHW) and, when given, −that into ``gft``.

    ``grad_out`` is the 0-d gradient of the loss, read on the device (no host sync).
    """
    N, C, H, W = fs.shape
    bh, bw = _tile(H, W)
    tiles = triton.cdiv(H, bh)
    groups = 1 if _interpreting() else min(tiles, triton.cdiv(BWD_MIN_PROGRAMS, N * C))
    row_tiles = triton.cdiv(tiles, groups)
    _hcl_bwd_kernel[(N * C, triton.cdiv(tiles, row_tiles))](
        fs, ft, pooled, grad_out, gfs, gfs if gft is None else gft, N, C, H, W,
        *fs.stride(), *ft.stride(), int(gft is not None), row_tiles,
        BLOCK_H=bh, BLOCK_W=bw, ACC=_acc(fs.dtype), num_warps=NUM_WARPS,
    )


def compile_specs():
    """Both kernels × fp16/bf16/fp32 × the three tile shapes of ``TILES`` (the only constexprs)."""
    from transkd_fast.compile_check import CompileSpec

    common = {k: "i32" for k in ("N", "C", "H", "W", "sfn", "sfc", "sfh", "sfw", "stn", "stc", "sth", "stw")}
    tiled = {"BLOCK_H": "constexpr", "BLOCK_W": "constexpr", "ACC": "constexpr"}
    specs = []
    for tname in ("fp16", "bf16", "fp32"):
        ptr = f"*{tname}"
        for _, (bh, bw) in TILES:
            consts = {"BLOCK_H": bh, "BLOCK_W": bw, "ACC": tl.float32}
            fwd_sig = {"fs_ptr": ptr, "ft_ptr": ptr, "pooled_ptr": "*fp32", "share_ptr": "*fp32", **common, **tiled}
            specs.append(CompileSpec(_hcl_fwd_kernel, fwd_sig, consts, num_warps=NUM_WARPS,
                                     label=f"fwd {tname} tile={bh}x{bw}"))
            bwd_sig = {"fs_ptr": ptr, "ft_ptr": ptr, "pooled_ptr": "*fp32", "gout_ptr": "*fp32",
                       "gfs_ptr": ptr, "gft_ptr": ptr, **common, "write_ft": "i32", "row_tiles": "i32", **tiled}
            specs.append(CompileSpec(_hcl_bwd_kernel, bwd_sig, consts, num_warps=NUM_WARPS,
                                     label=f"bwd {tname} tile={bh}x{bw}"))
    return specs
