"""Triton kernels of transkd_fast, installed as ``transkd_fast.kernels``.

Each module holds ``@triton.jit`` kernels and their launch helpers for one op, and imports
nothing from ``transkd_fast``. Each also exposes ``compile_specs()``: the (kernel, signature,
constexprs, launch options) tuples that ``transkd_fast.compile_check`` builds ahead of time
for sm_80 and sm_90.
"""
