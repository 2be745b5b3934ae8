"""KL-divergence distillation loss: per-pixel KD (``spatial``) and channel-wise CWD (``channel``).

Student logits s and teacher logits t, both NCHW ``[N, C, H, W]``, temperature T::

    spatial:  p = softmax(x/T, dim=C) per pixel,      loss = Σ p_t (log p_t − log p_s) / (N·H·W) · T²
    channel:  p = softmax(x/T over H·W) per (n, c),   loss = Σ p_t (log p_t − log p_s) / (N·C) · T²

Log-probabilities come from log-softmax (the original TransKD code takes the log of a
softmax, which underflows to -inf). The loss is a 0-dim fp32 tensor (fp64 for fp64
inputs). The teacher is always detached: it never receives a gradient, even when it
requires grad. The gradient for the student is (p_s − p_t) · T / R, R = N·H·W or N·C.

Backends:

- ``reference``: eager PyTorch (log_softmax, exp, sum) in fp32 math, straight from the
  formula; autograd saves its full-size intermediates.
- ``torch``: one custom op ``transkd_fast::kd_kl_div`` over fused ATen log_softmax.
- ``triton``: the same custom op over ``transkd_fast.kernels.kl_div``: strided inputs, no
  copies; the tiles follow the layout (NCHW or channels_last: the contiguous axis is the
  vectorized one), d and the gradient come back in the student's layout. Forward reads each
  input once in ``spatial`` mode (C <= 256) and twice in ``channel`` mode (statistics, then
  d, which needs each row's final log-sum-exp).

Memory: the custom op computes d = p_s − p_t in forward, in the student's dtype and
layout, and saves only d for backward (as Liger-Kernel does for its losses): the saved
bytes are the student's bytes, fewer than the inputs', and the teacher logits can be
freed right after the forward. Backward (``transkd_fast::kd_kl_div_backward``) is one
pass: grad_student = d · grad_loss · T / R. When the student needs no gradient, d is
not computed at all.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from transkd_fast.backend import Support, check_tensor, on_input_device, register_op, resolve

OP = "kd_kl_div"
MODES = ("spatial", "channel")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _norm(shape: torch.Size, mode: str) -> int:
    N, C, H, W = shape
    return N * H * W if mode == "spatial" else N * C


def kd_kl_div_reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                        mode: str = "spatial") -> torch.Tensor:
    """Eager reference straight from the formula, fp32 math (fp64 for fp64 inputs)."""
    _check_inputs(student, teacher, temperature, mode)
    acc = _acc_dtype(student.dtype)
    s = student.to(acc) / temperature
    t = teacher.detach().to(acc) / temperature
    if mode == "channel":
        s, t = s.flatten(2), t.flatten(2)
        dim = 2
    else:
        dim = 1
    log_ps = torch.log_softmax(s, dim=dim)
    log_pt = torch.log_softmax(t, dim=dim)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum()
    return kl * (temperature * temperature / _norm(student.shape, mode))


def _check_inputs(student: torch.Tensor, teacher: torch.Tensor, temperature: float, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"kd_kl_div: unknown mode {mode!r}; expected one of {', '.join(map(repr, MODES))}")
    check_tensor("student", student, ndim=4)
    check_tensor("teacher", teacher, ndim=4)
    if student.shape != teacher.shape:
        raise ValueError(f"kd_kl_div: student and teacher must have the same shape [N, C, H, W], got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.dtype != teacher.dtype:
        raise TypeError(f"kd_kl_div: student and teacher must share a dtype, got {student.dtype} and {teacher.dtype}")
    if student.device != teacher.device:
        raise ValueError(f"kd_kl_div: student and teacher must be on one device, got {student.device} "
                         f"and {teacher.device}")
    if student.numel() == 0:
        raise ValueError(f"kd_kl_div: empty input of shape {tuple(student.shape)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"kd_kl_div: temperature must be a finite number > 0, got {temperature!r}")


# ---------------------------------------------------------------------------------------
# Backends of the custom op: forward returns (unnormalized KL sum, d = p_s − p_t or an
# empty tensor when no gradient is needed); backward scales d.


def _torch_forward(s, t, temperature, mode, need_grad):
    acc = _acc_dtype(s.dtype)
    dim = 1 if mode == "spatial" else 2
    if mode == "channel":
        s, t = s.flatten(2), t.flatten(2)
    log_ps = torch.log_softmax(s.to(acc) / temperature, dim=dim)
    log_pt = torch.log_softmax(t.to(acc) / temperature, dim=dim)
    p_t = log_pt.exp()
    kl = torch.sum(p_t * (log_pt - log_ps))
    if not need_grad:
        return kl, None
    return kl, log_ps.exp_().sub_(p_t)


@on_input_device
def _triton_forward(s, t, temperature, mode, need_grad):
    from transkd_fast.kernels import kl_div as K

    d = torch.empty_like(s) if need_grad else None
    part = (K.kl_spatial if mode == "spatial" else K.kl_channel)(s, t, d, temperature)
    return part.sum(), d


def _torch_backward(d, grad_loss, scale):
    k = grad_loss.to(_acc_dtype(d.dtype)) * scale
    return (d.to(k.dtype) * k).to(d.dtype)


@on_input_device
def _triton_backward(d, grad_loss, scale):
    from transkd_fast.kernels import kl_div as K

    return K.kl_scale(d, grad_loss, scale)


_FORWARD = {"torch": _torch_forward, "triton": _triton_forward}
_BACKWARD = {"torch": _torch_backward, "triton": _triton_backward}


def _d_like(student: torch.Tensor) -> torch.Tensor:
    # empty_like keeps a dense student's layout (channels_last stays channels_last).
    return torch.empty_like(student)


@torch.library.custom_op("transkd_fast::kd_kl_div", mutates_args=())
def _kl_op(student: torch.Tensor, teacher: torch.Tensor, temperature: float, mode: str, need_grad: bool,
           backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    kl, d = _FORWARD[backend](student, teacher, temperature, mode, need_grad)
    loss = kl * (temperature * temperature / _norm(student.shape, mode))
    if d is None:
        return loss, student.new_empty(0)
    d = d.view(student.shape)  # the torch backend flattens H·W in channel mode
    layout = _d_like(torch.empty_strided(student.shape, student.stride(), device="meta")).stride()
    if d.dtype != student.dtype or d.stride() != layout:
        # The torch backend computes in fp32 and in its own layout; d must match the fake.
        d = _d_like(student).copy_(d)
    return loss, d


@_kl_op.register_fake
def _(student, teacher, temperature, mode, need_grad, backend):
    loss = student.new_empty((), dtype=_acc_dtype(student.dtype))
    return loss, (_d_like(student) if need_grad else student.new_empty(0))


@torch.library.custom_op("transkd_fast::kd_kl_div_backward", mutates_args=())
def _kl_backward_op(d: torch.Tensor, grad_loss: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    return _BACKWARD[backend](d, grad_loss, scale)


@_kl_backward_op.register_fake
def _(d, grad_loss, scale, backend):
    return torch.empty_like(d)


def _setup_context(ctx, inputs, output):
    student, _, temperature, mode, need_grad, backend = inputs
    _, d = output
    ctx.mark_non_differentiable(d)
    ctx.set_materialize_grads(False)
    ctx.need_grad = need_grad
    ctx.scale = temperature / _norm(student.shape, mode)
    ctx.backend = backend
    ctx.save_for_backward(d)


def _backward(ctx, grad_loss, _grad_d):
    if grad_loss is None or not ctx.need_grad or not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    (d,) = ctx.saved_tensors
    return _kl_backward_op(d, grad_loss, ctx.scale, ctx.backend), None, None, None, None, None


_kl_op.register_autograd(_backward, setup_context=_setup_context)

_ALL = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
register_op(OP, {
    "reference": Support(devices=("cpu", "cuda")),
    "torch": Support(devices=("cpu", "cuda")),
    "triton": Support(devices=("cpu", "cuda"), dtypes=_ALL,
                      note="CPU tensors only under TRITON_INTERPRET=1"),
})


def kd_kl_div(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, mode: str = "spatial",
              backend: Optional[str] = None) -> torch.Tensor:
    """KL distillation loss T²·KL(p_t ‖ p_s) / R, p = softmax(x/T) over classes (``spatial``)
    or over H·W (``channel``, CWD); see the module docstring.

    ``student``, ``teacher``: ``[N, C, H, W]``, same shape, dtype and device; any strides.
    The teacher never receives a gradient (it is detached here even if it requires grad).
    Returns a 0-dim fp32 tensor (fp64 for fp64 inputs). ``backend`` overrides the global choice.
    """
    _check_inputs(student, teacher, temperature, mode)
    temperature = float(temperature)
    teacher = teacher.detach()
    name = resolve(OP, student, teacher, backend=backend)
    if name == "reference":
        return kd_kl_div_reference(student, teacher, temperature, mode)
    need_grad = torch.is_grad_enabled() and student.requires_grad
    return _kl_op(student, teacher, temperature, mode, need_grad, name)[0]
