"""C kernel (CPU) of the folded SegFormer head's middle: bilinear upsampling of the deeper
stages, the sum with stage 1, and the ReLU, in one pass.

For token-layout maps (channels last) ``acc [B, R, W, E]`` (rows ``row0 … row0+R−1`` of an
``H × W`` grid) and sources ``s_i [B, h_i, w_i, E]``::

    z[b, r, x, :] = ReLU(acc[b, r, x, :] + Σ_i up_i[b, row0 + r, x, :])
    up_i = bilinear(s_i → H × W), align_corners=False, sizes given (no scale factors)

The bilinear weights are ATen's (``upsample_bilinear2d``, fp32 arithmetic): per axis
``scale = in / out``, ``src = max(scale·(o + ½) − ½, 0)``, ``i0 = ⌊src⌋``,
``i1 = i0 + (i0 < in − 1)``, ``λ1 = clamp(src − i0, 0, 1)``, ``λ0 = 1 − λ1``; an axis with
``in == out`` is copied (``i0 = i1 = o``, ``λ0 = 1``), as ATen does. Separable, as ATen's
kernel: each source row a thread needs is interpolated along the width once,
``g[y, x] = λ0x·s[y, x0] + λ1x·s[y, x1]`` (fp32, kept in one of two per-source row slots while
output rows advance), then each output pixel adds ``λ0y·g[y0, x] + λ1y·g[y1, x]`` per source.
The slots (``2·n·W·E`` floats per thread, 1.5 MiB for B0's head at 512×1024) stay allocated
between calls, per OpenMP thread.
Channel loops run 16 lanes at a time with AVX-512 (E a multiple of 16, the compiler targeting
it), scalar otherwise.

dtypes: fp32 (``float``) or bf16 (``uint16_t`` bits) for ``acc``, the sources and ``z`` alike;
the sum is fp32, and a bf16 ``z`` is rounded once, to nearest even (NaN stays NaN, as
``torch``'s conversion). ReLU is ``x < 0 ? 0 : x``: NaN propagates, as ``torch.relu``.

Threads: rows ``(b, r)`` are split over ``nthreads`` OpenMP threads (the caller passes
``torch.get_num_threads()``). Every pointer is to contiguous memory; the caller checks.
"""

from __future__ import annotations

import ctypes

import torch

from . import _cpu_build

SOURCE = _cpu_build.COMMON + r"""
/* ATen's source index and weights for output index o of an in -> out resize (fp32). */
static void axis_weights(int64_t in, int64_t out, int64_t o, int64_t *i0, int64_t *i1, float *l0, float *l1) {
    if (in == out) { *i0 = o; *i1 = o; *l0 = 1.0f; *l1 = 0.0f; return; }
    float scale = (float)in / (float)out;
    float src = scale * ((float)o + 0.5f) - 0.5f;
    if (src < 0.0f) src = 0.0f;
    int64_t a = (int64_t)src;
    if (a > in - 1) a = in - 1;
    *i0 = a;
    *i1 = a + (a < in - 1 ? 1 : 0);
    float lam = src - (float)a;
    if (lam < 0.0f) lam = 0.0f;
    if (lam > 1.0f) lam = 1.0f;
    *l1 = lam; *l0 = 1.0f - lam;
}

/* Channel loops: dst = l0*a + l1*b (a source row's width pass, into fp32), and one output pixel
   o = relu(acc + sum_j w_j * row_j). AVX-512 versions (VEC) for E a multiple of 16; max(0, v)
   returns v when v is NaN (its second operand), as torch.relu does. */

#define DEFINE_LOOPS(SUF, T, LOAD, STORE)                                                          \
static void width_row_##SUF(const T *a, const T *b, float l0, float l1, float *dst, int64_t E) {   \
    int64_t c = 0;                                                                                 \
    if (VEC && E % 16 == 0) {                                                                      \
        VEC_WIDTH_##SUF                                                                            \
    }                                                                                              \
    for (; c < E; c++) dst[c] = l0 * LOAD(a[c]) + l1 * LOAD(b[c]);                                 \
}                                                                                                  \
static void out_pixel_##SUF(const T *a, T *o, int64_t E, int m, const float *const *rows,          \
                            const float *w, int64_t off) {                                         \
    int64_t c = 0;                                                                                 \
    if (VEC && E % 16 == 0) {                                                                      \
        VEC_PIXEL_##SUF                                                                            \
    }                                                                                              \
    for (; c < E; c++) {                                                                           \
        float v = LOAD(a[c]);                                                                      \
        for (int j = 0; j < m; j++) v += w[j] * rows[j][off + c];                                  \
        o[c] = STORE(v < 0.0f ? 0.0f : v);                                                         \
    }                                                                                              \
}

#if VEC
#define VEC_WIDTH(SUF)                                                                             \
    __m512 v0 = _mm512_set1_ps(l0), v1 = _mm512_set1_ps(l1);                                       \
    for (; c < E; c += 16)                                                                         \
        vst_f32(dst + c, _mm512_fmadd_ps(v1, vld_##SUF(b + c), _mm512_mul_ps(v0, vld_##SUF(a + c))));
#define VEC_PIXEL(SUF)                                                                             \
    const __m512 zero = _mm512_setzero_ps();                                                       \
    for (; c < E; c += 16) {                                                                       \
        __m512 v = vld_##SUF(a + c);                                                               \
        for (int j = 0; j < m; j++) v = _mm512_fmadd_ps(_mm512_set1_ps(w[j]), vld_f32(rows[j] + off + c), v); \
        vst_##SUF(o + c, _mm512_max_ps(zero, v));                                                  \
    }
#define VEC_WIDTH_f32 VEC_WIDTH(f32)
#define VEC_WIDTH_bf16 VEC_WIDTH(bf16)
#define VEC_PIXEL_f32 VEC_PIXEL(f32)
#define VEC_PIXEL_bf16 VEC_PIXEL(bf16)
#else
#define VEC_WIDTH_f32
#define VEC_WIDTH_bf16
#define VEC_PIXEL_f32
#define VEC_PIXEL_bf16
#endif

DEFINE_LOOPS(f32, float, f32_load, f32_store)
DEFINE_LOOPS(bf16, uint16_t, bf16_to_f32, f32_to_bf16)

/* Each thread's row slots stay allocated between calls (grown when a call needs more): a fresh
   multi-MiB block per call is a fresh mmap, and its page faults cost more than the kernel. */
static _Thread_local float *slots_buf = NULL;
static _Thread_local size_t slots_cap = 0;
static float *row_slots(size_t n) {
    if (n > slots_cap) {
        free(slots_buf);
        slots_buf = (float *)malloc(sizeof(float) * n);
        slots_cap = slots_buf ? n : 0;
    }
    return slots_buf;
}

/* Separable, as ATen's bilinear: each source row a thread needs is width-interpolated once into
   an fp32 row of W*E (two slots per source, reused while output rows advance), then every
   output pixel adds ly0*row(y0) + ly1*row(y1) of each source to acc. */
#define DEFINE_KERNEL(NAME, SUF, T)                                                                \
int NAME(const T *acc, T *out, int64_t B, int64_t R, int64_t W, int64_t E, int64_t row0,          \
         int64_t H, int n, const T *const *src, const int64_t *hs, const int64_t *ws, int nthreads) { \
    int64_t *xi = (int64_t *)malloc(sizeof(int64_t) * 2 * (size_t)(n * W + 1));                   \
    float *xl = (float *)malloc(sizeof(float) * 2 * (size_t)(n * W + 1));                          \
    int64_t *yi = (int64_t *)malloc(sizeof(int64_t) * 2 * (size_t)(n * R + 1));                   \
    float *yl = (float *)malloc(sizeof(float) * 2 * (size_t)(n * R + 1));                          \
    int failed = !xi || !xl || !yi || !yl;                                                         \
    for (int i = 0; i < n && !failed; i++) {                                                       \
        for (int64_t x = 0; x < W; x++) {                                                          \
            int64_t k = 2 * (i * W + x);                                                           \
            axis_weights(ws[i], W, x, &xi[k], &xi[k + 1], &xl[k], &xl[k + 1]);                     \
        }                                                                                          \
        for (int64_t r = 0; r < R; r++) {                                                          \
            int64_t k = 2 * (i * R + r);                                                           \
            axis_weights(hs[i], H, row0 + r, &yi[k], &yi[k + 1], &yl[k], &yl[k + 1]);              \
        }                                                                                          \
    }                                                                                              \
    if (!failed) {                                                                                 \
        _Pragma("omp parallel num_threads(nthreads) reduction(|:failed)")                          \
        {                                                                                          \
            int nt = omp_get_num_threads(), t = omp_get_thread_num();                              \
            int64_t rows = B * R, lo = rows * t / nt, hi = rows * (t + 1) / nt;                    \
            float *cache = row_slots((size_t)(2 * n) * (size_t)(W * E) + 1);                      \
            int64_t *tag = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * n + 1));               \
            const float **rp = (const float **)malloc(sizeof(float *) * (size_t)(2 * n + 1));      \
            float *wt = (float *)malloc(sizeof(float) * (size_t)(2 * n + 1));                      \
            if (!cache || !tag || !rp || !wt) failed = 1;                                          \
            for (int j = 0; j < 2 * n && !failed; j++) tag[j] = -1;                                \
            for (int64_t br = lo; br < hi && !failed; br++) {                                      \
                int64_t b = br / R, r = br % R;                                                    \
                for (int i = 0; i < n; i++) {                                                      \
                    int64_t ky = 2 * (i * R + r);                                                  \
                    for (int e = 0; e < 2; e++) {                                                  \
                        int64_t want = b * hs[i] + yi[ky + e];                                     \
                        int slot = tag[2 * i] == want ? 0 : tag[2 * i + 1] == want ? 1 : -1;       \
                        if (slot < 0) {                                                            \
                            /* the slot not holding the other row this output row needs */         \
                            int64_t other = b * hs[i] + yi[ky + 1 - e];                            \
                            slot = tag[2 * i] == other ? 1 : 0;                                    \
                            float *dst = cache + (size_t)(2 * i + slot) * (size_t)(W * E);         \
                            const T *s = src[i] + want * ws[i] * E;                                \
                            for (int64_t x = 0; x < W; x++) {                                      \
                                int64_t k = 2 * (i * W + x);                                       \
                                width_row_##SUF(s + xi[k] * E, s + xi[k + 1] * E, xl[k], xl[k + 1], dst + x * E, E); \
                            }                                                                      \
                            tag[2 * i + slot] = want;                                              \
                        }                                                                          \
                        rp[2 * i + e] = cache + (size_t)(2 * i + slot) * (size_t)(W * E);          \
                        wt[2 * i + e] = yl[ky + e];                                                \
                    }                                                                              \
                }                                                                                  \
                for (int64_t x = 0; x < W; x++)                                                    \
                    out_pixel_##SUF(acc + (br * W + x) * E, out + (br * W + x) * E, E, 2 * n, rp, wt, x * E); \
            }                                                                                      \
            free(tag); free(rp); free(wt);                                                         \
        }                                                                                          \
    }                                                                                              \
    free(xi); free(xl); free(yi); free(yl);                                                        \
    return failed;                                                                                 \
}

DEFINE_KERNEL(upsample_add_relu_f32, f32, float)
DEFINE_KERNEL(upsample_add_relu_bf16, bf16, uint16_t)
"""

_FUNCS = {torch.float32: "upsample_add_relu_f32", torch.bfloat16: "upsample_add_relu_bf16"}
_PTR, _I64 = ctypes.c_void_p, ctypes.c_int64


_BOUND: dict = {}


def _function(dtype: torch.dtype):
    fn = _BOUND.get(dtype)
    if fn is None:
        fn = getattr(_cpu_build.load("upsample_add_relu", SOURCE), _FUNCS[dtype])
        fn.argtypes = [_PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_int,
                       ctypes.POINTER(_PTR), ctypes.POINTER(_I64), ctypes.POINTER(_I64), ctypes.c_int]
        fn.restype = ctypes.c_int
        _BOUND[dtype] = fn
    return fn


def available() -> None:
    """Build (or load) the library now; raises :class:`_cpu_build.CpuKernelUnavailable`."""
    for dt in _FUNCS:
        _function(dt)


def launch(acc: torch.Tensor, sources: list, out: torch.Tensor, H: int, row0: int, nthreads: int) -> None:
    """Run the kernel: ``acc``/``out`` ``[B, R, W, E]``, sources ``[B, h_i, w_i, E]``, all
    contiguous CPU tensors of one dtype in ``_FUNCS``; ``out`` may be ``acc`` (in place)."""
    B, R, W, E = acc.shape
    n = len(sources)
    ptrs = (_PTR * max(n, 1))(*[s.data_ptr() for s in sources])
    hs = (_I64 * max(n, 1))(*[s.shape[1] for s in sources])
    ws = (_I64 * max(n, 1))(*[s.shape[2] for s in sources])
    rc = _function(acc.dtype)(acc.data_ptr(), out.data_ptr(), B, R, W, E, row0, H, n, ptrs, hs, ws, nthreads)
    if rc:
        raise MemoryError("upsample_add_relu: the kernel could not allocate its weight tables and row slots")
