"""FLOPs, parameters and measured throughput (fvcore), in the paper's two conventions.

fvcore traces the model with ``torch.jit`` and counts **one multiply-add as one FLOP**
(convolutions, Linear/matmul, norms, interpolation and adaptive pooling; elementwise ops,
softmax and activations count zero). This module adds handles for our custom ops so a
model on the default backend counts exactly what the same model on the ``reference``
backend (plain ATen) counts:

- ``transkd_fast::efficient_attention`` (q ``[B,Nq,H,D]``, k/v ``[B,Nkv,H,D]``): the two
  matmuls ``q kᵀ`` and ``P v`` = ``2·B·H·Nq·Nkv·D``; ``aten::scaled_dot_product_attention``
  (``[B,H,N,D]``, HF's default path) counts the same;
- the selective-fusion and loss ops count what their references' ATen ops count
  (``upsample_nearest2d``: one per output element, ``adaptive_avg_pool2d``: one per input
  element; MSE / KL / elementwise math: zero).

Two conventions, always labeled:

- ``full``: every multiply-add fvcore sees, attention matmuls included;
- ``paper``: the attention matmuls left out, as the counter of the TransKD paper did
  (its zoo table: 113.84 / 13.67 / 16.47 / 16.80 / 17.84 GFLOPs). On the default backend
  the attention op's handle returns 0; on the reference backend (or HF's eager attention)
  a ``matmul``/``bmm`` node counts 0 when the Python stack recorded by the tracer passes
  through an attention function (:data:`ATTENTION_FRAMES`) — exact, not a heuristic on
  shapes or module names.

Counts are taken in eval mode (BatchNorm counts 2 per element with affine, as the original
code's numbers show) at batch 1 unless the caller says otherwise.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

CONVENTIONS = ("full", "paper")

# (file suffix, function name) pairs: a matmul traced inside one of these is an attention matmul.
ATTENTION_FRAMES: list[tuple[str, str]] = [
    ("transkd_fast/ops/attention.py", "efficient_attention_reference"),
    ("models/segformer/modeling_segformer.py", "eager_attention_forward"),
    ("transformers/integrations/sdpa_attention.py", "sdpa_attention_forward"),
    ("transkd_fast/models/lvt.py", "csa_aggregate"),  # LVT's CSA: window attention weights @ values
]

_FRAME = re.compile(r"^(.*)\((\d+)\): (\S+)$")


def _shape(v) -> Optional[list[int]]:
    t = v.type()
    if t.kind() == "TensorType":
        return t.sizes()
    return None


def _prod(xs: Iterable[int]) -> int:
    return math.prod(int(x) for x in xs)


def traced_in_attention(node) -> bool:
    """True when the tracer's recorded Python stack of ``node`` passes through an attention function."""
    try:
        src = repr(node.sourceRange())
    except Exception:  # no source information recorded
        return False
    for line in src.replace("\\n", "\n").strip("'").splitlines():
        m = _FRAME.match(line.strip())
        if not m:
            continue
        path, func = m.group(1).replace("\\", "/"), m.group(3)
        for suffix, name in ATTENTION_FRAMES:
            if func == name and path.endswith(suffix):
                return True
    return False


# ---------------------------------------------------------------------------------------
# Handles. fvcore calls handle(inputs, outputs) with the traced graph's Values.


def attention_flops(B: int, Nq: int, Nkv: int, H: int, D: int) -> int:
    """Multiply-adds of ``q kᵀ`` and ``P v``: ``2·B·H·Nq·Nkv·D``."""
    return 2 * B * H * Nq * Nkv * D


# Attention multiply-adds go under their own key so one trace gives both conventions:
# full = total, paper = total − by_operator()[ATTENTION_KEY].
ATTENTION_KEY = "attention_matmul"


def _efficient_attention_handle(inputs, outputs):
    B, Nq, H, D = _shape(inputs[0])
    Nkv = _shape(inputs[1])[1]
    return Counter({ATTENTION_KEY: attention_flops(B, Nq, Nkv, H, D)})


def _sdpa_handle(inputs, outputs):
    q, k = _shape(inputs[0]), _shape(inputs[1])
    *batch, Nq, D = q
    return Counter({ATTENTION_KEY: 2 * _prod(batch) * Nq * k[-2] * D})


def matmul_flops(a: Sequence[int], b: Sequence[int]) -> int:
    """Multiply-adds of ``torch.matmul`` on shapes ``a`` and ``b`` (1-D operands and
    broadcast batch dimensions as torch defines them; fvcore's own handle drops both)."""
    a, b = list(a), list(b)
    if len(a) == 1:
        a = [1] + a
    if len(b) == 1:
        b = b + [1]
    M, K, N = a[-2], a[-1], b[-1]
    if b[-2] != K:
        raise ValueError(f"matmul shapes {a} and {b} do not match")
    batch = torch.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
    return _prod(batch) * M * K * N


def _matmul_handle(name: str):
    def handle(inputs, outputs):
        n = matmul_flops(_shape(inputs[0]), _shape(inputs[1]))
        return Counter({ATTENTION_KEY if traced_in_attention(outputs[0].node()) else name: n})
    return handle


def _zero(inputs, outputs):
    return 0


def custom_op_handles() -> dict[str, Callable]:
    """fvcore handles for our custom ops, SDPA and (attention-aware) matmuls."""
    handles: dict[str, Callable] = {
        "transkd_fast::efficient_attention": _efficient_attention_handle,
        "aten::scaled_dot_product_attention": _sdpa_handle,
        "aten::matmul": _matmul_handle("matmul"),
        "aten::mm": _matmul_handle("matmul"),
        "aten::bmm": _matmul_handle("bmm"),
    }
    handles.update(_EXTRA)
    return handles


# Per-op handles registered by name; filled below once we know each op's schema.
_EXTRA: dict[str, Callable] = {}


def register_flop_handle(op_name: str, handle: Callable) -> None:
    """Add an fvcore handle for ``op_name`` (e.g. ``"transkd_fast::selective_pool"``)."""
    _EXTRA[op_name] = handle


def _numel(v) -> int:
    s = _shape(v)
    return _prod(s) if s is not None else 0


def _numel_first(inputs, outputs):
    return _numel(inputs[0])


# The reference upsamples y_low to x's size in each op (upsample_nearest2d: one per output
# element); its mean over H×W and the weighted sum count zero.
register_flop_handle("transkd_fast::selective_pool", _numel_first)
register_flop_handle("transkd_fast::selective_fuse", _numel_first)
# The KL reference is log-softmax and elementwise math: zero under fvcore's convention.
register_flop_handle("transkd_fast::kd_kl_div", _zero)
register_flop_handle("transkd_fast::weighted_mse", _zero)


def _list_shapes(v) -> list[list[int]]:
    """Shapes of the tensors of a traced ``Tensor[]`` argument (a ``prim::ListConstruct``)."""
    node = v.node()
    if node.kind() != "prim::ListConstruct":
        raise ValueError(f"cannot read the shapes of a {node.kind()} list")
    return [_shape(i) for i in node.inputs()]


def hcl_flops(shapes: Sequence[Sequence[int]]) -> int:
    """What fvcore counts for the HCL reference: ``adaptive_avg_pool2d`` of fs and ft (one per
    input element) at each level l in (4, 2, 1) with l < H; MSEs count zero."""
    return sum(2 * _prod(s) * sum(1 for lv in (4, 2, 1) if lv < s[2]) for s in shapes)


register_flop_handle("transkd_fast::hcl_loss", lambda inputs, outputs: hcl_flops(_list_shapes(inputs[0])))


# ---------------------------------------------------------------------------------------
# Counting.


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[nn.Module]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, t in modes.items():
            m.train(t)


def flop_analysis(model: nn.Module, inputs: Any):
    """An fvcore ``FlopCountAnalysis`` of ``model(*inputs)`` with our handles, warnings off.

    Attention multiply-adds are under ``by_operator()[ATTENTION_KEY]``."""
    from fvcore.nn import FlopCountAnalysis

    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    fa = FlopCountAnalysis(model, tuple(inputs))
    fa.set_op_handle(**custom_op_handles())
    fa.unsupported_ops_warnings(False)
    fa.uncalled_modules_warnings(False)
    fa.tracer_warnings("none")
    return fa


@dataclass
class FlopCount:
    """One trace's count: ``full`` (every multiply-add) and ``paper`` (attention matmuls left out)."""

    full: int
    attention: int
    by_operator: dict[str, int]
    unsupported: dict[str, int]

    @property
    def paper(self) -> int:
        return self.full - self.attention

    def __getitem__(self, convention: str) -> int:
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        return self.full if convention == "full" else self.paper

    def __add__(self, other: "FlopCount") -> "FlopCount":
        ops = Counter(self.by_operator)
        ops.update(other.by_operator)
        uns = Counter(self.unsupported)
        uns.update(other.unsupported)
        return FlopCount(self.full + other.full, self.attention + other.attention, dict(ops), dict(uns))


def analyze(model: nn.Module, inputs: Any) -> FlopCount:
    """Trace ``model(*inputs)`` once (eval mode, no grad) and count both conventions."""
    with _eval(model), torch.no_grad():
        fa = flop_analysis(model, inputs)
        ops = dict(fa.by_operator())
        return FlopCount(full=int(fa.total()), attention=int(ops.get(ATTENTION_KEY, 0)), by_operator=ops,
                         unsupported=dict(fa.unsupported_ops()))


def count_flops(model: nn.Module, inputs: Any, convention: str = "full") -> int:
    """fvcore FLOPs (one multiply-add = one FLOP) of ``model(*inputs)`` in eval mode.

    ``convention``: ``"full"`` (every multiply-add) or ``"paper"`` (without the attention matmuls).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    return analyze(model, inputs)[convention]


def unsupported_custom_ops(model: nn.Module, inputs: Any) -> dict[str, int]:
    """Our custom ops (``transkd_fast::*``) that fvcore met but could not count (should be empty)."""
    return {k: v for k, v in analyze(model, inputs).unsupported.items() if k.startswith("transkd_fast::")}


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors once)."""
    seen, n = set(), 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n


def measure_throughput(model: nn.Module, inputs: Any, warmup: int = 1, min_iters: int = 3,
                       min_seconds: float = 1.0, max_iters: int = 50) -> dict:
    """Median seconds per forward (inference mode) after ``warmup`` runs, and images/s."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    batch = inputs[0].shape[0]
    sync = torch.cuda.synchronize if inputs[0].is_cuda else (lambda: None)
    times = []
    with _eval(model), torch.inference_mode():
        for _ in range(warmup):
            model(*inputs)
        sync()
        start = time.perf_counter()
        while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < min_seconds):
            t0 = time.perf_counter()
            model(*inputs)
            sync()
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    return {"seconds": med, "images_per_s": batch / med, "iters": len(times)}


@dataclass
class FlopReport:
    """One model at one input size. FLOPs are fvcore's (one multiply-add = one FLOP)."""

    name: str
    input_size: tuple[int, ...]
    params: int
    flops_full: int
    flops_paper: int
    device: str = "cpu"
    backend: str = ""
    images_per_s: Optional[float] = None
    seconds: Optional[float] = None
    extra: dict = field(default_factory=dict)

    @property
    def gflops_per_s(self) -> Optional[float]:
        """Achieved GFLOP/s, full convention (what the device actually computed)."""
        if self.images_per_s is None:
            return None
        return self.flops_full / self.input_size[0] * self.images_per_s / 1e9 if self.input_size else None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["gflops_per_s"] = self.gflops_per_s
        return d

    def lines(self) -> list[str]:
        out = [
            f"{self.name}  input {'x'.join(map(str, self.input_size))}  device {self.device}  backend {self.backend}",
            f"  params            {self.params / 1e6:.2f} M",
            f"  GFLOPs full       {self.flops_full / 1e9:.2f}   (every multiply-add, attention matmuls included)",
            f"  GFLOPs paper      {self.flops_paper / 1e9:.2f}   (attention matmuls left out, as the paper counted)",
        ]
        for k, v in self.extra.items():
            out.append(f"  {k:17s} {v}")
        if self.images_per_s is not None:
            out.append(f"  throughput        {self.images_per_s:.3f} images/s ({self.seconds * 1e3:.1f} ms/batch), "
                       f"{self.gflops_per_s:.1f} GFLOP/s achieved (full count, measured after warm-up)")
        return out


def report(model: nn.Module, input_size: Sequence[int] = (512, 1024), batch: int = 1, name: str = "",
           throughput: bool = True, device: Optional[torch.device] = None, forward: Optional[nn.Module] = None,
           params_of: Optional[nn.Module] = None, **throughput_kw) -> FlopReport:
    """Params, FLOPs in both conventions, and (optionally) measured throughput of ``model``.

    ``input_size`` is ``(H, W)`` (3 channels) or a full ``(B, C, H, W)``. ``forward`` is the
    module traced and timed (default ``model``); ``params_of`` the module whose parameters are
    counted (default ``model``).
    """
    import transkd_fast

    size = tuple(int(s) for s in input_size)
    if len(size) == 2:
        size = (batch, 3, *size)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    fwd = forward if forward is not None else model
    x = torch.randn(size, device=device)
    flops = analyze(fwd, x)
    rep = FlopReport(name=name or type(model).__name__, input_size=size,
                     params=count_params(params_of if params_of is not None else model),
                     flops_full=flops.full, flops_paper=flops.paper, device=str(device),
                     backend=transkd_fast.get_backend())
    if throughput:
        t = measure_throughput(fwd, x, **throughput_kw)
        rep.images_per_s, rep.seconds = t["images_per_s"], t["seconds"]
    return rep


# ---------------------------------------------------------------------------------------
# TransKD variants and the model zoo of the paper (design §1).


@contextlib.contextmanager
def original_head(model: nn.Module) -> Iterator[nn.Module]:
    """Run every SegFormer decode head inside ``model`` unfolded (the original computation).

    The folded head (the default) computes the same logits with far fewer multiply-adds; the
    paper's and the original code's counts are of the unfolded head."""
    heads = [m for m in model.modules() if hasattr(m, "fold") and hasattr(m, "linear_fuse")]
    saved = [h.fold for h in heads]
    for h in heads:
        h.fold = False
    try:
        yield model
    finally:
        for h, f in zip(heads, saved):
            h.fold = f


class KDModulesForward(nn.Module):
    """The KD modules of a TransKD distiller on given student outputs, for counting.

    ``forward(images, f1..f4, e1..e4)`` runs CSF on the stage maps and the embedding path
    (GL-Mixer / PEA / EA, per variant) and returns their outputs. The teacher and the losses
    are not part of it: the original code counted the student with its KD modules."""

    def __init__(self, distiller: nn.Module):
        super().__init__()
        self.distiller = distiller

    def forward(self, images: torch.Tensor, *tensors: torch.Tensor):
        n = len(tensors) // 2
        feats, embeds = list(tensors[:n]), list(tensors[n:])
        fused = self.distiller.csf(feats)
        aligned = self.distiller.align_embeddings(images, feats, embeds)
        return tuple(fused) + tuple(aligned)


class StudentKDForward(nn.Module):
    """Student forward (features, logits, embeddings) followed by its KD modules: what the
    original code's FLOP count of a TransKD variant traced (student + CSF + PEA (+ GL / EA))."""

    def __init__(self, distiller: nn.Module):
        super().__init__()
        self.distiller = distiller
        self.kd = KDModulesForward(distiller)

    def forward(self, images: torch.Tensor):
        feats, logits, embeds = self.distiller.student(images, return_features=True)
        return (logits,) + self.kd(images, *feats, *embeds)


def kd_params(distiller: nn.Module) -> int:
    """Student + KD-module parameters (the paper's params column for a TransKD variant)."""
    student = count_params(distiller.student)
    seen = {id(p) for p in distiller.student.parameters()}
    return student + sum(p.numel() for p in distiller.kd_parameters() if id(p) not in seen)


def count_kd(distiller: nn.Module, images: torch.Tensor, student_count: Optional[FlopCount] = None) -> FlopCount:
    """Count student + KD modules (both conventions). With ``student_count`` (of the same
    student at the same input) only the KD modules are traced: fvcore's count is a sum over
    the traced ops, so the two parts add up exactly to the whole forward's count."""
    if student_count is None:
        return analyze(StudentKDForward(distiller), images)
    with _eval(distiller), torch.no_grad():
        feats, _, embeds = distiller.student(images, return_features=True)
    return student_count + analyze(KDModulesForward(distiller), (images, *feats, *embeds))


@dataclass(frozen=True)
class ZooRow:
    """A row of the paper's model zoo (Cityscapes, 512×1024, 20 outputs) and the original code's counts.

    ``None`` where there is no such number: the paper's tables and the original repository's model
    zoo give no LVT row, and the original's TransKD-Base B2 → LVT distiller was not counted."""

    name: str
    key: str
    paper_params_m: Optional[float]
    paper_gflops: Optional[float]
    orig_full: Optional[float]
    orig_paper: Optional[float]


ZOO = (
    ZooRow("Teacher SegFormer-B2", "teacher", 27.36, 113.84, 129.74, 114.17),
    ZooRow("Student SegFormer-B0", "student", 3.72, 13.67, 17.95, 13.78),
    ZooRow("+TransKD-Base", "base", 4.56, 16.47, 20.74, 16.58),
    ZooRow("+TransKD-GL", "gl", 5.22, 16.80, 21.21, 16.92),
    ZooRow("+TransKD-EA", "ea", 5.53, 17.84, 22.13, 17.97),
    # The original's LVT (train/models/lvt/backbone.py, `lvt(rasa_cfg)` as train_student_lvt.py
    # builds it) traced with fvcore, its timm/mmcv/mmseg imports replaced by minimal stand-ins
    # (DropPath, to_2tuple, trunc_normal_, resize = F.interpolate, ConvModule = conv/BN/ReLU):
    # 3,837,176 params, 22.3864 GFLOPs full, 18.2750 without the attention matmuls (RASA's
    # q kᵀ and P v, CSA's weights @ values).
    ZooRow("Student LVT", "lvt", None, None, 22.39, 18.28),
    ZooRow("+TransKD-Base (B2 → LVT)", "lvt_base", None, None, None, None),
)
ZOO_KEYS = tuple(r.key for r in ZOO)


def zoo(input_size: Sequence[int] = (512, 1024), num_classes: int = 20, rows: Sequence[str] = ZOO_KEYS,
        throughput: bool = False, device: str = "cpu") -> list[dict]:
    """Our params and FLOPs (both conventions) for the paper's zoo, beside the paper's numbers.

    Heads are counted unfolded (:func:`original_head`); batch 1, eval mode. Each dict has the
    :class:`ZooRow` fields plus ``params``, ``full``, ``paper`` (and ``images_per_s`` with
    ``throughput``, timed as deployed: folded head, default backend)."""
    from transkd_fast.distill import TransKD
    from transkd_fast.models import build_model

    H, W = (int(s) for s in input_size)
    x = torch.randn(1, 3, H, W, device=device)
    want = set(rows)
    out = []
    student = build_model("segformer_b0", num_classes=num_classes).to(device).eval()
    teacher = build_model("segformer_b2", num_classes=num_classes).to(device).eval()
    lvt = build_model("lvt", num_classes=num_classes).to(device).eval() if want & {"lvt", "lvt_base"} else None
    s_count = lvt_count = None
    for row in ZOO:
        if row.key not in want:
            continue
        if row.key in ("lvt", "lvt_base"):
            with original_head(lvt):
                if lvt_count is None:
                    lvt_count = analyze(lvt, x)
                if row.key == "lvt":
                    c, params, timed = lvt_count, count_params(lvt), lvt
                else:
                    d = TransKD(lvt, teacher, variant="base").to(device).eval()
                    c, params, timed = count_kd(d, x, lvt_count), kd_params(d), StudentKDForward(d)
        elif row.key == "teacher":
            with original_head(teacher):
                c = analyze(teacher, x)
            params, timed = count_params(teacher), teacher
        elif row.key == "student":
            with original_head(student):
                c = s_count = analyze(student, x)
            params, timed = count_params(student), student
        else:
            d = TransKD(student, teacher, variant=row.key).to(device).eval()
            with original_head(student):
                if s_count is None:
                    s_count = analyze(student, x)
                c = count_kd(d, x, s_count)
            params, timed = kd_params(d), StudentKDForward(d)
        r = {**asdict(row), "params": params, "full": c.full, "paper": c.paper,
             "unsupported": {k: v for k, v in c.unsupported.items() if k.startswith("transkd_fast::")}}
        if throughput:
            r["images_per_s"] = measure_throughput(timed, x)["images_per_s"]
        out.append(r)
    return out
