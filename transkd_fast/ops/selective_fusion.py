"""CSF's selective fusion (design §2): the two passes over the ``[B, mid, H, W]`` maps.

With x ``[B, C, H, W]``, y_low ``[B, C, h, w]`` and ``up`` PyTorch's legacy nearest
upsampling of y_low to x's H×W (``F.interpolate(mode="nearest")``)::

    selective_pool(x, y_low)    = mean_hw(x + up(y_low))                        [B, C]
    selective_fuse(x, y_low, a) = a[:, 0, :, None, None] · x
                                  + a[:, 1, :, None, None] · up(y_low)           [B, C, H, W]

Per axis, ``up`` copies source index ``src(d) = min(floor(fp32(d) · fp32(n_in / n_out)), n_in − 1)``
(aten's ``nearest_idx``, fp32 math, any ratio: up, down or equal). Its adjoint sums the
gradient over the dst pixels that copied each source pixel; the set of dst indices with
``src(d) = i`` is a contiguous range, empty for some i when downsampling.

Backward (g = grad of the output)::

    pool: dx = g / HW broadcast (returned as a stride-0 view), dy_low = g / HW · |rows(i)|·|cols(j)|
    fuse: dx = a0 · g,  dy_low = a1 · upᵀ(g),  da0 = Σ_hw g · x,  da1 = Σ_hw g · up(y_low)

Gradients come back in their input's layout (channels_last x / y_low → channels_last dx /
dy_low; contiguous → contiguous). Source pixels that no dst pixel copies (downsampling) are
left out of every sum rather than multiplied by a zero count, so an inf or NaN propagates
exactly where it does through the reference, on every backend.

Backends:

- ``reference``: eager, as the original: materializes ``F.interpolate(y_low, mode="nearest")``.
  Plain ATen ops (autograd and fvcore see them).
- ``torch``: custom ops ``transkd_fast::selective_pool`` / ``transkd_fast::selective_fuse``
  over fast eager PyTorch: integer ratios use broadcast views instead of the upsampled map,
  other ratios one gather with precomputed indices; the pool never upsamples (Σ up(y) =
  Σ y · count).
- ``triton``: the same custom ops over ``transkd_fast.kernels.selective_fusion``: one pass in
  forward, one in backward, ``up(y_low)`` never materialized.

Outputs are in x's dtype; ``a`` may have another floating dtype (fp32 from an autocast
softmax) and its gradient comes back in a's dtype. y_low must share x's dtype.

Note on float64: PyTorch's CPU ``F.interpolate`` uses a slightly different index formula
for float64 tensors (it differs from the fp32 one at rare ratios, e.g. 21 → 133). Our
torch/triton backends use the fp32 formula for every dtype (the one of CUDA and of CPU
fp16/bf16/fp32); the reference, being ``F.interpolate``, follows PyTorch per dtype.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from transkd_fast.backend import Support, check_tensor, on_input_device, register_op, resolve

POOL = "selective_pool"
FUSE = "selective_fuse"

# The kernels keep spatial index math in int32 and rely on the ±1 boundary correction of
# _first_dst, verified exhaustively up to this size.
MAX_SIDE = 8192


# ---------------------------------------------------------------------------------------
# Reference (eager, as the original).


def selective_pool_reference(x: torch.Tensor, y_low: torch.Tensor) -> torch.Tensor:
    """mean_hw(x + F.interpolate(y_low, x's H×W, mode="nearest")) → ``[B, C]`` in x's dtype."""
    up = F.interpolate(y_low, size=x.shape[-2:], mode="nearest")
    return (x + up).mean(dim=(2, 3)).to(x.dtype)


def selective_fuse_reference(x: torch.Tensor, y_low: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """a0·x + a1·F.interpolate(y_low, x's H×W, mode="nearest") → x's shape and dtype."""
    up = F.interpolate(y_low, size=x.shape[-2:], mode="nearest")
    return (a[:, 0, :, None, None] * x + a[:, 1, :, None, None] * up).to(x.dtype)


# ---------------------------------------------------------------------------------------
# Index maps (host side, cached per size pair).


def _scale(n_in: int, n_out: int) -> float:
    """fp32(n_in / n_out) as aten computes it (an fp32 division), as a Python float."""
    return float(np.float32(n_in) / np.float32(n_out))


@functools.lru_cache(maxsize=256)
def _src_np(n_in: int, n_out: int) -> np.ndarray:
    s = np.float32(n_in) / np.float32(n_out)
    d = np.arange(n_out, dtype=np.float32)
    return np.minimum(np.floor(d * s).astype(np.int64), n_in - 1)


def legacy_nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each of the ``n_out`` dst positions (int64 numpy array)."""
    return _src_np(int(n_in), int(n_out))


@functools.lru_cache(maxsize=256)
def _axis_info(n_in: int, n_out: int) -> tuple[int, int]:
    """(largest preimage size, uniform integer factor k or 0): k > 0 when src(d) = d // k."""
    src = _src_np(n_in, n_out)
    counts = np.bincount(src, minlength=n_in)
    kmax = int(counts.max())
    k = n_out // n_in
    uniform = k if (k * n_in == n_out and np.array_equal(src, np.arange(n_out) // k)) else 0
    return kmax, uniform


_DEVICE_CACHE: dict = {}


def _on_device(key: tuple, make, device: torch.device) -> torch.Tensor:
    k = key + (str(device),)
    t = _DEVICE_CACHE.get(k)
    if t is None:
        t = make().to(device)
        if len(_DEVICE_CACHE) > 512:
            _DEVICE_CACHE.clear()
        _DEVICE_CACHE[k] = t
    return t


def _index_t(n_in: int, n_out: int, device) -> torch.Tensor:
    return _on_device(("idx", n_in, n_out), lambda: torch.from_numpy(_src_np(n_in, n_out).copy()), device)


def _counts_t(n_in: int, n_out: int, device, dtype: torch.dtype) -> torch.Tensor:
    """|{d : src(d) = i}| for each source i (cached per device and dtype)."""
    return _on_device(("cnt", n_in, n_out, dtype),
                      lambda: torch.from_numpy(np.bincount(_src_np(n_in, n_out), minlength=n_in)).to(dtype),
                      device)


@functools.lru_cache(maxsize=256)
def _has_empty(n_in: int, n_out: int) -> bool:
    """Some source index is copied by no dst index (downsampling)."""
    return bool((np.bincount(_src_np(n_in, n_out), minlength=n_in) == 0).any())


def _used_t(n_in: int, n_out: int, device) -> torch.Tensor:
    """Source indices copied by at least one dst index (cached per device)."""
    return _on_device(("used", n_in, n_out),
                      lambda: torch.from_numpy(np.flatnonzero(np.bincount(_src_np(n_in, n_out), minlength=n_in))),
                      device)


def _channels_last(t: torch.Tensor) -> bool:
    """Channels are the fastest axis of the 4-D map ``t`` (channels_last, or 1×1 maps): its
    gradients are then allocated channels_last. The kernels' tile choice uses the same rule."""
    B, C, H, W = t.shape
    if C == 1:
        return False
    pixel_stride = t.stride(3) if W > 1 else (t.stride(2) if H > 1 else None)
    return pixel_stride is None or t.stride(1) < pixel_stride


def _empty_map(B: int, C: int, h: int, w: int, channels_last: bool, like: torch.Tensor) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(B, C, h, w, device=like.device, dtype=like.dtype, memory_format=fmt)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------
# torch backend: fast eager PyTorch.


def _torch_pool_forward(x, y):
    B, C, H, W = x.shape
    h, w = y.shape[-2:]
    acc = _acc_dtype(x.dtype)
    (_, kh), (_, kw) = _axis_info(h, H), _axis_info(w, W)
    if kh and kw:
        ys = y.sum(dim=(2, 3), dtype=acc) * float(kh * kw)
    else:
        # Σ_dst up(y) = Σ_src y · |rows(i)| · |cols(j)|: never upsample.
        cr = _counts_t(h, H, x.device, acc)
        cc = _counts_t(w, W, x.device, acc)
        ya = y.to(acc)
        # Downsampling: source pixels that no dst pixel copies are left out (not multiplied by
        # a zero count), so an inf or NaN there does not reach the result, as in the reference.
        if _has_empty(h, H):
            used = _used_t(h, H, x.device)
            ya, cr = ya.index_select(2, used), cr.index_select(0, used)
        if _has_empty(w, W):
            used = _used_t(w, W, x.device)
            ya, cc = ya.index_select(3, used), cc.index_select(0, used)
        ys = torch.matmul(torch.matmul(ya, cc), cr)
    xs = x.sum(dim=(2, 3), dtype=acc)
    return ((xs + ys) / (H * W)).to(x.dtype)


def _pool_dx(g, H, W, dtype):
    # The gradient of a mean is a constant per plane: a stride-0 view, no H×W write.
    B, C = g.shape
    return (g.to(_acc_dtype(dtype)) / (H * W)).to(dtype)[:, :, None, None].expand(B, C, H, W)


def _torch_pool_backward(g, H, W, h, w, channels_last):
    acc = _acc_dtype(g.dtype)
    cr = _counts_t(h, H, g.device, acc)
    cc = _counts_t(w, W, g.device, acc)
    cnt = cr[:, None] * cc[None, :]
    B, C = g.shape
    out = _empty_map(B, C, h, w, channels_last, g)  # y_low's layout
    gs = (g.to(acc) / (H * W))[:, :, None, None]
    if acc == g.dtype:
        dy = torch.mul(gs, cnt, out=out)
    else:
        dy = gs * cnt
    if _has_empty(h, H) or _has_empty(w, W):
        # An empty preimage is an empty sum: 0 even where g is inf or NaN (as the reference).
        dy.masked_fill_(cnt == 0, 0.0)
    if dy is not out:
        out.copy_(dy)
    return _pool_dx(g, H, W, g.dtype), out


def _split_view(t, kh, kw):
    """[B, C, h·kh, w·kw] → [B, C, h, kh, w, kw] (always a view)."""
    return t.unflatten(3, (-1, kw)).unflatten(2, (-1, kh))


def _torch_fuse_forward(x, y, a):
    B, C, H, W = x.shape
    h, w = y.shape[-2:]
    (_, kh), (_, kw) = _axis_info(h, H), _axis_info(w, W)
    a = a.to(x.dtype)
    a0 = a[:, 0, :, None, None]
    a1y = a[:, 1, :, None, None] * y  # y-sized
    out = torch.empty_like(x)  # x's layout, as the fake impl says
    if kh and kw:
        torch.addcmul(a1y[:, :, :, None, :, None], _split_view(x, kh, kw), a0[..., None, None],
                      out=_split_view(out, kh, kw))
    else:
        up = a1y[:, :, _index_t(h, H, x.device)[:, None], _index_t(w, W, x.device)[None, :]]
        torch.addcmul(up, x, a0, out=out)
    return out


def _adjoint_up(g, h, w, acc):
    """upᵀ(g): Σ of g over the dst pixels that copied each source pixel, in ``acc`` dtype."""
    B, C, H, W = g.shape
    (_, kh), (_, kw) = _axis_info(h, H), _axis_info(w, W)
    if kh and kw:
        # Adding the kh row slices, then the kw column slices, beats a reduction over the two
        # small strided dims of the 6-d view (about 3× on CPU).
        g5 = g.to(acc).unflatten(2, (h, kh))
        rows = g5[:, :, :, 0]
        for k in range(1, kh):
            rows = rows + g5[:, :, :, k]
        r5 = rows.unflatten(3, (w, kw))
        out = r5[..., 0]
        for k in range(1, kw):
            out = out + r5[..., k]
        return out if (kh > 1 or kw > 1) else out.clone()
    rows = torch.zeros(B, C, h, W, device=g.device, dtype=acc).index_add_(2, _index_t(h, H, g.device), g.to(acc))
    return torch.zeros(B, C, h, w, device=g.device, dtype=acc).index_add_(3, _index_t(w, W, g.device), rows)


def _torch_fuse_backward(g, x, y, a):
    acc = _acc_dtype(x.dtype)
    h, w = y.shape[-2:]
    a_acc = a.to(acc)
    dx = torch.mul(g, a.to(x.dtype)[:, 0, :, None, None], out=torch.empty_like(x))
    gs = _adjoint_up(g, h, w, acc)
    dy = torch.mul(gs, a_acc[:, 1, :, None, None], out=torch.empty_like(y))
    da0 = (g.to(acc) * x.to(acc)).sum(dim=(2, 3))
    ya = y.to(acc)
    H, W = x.shape[-2:]
    if _has_empty(h, H) or _has_empty(w, W):
        # Source pixels no dst pixel copies have G = 0 and get no gradient: leave them out of
        # Σ G·y and of a1·G (not 0·y, 0·a1), so an inf or NaN there stays out, as in the reference.
        unused = (_counts_t(h, H, y.device, acc)[:, None] * _counts_t(w, W, y.device, acc)[None, :]) == 0
        ya = ya.masked_fill(unused, 0.0)
        dy.masked_fill_(unused, 0.0)
    da1 = (gs * ya).sum(dim=(2, 3))
    return dx, dy, torch.stack((da0, da1), dim=1).to(a.dtype)


# ---------------------------------------------------------------------------------------
# triton backend.


def _kernels():
    from transkd_fast.kernels import selective_fusion as k

    return k


@on_input_device
def _triton_pool_forward(x, y):
    B, C, H, W = x.shape
    h, w = y.shape[-2:]
    out = torch.empty(B, C, device=x.device, dtype=x.dtype)
    _kernels().pool_forward(x, y, out, _scale(h, H), _scale(w, W))
    return out


@on_input_device
def _triton_pool_backward(g, H, W, h, w, channels_last):
    B, C = g.shape
    dy = _empty_map(B, C, h, w, channels_last, g)
    _kernels().pool_backward(g, dy, H, W, _scale(h, H), _scale(w, W))
    return _pool_dx(g, H, W, g.dtype), dy


def _a32(a):
    return a if a.dtype == torch.float32 else a.float()


@on_input_device
def _triton_fuse_forward(x, y, a):
    h, w = y.shape[-2:]
    H, W = x.shape[-2:]
    out = torch.empty_like(x)
    _kernels().fuse_forward(x, y, _a32(a), out, _scale(h, H), _scale(w, W))
    return out


@on_input_device
def _triton_fuse_backward(g, x, y, a):
    h, w = y.shape[-2:]
    H, W = x.shape[-2:]
    dx = torch.empty_like(x)
    dy = torch.empty_like(y)
    da = torch.empty(a.shape, device=a.device, dtype=a.dtype)
    _kernels().fuse_backward(g, x, y, _a32(a), dx, dy, da, _scale(h, H), _scale(w, W),
                             _axis_info(h, H)[0], _axis_info(w, W)[0])
    return dx, dy, da


_POOL_FORWARD = {"torch": _torch_pool_forward, "triton": _triton_pool_forward}
_POOL_BACKWARD = {"torch": _torch_pool_backward, "triton": _triton_pool_backward}
_FUSE_FORWARD = {"torch": _torch_fuse_forward, "triton": _triton_fuse_forward}
_FUSE_BACKWARD = {"torch": _torch_fuse_backward, "triton": _triton_fuse_backward}


# ---------------------------------------------------------------------------------------
# Custom ops.


@torch.library.custom_op("transkd_fast::selective_pool", mutates_args=())
def _pool_op(x: torch.Tensor, y_low: torch.Tensor, backend: str) -> torch.Tensor:
    return _POOL_FORWARD[backend](x, y_low)


@_pool_op.register_fake
def _(x, y_low, backend):
    return x.new_empty(x.shape[0], x.shape[1])


@torch.library.custom_op("transkd_fast::selective_pool_backward", mutates_args=())
def _pool_backward_op(grad: torch.Tensor, H: int, W: int, h: int, w: int, channels_last: bool,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _POOL_BACKWARD[backend](grad, H, W, h, w, channels_last)


@_pool_backward_op.register_fake
def _(grad, H, W, h, w, channels_last, backend):
    B, C = grad.shape
    return grad.new_empty(B, C, 1, 1).expand(B, C, H, W), _empty_map(B, C, h, w, channels_last, grad)


def _pool_setup(ctx, inputs, output):
    x, y_low, backend = inputs
    # dy_low comes back in y_low's layout (channels_last in, channels_last out).
    ctx.sizes = (x.shape[-2], x.shape[-1], y_low.shape[-2], y_low.shape[-1], _channels_last(y_low))
    ctx.backend = backend


def _pool_backward(ctx, grad):
    dx, dy = _pool_backward_op(grad, *ctx.sizes, ctx.backend)
    return dx, dy, None


_pool_op.register_autograd(_pool_backward, setup_context=_pool_setup)


@torch.library.custom_op("transkd_fast::selective_fuse", mutates_args=())
def _fuse_op(x: torch.Tensor, y_low: torch.Tensor, a: torch.Tensor, backend: str) -> torch.Tensor:
    return _FUSE_FORWARD[backend](x, y_low, a)


@_fuse_op.register_fake
def _(x, y_low, a, backend):
    return torch.empty_like(x)


@torch.library.custom_op("transkd_fast::selective_fuse_backward", mutates_args=())
def _fuse_backward_op(grad: torch.Tensor, x: torch.Tensor, y_low: torch.Tensor, a: torch.Tensor,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _FUSE_BACKWARD[backend](grad, x, y_low, a)


@_fuse_backward_op.register_fake
def _(grad, x, y_low, a, backend):
    return torch.empty_like(x), torch.empty_like(y_low), torch.empty(a.shape, device=a.device, dtype=a.dtype)


def _fuse_setup(ctx, inputs, output):
    x, y_low, a, backend = inputs
    ctx.save_for_backward(x, y_low, a)
    ctx.backend = backend


def _fuse_backward(ctx, grad):
    x, y_low, a = ctx.saved_tensors
    dx, dy, da = _fuse_backward_op(grad, x, y_low, a, ctx.backend)
    return dx, dy, da, None


_fuse_op.register_autograd(_fuse_backward, setup_context=_fuse_setup)


# ---------------------------------------------------------------------------------------
# Support, validation and the public functions.


def _triton_check(x, y_low, *rest, **_):
    if max(x.shape[-2:] + y_low.shape[-2:]) > MAX_SIDE:
        return f"spatial sides above {MAX_SIDE} are not supported by the kernels' index math"
    if x.shape[0] * x.shape[1] > 65535:
        return f"B·C = {x.shape[0] * x.shape[1]} planes exceed the kernels' grid limit of 65535"
    return None


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
for _op in (POOL, FUSE):
    register_op(_op, {
        "reference": Support(devices=("cpu", "cuda")),
        "torch": Support(devices=("cpu", "cuda")),
        "triton": Support(devices=("cpu", "cuda"), dtypes=_TRITON_DTYPES, check=_triton_check,
                          note="CPU tensors only under TRITON_INTERPRET=1"),
    })


def _check_xy(x: torch.Tensor, y_low: torch.Tensor) -> None:
    check_tensor("x", x, ndim=4)
    check_tensor("y_low", y_low, ndim=4)
    if x.shape[:2] != y_low.shape[:2]:
        raise ValueError(f"y_low shape {tuple(y_low.shape)} does not match x {tuple(x.shape)}: batch and "
                         f"channels must be equal ([B, C, h, w] vs [B, C, H, W])")
    if x.dtype != y_low.dtype:
        raise TypeError(f"x and y_low must share a dtype, got {x.dtype} and {y_low.dtype}")
    if x.device != y_low.device:
        raise ValueError(f"x and y_low must be on one device, got {x.device} and {y_low.device}")
    if x.numel() == 0 or y_low.numel() == 0:
        raise ValueError(f"empty input: x {tuple(x.shape)}, y_low {tuple(y_low.shape)}")


def _check_a(a: torch.Tensor, x: torch.Tensor) -> None:
    check_tensor("a", a, ndim=3)
    B, C = x.shape[:2]
    if tuple(a.shape) != (B, 2, C):
        raise ValueError(f"a must have shape [B, 2, C] = [{B}, 2, {C}] (branch weights of x and up(y_low)), "
                         f"got {tuple(a.shape)}")
    if a.device != x.device:
        raise ValueError(f"a must be on x's device {x.device}, got {a.device}")


def selective_pool(x: torch.Tensor, y_low: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """mean_hw(x + up(y_low)): x ``[B, C, H, W]``, y_low ``[B, C, h, w]`` → ``[B, C]`` in x's dtype.

    ``up`` is PyTorch's legacy nearest upsampling to H×W (any ratio). Inputs may be strided
    views. ``backend`` overrides the global choice for this call.
    """
    _check_xy(x, y_low)
    name = resolve(POOL, x, y_low, backend=backend)
    if name == "reference":
        return selective_pool_reference(x, y_low)
    return _pool_op(x, y_low, name)


def selective_fuse(x: torch.Tensor, y_low: torch.Tensor, a: torch.Tensor,
                   backend: Optional[str] = None) -> torch.Tensor:
    """a[:, 0]·x + a[:, 1]·up(y_low) per channel: x ``[B, C, H, W]``, y_low ``[B, C, h, w]``,
    a ``[B, 2, C]`` → x's shape and dtype (x's memory format when dense).

    ``up`` is PyTorch's legacy nearest upsampling to H×W (any ratio). ``backend`` overrides
    the global choice for this call.
    """
    _check_xy(x, y_low)
    _check_a(a, x)
    name = resolve(FUSE, x, y_low, a, backend=backend)
    if name == "reference":
        return selective_fuse_reference(x, y_low, a)
    return _fuse_op(x, y_low, a, name)
