"""Multi-stage weighted MSE: TransKD's patch-embedding loss.

Math (design §2, embedding loss), over stage pairs (x_i, y_i) of equal shape (any shapes,
typically the PEA-aligned student embeddings and the teacher's, ``[B, N, C]``)::

    loss = Σ_i w_i · mean((x_i − y_i)²)            w = (0.1, 0.1, 0.5, 1.0) in TransKD
    ∂loss/∂x_i = 2·w_i/numel_i · (x_i − y_i) · g,  ∂loss/∂y_i = −∂loss/∂x_i

Backends:

- ``reference``: the original's eager ops, ``w_i · F.mse_loss(x_i, y_i)`` summed, fp32 math.
- ``torch``: the custom op ``transkd_fast::weighted_mse`` over ATen's fused ``mse_loss`` and
  ``mse_loss_backward`` kernels (fp32 math for half inputs), one autograd node for all stages.
- ``triton``: the same custom op over ``transkd_fast.kernels.weighted_mse``: one forward
  launch per stage into one packed buffer of partial sums (the loss is one ``sum``), one
  backward launch per stage writing ∂/∂x (and ∂/∂y when y requires grad).

Backward saves nothing but the inputs. The loss is an fp32 scalar (fp64 for fp64 inputs).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from transkd_fast.backend import Support, check_tensor, on_input_device, register_op, resolve

OP = "weighted_mse"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def weighted_mse_reference(inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                           weights: Sequence[float]) -> torch.Tensor:
    """Σ_i w_i · F.mse_loss(x_i, y_i) in eager fp32 math (fp64 for fp64 inputs)."""
    total = None
    for x, y, w in zip(inputs, targets, weights):
        acc = _acc_dtype(x.dtype)
        term = w * F.mse_loss(x.to(acc), y.to(acc), reduction="mean")
        total = term if total is None else total + term
    return total


def _check_inputs(inputs, targets, weights) -> list[float]:
    for name, seq in (("inputs", inputs), ("targets", targets), ("weights", weights)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple, got {type(seq).__name__}")
    if not (len(inputs) == len(targets) == len(weights)):
        raise ValueError(f"inputs, targets and weights must have the same length, got "
                         f"{len(inputs)}, {len(targets)} and {len(weights)}")
    if len(inputs) == 0:
        raise ValueError("weighted_mse needs at least one stage")
    for i, (x, y) in enumerate(zip(inputs, targets)):
        check_tensor(f"inputs[{i}]", x)
        check_tensor(f"targets[{i}]", y)
    dtype, device = inputs[0].dtype, inputs[0].device
    for i, (x, y) in enumerate(zip(inputs, targets)):
        if x.shape != y.shape:
            raise ValueError(f"stage {i}: input and target shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.numel() == 0:
            raise ValueError(f"stage {i}: empty tensors of shape {tuple(x.shape)}")
        if x.dtype != dtype or y.dtype != dtype:
            raise TypeError(f"stage {i}: every tensor must share one dtype, got {x.dtype} and {y.dtype} "
                            f"(stage 0 is {dtype})")
        if x.device != device or y.device != device:
            raise ValueError(f"stage {i}: every tensor must be on one device, got {x.device} and {y.device}")
    out = []
    for i, w in enumerate(weights):
        if isinstance(w, torch.Tensor) and w.requires_grad:
            raise TypeError(f"weights[{i}] requires grad; weighted_mse takes constant weights (Python floats)")
        try:
            out.append(float(w))
        except (TypeError, ValueError):
            raise TypeError(f"weights[{i}] must be a number, got {type(w).__name__}") from None
    return out


# ---------------------------------------------------------------------------------------
# torch backend: ATen's fused MSE kernels (one read of x and y per stage and direction).


def _torch_forward(xs, ys, weights):
    acc = _acc_dtype(xs[0].dtype)
    terms = [F.mse_loss(x.to(acc), y.to(acc), reduction="sum") * (w / x.numel()) for x, y, w in zip(xs, ys, weights)]
    return torch.stack(terms).sum()


def _torch_backward(grad, xs, ys, weights, need_y):
    acc = _acc_dtype(xs[0].dtype)
    gx, gy = [], []
    for x, y, w, want in zip(xs, ys, weights, need_y):
        # mse_loss_backward with reduction=mean (1): 2·(x − y)/numel · grad, grad scaled by w.
        g = torch.ops.aten.mse_loss_backward((grad * w).to(acc), x.to(acc), y.to(acc), 1)
        gx.append(g.to(x.dtype))
        if want:
            gy.append((-g).to(y.dtype))
    return gx + gy


# ---------------------------------------------------------------------------------------
# triton backend.


@on_input_device
def _triton_forward(xs, ys, weights):
    from transkd_fast.kernels.weighted_mse import wmse_num_programs, wmse_stage_forward

    counts = [wmse_num_programs(x, y) for x, y in zip(xs, ys)]
    share = xs[0].new_empty(sum(counts), dtype=_acc_dtype(xs[0].dtype))
    off = 0
    for x, y, w, n in zip(xs, ys, weights, counts):
        wmse_stage_forward(x, y, w, share[off:off + n])
        off += n
    return share.sum()


@on_input_device
def _triton_backward(grad, xs, ys, weights, need_y):
    from transkd_fast.kernels.weighted_mse import wmse_stage_backward

    grad = grad.to(_acc_dtype(xs[0].dtype))
    gx, gy = [], []
    for x, y, w, want in zip(xs, ys, weights, need_y):
        g_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        g_y = torch.empty(y.shape, dtype=y.dtype, device=y.device) if want else None
        wmse_stage_backward(grad, x, y, w, g_x, g_y)
        gx.append(g_x)
        if want:
            gy.append(g_y)
    return gx + gy


_FORWARD = {"torch": _torch_forward, "triton": _triton_forward}
_BACKWARD = {"torch": _torch_backward, "triton": _triton_backward}


# ---------------------------------------------------------------------------------------
# The custom op.


@torch.library.custom_op("transkd_fast::weighted_mse", mutates_args=())
def _wmse_op(inputs: list[torch.Tensor], targets: list[torch.Tensor], weights: list[float],
             backend: str) -> torch.Tensor:
    return _FORWARD[backend](inputs, targets, weights)


@_wmse_op.register_fake
def _(inputs, targets, weights, backend):
    return inputs[0].new_empty((), dtype=_acc_dtype(inputs[0].dtype))


@torch.library.custom_op("transkd_fast::weighted_mse_backward", mutates_args=())
def _wmse_backward_op(grad: torch.Tensor, inputs: list[torch.Tensor], targets: list[torch.Tensor],
                      weights: list[float], need_y: list[bool], backend: str) -> list[torch.Tensor]:
    return _BACKWARD[backend](grad, inputs, targets, weights, need_y)


@_wmse_backward_op.register_fake
def _(grad, inputs, targets, weights, need_y, backend):
    return ([torch.empty_like(x, memory_format=torch.contiguous_format) for x in inputs]
            + [torch.empty_like(y, memory_format=torch.contiguous_format)
               for y, want in zip(targets, need_y) if want])


def _setup_context(ctx, inputs, output):
    xs, ys, weights, backend = inputs
    ctx.n = len(xs)
    ctx.need_y = [bool(y.requires_grad) for y in ys]
    ctx.weights, ctx.backend = list(weights), backend
    ctx.save_for_backward(*xs, *ys)


def _backward(ctx, grad_loss):
    saved = ctx.saved_tensors
    n = ctx.n
    grads = _wmse_backward_op(grad_loss, list(saved[:n]), list(saved[n:]), ctx.weights, ctx.need_y, ctx.backend)
    it = iter(grads[n:])
    return list(grads[:n]), [next(it) if want else None for want in ctx.need_y], None, None


_wmse_op.register_autograd(_backward, setup_context=_setup_context)


register_op(OP, {
    "reference": Support(devices=("cpu", "cuda")),
    "torch": Support(devices=("cpu", "cuda")),
    "triton": Support(devices=("cpu", "cuda"), note="CPU tensors only under TRITON_INTERPRET=1"),
})


def weighted_mse(inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], weights: Sequence[float],
                 backend: Optional[str] = None) -> torch.Tensor:
    """Σ_i w_i · mean((x_i − y_i)²) over stages of any shapes; fp32 scalar (fp64 for fp64).

    Pairs must match in shape; one dtype and device throughout; strided views are read in
    place. Gradients flow to ``inputs`` and to the targets that require grad. ``weights`` are
    constants (Python floats). ``backend`` overrides the global choice for this call.
    """
    w = _check_inputs(inputs, targets, weights)
    name = resolve(OP, inputs[0], backend=backend)
    if name == "reference":
        return weighted_mse_reference(inputs, targets, w)
    return _wmse_op(list(inputs), list(targets), w, name)
