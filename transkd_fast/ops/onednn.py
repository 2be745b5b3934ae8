"""oneDNN fast paths for the MiT blocks and the SegFormer head on CPU.

Same math as the plain modules, fewer passes over memory and faster GEMMs:

- :func:`linear` — ``x @ Wᵀ + b (+ residual)``, shapes ``x [..., K]``, ``W [N, K]``, ``b [N]``,
  ``residual [..., N]``. On the fast path one oneDNN matmul (``mkldnn::_linear_pointwise``)
  with the bias and the residual add fused in; otherwise ``F.linear`` then ``add``.
- :func:`dwconv_gelu` — ``GELU(conv2d(x, w, b, padding=1, groups=C))`` for a 3×3 depthwise conv
  on ``x [B, C, H, W]``; on the fast path one oneDNN convolution with GELU (erf) as a post-op.

Why: ATen's fp32 ``addmm`` on CPU first copies the broadcast bias into the output and then
runs an MKL GEMM over it (one extra write and read of the output), and on this project's
machines (AMD EPYC, AVX-512, 2 cores) it ran the MiT-B2 Linear shapes at 67–165 GFLOP/s where
oneDNN ran them at 130–190 (the thin stage-1 shapes, K or N = 64, at about half oneDNN's rate).

Precision: the fast path computes in fp32 or bf16 (:func:`compute_dtype`). fp32 tensors run fp32;
bf16 tensors (a model cast by :func:`transkd_fast.precision.prepare_for_inference`) run oneDNN's
bf16 primitives (AVX512-BF16 / AMX where the CPU has them: bf16 products, fp32 accumulation, one
rounding of the output to bf16). Under CPU autocast with dtype bf16 the inputs, weights and bias
are cast to bf16 first, exactly what autocast does for ``F.linear`` / ``F.conv2d`` (both on its
lower-precision list), so the output is bf16 as autocast's would be; a residual is added into that
bf16 output, as the plain path's in-place ``add_`` does. Autocast with another dtype (fp16 on
CPU), fp16/fp64 tensors, or a bf16 tensor on a CPU without oneDNN bf16 support take the plain ATen
ops, which then pick the dtypes themselves: never an fp32 matmul in place of the bf16 one asked for.

The fast path is taken only for fp32 or bf16 CPU tensors (weights of the tensor's dtype outside
autocast), outside tracing, scripting and ``torch.compile``, and never under the ``reference``
backend (the original-style baseline). With autograd on, :func:`linear` still runs its forward
matmul in oneDNN (:class:`_Linear`; the backward is ATen's, as for ``F.linear``, in the forward's
dtype). Results equal the plain path up to float rounding (different summation order), the same
latitude as any GEMM library change.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from transkd_fast.backend import get_backend, is_recording_launches


def _have_ops() -> bool:
    try:
        return (torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))
    except (AttributeError, RuntimeError):
        return False


AVAILABLE = _have_ops()


def _have_bf16() -> bool:
    try:
        return AVAILABLE and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# oneDNN runs bf16 primitives on this CPU (AVX512-BW or newer; AVX512-BF16 / AMX make them fast).
BF16_AVAILABLE = _have_bf16()


def compute_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype the oneDNN path computes ``x``'s op in, or None when it steps aside.

    fp32 for an fp32 tensor, bf16 for a bf16 one, bf16 under CPU autocast(bf16) for either;
    None on other devices and dtypes, under autocast with another dtype, while tracing,
    scripting or compiling, for fake/functional tensors and under the ``reference`` backend.
    """
    if not (AVAILABLE and x.device.type == "cpu"):
        return None
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return None
    if type(x) is not torch.Tensor and type(x) is not torch.nn.Parameter:  # fake / functional tensors
        return None
    if get_backend() == "reference" or is_recording_launches():  # recording models a GPU: no oneDNN there
        return None
    if torch.is_autocast_enabled("cpu"):
        # autocast casts F.linear / F.conv2d operands to its dtype: do the same, in oneDNN's bf16
        # primitives; any other autocast dtype keeps ATen's ops (autocast then picks their dtypes)
        ok = torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
        return torch.bfloat16 if ok and BF16_AVAILABLE else None
    if x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and BF16_AVAILABLE):
        return x.dtype
    return None


def _eligible(x: torch.Tensor, *params: Optional[torch.Tensor]) -> Optional[torch.dtype]:
    """:func:`compute_dtype`, and outside autocast weights/bias of that dtype too (else None:
    ``F.linear``'s own dtype error)."""
    dt = compute_dtype(x)
    if dt is None or torch.is_autocast_enabled("cpu"):
        return dt
    return dt if all(p is None or p.dtype == dt for p in params) else None


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def fast_path(x: torch.Tensor) -> bool:
    """Whether the oneDNN inference path (autograd off) applies to ``x`` in the current state."""
    return not torch.is_grad_enabled() and compute_dtype(x) is not None


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One oneDNN matmul over the rows of ``x`` (bias and residual add fused in); ``[..., N]``.

    Call without autograd recording (the fast path, or inside a custom Function's forward).
    """
    x2 = x.reshape(-1, x.shape[-1])
    if residual is None:
        out = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")
    else:
        out = torch.ops.mkldnn._linear_pointwise.binary(x2, residual.reshape(-1, residual.shape[-1]),
                                                        weight, bias, "add")
    # A base tensor rather than a view of the 2-D result (no autograd here, so detach only drops
    # the view link): custom Functions may return it and callers may add into it in place.
    return out.view(*x.shape[:-1], weight.shape[0]).detach()


class _Linear(torch.autograd.Function):
    """``x Wᵀ + b`` with the oneDNN matmul forward and ATen's backward (what autograd runs for
    ``F.linear``: ∂x = g W, ∂W = gᵀ x, ∂b = Σ g). Saves ``x`` and ``W`` as ``F.linear`` does."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = g2.mm(weight).view(x.shape) if need_x else None
        gw = g2.t().mm(x.reshape(-1, x.shape[-1])) if need_w else None
        gb = g2.sum(0) if (need_b and ctx.has_bias) else None
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias) + residual`` (residual optional); output ``[..., N]`` contiguous,
    in :func:`compute_dtype` (fp32, or bf16 for bf16 tensors and under autocast(bf16)).

    With autograd recording (training), eligible inputs go through :class:`_Linear` (oneDNN
    forward, ATen backward) and the residual, if any, is added out of place. Under autocast the
    casts to bf16 happen before :class:`_Linear`, so autograd records them (gradients of fp32
    weights come back in fp32, as through autocast's own casts).
    """
    dt = _eligible(x, weight, bias)
    if dt is not None and torch.is_grad_enabled() and x.is_contiguous():
        out = _Linear.apply(_cast(x, dt), _cast(weight, dt), _cast(bias, dt))
        return out if residual is None else out + residual
    if dt is not None and not torch.is_grad_enabled() and x.is_contiguous() and (
            residual is None or residual.is_contiguous()):
        return _onednn_linear(_cast(x, dt), _cast(weight, dt), _cast(bias, dt), _cast(residual, dt))
    out = F.linear(x, weight, bias)
    return out if residual is None else out.add_(residual)


def dwconv_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """GELU (exact, erf) of the 3×3 depthwise conv (stride 1, padding 1) of ``x`` ``[B, C, H, W]``."""
    C = x.shape[1]
    dt = _eligible(x, weight, bias)
    if dt is not None and not torch.is_grad_enabled() and x.is_contiguous(memory_format=torch.channels_last):
        # .to keeps the channels_last strides; under autocast(bf16) these are F.conv2d's own casts
        return torch.ops.mkldnn._convolution_pointwise(_cast(x, dt), _cast(weight, dt), _cast(bias, dt),
                                                       [1, 1], [1, 1], [1, 1], C, "gelu", [], "none")
    return F.gelu(F.conv2d(x, weight, bias, 1, 1, 1, C))


# Scores held at once per thread: 2^18 fp32 values (1 MiB, the L2 share of a core on this
# project's machines), so a block of S = q kᵀ is written, softmaxed and read back in cache; but
# never fewer than 256 query rows: below that the three calls per block cost more than the cache
# saves (2048 keys, one thread: 128-row blocks 7% slower than 256-row ones).
_ATTN_BLOCK_ELEMS = 1 << 18
_ATTN_MIN_ROWS = 256


# With several threads, at most this many blocks per call of :func:`attention`. Each block is
# three parallel calls, and each parallel call ends in a barrier (OpenMP / oneDNN split the work
# statically): on a shared machine every barrier can wait for a thread the kernel has
# descheduled. With 2 threads on a loaded 2-core machine, MiT-B0 at 1024×2048 (~6000 blocked
# calls) ran 4–6× slower than with the one-call flash kernel, while at 512×1024 (≤ 64 blocks per
# call) the blocked path stayed ahead. One thread has no barriers: no limit.
ATTN_MAX_BLOCKS = 64


def attention_rows(n_kv: int, threads: Optional[int] = None) -> int:
    """Query rows per block of :func:`attention`: ~``_ATTN_BLOCK_ELEMS`` scores per thread, at
    least ``_ATTN_MIN_ROWS``, a multiple of 16."""
    threads = torch.get_num_threads() if threads is None else threads
    return max(_ATTN_MIN_ROWS, (_ATTN_BLOCK_ELEMS * threads // max(n_kv, 1)) // 16 * 16)


def attention_applies(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether MiT's attention takes :func:`attention`: the inference fast path for ``q``
    (:func:`fast_path`) in fp32 and, with more than one thread, at most :data:`ATTN_MAX_BLOCKS`
    blocks (else PyTorch's flash kernel, one call). bf16 (cast weights or autocast) goes to
    ``efficient_attention``, whose CPU bf16 path keeps the softmax statistics in fp32 and which
    autocast sees."""
    if not fast_path(q) or compute_dtype(q) != torch.float32:
        return False
    threads = torch.get_num_threads()
    if threads == 1:
        return True
    B, N, H, _ = q.shape
    rows = attention_rows(k.shape[1], threads)
    return B * H * -(-N // rows) <= ATTN_MAX_BLOCKS


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              rows: Optional[int] = None) -> torch.Tensor:
    """``softmax(scale · q kᵀ) v`` per batch and head, in blocks of query rows: ``[B, Nq, H, D]``.

    q ``[B, Nq, H, D]``, k and v ``[B, Nkv, H, D]`` (the xformers layout, strided views of the
    Linear outputs). Per (batch, head): kₛ = scale · k (``[Nkv, D]``), vᵀ (``[D, Nkv]``); per
    block of ``rows`` queries, S = q kₛᵀ and O = softmax(S) v are two oneDNN matmuls with the
    row softmax in place between them, the block of S staying in cache (:func:`attention_rows`).
    The inference path (``fast_path(q)``): no LSE is kept. Same values as the reference up to
    rounding (the scale is applied to k instead of S).

    Why: the SegFormer shapes have long query sequences against short key sequences (MiT-B0
    stage 1 at 512×1024: 32768 queries, 512 keys, one head of 32) where PyTorch's CPU flash
    kernel without AMX ran at ~50 GFLOP/s and this at ~1.5–2.5× that on this project's CPUs.
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
