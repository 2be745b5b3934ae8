"""oneDNN fast paths for the MiT blocks on CPU, without autograd (the frozen teacher, inference).

Same math as the plain modules, fewer passes over memory and faster GEMMs:

- :func:`linear` — ``x @ Wᵀ + b (+ residual)``, shapes ``x [..., K]``, ``W [N, K]``, ``b [N]``,
  ``residual [..., N]``. On the fast path one oneDNN matmul (``mkldnn::_linear_pointwise``)
  with the bias and the residual add fused in; otherwise ``F.linear`` then ``add``.
- :func:`dwconv_gelu` — ``GELU(conv2d(x, w, b, padding=1, groups=C))`` for a 3×3 depthwise conv
  on ``x [B, C, H, W]``; on the fast path one oneDNN convolution with GELU (erf) as a post-op.

Why: ATen's fp32 ``addmm`` on CPU first copies the broadcast bias into the output and then
runs an MKL GEMM over it (one extra write and read of the output), and MKL's kernels for the
thin MiT shapes (K or N = 32…64, M = B·H·W in the thousands) reach about half the rate of
oneDNN's on this project's machines (AMD EPYC, AVX-512); see ``benchmarks/results/cpu.md``.

The fast path is taken only for fp32 CPU tensors with autograd off, outside tracing,
scripting and ``torch.compile``, and never under the ``reference`` backend (the
original-style baseline). Results equal the plain path up to float rounding (different
summation order), the same latitude as any GEMM library change.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from transkd_fast.backend import get_backend


def _have_ops() -> bool:
    try:
        return (torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))
    except (AttributeError, RuntimeError):
        return False


AVAILABLE = _have_ops()


def fast_path(x: torch.Tensor) -> bool:
    """Whether the oneDNN inference path applies to ``x`` in the current state."""
    if not (AVAILABLE and x.device.type == "cpu" and x.dtype == torch.float32):
        return False
    if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor:  # fake / functional tensors
        return False
    return get_backend() != "reference"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias) + residual`` (residual optional); output ``[..., N]`` contiguous."""
    if fast_path(x) and x.is_contiguous() and (residual is None or residual.is_contiguous()):
        x2 = x.reshape(-1, x.shape[-1])
        if residual is None:
            out = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")
        else:
            out = torch.ops.mkldnn._linear_pointwise.binary(x2, residual.reshape(-1, residual.shape[-1]),
                                                            weight, bias, "add")
        # A base tensor rather than a view of the 2-D result (no autograd here, so detach only
        # drops the view link): custom Functions may return it and callers may add into it.
        return out.view(*x.shape[:-1], weight.shape[0]).detach()
    out = F.linear(x, weight, bias)
    return out if residual is None else out.add_(residual)


def dwconv_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """GELU (exact, erf) of the 3×3 depthwise conv (stride 1, padding 1) of ``x`` ``[B, C, H, W]``."""
    C = x.shape[1]
    if fast_path(x) and x.is_contiguous(memory_format=torch.channels_last):
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, [1, 1], [1, 1], [1, 1], C, "gelu", [], "none")
    return F.gelu(F.conv2d(x, weight, bias, 1, 1, 1, C))
