"""Checkpoints: written atomically, holding everything an exact resume needs.

A checkpoint is a dict ``{"format", "kind", "step", "model", "optimizer", "scheduler",
"scaler", "rng", "config"}``; ``rng`` is the list of every rank's ``{"torch", "numpy",
"python", "cuda"}`` generator states. :func:`save_checkpoint` writes ``<path>.tmp`` and then
``os.replace``s it over ``<path>``: a crash or Ctrl-C during the write leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
import random
from typing import Any, Optional

import numpy as np
import torch

FORMAT = "transkd_fast.checkpoint/1"


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


def save_checkpoint(path: str, *, kind: str, step: int, model: torch.nn.Module, optimizer, scheduler,
                    scaler=None, rng: Optional[list] = None, config: Optional[dict] = None) -> None:
    atomic_save({
        "format": FORMAT,
        "kind": kind,
        "step": int(step),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng if rng is not None else [rng_state()],
        "config": config or {},
    }, path)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # RNG states hold numpy arrays and tuples: not loadable with weights_only=True.
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a transkd_fast training checkpoint (no format tag {FORMAT!r})")
    return ckpt


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Weights into ``model`` from a transkd_fast checkpoint (full or ``model.pt``) or any checkpoint
    :func:`transkd_fast.models.load_pretrained` understands (NVlabs, TransKD, mmseg, HF)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        state = obj["model"]
        if obj.get("kind") == "distill":  # the student inside a distiller checkpoint
            state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
        model.load_state_dict(state)
        return
    if isinstance(obj, dict) and obj.get("format") == FORMAT + ":weights":
        model.load_state_dict(obj["model"])
        return
    from transkd_fast.models import load_pretrained

    load_pretrained(model, obj)


def save_weights(model: torch.nn.Module, path: str, meta: Optional[dict] = None) -> None:
    """The deployable model alone (``model.pt``): its state dict and a little metadata."""
    atomic_save({"format": FORMAT + ":weights", "model": model.state_dict(), "meta": meta or {}}, path)
