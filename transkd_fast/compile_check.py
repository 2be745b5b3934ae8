"""Launch-faithful ahead-of-time compile check of every Triton kernel, for sm_80 and sm_90, with no GPU.

Hand-written signatures model what we expect to launch, not what launches: at a real launch
Triton's JIT turns an int argument equal to 1 into a ``constexpr`` and gives pointers and ints
divisible by 16 a divisibility hint, so a kernel can pass every interpreter test and fail to
compile on its first CUDA call. This check therefore compiles **recorded launches**:

1. **Op calls.** The real op entry points (``efficient_attention``, ``selective_pool``,
   ``selective_fuse``, ``hcl_loss``, ``kd_kl_div``, ``weighted_mse``) are called, forward and
   backward, at
   - the shapes, strides and storage offsets they receive in a TransKD-Base / GL / EA training
     step (teacher SegFormer-B2, student B0, 512×1024, batch 2 and 1) and in SegFormer-B0
     inference at 1024×2048: each model runs once in fp32 on the CPU with the ``torch``
     backend while every op call's arguments are recorded (:func:`record_op_calls`);
   - the odd sizes of the tests (13×27 maps, Nkv = 1, H = 1, batch 1: :func:`odd_calls`).

   Each recorded call is replayed with fresh tensors of the same shapes, strides and storage
   offsets (so pointers get the hints a launch on the model's views gets) in fp32, fp16 and
   bf16, with 4-D maps both as recorded (channels_last from the models) and contiguous.
2. **Launches.** During the replay the ``triton`` backend takes CPU tensors
   (:func:`transkd_fast.backend.recording_launches`) and ``JITFunction.run`` is intercepted:
   the arguments are bound by Triton's own binder (``create_function_from_signature`` +
   ``JITFunction._pack_args``, the code a launch runs) for a ``GPUTarget`` of each arch, then
   compiled with ``triton.compile``. Nothing runs; outputs stay unwritten. Autotuned kernels
   build every config their pruning keeps (the benchmark is replaced by a stub). Launchers see
   the SM count of the modeled GPU (108 for sm_80 / A100, 132 for sm_90 / H100-H200).
3. **Report.** Per distinct build (kernel, arch, signature, constexprs, hints, warps, stages):
   registers and spill bytes (``ptxas -v`` of the bundled ptxas), shared memory, the global
   load/store widths found in the PTX (``ld.global.v4.b32`` = 128 bits), and the cases that
   launched it. A failure to bind or compile is a row with its error.

Kernels defined while ``TRITON_INTERPRET=1`` cannot be compiled: tests call
:func:`check_in_subprocess`, which runs ``python -m transkd_fast.compile_check`` in a child
process with the interpreter switched off.

CLI: ``python -m transkd_fast.compile_check [--ops hcl ...] [--suites step odd] [--archs 80 90]
[--json F] [--markdown F]`` exits 1 on any compile failure or spill.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

KERNEL_OPS = ("attention", "selective_fusion", "hcl", "kl_div", "weighted_mse")
ARCHS = (80, 90)
SM_COUNT = {80: 108, 90: 132}  # A100; H100 / H200 SXM
DTYPES = ("float32", "float16", "bfloat16")
SUITES = ("step", "odd")

# The public entry point of each op (module attribute names in transkd_fast.ops.<op>).
ENTRY_POINTS = {
    "attention": ("efficient_attention",),
    "selective_fusion": ("selective_pool", "selective_fuse"),
    "hcl": ("hcl_loss",),
    "kl_div": ("kd_kl_div",),
    "weighted_mse": ("weighted_mse",),
}


# ---------------------------------------------------------------------------------------
# Recorded op calls: tensors as (shape, stride, storage offset, dtype, requires_grad).


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple
    stride: tuple
    offset: int
    storage: int  # elements of the underlying storage
    dtype: str
    requires_grad: bool

    @staticmethod
    def of(t) -> "TensorSpec":
        return TensorSpec(tuple(t.shape), tuple(t.stride()), t.storage_offset(),
                          t.untyped_storage().nbytes() // t.element_size(), str(t.dtype).replace("torch.", ""),
                          bool(t.requires_grad))

    def describe(self) -> str:
        return f"{list(self.shape)}{'' if self._contiguous() else ' strides ' + str(list(self.stride))}"

    def _contiguous(self) -> bool:
        expect, acc = [], 1
        for n in reversed(self.shape):
            expect.append(acc)
            acc *= n
        return all(s == e for s, e, n in zip(self.stride, reversed(expect), self.shape) if n != 1)


def _freeze(x):
    import torch

    if isinstance(x, torch.Tensor):
        return TensorSpec.of(x)
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x) if isinstance(x, tuple) else ("__list__", *(_freeze(v) for v in x))
    return x


@dataclass(frozen=True)
class OpCall:
    """One call of an op's public function: ``fn(*args, **kwargs)`` with tensors as specs."""

    op: str
    fn: str
    args: tuple
    kwargs: tuple  # sorted (name, value) pairs
    case: str = field(default="", compare=False)

    def key(self):
        return (self.op, self.fn, self.args, self.kwargs)


def _thaw(x, dtype, layout: str, gen):
    import torch

    if isinstance(x, TensorSpec):
        dt = getattr(torch, x.dtype)
        if dt.is_floating_point and dtype is not None:
            dt = dtype
        shape, stride, offset, storage = x.shape, x.stride, x.offset, x.storage
        if layout == "contiguous" and len(shape) == 4:
            t = torch.empty(shape, dtype=dt)
        else:
            buf = torch.empty(max(storage, offset + 1), dtype=dt)
            t = buf.as_strided(shape, stride, offset)
        if dt.is_floating_point:
            # fresh random data: nothing runs, but host-side code may look at the values
            t.copy_(torch.randn(shape, generator=gen).to(dt))
        if x.requires_grad and dt.is_floating_point:
            t.requires_grad_(True)
        return t
    if isinstance(x, tuple):
        if x and x[0] == "__list__":
            return [_thaw(v, dtype, layout, gen) for v in x[1:]]
        return tuple(_thaw(v, dtype, layout, gen) for v in x)
    return x


def _entry_functions() -> dict[tuple[str, str], Callable]:
    import importlib

    out = {}
    for op, names in ENTRY_POINTS.items():
        mod = importlib.import_module(f"transkd_fast.ops.{op}")
        for n in names:
            out[(op, n)] = getattr(mod, n)
    return out


@contextlib.contextmanager
def record_op_calls(case: str, sink: list) -> Iterator[list]:
    """Record every call of an op's public function made inside the block into ``sink``.

    The functions are replaced, for the block's duration, wherever a ``transkd_fast`` module
    holds them (the models import them by name); the original still runs."""
    funcs = _entry_functions()
    by_id = {id(f): key for key, f in funcs.items()}
    patched = []

    def wrap(key, f):
        def recorder(*args, **kwargs):
            sink.append(OpCall(key[0], key[1], _freeze(args), tuple(sorted((k, _freeze(v)) for k, v in kwargs.items())),
                               case))
            return f(*args, **kwargs)
        return recorder

    wrappers = {key: wrap(key, f) for key, f in funcs.items()}
    for name, mod in list(sys.modules.items()):
        if not name.startswith("transkd_fast") or mod is None:
            continue
        for attr, val in list(vars(mod).items()):
            key = by_id.get(id(val))
            if key is not None:
                setattr(mod, attr, wrappers[key])
                patched.append((mod, attr, val))
    try:
        yield sink
    finally:
        for mod, attr, val in patched:
            setattr(mod, attr, val)


class _CudnnConvLayouts:
    """A dispatch mode for the meta run: 4-D convolutions (and their backward) return channels_last
    when the input or the weight is channels_last, as cuDNN does on CUDA. The meta kernels follow
    the CPU rule (the input only), which would record contiguous CSF/HCL maps that a GPU never sees."""

    def __new__(cls):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if func is torch.ops.aten.convolution.default:
                    x, w = args[0], args[1]
                    if x.dim() == 4 and (_cl(x) or _cl(w)):
                        return out.contiguous(memory_format=torch.channels_last)
                elif func is torch.ops.aten.convolution_backward.default:
                    x, w = args[1], args[2]
                    if x.dim() == 4 and (_cl(x) or _cl(w)):
                        return tuple(o.contiguous(memory_format=torch.channels_last)
                                     if o is not None and o.dim() == 4 else o for o in out)
                return out

        def _cl(t):
            return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)

        return Mode()


def step_calls(batches: Sequence[int] = (2, 1), size: tuple[int, int] = (512, 1024),
               infer_size: tuple[int, int] = (1024, 2048)) -> list[OpCall]:
    """Op calls of a TransKD-Base / GL / EA step (B2 → B0), of the logit-KD and CWD baselines'
    steps (the KL kernels) and of B0 inference, recorded from the models themselves.

    The models run on the ``meta`` device with the ``triton`` backend: every shape, stride and
    storage offset is what the CUDA code path computes (the CPU-only oneDNN paths step aside
    off the CPU), op outputs come from the custom ops' fake kernels, and nothing is computed,
    so full-size steps cost seconds."""
    import torch

    import transkd_fast
    from transkd_fast import backend
    from transkd_fast.distill import TransKD
    from transkd_fast.distill.baselines import CWD, LogitKD
    from transkd_fast.models import build_model

    calls: list[OpCall] = []
    meta = torch.device("meta")
    with torch.device(meta):
        teacher = build_model("segformer_b2", num_classes=20).eval()
    H, W = size
    with transkd_fast.use_backend("triton"), backend.recording_launches(), _CudnnConvLayouts():
        for variant in ("base", "gl", "ea"):
            with torch.device(meta):
                student = build_model("segformer_b0", num_classes=20)
                kd = TransKD(student, teacher, variant=variant).train()
            for b in batches:
                images = torch.empty(b, 3, H, W, device=meta)
                labels = torch.empty(b, H // 4, W // 4, dtype=torch.long, device=meta)
                with record_op_calls(f"TransKD-{variant} step {H}x{W} batch {b}", calls):
                    kd(images, labels)["loss"].backward()
                kd.zero_grad(set_to_none=True)
        # the KL kernels at real shapes: the logit-KD and CWD baselines (batch 2)
        for name, make in (("LogitKD", lambda st: LogitKD(st, teacher, temperature=4.0)),
                           ("CWD", lambda st: CWD(st, teacher, temperature=4.0))):
            with torch.device(meta):
                kd = make(build_model("segformer_b0", num_classes=20)).train()
            images = torch.empty(batches[0], 3, H, W, device=meta)
            labels = torch.empty(batches[0], H // 4, W // 4, dtype=torch.long, device=meta)
            with record_op_calls(f"{name} step {H}x{W} batch {batches[0]}", calls):
                kd(images, labels)["loss"].backward()
        with torch.device(meta):
            model = build_model("segformer_b0", num_classes=20).eval()
        with torch.no_grad(), record_op_calls(f"B0 inference {infer_size[0]}x{infer_size[1]}", calls):
            model(torch.empty(1, 3, *infer_size, device=meta))
    return calls


def odd_calls() -> list[OpCall]:
    """The odd sizes of the op tests: 13×27 maps, Nkv = 1, one head, batch 1, single stages."""
    import torch

    calls: list[OpCall] = []

    def call(case, op, fn, *args, **kwargs):
        calls.append(OpCall(op, fn, _freeze(args), tuple(sorted((k, _freeze(v)) for k, v in kwargs.items())), case))

    def t(*shape, grad=True, cl=False):
        x = torch.empty(shape)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.requires_grad_(grad)

    for b in (1, 2):
        # D = 128 (advertised by the triton backend): one key tile (Nkv ≤ 32) and several
        for nq, nkv, h, d in ((19, 1, 1, 32), (13 * 27, 7, 2, 64), (1, 5, 1, 16), (200, 33, 5, 32),
                              (77, 9, 1, 128), (300, 40, 2, 128)):
            call(f"attention odd B={b} Nq={nq} Nkv={nkv} H={h} D={d}", "attention", "efficient_attention",
                 t(b, nq, h, d), t(b, nkv, h, d), t(b, nkv, h, d))
        kv = t(b, 7, 2, 2, 32)  # k and v as strided views of one kv tensor, as in MiT
        call(f"attention odd kv views B={b}", "attention", "efficient_attention",
             t(b, 13 * 27, 2, 32), kv[:, :, 0], kv[:, :, 1])
        for cl in (False, True):
            lay = "channels_last" if cl else "contiguous"
            for (h, w), (hl, wl) in (((13, 27), (7, 14)), ((1, 1), (1, 1)), ((1, 5), (1, 3)), ((16, 32), (8, 16))):
                x, y = t(b, 64, h, w, cl=cl), t(b, 64, hl, wl, cl=cl)
                call(f"selective_fusion odd {lay} B={b} {h}x{w}<-{hl}x{wl}", "selective_fusion", "selective_pool",
                     x, y)
                call(f"selective_fusion odd {lay} B={b} {h}x{w}<-{hl}x{wl}", "selective_fusion", "selective_fuse",
                     x, y, t(b, 2, 64))
            for hw in ((13, 27), (1, 1), (1, 7), (3, 5), (4, 4), (5, 9)):
                call(f"hcl odd {lay} N={b} {hw[0]}x{hw[1]}", "hcl", "hcl_loss",
                     [t(b, 5, *hw, cl=cl)], [t(b, 5, *hw, cl=cl, grad=False)])
                if hw == (13, 27):
                    # hcl: 16 channels (aligned vectors along C under channels_last, none along
                    # W = 27), a column map (W = 1), a map whose channels_last forward splits into
                    # row groups (combine); the teacher needs grad too (write_ft = 1 at launch).
                    for c, (hh, ww) in ((16, (13, 27)), (3, (9, 1)), (24, (40, 30))):
                        call(f"hcl odd {lay} N={b} C={c} {hh}x{ww} ft grad", "hcl", "hcl_loss",
                             [t(b, c, hh, ww, cl=cl)], [t(b, c, hh, ww, cl=cl)])
                for mode in ("spatial", "channel"):
                    call(f"kl_div odd {lay} {mode} N={b} {hw[0]}x{hw[1]}", "kl_div", "kd_kl_div",
                         t(b, 19, *hw, cl=cl), t(b, 19, *hw, cl=cl, grad=False), 4.0, mode)
            # kl_div: C = 64 (÷16 strides: the vector widths of each layout), C = 20 (the logits), one
            # channel, C = 300 (the spatial class loop, CWD's channel tiles), a map that splits its rows.
            for c, hw in ((64, (16, 32)), (20, (13, 27)), (1, (5, 9)), (300, (3, 5)), (64, (64, 64))):
                for mode in ("spatial", "channel"):
                    call(f"kl_div odd {lay} {mode} N={b} C={c} {hw[0]}x{hw[1]}", "kl_div", "kd_kl_div",
                         t(b, c, *hw, cl=cl), t(b, c, *hw, cl=cl, grad=False), 4.0, mode)
        for shape in ((b, 13, 27), (b, 1, 1), (b, 1, 33), (b, 4096, 16)):
            call(f"weighted_mse odd {list(shape)}", "weighted_mse", "weighted_mse",
                 [t(*shape)], [t(*shape, grad=False)], [0.5])
        x = t(b, 64, 40)
        call(f"weighted_mse odd strided B={b}", "weighted_mse", "weighted_mse",
             [x[:, ::2], t(b, 5, 7)], [t(b, 32, 40, grad=False), t(b, 5, 7)], [0.1, 1.0])
    return calls


def dedupe(calls: Sequence[OpCall]) -> list[tuple[OpCall, list[str]]]:
    """Unique calls with the cases that made each."""
    seen: dict = {}
    for c in calls:
        seen.setdefault(c.key(), (c, []))[1].append(c.case)
    return [(c, sorted(set(cases))) for c, cases in seen.values()]


def replay(call: OpCall, dtype: str, layout: str) -> None:
    """Call the op's public function on fresh tensors shaped like ``call``'s with the triton
    backend, then backward through every output that requires grad."""
    import torch

    import transkd_fast

    fn = _entry_functions()[(call.op, call.fn)]
    gen = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    args = _thaw(call.args, dt, layout, gen)
    kwargs = {k: _thaw(v, dt, layout, gen) for k, v in call.kwargs}
    with transkd_fast.use_backend("triton"):
        out = fn(*args, **kwargs)
        outs = [o for o in (out if isinstance(out, (list, tuple)) else [out])
                if isinstance(o, torch.Tensor) and o.requires_grad]
        if outs:
            # incoming gradients in their outputs' layouts (channels_last maps get channels_last grads)
            grads = [torch.empty_like(o).copy_(torch.randn(o.shape, generator=gen)) for o in outs]
            torch.autograd.backward(outs, grads)


# ---------------------------------------------------------------------------------------
# Launch interception: Triton's binder, then triton.compile for a GPUTarget.

_LD = re.compile(r"^\s*(?:@%p\d+\s+)?ld\.global(?:\.[a-zA-Z0-9:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\s", re.M)
_ST = re.compile(r"^\s*(?:@%p\d+\s+)?st\.global(?:\.[a-zA-Z0-9:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\s", re.M)


def access_widths(ptx: str) -> dict[str, dict[int, int]]:
    """Count of global loads / stores per access width in bits (``ld.global.v4.b32`` = 128)."""
    out = {}
    for name, pat in (("ld", _LD), ("st", _ST)):
        counts: dict[int, int] = {}
        for vec, bits in pat.findall(ptx):
            w = int(vec or 1) * int(bits)
            counts[w] = counts.get(w, 0) + 1
        out[name] = dict(sorted(counts.items()))
    return out


def _ptxas(arch: int) -> str:
    """The ptxas triton itself uses for this arch (it bundles two; only one reads PTX 9.x)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers and spill bytes of every entry in ``ptx`` for ``sm_<arch>``."""
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed for {gpu}:\n{log}")
    regs = [int(m) for m in _REGS.findall(log)]
    spills = [int(a) + int(b) for a, b in _SPILL.findall(log)]
    return {"registers": max(regs) if regs else 0, "spill_bytes": sum(spills)}


class Recorder:
    """Intercepts ``JITFunction.run`` and compiles each distinct launch for ``arch``."""

    def __init__(self, arch: int):
        self.arch = arch
        self.builds: dict[Any, dict] = {}
        self.case = ""
        self.failures = 0

    def _compile(self, jit_fn, args, kwargs) -> None:
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature

        kwargs = dict(kwargs)
        kwargs["debug"] = kwargs.get("debug", jit_fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        target = GPUTarget("cuda", self.arch, 32)
        name = jit_fn.fn.__name__
        try:
            backend = make_backend(target)
            binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
            bound_args, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = jit_fn._pack_args(backend, kwargs, bound_args, specialization,
                                                                       options)
        except Exception as e:  # a launch that cannot even bind is a failure of its own
            key = (name, "bind", type(e).__name__, str(e)[:200])
            row = self.builds.setdefault(key, {"kernel": name, "arch": f"sm_{self.arch}",
                                               "error": f"bind: {type(e).__name__}: {e}"[:2000], "cases": []})
            row["cases"].append(self.case)
            return
        key = (name, repr(sorted(signature.items())), repr(sorted((k, repr(v)) for k, v in constexprs.items())),
               repr(sorted(attrs.items())), options.num_warps, options.num_stages)
        row = self.builds.get(key)
        if row is None:
            arg_names = [p.name for p in jit_fn.params]
            consts = {arg_names[p[0]]: v for p, v in constexprs.items() if len(p) == 1}
            row = {"kernel": name, "arch": f"sm_{self.arch}", "num_warps": options.num_warps,
                   "num_stages": options.num_stages,
                   "config": _config_label(jit_fn, signature, consts, arg_names),
                   "specialized": _specialized(jit_fn, signature, consts, attrs, arg_names),
                   "cases": []}
            t0 = time.perf_counter()
            try:
                compiled = triton.compile(ASTSource(jit_fn, signature, constexprs, attrs), target=target,
                                          options=options.__dict__)
                ptx = compiled.asm["ptx"]
                row.update(ptxas_report(ptx, self.arch))
                row["shared_bytes"] = int(compiled.metadata.shared)
                row["access_bits"] = access_widths(ptx)
            except Exception as e:  # report every failure, keep going
                self.failures += 1
                row["error"] = f"{type(e).__name__}: {e}"[:2000]
            row["compile_s"] = round(time.perf_counter() - t0, 2)
            self.builds[key] = row
        row["cases"].append(self.case)

    @contextlib.contextmanager
    def active(self) -> Iterator["Recorder"]:
        from triton.runtime import autotuner, jit

        from transkd_fast import backend
        from transkd_fast.kernels import _device

        recorder = self
        orig_run = jit.JITFunction.run
        orig_bench = autotuner.Autotuner.__dict__["do_bench"]
        orig_sms = _device.EMULATED_SM_COUNT

        def run(self, *args, grid, warmup, **kwargs):
            recorder._compile(self, args, kwargs)
            return None

        def bench_stub(kernel_call, quantiles):
            kernel_call()  # compiles this config through the patched run
            return [1.0, 1.0, 1.0]

        jit.JITFunction.run = run
        autotuner.Autotuner.do_bench = property(lambda self: bench_stub)
        _device.EMULATED_SM_COUNT = SM_COUNT.get(self.arch, 108)
        try:
            with backend.recording_launches():
                yield self
        finally:
            jit.JITFunction.run = orig_run
            autotuner.Autotuner.do_bench = orig_bench
            _device.EMULATED_SM_COUNT = orig_sms


def _config_label(jit_fn, signature, consts, names) -> str:
    """The kernel's declared constexprs (tile sizes, dtypes) and pointer dtypes, in short."""
    declared = [p.name for p in jit_fn.params if p.is_constexpr]
    parts = [f"{k}={_short(consts[k])}" for k in declared if k in consts]
    ptrs = sorted({v.lstrip("*") for k, v in signature.items() if isinstance(v, str) and v.startswith("*")})
    return " ".join([*ptrs, *parts])


def _specialized(jit_fn, signature, consts, attrs, names) -> str:
    """What the JIT decided beyond the declared constexprs: value-1 ints and ÷16 hints."""
    declared = {p.name for p in jit_fn.params if p.is_constexpr}
    ones = [f"{k}={v}" for k, v in consts.items() if k not in declared]
    hinted = sorted(names[p[0]] for p in attrs if len(p) == 1)
    out = []
    if ones:
        out.append("const " + ",".join(ones))
    if hinted:
        out.append(f"÷16 {len(hinted)}/{len(names)}")
    return "; ".join(out)


def _short(v) -> str:
    s = str(v)
    return s.replace("triton.language.", "").replace("fp32", "f32")


# ---------------------------------------------------------------------------------------
# Driver.


def collect_calls(ops: Sequence[str], suites: Sequence[str], progress: bool = True) -> list[tuple[OpCall, list[str]]]:
    calls: list[OpCall] = []
    if "step" in suites:
        t0 = time.perf_counter()
        calls += step_calls()
        if progress:
            print(f"[compile] recorded model step calls in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if "odd" in suites:
        calls += odd_calls()
    return [(c, cases) for c, cases in dedupe(calls) if c.op in ops]


def _layouts(call: OpCall) -> tuple[str, ...]:
    has_4d = any(isinstance(s, TensorSpec) and len(s.shape) == 4 for s in _flat(call.args))
    return ("as-recorded", "contiguous") if has_4d else ("as-recorded",)


def _flat(x):
    if isinstance(x, TensorSpec):
        yield x
    elif isinstance(x, tuple):
        for v in x:
            yield from _flat(v)


def run(ops: Sequence[str] = KERNEL_OPS, archs: Sequence[int] = ARCHS, suites: Sequence[str] = SUITES,
        dtypes: Sequence[str] = DTYPES, progress: bool = True, calls=None) -> list[dict]:
    """Record, bind and compile every launch; returns one row per distinct build and arch."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile checks need TRITON_INTERPRET unset: kernels defined while "
                           "interpreting cannot be compiled")
    calls = collect_calls(ops, suites, progress) if calls is None else calls
    rows = []
    for arch in archs:
        rec = Recorder(arch)
        with rec.active():
            for call, cases in calls:
                for dtype in dtypes:
                    for layout in _layouts(call):
                        rec.case = f"{'; '.join(cases)} | {call.fn} {dtype} {layout}"
                        n = len(rec.builds)
                        try:
                            replay(call, dtype, layout)
                        except Exception as e:  # a launcher error is a failure, not a crash of the check
                            key = ("replay", call.key(), dtype, layout)
                            rec.builds[key] = {"kernel": call.fn, "arch": f"sm_{arch}", "cases": [rec.case],
                                               "error": f"replay: {type(e).__name__}: {e}"[:2000]}
                        if progress and len(rec.builds) > n:
                            for row in list(rec.builds.values())[n:]:
                                print(f"[compile] sm_{arch} {row['kernel']:24s} {row.get('config', '')} "
                                      f"{row.get('specialized', '')}: "
                                      + (row["error"].splitlines()[0][:200] if "error" in row else
                                         f"regs={row['registers']} spill={row['spill_bytes']} "
                                         f"smem={row['shared_bytes']} {row['compile_s']} s"),
                                      file=sys.stderr, flush=True)
        for row in rec.builds.values():
            row["op"] = _op_of(row["kernel"])
            rows.append(row)
    return rows


def _op_of(kernel: str) -> str:
    import importlib

    for op in KERNEL_OPS:
        mod = importlib.import_module(f"transkd_fast.kernels.{op}")
        if hasattr(mod, kernel) or kernel in ENTRY_POINTS[op]:
            return op
    return "?"


def bad_rows(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if "error" in r or r.get("spill_bytes", 0) > 0]


def _widths(d: dict) -> str:
    return " ".join(f"{w}×{n}" for w, n in d.items()) or "-"


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Triton compile report (recorded launches)",
        "",
        "Generated by `python -m transkd_fast.compile_check --markdown benchmarks/results/compile_report.md`:",
        "the op entry points run forward and backward at the shapes of a TransKD-Base/GL/EA step (B2 → B0,",
        "512×1024, batch 2 and 1), of B0 inference at 1024×2048 and at the tests' odd sizes, in fp32/fp16/bf16,",
        "channels_last and contiguous; every Triton launch is bound by Triton's own binder (value-1 ints become",
        "constexprs, ÷16 hints from real pointers and strides) and compiled with `triton.compile` for each",
        "target. Nothing runs; no GPU is needed. Registers and spills from the bundled `ptxas -v`, shared",
        "memory from the compile metadata, global access widths (bits × count) from the PTX.",
        "",
        "| op | kernel | config | specialized | arch | warps | stages | registers | spill bytes | shared bytes "
        "| load bits | store bits | launches | first case |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["op"], r["kernel"], r.get("config", ""), r.get("specialized", ""),
                                         r["arch"])):
        first = r["cases"][0].split(" | ") if r["cases"] else [""]
        case = (first[0].split("; ")[0] + (" / " + first[1] if len(first) > 1 else "")).replace("|", "/")
        if "error" in r:
            err = r["error"].splitlines()[0][:160].replace("|", "/")
            lines.append(f"| {r['op']} | {r['kernel']} | {r.get('config', '')} | {r.get('specialized', '')} | "
                         f"{r['arch']} | | | FAILED | | | | | {len(r['cases'])} | {case}: {err} |")
        else:
            bits = r["access_bits"]
            lines.append(f"| {r['op']} | {r['kernel']} | {r['config']} | {r['specialized']} | {r['arch']} | "
                         f"{r['num_warps']} | {r['num_stages']} | {r['registers']} | {r['spill_bytes']} | "
                         f"{r['shared_bytes']} | {_widths(bits['ld'])} | {_widths(bits['st'])} | "
                         f"{len(r['cases'])} | {case} |")
    bad = bad_rows(rows)
    lines += ["", f"{len(rows)} builds, {len(bad)} with spills or failures."]
    cases: dict[str, set] = {}
    for i, r in enumerate(rows):
        for c in r["cases"]:
            for name in c.split(" | ")[0].split("; "):
                cases.setdefault(name, set()).add(i)
    lines += ["", "Builds per recorded case (a build serves every case that launches it):", ""]
    lines += [f"- {name}: {len(ids)}" for name, ids in sorted(cases.items())]
    return "\n".join(lines) + "\n"


def check_in_subprocess(ops: Sequence[str], archs: Sequence[int] = ARCHS, suites: Sequence[str] = ("odd",),
                        timeout: int = 1500, extra: Sequence[str] = ()) -> list[dict]:
    """Run the check in a fresh interpreter without ``TRITON_INTERPRET``; returns the rows."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "rows.json"
        cmd = [sys.executable, "-m", "transkd_fast.compile_check", "--ops", *ops, "--suites", *suites,
               "--archs", *map(str, archs), "--json", str(out), "--no-fail", *extra]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0 or not out.exists():
            raise RuntimeError(f"compile check process failed ({res.returncode}):\n{res.stderr[-4000:]}")
        return json.loads(out.read_text())


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", nargs="+", default=list(KERNEL_OPS), choices=KERNEL_OPS)
    ap.add_argument("--archs", nargs="+", type=int, default=list(ARCHS))
    ap.add_argument("--suites", nargs="+", default=list(SUITES), choices=SUITES,
                    help="step: shapes recorded from the TransKD step and B0 inference; odd: the tests' odd sizes")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--no-fail", action="store_true", help="exit 0 even with spills or failures (the caller judges)")
    a = ap.parse_args(argv)
    rows = run(tuple(a.ops), tuple(a.archs), tuple(a.suites), tuple(a.dtypes))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    if a.markdown:
        a.markdown.parent.mkdir(parents=True, exist_ok=True)
        a.markdown.write_text(markdown(rows))
    bad = bad_rows(rows)
    for r in bad:
        what = r.get("error") or f"{r['spill_bytes']} spill bytes"
        print(f"FAIL {r['op']} {r['kernel']} {r.get('config', '')} {r['arch']} [{r['cases'][0]}]: "
              f"{what.splitlines()[0][:300]}", file=sys.stderr)
    print(f"{len(rows)} builds, {len(bad)} with spills or failures", file=sys.stderr)
    return 0 if (a.no_fail or not bad) else 1


if __name__ == "__main__":
    sys.exit(main())
