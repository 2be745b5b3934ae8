"""Triton kernels of the KD / CWD KL-divergence loss (``transkd_fast.ops.kl_div``).

For student logits s and teacher logits t (NCHW, any strides) and temperature T, every
"row" r is one softmax: a pixel's C classes (``spatial``) or an (n, c) map's H·W values
(``channel``)::

    ls = s_r/T − lse(s_r/T),  lt = t_r/T − lse(t_r/T)           log-softmax, lse in fp32
    kl_r = Σ exp(lt) · (lt − ls)
    d_r  = exp(ls) − exp(lt)                                      = p_s − p_t

The kernels write per-program partial sums of kl (the op scales their sum by T²/R) and,
when the student needs a gradient, ``d`` (student-sized, in the student's dtype): the
gradient is d · T/R · grad_loss, applied by :func:`kl_scale` in backward. Nothing else
of size N·C·H·W is written or kept.

- ``spatial``: a program takes a tile of BLOCK_C classes x BLOCK_P pixels. When C fits one
  tile the tile is read once; otherwise two passes over class chunks (online max/sum-exp,
  then log-probabilities). Pixels are addressed as p·sw when every map is one strided run
  (``FLAT``), so NCHW pixels are vector loads; under channels_last the classes are the
  contiguous axis and the same kernel vectorizes them (smaller tiles: registers).
- ``channel``: rows (n, c) are H·W long. Program (c-tile, split, n) takes BLOCK_R channels of
  one sample x BLOCK pixels per step, over chunk ``split`` of the H·W axis (SPLIT chunks per
  row: enough programs to fill the GPU), so the tile reads along whichever axis the layout
  makes contiguous: NCHW, 2 channels x 512 pixels (pixels vectorized); channels_last, up to
  64 channels x 16-64 pixels (channels vectorized), no transposed copy. Two kernels: per-chunk
  lane-wise online max/sum-exp statistics, then a kernel that merges the row's statistics
  and writes d and the loss partials for its chunk. Channel mode thus reads s and t twice
  (d needs the final log-sum-exp); the spatial mode reads them once when C fits one tile.

Math in fp32 (fp64 for fp64 inputs) whatever the storage dtype; strides are arguments;
row and pixel offsets are int64; every load and store is masked. NaN is never masked:
a NaN logit makes its row's log-sum-exp NaN and so the loss.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._device import sm_count

# Tiles hold 1024-2048 values per tensor (8-16 per thread at 4 warps): more would cut occupancy
# of these memory-bound kernels or spill.
# Spatial mode: one tile holds every class when C <= BLOCK_C; key BLOCK_C -> (BLOCK_P, num_warps).
# Pixels contiguous (NCHW): 2048 values per tile.
SPATIAL_ONE_TILE = {32: (64, 4), 64: (32, 4), 128: (16, 4), 256: (8, 4)}
# Classes contiguous (channels_last): 1024 values per tile; the [classes, pixels] tile then has its
# fast axis along the reduced one and 2048 values took ~250 registers.
SPATIAL_ONE_TILE_CL = {32: (32, 4), 64: (16, 4), 128: (8, 4), 256: (4, 4)}
# C > 256: two passes over chunks of classes.
SPATIAL_LOOP = (32, 64, 4)  # (BLOCK_C, BLOCK_P, num_warps)
SPATIAL_LOOP_CL = (64, 16, 4)
# Channel mode: tiles of BLOCK_R channels (of one sample) x BLOCK pixels, (BLOCK_R, BLOCK, num_warps).
# Pixels contiguous (NCHW): 2 rows x 512 pixels.
CHANNEL_CONFIG = (2, 512, 4)
# Channels contiguous (channels_last): up to 64 channels x 1024 / BLOCK_R pixels (see channel_config).
CHANNEL_CL_VALUES, CHANNEL_CL_MAX_R = 1024, 64
# At most MAX_SPLIT chunks per row, and at most SPLIT_VALUES // BLOCK_R (the [BLOCK_R, BLOCK_SPLIT]
# tile of statistics the forward kernel merges).
MAX_SPLIT, SPLIT_VALUES = 64, 1024
# Test-speed choice: the interpreter pays per program and per op, not per element, so the
# interpreted tests use fewer, bigger tiles (the GPU configs above are still compiled by the
# compile check and forced in test_kernel_launch_variants_and_poison).
CHANNEL_INTERPRET = (16, 256, 4)
CHANNEL_CL_INTERPRET_VALUES = 4096
SCALE_BLOCK, SCALE_WARPS = 2048, 4

_NEG_INF = tl.constexpr(float("-inf"))


# write_grad is a runtime flag (never specialized): one build serves training and no-grad use.
@triton.jit(do_not_specialize=["write_grad"])
def _kl_spatial_fwd_kernel(
    s_ptr, t_ptr, d_ptr, part_ptr,
    C, HW, W,
    s_sn, s_sc, s_sh, s_sw,
    t_sn, t_sc, t_sh, t_sw,
    d_sn, d_sc, d_sh, d_sw,
    inv_t,
    write_grad, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ONE_TILE: tl.constexpr, FLAT: tl.constexpr,
    ALIGN: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if s_ptr.dtype.element_ty == tl.float64 else tl.float32
    # ALIGN (a power of two, see align_of) divides C and the sample and pixel strides: visible
    # to the compiler, a channels_last pixel's classes are vector accesses even when C is not
    # a multiple of 16 (C = 20 logits: 128-bit fp32, 64-bit fp16/bf16 accesses).
    C = _aligned(C, ALIGN)
    s_sn, s_sh, s_sw = _aligned_strides(s_sn, s_sh, s_sw, ALIGN)
    t_sn, t_sh, t_sw = _aligned_strides(t_sn, t_sh, t_sw, ALIGN)
    d_sn, d_sh, d_sw = _aligned_strides(d_sn, d_sh, d_sw, ALIGN)
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HW
    # FLAT (every map one strided run): offsets p·sw keep the pixel axis's contiguity visible
    # to the compiler (vector loads along NCHW pixels); h = p // W would hide it.
    s_pix = s_ptr + n * s_sn + _row_offsets(p, W, s_sh, s_sw, FLAT)
    t_pix = t_ptr + n * t_sn + _row_offsets(p, W, t_sh, t_sw, FLAT)
    d_pix = d_ptr + n * d_sn + _row_offsets(p, W, d_sh, d_sw, FLAT)
    cc = tl.arange(0, BLOCK_C).to(tl.int64)

    if ONE_TILE:
        cmask = cc < C
        mask = cmask[:, None] & pmask[None, :]
        s = tl.load(s_pix[None, :] + (cc * s_sc)[:, None], mask=mask, other=_NEG_INF).to(ACC) * inv_t
        t = tl.load(t_pix[None, :] + (cc * t_sc)[:, None], mask=mask, other=_NEG_INF).to(ACC) * inv_t
        # Padded classes are -inf and vanish in the sums; padded pixels produce NaN that
        # the final where() and the masked store discard.
        m_s = tl.max(s, 0)
        m_t = tl.max(t, 0)
        e_s = tl.exp(s - m_s[None, :])
        e_t = tl.exp(t - m_t[None, :])
        l_s = tl.sum(e_s, 0)
        l_t = tl.sum(e_t, 0)
        ls = s - (m_s + tl.log(l_s))[None, :]
        lt = t - (m_t + tl.log(l_t))[None, :]
        pt = e_t * (1.0 / l_t)[None, :]
        kl = tl.where(mask, pt * (lt - ls), 0.0)
        if write_grad != 0:
            ps = e_s * (1.0 / l_s)[None, :]
            tl.store(d_pix[None, :] + (cc * d_sc)[:, None], (ps - pt).to(d_ptr.dtype.element_ty), mask=mask)
        total = tl.sum(tl.sum(kl, 1), 0)
    else:
        m_s = tl.full([BLOCK_P], _NEG_INF, ACC)
        m_t = tl.full([BLOCK_P], _NEG_INF, ACC)
        l_s = tl.zeros([BLOCK_P], ACC)
        l_t = tl.zeros([BLOCK_P], ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cc
            mask = (c < C)[:, None] & pmask[None, :]
            s = tl.load(s_pix[None, :] + (c * s_sc)[:, None], mask=mask, other=_NEG_INF).to(ACC) * inv_t
            t = tl.load(t_pix[None, :] + (c * t_sc)[:, None], mask=mask, other=_NEG_INF).to(ACC) * inv_t
            new_s = tl.maximum(m_s, tl.max(s, 0), propagate_nan=tl.PropagateNan.ALL)
            new_t = tl.maximum(m_t, tl.max(t, 0), propagate_nan=tl.PropagateNan.ALL)
            # A max still at -inf (all -inf so far) must not turn into -inf - -inf = NaN.
            safe_s = tl.where(new_s == _NEG_INF, 0.0, new_s)
            safe_t = tl.where(new_t == _NEG_INF, 0.0, new_t)
            l_s = l_s * tl.exp(m_s - safe_s) + tl.sum(tl.exp(s - safe_s[None, :]), 0)
            l_t = l_t * tl.exp(m_t - safe_t) + tl.sum(tl.exp(t - safe_t[None, :]), 0)
            m_s = new_s
            m_t = new_t
        lse_s = m_s + tl.log(l_s)
        lse_t = m_t + tl.log(l_t)
        acc = tl.zeros([BLOCK_C, BLOCK_P], ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cc
            mask = (c < C)[:, None] & pmask[None, :]
            s = tl.load(s_pix[None, :] + (c * s_sc)[:, None], mask=mask, other=_NEG_INF).to(ACC) * inv_t
            t = tl.load(t_pix[None, :] + (c * t_sc)[:, None], mask=mask, other=_NEG_INF).to(ACC) * inv_t
            ls = s - lse_s[None, :]
            lt = t - lse_t[None, :]
            pt = tl.exp(lt)
            acc += tl.where(mask, pt * (lt - ls), 0.0)
            if write_grad != 0:
                tl.store(d_pix[None, :] + (c * d_sc)[:, None], (tl.exp(ls) - pt).to(d_ptr.dtype.element_ty),
                         mask=mask)
        total = tl.sum(tl.sum(acc, 1), 0)
    tl.store(part_ptr + n * tl.num_programs(0) + pid_p, total)


@triton.jit
def _row_offsets(p, W, sh, sw, FLAT: tl.constexpr):
    """Offsets of flat pixel indices p (int64) of an H×W map with strides (sh, sw)."""
    if FLAT:
        off = p * sw
    else:
        h = p // W
        off = h * sh + (p - h * W) * sw
    return off


@triton.jit
def _aligned(x, A: tl.constexpr):
    """x, a multiple of A (the launcher checked), with that divisibility visible to the compiler."""
    return (x // A) * A


@triton.jit
def _aligned_strides(sn, sh, sw, A: tl.constexpr):
    return _aligned(sn, A), _aligned(sh, A), _aligned(sw, A)


@triton.jit
def _online_update(m, z, x):
    """Lane-wise online (max m, sum-exp z) update with one exp per element."""
    new = tl.maximum(m, x, propagate_nan=tl.PropagateNan.ALL)
    low = tl.minimum(m, x, propagate_nan=tl.PropagateNan.ALL)
    e = tl.exp(tl.where(new == _NEG_INF, _NEG_INF, low - new))
    # x > m: the old sum is rescaled and x contributes exp(0); otherwise x adds e. NaN takes
    # the second branch and poisons z.
    z = tl.where(x > m, z * e + 1.0, z + e)
    return new, z


@triton.jit
def _merge_lanes(m, z, AXIS: tl.constexpr):
    """Merge lane-wise (max, sum-exp) pairs along AXIS into one pair per row."""
    big = tl.max(m, AXIS)
    if AXIS == 0:
        total = tl.sum(tl.where(m == _NEG_INF, 0.0, z * tl.exp(m - big)), 0)
    else:
        total = tl.sum(tl.where(m == _NEG_INF, 0.0, z * tl.exp(m - big[:, None])), 1)
    return big, total


@triton.jit
def _kl_channel_stats_kernel(
    s_ptr, t_ptr, stats_ptr,
    C, HW, W, chunk,
    s_sn, s_sc, s_sh, s_sw,
    t_sn, t_sc, t_sh, t_sw,
    inv_t,
    BLOCK_R: tl.constexpr, BLOCK: tl.constexpr, FLAT: tl.constexpr, ALIGN: tl.constexpr,
):
    """Per (n, c) row and chunk of its H·W pixels: online (max, sum-exp) of s/T and t/T.

    Program (c-tile, split, n) holds a [BLOCK_R channels, BLOCK pixels] tile: the channels
    are of one sample, so the channel offsets c·sc stay visibly contiguous when sc == 1
    (channels_last) and the pixel offsets p·sw when sw == 1 (NCHW); the compiler vectorizes
    whichever axis is contiguous. Statistics are kept lane-wise over the loop and merged
    once at the end."""
    ACC: tl.constexpr = tl.float64 if s_ptr.dtype.element_ty == tl.float64 else tl.float32
    # ALIGN (a power of two, see align_of) divides C and the sample and pixel strides: visible
    # to the compiler, a channels_last pixel's classes are vector accesses even when C is not
    # a multiple of 16 (C = 20 logits: 128-bit fp32, 64-bit fp16/bf16 accesses).
    C = _aligned(C, ALIGN)
    s_sn, s_sh, s_sw = _aligned_strides(s_sn, s_sh, s_sw, ALIGN)
    t_sn, t_sh, t_sw = _aligned_strides(t_sn, t_sh, t_sw, ALIGN)
    c = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cmask = c < C
    split = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    s_row = s_ptr + n * s_sn + c * s_sc
    t_row = t_ptr + n * t_sn + c * t_sc
    start = split.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, HW)
    m_s = tl.full([BLOCK_R, BLOCK], _NEG_INF, ACC)
    m_t = tl.full([BLOCK_R, BLOCK], _NEG_INF, ACC)
    l_s = tl.zeros([BLOCK_R, BLOCK], ACC)
    l_t = tl.zeros([BLOCK_R, BLOCK], ACC)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    for off in range(start, end, BLOCK):
        p = off + lanes
        mask = cmask[:, None] & (p < end)[None, :]
        s = tl.load(s_row[:, None] + _row_offsets(p, W, s_sh, s_sw, FLAT)[None, :], mask=mask,
                    other=_NEG_INF).to(ACC) * inv_t
        t = tl.load(t_row[:, None] + _row_offsets(p, W, t_sh, t_sw, FLAT)[None, :], mask=mask,
                    other=_NEG_INF).to(ACC) * inv_t
        m_s, l_s = _online_update(m_s, l_s, s)
        m_t, l_t = _online_update(m_t, l_t, t)
    ms, ls = _merge_lanes(m_s, l_s, 1)
    mt, lt = _merge_lanes(m_t, l_t, 1)
    out = stats_ptr + ((n * C + c) * tl.num_programs(1) + split) * 4
    tl.store(out, ms, mask=cmask)
    tl.store(out + 1, ls, mask=cmask)
    tl.store(out + 2, mt, mask=cmask)
    tl.store(out + 3, lt, mask=cmask)


@triton.jit(do_not_specialize=["write_grad"])
def _kl_channel_fwd_kernel(
    s_ptr, t_ptr, d_ptr, stats_ptr, part_ptr,
    C, HW, W, chunk,
    s_sn, s_sc, s_sh, s_sw,
    t_sn, t_sc, t_sh, t_sw,
    d_sn, d_sc, d_sh, d_sw,
    inv_t, write_grad,
    BLOCK_R: tl.constexpr, BLOCK: tl.constexpr, BLOCK_SPLIT: tl.constexpr, FLAT: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """Merge each row's chunk statistics into its two log-sum-exps, then over the program's
    chunk (same tiling as the statistics kernel): KL partial sums and d = p_s − p_t."""
    ACC: tl.constexpr = tl.float64 if s_ptr.dtype.element_ty == tl.float64 else tl.float32
    # ALIGN (a power of two, see align_of) divides C and the sample and pixel strides: visible
    # to the compiler, a channels_last pixel's classes are vector accesses even when C is not
    # a multiple of 16 (C = 20 logits: 128-bit fp32, 64-bit fp16/bf16 accesses).
    C = _aligned(C, ALIGN)
    s_sn, s_sh, s_sw = _aligned_strides(s_sn, s_sh, s_sw, ALIGN)
    t_sn, t_sh, t_sw = _aligned_strides(t_sn, t_sh, t_sw, ALIGN)
    d_sn, d_sh, d_sw = _aligned_strides(d_sn, d_sh, d_sw, ALIGN)
    c = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cmask = c < C
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    n = tl.program_id(2).to(tl.int64)
    r = n * C + c
    k = tl.arange(0, BLOCK_SPLIT)
    kmask = cmask[:, None] & (k < n_split)[None, :]
    st = stats_ptr + (r * n_split * 4)[:, None] + (k * 4)[None, :]
    big, tot = _merge_lanes(tl.load(st, mask=kmask, other=_NEG_INF), tl.load(st + 1, mask=kmask, other=0.0), 1)
    lse_s = big + tl.log(tot)
    big, tot = _merge_lanes(tl.load(st + 2, mask=kmask, other=_NEG_INF), tl.load(st + 3, mask=kmask, other=0.0), 1)
    lse_t = big + tl.log(tot)

    s_row = s_ptr + n * s_sn + c * s_sc
    t_row = t_ptr + n * t_sn + c * t_sc
    d_row = d_ptr + n * d_sn + c * d_sc
    start = split.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, HW)
    acc = tl.zeros([BLOCK_R, BLOCK], ACC)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    for off in range(start, end, BLOCK):
        p = off + lanes
        mask = cmask[:, None] & (p < end)[None, :]
        s = tl.load(s_row[:, None] + _row_offsets(p, W, s_sh, s_sw, FLAT)[None, :], mask=mask,
                    other=0.0).to(ACC) * inv_t
        t = tl.load(t_row[:, None] + _row_offsets(p, W, t_sh, t_sw, FLAT)[None, :], mask=mask,
                    other=0.0).to(ACC) * inv_t
        ls = s - lse_s[:, None]
        lt = t - lse_t[:, None]
        pt = tl.exp(lt)
        acc += tl.where(mask, pt * (lt - ls), 0.0)
        if write_grad != 0:
            tl.store(d_row[:, None] + _row_offsets(p, W, d_sh, d_sw, FLAT)[None, :],
                     (tl.exp(ls) - pt).to(d_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + r * n_split + split, tl.sum(acc, 1), mask=cmask)


@triton.jit
def _kl_scale_kernel(d_ptr, g_ptr, out_ptr, numel, scale, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """out = d · (grad_loss · scale) over a dense buffer, math in fp32 (fp64 for fp64).
    ALIGN divides numel: the tail mask then keeps vector accesses (13·27·20 values: 128-bit fp32)."""
    ACC: tl.constexpr = tl.float64 if d_ptr.dtype.element_ty == tl.float64 else tl.float32
    numel = _aligned(numel, ALIGN)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    k = tl.load(g_ptr).to(ACC) * scale
    d = tl.load(d_ptr + offs, mask=mask).to(ACC)
    tl.store(out_ptr + offs, (d * k).to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# Launch helpers


def _nchw_strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(x.stride())  # type: ignore[return-value]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def channels_inner(x: torch.Tensor) -> bool:
    """True when the channel axis is x's innermost moving axis (channels_last): its stride is
    below that of the innermost spatial axis of size > 1 (any C > 1 when H = W = 1)."""
    N, C, H, W = x.shape
    if C == 1:
        return False
    inner = x.stride(3) if W > 1 else x.stride(2) if H > 1 else None
    return inner is None or abs(x.stride(1)) < abs(inner)


def align_of(C: int, *xs: torch.Tensor) -> int:
    """Largest power of two (at most 16 bytes of elements) dividing C and every tensor's sample
    and pixel strides (dims 0, 2, 3): the kernels' ALIGN. 1 unless the channels are the unit
    stride axis (channels_last), where it lets C = 20 classes be vector accesses."""
    g = C
    for x in xs:
        for dim in (0, 2, 3):
            g = math.gcd(g, x.stride(dim))
    return _pow2_dividing(g, 16 // xs[0].element_size())


def _pow2_dividing(n: int, limit: int) -> int:
    """Largest power of two <= limit dividing n (every one divides 0)."""
    a = 1
    while a < limit and n % (2 * a) == 0:
        a *= 2
    return a


def _flat_hw(*xs: torch.Tensor) -> bool:
    """True when every tensor's H·W map is one strided run (h·sh + w·sw == (h·W + w)·sw)."""
    return all(x.shape[2] == 1 or x.stride(2) == x.shape[3] * x.stride(3) for x in xs)


def spatial_config(C: int, block_c: int | None = None, channels_last: bool = False) -> tuple[int, int, bool, int]:
    """(BLOCK_C, BLOCK_P, ONE_TILE, num_warps) for C classes; ``block_c`` forces a size (tests)."""
    one_tile = SPATIAL_ONE_TILE_CL if channels_last else SPATIAL_ONE_TILE
    loop = SPATIAL_LOOP_CL if channels_last else SPATIAL_LOOP
    if block_c is not None:
        if block_c >= C:
            return block_c, one_tile.get(block_c, (32, 4))[0], True, 4
        return block_c, loop[1], False, loop[2]
    for bc, (bp, warps) in one_tile.items():
        if C <= bc:
            return bc, bp, True, warps
    bc, bp, warps = loop
    return bc, bp, False, warps


def kl_spatial(s: torch.Tensor, t: torch.Tensor, d: torch.Tensor | None, temperature: float,
               block_c: int | None = None) -> torch.Tensor:
    """Per-program partial sums of Σ p_t (log p_t − log p_s) over classes (softmax over dim 1).

    ``d`` (student-shaped, any strides) receives p_s − p_t when given. Returns the partials
    (fp32, fp64 for fp64 inputs); their sum is the unnormalized KL.
    """
    N, C, H, W = s.shape
    HW = H * W
    bc, bp, one, warps = spatial_config(C, block_c, channels_inner(s))
    grid = (triton.cdiv(HW, bp), N)
    part = torch.empty(grid[0] * N, device=s.device, dtype=_acc_dtype(s.dtype))
    dd = s if d is None else d  # not written when d is None
    _kl_spatial_fwd_kernel[grid](
        s, t, dd, part, C, HW, W, *_nchw_strides(s), *_nchw_strides(t), *_nchw_strides(dd),
        1.0 / temperature, int(d is not None), BLOCK_C=bc, BLOCK_P=bp, ONE_TILE=one, FLAT=_flat_hw(s, t, dd),
        ALIGN=align_of(C, s, t, dd), num_warps=warps)
    return part


def channel_config(C: int = 1, channels_last: bool = False) -> tuple[int, int, int]:
    """(BLOCK_R channels, BLOCK pixels, num_warps) of the channel kernels for the layout.

    NCHW (pixels contiguous): :data:`CHANNEL_CONFIG`, 2 channels x 512 pixels. channels_last
    (channels contiguous): all C channels up to 64 in one tile (a power of two, at least 16)
    x enough pixels for :data:`CHANNEL_CL_VALUES` values, so that each pixel's channels are one
    vector access."""
    if not channels_last:
        return CHANNEL_INTERPRET if _interpreting() else CHANNEL_CONFIG
    block_r = min(max(triton.next_power_of_2(C), 16), CHANNEL_CL_MAX_R)
    values = CHANNEL_CL_INTERPRET_VALUES if _interpreting() else CHANNEL_CL_VALUES
    return block_r, values // block_r, 4


def max_split(block_r: int) -> int:
    """Most chunks per row: the forward kernel merges a [BLOCK_R, BLOCK_SPLIT] tile of statistics."""
    return max(1, min(MAX_SPLIT, SPLIT_VALUES // block_r))


def channel_split(N: int, C: int, HW: int, block_r: int, block: int, device: torch.device,
                  split: int | None = None) -> tuple[int, int]:
    """(SPLIT, chunk): each row cut into SPLIT chunks (multiples of the block) so that the GPU
    gets about 4 programs per SM; ``split`` forces the number (tests)."""
    blocks = triton.cdiv(HW, block)
    if split is None:
        target = 4 * sm_count(device, 0) or 1
        split = triton.cdiv(target, N * triton.cdiv(C, block_r))
    split = max(1, min(split, blocks, max_split(block_r)))
    chunk = triton.cdiv(blocks, split) * block
    return triton.cdiv(HW, chunk), chunk


def kl_channel(s: torch.Tensor, t: torch.Tensor, d: torch.Tensor | None, temperature: float,
               split: int | None = None, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Per-program partial sums of Σ p_t (log p_t − log p_s) with softmax over H·W per (n, c).

    The tile follows the student's layout (:func:`channel_config`). ``d`` receives p_s − p_t
    when given; ``split`` and ``config`` ((BLOCK_R, BLOCK, warps)) force the launch (tests).
    """
    N, C, H, W = s.shape
    HW = H * W
    block_r, block, warps = config or channel_config(C, channels_inner(s))
    n_split, chunk = channel_split(N, C, HW, block_r, block, s.device, split)
    acc = _acc_dtype(s.dtype)
    stats = torch.empty(N * C * n_split * 4, device=s.device, dtype=acc)
    part = torch.empty(N * C * n_split, device=s.device, dtype=acc)
    dd = s if d is None else d  # not written when d is None
    flat = _flat_hw(s, t, dd)
    inv_t = 1.0 / temperature
    align = align_of(C, s, t, dd)
    grid = (triton.cdiv(C, block_r), n_split, N)
    _kl_channel_stats_kernel[grid](
        s, t, stats, C, HW, W, chunk, *_nchw_strides(s), *_nchw_strides(t), inv_t,
        BLOCK_R=block_r, BLOCK=block, FLAT=flat, ALIGN=align, num_warps=warps)
    _kl_channel_fwd_kernel[grid](
        s, t, dd, stats, part, C, HW, W, chunk, *_nchw_strides(s), *_nchw_strides(t), *_nchw_strides(dd),
        inv_t, int(d is not None), BLOCK_R=block_r, BLOCK=block, BLOCK_SPLIT=max_split(block_r), FLAT=flat,
        ALIGN=align, num_warps=warps)
    return part


def kl_scale(d: torch.Tensor, grad_loss: torch.Tensor, scale: float) -> torch.Tensor:
    """d · (grad_loss · scale) in d's dtype and layout; d must be dense (it comes from empty_like)."""
    out = torch.empty_like(d)
    numel = d.numel()
    g = grad_loss.reshape(1)
    _kl_scale_kernel[(triton.cdiv(numel, SCALE_BLOCK),)](d, g, out, numel, scale, BLOCK=SCALE_BLOCK,
                                                        ALIGN=_pow2_dividing(numel, 16 // d.element_size()),
                                                        num_warps=SCALE_WARPS)
    return out
