"""TensorBoard event files beside ``metrics.jsonl`` (``--tensorboard``, main rank only).

The same scalars as the JSONL, at the record's ``step``:

- a ``train`` record: ``train/<term>`` for each loss term (``loss``, ``ce``, the KD terms) and
  ``train/lr``;
- an ``eval`` record: ``eval/miou``, ``eval/pixel_acc`` and ``eval/iou/<k>_<class name>`` (NaN
  for a class absent from the split, where the JSONL has ``null``).

Other records (the header, ``resume``, ``nonfinite``) are not curves and are not written.

Nothing is lost on an interrupt or an error: each record is flushed to disk as it is written
(log records come every ``--log-every`` steps, so this costs as little as the JSONL's append).

Resume. :func:`~transkd_fast.engine.trainer.truncate_log` cuts the JSONL back to the checkpoint's
step ``s``; here the writer opens with ``purge_step = s + 1``, so TensorBoard hides every event of
the earlier files at steps ``> s`` and the resumed curves hold each step once. A run resumed with
``--tensorboard`` that was started without it gets its JSONL records up to ``s`` replayed into
the new file first, so the curves start at step 1. ``--overwrite`` moves ``tensorboard/`` aside
with the rest of the run.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Optional, Sequence

from transkd_fast.engine.config import ConfigError

INSTALL_HINT = "pip install 'transkd-fast[tensorboard]'"
DIRNAME = "tensorboard"


def require_tensorboard(cfg) -> None:
    """With ``cfg.tensorboard``: a :class:`ConfigError` now, before the run touches anything,
    when the tensorboard package is missing."""
    if not getattr(cfg, "tensorboard", False):
        return
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"--tensorboard needs the tensorboard package ({e}); install it: {INSTALL_HINT}") from e


def scalars(rec: dict, class_names: Sequence[str] = ()) -> list[tuple[str, float]]:
    """The ``(tag, value)`` pairs of one metrics record (empty for records that are not curves)."""
    event = rec.get("event")
    if event == "train":
        out = [(f"train/{k}", v) for k, v in rec["terms"].items()]
        return out + [("train/lr", rec["lr"])]
    if event == "eval":
        out = [("eval/miou", rec["miou"]), ("eval/pixel_acc", rec["pixel_acc"])]
        for k, v in enumerate(rec.get("iou") or ()):
            name = class_names[k] if k < len(class_names) else str(k)
            out.append((f"eval/iou/{k:02d}_{name.replace(' ', '_')}", v))
        return out
    return []


class TensorBoardLog:
    """One ``SummaryWriter`` on ``<output_dir>/tensorboard``; see the module docstring."""

    def __init__(self, output_dir: str, start_step: int = 0, class_names: Sequence[str] = (),
                 log_path: Optional[str] = None):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = os.path.join(output_dir, DIRNAME)
        had_events = bool(glob.glob(os.path.join(log_dir, "events.out.tfevents.*")))
        self.class_names = tuple(class_names)
        self.writer = SummaryWriter(log_dir, purge_step=start_step + 1 if start_step > 0 else None)
        if start_step > 0 and not had_events and log_path and os.path.isfile(log_path):
            with open(log_path, encoding="utf-8") as f:  # already cut back to start_step
                for line in f:
                    if line.strip():
                        self.add(json.loads(line), flush=False)
        self.writer.flush()

    def add(self, rec: dict, flush: bool = True) -> None:
        step = int(rec.get("step", 0))
        for tag, value in scalars(rec, self.class_names):
            self.writer.add_scalar(tag, math.nan if value is None else float(value), global_step=step)
        if flush:
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tensorboard(cfg, main: bool, start_step: int, class_names: Sequence[str],
                     log_path: Optional[str]) -> Optional[TensorBoardLog]:
    """The run's writer on the main rank with ``cfg.tensorboard``, else None."""
    if not (main and getattr(cfg, "tensorboard", False)):
        return None
    return TensorBoardLog(cfg.output_dir, start_step, class_names, log_path)


def close_tensorboard(tb: Optional[TensorBoardLog]) -> None:
    if tb is not None:
        tb.close()
