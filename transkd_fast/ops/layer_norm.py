"""LayerNorm over the last dimension on CPU, for inference: the MiT blocks' norms.

Math, ``x [..., C]``, ``weight``/``bias`` ``[C]`` (or None: 1 and 0)::

    y = (x − μ) / √(σ² + eps) · weight + bias,   μ, σ² the mean and biased variance of each row

- :func:`layer_norm_reference`: ``F.layer_norm`` (ATen's kernel: fp32 statistics for bf16 input).
- :func:`layer_norm`: the C kernel ``transkd_fast.kernels.layer_norm`` — one row in registers,
  mean and variance in two passes in fp32, the result rounded once to x's dtype.

Shapes and dtypes: CPU tensors, x fp32 or bf16 (the output's dtype, as ``F.layer_norm`` gives
for either weight dtype, and under CPU autocast too: layer_norm is on none of its cast lists),
weight and bias fp32 or x's dtype, ``[C]``. Inference only (a tensor that requires grad with grad
mode on is refused). Non-contiguous x is copied.

:func:`fast_path` says when the model's :class:`transkd_fast.models.mit.LayerNorm` takes the
kernel: the oneDNN inference conditions (:func:`transkd_fast.ops.onednn.fast_path`: autograd
off, plain CPU tensors, not tracing / compiling / exporting, not the ``reference`` backend), x fp32
or bf16, and the kernel on and built (:mod:`transkd_fast.ops._cpu`: ``TRANSKD_FAST_CPU_KERNELS=0``
turns it off; without a C compiler it warns once and ATen's LayerNorm runs). Results equal
``F.layer_norm``'s up to fp32 rounding (bf16: within one bf16 rounding).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from transkd_fast.backend import check_tensor
from transkd_fast.kernels import _cpu_build
from transkd_fast.kernels import layer_norm as _kernel
from transkd_fast.ops import _cpu, onednn

DTYPES = (torch.float32, torch.bfloat16)


def layer_norm_reference(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def kernel_available() -> bool:
    """The C kernel is on and builds here (built or loaded on the first call; :mod:`._cpu`)."""
    return _cpu.available("layer_norm", _kernel, "MiT's LayerNorms run ATen's kernel")


def fast_path(x: torch.Tensor) -> bool:
    """Whether the model's LayerNorm runs :func:`layer_norm` for ``x`` in the current state."""
    return (x.dtype in DTYPES and x.dim() >= 1 and onednn.fast_path(x) and kernel_available())


def _param(name: str, p: Optional[torch.Tensor], C: int, fill: float, x: torch.Tensor) -> torch.Tensor:
    if p is None:
        return torch.full((C,), fill)
    check_tensor(name, p, ndim=1)
    if p.shape[0] != C:
        raise ValueError(f"{name} has {p.shape[0]} values; x's last dimension is {C}")
    if p.dtype not in (torch.float32, x.dtype) or p.device != x.device:
        raise TypeError(f"{name} must be float32 or x's dtype ({x.dtype}) on {x.device}, got {p.dtype} on {p.device}")
    return p.detach().float().contiguous()


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LayerNorm of ``x`` over its last dimension by the C kernel (module doc); returns ``out``
    (a new tensor when None), x's shape and dtype."""
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    if x.device.type != "cpu":
        raise ValueError(f"layer_norm runs on CPU tensors, got x on {x.device}")
    if x.dtype not in DTYPES:
        raise TypeError(f"layer_norm supports float32 and bfloat16, got {x.dtype}")
    if not (eps >= 0):
        raise ValueError(f"eps must be ≥ 0, got {eps}")
    C = x.shape[-1]
    w, b = _param("weight", weight, C, 1.0, x), _param("bias", bias, C, 0.0, x)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        raise RuntimeError("layer_norm is an inference op (no backward): call it under torch.no_grad() / "
                           "torch.inference_mode(), or with tensors that do not require grad")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {tuple(x.shape)}")
    if not kernel_available():
        raise _cpu_build.CpuKernelUnavailable("layer_norm: " + _cpu.why_unavailable("layer_norm"))
    xc = x.contiguous()
    if out is None:
        out = torch.empty_like(xc)
    _kernel.launch(xc, w, b, out, float(eps), torch.get_num_threads())
    return out
