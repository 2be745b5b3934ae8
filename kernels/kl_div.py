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

- ``spatial``: rows are strided by H·W in NCHW, so a program takes a tile of
  BLOCK_P pixels × BLOCK_C classes (pixels are the contiguous axis of NCHW). When C fits
  one tile the tile is read once; otherwise two passes over class chunks (online
  max/sum-exp, then log-probabilities).
- ``channel``: rows are H·W long and contiguous, so each row is cut into SPLIT chunks
  (enough programs to fill the GPU) and handled by two kernels: per-chunk online
  max/sum-exp statistics, then a kernel that merges the row's statistics and writes d
  and the loss partials for its chunk.

Math in fp32 (fp64 for fp64 inputs) whatever the storage dtype; strides are arguments;
row and pixel offsets are int64; every load and store is masked. NaN is never masked:
a NaN logit makes its row's log-sum-exp NaN and so the loss.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._device import sm_count

# Tiles hold 2048 values per tensor (16 per thread at 4 warps): more would cut occupancy of
# these memory-bound kernels or spill.
# Spatial mode: one tile holds every class when C <= BLOCK_C; key BLOCK_C -> (BLOCK_P, num_warps).
SPATIAL_ONE_TILE = {32: (64, 4), 64: (32, 4), 128: (16, 4), 256: (8, 4)}
# C > 256: two passes over chunks of classes.
SPATIAL_LOOP = (32, 64, 4)  # (BLOCK_C, BLOCK_P, num_warps)
# Channel mode: (BLOCK_R rows, BLOCK values per iteration, num_warps); at most MAX_SPLIT chunks per row.
CHANNEL_CONFIG, MAX_SPLIT = (2, 512, 4), 64
# The interpreter pays per program and per op, not per element: fewer, bigger tiles.
CHANNEL_INTERPRET = (16, 256, 4)
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
    write_grad, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ONE_TILE: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if s_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HW
    h = (p // W).to(tl.int64)
    w = (p % W).to(tl.int64)
    s_pix = s_ptr + n * s_sn + h * s_sh + w * s_sw
    t_pix = t_ptr + n * t_sn + h * t_sh + w * t_sw
    d_pix = d_ptr + n * d_sn + h * d_sh + w * d_sw
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
    rows, C, HW, W, chunk,
    s_sn, s_sc, s_sh, s_sw,
    t_sn, t_sc, t_sh, t_sw,
    inv_t,
    BLOCK_R: tl.constexpr, BLOCK: tl.constexpr, FLAT: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if s_ptr.dtype.element_ty == tl.float64 else tl.float32
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    split = tl.program_id(1)
    n = r // C
    c = r % C
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
        mask = rmask[:, None] & (p < end)[None, :]
        s = tl.load(s_row[:, None] + _row_offsets(p, W, s_sh, s_sw, FLAT)[None, :], mask=mask,
                    other=_NEG_INF).to(ACC) * inv_t
        t = tl.load(t_row[:, None] + _row_offsets(p, W, t_sh, t_sw, FLAT)[None, :], mask=mask,
                    other=_NEG_INF).to(ACC) * inv_t
        m_s, l_s = _online_update(m_s, l_s, s)
        m_t, l_t = _online_update(m_t, l_t, t)
    ms, ls = _merge_lanes(m_s, l_s, 1)
    mt, lt = _merge_lanes(m_t, l_t, 1)
    out = stats_ptr + (r * tl.num_programs(1) + split) * 4
    tl.store(out, ms, mask=rmask)
    tl.store(out + 1, ls, mask=rmask)
    tl.store(out + 2, mt, mask=rmask)
    tl.store(out + 3, lt, mask=rmask)


@triton.jit(do_not_specialize=["write_grad"])
def _kl_channel_fwd_kernel(
    s_ptr, t_ptr, d_ptr, stats_ptr, part_ptr,
    rows, C, HW, W, chunk,
    s_sn, s_sc, s_sh, s_sw,
    t_sn, t_sc, t_sh, t_sw,
    d_sn, d_sc, d_sh, d_sw,
    inv_t, write_grad,
    BLOCK_R: tl.constexpr, BLOCK: tl.constexpr, BLOCK_SPLIT: tl.constexpr, FLAT: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if s_ptr.dtype.element_ty == tl.float64 else tl.float32
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    n = r // C
    c = r % C
    # Merge each row's per-chunk statistics into its two log-sum-exps.
    k = tl.arange(0, BLOCK_SPLIT)
    kmask = rmask[:, None] & (k < n_split)[None, :]
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
        mask = rmask[:, None] & (p < end)[None, :]
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
    tl.store(part_ptr + r * n_split + split, tl.sum(acc, 1), mask=rmask)


@triton.jit
def _kl_scale_kernel(d_ptr, g_ptr, out_ptr, numel, scale, BLOCK: tl.constexpr):
    """out = d · (grad_loss · scale) over a dense buffer, math in fp32 (fp64 for fp64)."""
    ACC: tl.constexpr = tl.float64 if d_ptr.dtype.element_ty == tl.float64 else tl.float32
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


def spatial_config(C: int, block_c: int | None = None) -> tuple[int, int, bool, int]:
    """(BLOCK_C, BLOCK_P, ONE_TILE, num_warps) for C classes; ``block_c`` forces a size (tests)."""
    if block_c is not None:
        if block_c >= C:
            return block_c, SPATIAL_ONE_TILE.get(block_c, (64, 4))[0], True, 4
        return block_c, SPATIAL_LOOP[1], False, SPATIAL_LOOP[2]
    for bc, (bp, warps) in SPATIAL_ONE_TILE.items():
        if C <= bc:
            return bc, bp, True, warps
    bc, bp, warps = SPATIAL_LOOP
    return bc, bp, False, warps


def kl_spatial(s: torch.Tensor, t: torch.Tensor, d: torch.Tensor | None, temperature: float,
               block_c: int | None = None) -> torch.Tensor:
    """Per-program partial sums of Σ p_t (log p_t − log p_s) over classes (softmax over dim 1).

    ``d`` (student-shaped, any strides) receives p_s − p_t when given. Returns the partials
    (fp32, fp64 for fp64 inputs); their sum is the unnormalized KL.
    """
    N, C, H, W = s.shape
    HW = H * W
    bc, bp, one, warps = spatial_config(C, block_c)
    grid = (triton.cdiv(HW, bp), N)
    part = torch.empty(grid[0] * N, device=s.device, dtype=_acc_dtype(s.dtype))
    dd = s if d is None else d  # not written when d is None
    _kl_spatial_fwd_kernel[grid](
        s, t, dd, part, C, HW, W, *_nchw_strides(s), *_nchw_strides(t), *_nchw_strides(dd),
        1.0 / temperature, int(d is not None), BLOCK_C=bc, BLOCK_P=bp, ONE_TILE=one, num_warps=warps)
    return part


def _flat_hw(*xs: torch.Tensor) -> bool:
    """True when every tensor's H·W map is one strided run (h·sh + w·sw == (h·W + w)·sw)."""
    return all(x.shape[2] == 1 or x.stride(2) == x.shape[3] * x.stride(3) for x in xs)


def channel_config() -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK, num_warps) of the channel kernels."""
    return CHANNEL_INTERPRET if os.environ.get("TRITON_INTERPRET", "0") == "1" else CHANNEL_CONFIG


def channel_split(rows: int, HW: int, block_r: int, block: int, device: torch.device,
                  split: int | None = None) -> tuple[int, int]:
    """(SPLIT, chunk): each row cut into SPLIT chunks (multiples of the block) so that the GPU
    gets about 4 programs per SM; ``split`` forces the number (tests)."""
    blocks = triton.cdiv(HW, block)
    if split is None:
        target = 4 * sm_count(device, 0) or 1
        split = triton.cdiv(target, triton.cdiv(rows, block_r))
    split = max(1, min(split, blocks, MAX_SPLIT))
    chunk = triton.cdiv(blocks, split) * block
    return triton.cdiv(HW, chunk), chunk


def kl_channel(s: torch.Tensor, t: torch.Tensor, d: torch.Tensor | None, temperature: float,
               split: int | None = None, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Per-program partial sums of Σ p_t (log p_t − log p_s) with softmax over H·W per (n, c).

    ``d`` receives p_s − p_t when given; ``split`` and ``config`` ((BLOCK_R, BLOCK, warps))
    force the launch (tests).
    """
    N, C, H, W = s.shape
    HW, rows = H * W, N * C
    block_r, block, warps = config or channel_config()
    n_split, chunk = channel_split(rows, HW, block_r, block, s.device, split)
    acc = _acc_dtype(s.dtype)
    stats = torch.empty(rows * n_split * 4, device=s.device, dtype=acc)
    part = torch.empty(rows * n_split, device=s.device, dtype=acc)
    dd = s if d is None else d  # not written when d is None
    flat = _flat_hw(s, t, dd)
    inv_t = 1.0 / temperature
    grid = (triton.cdiv(rows, block_r), n_split)
    _kl_channel_stats_kernel[grid](
        s, t, stats, rows, C, HW, W, chunk, *_nchw_strides(s), *_nchw_strides(t), inv_t,
        BLOCK_R=block_r, BLOCK=block, FLAT=flat, num_warps=warps)
    _kl_channel_fwd_kernel[grid](
        s, t, dd, stats, part, rows, C, HW, W, chunk, *_nchw_strides(s), *_nchw_strides(t), *_nchw_strides(dd),
        inv_t, int(d is not None), BLOCK_R=block_r, BLOCK=block, BLOCK_SPLIT=MAX_SPLIT, FLAT=flat, num_warps=warps)
    return part


def kl_scale(d: torch.Tensor, grad_loss: torch.Tensor, scale: float) -> torch.Tensor:
    """d · (grad_loss · scale) in d's dtype and layout; d must be dense (it comes from empty_like)."""
    out = torch.empty_like(d)
    numel = d.numel()
    g = grad_loss.reshape(1)
    _kl_scale_kernel[(triton.cdiv(numel, SCALE_BLOCK),)](d, g, out, numel, scale, BLOCK=SCALE_BLOCK,
                                                        num_warps=SCALE_WARPS)
    return out


# ---------------------------------------------------------------------------------------
# Ahead-of-time compile specs (transkd_fast.compile_check)


def _strides(prefix: str) -> dict[str, str]:
    return {f"{prefix}_sn": "i32", f"{prefix}_sc": "i32", f"{prefix}_sh": "i32", f"{prefix}_sw": "constexpr"}


def compile_specs():
    """Every kernel × fp16/bf16/fp32 × every config. Unit strides are constants as the JIT
    specializes them (contiguous NCHW: stride_w == 1); both values of FLAT are built."""
    from transkd_fast.compile_check import CompileSpec

    specs = []
    unit = {"s_sw": 1, "t_sw": 1, "d_sw": 1}
    configs = [(bc, bp, True, warps) for bc, (bp, warps) in SPATIAL_ONE_TILE.items()]
    configs.append((*SPATIAL_LOOP[:2], False, SPATIAL_LOOP[2]))
    block_r, block, cwarps = CHANNEL_CONFIG
    for name in ("fp16", "bf16", "fp32"):
        ptr, acc = f"*{name}", "*fp32"
        for bc, bp, one, warps in configs:
            sig = {"s_ptr": ptr, "t_ptr": ptr, "d_ptr": ptr, "part_ptr": acc, "C": "i32", "HW": "i32", "W": "i32",
                   **_strides("s"), **_strides("t"), **_strides("d"), "inv_t": "fp32", "write_grad": "i32",
                   "BLOCK_C": "constexpr", "BLOCK_P": "constexpr", "ONE_TILE": "constexpr"}
            specs.append(CompileSpec(
                _kl_spatial_fwd_kernel, sig, {**unit, "BLOCK_C": bc, "BLOCK_P": bp, "ONE_TILE": one},
                num_warps=warps, label=f"spatial {name} BLOCK_C={bc} BLOCK_P={bp} {'one-tile' if one else 'loop'}"))
        for flat in (True, False):
            cfg = f"{name} BLOCK_R={block_r} BLOCK={block} flat={int(flat)}"
            sig = {"s_ptr": ptr, "t_ptr": ptr, "stats_ptr": acc, "rows": "i32", "C": "i32", "HW": "i32", "W": "i32",
                   "chunk": "i32", **_strides("s"), **_strides("t"), "inv_t": "fp32",
                   "BLOCK_R": "constexpr", "BLOCK": "constexpr", "FLAT": "constexpr"}
            specs.append(CompileSpec(
                _kl_channel_stats_kernel, sig, {"s_sw": 1, "t_sw": 1, "BLOCK_R": block_r, "BLOCK": block, "FLAT": flat},
                num_warps=cwarps, label=f"channel-stats {cfg}"))
            sig = {"s_ptr": ptr, "t_ptr": ptr, "d_ptr": ptr, "stats_ptr": acc, "part_ptr": acc, "rows": "i32",
                   "C": "i32", "HW": "i32", "W": "i32", "chunk": "i32", **_strides("s"), **_strides("t"),
                   **_strides("d"), "inv_t": "fp32", "write_grad": "i32", "BLOCK_R": "constexpr",
                   "BLOCK": "constexpr", "BLOCK_SPLIT": "constexpr", "FLAT": "constexpr"}
            specs.append(CompileSpec(
                _kl_channel_fwd_kernel, sig,
                {**unit, "BLOCK_R": block_r, "BLOCK": block, "BLOCK_SPLIT": MAX_SPLIT, "FLAT": flat},
                num_warps=cwarps, label=f"channel-fwd {cfg}"))
        specs.append(CompileSpec(
            _kl_scale_kernel, {"d_ptr": ptr, "g_ptr": acc, "out_ptr": ptr, "numel": "i32", "scale": "fp32",
                               "BLOCK": "constexpr"},
            {"BLOCK": SCALE_BLOCK}, num_warps=SCALE_WARPS, label=f"scale {name} BLOCK={SCALE_BLOCK}"))
    return specs
