"""transkd_fast: a fast, faithful implementation of TransKD.

Triton kernels for SegFormer's efficient attention, the CSF fusion and the KD losses,
the MiT/SegFormer and PVTv2 models, the TransKD modules, and a training engine.
"""

from transkd_fast.backend import (
    BACKENDS,
    BackendError,
    get_backend,
    set_backend,
    use_backend,
)

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendError", "get_backend", "set_backend", "use_backend", "__version__"]
