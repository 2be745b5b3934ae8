"""Triton kernels of CSF's selective fusion (design §2), forward and backward.

Per (b, c) plane, with x ``[B, C, H, W]``, y_low ``[B, C, h, w]``, a ``[B, 2, C]`` and
``up`` PyTorch's legacy nearest upsampling of y_low to H×W::

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
each one's preimage, so every dst pixel is read once and dy_low needs no atomics.

Reductions over H·W are split over ``n_split`` programs per plane for parallelism; each
writes an fp32 partial to a workspace, and :func:`_rowsum_kernel` adds them in a fixed order
(deterministic). All math is fp32; outputs are stored in the output tensor's dtype.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Tile configs (BP, BPIX, BW): BP planes × BPIX pixels per program iteration, the pixels being
# BPIX // BW rows × BW contiguous columns (vector loads along a row when its stride is 1).
# On the GPU one plane per program; BW = 64 dst / 32 src columns fits the CSF maps of B0 at
# 512×1024 exactly (W = 256, 128, 64). A wider menu would multiply the compile matrix for
# little gain. Under the interpreter the cost is per program, not per element, so it takes up
# to INTERPRET_PLANES planes and INTERPRET_PIXELS pixels per program instead (tests also run
# the GPU tile): same code, wider tile.
FWD_CONFIGS = ((1, 1024, 64),)  # dst pixels (pool / fuse forward)
BWD_CONFIGS = ((1, 512, 32),)   # src pixels (pool / fuse backward; each visits its preimage)
INTERPRET_PLANES = 64
INTERPRET_PIXELS = 8192
INTERPRET_ELEMENTS = 1 << 16
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
def _tile_rc(tile, n_tw, BPIX: tl.constexpr, BW: tl.constexpr):
    # Tile ``tile`` of a map cut in n_tw tiles per row band: BPIX // BW rows × BW columns.
    lin = tl.arange(0, BPIX)
    r = (tile // n_tw) * (BPIX // BW) + lin // BW
    q = (tile % n_tw) * BW + lin % BW
    return r, q


@triton.jit
def _selective_pool_fwd_kernel(
    x_ptr, y_ptr, ws_ptr,
    n_planes, C, H, W, h, w, scale_h, scale_w,
    sxb, sxc, sxh, sxw,
    syb, syc, syh, syw,
    n_tw, n_split, tiles_per_split,
    BP: tl.constexpr, BPIX: tl.constexpr, BW: tl.constexpr,
):
    """ws[b·C + c, s] = Σ over this split's dst pixels of x + up(y_low), for BP planes."""
    planes = tl.program_id(0) * BP + tl.arange(0, BP)
    sid = tl.program_id(1)
    pm = planes < n_planes
    b = (planes // C).to(tl.int64)
    c = (planes % C).to(tl.int64)
    x_base = x_ptr + (b * sxb + c * sxc)[:, None]
    y_base = y_ptr + (b * syb + c * syc)[:, None]
    acc = tl.zeros([BP, BPIX], dtype=tl.float32)
    for t in range(0, tiles_per_split):
        r, q = _tile_rc(sid * tiles_per_split + t, n_tw, BPIX, BW)
        m = pm[:, None] & ((r < H) & (q < W))[None, :]
        ri = _nearest_src(r, h, scale_h)
        qi = _nearest_src(q, w, scale_w)
        xo = r.to(tl.int64) * sxh + q.to(tl.int64) * sxw
        yo = ri.to(tl.int64) * syh + qi.to(tl.int64) * syw
        xv = tl.load(x_base + xo[None, :], mask=m, other=0.0)
        yv = tl.load(y_base + yo[None, :], mask=m, other=0.0)
        acc += xv.to(tl.float32) + yv.to(tl.float32)
    tl.store(ws_ptr + planes.to(tl.int64) * n_split + sid, tl.sum(acc, axis=1), mask=pm)


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
    n_planes, C, H, W, h, w, scale_h, scale_w, inv_hw,
    sgb, sgc,
    sdb, sdc, sdh, sdw,
    n_tw,
    BP: tl.constexpr, BPIX: tl.constexpr, BW: tl.constexpr,
):
    """dy_low[b, c, i, j] = g[b, c] / HW · |rows(i)| · |cols(j)| over one tile of source pixels."""
    tid = tl.program_id(0)
    planes = tl.program_id(1) * BP + tl.arange(0, BP)
    pm = planes < n_planes
    b = (planes // C).to(tl.int64)
    c = (planes % C).to(tl.int64)
    gv = tl.load(g_ptr + b * sgb + c * sgc, mask=pm, other=0.0).to(tl.float32) * inv_hw
    i, j = _tile_rc(tid, n_tw, BPIX, BW)
    nr = _first_dst(i + 1, h, H, scale_h) - _first_dst(i, h, H, scale_h)
    nq = _first_dst(j + 1, w, W, scale_w) - _first_dst(j, w, W, scale_w)
    val = gv[:, None] * (nr * nq).to(tl.float32)[None, :]
    off = (b * sdb + c * sdc)[:, None] + (i.to(tl.int64) * sdh + j.to(tl.int64) * sdw)[None, :]
    tl.store(dy_ptr + off, val.to(dy_ptr.dtype.element_ty), mask=pm[:, None] & ((i < h) & (j < w))[None, :])


@triton.jit
def _selective_fuse_fwd_kernel(
    x_ptr, y_ptr, a_ptr, o_ptr,
    n_planes, C, H, W, h, w, scale_h, scale_w,
    sxb, sxc, sxh, sxw,
    syb, syc, syh, syw,
    sob, soc, soh, sow,
    sab, sak, sac,
    n_tw,
    BP: tl.constexpr, BPIX: tl.constexpr, BW: tl.constexpr,
):
    """o = a0 · x + a1 · up(y_low) over one tile of BPIX dst pixels of BP planes."""
    tid = tl.program_id(0)
    planes = tl.program_id(1) * BP + tl.arange(0, BP)
    pm = planes < n_planes
    b = (planes // C).to(tl.int64)
    c = (planes % C).to(tl.int64)
    a_off = b * sab + c * sac
    a0 = tl.load(a_ptr + a_off, mask=pm, other=0.0).to(tl.float32)[:, None]
    a1 = tl.load(a_ptr + a_off + sak, mask=pm, other=0.0).to(tl.float32)[:, None]
    r, q = _tile_rc(tid, n_tw, BPIX, BW)
    m = pm[:, None] & ((r < H) & (q < W))[None, :]
    ri = _nearest_src(r, h, scale_h)
    qi = _nearest_src(q, w, scale_w)
    r64 = r.to(tl.int64)
    q64 = q.to(tl.int64)
    xo = (b * sxb + c * sxc)[:, None] + (r64 * sxh + q64 * sxw)[None, :]
    yo = (b * syb + c * syc)[:, None] + (ri.to(tl.int64) * syh + qi.to(tl.int64) * syw)[None, :]
    oo = (b * sob + c * soc)[:, None] + (r64 * soh + q64 * sow)[None, :]
    xv = tl.load(x_ptr + xo, mask=m, other=0.0).to(tl.float32)
    yv = tl.load(y_ptr + yo, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + oo, (a0 * xv + a1 * yv).to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _selective_fuse_bwd_kernel(
    g_ptr, x_ptr, y_ptr, a_ptr, dx_ptr, dy_ptr, ws_ptr,
    n_planes, C, H, W, h, w, scale_h, scale_w, KH, KW,
    sgb, sgc, sgh, sgw,
    sxb, sxc, sxh, sxw,
    syb, syc, syh, syw,
    sdxb, sdxc, sdxh, sdxw,
    sdyb, sdyc, sdyh, sdyw,
    sab, sak, sac,
    n_tw, n_split, tiles_per_split,
    BP: tl.constexpr, BPIX: tl.constexpr, BW: tl.constexpr,
):
    """One pass over this split's source pixels; each visits its preimage (≤ KH×KW dst pixels).

    Writes dx = a0·g at every dst pixel of the preimages, dy_low = a1·G, and the partial sums
    ws[(b·2 + 0)·C + c, s] = Σ g·x and ws[(b·2 + 1)·C + c, s] = Σ G·y_low.
    """
    planes = tl.program_id(0) * BP + tl.arange(0, BP)
    sid = tl.program_id(1)
    pm = planes < n_planes
    b = (planes // C).to(tl.int64)
    c = (planes % C).to(tl.int64)
    a_off = b * sab + c * sac
    a0 = tl.load(a_ptr + a_off, mask=pm, other=0.0).to(tl.float32)[:, None]
    a1 = tl.load(a_ptr + a_off + sak, mask=pm, other=0.0).to(tl.float32)[:, None]
    g_base = g_ptr + (b * sgb + c * sgc)[:, None]
    x_base = x_ptr + (b * sxb + c * sxc)[:, None]
    dx_base = dx_ptr + (b * sdxb + c * sdxc)[:, None]
    y_base = y_ptr + (b * syb + c * syc)[:, None]
    dy_base = dy_ptr + (b * sdyb + c * sdyc)[:, None]
    acc_gx = tl.zeros([BP, BPIX], dtype=tl.float32)
    acc_gy = tl.zeros([BP, BPIX], dtype=tl.float32)
    for t in range(0, tiles_per_split):
        i, j = _tile_rc(sid * tiles_per_split + t, n_tw, BPIX, BW)
        m = pm[:, None] & ((i < h) & (j < w))[None, :]
        r0 = _first_dst(i, h, H, scale_h)
        r1 = _first_dst(i + 1, h, H, scale_h)
        q0 = _first_dst(j, w, W, scale_w)
        q1 = _first_dst(j + 1, w, W, scale_w)
        i64 = i.to(tl.int64)
        j64 = j.to(tl.int64)
        yv = tl.load(y_base + (i64 * syh + j64 * syw)[None, :], mask=m, other=0.0).to(tl.float32)
        gsum = tl.zeros([BP, BPIX], dtype=tl.float32)
        for kh in range(0, KH):
            r = r0 + kh
            mr = r < r1
            r64 = r.to(tl.int64)
            for kw in range(0, KW):
                q = q0 + kw
                mm = m & (mr & (q < q1))[None, :]
                q64 = q.to(tl.int64)
                gv = tl.load(g_base + (r64 * sgh + q64 * sgw)[None, :], mask=mm, other=0.0).to(tl.float32)
                xv = tl.load(x_base + (r64 * sxh + q64 * sxw)[None, :], mask=mm, other=0.0).to(tl.float32)
                tl.store(dx_base + (r64 * sdxh + q64 * sdxw)[None, :], (a0 * gv).to(dx_ptr.dtype.element_ty),
                         mask=mm)
                gsum += gv
                acc_gx += gv * xv
        tl.store(dy_base + (i64 * sdyh + j64 * sdyw)[None, :], (a1 * gsum).to(dy_ptr.dtype.element_ty), mask=m)
        acc_gy += gsum * yv
    row0 = (b * 2 * C + c) * n_split + sid
    tl.store(ws_ptr + row0, tl.sum(acc_gx, axis=1), mask=pm)
    tl.store(ws_ptr + row0 + C * n_split, tl.sum(acc_gy, axis=1), mask=pm)


# ---------------------------------------------------------------------------------------
# Launch helpers. Sizes come from the caller (transkd_fast.ops.selective_fusion), which also
# computes the fp32 scales and the largest preimage KH×KW on the host.


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _config(configs, rows: int, cols: int, planes: int, bp=None) -> tuple[int, int, int, int]:
    """(BP, BPIX, BW, n_tiles) for a rows×cols map; ``bp`` given (tests) keeps the GPU pixel tile."""
    BP, BPIX, BW = configs[0]
    if bp is not None:
        BP = bp
    elif _interpreting():
        BW = min(INTERPRET_PIXELS, triton.next_power_of_2(cols))
        BPIX = max(BW, min(INTERPRET_PIXELS, triton.next_power_of_2(rows) * BW))
        BP = min(INTERPRET_PLANES, triton.next_power_of_2(planes), max(1, INTERPRET_ELEMENTS // BPIX))
    n_tw = triton.cdiv(cols, BW)
    return BP, BPIX, BW, n_tw


def _split(groups: int, tiles: int, target_programs: int, split) -> tuple[int, int]:
    """(n_split, tiles_per_split): enough programs to fill the GPU, each owning whole tiles."""
    if split is None:
        split = 1 if _interpreting() else max(1, -(-target_programs // max(groups, 1)))
    split = max(1, min(int(split), tiles))
    per = -(-tiles // split)
    return -(-tiles // per), per


def _rowsum(ws, out, scale: float) -> None:
    R, S = ws.shape
    _rowsum_kernel[(triton.cdiv(R, ROWSUM_BLOCK_R),)](
        ws, out, R, S, scale, BLOCK_R=ROWSUM_BLOCK_R, BLOCK_S=ROWSUM_BLOCK_S, num_warps=NUM_WARPS)


def pool_forward(x, y, out, scale_h: float, scale_w: float, *, target_programs: int = 1024,
                 split=None, bp=None) -> None:
    """out ``[B, C]`` (contiguous) = mean_hw(x + up(y)). ``split``/``bp`` override the heuristics (tests)."""
    import torch

    B, C, H, W = x.shape
    h, w = y.shape[-2:]
    planes = B * C
    BP, BPIX, BW, n_tw = _config(FWD_CONFIGS, H, W, planes, bp)
    groups = triton.cdiv(planes, BP)
    n_split, per = _split(groups, triton.cdiv(H, BPIX // BW) * n_tw, target_programs, split)
    ws = torch.empty(planes, n_split, device=x.device, dtype=torch.float32)
    _selective_pool_fwd_kernel[(groups, n_split)](
        x, y, ws, planes, C, H, W, h, w, scale_h, scale_w, *x.stride(), *y.stride(), n_tw, n_split, per,
        BP=BP, BPIX=BPIX, BW=BW, num_warps=NUM_WARPS)
    _rowsum(ws, out, 1.0 / (H * W))


def pool_backward(g, dy, H: int, W: int, scale_h: float, scale_w: float, *, bp=None) -> None:
    """dy ``[B, C, h, w]`` = adjoint of mean_hw∘up applied to g ``[B, C]``."""
    B, C, h, w = dy.shape
    BP, BPIX, BW, n_tw = _config(BWD_CONFIGS, h, w, B * C, bp)
    grid = (triton.cdiv(h, BPIX // BW) * n_tw, triton.cdiv(B * C, BP))
    _selective_pool_bwd_kernel[grid](
        g, dy, B * C, C, H, W, h, w, scale_h, scale_w, 1.0 / (H * W), *g.stride(), *dy.stride(), n_tw,
        BP=BP, BPIX=BPIX, BW=BW, num_warps=NUM_WARPS)


def fuse_forward(x, y, a, out, scale_h: float, scale_w: float, *, bp=None) -> None:
    """out (x's shape) = a0·x + a1·up(y); a ``[B, 2, C]`` fp32."""
    B, C, H, W = x.shape
    h, w = y.shape[-2:]
    BP, BPIX, BW, n_tw = _config(FWD_CONFIGS, H, W, B * C, bp)
    grid = (triton.cdiv(H, BPIX // BW) * n_tw, triton.cdiv(B * C, BP))
    _selective_fuse_fwd_kernel[grid](
        x, y, a, out, B * C, C, H, W, h, w, scale_h, scale_w, *x.stride(), *y.stride(), *out.stride(),
        *a.stride(), n_tw, BP=BP, BPIX=BPIX, BW=BW, num_warps=NUM_WARPS)


def fuse_backward(g, x, y, a, dx, dy, da, scale_h: float, scale_w: float, kh: int, kw: int, *,
                  target_programs: int = 1024, split=None, bp=None) -> None:
    """dx, dy and da (contiguous ``[B, 2, C]``, any float dtype) of the fuse in one pass over g, x, y."""
    import torch

    B, C, H, W = x.shape
    h, w = y.shape[-2:]
    planes = B * C
    BP, BPIX, BW, n_tw = _config(BWD_CONFIGS, h, w, planes, bp)
    groups = triton.cdiv(planes, BP)
    n_split, per = _split(groups, triton.cdiv(h, BPIX // BW) * n_tw, target_programs, split)
    ws = torch.empty(B * 2 * C, n_split, device=x.device, dtype=torch.float32)
    _selective_fuse_bwd_kernel[(groups, n_split)](
        g, x, y, a, dx, dy, ws, planes, C, H, W, h, w, scale_h, scale_w, kh, kw,
        *g.stride(), *x.stride(), *y.stride(), *dx.stride(), *dy.stride(), *a.stride(), n_tw, n_split, per,
        BP=BP, BPIX=BPIX, BW=BW, num_warps=NUM_WARPS)
    _rowsum(ws, da, 1.0)


def compile_specs():
    """Every kernel × {fp16, bf16, fp32} storage × every GPU tile config (``a`` is fp32)."""
    from transkd_fast.compile_check import CompileSpec

    i32, f32 = "i32", "fp32"

    def strides(prefix):
        return {f"{prefix}{k}": i32 for k in ("b", "c", "h", "w")}

    sizes = {"n_planes": i32, "C": i32, "H": i32, "W": i32, "h": i32, "w": i32, "scale_h": f32, "scale_w": f32}
    a_strides = {"sab": i32, "sak": i32, "sac": i32}
    tile = {"BP": "constexpr", "BPIX": "constexpr", "BW": "constexpr"}
    specs = []
    for dt in ("fp16", "bf16", "fp32"):
        p = f"*{dt}"
        specs.append(CompileSpec(
            _rowsum_kernel,
            {"ws_ptr": "*fp32", "out_ptr": p, "R": i32, "S": i32, "scale": f32,
             "BLOCK_R": "constexpr", "BLOCK_S": "constexpr"},
            {"BLOCK_R": ROWSUM_BLOCK_R, "BLOCK_S": ROWSUM_BLOCK_S}, num_warps=NUM_WARPS,
            label=f"rowsum {dt} BLOCK_R={ROWSUM_BLOCK_R} BLOCK_S={ROWSUM_BLOCK_S}"))
        for bp, bpix, bw in FWD_CONFIGS:
            cfg = {"BP": bp, "BPIX": bpix, "BW": bw}
            specs.append(CompileSpec(
                _selective_pool_fwd_kernel,
                {"x_ptr": p, "y_ptr": p, "ws_ptr": "*fp32", **sizes, **strides("sx"), **strides("sy"),
                 "n_tw": i32, "n_split": i32, "tiles_per_split": i32, **tile},
                cfg, num_warps=NUM_WARPS, label=f"pool fwd {dt} BP={bp} BPIX={bpix} BW={bw}"))
            specs.append(CompileSpec(
                _selective_fuse_fwd_kernel,
                {"x_ptr": p, "y_ptr": p, "a_ptr": "*fp32", "o_ptr": p, **sizes, **strides("sx"), **strides("sy"),
                 **strides("so"), **a_strides, "n_tw": i32, **tile},
                cfg, num_warps=NUM_WARPS, label=f"fuse fwd {dt} BP={bp} BPIX={bpix} BW={bw}"))
        for bp, bpix, bw in BWD_CONFIGS:
            cfg = {"BP": bp, "BPIX": bpix, "BW": bw}
            specs.append(CompileSpec(
                _selective_pool_bwd_kernel,
                {"g_ptr": p, "dy_ptr": p, **sizes, "inv_hw": f32, "sgb": i32, "sgc": i32, **strides("sd"),
                 "n_tw": i32, **tile},
                cfg, num_warps=NUM_WARPS, label=f"pool bwd {dt} BP={bp} BPIX={bpix} BW={bw}"))
            specs.append(CompileSpec(
                _selective_fuse_bwd_kernel,
                {"g_ptr": p, "x_ptr": p, "y_ptr": p, "a_ptr": "*fp32", "dx_ptr": p, "dy_ptr": p, "ws_ptr": "*fp32",
                 **sizes, "KH": i32, "KW": i32, **strides("sg"), **strides("sx"), **strides("sy"),
                 **strides("sdx"), **strides("sdy"), **a_strides, "n_tw": i32, "n_split": i32,
                 "tiles_per_split": i32, **tile},
                cfg, num_warps=NUM_WARPS, label=f"fuse bwd {dt} BP={bp} BPIX={bpix} BW={bw}"))
    return specs
