"""Checkpoints: written atomically, holding everything an exact resume needs.

A checkpoint is a dict ``{"format", "kind", "step", "model", "optimizer", "scheduler",
"scaler", "rng", "config"}``; ``rng`` is the list of every rank's ``{"torch", "numpy",
"python", "cuda"}`` generator states. :func:`save_checkpoint` writes ``<path>.tmp`` and then
``os.replace``s it over ``<path>``: a crash or Ctrl-C during the write leaves the previous
checkpoint intact (the trainer removes a stale ``.tmp`` when a run starts).

A distill checkpoint holds only what training changes: ``model`` is the distiller's state
without the frozen ``teacher.*`` tensors, and ``teacher`` records the teacher's identity
(``{"model", "weights", "sha256"}``, the hash over its state dict, :func:`state_fingerprint`),
which a resume checks.

:func:`load_weights` loads weights into a network and returns a :class:`WeightsReport`
(loaded / missing / unexpected counts); it refuses a file that loads < 90 % of the model's
tensors (``--allow-partial-weights`` accepts it), and a transkd_fast file of another model or
void mode names the ``--model`` / ``--void`` to use.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from transkd_fast.engine.config import ConfigError

FORMAT = "transkd_fast.checkpoint/1"
MIN_LOADED_FRACTION = 0.9


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def state_dict_without(module: torch.nn.Module, prefixes: tuple = ()) -> dict:
    return {k: v for k, v in module.state_dict().items() if not k.startswith(tuple(prefixes))}


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes (sorted by name)."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        if not torch.is_tensor(v):
            continue
        t = v.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{k}|{t.dtype}|{tuple(v.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: str, *, kind: str, step: int, model: torch.nn.Module, optimizer, scheduler,
                    scaler=None, rng: Optional[list] = None, config: Optional[dict] = None,
                    exclude: tuple = (), extra: Optional[dict] = None) -> None:
    """``exclude``: state-dict prefixes left out (a distiller's frozen ``teacher.``); ``extra``:
    more top-level entries (the teacher's identity)."""
    atomic_save({
        "format": FORMAT,
        "kind": kind,
        "step": int(step),
        "model": state_dict_without(model, exclude),
        "excluded": list(exclude),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng if rng is not None else [rng_state()],
        "config": config or {},
        **(extra or {}),
    }, path)


def _torch_load(path: str, what: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        # RNG states hold numpy arrays and tuples: not loadable with weights_only=True.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{path}: cannot read it as a PyTorch checkpoint ({type(e).__name__}: {first})") from e


def load_checkpoint(path: str) -> dict:
    ckpt = _torch_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a transkd_fast training checkpoint (no format tag {FORMAT!r})")
    return ckpt


@dataclass
class WeightsReport:
    """What :func:`load_weights` put into the model. ``missing``: model tensors left as they were;
    ``unexpected``: file tensors that fit nothing; ``total``: the model's tensors."""

    path: str
    source: str
    loaded: int
    total: int
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    ignored: int = 0

    @property
    def fraction(self) -> float:
        return self.loaded / max(1, self.total)

    @property
    def head_missing(self) -> list:
        return [k for k in self.missing if k.startswith("decode_head.")]

    @property
    def backbone_complete(self) -> bool:
        return not any(k.startswith("backbone.") for k in self.missing)

    def summary(self) -> str:
        s = (f"{self.path} ({self.source}): loaded {self.loaded}/{self.total} tensors "
             f"(missing {len(self.missing)}, unexpected {len(self.unexpected)}")
        s += f", ignored {self.ignored})" if self.ignored else ")"
        if self.missing and self.backbone_complete and len(self.head_missing) == len(self.missing):
            s += f"; decode head randomly initialized ({len(self.missing)} tensors)"
        return s


def _model_tensors(model: torch.nn.Module) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def _describe(model_name, num_outputs, void) -> str:
    parts = [str(model_name or "a model")]
    if num_outputs is not None:
        parts.append(f"{num_outputs} outputs")
    if void is not None:
        parts.append(f"--void {void}")
    return f"{parts[0]} ({', '.join(parts[1:])})" if len(parts) > 1 else parts[0]


def _check_identity(path: str, flag: str, recorded: dict, expected: dict) -> None:
    """A transkd_fast file records what it holds: name the flag that would make it fit."""
    fixes = []
    if recorded.get("model") and expected.get("model") and recorded["model"] != expected["model"]:
        fixes.append(f"--model {recorded['model']}" if flag != "--teacher-weights"
                     else f"--teacher {recorded['model']}")
    if recorded.get("void") and expected.get("void") and recorded["void"] != expected["void"]:
        fixes.append(f"--void {recorded['void']}")
    outputs_differ = (recorded.get("num_outputs") is not None and expected.get("num_outputs") is not None
                      and recorded["num_outputs"] != expected["num_outputs"])
    if not fixes and outputs_differ:
        fixes.append("the dataset it was trained on (another class count)")
    if fixes:
        have = _describe(recorded.get("model"), recorded.get("num_outputs"), recorded.get("void"))
        want = _describe(expected.get("model"), expected.get("num_outputs"), expected.get("void"))
        raise ConfigError(f"{flag} {path} holds {have} weights; this run builds {want}: use {' and '.join(fixes)}")


def _shape_mismatches(model_state: dict, state: Mapping) -> list:
    return [(k, tuple(v.shape), tuple(model_state[k].shape)) for k, v in state.items()
            if torch.is_tensor(v) and k in model_state and tuple(v.shape) != tuple(model_state[k].shape)]


def guess_model(obj) -> Optional[tuple[str, Optional[int]]]:
    """(zoo model name, outputs) a state dict (or a file's object) is for, from its shapes; None if unknown."""
    from transkd_fast.models.checkpoints import convert_state_dict

    try:
        from transkd_fast.models.checkpoints import guess_model_name
    except ImportError:  # pragma: no cover - an older models package
        return None
    try:
        name = guess_model_name(obj)
        tensors = convert_state_dict(_unwrap(obj))[0]
    except Exception:  # noqa: BLE001 - a guess only
        return None
    if name is None:
        return None
    pred = next((v for k, v in tensors.items() if k.endswith(("linear_pred.weight", "conv_seg.weight"))), None)
    return name, (int(pred.shape[0]) if pred is not None else None)


def _unwrap(obj) -> dict:
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
        return {k: v for k, v in obj.items() if torch.is_tensor(v)}
    return {}


def _mismatch_error(flag: str, path: str, mism: list, expected: dict, guess=None) -> ConfigError:
    k, got, want = mism[0]
    msg = (f"{flag} {path} does not fit {_describe(expected.get('model'), expected.get('num_outputs'), None)}: "
           f"{len(mism)} tensors differ in shape (e.g. {k}: file {got}, model {want})")
    if guess is not None:
        name, outputs = guess
        hint = []
        if name != expected.get("model"):
            hint.append(f"--model {name}" if flag != "--teacher-weights" else f"--teacher {name}")
        if outputs is not None and outputs != expected.get("num_outputs"):
            hint.append(f"{outputs} outputs")
        if hint:
            msg += f"; it looks like {name} with {outputs} outputs: use {' and '.join(hint)}"
    return ConfigError(msg)


def load_weights(model: torch.nn.Module, path: str, *, flag: str = "--weights", model_name: Optional[str] = None,
                 num_outputs: Optional[int] = None, void: Optional[str] = None, allow_partial: bool = False,
                 require_head: bool = False, min_fraction: float = MIN_LOADED_FRACTION) -> WeightsReport:
    """Weights into ``model`` from a transkd_fast checkpoint (full or ``model.pt``) or any checkpoint
    :func:`transkd_fast.models.load_pretrained` understands (NVlabs, TransKD, mmseg, HF).

    Refuses (:class:`ConfigError`, naming ``flag`` and the file) a file recorded for another
    ``model_name`` / ``num_outputs`` / ``void``, tensors of other shapes, fewer than
    ``min_fraction`` of the model's tensors loaded (a complete backbone is accepted: the
    ImageNet-pretrained start), and with ``require_head`` a missing decode head — unless
    ``allow_partial``. Returns the :class:`WeightsReport`.
    """
    obj = _torch_load(path, "weights")
    expected = {"model": model_name, "num_outputs": num_outputs, "void": void}
    target = _model_tensors(model)
    full_target = model.state_dict()
    if isinstance(obj, dict) and obj.get("format") in (FORMAT, FORMAT + ":weights"):
        if obj["format"] == FORMAT:
            state, cfg = obj["model"], obj.get("config") or {}
            recorded = {"model": cfg.get("model"), "void": cfg.get("void")}
            source = f"transkd_fast {obj.get('kind', '?')} checkpoint, step {obj.get('step')}"
            if obj.get("kind") == "distill":  # the student inside a distiller checkpoint
                state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
        else:
            state, recorded = obj["model"], dict(obj.get("meta") or {})
            source = "transkd_fast weights"
        _check_identity(path, flag, recorded, expected)
        mism = _shape_mismatches(full_target, state)
        if mism:
            raise _mismatch_error(flag, path, mism, expected, guess_model(state))
        accepted = {k: v for k, v in state.items() if k in full_target}
        report = WeightsReport(path, source, sum(1 for k in accepted if k in target), len(target),
                               missing=[k for k in target if k not in accepted],
                               unexpected=[k for k in state if k not in full_target])
        loaded_state = accepted
    else:
        from transkd_fast.models import load_pretrained
        from transkd_fast.models.checkpoints import CheckpointError, convert_state_dict

        tensors = _unwrap(obj)
        if not tensors:
            raise ConfigError(f"{flag} {path} holds no tensors (looked at the top level, 'state_dict' and 'model')")
        converted = convert_state_dict(tensors)[0]
        mism = _shape_mismatches(full_target, converted)
        if mism:
            raise _mismatch_error(flag, path, mism, expected, guess_model(tensors))
        try:
            res = load_pretrained(model, tensors)
        except CheckpointError as e:  # nothing of the model in it, or another model's file
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            raise ConfigError(f"{flag} {path}: {'; '.join(lines)}") from e
        loaded = res.loaded if isinstance(res.loaded, int) else len(res.loaded)
        missing = [k for k in res.missing if not k.endswith("num_batches_tracked")]
        unexpected = list(res.unexpected) if not isinstance(res.unexpected, int) else ["?"] * res.unexpected
        ignored = res.ignored if isinstance(getattr(res, "ignored", 0), int) else len(res.ignored)
        total = getattr(res, "total", None) or len(target)
        report = WeightsReport(path, f"{getattr(res, 'format', 'foreign')} checkpoint", loaded, int(total),
                               missing=missing, unexpected=unexpected, ignored=ignored)
        loaded_state = None
    if not allow_partial:
        backbone_start = report.backbone_complete and len(report.head_missing) == len(report.missing)
        if report.fraction < min_fraction and not (backbone_start and not require_head):
            raise ConfigError(f"{flag} {report.summary()}: not weights for this model; "
                              "pass --allow-partial-weights to use them anyway")
        if require_head and report.head_missing:
            raise ConfigError(f"{flag} {path}: the decode head is missing ({len(report.head_missing)} tensors: a "
                              "backbone-only file?), it would run with a random head; pass --allow-partial-weights "
                              "to accept")
    if loaded_state is not None:
        model.load_state_dict(loaded_state, strict=False)
    return report


def save_weights(model: torch.nn.Module, path: str, meta: Optional[dict] = None) -> None:
    """The deployable model alone (``model.pt``): its state dict and a little metadata."""
    atomic_save({"format": FORMAT + ":weights", "model": model.state_dict(), "meta": meta or {}}, path)
