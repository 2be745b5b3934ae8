"""Benchmark of efficient_attention at every MiT-B0 and MiT-B2 stage, 512×1024 input.

Shapes (Nq, Nkv, heads): stage 1 (32768, 512, 1), stage 2 (8192, 512, 2), stage 3
(2048, 512, 5), stage 4 (512, 512, 8); head_dim 32 (B0) or 64 (B2). q and k/v are strided
views of the ``q`` and fused ``kv`` Linear outputs, as in the model. Batch 2 (the training
recipe) on CUDA, 1 on CPU. Forward (no autograd) and forward + backward.

Every backend runnable on the device runs in the same session as the reference
(reference, torch; triton and xformers on CUDA only: the interpreter is not a benchmark).
Beside them, on CUDA, PyTorch's own SDPA kernels each forced with ``sdpa_kernel``
(``sdpa-flash``, ``sdpa-cudnn``, ``sdpa-efficient``: ``F.scaled_dot_product_attention`` on the
same strided views, its own autograd), so that a Triton speed-up is never quoted against a
slower baseline than the best fused kernel PyTorch has; a kernel that refuses the shape or
dtype on the GPU at hand skips with its reason.
``extra_info`` records shapes, dtype, device, FLOPs, modeled bytes and peak memory:

- ``flops``: multiply-add = 2 FLOPs; forward 4·B·H·Nq·Nkv·D (q kᵀ and P v), backward
  8·B·H·Nq·Nkv·D (dP, dv, dq, dk; a fused backward also recomputes q kᵀ, not counted).
- ``bytes_modeled``: counted on fake tensors with ``transkd_fast.traffic.count_bytes``
  (every ATen op charged its tensor inputs + outputs, views free). Reference: every op it
  runs. Fused backends (torch, triton, xformers): the inputs + outputs of the custom ops
  (``transkd_fast::efficient_attention`` and its backward), i.e. the I/O floor of a fused
  kernel; the torch backend's SDPA may move more inside.
- ``peak_bytes``: memory allocated during one call above what was live before it. CUDA:
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the running
  sum of the allocation/free events that ``torch.profiler`` (``profile_memory=True``)
  records for PyTorch's CPU allocator, maximum over the call (a separate, untimed run).
  For forward + backward the input gradients are part of the peak.

Run: ``pytest benchmarks/test_attention.py --benchmark-only``.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from transkd_fast import traffic
from transkd_fast.backend import BackendError, resolve
from transkd_fast.ops.attention import efficient_attention, efficient_attention_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
BATCH = 2 if CUDA else 1
DTYPES = (torch.bfloat16, torch.float32) if CUDA else (torch.float32,)
BACKENDS = ("reference", "torch", "triton", "xformers", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient")
SDPA_KERNELS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                "sdpa-efficient": "EFFICIENT_ATTENTION"}
STAGES = ((32768, 512, 1), (8192, 512, 2), (2048, 512, 5), (512, 512, 8))
SHAPES = {f"{net}-s{i + 1}": (BATCH, nq, nkv, h, d)
          for net, d in (("B0", 32), ("B2", 64)) for i, (nq, nkv, h) in enumerate(STAGES)}
REF_LIMIT = 2 << 30  # skip the reference when its Nq×Nkv intermediates would pass 2 GiB


def _inputs(shape, dtype, device=DEVICE, requires_grad=False):
    B, Nq, Nkv, H, D = shape
    C = H * D
    q_lin = torch.randn(B, Nq, C, device=device, dtype=dtype, requires_grad=requires_grad)
    kv_lin = torch.randn(B, Nkv, 2 * C, device=device, dtype=dtype, requires_grad=requires_grad)
    kv = kv_lin.view(B, Nkv, 2, H, D)
    return q_lin.view(B, Nq, H, D), kv[:, :, 0], kv[:, :, 1], (q_lin, kv_lin)


def _reference_bytes_needed(shape) -> int:
    B, Nq, Nkv, H, _ = shape
    return 4 * B * H * Nq * Nkv * 4  # S, P and their gradients in fp32


_BYTES: dict = {}


def _modeled_bytes(shape, dtype, mode) -> dict:
    """Bytes moved per call, counted on fake tensors (no data)."""
    key = (shape, dtype, mode)
    if key not in _BYTES:
        with traffic._fake():
            q, k, v, leaves = _inputs(shape, dtype, device="cpu", requires_grad=(mode == "fwd+bwd"))

            def call(fn):
                out = fn()
                if mode == "fwd+bwd":
                    out.backward(torch.ones_like(out))

            ref, _ = traffic.count_bytes(lambda: call(lambda: efficient_attention_reference(q, k, v)))
            fused, _ = traffic.count_bytes(
                lambda: call(lambda: torch.ops.transkd_fast.efficient_attention(q, k, v, q.shape[-1] ** -0.5,
                                                                                "torch")[0]),
                only=traffic._custom)
        _BYTES[key] = {"reference": ref, "fused_io": fused}
    return _BYTES[key]


def _attention_call(backend: str) -> Callable:
    """(q, k, v) → [B, Nq, H, D]: our op with ``backend``, or one SDPA kernel forced."""
    if backend not in SDPA_KERNELS:
        return lambda q, k, v: efficient_attention(q, k, v, backend=backend)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = getattr(SDPBackend, SDPA_KERNELS[backend])

    def call(q, k, v):
        with sdpa_kernel(kernel):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                                                  ).transpose(1, 2)
    return call


def _peak_bytes(fn: Callable[[], None]) -> int:
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_efficient_attention(benchmark, backend, shape, dtype, mode):
    if backend in ("triton", "xformers") and not CUDA:
        pytest.skip(f"{backend} benchmarks need CUDA (the Triton interpreter is not a benchmark)")
    if backend in SDPA_KERNELS and not CUDA:
        pytest.skip(f"{backend} is a CUDA kernel of PyTorch's SDPA (the CPU has one fused kernel: backend 'torch')")
    if backend == "reference" and _reference_bytes_needed(shape) > REF_LIMIT:
        pytest.skip("reference would need > 2 GiB of Nq×Nkv intermediates")
    train = mode == "fwd+bwd"
    q, k, v, leaves = _inputs(shape, dtype, requires_grad=train)
    attention = _attention_call(backend)
    if backend not in SDPA_KERNELS:
        try:
            resolve("efficient_attention", q, k, v, backend=backend)
        except BackendError as e:
            pytest.skip(str(e))
    B, Nq, Nkv, H, D = shape
    do = torch.randn(B, Nq, H, D, device=DEVICE, dtype=dtype)
    sync = torch.cuda.synchronize if CUDA else (lambda: None)

    def run():
        if train:
            for t in leaves:
                t.grad = None
            attention(q, k, v).backward(do)
        else:
            with torch.no_grad():
                attention(q, k, v)
        sync()

    try:  # warm-up (autotuning on CUDA) outside the peak-memory and timed runs
        run()
    except RuntimeError as e:  # each SDPA kernel has its own dtype / head dim / architecture limits
        if backend not in SDPA_KERNELS:
            raise
        pytest.skip(f"{backend} refuses this case: {str(e).splitlines()[0][:200]}")
    peak = _peak_bytes(run)
    flops = 4 * B * H * Nq * Nkv * D * (3 if train else 1)
    bytes_ = _modeled_bytes(shape, dtype, mode)
    benchmark.extra_info.update({
        "op": "efficient_attention", "mode": mode, "backend": backend,
        "shape_q": [B, Nq, H, D], "shape_kv": [B, Nkv, H, D], "layout": "strided views of q / fused kv Linear",
        "dtype": str(dtype).replace("torch.", ""), "device": str(DEVICE), "flops": flops,
        "bytes_modeled": bytes_["reference" if backend == "reference" else "fused_io"],
        "bytes_reference": bytes_["reference"], "bytes_fused_io": bytes_["fused_io"],
        "peak_bytes": peak,
        "peak_method": "cuda max_memory_allocated" if CUDA else "torch.profiler CPU allocator events",
    })
    rounds = 20 if CUDA else (3 if Nq * H * D <= 8192 * 64 else 2)
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    if train:
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
