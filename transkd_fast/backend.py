"""Backend choice for every op of transkd_fast.

Backends: ``"auto"`` | ``"triton"`` | ``"xformers"`` | ``"torch"`` | ``"reference"``.

- ``reference``: eager PyTorch written straight from the math (fp32 math), the ground truth.
- ``torch``: fast PyTorch (SDPA, fused ATen ops); runs on any device.
- ``triton``: our Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
- ``xformers``: ``xformers.ops`` kernels; CUDA only, when xformers is installed.
- ``auto``: per op and device, the first supported backend of :func:`auto_order` — decided
  per op by evidence (:data:`AUTO_CUDA`), not Triton-first across the board.

``TRANSKD_DEBUG=1`` (or the ``transkd_fast.backend`` logger at DEBUG level) logs, once per op,
device type and dtype, which backend ran and why each other one was refused or not chosen.

The global choice comes from :func:`set_backend`, the context manager :func:`use_backend`,
or the environment variable ``TRANSKD_FAST_BACKEND`` (read once, at import).

Each op declares what each backend supports as data (:class:`Support`). A request that a
backend cannot serve raises :class:`BackendError` naming the op, the backend, why, and
which backends would work. A named backend is never swapped for another one silently.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch.nn.modules import module as _nn_module

BACKENDS = ("auto", "triton", "xformers", "torch", "reference")

# What "auto" tries, in order, per device type, for an op without an entry in AUTO_CUDA.
AUTO_ORDER = {
    "cuda": ("triton", "xformers", "torch"),
    "cpu": ("torch",),
}

# What "auto" tries on CUDA, per op, and the evidence for the order. The traffic figures are
# ``transkd-fast report --traffic`` at the TransKD-Base training shapes (MODELED bytes; no GPU
# has timed these kernels yet: ``scripts/gpu_check.sh`` measures every backend side by side,
# and a measured reversal belongs here).
AUTO_CUDA: dict[str, tuple[tuple[str, ...], str]] = {
    "efficient_attention": (
        ("torch", "triton", "xformers"),
        "PyTorch's SDPA picks flash/cuDNN/mem-efficient kernels that move the same bytes as ours (all are "
        "flash-style: q, k, v, O and the LSE once, 17 MB per B0 stage-1 forward vs 822 MB eager); with no "
        "saving to show and no GPU timing yet, SDPA leads"),
    "selective_pool": (
        ("triton", "torch"),
        "one pass over x and y_low, up(y_low) never formed: 21 MB forward vs 88 MB eager at CSF stage 1; the "
        "torch backend avoids the upsampled map only for integer ratios and still makes several passes"),
    "selective_fuse": (
        ("triton", "torch"),
        "one pass forward, one backward, no upsampled or stacked maps: 96 MB fwd+bwd vs 361 MB eager at CSF "
        "stage 1"),
    "hcl_loss": (
        ("triton", "torch"),
        "one read of fs and ft per stage for Σd² and every bin sum, nothing of input size written: 177 MB "
        "fwd+bwd vs 813 MB eager; the torch backend forms d = fs − ft and pools it per level"),
    "kd_kl_div": (
        ("triton", "torch"),
        "one read of each logit map, d saved in the student's dtype: 26 MB fwd+bwd vs 136 MB eager; the torch "
        "backend runs separate log_softmax passes"),
    "weighted_mse": (
        ("torch", "triton"),
        "ATen's mse_loss and mse_loss_backward are already one fused pass each (65 MB forward either way): "
        "a Triton kernel saves nothing"),
}

# Triton kernels are compiled and checked (transkd_fast.compile_check) for sm_80 and sm_90;
# bf16 tl.dot needs sm_80. Older GPUs are refused rather than left to fail at the first launch.
TRITON_MIN_CAPABILITY = (8, 0)

log = logging.getLogger("transkd_fast.backend")
if os.environ.get("TRANSKD_DEBUG", "0") not in ("", "0"):
    log.setLevel(logging.DEBUG)
    if not log.handlers:
        _h = logging.StreamHandler()
        _h.setFormatter(logging.Formatter("[transkd_fast] %(message)s"))
        log.addHandler(_h)
_logged: set = set()

_state = threading.local()
_default = os.environ.get("TRANSKD_FAST_BACKEND", "auto")


class BackendError(RuntimeError):
    """A backend was asked for something it cannot do; the message says why."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


_check_name(_default)


def get_backend() -> str:
    """The backend in force in this thread."""
    return getattr(_state, "name", _default)


def set_backend(name: str) -> None:
    """Set the backend for this thread (and the default for new threads)."""
    global _default
    _state.name = _check_name(name)
    _default = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Use ``name`` inside the block; the previous backend is restored on exit, errors too."""
    _check_name(name)
    previous = get_backend()
    _state.name = name
    try:
        yield name
    finally:
        _state.name = previous


def hooks_registered(*modules: torch.nn.Module) -> bool:
    """Whether a forward hook or pre-hook would fire on any of ``modules`` (their own, or a
    global one). Fused paths that read modules' weights without calling them (oneDNN matmuls,
    the lean MixFFN, the folded head, CSF's squeeze MLP) check this and, when it holds, call
    the modules instead, so that hooks fire and their outputs are used."""
    if getattr(_nn_module, "_global_forward_hooks", None) or getattr(_nn_module, "_global_forward_pre_hooks", None):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def autocast_enabled(t: torch.Tensor) -> bool:
    """Whether autocast is on for ``t``'s device type (False for types autocast does not know,
    such as ``meta``, where ``torch.is_autocast_enabled`` raises)."""
    return t.device.type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(t.device.type)


def _first_tensor(args) -> Optional[torch.Tensor]:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    return b
    return None


def on_input_device(fn: Callable) -> Callable:
    """Decorator for the ops' functions that launch Triton kernels: run ``fn`` with the CUDA
    device of its first tensor argument (or of the first tensor in a list argument) current.

    Triton launches on the current CUDA device and stream, not on the tensors' device: without
    this, tensors on ``cuda:1`` while ``cuda:0`` is current would be handed to a kernel running
    on the wrong GPU. A no-op for CPU tensors (the interpreter)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        t = _first_tensor(args)
        if t is None or t.device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(t.device):
            return fn(*args, **kwargs)

    run.on_input_device = True
    return run


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_recording_launches = False


@contextlib.contextmanager
def recording_launches() -> Iterator[None]:
    """Let the triton backend take CPU tensors without the interpreter, for
    :mod:`transkd_fast.compile_check`, which intercepts every launch and compiles it for a GPU
    target instead of running it. Outputs of intercepted launches stay unwritten."""
    global _recording_launches
    previous, _recording_launches = _recording_launches, True
    try:
        yield
    finally:
        _recording_launches = previous


def is_recording_launches() -> bool:
    """Inside :func:`recording_launches`: the run models a GPU's launches (CPU-only paths step aside)."""
    return _recording_launches


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


Check = Callable[..., Optional[str]]


@dataclass(frozen=True)
class Support:
    """What one backend of one op supports.

    ``devices``: device types ("cpu", "cuda"). ``dtypes``: floating dtypes accepted.
    ``check``: called with the op's tensor arguments, returns ``None`` when supported or a
    sentence saying why not (a size limit, a layout...).
    """

    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    check: Optional[Check] = None
    note: str = ""


@dataclass
class OpTable:
    name: str
    backends: dict[str, Support] = field(default_factory=dict)


_OPS: dict[str, OpTable] = {}


def register_op(name: str, backends: dict[str, Support]) -> OpTable:
    """Declare what each backend of op ``name`` supports."""
    for b in backends:
        if b == "auto" or b not in BACKENDS:
            raise ValueError(f"op {name}: {b!r} is not a concrete backend")
    table = OpTable(name, dict(backends))
    _OPS[name] = table
    return table


def registered_ops() -> dict[str, OpTable]:
    return dict(_OPS)


def _refusal(backend: str, support: Optional[Support], device: torch.device,
             dtype: torch.dtype, tensors: Sequence, kwargs: dict) -> Optional[str]:
    """None when ``backend`` can run, else the reason in words."""
    if device.type == "meta" and _recording_launches:
        # compile_check records the op calls of a model run on the meta device: shapes,
        # strides and storage offsets come from the triton backend's fake (meta) kernels.
        return None if backend == "triton" else "launch recording on meta tensors uses the triton backend"
    if backend == "triton":
        if not triton_available():
            return "triton is not installed"
        if device.type == "cpu" and not (triton_interpreting() or _recording_launches):
            return ("triton kernels need CUDA tensors; CPU tensors run only in Triton's "
                    "interpreter (set TRITON_INTERPRET=1 before importing triton)")
    if backend == "triton" and device.type == "cuda":
        cc = torch.cuda.get_device_capability(device)
        if cc < TRITON_MIN_CAPABILITY:
            return (f"compute capability {cc[0]}.{cc[1]} is below {TRITON_MIN_CAPABILITY[0]}."
                    f"{TRITON_MIN_CAPABILITY[1]}: the kernels are built and checked for sm_80 and sm_90 only")
    if backend == "xformers":
        if not xformers_available():
            return "xformers is not installed (pip install 'transkd-fast[xformers]')"
        if device.type != "cuda":
            return f"xformers has no {device.type} kernels, only CUDA"
    if support is None:
        return "the op has no implementation for it"
    if device.type not in support.devices:
        return f"it runs on {'/'.join(support.devices)} tensors, not {device.type}"
    if dtype not in support.dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in support.dtypes)
        return f"dtype {str(dtype).replace('torch.', '')} is not supported (supported: {names})"
    if support.check is not None:
        return support.check(*tensors, **kwargs)
    return None


def resolve(op: str, *tensors: torch.Tensor, backend: Optional[str] = None, **kwargs) -> str:
    """Pick the concrete backend for ``op`` on these tensors, or raise :class:`BackendError`.

    ``tensors[0]`` gives the device and dtype; extra keyword arguments go to the checks.
    """
    table = _OPS[op]
    name = _check_name(backend or get_backend())
    t0 = tensors[0]
    device, dtype = t0.device, t0.dtype

    def why(b: str) -> Optional[str]:
        return _refusal(b, table.backends.get(b), device, dtype, tensors, kwargs)

    if name != "auto":
        reason = why(name)
        if reason is None:
            return name
        working = [b for b in BACKENDS[1:] if why(b) is None]
        raise BackendError(
            f"transkd_fast::{op}: backend {name!r} refused for {device.type} "
            f"{str(dtype).replace('torch.', '')} tensors of shape {tuple(t0.shape)}: {reason}. "
            f"Backends that would work here: {', '.join(working) or 'none'}."
        )
    order = auto_order(op, device.type)
    reasons = []
    for b in order:
        reason = why(b)
        if reason is None:
            if log.isEnabledFor(logging.DEBUG):
                _log_choice(op, device, dtype, b, order, reasons, why)
            return b
        reasons.append(f"{b}: {reason}")
    raise BackendError(
        f"transkd_fast::{op}: no backend of auto's order {order} runs on {device.type} "
        f"{str(dtype).replace('torch.', '')} tensors ({'; '.join(reasons)})"
    )


def auto_order(op: str, device_type: str) -> tuple[str, ...]:
    """The backends ``auto`` tries for ``op`` on ``device_type``, in order."""
    if device_type == "cuda" and op in AUTO_CUDA:
        return AUTO_CUDA[op][0]
    return AUTO_ORDER.get(device_type, ("torch",))


def explain(op: str, *tensors: torch.Tensor, **kwargs) -> dict[str, Optional[str]]:
    """Every concrete backend of ``op`` on these tensors: ``None`` where it would run, else why not."""
    table = _OPS[op]
    t0 = tensors[0]
    return {b: _refusal(b, table.backends.get(b), t0.device, t0.dtype, tensors, kwargs) for b in BACKENDS[1:]}


def _log_choice(op, device, dtype, chosen, order, refused, why) -> None:
    key = (op, device.type, dtype, chosen)
    if key in _logged:
        return
    _logged.add(key)
    rest = [f"{b}: not tried, after {chosen} in auto's order" for b in order[order.index(chosen) + 1:]]
    others = [f"{b}: {r}" for b in BACKENDS[1:] if b not in order and (r := why(b)) is not None]
    evidence = AUTO_CUDA[op][1] if device.type == "cuda" and op in AUTO_CUDA else "the only fast backend off CUDA"
    log.debug("%s on %s %s: backend %s (auto order %s; %s)%s", op, device.type, str(dtype).replace("torch.", ""),
              chosen, "/".join(order), evidence, "".join(f"; {x}" for x in refused + rest + others))


def check_tensor(name: str, t: torch.Tensor, *, ndim: Optional[int] = None,
                 floating: bool = True) -> None:
    """Shared argument checks with messages that name the argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
