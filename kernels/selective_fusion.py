"""Triton kernels of CSF's selective fusion (design §2), forward and backward.

With x ``[B, C, H, W]``, y_low ``[B, C, h, w]``, a ``[B, 2, C]`` and ``up`` PyTorch's legacy
nearest upsampling of y_low to H×W::

    src(dst) = min(floor(fp32(dst) · fp32(n_in / n_out)), n_in − 1)     (per axis, fp32 math)
    pool:  p[b, c]  = mean_hw(x + up(y_low))
    fuse:  o        = a0 · x + a1 · up(y_low)                               a_k = a[b, k, c]

Backward (g = grad of the output)::

    pool:  dx = g / HW (broadcast; the op returns a stride-0 view, no kernel),
           dy_low[i, j] = g / HW · |rows(i)| · |cols(j)|
    fuse:  dx = a0 · g,  dy_low[i, j] = a1 · G[i, j],  da0 = Σ_hw g · x,  da1 = Σ_ij G · y_low
           with G[i, j] = Σ_{r ∈ rows(i), q ∈ cols(j)} g[r, q]    (adjoint of up)

``rows(i)`` = {r : src(r) = i} is a contiguous range [first(i), first(i+1)) because src is
monotone; it is empty for some i when downsampling. ``up(y_low)`` is never materialized:
forward kernels gather y_low at src(dst); the fuse backward walks source pixels and visits
each one's preimage, so every dst pixel is read once and dy_low needs no atomics. A source
pixel with an empty preimage contributes exactly 0 (selected with ``tl.where`` / masked
loads, never multiplied by a zero count), so an inf or NaN there stays out of da1 and dy_low,
as in the eager reference.

Layouts. Every kernel tiles ``[pixels, channels]`` and reads along the contiguous axis of the
layout it is given (``CL``, chosen per launch from the strides by :func:`channels_inner`):

- ``CL = False`` (NCHW-like, W is the unit-stride axis): one channel plane (``BC = 1``) per
  program, pixels as BPIX // BW rows × BW contiguous columns: vector accesses along W.
- ``CL = True`` (channels_last, C is the unit-stride axis, as the models hand CSF its maps):
  ``BC`` channels × BPIX pixels (a flat run of the map), vector accesses along C.

Strides are arguments (any view works); at a launch Triton specializes a unit stride to a
constant, which is what lets the compiler prove contiguity and emit 128-bit accesses.

Reductions over H·W are split over ``n_split`` programs per (batch, channel block); each
writes an fp32 partial to a workspace, and :func:`_rowsum_kernel` adds them in a fixed order
(deterministic). All math is fp32; outputs are stored in the output tensor's dtype.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from ._device import sm_count

# GPU tiles. Plane mode (CL = False): (BPIX, BW) = BPIX pixels as BPIX // BW rows × BW columns,
# one plane per program; BW = 64 dst / 32 src columns fits the CSF maps of B0 at 512×1024
# exactly (W = 256, 128, 64). Channels-inner mode (CL = True): BC = min(64, C) channels
# (CSF's mid = 64: one whole pixel row per tile row) × CL_ELEMS // BC pixels; 1024 elements
# over 4 warps = 8 per thread, one 128-bit access per thread and tensor in fp16/bf16.
FWD_PLANE = (1024, 64)  # dst pixels (pool / fuse forward)
BWD_PLANE = (512, 32)   # src pixels (pool / fuse backward; each visits its preimage)
CL_ELEMS = 1024
MAX_BC = 64
# Test-speed choice, interpreter only: the interpreter pays per program iteration, not per
# element, so under TRITON_INTERPRET=1 the launchers take wider tiles (up to INTERPRET_ELEMENTS
# elements, INTERPRET_PIXELS pixels). Same kernels, same code paths; the tests also run the GPU
# tiles (``gpu_tile=True``) and the compile check builds the GPU tiles of every recorded launch.
INTERPRET_PIXELS = 8192
INTERPRET_ELEMENTS = 1 << 16
PROGRAMS_PER_SM = 8
ROWSUM_BLOCK_R = 64
ROWSUM_BLOCK_S = 16
NUM_WARPS = 4


@triton.jit
def _nearest_src(dst, n_in, scale):
    # aten's legacy nearest_idx: an fp32 product and floorf, clamped; scale is fp32(n_in / n_out).
    return tl.minimum(tl.floor(dst.to(tl.float32) * scale).to(tl.int32), n_in - 1)


@triton.jit
def _first_dst(i, n_in, n_out, scale):
    # Smallest dst with src(dst) >= i. Exact arithmetic gives ceil(i·n_out/n_in); the fp32
    # rounding in src() can move the boundary by one either way, so test both neighbours. One
    # step is enough for sides up to 8192 (the ops' MAX_SIDE): checked against a brute-force
    # preimage for every pair of sides below 260×600 and 20 000 random pairs up to 8192; the
    # downward step is first needed near i·n_out ≈ 2^23 (e.g. 2260 → 6849, in the tests).
    c = (i * n_out + n_in - 1) // n_in
    prev = c - 1
    c = tl.where((prev >= 0) & (_nearest_src(prev, n_in, scale) >= i), prev, c)
    c = tl.where((c < n_out) & (_nearest_src(c, n_in, scale) < i), c + 1, c)
    return c


@triton.jit
def _pixels(tile, n_rows, n_cols, n_tw, BPIX: tl.constexpr, BW: tl.constexpr, CL: tl.constexpr):
    """(row, col, in-map mask) of the BPIX pixels of tile ``tile``.

    CL: a flat run of the row-major pixel index. Otherwise BPIX // BW rows × BW columns, the
    map cut in n_tw tiles per row band (columns contiguous, so W-vector accesses)."""
    lin = tl.arange(0, BPIX)
    if CL:
        p = tile * BPIX + lin
        r = p // n_cols
        q = p % n_cols
    else:
        r = (tile // n_tw) * (BPIX // BW) + lin // BW
        q = (tile % n_tw) * BW + lin % BW
    return r, q, (r < n_rows) & (q < n_cols)


@triton.jit
def _channels(grp, n_cb, C, BC: tl.constexpr):
    """(batch as int64, channels [BC] as int64, channel mask) of program group ``grp`` = b·n_cb + cb."""
    b = (grp // n_cb).to(tl.int64)
    c = (grp % n_cb) * BC + tl.arange(0, BC)
    return b, c.to(tl.int64), c < C


@triton.jit
def _selective_pool_fwd_kernel(
    x_ptr, y_ptr, ws_ptr,
    C, H, W, h, w, scale_h, scale_w,
    sxb, sxc, sxh, sxw,
    syb, syc, syh, syw,
    n_cb, n_tw, n_split, tiles_per_split,
    BC: tl.constexpr, BPIX: tl.constexpr, BW: tl.constexpr, CL: tl.constexpr,
):
    """ws[b·C + c, s] = Σ over this split's dst pixels of x + up(y_low), for BC channels."""
    grp = tl.program_id(0)
    sid = tl.program_id(1)
    b, c, cm = _channels(grp, n_cb, C, BC)
    x_base = x_ptr + b * sxb + (c * sxc)[None, :]
    y_base = y_ptr + b * syb + (c * syc)[None, :]
    acc = tl.zeros([BPIX, BC], dtype=tl.float32)
    for t in range(0, tiles_per_split):
        r, q, pm = _pixels(sid * tiles_per_split + t, H, W, n_tw, BPIX, BW, CL)
        m = pm[:, None] & cm[None, :]
        ri = _nearest_src(r, h, scale_h)
        qi = _nearest_src(q, w, scale_w)
        xo = r.to(tl.int64) * sxh + q.to(tl.int64) * sxw
        yo = ri.to(tl.int64) * syh + qi.to(tl.int64) * syw
        xv = tl.load(x_base + xo[:, None], mask=m, other=0.0)
        yv = tl.load(y_base + yo[:, None], mask=m, other=0.0)
        acc += xv.to(tl.float32) + yv.to(tl.float32)
    tl.store(ws_ptr + (b * C + c) * n_split + sid, tl.sum(acc, axis=0), mask=cm)


@triton.jit
def _rowsum_kernel(ws_ptr, out_ptr, R, S, scale, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """out[r] = scale · Σ_s ws[r, s] in order (ws fp32 contiguous [R, S]; out contiguous, its own dtype)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < R
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        cols = s0 + tl.arange(0, BLOCK_S)
        v = tl.load(ws_ptr + rows.to(tl.int64)[:, None] * S + cols[None, :],
                    mask=rm[:, None] & (cols < S)[None, :], other=0.0)
        acc += tl.sum(v, axis=1)
    tl.store(out_ptr + rows, (acc * scale).to(out_ptr.dtype.element_ty), mask=rm)


@triton.jit
def _selective_pool_bwd_kernel(
    g_ptr, dy_ptr,
    C, H, W, h, w, scale_h, scale_w, inv_hw,
    sgb, sgc,
    sdb, sdc, sdh, sdw,
    n_cb, n_tw,
    BC: tl.constexpr, BPIX: tl.constexpr, BW: tl.constexpr, CL: tl.constexpr,
):
    """dy_low[b, c, i, j] = g[b, c] / HW · |rows(i)| · |cols(j)| over one tile of source pixels."""
    tid = tl.program_id(0)
    b, c, cm = _channels(tl.program_id(1), n_cb, C, BC)
    gv = tl.load(g_ptr + b * sgb + c * sgc, mask=cm, other=0.0).to(tl.float32) * inv_hw
    i, j, pm = _pixels(tid, h, w, n_tw, BPIX, BW, CL)
    nr = _first_dst(i + 1, h, H, scale_h) - _first_dst(i, h, H, scale_h)
    nq = _first_dst(j + 1, w, W, scale_w) - _first_dst(j, w, W, scale_w)
    cnt = (nr * nq)[:, None]
    # An empty preimage is an empty sum: 0 even where g is inf or NaN (as the reference).
    val = tl.where(cnt > 0, gv[None, :] * cnt.to(tl.float32), 0.0)
    off = b * sdb + (c * sdc)[None, :] + (i.to(tl.int64) * sdh + j.to(tl.int64) * sdw)[:, None]
    tl.store(dy_ptr + off, val.to(dy_ptr.dtype.element_ty), mask=pm[:, None] & cm[None, :])


@triton.jit
def _selective_fuse_fwd_kernel(
    x_ptr, y_ptr, a_ptr, o_ptr,
    C, H, W, h, w, scale_h, scale_w,
    sxb, sxc, sxh, sxw,
    syb, syc, syh, syw,
    sob, soc, soh, sow,
    sab, sak, sac,
    n_cb, n_tw,
    BC: tl.constexpr, BPIX: tl.constexpr, BW: tl.constexpr, CL: tl.constexpr,
):
    """o = a0 · x + a1 · up(y_low) over one tile of BPIX dst pixels × BC channels."""
    tid = tl.program_id(0)
    b, c, cm = _channels(tl.program_id(1), n_cb, C, BC)
    a_off = b * sab + c * sac
    a0 = tl.load(a_ptr + a_off, mask=cm, other=0.0).to(tl.float32)[None, :]
    a1 = tl.load(a_ptr + a_off + sak, mask=cm, other=0.0).to(tl.float32)[None, :]
    r, q, pm = _pixels(tid, H, W, n_tw, BPIX, BW, CL)
    m = pm[:, None] & cm[None, :]
    ri = _nearest_src(r, h, scale_h)
    qi = _nearest_src(q, w, scale_w)
    r64 = r.to(tl.int64)
    q64 = q.to(tl.int64)
    xo = b * sxb + (c * sxc)[None, :] + (r64 * sxh + q64 * sxw)[:, None]
    yo = b * syb + (c * syc)[None, :] + (ri.to(tl.int64) * syh + qi.to(tl.int64) * syw)[:, None]
    oo = b * sob + (c * soc)[None, :] + (r64 * soh + q64 * sow)[:, None]
    xv = tl.load(x_ptr + xo, mask=m, other=0.0).to(tl.float32)
    yv = tl.load(y_ptr + yo, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + oo, (a0 * xv + a1 * yv).to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _selective_fuse_bwd_kernel(
    g_ptr, x_ptr, y_ptr, a_ptr, dx_ptr, dy_ptr, ws_ptr,
    C, H, W, h, w, scale_h, scale_w, KH, KW,
    sgb, sgc, sgh, sgw,
    sxb, sxc, sxh, sxw,
    syb, syc, syh, syw,
    sdxb, sdxc, sdxh, sdxw,
    sdyb, sdyc, sdyh, sdyw,
    sab, sak, sac,
    n_cb, n_tw, n_split, tiles_per_split,
    BC: tl.constexpr, BPIX: tl.constexpr, BW: tl.constexpr, CL: tl.constexpr,
):
    """One pass over this split's source pixels; each visits its preimage (≤ KH×KW dst pixels).

    Writes dx = a0·g at every dst pixel of the preimages, dy_low = a1·G, and the partial sums
    ws[(b·2 + 0)·C + c, s] = Σ g·x and ws[(b·2 + 1)·C + c, s] = Σ G·y_low.
    """
    grp = tl.program_id(0)
    sid = tl.program_id(1)
    b, c, cm = _channels(grp, n_cb, C, BC)
    a_off = b * sab + c * sac
    a0 = tl.load(a_ptr + a_off, mask=cm, other=0.0).to(tl.float32)[None, :]
    a1 = tl.load(a_ptr + a_off + sak, mask=cm, other=0.0).to(tl.float32)[None, :]
    g_base = g_ptr + b * sgb + (c * sgc)[None, :]
    x_base = x_ptr + b * sxb + (c * sxc)[None, :]
    dx_base = dx_ptr + b * sdxb + (c * sdxc)[None, :]
    y_base = y_ptr + b * syb + (c * syc)[None, :]
    dy_base = dy_ptr + b * sdyb + (c * sdyc)[None, :]
    acc_gx = tl.zeros([BPIX, BC], dtype=tl.float32)
    acc_gy = tl.zeros([BPIX, BC], dtype=tl.float32)
    for t in range(0, tiles_per_split):
        i, j, pm = _pixels(sid * tiles_per_split + t, h, w, n_tw, BPIX, BW, CL)
        m = pm[:, None] & cm[None, :]
        r0 = _first_dst(i, h, H, scale_h)
        r1 = _first_dst(i + 1, h, H, scale_h)
        q0 = _first_dst(j, w, W, scale_w)
        q1 = _first_dst(j + 1, w, W, scale_w)
        gsum = tl.zeros([BPIX, BC], dtype=tl.float32)
        for kh in range(0, KH):
            r = r0 + kh
            mr = r < r1
            r64 = r.to(tl.int64)
            for kw in range(0, KW):
                q = q0 + kw
                mm = m & (mr & (q < q1))[:, None]
                q64 = q.to(tl.int64)
                gv = tl.load(g_base + (r64 * sgh + q64 * sgw)[:, None], mask=mm, other=0.0).to(tl.float32)
                xv = tl.load(x_base + (r64 * sxh + q64 * sxw)[:, None], mask=mm, other=0.0).to(tl.float32)
                tl.store(dx_base + (r64 * sdxh + q64 * sdxw)[:, None], (a0 * gv).to(dx_ptr.dtype.element_ty),
                         mask=mm)
                gsum += gv
                acc_gx += gv * xv
        # Where no dst pixel copies the source (empty preimage), G = 0 and both dy_low and the
        # y_low term must be exactly 0, not 0·a1 or 0·y: selected, so a NaN there stays out. The
        # load keeps its plain mask (vectorizable) and comes after the loop (shorter live range).
        used = ((r1 > r0) & (q1 > q0))[:, None]
        i64 = i.to(tl.int64)
        j64 = j.to(tl.int64)
        tl.store(dy_base + (i64 * sdyh + j64 * sdyw)[:, None],
                 tl.where(used, a1 * gsum, 0.0).to(dy_ptr.dtype.element_ty), mask=m)
        yv = tl.load(y_base + (i64 * syh + j64 * syw)[:, None], mask=m, other=0.0).to(tl.float32)
        acc_gy += tl.where(used, gsum * yv, 0.0)
    row0 = (b * 2 * C + c) * n_split + sid
    tl.store(ws_ptr + row0, tl.sum(acc_gx, axis=0), mask=cm)
    tl.store(ws_ptr + row0 + C * n_split, tl.sum(acc_gy, axis=0), mask=cm)


# ---------------------------------------------------------------------------------------
# Launch helpers. Sizes come from the caller (transkd_fast.ops.selective_fusion), which also
# computes the fp32 scales and the largest preimage KH×KW on the host.


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def channels_inner(t) -> bool:
    """True when channels are the map's fastest axis (channels_last, or a 1×1 map): the kernels
    then tile [pixels, channels] with channels as the vector axis; else they walk W."""
    B, C, H, W = t.shape
    if C == 1:
        return False
    pixel_stride = t.stride(3) if W > 1 else (t.stride(2) if H > 1 else None)
    return pixel_stride is None or t.stride(1) < pixel_stride


def _tile(ref, rows: int, cols: int, C: int, plane_cfg, gpu_tile: bool):
    """(launch constexprs, n_cb, n_tw, n_tiles) for a rows×cols map laid out like ``ref``."""
    cl = channels_inner(ref)
    wide = _interpreting() and not gpu_tile  # test-speed choice (see INTERPRET_ELEMENTS)
    if cl:
        BC = min(MAX_BC, triton.next_power_of_2(C))
        cap = INTERPRET_ELEMENTS if wide else CL_ELEMS
        BPIX = max(1, cap // BC)
        if wide:
            BPIX = min(BPIX, triton.next_power_of_2(rows * cols))
        BW, n_tw, n_tiles = 1, 1, triton.cdiv(rows * cols, BPIX)
    else:
        BPIX, BW = plane_cfg
        BC = 1
        if wide:
            BW = min(INTERPRET_PIXELS, triton.next_power_of_2(cols))
            BPIX = max(BW, min(INTERPRET_PIXELS, triton.next_power_of_2(rows) * BW))
            BC = min(MAX_BC, triton.next_power_of_2(C), max(1, INTERPRET_ELEMENTS // BPIX))
        n_tw = triton.cdiv(cols, BW)
        n_tiles = triton.cdiv(rows, BPIX // BW) * n_tw
    return dict(BC=BC, BPIX=BPIX, BW=BW, CL=cl), triton.cdiv(C, BC), n_tw, n_tiles


def _split(device, groups: int, tiles: int, split) -> tuple[int, int]:
    """(n_split, tiles_per_split): enough programs to fill the GPU, each owning whole tiles."""
    if split is None:
        target = PROGRAMS_PER_SM * sm_count(device, 2)  # interpreter: small, still splits
        split = -(-target // max(groups, 1))
    split = max(1, min(int(split), tiles))
    per = -(-tiles // split)
    return -(-tiles // per), per


def _rowsum(ws, out, scale: float) -> None:
    R, S = ws.shape
    _rowsum_kernel[(triton.cdiv(R, ROWSUM_BLOCK_R),)](
        ws, out, R, S, scale, BLOCK_R=ROWSUM_BLOCK_R, BLOCK_S=ROWSUM_BLOCK_S, num_warps=NUM_WARPS)


def pool_forward(x, y, out, scale_h: float, scale_w: float, *, split=None, gpu_tile: bool = False) -> None:
    """out ``[B, C]`` (contiguous) = mean_hw(x + up(y)). ``split``/``gpu_tile`` override the heuristics (tests)."""
    import torch

    B, C, H, W = x.shape
    h, w = y.shape[-2:]
    meta, n_cb, n_tw, tiles = _tile(x, H, W, C, FWD_PLANE, gpu_tile)
    groups = B * n_cb
    n_split, per = _split(x.device, groups, tiles, split)
    ws = torch.empty(B * C, n_split, device=x.device, dtype=torch.float32)
    _selective_pool_fwd_kernel[(groups, n_split)](
        x, y, ws, C, H, W, h, w, scale_h, scale_w, *x.stride(), *y.stride(), n_cb, n_tw, n_split, per,
        **meta, num_warps=NUM_WARPS)
    _rowsum(ws, out, 1.0 / (H * W))


def pool_backward(g, dy, H: int, W: int, scale_h: float, scale_w: float, *, gpu_tile: bool = False) -> None:
    """dy ``[B, C, h, w]`` (any layout) = adjoint of mean_hw∘up applied to g ``[B, C]``."""
    B, C, h, w = dy.shape
    meta, n_cb, n_tw, tiles = _tile(dy, h, w, C, BWD_PLANE, gpu_tile)
    _selective_pool_bwd_kernel[(tiles, B * n_cb)](
        g, dy, C, H, W, h, w, scale_h, scale_w, 1.0 / (H * W), *g.stride(), *dy.stride(), n_cb, n_tw,
        **meta, num_warps=NUM_WARPS)


def fuse_forward(x, y, a, out, scale_h: float, scale_w: float, *, gpu_tile: bool = False) -> None:
    """out (x's shape, any layout) = a0·x + a1·up(y); a ``[B, 2, C]`` fp32."""
    B, C, H, W = x.shape
    h, w = y.shape[-2:]
    meta, n_cb, n_tw, tiles = _tile(x, H, W, C, FWD_PLANE, gpu_tile)
    _selective_fuse_fwd_kernel[(tiles, B * n_cb)](
        x, y, a, out, C, H, W, h, w, scale_h, scale_w, *x.stride(), *y.stride(), *out.stride(),
        *a.stride(), n_cb, n_tw, **meta, num_warps=NUM_WARPS)


def fuse_backward(g, x, y, a, dx, dy, da, scale_h: float, scale_w: float, kh: int, kw: int, *,
                  split=None, gpu_tile: bool = False) -> None:
    """dx, dy and da (contiguous ``[B, 2, C]``, any float dtype) of the fuse in one pass over g, x, y.

    The tile follows x's layout (dx is allocated like x); g and y may have any strides."""
    import torch

    B, C, H, W = x.shape
    h, w = y.shape[-2:]
    meta, n_cb, n_tw, tiles = _tile(x, h, w, C, BWD_PLANE, gpu_tile)
    groups = B * n_cb
    n_split, per = _split(x.device, groups, tiles, split)
    ws = torch.empty(B * 2 * C, n_split, device=x.device, dtype=torch.float32)
    _selective_fuse_bwd_kernel[(groups, n_split)](
        g, x, y, a, dx, dy, ws, C, H, W, h, w, scale_h, scale_w, kh, kw,
        *g.stride(), *x.stride(), *y.stride(), *dx.stride(), *dy.stride(), *a.stride(), n_cb, n_tw, n_split, per,
        **meta, num_warps=NUM_WARPS)
    _rowsum(ws, da, 1.0)
