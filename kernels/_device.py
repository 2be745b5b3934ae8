"""Device facts the launchers read, with one override for launch recording.

The launchers size their grids from the GPU's SM count (split factors, programs per SM). A
launch recorded on CPU tensors (``transkd_fast.compile_check``) must take the grid decisions
of the GPU it models, so the recorder sets :data:`EMULATED_SM_COUNT` (108 for A100 / sm_80,
132 for H100/H200 / sm_90) while it runs; otherwise CPU tensors (the interpreter) get the
caller's small default, which keeps interpreter tests on the split paths at tiny sizes.
"""

from __future__ import annotations

from typing import Optional

import torch

EMULATED_SM_COUNT: Optional[int] = None


def sm_count(device: torch.device, cpu_default: int) -> int:
    """Streaming multiprocessors of ``device``; on CPU the emulated count, else ``cpu_default``."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return EMULATED_SM_COUNT if EMULATED_SM_COUNT is not None else cpu_default
