"""C kernel (CPU) of LayerNorm over the last dimension, rows in parallel, for inference.

For ``x [N, C]`` (rows of C contiguous values), fp32 ``w``, ``b`` of C values::

    μ = Σ_c x / C,   σ² = Σ_c (x − μ)² / C   (two passes over the row, fp32)
    y = (x − μ) · 1/√(σ² + eps) · w + b

``x`` and ``y`` share a dtype, fp32 (``float``) or bf16 (``uint16_t`` bits; read into fp32,
``y`` rounded once to nearest even). With AVX-512 (C a multiple of 16) each row runs 16 lanes at
a time, the two sums reduced across lanes; otherwise scalar loops. NaN and ±inf propagate as
IEEE arithmetic makes them (a NaN or inf in a row makes μ or σ² NaN: the whole row is NaN, as
ATen's). Rows are split over ``nthreads`` OpenMP threads (the caller passes
``torch.get_num_threads()``).

Why: ATen's CPU LayerNorm kernel at MiT's stage-1 width (C = 32, 32768 rows at 512×1024) costs
about twice per element what it does at C = 64; this one keeps a row in registers.
"""

from __future__ import annotations

import ctypes

import torch

from . import _cpu_build

SOURCE = _cpu_build.COMMON + r"""
#define DEFINE_LN(NAME, SUF, T, LOAD, STORE)                                                       \
void NAME(const T *x, const float *w, const float *b, T *y, int64_t N, int64_t C, float eps,     \
          int nthreads) {                                                                          \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                             \
    for (int64_t r = 0; r < N; r++) {                                                              \
        const T *xr = x + r * C;                                                                   \
        T *yr = y + r * C;                                                                         \
        float mean, rstd;                                                                          \
        if (VEC && C % 16 == 0) {                                                                  \
            VEC_ROW_##SUF                                                                          \
            continue;                                                                              \
        }                                                                                          \
        float s = 0.0f;                                                                            \
        for (int64_t c = 0; c < C; c++) s += LOAD(xr[c]);                                          \
        mean = s / (float)C;                                                                       \
        float q = 0.0f;                                                                            \
        for (int64_t c = 0; c < C; c++) { float d = LOAD(xr[c]) - mean; q += d * d; }              \
        rstd = 1.0f / sqrtf(q / (float)C + eps);                                                   \
        for (int64_t c = 0; c < C; c++) yr[c] = STORE((LOAD(xr[c]) - mean) * rstd * w[c] + b[c]);  \
    }                                                                                              \
}

#if VEC
#define VEC_ROW(SUF)                                                                               \
    __m512 s = _mm512_setzero_ps();                                                                \
    for (int64_t c = 0; c < C; c += 16) s = _mm512_add_ps(s, vld_##SUF(xr + c));                   \
    mean = _mm512_reduce_add_ps(s) / (float)C;                                                     \
    __m512 m = _mm512_set1_ps(mean), q = _mm512_setzero_ps();                                      \
    for (int64_t c = 0; c < C; c += 16) {                                                          \
        __m512 d = _mm512_sub_ps(vld_##SUF(xr + c), m);                                            \
        q = _mm512_fmadd_ps(d, d, q);                                                              \
    }                                                                                              \
    rstd = 1.0f / sqrtf(_mm512_reduce_add_ps(q) / (float)C + eps);                                 \
    __m512 rs = _mm512_set1_ps(rstd);                                                              \
    for (int64_t c = 0; c < C; c += 16) {                                                          \
        __m512 d = _mm512_mul_ps(_mm512_sub_ps(vld_##SUF(xr + c), m), rs);                         \
        vst_##SUF(yr + c, _mm512_fmadd_ps(d, _mm512_loadu_ps(w + c), _mm512_loadu_ps(b + c)));     \
    }
#define VEC_ROW_f32 VEC_ROW(f32)
#define VEC_ROW_bf16 VEC_ROW(bf16)
#else
#define VEC_ROW_f32
#define VEC_ROW_bf16
#endif

DEFINE_LN(layer_norm_f32, f32, float, f32_load, f32_store)
DEFINE_LN(layer_norm_bf16, bf16, uint16_t, bf16_to_f32, f32_to_bf16)
"""

_FUNCS = {torch.float32: "layer_norm_f32", torch.bfloat16: "layer_norm_bf16"}
_BOUND: dict = {}


def _function(dtype: torch.dtype):
    fn = _BOUND.get(dtype)
    if fn is None:
        fn = getattr(_cpu_build.load("layer_norm", SOURCE), _FUNCS[dtype])
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int]
        fn.restype = None
        _BOUND[dtype] = fn
    return fn


def available() -> None:
    """Build (or load) the library now; raises :class:`_cpu_build.CpuKernelUnavailable`."""
    for dt in _FUNCS:
        _function(dt)


def launch(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor, eps: float, nthreads: int) -> None:
    """Run the kernel: ``x``, ``y`` contiguous ``[..., C]`` of one dtype in ``_FUNCS``; ``w``, ``b``
    contiguous fp32 ``[C]``; ``y`` may be ``x`` (in place)."""
    C = x.shape[-1]
    N = x.numel() // C if C else 0
    _function(x.dtype)(x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(), N, C, eps, nthreads)
