"""Triton kernels of efficient (spatial-reduction) attention, forward and backward.

Per batch b and head h, with q ``[B, Nq, H, D]`` and k, v ``[B, Nkv, H, D]``::

    S = scale · q kᵀ          [Nq, Nkv]
    P = softmax(S, dim=-1)     (row log-sum-exp L = log Σ_j exp S_ij)
    O = P v                    [Nq, D]

Backward, with dO given and Δ_i = Σ_d dO_id O_id (= Σ_j P_ij dP_ij)::

    dP = dO vᵀ,   dS = P ∘ (dP − Δ),   dq = scale · dS k,   dk = scale · dSᵀ q,   dv = Pᵀ dO

P is recomputed from q, k and L; nothing of size Nq × Nkv is ever stored.

Kernels (all take strides, unit stride on D assumed; batch/head offsets in int64):

- ``_attn_fwd_kernel``: grid (⌈Nq/BLOCK_M⌉, B·H). One query block, loop over key blocks with
  an online softmax in fp32 and exp2. Stores O (input dtype) and L (fp32, natural log).
- ``_attn_bwd_dq_kernel``: grid (⌈Nq/BLOCK_M⌉, B·H). The Δ preprocessing pass, fused: it
  reads dO and O once, stores Δ, then loops over key blocks for dq. Launched first.
- ``_attn_bwd_dkdv_kernel``: grid (⌈Nkv/BLOCK_N⌉, SPLIT, B·H). One key block, loop over the
  query rows of its split. SegFormer has few keys (Nkv = 512 at every MiT stage for a
  512×1024 input, fewer for smaller crops) and many queries (32768 at stage 1, one head),
  so ⌈Nkv/BLOCK_N⌉·B·H programs alone (8 at stage 1, batch 1) would leave a GPU idle:
  the query axis is split and each split writes fp32 partial dk/dv that the host sums
  (deterministic, no atomics). SPLIT = 1 writes dk/dv directly in the input dtype.

Autotuning (tables below): configs pruned per dtype, head dim and Nkv ≤ 32 (fp16/bf16 keep a
32-key tile there: one key tile covers every key, K/V of the head are loaded once per
program; longer Nkv, 512 at every MiT stage for 512×1024, loops over 64-key tiles that the
query blocks of a head re-read from L2). The key holds power-of-two buckets of B·H·Nq and
of Nkv, so a new image size tunes once per bucket, not once per size. The dkdv key tile
(``BLOCK_N``) is not tuned: :func:`dkdv_block_n` fixes it and :func:`default_split` sizes
the query split for it.

Interpreter (``TRITON_INTERPRET=1``): the same configs, pruning and keys; it has no GPU timer,
so a host stub ties every config and the first one pruning keeps runs. bf16 operands are
upcast to fp32 before ``tl.dot`` (its bf16 dot gives garbage, triton issue #11584) and
fp32 → bf16 casts round to nearest even by hand (it truncates); compiled kernels never take
those branches (``UPCAST`` is a constexpr, false there).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._device import sm_count

HEAD_DIMS = (16, 32, 64, 128)
LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _mm(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _to(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        if dtype == tl.bfloat16:
            # The interpreter truncates fp32 → bf16; compiled code rounds to nearest even.
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit(do_not_specialize=["ROWS_BUCKET", "NKV_BUCKET"])
def _attn_fwd_kernel(
    Q, K, V, OUT, LSE,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh,
    H, NQ, NKV, qk_scale, ROWS_BUCKET, NKV_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    OUT += b * sob + h * soh
    LSE += pid_bh.to(tl.int64) * NQ

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < NQ
    q = tl.load(Q + offs_m[:, None] * sqn + offs_d[None, :], mask=m_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, NKV, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < NKV
        k = tl.load(K + cols[:, None] * skn + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        v = tl.load(V + cols[:, None] * svn + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        s = _mm(q, tl.trans(k), UPCAST, PRECISION) * qk_scale  # log2 units
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(_to(p, v.dtype, UPCAST), v, UPCAST, PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(OUT + offs_m[:, None] * son + offs_d[None, :], _to(acc, OUT.dtype.element_ty, UPCAST), mask=m_ok[:, None])
    # natural-log LSE, the convention of PyTorch's SDPA and xformers
    tl.store(LSE + offs_m, (m_i + tl.log2(l_i)) / 1.4426950408889634, mask=m_ok)


@triton.jit(do_not_specialize=["ROWS_BUCKET", "NKV_BUCKET"])
def _attn_bwd_dq_kernel(
    Q, K, V, OUT, DO, DQ, LSE, DELTA,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh, sdob, sdon, sdoh, sdqb, sdqn, sdqh,
    H, NQ, NKV, scale, qk_scale, ROWS_BUCKET, NKV_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    OUT += b * sob + h * soh
    DO += b * sdob + h * sdoh
    DQ += b * sdqb + h * sdqh
    LSE += pid_bh.to(tl.int64) * NQ
    DELTA += pid_bh.to(tl.int64) * NQ

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < NQ
    q = tl.load(Q + offs_m[:, None] * sqn + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * sdon + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    o = tl.load(OUT + offs_m[:, None] * son + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + offs_m, delta, mask=m_ok)
    lse2 = tl.load(LSE + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, NKV, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < NKV
        k = tl.load(K + cols[:, None] * skn + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        v = tl.load(V + cols[:, None] * svn + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        s = _mm(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
        p = tl.where(n_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = _mm(do, tl.trans(v), UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _mm(_to(ds, k.dtype, UPCAST), k, UPCAST, PRECISION)
    dq = dq * scale
    tl.store(DQ + offs_m[:, None] * sdqn + offs_d[None, :], _to(dq, DQ.dtype.element_ty, UPCAST), mask=m_ok[:, None])


@triton.jit(do_not_specialize=["ROWS_BUCKET", "NKV_BUCKET"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdob, sdon, sdoh,
    sdks, sdkb, sdkn, sdkh, sdvs, sdvb, sdvn, sdvh,
    H, NQ, NKV, Q_PER_SPLIT, scale, qk_scale, ROWS_BUCKET, NKV_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    s64 = pid_s.to(tl.int64)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    DO += b * sdob + h * sdoh
    DK += s64 * sdks + b * sdkb + h * sdkh
    DV += s64 * sdvs + b * sdvb + h * sdvh
    LSE += pid_bh.to(tl.int64) * NQ
    DELTA += pid_bh.to(tl.int64) * NQ

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n < NKV
    k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :], mask=n_ok[:, None], other=0.0)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    lo = pid_s * Q_PER_SPLIT
    hi = tl.minimum(lo + Q_PER_SPLIT, NQ)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        m_ok = rows < hi
        q = tl.load(Q + rows[:, None] * sqn + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        do = tl.load(DO + rows[:, None] * sdon + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        lse2 = tl.load(LSE + rows, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + rows, mask=m_ok, other=0.0)
        st = _mm(k, tl.trans(q), UPCAST, PRECISION) * qk_scale  # Sᵀ, [BLOCK_N, BLOCK_M]
        pt = tl.where(m_ok[None, :], tl.exp2(st - lse2[None, :]), 0.0)
        dv += _mm(_to(pt, do.dtype, UPCAST), do, UPCAST, PRECISION)
        dpt = _mm(v, tl.trans(do), UPCAST, PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += _mm(_to(dst, q.dtype, UPCAST), q, UPCAST, PRECISION)
    dk = dk * scale
    tl.store(DK + offs_n[:, None] * sdkn + offs_d[None, :], _to(dk, DK.dtype.element_ty, UPCAST), mask=n_ok[:, None])
    tl.store(DV + offs_n[:, None] * sdvn + offs_d[None, :], _to(dv, DV.dtype.element_ty, UPCAST), mask=n_ok[:, None])


# ---------------------------------------------------------------------------------------
# Autotune configs, pruned per dtype, head dim and Nkv.
#
# Query-block kernels (fwd, dq): (BLOCK_M, BLOCK_N, warps, stages). The key-block kernel
# (dkdv) gets its BLOCK_N from the host (:func:`dkdv_block_n`: the query split depends on
# it) and tunes (BLOCK_M, warps, stages) only.
#
# fp16/bf16: tensor-core tiles; two tilings for long Nkv and one 32-key tile for Nkv ≤ 32
# (one key tile covers every key). fp32 runs exact-fp32 (FMA) dots, which need far more
# registers: one small tiling each. D = 128 holds [BLOCK_M, 128] q / dO / accumulators per
# program: smaller tiles, so that nothing spills on sm_80/sm_90 (transkd_fast.compile_check
# builds every launch, D = 128 among them).

_SMALL_NKV = 32
_FWD_TILES = {  # (fp32, head dim ≤ 64, Nkv ≤ 32) → configs
    (False, True, False): ((128, 64, 4, 3), (64, 64, 4, 2)),
    (False, True, True): ((128, _SMALL_NKV, 4, 2),),
    (False, False, False): ((64, 64, 4, 2), (128, 64, 8, 2)),
    (False, False, True): ((64, _SMALL_NKV, 4, 2),),
    (True, True, False): ((32, 32, 4, 2),),
    (True, True, True): ((32, 32, 4, 2),),
    (True, False, False): ((32, 32, 8, 2),),
    (True, False, True): ((32, 32, 8, 2),),
}
_DQ_TILES = {
    (False, True, False): ((128, 64, 4, 3), (64, 64, 4, 3)),
    (False, True, True): ((128, _SMALL_NKV, 4, 2),),
    (False, False, False): ((64, 32, 4, 2), (64, 64, 8, 2)),
    (False, False, True): ((64, _SMALL_NKV, 4, 2),),
    (True, True, False): ((32, 32, 4, 2),),
    (True, True, True): ((32, 32, 4, 2),),
    (True, False, False): ((32, 32, 8, 2),),
    (True, False, True): ((32, 32, 8, 2),),
}
_DKDV_TILES = {  # (fp32, head dim ≤ 64, Nkv ≤ 32) → (BLOCK_N, ((BLOCK_M, warps, stages), ...))
    (False, True, False): (64, ((32, 4, 3), (64, 4, 3))),
    (False, True, True): (_SMALL_NKV, ((64, 4, 2),)),
    (False, False, False): (64, ((32, 4, 2), (64, 8, 2))),
    (False, False, True): (_SMALL_NKV, ((32, 4, 2),)),
    (True, True, False): (64, ((16, 8, 2),)),
    (True, True, True): (64, ((16, 8, 2),)),
    (True, False, False): (32, ((16, 8, 2),)),
    (True, False, True): (32, ((16, 8, 2),)),
}


def _tile_key(dtype: torch.dtype, head_dim: int, nkv: int) -> tuple[bool, bool, bool]:
    return dtype == torch.float32, head_dim <= 64, nkv <= _SMALL_NKV


def dkdv_block_n(dtype: torch.dtype, head_dim: int, nkv: int) -> int:
    """The dk/dv kernel's key tile: fixed per (dtype, head dim, Nkv ≤ 32), not tuned, so that
    :func:`default_split` sizes the query split for the tile that really runs."""
    return _DKDV_TILES[_tile_key(dtype, head_dim, nkv)][0]


def _q_rows(table):
    return {(m, n, w, s) for rows in table.values() for m, n, w, s in rows}


def _q_configs(table):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in sorted(_q_rows(table))]


def _kv_configs():
    rows = sorted({r for _, rows in _DKDV_TILES.values() for r in rows})
    return [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s) for m, w, s in rows]


def _prune_by(table, kv: bool):
    def prune(configs, named_args, **kwargs):
        """Keep the configs of this launch's (dtype, head dim, Nkv ≤ 32) row of the table."""
        key = _tile_key(named_args["Q"].dtype, kwargs["HEAD_DIM"], named_args["NKV"])
        if kv:
            keep = set(table[key][1])
            return [c for c in configs if (c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) in keep]
        keep = set(table[key])
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep]
    return prune


def _bucket(n: int) -> int:
    """Power-of-two bucket of a size: the autotune key, so that a new image size (a new Nq
    and Nkv) reuses the config tuned for its bucket instead of benchmarking again."""
    return triton.next_power_of_2(max(int(n), 1))


def _host_bench(kernel_call, quantiles):
    # The interpreter has no GPU timer ("0 active drivers"): every config ties, so the first
    # config the pruning keeps wins, without running it.
    return [1.0, 1.0, 1.0]


# Autotune key: buckets of the query rows of the grid (B·H·Nq, which sizes the grid) and of
# Nkv (the key loop), the head dim; the dtypes of the tensor arguments join the key by
# themselves. dkdv adds its host-chosen BLOCK_N.
_KEY = ["ROWS_BUCKET", "NKV_BUCKET", "HEAD_DIM"]
_BENCH = (lambda fn, quantiles: _host_bench(fn, quantiles)) if _INTERPRET else None
_fwd_tuned = triton.autotune(_q_configs(_FWD_TILES), key=_KEY, do_bench=_BENCH,
                             prune_configs_by={"early_config_prune": _prune_by(_FWD_TILES, False)})(_attn_fwd_kernel)
_dq_tuned = triton.autotune(_q_configs(_DQ_TILES), key=_KEY, do_bench=_BENCH,
                            prune_configs_by={"early_config_prune": _prune_by(_DQ_TILES, False)})(_attn_bwd_dq_kernel)
_dkdv_tuned = triton.autotune(_kv_configs(), key=[*_KEY, "BLOCK_N"], do_bench=_BENCH,
                              prune_configs_by={"early_config_prune": _prune_by(_DKDV_TILES, True)}
                              )(_attn_bwd_dkdv_kernel)


# ---------------------------------------------------------------------------------------
# Launchers


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # The kernels assume unit stride on D (true for views of Linear outputs); anything else
    # is copied once rather than read element by element.
    return t if t.stride(-1) == 1 else t.contiguous()


def _precision(dtype: torch.dtype) -> str:
    # (The interpreter computes every dot in the operands' own precision either way.)
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    # Interpreter only: its bf16 tl.dot gives garbage (triton issue #11584).
    return _INTERPRET and dtype == torch.bfloat16


def _launch_kwargs(config: Optional[dict], *names: str) -> dict:
    if config is None:
        return {}
    out = {k: config[k] for k in names}
    out["num_warps"] = config.get("num_warps", 4)
    out["num_stages"] = config.get("num_stages", 2)
    return out


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      config: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """O ``[B, Nq, H, D]`` (contiguous, q's dtype) and L ``[B, H, Nq]`` fp32 for strided q, k, v.

    ``config`` = ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}`` bypasses autotuning.
    """
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, NQ, H, D = q.shape
    NKV = k.shape[1]
    o = torch.empty((B, NQ, H, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, NQ), device=q.device, dtype=torch.float32)
    kern = _fwd_tuned if config is None else _attn_fwd_kernel
    kern[lambda meta: (triton.cdiv(NQ, meta["BLOCK_M"]), B * H)](
        q, k, v, o, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        H, NQ, NKV, scale * LOG2E, _bucket(B * H * NQ), _bucket(NKV),
        HEAD_DIM=D, UPCAST=_upcast(q.dtype), PRECISION=_precision(q.dtype),
        **_launch_kwargs(config, "BLOCK_M", "BLOCK_N"),
    )
    return o, lse


# dkdv splits the query axis in chunks that are multiples of this: every dkdv BLOCK_M of the
# tables divides it, so no split ends in a partial query tile.
_SPLIT_ALIGN = 128


def _num_sms(device: torch.device) -> int:
    # On CPU tensors (the interpreter) a small count, so that tests at small sizes still
    # take the split path; the compile check sets the modeled GPU's count.
    return sm_count(device, 4)


def default_split(B: int, H: int, NQ: int, NKV: int, device: torch.device, block_n: int) -> int:
    """Query splits for dk/dv with key tiles of ``block_n`` (:func:`dkdv_block_n`, the tile the
    launch uses): about two waves of programs, each split ≥ 2 alignment chunks."""
    kv_blocks = triton.cdiv(NKV, block_n)
    want = triton.cdiv(2 * _num_sms(device), kv_blocks * B * H)
    most = max(1, NQ // (2 * _SPLIT_ALIGN))
    return max(1, min(want, most))


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       o: torch.Tensor, lse: torch.Tensor, scale: float, split: Optional[int] = None,
                       config: Optional[dict] = None, kv_config: Optional[dict] = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (contiguous, input dtype) from dO, the inputs, O and L of the forward.

    ``split``: query splits of the dk/dv pass (``None``: :func:`default_split`).
    ``config`` / ``kv_config``: explicit block sizes for the dq / dkdv kernels.
    """
    do, q, k, v, o = (_unit_last(t) for t in (do, q, k, v, o))
    lse = lse.contiguous()
    B, NQ, H, D = q.shape
    NKV = k.shape[1]
    dev = q.device
    block_n = dkdv_block_n(q.dtype, D, NKV) if kv_config is None else kv_config["BLOCK_N"]
    split = default_split(B, H, NQ, NKV, dev, block_n) if split is None else split
    align = _SPLIT_ALIGN if kv_config is None else kv_config["BLOCK_M"]
    q_per_split = triton.cdiv(triton.cdiv(NQ, split), align) * align
    split = triton.cdiv(NQ, q_per_split)
    buckets = (_bucket(B * H * NQ), _bucket(NKV))

    dq = torch.empty((B, NQ, H, D), device=dev, dtype=q.dtype)
    delta = torch.empty((B, H, NQ), device=dev, dtype=torch.float32)
    common = dict(UPCAST=_upcast(q.dtype), PRECISION=_precision(q.dtype), HEAD_DIM=D)
    kern = _dq_tuned if config is None else _attn_bwd_dq_kernel
    kern[lambda meta: (triton.cdiv(NQ, meta["BLOCK_M"]), B * H)](
        q, k, v, o, do, dq, lse, delta,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
        H, NQ, NKV, scale, scale * LOG2E, *buckets, **common, **_launch_kwargs(config, "BLOCK_M", "BLOCK_N"),
    )

    if split == 1:
        dk = torch.empty((B, NKV, H, D), device=dev, dtype=q.dtype)
        dv = torch.empty_like(dk)
        split_strides = (0, *dk.stride()[:3], 0, *dv.stride()[:3])
    else:
        dk = torch.empty((split, B, NKV, H, D), device=dev, dtype=torch.float32)
        dv = torch.empty_like(dk)
        split_strides = (*dk.stride()[:4], *dv.stride()[:4])
    if kv_config is None:
        kern, kv_kwargs = _dkdv_tuned, {"BLOCK_N": block_n}
    else:
        kern, kv_kwargs = _attn_bwd_dkdv_kernel, _launch_kwargs(kv_config, "BLOCK_M", "BLOCK_N")
    kern[(triton.cdiv(NKV, block_n), split, B * H)](
        q, k, v, do, dk, dv, lse, delta,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        *split_strides,
        H, NQ, NKV, q_per_split, scale, scale * LOG2E, *buckets, **common, **kv_kwargs,
    )
    if split == 1:
        return dq, dk, dv
    return dq, dk.sum(0).to(q.dtype), dv.sum(0).to(q.dtype)
