"""Scaffolding shared by the multi-stage loss benchmarks (``test_hcl.py``, ``test_weighted_mse.py``).

Both time one forward + backward of a loss over four stages whose student-side tensors need
grad and whose teacher-side tensors do not, and record the bytes each backend moves, counted
on fake tensors (no data) with :func:`transkd_fast.traffic.count_bytes`.
"""

from __future__ import annotations

from typing import Callable

import torch

from transkd_fast import traffic

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.bfloat16) if DEVICE.type == "cuda" else (torch.float32,)


def stage_inputs(shapes, dtype, device=DEVICE):
    """``(xs, ys)``: per shape a fresh random tensor needing grad and a target that does not."""
    xs = [torch.randn(s, device=device).to(dtype).requires_grad_() for s in shapes]
    ys = [(0.5 * torch.randn(s, device=device) + 0.1).to(dtype) for s in shapes]
    return xs, ys


def modeled_bytes(shapes, dtype, reference: Callable, fused: Callable, internals: Callable) -> dict:
    """Bytes moved by one forward + backward of each backend, on fake tensors.

    ``reference(xs, ys)`` and ``fused(xs, ys)`` return the loss (autograd runs the backward);
    ``internals(xs, ys)`` runs the torch backend's forward and backward functions directly
    (without autograd) so that only their own ATen ops are counted. ``fused`` is counted at
    its custom ops' inputs and outputs (what the triton kernels must move).
    """
    with traffic._fake():
        xs, ys = stage_inputs(shapes, dtype, device="cpu")

        def step(fn):
            for t in xs:
                t.grad = None
            fn(xs, ys).backward()

        ref, _ = traffic.count_bytes(lambda: step(reference))
        fused_io, _ = traffic.count_bytes(lambda: step(fused), only=traffic._custom)
        with torch.no_grad():
            eager, _ = traffic.count_bytes(lambda: internals(xs, ys))
    return {"reference": ref, "torch": eager, "triton": fused_io}


def time_fwd_bwd(benchmark, xs, loss: Callable[[], torch.Tensor]) -> None:
    """Time ``loss().backward()`` (grads of ``xs`` cleared each round), then check the grads."""
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def run():
        for t in xs:
            t.grad = None
        loss().backward()
        sync()

    benchmark.pedantic(run, rounds=20 if DEVICE.type == "cuda" else 3, iterations=1, warmup_rounds=1)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in xs)
