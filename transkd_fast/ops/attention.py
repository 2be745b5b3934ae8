"""Efficient (spatial-reduction) attention of SegFormer / PVTv2.

Math, per batch b and head h, with q ``[B, Nq, H, D]`` and k, v ``[B, Nkv, H, D]``
(the xformers layout; strided views of the ``q`` and fused ``kv`` Linear outputs)::

    S = scale · q_bh @ k_bhᵀ            [Nq, Nkv]      scale defaults to D^-0.5
    P = softmax(S, dim=-1)
    o_bh = P @ v_bh                      [Nq, D]        returned as [B, Nq, H, D]

Backends:

- ``reference``: eager PyTorch in fp32 (fp64 for fp64 inputs) that materializes S and P,
  as the original does. Plain ATen ops, so fvcore and autograd see every matmul.
- ``torch``: one custom op ``transkd_fast::efficient_attention`` over PyTorch's fused SDPA
  kernels; it saves only the output and the row log-sum-exp for backward. On CPU: SDPA's
  flash kernel for CPU; its backward runs one thread per (batch, head), so the backward cuts
  the query axis into chunks when there are fewer pairs than threads (MiT stage 1 has one
  head), and rows the kernel takes for fully masked (all-NaN scores with few keys) are set
  to NaN as in the reference (:func:`_cpu_nan_rows`). CPU inference (no autograd recording,
  plain tensors, not tracing / compiling / recording launches; :func:`_cpu_inference_applies`)
  skips the custom op and keeps no LSE: :func:`_cpu_inference`, one path in two dtypes —

  - fp32 (autograd off, oneDNN available, not under autocast): :func:`_cpu_fp32_blocked`, per
    (batch, head) and block of query rows ``S = q_blk (scale·k)ᵀ``, in-place softmax,
    ``O_blk = S v`` as two oneDNN matmuls, the block of S kept in cache; MiT's long query /
    short key shapes run ~1.5–2.5× faster than SDPA's CPU flash kernel on the AVX-512 EPYC
    without AMX, and ~1.4–1.7× slower on an AVX2-only one and on an Intel Xeon with AMX, so
    only on AVX-512 CPUs without AMX (:data:`FP32_BLOCKED`; elsewhere the custom op, SDPA's
    flash kernel). With
    several threads only up to :data:`ATTN_MAX_BLOCKS` blocks (each block's calls end in
    barriers, slow on a loaded machine); beyond, the custom op.
  - bf16 (a bf16 model, or the Linears' bf16 outputs under CPU autocast(bf16)):
    :func:`_cpu_bf16_chunked`, ATen bf16 matmuls per chunk of query rows (softmax statistics
    in fp32): SDPA's CPU flash kernel is no faster in bf16 than in fp32 on CPUs without AMX,
    where oneDNN's bf16 GEMMs are. With AMX the flash kernel is ~1.6–2× faster than the chunked
    path, so there bf16 takes the custom op too (:data:`BF16_CHUNKED`).

  Models call :func:`efficient_attention` only, so this choice is made in one place, under
  the backend in force. On CUDA: the kernel SDPA itself picks (``torch._fused_sdp_choice``:
  flash, cuDNN or mem-efficient, as ``torch.backends.cuda`` allows), forward and backward,
  its LSE sliced to ``[B, H, Nq]``; where SDPA would fall back to its math path (fp64), a
  materialized math path with the LSE.
- ``triton``: the same custom op over our flash-style Triton kernels
  (``transkd_fast.kernels.attention``): online softmax forward saving O and the LSE, a
  Δ = rowsum(dO ∘ O) pass, dK/dV per key block (query axis split), dQ per query block.
  CUDA, or CPU under ``TRITON_INTERPRET=1``; D ∈ {16, 32, 64, 128}; fp32/fp16/bf16.
- ``xformers``: the same custom op over ``xformers.ops.fmha``'s forward-with-LSE and
  backward (CUDA only; wired and refusal-tested, not run in this project's CPU CI).

The custom op returns ``(out, lse)``: every backend returns ``out`` contiguous
``[B, Nq, H, D]`` (so the ``proj`` Linear reads it without a copy); ``lse`` ``[B, H, Nq]``
(fp32; fp64 for fp64 inputs) is what backward needs.
"""

from __future__ import annotations

from typing import Optional

import torch

from transkd_fast.backend import Support, check_tensor, is_recording_launches, on_input_device, register_op, resolve
from transkd_fast.ops import onednn

OP = "efficient_attention"


def efficient_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  scale: Optional[float] = None) -> torch.Tensor:
    """Eager reference in fp32 math (fp64 for fp64 inputs); returns ``[B, Nq, H, D]`` in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    math_dtype = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = (t.to(math_dtype).transpose(1, 2) for t in (q, k, v))  # [B, H, N, D]
    attn = (qf @ kf.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    return (attn @ vf).transpose(1, 2).to(q.dtype)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    B, Nq, H, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(
            f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)}: expected "
            f"[B={B}, Nkv, H={H}, D={D}] (xformers layout [batch, tokens, heads, head_dim])"
        )
    if k.shape[1] == 0 or Nq == 0:
        raise ValueError("efficient_attention needs at least one query and one key")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


# ---------------------------------------------------------------------------------------
# torch backend: PyTorch's fused SDPA kernels that expose the log-sum-exp.


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # The fused kernels read head_dim as contiguous; the CPU one silently gives wrong results
    # otherwise. Views of Linear outputs already are; anything else is copied.
    return t if t.stride(-1) == 1 else t.contiguous()


def _torch_forward(q, k, v, scale):
    qt, kt, vt = (_unit_last(t).transpose(1, 2) for t in (q, k, v))
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, 0.0, False, attn_mask=None, scale=scale)
        # Both kernels allocate [B, Nq, H, D] and return a transposed view: no copy here.
        # The CPU kernel's LSE is a [B, H, Nq] view of a [B, Nq, H] buffer: made contiguous
        # (small) so that every backend returns the layout register_fake declares.
        out, lse = out.transpose(1, 2).contiguous(), lse.to(_lse_dtype(q.dtype)).contiguous()
        return _cpu_nan_rows(q, k, out, lse, scale)
    choice = _sdpa_choice(qt, kt, vt, scale)
    if choice == _FLASH:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, False, False, scale=scale)[:2]
    elif choice == _EFFICIENT:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            qt, kt, vt, None, True, 0.0, False, scale=scale)[:2]
    elif choice == _CUDNN:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            qt, kt, vt, None, True, 0.0, False, False, scale=scale)[:2]
    else:  # SDPA would run its math path (fp64, unsupported shapes): ours, with the LSE
        return _math_forward(q, k, v, scale)
    # flash: [B, H, Nq]; mem-efficient: [B, H, ceil32(Nq)] (padded); cuDNN: [B, H, Nq, 1].
    # Sliced to the [B, H, Nq] that register_fake declares, so fake and real agree at any Nq.
    B, Nq, H, _ = q.shape
    lse = lse.reshape(B, H, -1)[:, :, :Nq].to(_lse_dtype(q.dtype)).contiguous()
    return out.transpose(1, 2).contiguous(), lse


# torch.nn.attention.SDPBackend values, as torch._fused_sdp_choice returns them.
_FLASH, _EFFICIENT, _CUDNN = 1, 2, 3


def _sdpa_choice(qt, kt, vt, scale) -> int:
    """The fused kernel F.scaled_dot_product_attention would run for these [B, H, N, D] inputs
    (it honours torch.backends.cuda's enable_* switches and each kernel's constraints).
    Asked as for inputs that need gradients, so that forward and backward choose alike."""
    args = [t.detach().requires_grad_() for t in (qt, kt, vt)]
    return int(torch._fused_sdp_choice(*args, None, 0.0, False, scale=scale))


def _math_forward(q, k, v, scale):
    """Materialized attention with its LSE (where SDPA itself would fall back to math)."""
    dt = torch.promote_types(q.dtype, torch.float32)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(dt), k.to(dt)) * scale
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(s - lse[..., None]), v.to(dt))
    return out.to(q.dtype).contiguous(), lse.to(_lse_dtype(q.dtype)).contiguous()


def _math_backward(grad_out, q, k, v, out, lse, scale):
    dt = torch.promote_types(q.dtype, torch.float32)
    q, k, v, out, do = (t.to(dt) for t in (q, k, v, out, grad_out))
    p = torch.exp(torch.einsum("bqhd,bkhd->bhqk", q, k) * scale - lse.to(dt)[..., None])
    dv = torch.einsum("bhqk,bqhd->bkhd", p, do)
    dp = torch.einsum("bqhd,bkhd->bhqk", do, v)
    delta = (do * out).sum(-1).transpose(1, 2)  # [B, H, Nq]
    ds = p * (dp - delta[..., None]) * scale
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, k)
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q)
    return tuple(t.to(grad_out.dtype) for t in (dq, dk, dv))


def _cpu_nan_rows(q, k, out, lse, scale):
    """NaN where the reference gives NaN, which SDPA's CPU flash kernel misses in one case.

    Its row maximum drops NaN in the scalar tail of the key axis (``std::max(-inf, NaN)`` is
    -inf; the vector part propagates NaN), so a row whose scores are all NaN (a NaN in that
    query row, ``scale = nan``) with fewer keys than one SIMD vector (16 fp32 lanes on AVX512)
    keeps max = -inf, and the kernel writes such a row as fully masked: output 0, LSE 0. The
    reference gives NaN for every row whose scores are all NaN or -inf (the only rows that can
    keep max = -inf). So: rows with LSE exactly 0 are candidates (one compare over the small
    [B, H, Nq] LSE; normally none), and a candidate whose recomputed scores have nothing
    above -inf becomes NaN in the output and the LSE (its backward then gives NaN too)."""
    if scale != scale:
        return out.fill_(float("nan")), lse.fill_(float("nan"))
    cand = lse == 0
    if not bool(cand.any()):
        return out, lse
    dt = torch.promote_types(q.dtype, torch.float32)
    bad = torch.zeros_like(cand)
    for b, h in cand.any(-1).nonzero().tolist():
        for rows in cand[b, h].nonzero().squeeze(1).split(4096):
            s = (q[b, rows, h].to(dt) @ k[b, :, h].to(dt).T) * scale
            bad[b, h, rows] = ~(s > float("-inf")).any(-1)
    out.masked_fill_(bad.transpose(1, 2).unsqueeze(-1), float("nan"))
    lse.masked_fill_(bad, float("nan"))
    return out, lse


# ---------------------------------------------------------------------------------------
# torch backend, CPU inference: no autograd recording, so no LSE to keep for a backward.

# fp32: scores held at once per thread: 2^18 fp32 values (1 MiB, the L2 share of a core on this
# project's machines), so a block of S = q kᵀ is written, softmaxed and read back in cache; but
# never fewer than 256 query rows: below that the three calls per block cost more than the cache
# saves (2048 keys, one thread: 128-row blocks 7% slower than 256-row ones).
_ATTN_BLOCK_ELEMS = 1 << 18
_ATTN_MIN_ROWS = 256


# fp32, with several threads: at most this many blocks per call of :func:`_cpu_fp32_blocked`.
# Each block is three parallel calls, and each parallel call ends in a barrier (OpenMP / oneDNN
# split the work statically): on a shared machine every barrier can wait for a thread the kernel
# has descheduled. With 2 threads on a loaded 2-core machine, MiT-B0 at 1024×2048 (~6000 blocked
# calls) ran 4–6× slower than with the one-call flash kernel, while at 512×1024 (≤ 64 blocks per
# call) the blocked path stayed ahead. One thread has no barriers: no limit. Over the limit the
# call goes to the custom op (SDPA's CPU flash kernel, one call).
ATTN_MAX_BLOCKS = 64


# Whether the CPU has AMX tiles. There PyTorch's CPU flash kernel (SDPA) is the faster one in
# both dtypes (its bf16 GEMMs are AMX brgemm calls): measured on the 2-core Intel Xeon with AMX,
# 2 threads, MiT-B0 shapes at 512×1024 (stage 1: 32768 queries, 512 keys, one head of 32), one
# attention call: fp32 10.4 ms (flash) against 14.6 (blocked), bf16 5.1 against 8.3 (chunked);
# stages 2–4 alike (fp32 5.5 / 7.3, 3.6 / 5.0, 1.6 / 2.8; bf16 2.5 / 4.5, 1.8 / 3.3, 0.7 / 1.4).
CPU_HAS_AMX = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


# fp32: whether the blocked path is the faster one on this CPU, by the vector ISA PyTorch's CPU
# kernels dispatch to and AMX. Measured, 2 threads, MiT-B0 at 512×1024: on the AVX-512 AMD EPYC
# (no AMX) the blocked oneDNN matmuls ran 1.5–2.5× faster than SDPA's CPU flash kernel; on the
# AVX2-only AMD EPYC (Zen 3) the flash kernel was the faster, 26.9 ms against 38.4 (stages 2
# and 3: 14.3 / 21.7 and 9.3 / 15.6 ms), and on the Intel Xeon with AMX too (above). Where
# False, fp32 inference takes the custom op (SDPA's flash kernel), same values up to rounding.
FP32_BLOCKED = torch.backends.cpu.get_cpu_capability() == "AVX512" and not CPU_HAS_AMX

# bf16: whether the chunked path (:func:`_cpu_bf16_chunked`) is the faster one: on CPUs without
# AMX (the AVX512-BF16 AMD EPYC), where SDPA's flash kernel is no faster in bf16 than in fp32.
# With AMX, bf16 inference takes the custom op (SDPA's flash kernel: S kept in fp32, so a
# smaller error than the chunked path's). The chunked path would also meet a oneDNN quirk there:
# its AMX bf16 matmul with an odd inner size (P @ V with an odd number of keys) reads one element
# past each row of P against B's zero padding, so a NaN row of P also makes the row before it NaN.
BF16_CHUNKED = not CPU_HAS_AMX


def attention_rows(n_kv: int, threads: Optional[int] = None) -> int:
    """Query rows per block of :func:`_cpu_fp32_blocked`: ~``_ATTN_BLOCK_ELEMS`` scores per
    thread, at least ``_ATTN_MIN_ROWS``, a multiple of 16."""
    threads = torch.get_num_threads() if threads is None else threads
    return max(_ATTN_MIN_ROWS, (_ATTN_BLOCK_ELEMS * threads // max(n_kv, 1)) // 16 * 16)


def _cpu_fp32_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      rows: Optional[int] = None) -> torch.Tensor:
    """fp32 attention in blocks of query rows with oneDNN matmuls; q ``[B, Nq, H, D]``, k/v
    ``[B, Nkv, H, D]`` (strided views allowed) → contiguous ``[B, Nq, H, D]``.

    Per (batch b, head h): kₛ = scale · k_bh (``[Nkv, D]``), v_bhᵀ (``[D, Nkv]``); per block of
    ``rows`` queries (default :func:`attention_rows`)::

        S = q_blk kₛᵀ              [rows, Nkv]   oneDNN matmul (mkldnn::_linear_pointwise)
        S ← softmax(S, dim=-1)     in place: the block of S stays in cache
        O_blk = S v_bh             [rows, D]     oneDNN matmul (weight v_bhᵀ), written into out

    Same values as the reference up to rounding (the scale is applied to k instead of S); rows
    whose scores are all NaN or -inf give NaN, as in the reference (softmax of such a row is NaN).

    Why: the SegFormer shapes have long query sequences against short key sequences (MiT-B0
    stage 1 at 512×1024: 32768 queries, 512 keys, one head of 32) where PyTorch's CPU flash
    kernel ran at ~50 GFLOP/s on the AVX-512 AMD EPYC and this at ~1.5–2.5× that; on the
    AVX2-only EPYC and on the Intel Xeon with AMX the flash kernel is the faster, hence
    :data:`FP32_BLOCKED`.
    """
    B, N, H, D = q.shape
    M = k.shape[1]
    rows = attention_rows(M) if rows is None else rows
    out = q.new_empty(B, N, H, D)
    lin = torch.ops.mkldnn._linear_pointwise
    for b in range(B):
        for h in range(H):
            ks = k[b, :, h] * scale  # [M, D], a fresh contiguous tensor
            vt = v[b, :, h].t().contiguous()  # [D, M]
            qh = q[b, :, h]
            if not qh.is_contiguous():  # several heads: the head's columns gathered once
                qh = qh.contiguous()
            for i in range(0, N, rows):
                s = lin(qh[i:i + rows], ks, None, "none", [], "")
                torch.softmax(s, -1, out=s)
                out[b, i:i + rows, h] = lin(s, vt, None, "none", [], "")
    return out


# bf16: scores per query chunk: 2^20 bf16 values (2 MiB, about an L2).
_BF16_CHUNK_SCORES = 1 << 20


def _cpu_bf16_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """bf16 attention in chunks of query rows with ATen matmuls; q ``[B, Nq, H, D]``, k/v
    ``[B, Nkv, H, D]`` bf16 (strided views allowed) → contiguous ``[B, Nq, H, D]`` bf16. Per
    chunk of query rows, all (batch, head) pairs in one batched matmul::

        S = q_c (scale · k)ᵀ       bf16 GEMM (fp32 accumulation), S rounded to bf16
        P = softmax(S)             max, exp and sum in fp32 (ATen's bf16 softmax), P rounded to bf16
        O_c = P v                  bf16 GEMM (fp32 accumulation), rounded to bf16

    Against the fp32 math the error is a few bf16 roundings (S, P, O and scale·k): ‖ΔO‖/‖O‖
    about 5e-3 on random inputs, where SDPA's flash kernel (S kept in fp32) gives about 2e-3.
    Rows whose scores are all NaN or -inf give NaN, as in the reference. S is materialized one
    chunk at a time (:data:`_BF16_CHUNK_SCORES` values), never the whole [Nq, Nkv] map.

    Why: SDPA's CPU flash kernel is no faster in bf16 than in fp32 on CPUs without AMX, where
    oneDNN's bf16 GEMMs (behind ATen's bf16 matmul) are; with AMX it is the faster
    (:data:`BF16_CHUNKED`).
    """
    B, Nq, H, D = q.shape
    Nkv = k.shape[1]
    kt = (k * scale).permute(0, 2, 3, 1).contiguous()  # [B, H, D, Nkv], small: Nkv rows
    vt = v.transpose(1, 2).contiguous()                 # [B, H, Nkv, D]
    qt = q.transpose(1, 2)                              # [B, H, Nq, D] view
    out = q.new_empty(B, Nq, H, D)
    rows = max(64, _BF16_CHUNK_SCORES // (B * H * Nkv))
    for s in range(0, Nq, rows):
        p = torch.softmax(torch.matmul(qt[:, :, s:s + rows], kt), dim=-1)
        out[:, s:s + rows] = torch.matmul(p, vt).transpose(1, 2)
    return out


def _cpu_inference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   rows: Optional[int] = None) -> torch.Tensor:
    """The torch backend's CPU inference path (where :func:`_cpu_inference_applies`):
    fp32 → :func:`_cpu_fp32_blocked` (``rows`` query rows per block, default
    :func:`attention_rows`), bf16 → :func:`_cpu_bf16_chunked`. Contiguous ``[B, Nq, H, D]``
    in q's dtype; no LSE (nothing will run a backward)."""
    if q.dtype == torch.float32:
        return _cpu_fp32_blocked(q, k, v, scale, rows)
    return _cpu_bf16_chunked(q, k, v, scale)


def _within_block_limit(q: torch.Tensor, k: torch.Tensor) -> bool:
    """At most :data:`ATTN_MAX_BLOCKS` blocks of :func:`_cpu_fp32_blocked` with more than one
    thread (any number with one)."""
    threads = torch.get_num_threads()
    if threads == 1:
        return True
    B, N, H, _ = q.shape
    return B * H * -(-N // attention_rows(k.shape[1], threads)) <= ATTN_MAX_BLOCKS


def _cpu_inference_applies(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`efficient_attention` takes :func:`_cpu_inference` instead of the custom op.

    Always: the torch backend on CPU tensors, plain ones (not fake / functional), outside
    tracing, scripting and compiling (where the custom op is the one node to record) and outside
    :func:`transkd_fast.backend.recording_launches` (which models a GPU's launches). Then:

    - fp32: on CPUs where the blocked path is the faster one (:data:`FP32_BLOCKED`: AVX-512
      without AMX),
      autograd off and :func:`transkd_fast.ops.onednn.compute_dtype` fp32 for q (oneDNN
      available; not under CPU autocast, which makes it bf16: the custom op then runs as before;
      not under the global ``reference`` backend), and with several threads at most
      :data:`ATTN_MAX_BLOCKS` blocks (else SDPA's flash kernel, one call).
    - bf16 (cast weights, or the teacher under bf16 autocast, whose Linears give bf16 q/k/v):
      on CPUs without AMX (:data:`BF16_CHUNKED`), and no autograd recording (grad off, or no
      input requiring grad).
    """
    if not (name == "torch" and q.device.type == "cpu" and not is_recording_launches()
            and all(type(t) is torch.Tensor for t in (q, k, v))  # not fake / functional tensors
            and not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling())):
        return False
    if q.dtype == torch.float32:
        return (FP32_BLOCKED and not torch.is_grad_enabled() and onednn.compute_dtype(q) == torch.float32
                and _within_block_limit(q, k))
    if q.dtype == torch.bfloat16:
        return BF16_CHUNKED and not (torch.is_grad_enabled()
                                     and (q.requires_grad or k.requires_grad or v.requires_grad))
    return False


# ---------------------------------------------------------------------------------------
# torch backend: backward (the custom op's).


def _cpu_query_chunks(B: int, H: int, Nq: int) -> int:
    """Query chunks for the CPU backward, which runs one thread per (batch, head): with fewer
    (batch, head) pairs than threads (stage 1 of MiT has one head) the query axis is cut into
    chunks that become extra batch entries. A divisor of Nq, chunks of ≥ 256 queries."""
    threads = torch.get_num_threads()
    c = threads // (B * H) if B * H < threads else 1
    while c > 1 and (Nq % c or Nq // c < 256):
        c -= 1
    return max(c, 1)


def _torch_backward(grad_out, q, k, v, out, lse, scale):
    grad_out, q, k, v, out = (_unit_last(t) for t in (grad_out, q, k, v, out))
    if q.device.type == "cpu":
        B, Nq, H, D = q.shape
        # fp32/fp64 only: in fp16/bf16 the per-chunk dk/dv would each be rounded before the sum
        c = _cpu_query_chunks(B, H, Nq) if q.dtype in (torch.float32, torch.float64) else 1
        if c > 1:
            L, Nkv = Nq // c, k.shape[1]
            # q, out, dO: [B, Nq, H, D] → [B·c, L, H, D] (a view for Linear-output layouts);
            # k, v repeated per chunk (small: Nkv rows); lse [B, H, Nq] → [B·c, H, L].
            q, out, grad_out = (t.reshape(B * c, L, H, D) for t in (q, out, grad_out))
            k, v = (t.unsqueeze(1).expand(B, c, Nkv, H, D).reshape(B * c, Nkv, H, D) for t in (k, v))
            lse = lse.view(B, H, c, L).transpose(1, 2).reshape(B * c, H, L)
        qt, kt, vt, ot, got = (t.transpose(1, 2) for t in (q, k, v, out, grad_out))
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            got, qt, kt, vt, ot, lse, 0.0, False, attn_mask=None, scale=scale)
        dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
        if c > 1:
            dq = dq.reshape(B, Nq, H, D)
            dk, dv = (t.reshape(B, c, Nkv, H, D).sum(1) for t in (dk, dv))
        return dq, dk, dv
    qt, kt, vt, ot, got = (t.transpose(1, 2) for t in (q, k, v, out, grad_out))
    B, Nq, H, _ = q.shape
    Nkv = k.shape[1]
    choice = _sdpa_choice(qt, kt, vt, scale)
    # dropout 0: the RNG state arguments are never read
    seed = torch.zeros(2, dtype=torch.int64, device=q.device)
    offset = torch.zeros(2, dtype=torch.int64, device=q.device)
    if choice == _FLASH:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            got, qt, kt, vt, ot, lse, None, None, Nq, Nkv, 0.0, False, seed, offset, scale=scale)
    elif choice == _EFFICIENT:
        # its kernels read the LSE padded to a multiple of 32 queries
        padded = lse.new_zeros(B, H, -(-Nq // 32) * 32)
        padded[:, :, :Nq] = lse
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            got, qt, kt, vt, None, ot, padded, seed, offset, 0.0, (True, True, True, False),
            False, scale=scale)
    elif choice == _CUDNN:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            got, qt, kt, vt, ot, lse.unsqueeze(-1), seed, offset, None, None, None, Nq, Nkv, 0.0, False,
            scale=scale)
    else:
        return _math_backward(grad_out, q, k, v, out, lse, scale)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# ---------------------------------------------------------------------------------------
# triton backend: our kernels (transkd_fast.kernels.attention), imported on first use so
# that importing this module never needs triton.


@on_input_device
def _triton_forward(q, k, v, scale):
    from transkd_fast.kernels.attention import attention_forward

    return attention_forward(q, k, v, scale)


@on_input_device
def _triton_backward(grad_out, q, k, v, out, lse, scale):
    from transkd_fast.kernels.attention import attention_backward

    return attention_backward(grad_out, q, k, v, out, lse, scale)


# ---------------------------------------------------------------------------------------
# xformers backend: xformers.ops.fmha's non-autograd pair, which exposes the LSE (xformers
# picks its CUDA kernel, e.g. cutlass or flash). Same [B, M, H, K] layout as ours.


def _xformers_forward(q, k, v, scale):
    from xformers.ops import fmha

    out, lse = fmha.memory_efficient_attention_forward_requires_grad(q, k, v, scale=scale)
    # Some kernels pad the LSE's query axis (to a multiple of 32); the backward re-pads.
    return out.contiguous(), lse[:, :, : q.shape[1]].float().contiguous()


def _xformers_backward(grad_out, q, k, v, out, lse, scale):
    from xformers.ops import fmha

    grads = fmha.memory_efficient_attention_backward(grad_out, out, lse, q, k, v, scale=scale)
    # A custom op's outputs may not share memory: copy if xformers packed them in one buffer.
    seen, result = set(), []
    for g in grads:
        ptr = g.untyped_storage().data_ptr()
        result.append(g.clone() if ptr in seen else g)
        seen.add(ptr)
    return tuple(result)


_FORWARD = {"torch": _torch_forward, "triton": _triton_forward, "xformers": _xformers_forward}
_BACKWARD = {"torch": _torch_backward, "triton": _triton_backward, "xformers": _xformers_backward}


def register_backend(name: str, forward, backward) -> None:
    """Plug a backend's (forward, backward) into the custom op (used by #3's triton/xformers)."""
    _FORWARD[name] = forward
    _BACKWARD[name] = backward


# ---------------------------------------------------------------------------------------
# The custom op: one named node for torch.compile, torch.export and fvcore.


@torch.library.custom_op("transkd_fast::efficient_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _FORWARD[backend](q, k, v, scale)
    return out, lse


@_attention_op.register_fake
def _(q, k, v, scale, backend):
    B, Nq, H, D = q.shape
    out = q.new_empty(B, Nq, H, D)
    return out, q.new_empty(B, H, Nq, dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("transkd_fast::efficient_attention_backward", mutates_args=())
def _attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float,
                           backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _BACKWARD[backend](grad_out, q, k, v, out, lse, scale)
    return dq, dk, dv


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, lse, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _torch_check(q, k, v, **_):
    if q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} > 256 is not supported by PyTorch's fused kernels"
    return None


TRITON_HEAD_DIMS = (16, 32, 64, 128)
_HALF_AND_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def _triton_check(q, k, v, **_):
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} is not one of the kernel's {TRITON_HEAD_DIMS}"
    if q.shape[0] * q.shape[2] > 65535:
        return f"batch × heads = {q.shape[0] * q.shape[2]} exceeds the 65535 programs of a grid axis"
    # batch/head offsets are int64 in the kernels; offsets within one (batch, head) are int32
    if max(t.shape[1] * t.stride(1) for t in (q, k, v)) >= 2**31:
        return "one batch entry spans ≥ 2^31 elements (the kernels index within a batch in int32)"
    return None


def _xformers_check(q, k, v, **_):
    if q.shape[-1] > 128:
        return f"head_dim {q.shape[-1]} > 128 is not supported by xformers' kernels"
    return None


register_op(OP, {
    "reference": Support(devices=("cpu", "cuda")),
    "torch": Support(devices=("cpu", "cuda"), check=_torch_check),
    # CPU tensors only under TRITON_INTERPRET=1 (the resolver enforces it).
    "triton": Support(devices=("cpu", "cuda"), dtypes=_HALF_AND_FLOAT, check=_triton_check,
                      note="flash-style kernels; fp32 uses exact fp32 dots unless allow_tf32"),
    "xformers": Support(devices=("cuda",), dtypes=_HALF_AND_FLOAT, check=_xformers_check,
                        note="xformers.ops.fmha forward/backward with LSE"),
})


def efficient_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
    """softmax(scale · q kᵀ) v per head; q ``[B, Nq, H, D]``, k/v ``[B, Nkv, H, D]``.

    Inputs may be strided views (of the ``q`` and ``kv`` Linear outputs). Returns
    ``[B, Nq, H, D]`` in q's dtype. ``backend`` overrides the global choice for this call.
    """
    _check_inputs(q, k, v)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    name = resolve(OP, q, k, v, backend=backend)
    if name == "reference":
        return efficient_attention_reference(q, k, v, scale)
    if _cpu_inference_applies(name, q, k, v):  # CPU inference: no LSE kept
        return _cpu_inference(q, k, v, scale)
    return _attention_op(q, k, v, scale, name)[0]
