"""Whether a C kernel of the CPU inference paths is on and builds here (shared by its ops).

``TRANSKD_FAST_CPU_KERNELS=0`` turns every C kernel off (read at each call, so a test or a
benchmark can compare both routes in one process). Otherwise the first call builds or loads the
kernel (:mod:`transkd_fast.kernels._cpu_build`); a build failure warns once per kernel, with the
reason (no compiler, the compiler's error), and the kernel stays off for the process: callers
then take their ATen route, which computes the same math.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

from transkd_fast.kernels import _cpu_build

_STATE: dict[str, tuple[bool, str]] = {}
OFF_REASON = "the CPU kernels are turned off (TRANSKD_FAST_CPU_KERNELS=0)"


def kernels_enabled() -> bool:
    return os.environ.get("TRANSKD_FAST_CPU_KERNELS", "1") != "0"


def available(name: str, kernel: ModuleType, route: str) -> bool:
    """``kernel.available()`` succeeded (cached per ``name``) and the kernels are enabled;
    ``route`` names what runs instead, for the warning."""
    if not kernels_enabled():
        return False
    if name not in _STATE:
        try:
            kernel.available()
            _STATE[name] = (True, "")
        except _cpu_build.CpuKernelUnavailable as e:
            _STATE[name] = (False, str(e))
            warnings.warn(f"transkd_fast: the CPU kernel {name} is unavailable, {route} (same math, slower): {e}",
                          RuntimeWarning, stacklevel=3)
    return _STATE[name][0]


def why_unavailable(name: str) -> str:
    if not kernels_enabled():
        return OFF_REASON
    return _STATE.get(name, (False, "not built yet"))[1]
