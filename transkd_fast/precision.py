"""Inference precision: ``fp32`` or ``bf16`` (``evaluate/predict/report --precision``).

``bf16`` = :func:`prepare_for_inference` (weights and buffers cast to bfloat16 once, inputs cast
to bf16 on the way in, floating outputs back to fp32 on the way out) and :func:`inference_context`
(inference mode, plus autocast(bf16) so that anything still fp32 inside the call runs its
matmuls in bf16 too). What runs in bf16 for SegFormer / MiT, images ``[B, 3, H, W]``:

- every Linear (``q``, ``kv``, ``proj``, ``fc1``, ``fc2``, the head's composed Linears) and the
  3×3 depthwise conv + GELU: oneDNN's bf16 primitives on CPU
  (:mod:`transkd_fast.ops.onednn`): bf16 products, fp32 accumulation, the output rounded to
  bf16 once (the residual add fused in before that rounding);
- the patch-embedding and ``sr`` convs (ATen / oneDNN bf16 convolution, fp32 accumulation);
- attention ``softmax(q kᵀ · D^-½) v`` (:mod:`transkd_fast.ops.attention`): on CPUs without
  AMX the bf16 scores ``[Nq, Nkv]`` are formed one query chunk at a time by a bf16 GEMM, softmax
  takes its max, exponentials and sum in fp32 and rounds P to bf16, and ``P v`` is a bf16 GEMM;
  with AMX (``attention.BF16_CHUNKED`` false) and on CUDA, SDPA's flash kernels on the bf16
  operands (scores and softmax statistics in fp32);
- LayerNorm: mean and variance accumulated in fp32, output bf16 (on CPU inference MiT's C kernel,
  :mod:`transkd_fast.ops.layer_norm`, elsewhere ATen's bf16 kernel);
- the decode head's fold (per-stage composed Linears with BatchNorm folded in) computed in fp32
  from the bf16 weights and rounded once; on CPU inference (the tiled head) its bilinear
  upsampling, sum and ReLU in fp32 from the bf16 terms, rounded once before the classifier (the
  C kernel :mod:`transkd_fast.ops.upsample_add_relu`, or ATen ops), elsewhere in bf16.

The logits ``[B, K, ⌈H/4⌉, ⌈W/4⌉]`` come back in fp32 (bf16 values: 8 bits of mantissa, a
relative error per element of about 2^-9 ≈ 2e-3 per rounding; against fp32 the B0 logits differ
by ~1e-2 relative in norm). Argmax, metrics and upsampling to the labels then run in fp32.

Why weights cast once rather than autocast over fp32 weights: measured on the project's CPU
(AMD EPYC, AVX512-BF16, no AMX), SegFormer-B0 1×3×512×1024, 2 threads, one process, alternating:
fp32 194–216 ms, this bf16 123–129 ms (1.5–1.75×), autocast over fp32 weights 130–145 ms (every
weight cast at every call), bf16 with SDPA's flash attention instead of the chunked one 140–145
ms. The cast model also halves the weights' memory. ``evaluate --amp bf16`` (autocast over fp32
weights) remains available.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, Union

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# The hooks prepare_for_inference puts on a model, kept on it so that a second call (or a call
# with another precision) replaces them instead of stacking them.
_HOOKS_ATTR = "_transkd_precision_hooks"


def check_precision(precision: str, flag: str = "--precision") -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else :class:`ConfigError` naming ``flag``."""
    if precision not in PRECISIONS:
        from transkd_fast.engine.config import ConfigError

        raise ConfigError(f"{flag} must be {' or '.join(PRECISIONS)}, got {precision!r}")
    return precision


_warned_slow_bf16 = False


def warn_if_bf16_is_slow(device: Union[torch.device, str]) -> bool:
    """Warn (once per process) when bf16 on ``device`` would run without bf16 kernels: a CPU for
    which oneDNN has no bf16 primitives (x86 without AVX512-BW; no AVX512-BF16 or AMX). There the
    bf16 matmuls and convolutions fall back to ATen's generic loops: still bf16 (results within
    bf16 tolerance, nothing runs fp32 in their place), but far slower than fp32 — SegFormer-B0
    at 1×3×512×1024 took 8.4 s in bf16 against 0.40 s in fp32 on the AVX2-only AMD EPYC (Zen 3).
    Returns True when it warned (now or earlier)."""
    global _warned_slow_bf16
    if torch.device(device).type != "cpu":
        return False
    from transkd_fast.ops import onednn

    if onednn.BF16_AVAILABLE:
        return False
    if not _warned_slow_bf16:
        _warned_slow_bf16 = True
        warnings.warn(
            "bf16 on this CPU runs without bf16 kernels (oneDNN has none for it: no AVX512-BW, "
            "AVX512-BF16 or AMX), through ATen's generic loops: correct bf16 but about 20x slower "
            "than fp32 (SegFormer-B0 at 512x1024 took 8.4 s against 0.40 s on an AVX2 AMD EPYC). "
            "Use fp32 on this machine (--precision fp32, --amp none).", RuntimeWarning, stacklevel=3)
    return True


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with every floating tensor in it (nested tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, tuple):
        return type(obj)(*(_cast_floats(o, dtype) for o in obj)) if hasattr(obj, "_fields") else \
            tuple(_cast_floats(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_cast_floats(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    return obj


def _bf16_inputs(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return _cast_floats(args, torch.bfloat16), _cast_floats(kwargs, torch.bfloat16)


def _fp32_outputs(_module: nn.Module, _args: tuple, out: Any) -> Any:
    return _cast_floats(out, torch.float32)


def model_precision(model: nn.Module) -> str:
    """``"bf16"`` when :func:`prepare_for_inference` made ``model`` bf16, else ``"fp32"``."""
    return "bf16" if getattr(model, _HOOKS_ATTR, None) else "fp32"


def prepare_for_inference(model: nn.Module, precision: str) -> nn.Module:
    """Put ``model`` in eval mode at ``precision``, in place; returns it.

    ``bf16``: floating parameters and buffers cast to bfloat16 (integer buffers such as
    BatchNorm's ``num_batches_tracked`` stay), a forward pre-hook casting floating inputs to
    bf16 and a forward hook casting floating outputs (logits; features with
    ``return_features=True``) to fp32. The model keeps its type and attributes; its state dict
    is then bf16. Hooks sit on ``model`` itself only, so the fused paths inside, which step
    aside for hooks on their own submodules, stay on. ``fp32``: floating tensors cast back to
    fp32 (bf16 values, now exactly representable) and the hooks removed.
    """
    check_precision(precision)
    for h in model.__dict__.pop(_HOOKS_ATTR, None) or ():
        h.remove()
    model.eval()
    dtype = DTYPES[precision]
    model.to(dtype)  # nn.Module.to casts floating parameters and buffers only
    if precision == "bf16":
        p = next(model.parameters(), None)
        warn_if_bf16_is_slow(p.device if p is not None else "cpu")
        pre = model.register_forward_pre_hook(_bf16_inputs, with_kwargs=True)
        post = model.register_forward_hook(_fp32_outputs)
        setattr(model, _HOOKS_ATTR, (pre, post))
    return model


@contextlib.contextmanager
def inference_context(precision: str, device: Union[torch.device, str]) -> Iterator[None]:
    """Inference mode, and for ``bf16`` autocast(bf16) on ``device``'s type.

    With a model from :func:`prepare_for_inference` the autocast casts nothing (weights and
    activations already are bf16) and only guarantees bf16 matmuls for any fp32 tensor made
    inside the call; around an fp32 model it is plain autocast (weights cast at each call, the
    fast paths cast as autocast does, :mod:`transkd_fast.ops.onednn`).
    """
    check_precision(precision)
    device_type = torch.device(device).type
    with torch.inference_mode():
        if precision == "fp32":
            yield
        else:
            warn_if_bf16_is_slow(device_type)
            with torch.autocast(device_type, dtype=torch.bfloat16):
                yield
