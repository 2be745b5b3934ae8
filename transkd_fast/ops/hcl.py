"""Hierarchical context loss (HCL) of TransKD over lists of stage feature maps.

Math (design §2, as the original ``hcl`` of TransKD's ``CSF.py``), per stage pair (fs, ft) of
equal shape ``[N, C, H, W]`` (stages may differ in shape)::

    loss_s = mse(fs, ft); cnt = 1; tot = 1
    for l in (4, 2, 1):
        if l >= H: continue                      # compares H only, as the original does
        cnt /= 2
        loss_s += mse(adaptive_avg_pool(fs, l), adaptive_avg_pool(ft, l)) · cnt
        tot += cnt
    loss = Σ_s loss_s / tot                      # tot (and cnt) restart at every stage

mse is the mean over all elements; adaptive pooling bins are start = ⌊i·H/l⌋,
end = ⌈(i+1)·H/l⌉ (they overlap when H or W is not divisible by l).

Backends:

- ``reference``: the original's eager ops (one ``mse_loss`` and two ``adaptive_avg_pool2d``
  per level per stage) in fp32 math; plain ATen ops, autograd by PyTorch.
- ``torch``: the custom op ``transkd_fast::hcl_loss`` over fast eager ops. Maps divisible by 4
  (every TransKD stage) take one ``mse_loss`` and one 4×4 pooling per map (the coarser levels
  are exact means of the 4×4 grid) and a backward of two fused multiply-adds; other maps pool
  d = fs − ft per level and spread with ``_adaptive_avg_pool2d_backward``.
- ``triton``: the same custom op over ``transkd_fast.kernels.hcl``: per stage one forward
  launch reading fs and ft once (Σd² and every bin sum), one reduction over all stages, and
  one backward launch per stage writing ∂/∂fs (and ∂/∂ft = −∂/∂fs when ft requires grad).
  The kernels read along the contiguous axis of fs's layout (W for NCHW, C for channels_last)
  and write each gradient in its input's layout (``empty_like``), with no copies.

Both custom-op backends return ``(loss, pooled)``: ``pooled`` holds the 21 pooled means of d
per (stage, n, c) plane (16 for l = 4, 4 for l = 2, 1 for l = 1), all that backward needs
beside the inputs. The loss is an fp32 scalar (fp64 for fp64 inputs).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from transkd_fast.backend import Support, check_tensor, on_input_device, register_op, resolve

OP = "hcl_loss"
LEVELS = (4, 2, 1)
SLOTS = 21
_SLOT_OF_LEVEL = {4: 0, 2: 16, 1: 20}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def hcl_loss_reference(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """The original's eager HCL in fp32 math (fp64 for fp64 inputs); fp32 scalar."""
    total = None
    for fs, ft in zip(student_feats, teacher_feats):
        fs, ft = fs.to(_acc_dtype(fs.dtype)), ft.to(_acc_dtype(ft.dtype))
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt, tot = 1.0, 1.0
        for lv in LEVELS:
            if lv >= h:
                continue
            cnt /= 2.0
            loss = loss + F.mse_loss(F.adaptive_avg_pool2d(fs, (lv, lv)), F.adaptive_avg_pool2d(ft, (lv, lv))) * cnt
            tot += cnt
        loss = loss / tot
        total = loss if total is None else total + loss
    return total


def _stage_coefs(shape) -> tuple[float, dict[int, float]]:
    """c0 = 1/(tot·NCHW) and c_l = cnt_l/(tot·NC·l²) for the active levels of one stage."""
    N, C, H, W = shape
    cnt, tot, cnts = 1.0, 1.0, {}
    for lv in LEVELS:
        if lv >= H:
            continue
        cnt /= 2.0
        cnts[lv] = cnt
        tot += cnt
    return 1.0 / (tot * N * C * H * W), {lv: c / (tot * N * C * lv * lv) for lv, c in cnts.items()}


def _check_inputs(student_feats, teacher_feats) -> None:
    for name, feats in (("student_feats", student_feats), ("teacher_feats", teacher_feats)):
        if not isinstance(feats, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of [N, C, H, W] tensors, got {type(feats).__name__}")
    if len(student_feats) != len(teacher_feats):
        raise ValueError(f"student_feats and teacher_feats must have the same number of stages, got "
                         f"{len(student_feats)} and {len(teacher_feats)}")
    if len(student_feats) == 0:
        raise ValueError("hcl_loss needs at least one stage")
    for i, (fs, ft) in enumerate(zip(student_feats, teacher_feats)):
        check_tensor(f"student_feats[{i}]", fs, ndim=4)
        check_tensor(f"teacher_feats[{i}]", ft, ndim=4)
    dtype, device = student_feats[0].dtype, student_feats[0].device
    for i, (fs, ft) in enumerate(zip(student_feats, teacher_feats)):
        if fs.shape != ft.shape:
            raise ValueError(f"stage {i}: student and teacher shapes differ: {tuple(fs.shape)} vs {tuple(ft.shape)} "
                             f"(HCL compares maps of equal shape; align channels first, e.g. with CSF)")
        if fs.numel() == 0:
            raise ValueError(f"stage {i}: empty feature map of shape {tuple(fs.shape)}")
        if fs.dtype != dtype or ft.dtype != dtype:
            raise TypeError(f"stage {i}: every feature map must share one dtype, got {fs.dtype} and {ft.dtype} "
                            f"(stage 0 is {dtype})")
        if fs.device != device or ft.device != device:
            raise ValueError(f"stage {i}: every feature map must be on one device, got {fs.device} and {ft.device}")


# ---------------------------------------------------------------------------------------
# torch backend: fast eager. Pooling is linear, so the pooled terms come from pool(d).
#
# Grid path (H, W divisible by 4, H > 4, both maps contiguous or both channels_last: every
# TransKD stage): the bins of l = 2 and l = 1 are unions of equal l = 4 bins, so one 4×4 pooling
# of each map gives every level; backward is one 4×4 coefficient grid broadcast over the blocks
# of fs and ft, written by two fused multiply-adds (no d, no per-level upsampling). The
# gradients keep fs's memory format: the convolutions that produced a channels_last map get a
# channels_last gradient, not a copy in the other layout.


def _grid_format(fs, ft) -> Optional[torch.memory_format]:
    """The memory format of the grid path for this pair, or None when the pair does not take it."""
    H, W = fs.shape[-2:]
    if H <= 4 or H % 4 or W % 4:
        return None
    for fmt in (torch.contiguous_format, torch.channels_last):
        if fs.is_contiguous(memory_format=fmt) and ft.is_contiguous(memory_format=fmt):
            return fmt
    return None


def _grid_blocks(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """A view of ``t`` [N, C, H, W] split into its 4×4 grid of blocks, in ``t``'s memory order:
    [N, C, 4, H/4, 4, W/4] (contiguous) or [N, 4, H/4, 4, W/4, C] (channels_last)."""
    N, C, H, W = t.shape
    if fmt == torch.channels_last:
        return t.permute(0, 2, 3, 1).view(N, 4, H // 4, 4, W // 4, C)
    return t.view(N, C, 4, H // 4, 4, W // 4)


def _grid_unblock(g: torch.Tensor, fmt: torch.memory_format, shape) -> torch.Tensor:
    """Inverse of :func:`_grid_blocks` for a fresh block tensor: the [N, C, H, W] view."""
    N, C, H, W = shape
    if fmt == torch.channels_last:
        return g.view(N, H, W, C).permute(0, 3, 1, 2)
    return g.view(N, C, H, W)


def _grid_coefs(q: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """The [N, C, 4, 4] per-bin coefficients broadcastable against :func:`_grid_blocks`."""
    N, C = q.shape[:2]
    if fmt == torch.channels_last:
        return q.permute(0, 2, 3, 1).reshape(N, 4, 1, 4, 1, C)
    return q.view(N, C, 4, 1, 4, 1)


def _torch_forward(fs_list, ft_list):
    acc = _acc_dtype(fs_list[0].dtype)
    terms, pooled = [], []
    for fs, ft in zip(fs_list, ft_list):
        N, C, H, W = fs.shape
        fs, ft = fs.to(acc), ft.to(acc)
        c0, cl = _stage_coefs(fs.shape)
        slots = fs.new_zeros(N * C, SLOTS)
        if _grid_format(fs, ft) is not None:
            terms.append(F.mse_loss(fs, ft, reduction="sum") * c0)
            p4 = F.adaptive_avg_pool2d(fs, 4) - F.adaptive_avg_pool2d(ft, 4)
            levels = {4: p4, 2: p4.view(N, C, 2, 2, 2, 2).mean((3, 5)), 1: p4.mean((2, 3))}
        else:
            d = fs - ft
            terms.append(d.square().sum() * c0)
            levels = {lv: F.adaptive_avg_pool2d(d, (lv, lv)) for lv in cl}
        for lv, c in cl.items():
            p = levels[lv].reshape(N * C, lv * lv)
            terms.append(p.square().sum() * c)
            slots[:, _SLOT_OF_LEVEL[lv]:_SLOT_OF_LEVEL[lv] + lv * lv] = p
        pooled.append(slots.reshape(-1))
    return torch.stack(terms).sum(), torch.cat(pooled)


def _torch_backward(grad, fs_list, ft_list, pooled, need_ft):
    acc = _acc_dtype(fs_list[0].dtype)
    grad = grad.to(acc)
    gfs, gft, off = [], [], 0
    for fs_in, ft_in, want_ft in zip(fs_list, ft_list, need_ft):
        N, C, H, W = fs_in.shape
        fs, ft = fs_in.to(acc), ft_in.to(acc)
        c0, cl = _stage_coefs(fs.shape)
        slots = pooled[off:off + N * C * SLOTS].view(N * C, SLOTS)
        off += N * C * SLOTS
        level = {lv: slots[:, _SLOT_OF_LEVEL[lv]:_SLOT_OF_LEVEL[lv] + lv * lv].reshape(N, C, lv, lv) for lv in cl}
        # ∂loss/∂(pooled mean) = 2·c_l·P; spread over a bin: ÷ its area.
        fmt = _grid_format(fs, ft)
        if fmt is not None:
            q = level[4] * (2.0 * cl[4] * 16 / (H * W))
            q = q + (level[2] * (2.0 * cl[2] * 4 / (H * W))).repeat_interleave(2, 2).repeat_interleave(2, 3)
            q = (q + level[1] * (2.0 * cl[1] / (H * W))) * grad
            a0 = grad * (2.0 * c0)
            g = torch.addcmul(_grid_coefs(q, fmt), _grid_blocks(fs, fmt), a0)
            g = _grid_unblock(g.addcmul_(_grid_blocks(ft, fmt), a0, value=-1.0), fmt, fs.shape)
        else:
            d = fs - ft
            g = d * (2.0 * c0)
            for lv, c in cl.items():
                g = g + torch.ops.aten._adaptive_avg_pool2d_backward(level[lv] * (2.0 * c), d)
            g = (g * grad).contiguous()  # the layout the fake impl declares for this path
        gfs.append(g.to(fs_in.dtype))
        if want_ft:
            gft.append((-g).to(ft_in.dtype))
    return gfs + gft


# ---------------------------------------------------------------------------------------
# triton backend.


@on_input_device
def _triton_forward(fs_list, ft_list):
    from transkd_fast.kernels.hcl import hcl_stage_forward

    acc = _acc_dtype(fs_list[0].dtype)
    planes = [fs.shape[0] * fs.shape[1] for fs in fs_list]
    pooled = fs_list[0].new_empty(sum(planes) * SLOTS, dtype=acc)
    share = fs_list[0].new_empty(sum(planes), dtype=acc)
    off = 0
    for fs, ft, p in zip(fs_list, ft_list, planes):
        hcl_stage_forward(fs, ft, pooled[off * SLOTS:(off + p) * SLOTS], share[off:off + p])
        off += p
    return share.sum(), pooled


@on_input_device
def _triton_backward(grad, fs_list, ft_list, pooled, need_ft):
    from transkd_fast.kernels.hcl import hcl_stage_backward

    gfs, gft, off = [], [], 0
    grad = grad.to(_acc_dtype(fs_list[0].dtype))
    for fs, ft, want_ft in zip(fs_list, ft_list, need_ft):
        p = fs.shape[0] * fs.shape[1]
        # Gradients in the inputs' layouts (channels_last in, channels_last out): the kernels take
        # their strides, so nothing is copied.
        g_s = torch.empty_like(fs)
        g_t = torch.empty_like(ft) if want_ft else None
        hcl_stage_backward(grad, fs, ft, pooled[off * SLOTS:(off + p) * SLOTS], g_s, g_t)
        off += p
        gfs.append(g_s)
        if want_ft:
            gft.append(g_t)
    return gfs + gft


_FORWARD = {"torch": _torch_forward, "triton": _triton_forward}
_BACKWARD = {"torch": _torch_backward, "triton": _triton_backward}


# ---------------------------------------------------------------------------------------
# The custom op.


@torch.library.custom_op("transkd_fast::hcl_loss", mutates_args=())
def _hcl_op(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor],
            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    loss, pooled = _FORWARD[backend](student_feats, teacher_feats)
    return loss, pooled


@_hcl_op.register_fake
def _(student_feats, teacher_feats, backend):
    acc = _acc_dtype(student_feats[0].dtype)
    planes = sum(fs.shape[0] * fs.shape[1] for fs in student_feats)
    return student_feats[0].new_empty((), dtype=acc), student_feats[0].new_empty(planes * SLOTS, dtype=acc)


@torch.library.custom_op("transkd_fast::hcl_loss_backward", mutates_args=())
def _hcl_backward_op(grad: torch.Tensor, student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor],
                     pooled: torch.Tensor, need_ft: list[bool], backend: str) -> list[torch.Tensor]:
    return _BACKWARD[backend](grad, student_feats, teacher_feats, pooled, need_ft)


def _grad_format(fs: torch.Tensor, ft: torch.Tensor) -> torch.memory_format:
    """The memory format of the torch backend's gradients of one stage: its grid path keeps
    fs's layout, its other path is contiguous."""
    fmt = _grid_format(fs, ft)
    return torch.contiguous_format if fmt is None else fmt


@_hcl_backward_op.register_fake
def _(grad, student_feats, teacher_feats, pooled, need_ft, backend):
    if backend == "triton":  # each gradient in its input's layout (empty_like keeps dense strides)
        return ([torch.empty_like(fs) for fs in student_feats]
                + [torch.empty_like(ft) for ft, want in zip(teacher_feats, need_ft) if want])
    fmts = [_grad_format(fs, ft) for fs, ft in zip(student_feats, teacher_feats)]
    return ([torch.empty_like(fs, memory_format=f) for fs, f in zip(student_feats, fmts)]
            + [torch.empty_like(ft, memory_format=f)
               for ft, f, want in zip(teacher_feats, fmts, need_ft) if want])


def _setup_context(ctx, inputs, output):
    student_feats, teacher_feats, backend = inputs
    _, pooled = output
    ctx.n = len(student_feats)
    ctx.need_ft = [bool(ft.requires_grad) for ft in teacher_feats]
    ctx.backend = backend
    ctx.save_for_backward(*student_feats, *teacher_feats, pooled)


def _backward(ctx, grad_loss, grad_pooled):
    saved = ctx.saved_tensors
    n = ctx.n
    fs_list, ft_list, pooled = list(saved[:n]), list(saved[n:2 * n]), saved[2 * n]
    grads = _hcl_backward_op(grad_loss, fs_list, ft_list, pooled, ctx.need_ft, ctx.backend)
    gfs = list(grads[:n])
    it = iter(grads[n:])
    gft = [next(it) if want else None for want in ctx.need_ft]
    return gfs, gft, None


_hcl_op.register_autograd(_backward, setup_context=_setup_context)


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

register_op(OP, {
    "reference": Support(devices=("cpu", "cuda")),
    "torch": Support(devices=("cpu", "cuda")),
    "triton": Support(devices=("cpu", "cuda"), dtypes=_FLOATS,
                      note="CPU tensors only under TRITON_INTERPRET=1; fp64 computes in fp64"),
})


def hcl_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor],
             backend: Optional[str] = None) -> torch.Tensor:
    """HCL summed over stages (see the module docstring); fp32 scalar (fp64 for fp64 inputs).

    ``student_feats`` / ``teacher_feats``: lists of ``[N, C, H, W]`` maps, equal shapes per
    stage, one dtype and device throughout; strided views are read in place. Gradients flow
    to the student maps and to the teacher maps that require grad. ``backend`` overrides the
    global choice for this call.
    """
    _check_inputs(student_feats, teacher_feats)
    name = resolve(OP, student_feats[0], backend=backend)
    if name == "reference":
        return hcl_loss_reference(student_feats, teacher_feats)
    return _hcl_op(list(student_feats), list(teacher_feats), name)[0]
