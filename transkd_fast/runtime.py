"""Process-level settings for CPU training: the glibc allocator.

PyTorch has no caching allocator on CPU: every tensor is a ``malloc`` and every free a
``free``. glibc serves large blocks with fresh ``mmap`` pages and gives freed memory back to
the kernel, so each training step touches its activation-sized buffers for the first time
again and pays a page fault per 4 KiB page (about 1 µs each on this project's VMs: a
TransKD-Base step at 2×3×256×512 took ~40–90 k faults, 50–80 ms of a ~700 ms step).

:func:`tune_cpu_allocator` sets three ``mallopt`` parameters so that freed memory stays in the
process and is reused by the next step (what tcmalloc or the CUDA caching allocator do;
jemalloc only with its page decay turned off): ``M_MMAP_THRESHOLD`` = 32 MiB (blocks below
it come from the heap, not from fresh mmaps; 32 MiB is glibc's ceiling for this setting),
``M_MMAP_MAX`` = 0 (no block is served by mmap at all, so the blocks of 32 MiB and more, which
the threshold cannot reach, come from the heap too) and ``M_TRIM_THRESHOLD`` = 1 GiB (free heap
memory below that is kept). Peak RSS is essentially unchanged (the memory is reused, not added);
the process simply does not shrink between steps. Values computed are unchanged: only where the
bytes live differs.

Why ``M_MMAP_MAX``: SegFormer's inference at 512×1024 has 32 MiB buffers (the head's
``[1, 128·256, 256]`` fp32 maps) and at 1024×2048 many of 64–128 MiB; each was a fresh mmap
per call, faulted in page by page. On the 2-core AMD EPYC (Zen 3, AVX2) VM a fresh 32 MiB
buffer cost 18 ms to fill against 2 ms reused, and B0 at 512×1024 took 8192 faults per call
(one such buffer) where it now takes none.

The training engine calls it on CPU runs (``TrainConfig.cpu_allocator = "tuned"``, the
default; ``"default"`` leaves glibc alone), and so do ``evaluate`` and ``predict`` on CPU. It is
a no-op returning ``False`` where glibc's ``mallopt`` is not available (macOS, Windows, musl).
Under a preloaded allocator (``LD_PRELOAD`` of tcmalloc or jemalloc) the call still succeeds and
changes nothing: glibc's heap is not used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's maximum for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024

_lock = threading.Lock()
_tuned = False


def _libc_mallopt():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def tune_cpu_allocator() -> bool:
    """Keep freed heap memory for reuse (see the module docstring). Idempotent.

    Returns True when glibc accepted the settings (now or on an earlier call), False where
    ``mallopt`` is unavailable. Raises RuntimeError if glibc rejects a setting.
    """
    global _tuned
    with _lock:
        if _tuned:
            return True
        mallopt = _libc_mallopt()
        if mallopt is None:
            return False
        for param, value, name in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES, "M_MMAP_THRESHOLD"),
                                   (M_MMAP_MAX, 0, "M_MMAP_MAX"),
                                   (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES, "M_TRIM_THRESHOLD")):
            if mallopt(param, value) != 1:
                raise RuntimeError(f"glibc rejected mallopt({name}, {value})")
        _tuned = True
        return True


def cpu_allocator_tuned() -> bool:
    """Whether :func:`tune_cpu_allocator` has taken effect in this process."""
    return _tuned
