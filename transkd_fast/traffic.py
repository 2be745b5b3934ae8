"""Memory-traffic model of the fused ops: the honest stand-in for GPU timings (no GPU here).

For each fused op at a TransKD training shape (paper recipe: batch 2, 512×1024, B2 → B0):

- **reference bytes**: what the eager reference moves, measured — every ATen op it runs is
  seen by a ``TorchDispatchMode`` and charged the bytes of its tensor inputs plus its tensor
  outputs (:func:`count_bytes`). Forward alone, and forward + backward (autograd's ops).
- **fused bytes**: what our kernels must move: the inputs and outputs of the custom ops
  ``transkd_fast::*`` (forward op; + backward op for fwd+bwd), measured the same way but
  charging only those ops (one custom op = one kernel launch over its arguments).
- **MODELED time floor** on an H100 SXM (3.35 TB/s HBM3): bytes / bandwidth. It ignores
  caches (L2 may serve re-reads of small tensors) and compute; it is a lower bound for a
  memory-bound op, not a measurement.

Conventions of the byte count: views (``view``, ``transpose``, ``expand``... ops whose outputs
alias an input without writing it) move nothing; a tensor's bytes are its elements with
distinct addresses (stride-0 broadcast dimensions count once) times the element size; an
in-place op is charged its inputs and its (aliased) output, i.e. a read and a write.
Everything runs on fake tensors (``FakeTensorMode``): no data is allocated or computed, so
full-size shapes cost nothing.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

H100_BANDWIDTH = 3.35e12  # bytes/s, H100 SXM HBM3 (MODELED floors only)

# Ops that never move data even though their schema does not say "view".
_FREE = {"aten._unsafe_view.default", "aten.detach.default", "aten.lift_fresh.default", "aten.alias.default"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements ``t`` addresses (stride-0 dimensions count once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    if t.numel() == 0:
        n = 0
    return n * t.element_size()


def _is_view(func) -> bool:
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


@dataclass
class OpRecord:
    name: str
    bytes_in: int
    bytes_out: int

    @property
    def bytes(self) -> int:
        return self.bytes_in + self.bytes_out


class ByteCounter(TorchDispatchMode):
    """Charges each dispatched op the bytes of its tensor inputs and outputs.

    ``only``: a predicate on the op's name (e.g. ``lambda n: n.startswith("transkd_fast.")``);
    ops it rejects are still run but not charged. Ops nested inside a charged op (a custom
    op's implementation) are not seen: the mode is off while an op runs.
    """

    def __init__(self, only: Optional[Callable[[str], bool]] = None):
        super().__init__()
        self.only = only
        self.records: list[OpRecord] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        if name.startswith("prim.") or name in _FREE or _is_view(func):
            return out
        if self.only is not None and not self.only(name):
            return out
        ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        self.records.append(OpRecord(name, sum(map(tensor_bytes, ins)), sum(map(tensor_bytes, outs))))
        return out

    @property
    def total(self) -> int:
        return sum(r.bytes for r in self.records)


def count_bytes(fn: Callable[[], Any], only: Optional[Callable[[str], bool]] = None) -> tuple[int, list[OpRecord]]:
    """Run ``fn()`` under a :class:`ByteCounter`; returns (total bytes, per-op records)."""
    with ByteCounter(only) as c:
        fn()
    return c.total, c.records


def _custom(name: str) -> bool:
    return name.startswith("transkd_fast.")


@contextlib.contextmanager
def _fake() -> Iterator[Any]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        yield mode


# ---------------------------------------------------------------------------------------
# The ops and their shapes.


@dataclass
class TrafficCase:
    """One op at one shape.

    ``make()`` returns the input tensors (the ones that need grad flagged);
    ``reference(*inputs)`` runs the eager reference; ``fused(*inputs)`` calls the custom op(s)
    with the ``triton`` backend (fake tensors run the ops' fake implementations, so no kernel
    runs and any backend name is accepted). Both return a tensor (or a tuple, first = output)."""

    op: str
    shape: str
    make: Callable[[], tuple]
    reference: Callable[..., Any]
    fused: Callable[..., Any]
    note: str = ""


@dataclass
class TrafficRow:
    op: str
    shape: str
    dtype: str
    ref_fwd: int
    fused_fwd: int
    ref_fwdbwd: Optional[int]
    fused_fwdbwd: Optional[int]
    note: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        for k in ("ref_fwd", "fused_fwd", "ref_fwdbwd", "fused_fwdbwd"):
            d[k + "_us_h100_modeled"] = None if d[k] is None else d[k] / H100_BANDWIDTH * 1e6
        return d


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _backward(out) -> None:
    y = _first(out)
    y.backward(torch.ones_like(y) if y.dim() == 0 else torch.randn_like(y))


def measure(case: TrafficCase) -> tuple[int, int, Optional[int], Optional[int]]:
    """(reference fwd, fused fwd, reference fwd+bwd, fused fwd+bwd) bytes for ``case``."""
    with _fake():
        inputs = case.make()
        nograd = [t.detach() for t in inputs]
        ref_fwd, _ = count_bytes(lambda: case.reference(*nograd))
        fused_fwd, _ = count_bytes(lambda: case.fused(*nograd), only=_custom)
        if not any(t.requires_grad for t in inputs):
            return ref_fwd, fused_fwd, None, None
        results = []
        for fn, only in ((case.reference, None), (case.fused, _custom)):
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
            out = fn(*leaves)
            y = _first(out)
            grad = torch.ones_like(y) if y.dim() == 0 else torch.randn_like(y)  # made outside the counter

            def step(fn=fn, leaves=leaves, grad=grad):
                o = _first(fn(*leaves))
                o.backward(grad)

            results.append(count_bytes(step, only=only)[0])
        return ref_fwd, fused_fwd, results[0], results[1]


def default_cases(dtype: torch.dtype = torch.float32, batch: int = 2, image: Sequence[int] = (512, 1024)) -> list:
    """The fused ops at the shapes of one TransKD-Base step (teacher B2, student B0)."""
    H, W = image
    h1, w1 = H // 4, W // 4
    cases: list[TrafficCase] = []
    ops = torch.ops.transkd_fast

    def rnd(*shape, grad=True):
        return torch.randn(*shape, dtype=dtype).requires_grad_(grad)

    from transkd_fast.ops import attention as att

    for label, heads, d in (("B0 stage 1", 1, 32), ("B2 stage 1", 1, 64), ("B2 stage 3", 5, 64)):
        n = h1 * w1 if "stage 1" in label else (h1 // 4) * (w1 // 4)
        nkv = (h1 // 8) * (w1 // 8)
        cases.append(TrafficCase(
            "efficient_attention", f"{label}: q [{batch},{n},{heads},{d}], k/v [{batch},{nkv},{heads},{d}]",
            (lambda n=n, nkv=nkv, heads=heads, d=d: (rnd(batch, n, heads, d), rnd(batch, nkv, heads, d),
                                                     rnd(batch, nkv, heads, d))),
            lambda q, k, v: att.efficient_attention_reference(q, k, v),
            lambda q, k, v: ops.efficient_attention(q, k, v, q.shape[-1] ** -0.5, "triton")))

    try:
        from transkd_fast.ops import selective_fusion as sf
    except ImportError:
        sf = None
    if sf is not None:
        mid = 64
        shape = f"x [{batch},{mid},{h1},{w1}], y_low [{batch},{mid},{h1 // 2},{w1 // 2}]"
        cases.append(TrafficCase(
            "selective_pool", "CSF stage 1: " + shape,
            lambda: (rnd(batch, mid, h1, w1), rnd(batch, mid, h1 // 2, w1 // 2)),
            sf.selective_pool_reference, lambda x, y: ops.selective_pool(x, y, "triton")))
        cases.append(TrafficCase(
            "selective_fuse", "CSF stage 1: " + shape + f", a [{batch},2,{mid}]",
            lambda: (rnd(batch, mid, h1, w1), rnd(batch, mid, h1 // 2, w1 // 2), rnd(batch, 2, mid)),
            sf.selective_fuse_reference, lambda x, y, a: ops.selective_fuse(x, y, a, "triton")))

    cases += _loss_cases(dtype, batch, h1, w1, rnd)
    return cases


def _loss_cases(dtype, batch, h1, w1, rnd) -> list:
    cases = []
    ops = torch.ops.transkd_fast
    try:
        from transkd_fast.ops import kl_div as kl
    except ImportError:
        kl = None
    if kl is not None:
        for mode in ("spatial", "channel"):
            cases.append(TrafficCase(
                "kd_kl_div", f"{mode}: logits [{batch},20,{h1},{w1}] (teacher detached)",
                lambda: (rnd(batch, 20, h1, w1), rnd(batch, 20, h1, w1, grad=False)),
                lambda s, t, mode=mode: kl.kd_kl_div_reference(s, t, 1.0, mode),
                lambda s, t, mode=mode: ops.kd_kl_div(s, t, 1.0, mode, s.requires_grad, "triton")))
    # TransKD-Base, B0 -> B2 widths: CSF outputs / PEA outputs per stage.
    t_dims = (64, 128, 320, 512)
    sizes = [(h1 >> i, w1 >> i) for i in range(4)]
    try:
        from transkd_fast.ops import hcl
    except ImportError:
        hcl = None
    if hcl is not None:
        shapes = [(batch, c, h, w) for c, (h, w) in zip(t_dims, sizes)]
        cases.append(TrafficCase(
            "hcl_loss", "4 stages: " + ", ".join(f"[{','.join(map(str, s))}]" for s in shapes) + " (teacher detached)",
            lambda: tuple(rnd(*s) for s in shapes) + tuple(rnd(*s, grad=False) for s in shapes),
            lambda *t: hcl.hcl_loss_reference(list(t[:4]), list(t[4:])),
            lambda *t: ops.hcl_loss(list(t[:4]), list(t[4:]), "triton")))
    try:
        wm = importlib.import_module("transkd_fast.ops.weighted_mse")
    except ImportError:
        wm = None
    if wm is not None:
        shapes = [(batch, h * w, c) for c, (h, w) in zip(t_dims, sizes)]
        weights = [0.1, 0.1, 0.5, 1.0]
        cases.append(TrafficCase(
            "weighted_mse",
            "4 stages: " + ", ".join(f"[{','.join(map(str, s))}]" for s in shapes) + " (targets detached)",
            lambda: tuple(rnd(*s) for s in shapes) + tuple(rnd(*s, grad=False) for s in shapes),
            lambda *t: wm.weighted_mse_reference(list(t[:4]), list(t[4:]), weights),
            lambda *t: ops.weighted_mse(list(t[:4]), list(t[4:]), weights, "triton")))
    return cases


def traffic_table(dtype: torch.dtype = torch.float32, cases: Optional[Sequence[TrafficCase]] = None) -> list[dict]:
    """Measured bytes and MODELED H100 floors for every case, as dicts (see :class:`TrafficRow`)."""
    rows = []
    for case in cases if cases is not None else default_cases(dtype):
        rf, ff, rb, fb = measure(case)
        rows.append(TrafficRow(case.op, case.shape, str(dtype).replace("torch.", ""), rf, ff, rb, fb,
                               case.note).as_dict())
    return rows


def _mb(b: Optional[int]) -> str:
    return "–" if b is None else f"{b / 1e6:.1f}"


def _us(b: Optional[int]) -> str:
    return "–" if b is None else f"{b / H100_BANDWIDTH * 1e6:.1f}"


def _ratio(a: Optional[int], b: Optional[int]) -> str:
    return "–" if a is None or not b else f"{a / b:.1f}×"


def markdown(rows: Sequence[dict]) -> str:
    """The table: MB moved (measured on fake tensors) and MODELED H100 floors (µs at 3.35 TB/s)."""
    lines = [
        "Memory traffic of the fused ops vs their eager references (bytes: measured with a TorchDispatchMode "
        "over every ATen op, views free; fused = the custom ops' inputs + outputs).",
        "Time columns are MODELED lower bounds on an H100 (bytes / 3.35 TB/s), not measurements: no GPU here.",
        "",
        "| op | shape | dtype | ref fwd MB | fused fwd MB | ratio | ref fwd+bwd MB | fused fwd+bwd MB | ratio | "
        "MODELED H100 µs ref fwd / fused fwd | MODELED H100 µs ref fwd+bwd / fused fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['dtype']} | {_mb(r['ref_fwd'])} | {_mb(r['fused_fwd'])} | "
            f"{_ratio(r['ref_fwd'], r['fused_fwd'])} | {_mb(r['ref_fwdbwd'])} | {_mb(r['fused_fwdbwd'])} | "
            f"{_ratio(r['ref_fwdbwd'], r['fused_fwdbwd'])} | {_us(r['ref_fwd'])} / {_us(r['fused_fwd'])} | "
            f"{_us(r['ref_fwdbwd'])} / {_us(r['fused_fwdbwd'])} |")
    return "\n".join(lines) + "\n"
