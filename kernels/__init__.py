"""Triton kernels of transkd_fast (and the C kernels of its CPU inference paths), installed as
``transkd_fast.kernels``.

Each module holds ``@triton.jit`` kernels and their launch helpers for one op, and imports
nothing from ``transkd_fast`` (``_device`` holds the SM count the launchers size grids by).
``transkd_fast.compile_check`` builds them ahead of time for sm_80 and sm_90 from recorded
launches: the real op calls, bound by Triton's own binder, never hand-written signatures.
``upsample_add_relu`` and ``layer_norm`` are C source instead, built on first use by ``_cpu_build`` with the
system compiler (the machine's own instruction set) and called through ``ctypes``.
"""
