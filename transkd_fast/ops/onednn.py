"""oneDNN fast paths for the MiT blocks and the SegFormer head on CPU.

Same math as the plain modules, fewer passes over memory and faster GEMMs:

- :func:`linear` — ``x @ Wᵀ + b (+ residual)``, shapes ``x [..., K]``, ``W [N, K]``, ``b [N]``,
  ``residual [..., N]``. On the fast path one oneDNN matmul (``mkldnn::_linear_pointwise``)
  with the bias and the residual add fused in; otherwise ``F.linear`` then ``add``.
- :func:`dwconv_gelu` — ``GELU(conv2d(x, w, b, padding=1, groups=C))`` for a 3×3 depthwise conv
  on ``x [B, C, H, W]``; on the fast path one oneDNN convolution with GELU (erf) as a post-op.

Attention is not here: its CPU inference path (fp32 blocked oneDNN matmuls, bf16 chunked ATen
matmuls, each only on the CPUs where it beats SDPA's flash kernel) lives inside the op,
:func:`transkd_fast.ops.attention.efficient_attention` (torch backend), which calls
``mkldnn::_linear_pointwise`` itself and uses :func:`compute_dtype` and :data:`AVAILABLE` from
here to decide; models call only that op.

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
