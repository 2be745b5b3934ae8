"""From a trained student to a deployed model: load any checkpoint ``evaluate`` loads, export it.

:func:`load_model` reads a transkd_fast training checkpoint (``last.pt``; a distill checkpoint
gives its student, the KD modules and the teacher dropped), a ``model.pt`` weights file, or any
NVlabs / TransKD / mmseg / Hugging Face state dict that ``transkd-fast evaluate --weights``
reads, with the same loader (:func:`transkd_fast.engine.checkpoint.load_weights`); the model
name and class count come from the file (recorded, or guessed from the tensor shapes).

Formats (``transkd-fast export --format onnx,hf,torch-export``), SegFormer B0–B5:

- ``onnx``: one ``.onnx`` file, opset :data:`ONNX_OPSET`, input ``pixel_values``
  ``[batch, 3, height, width]`` float32, output ``logits`` ``[batch, K, ⌈H/4⌉, ⌈W/4⌉]``, batch,
  height and width dynamic. ``--verify`` runs it in onnxruntime at two input sizes against the
  eager model and fails above :data:`VERIFY_RTOL` relative logit difference.
- ``torch-export``: a ``torch.export`` program (``torch.export.save``, a ``.pt2``) with the same
  signature. It holds no transkd_fast op: ``torch.export.load(path).module()(x)`` runs with
  PyTorch alone, transkd_fast not installed. Batch ≥ 1 and height, width ≥ :data:`MIN_SIZE`
  (the program's guards: every attention grid holds more than one row and column).
- ``hf``: a folder ``SegformerForSemanticSegmentation.from_pretrained(folder)`` loads offline:
  ``config.json``, ``model.safetensors`` (the hub's naming, which transformers 4 and 5 read) and a
  ``preprocessor_config.json`` that feeds the model what it was trained on. Hugging Face's
  SegFormer uses LayerNorm eps 1e-5 in every block, where NVlabs (and our default) use 1e-6:
  logits then differ slightly (4e-6 relative on a random B0; ``--verify`` measures it); a model
  built with ``norm_eps=1e-5`` (as Hugging Face checkpoints load) matches to rounding.

The ONNX and torch.export graphs are traced with the ``reference`` backend in force, so transkd_fast's custom ops
(``transkd_fast::efficient_attention`` …) are recorded as the plain ATen ops they stand for, and
the CPU oneDNN fast paths (``mkldnn`` ops no other runtime has) step aside; nobody has to pick a
backend by hand. Their decode head is the folded one (the 4E-channel concat and its 1×1 conv
composed into per-stage Linears, BatchNorm folded in): eval-mode logits equal the original head's.

The ONNX graph is traced in a form ONNX runtimes execute faster, same math (:func:`onnx_forms`):
each MixFFN's fc1 and fc2 are 1×1 convolutions on the block's NCHW view, so ``fc1 → 3×3
depthwise → GELU → fc2`` is one chain of convolutions that ONNX Runtime keeps in its blocked
NCHWc layout (instead of a transpose and two layout reorders of the 4×-wide hidden tensor around
the depthwise conv); GELU is written as ``x · (1 + erf(x / √2)) · 0.5``, the operand order ONNX
Runtime fuses into one Gelu kernel. LayerNorm is one ``LayerNormalization`` node (opset ≥ 17).
On SegFormer-B0 at 512×1024 this made onnxruntime ~15% faster (see
``benchmarks/test_deploy.py``). :func:`export` traces once, in this form, for both ONNX and the
torch.export program (whose 1×1 convolutions compute what the Linears do).

Inputs are what the model saw in training: RGB in [0, 1], ImageNet mean/std normalized if it was
trained with ``--normalize`` (the HF folder's preprocessor config does this itself).
"""

from __future__ import annotations

import contextlib
import json
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

FORMATS = ("onnx", "hf", "torch-export")
ONNX_OPSET = 18
VERIFY_RTOL = 1e-4
MIN_SIZE = 64
MAX_BATCH = 4096
# The example the program is traced at: every intermediate grid > 1 (sizes 1 would be specialized).
_EXAMPLE = (2, 3, 128, 128)
VERIFY_SIZES = ((1, 3, 64, 128), (2, 3, 96, 160))


class ExportError(ValueError):
    """An export that cannot be done or that failed its check (the message says which and why)."""


# ---------------------------------------------------------------------------------------------
# loading


@dataclass
class CheckpointInfo:
    """What a weights file says about the network in it (None: it does not say)."""

    path: str
    source: str
    model: Optional[str]
    num_outputs: Optional[int]
    num_classes: Optional[int]
    void: Optional[str]
    normalize: Optional[bool] = None
    height: Optional[int] = None
    dataset: Optional[str] = None


@dataclass
class LoadedModel:
    """A network ready for inference (eval mode) and what its file said about it.

    ``num_classes``: the outputs that are classes; with ``void == "class"`` (the paper's
    20-output recipe) the last output is the void output and is not one of them.
    """

    model: nn.Module
    name: str
    num_outputs: int
    num_classes: int
    void: Optional[str]
    normalize: bool
    height: Optional[int]
    summary: str
    dataset: Optional[str] = None


_HEAD_KEYS = ("decode_head.linear_pred.weight", "decode_head.conv_seg.weight")


def _read(path: str):
    """The checkpoint at ``path``, read as the engine reads one (``checkpoint._torch_load``); a
    folder or an unreadable file is an :class:`ExportError` naming ``--weights``."""
    from transkd_fast.engine.checkpoint import _torch_load
    from transkd_fast.engine.config import ConfigError

    if os.path.isdir(path):
        raise ExportError(f"--weights {path} is a folder; give a checkpoint file (model.pt, last.pt, ...)")
    try:
        return _torch_load(path, "--weights")
    except ConfigError as e:  # a truncated or foreign file
        raise ExportError(f"--weights {e}") from e


def _guess_name(state: Mapping) -> Optional[str]:
    """The zoo model a state dict in our naming is for, from its shapes (the engine's guess where
    it has one, else SegFormer's stage widths and depths)."""
    try:
        from transkd_fast.engine.checkpoint import guess_model
    except ImportError:
        guess_model = None
    if guess_model is not None:
        guess = guess_model(dict(state))
        if guess is not None:
            return guess[0]
    from transkd_fast.models.mit import MIT_CONFIGS

    w = state.get("backbone.patch_embed1.proj.weight")
    if not torch.is_tensor(w) or not any(k.startswith("decode_head.linear_c") for k in state):
        return None
    depths = []
    for i in range(1, 5):
        idx = {int(k.split(".")[2]) for k in state if k.startswith(f"backbone.block{i}.")}
        depths.append(max(idx) + 1 if idx else 0)
    for key, (dims, deps, *_rest) in MIT_CONFIGS.items():
        if int(dims[0]) == int(w.shape[0]) and list(deps) == depths:
            return f"segformer_{key}"
    return None


def read_checkpoint_info(path: str) -> CheckpointInfo:
    """Model name, outputs, classes and void mode of a weights file, from its records or shapes."""
    from transkd_fast.engine.checkpoint import FORMAT

    obj = _read(path)
    rec: dict = {}
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        cfg = obj.get("config") or {}
        state = obj.get("model") or {}
        if obj.get("kind") == "distill":
            state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
        rec = {"model": cfg.get("model"), "void": cfg.get("void"), "normalize": cfg.get("normalize"),
               "height": cfg.get("height"), "dataset": cfg.get("dataset")}
        source = f"transkd_fast {obj.get('kind', '?')} checkpoint"
    elif isinstance(obj, Mapping) and obj.get("format") == FORMAT + ":weights":
        state, rec = obj.get("model") or {}, dict(obj.get("meta") or {})
        source = "transkd_fast weights"
    else:
        from transkd_fast.models.checkpoints import CheckpointError, convert_state_dict

        tensors = obj
        if isinstance(obj, Mapping):
            for wrapper in ("state_dict", "model"):
                if isinstance(obj.get(wrapper), Mapping):
                    tensors = obj[wrapper]
                    break
        tensors = {k: v for k, v in tensors.items() if torch.is_tensor(v)} if isinstance(tensors, Mapping) else {}
        if not tensors:
            raise ExportError(f"--weights {path} holds no tensors (looked at the top level, 'state_dict' and 'model')")
        try:
            state = convert_state_dict(tensors)[0]
        except CheckpointError:
            state = tensors
        source = "foreign checkpoint"
    outputs = rec.get("num_outputs")
    if outputs is None:
        head = next((state[k] for k in _HEAD_KEYS if k in state and torch.is_tensor(state[k])), None)
        outputs = int(head.shape[0]) if head is not None else None
    name = rec.get("model")
    if name is None:
        name = _guess_name(state)
    classes = rec.get("num_classes")
    if classes is None and outputs is not None:
        classes = outputs - 1 if rec.get("void") == "class" else outputs
    return CheckpointInfo(path, source, name, None if outputs is None else int(outputs),
                          None if classes is None else int(classes), rec.get("void"),
                          rec.get("normalize"), rec.get("height"), rec.get("dataset"))


def load_model(path: str, model_name: Optional[str] = None, num_classes: Optional[int] = None,
               allow_partial: bool = False) -> LoadedModel:
    """The network in ``path`` (any file ``evaluate --weights`` reads), on the CPU in eval mode.

    ``model_name`` (``--model``) is needed only where the file neither records nor reveals it;
    ``num_classes`` overrides the class count (e.g. 19 for a foreign 20-output TransKD file whose
    last output is void). Refusals are :class:`ValueError` subclasses naming the flag and the file.
    """
    from transkd_fast.engine.checkpoint import load_weights
    from transkd_fast.engine.trainer import build_network

    info = read_checkpoint_info(path)
    name = model_name or info.model
    if not name:
        raise ExportError(f"--weights {path}: cannot tell which network it holds; pass --model (e.g. segformer_b0)")
    if info.num_outputs is None:
        raise ExportError(f"--weights {path} has no decode head (a backbone-only file?): nothing to deploy")
    model = build_network(name, info.num_outputs, drop_path_rate=0.0, dropout=0.0)
    report = load_weights(model, path, model_name=name, num_outputs=info.num_outputs, void=info.void,
                          allow_partial=allow_partial, require_head=True)
    classes = info.num_classes if num_classes is None else int(num_classes)
    if not 1 <= classes <= info.num_outputs:
        raise ExportError(f"--num-classes must be in 1..{info.num_outputs} (the model's outputs), got {classes}")
    return LoadedModel(model.eval(), name, info.num_outputs, classes, info.void, bool(info.normalize),
                       info.height, report.summary(), info.dataset)


# ---------------------------------------------------------------------------------------------
# checks shared by the formats


def _segformer(model: nn.Module) -> nn.Module:
    from transkd_fast.models.segformer import SegFormer

    if hasattr(model, "student_model"):  # a distiller: its student, the KD modules dropped
        model = model.student_model()
    if not isinstance(model, SegFormer):
        raise ExportError(f"export takes a SegFormer (segformer_b0..b5), not {type(model).__name__}")
    return model


class _Logits(nn.Module):
    """``pixel_values`` → ``logits``: names the traced signature."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)


def rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (inf for a shape mismatch or non-finite output)."""
    if tuple(out.shape) != tuple(ref.shape) or not torch.isfinite(out).all():
        return float("inf")
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _eager_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).float()


def _check_diffs(what: str, diffs: list, rtol: float) -> list:
    bad = [(s, d) for s, d in diffs if not d <= rtol]
    if bad:
        s, d = bad[0]
        raise ExportError(f"{what} verification failed: relative logit difference {d:.2e} > {rtol:.0e} "
                          f"at input {list(s)}")
    return diffs


# ---------------------------------------------------------------------------------------------
# torch.export


def _mixffn_nchw(self, x: torch.Tensor, H: int, W: int, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MixFFN with fc1 and fc2 as 1×1 convolutions on the NCHW view of the tokens ``[B, H·W, C]``:
    ``conv1x1(fc2) ∘ GELU ∘ dwconv ∘ conv1x1(fc1)``, the same per-pixel maps as the Linears."""
    from transkd_fast.models.mit import nchw_to_tokens, tokens_to_nchw

    t = tokens_to_nchw(x, H, W)
    h = F.conv2d(t, self.fc1.weight[:, :, None, None], self.fc1.bias)
    h = F.gelu(self.dwconv.dwconv(h))
    out = nchw_to_tokens(F.conv2d(h, self.fc2.weight[:, :, None, None], self.fc2.bias))
    return out if residual is None else out + residual


@contextlib.contextmanager
def onnx_forms(model: nn.Module):
    """While tracing for ONNX: every MixFFN of ``model`` runs :func:`_mixffn_nchw` (see the
    module docstring); the modules get their own forward back afterwards."""
    from transkd_fast.models.mit import MixFFN

    patched = [m for m in model.modules() if isinstance(m, MixFFN)]
    for m in patched:
        m.forward = types.MethodType(_mixffn_nchw, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward  # the instance attribute: the class's forward again


def export_program(model: nn.Module, for_onnx: bool = False) -> "torch.export.ExportedProgram":
    """A ``torch.export`` program of ``model`` with dynamic batch (≥ 1), height and width
    (≥ :data:`MIN_SIZE`), traced under the ``reference`` backend: ATen ops only. ``for_onnx``:
    traced in :func:`onnx_forms` (what :func:`export_onnx` converts)."""
    from torch.export import Dim

    import transkd_fast

    model = _segformer(model)
    was_training = model.training
    model.eval()
    # Height and width as Dim.DYNAMIC: the trace's guards (e.g. "the 1/32 grid differs from the 1/4
    # one") hold for every size ≥ MIN_SIZE, but sympy cannot prove all of them for a declared range;
    # DYNAMIC keeps them as the program's own checks instead of refusing the export.
    dims = {0: Dim("batch", min=1, max=MAX_BATCH), 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}
    example = torch.rand(*_EXAMPLE, device=next(model.parameters()).device)
    try:
        forms = onnx_forms(model) if for_onnx else contextlib.nullcontext()
        with transkd_fast.use_backend("reference"), torch.no_grad(), forms:
            return torch.export.export(_Logits(model), (example,), dynamic_shapes={"pixel_values": dims})
    finally:
        model.train(was_training)


def save_program(program, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.export.save(program, path)
    return path


def verify_program(path: str, model: nn.Module, sizes: Sequence[Sequence[int]] = VERIFY_SIZES,
                   rtol: float = VERIFY_RTOL) -> list:
    """Load the saved program back and compare its logits with ``model``'s; ``[(size, diff)]``."""
    program = torch.export.load(path).module()
    diffs = []
    for s in sizes:
        x = torch.rand(*s)
        with torch.no_grad():
            out = program(x)
        diffs.append((tuple(s), rel_diff(out, _eager_logits(model, x))))
    return _check_diffs("torch-export", diffs, rtol)


# ---------------------------------------------------------------------------------------------
# ONNX


def _require(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{what} needs the {module!r} package: pip install 'transkd-fast[deploy]'") from None


def _gelu_fusable(self, approximate: str = "none"):
    """ONNX for ``aten::gelu`` (exact): ``x · (1 + erf(x / √2)) · 0.5``, the operand order ONNX
    Runtime's GeluFusion matches (torch's own translation multiplies by 0.5 first, which it does
    not). Standard opset-18 ops; the tanh approximation keeps torch's translation."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    if approximate != "none":
        from onnxscript.function_libs.torch_lib.ops.nn import aten_gelu

        return aten_gelu(self, approximate)
    inner = op.Div(self, ir.tensor(1.4142135623730951, dtype=self.dtype))
    inner = op.Add(op.Erf(inner), ir.tensor(1.0, dtype=self.dtype))
    return op.Mul(op.Mul(self, inner), ir.tensor(0.5, dtype=self.dtype))


def export_onnx(model_or_program, path: str, opset: int = ONNX_OPSET) -> str:
    """Write ``path`` (.onnx, weights inside): dynamic batch/height/width, opset ``opset``.

    A module is traced with :func:`export_program` ``(for_onnx=True)``; a program is converted
    as it is."""
    if opset < 17:
        raise ExportError(f"--opset must be ≥ 17 (LayerNormalization), got {opset}")
    _require("onnx", "ONNX export")
    _require("onnxscript", "ONNX export")
    program = model_or_program
    if isinstance(model_or_program, nn.Module):
        program = export_program(model_or_program, for_onnx=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    example = torch.rand(*_EXAMPLE)
    torch.onnx.export(program, (example,), path, input_names=["pixel_values"], output_names=["logits"],
                      opset_version=opset, dynamo=True, external_data=False, verbose=False,
                      custom_translation_table={torch.ops.aten.gelu.default: _gelu_fusable})
    _name_onnx_dims(path)
    return path


def _name_onnx_dims(path: str) -> None:
    """Give the input's dynamic dimensions readable names (batch, height, width)."""
    import onnx

    proto = onnx.load(path)
    names = {}
    for i, n in ((0, "batch"), (2, "height"), (3, "width")):
        d = proto.graph.input[0].type.tensor_type.shape.dim[i]
        if d.dim_param:
            names[d.dim_param] = n
    if not names:
        return

    def rename(value_info):
        for d in value_info.type.tensor_type.shape.dim:
            if d.dim_param:
                p = d.dim_param
                for old, new in sorted(names.items(), key=lambda kv: -len(kv[0])):
                    p = p.replace(old, new)
                d.dim_param = p

    for vi in list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info):
        rename(vi)
    onnx.save(proto, path)


def verify_onnx(path: str, model: nn.Module, sizes: Sequence[Sequence[int]] = VERIFY_SIZES,
                rtol: float = VERIFY_RTOL) -> list:
    """Run ``path`` in onnxruntime (CPU) at ``sizes`` and compare with ``model``; ``[(size, diff)]``;
    :class:`ExportError` above ``rtol``."""
    ort = _require("onnxruntime", "--verify of an ONNX export")
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    diffs = []
    for s in sizes:
        x = torch.rand(*s)
        out = torch.from_numpy(sess.run(None, {name: x.numpy()})[0])
        diffs.append((tuple(s), rel_diff(out, _eager_logits(model, x))))
    return _check_diffs("ONNX", diffs, rtol)


# ---------------------------------------------------------------------------------------------
# Hugging Face


def hf_config_dict(model: nn.Module, class_names: Optional[Sequence[str]] = None) -> dict:
    """``SegformerConfig`` keyword arguments describing ``model`` (read off its modules)."""
    model = _segformer(model)
    bb, head = model.backbone, model.decode_head
    blocks = [getattr(bb, f"block{i}") for i in range(1, 5)]
    first = [b[0] for b in blocks]
    n = head.num_classes
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(n)]
    if len(names) < n:
        names += [f"class_{i}" for i in range(len(names), n)]
    return dict(
        num_channels=bb.patch_embed1.proj.in_channels,
        num_encoder_blocks=4,
        depths=[len(b) for b in blocks],
        sr_ratios=[blk.attn.sr_ratio for blk in first],
        hidden_sizes=list(bb.embed_dims),
        patch_sizes=[getattr(bb, f"patch_embed{i}").proj.kernel_size[0] for i in range(1, 5)],
        strides=[getattr(bb, f"patch_embed{i}").proj.stride[0] for i in range(1, 5)],
        num_attention_heads=[blk.attn.num_heads for blk in first],
        mlp_ratios=[blk.mlp.fc1.out_features // blk.mlp.fc1.in_features for blk in first],
        hidden_act="gelu",
        decoder_hidden_size=head.embed_dim,
        layer_norm_eps=float(first[0].norm1.eps),
        drop_path_rate=0.0,
        classifier_dropout_prob=0.0,
        num_labels=n,
        id2label={i: names[i] for i in range(n)},
        label2id={names[i]: i for i in range(n)},
    )


def export_hf(model: nn.Module, folder: str, class_names: Optional[Sequence[str]] = None,
              normalize: bool = False) -> str:
    """Write ``folder`` for ``SegformerForSemanticSegmentation.from_pretrained``: ``config.json``,
    ``model.safetensors`` (transformers' v4 hub naming, which every transformers version reads) and
    ``preprocessor_config.json``."""
    from transkd_fast.models.checkpoints import to_hf_state_dict

    save_file = _require("safetensors.torch", "the hf export").save_file
    model = _segformer(model)
    cfg = dict(hf_config_dict(model, class_names), model_type="segformer",
               architectures=["SegformerForSemanticSegmentation"])
    state = {k: v.contiguous() for k, v in to_hf_state_dict(model, style="v4").items()}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump({k: ({str(i): v for i, v in val.items()} if k == "id2label" else val) for k, val in cfg.items()},
                  f, indent=2)
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    from transkd_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    pre = {"image_processor_type": "SegformerImageProcessor", "do_resize": False, "do_rescale": True,
           "rescale_factor": 1 / 255, "do_normalize": bool(normalize), "image_mean": list(IMAGENET_MEAN),
           "image_std": list(IMAGENET_STD), "do_reduce_labels": False}
    with open(os.path.join(folder, "preprocessor_config.json"), "w", encoding="utf-8") as f:
        json.dump(pre, f, indent=2)
    return folder


def verify_hf(folder: str, model: nn.Module, sizes: Sequence[Sequence[int]] = VERIFY_SIZES,
              rtol: float = VERIFY_RTOL) -> list:
    """Load ``folder`` with transformers (offline) and compare its logits with ``model``'s."""
    _require("transformers", "--verify of an hf export")
    from transformers import SegformerForSemanticSegmentation

    hf, info = SegformerForSemanticSegmentation.from_pretrained(folder, output_loading_info=True,
                                                                local_files_only=True)
    missing = [k for k in info["missing_keys"] if "num_batches_tracked" not in k]
    if missing or info["unexpected_keys"] or info["mismatched_keys"]:
        raise ExportError(f"hf verification failed: transformers left {len(missing)} tensors missing, "
                          f"{len(info['unexpected_keys'])} unexpected, {len(info['mismatched_keys'])} mismatched")
    hf.eval()
    diffs = []
    for s in sizes:
        x = torch.rand(*s)
        with torch.no_grad():
            out = hf(pixel_values=x).logits
        diffs.append((tuple(s), rel_diff(out, _eager_logits(model, x))))
    return _check_diffs("hf", diffs, rtol)


# ---------------------------------------------------------------------------------------------
# all formats


def output_paths(output: str, formats: Sequence[str]) -> dict:
    """Where each format goes: ``output`` is a folder; ``model.onnx``, ``model.pt2`` and ``hf/`` in it."""
    names = {"onnx": "model.onnx", "torch-export": "model.pt2", "hf": "hf"}
    return {f: os.path.join(output, names[f]) for f in formats}


def parse_formats(spec: str) -> list:
    fmts = [f.strip().lower() for f in spec.split(",") if f.strip()]
    if not fmts:
        raise ExportError(f"--format is empty; choose from {', '.join(FORMATS)} (comma-separated)")
    bad = [f for f in fmts if f not in FORMATS]
    if bad:
        raise ExportError(f"--format {bad[0]!r} is not a format; choose from {', '.join(FORMATS)} (comma-separated)")
    return list(dict.fromkeys(fmts))


def export(model: nn.Module, output: str, formats: Sequence[str] = FORMATS, verify: bool = False,
           class_names: Optional[Sequence[str]] = None, normalize: bool = False, opset: int = ONNX_OPSET,
           log=print) -> dict:
    """Export ``model`` to each of ``formats`` under the folder ``output``; one ``torch.export``
    trace (in :func:`onnx_forms`) serves both ``onnx`` and ``torch-export``. Returns
    ``{format: {"path", "diffs"}}``."""
    model = _segformer(model)
    model.eval()
    paths = output_paths(output, formats)
    results: dict = {}
    program = None
    if "onnx" in formats:  # fail before the long trace when the packages are missing
        _require("onnx", "ONNX export")
        _require("onnxscript", "ONNX export")
        if verify:
            _require("onnxruntime", "--verify of an ONNX export")
    if "onnx" in formats or "torch-export" in formats:
        log("tracing with torch.export (dynamic batch, height, width; reference backend) ...")
        program = export_program(model, for_onnx=True)
    for fmt in formats:
        path = paths[fmt]
        if fmt == "torch-export":
            save_program(program, path)
        elif fmt == "onnx":
            export_onnx(program, path, opset=opset)
        else:
            export_hf(model, path, class_names, normalize)
        diffs = None
        if verify:
            check = {"onnx": verify_onnx, "torch-export": verify_program, "hf": verify_hf}[fmt]
            diffs = check(path, model)
        results[fmt] = {"path": path, "diffs": diffs}
        line = f"{fmt}: {path}"
        if diffs:
            line += "  verified: " + ", ".join(f"{list(s)} rel. diff {d:.1e}" for s, d in diffs)
        log(line)
    return results
