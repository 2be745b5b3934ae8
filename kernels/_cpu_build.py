"""Build and load the C kernels of the CPU inference paths (``ctypes``, no torch headers).

A C source string is compiled once per (source, compiler, flags, CPU) with the system C
compiler into a shared library under the cache folder, then loaded with :mod:`ctypes`. The
same compiler Triton already needs for its launchers (``$CC``, else ``cc`` / ``gcc``), in a
second or two; later processes load the cached file.

Why C and not ATen ops: the fused loops read and write each element once, where a chain of
ATen calls makes one pass over memory per call. Why ctypes and not a torch C++ extension: no
torch headers to compile (a minute per build) and no ninja; the kernels take raw pointers.

Flags: ``-O3 -march=native`` (the library is built on the machine that runs it; the CPU's
flags are part of the cache key), never ``-ffast-math`` (NaN must propagate, rounding must be
IEEE's). ``-fopenmp``, linked against the OpenMP runtime already in the process (PyTorch's own
``libgomp``) so the kernels share torch's thread pool instead of starting a second one; the
caller passes the thread count (``torch.get_num_threads()``).

Cache folder: ``$TRANSKD_FAST_CPU_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/transkd_fast/cpu_kernels``
(``~/.cache/...``). Writes are atomic (a temporary file renamed), so concurrent processes at
worst build twice.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

# Shared by every kernel source: scalar bf16 <-> fp32 (bf16 as uint16_t bits; round to nearest
# even, NaN -> 0x7fc0 as torch's conversion), and where the compiler targets AVX-512 (VEC 1)
# the same 16 lanes at a time.
COMMON = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

static inline float bf16_to_f32(uint16_t v) {
    union { uint32_t u; float f; } x = { (uint32_t)v << 16 }; return x.f;
}
static inline uint16_t f32_to_bf16(float f) {
    union { float f; uint32_t u; } x = { f };
    uint32_t rne = (x.u + 0x7fffu + ((x.u >> 16) & 1u)) >> 16;
    return (f != f) ? (uint16_t)0x7fc0 : (uint16_t)rne;
}
static inline float f32_load(float v) { return v; }
static inline float f32_store(float v) { return v; }

#if defined(__AVX512F__)
#include <immintrin.h>
#define VEC 1
static inline __m512 vld_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline void vst_f32(float *p, __m512 v) { _mm512_storeu_ps(p, v); }
static inline __m512 vld_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline void vst_bf16(uint16_t *p, __m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(r));
}
#else
#define VEC 0
#endif
"""

FLAGS = ["-O3", "-march=native", "-std=c11", "-fPIC", "-fopenmp", "-Wall"]
_LOADED: dict[str, ctypes.CDLL] = {}


class CpuKernelUnavailable(RuntimeError):
    """The C kernel cannot be built or loaded here (no compiler, a compile error, ...)."""


def cache_dir() -> Path:
    env = os.environ.get("TRANSKD_FAST_CPU_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "transkd_fast" / "cpu_kernels"


def compiler() -> str:
    for cand in (os.environ.get("CC"), "cc", "gcc"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    raise CpuKernelUnavailable("no C compiler found ($CC, cc or gcc on PATH)")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _loaded_openmp() -> str | None:
    """Path of the OpenMP runtime (libgomp) mapped into this process, if any (torch's)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1]
                if "libgomp" in os.path.basename(path) and os.path.exists(path):
                    return path
    except OSError:
        pass
    return None


def load(name: str, source: str) -> ctypes.CDLL:
    """The shared library built from ``source`` (cached); raises :class:`CpuKernelUnavailable`."""
    memo = hashlib.sha256(f"{name}\0{source}".encode()).hexdigest()
    if memo in _LOADED:
        return _LOADED[memo]
    cc = compiler()
    omp = _loaded_openmp()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    key = hashlib.sha256("\0".join([source, cc, version, " ".join(FLAGS), str(omp), _cpu_flags()]).encode())
    path = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src, obj, lib = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.o", Path(tmp) / f"{name}.so"
            src.write_text(source)
            # Link against the runtime torch loaded (by path): one OpenMP pool in the process.
            link = [omp, f"-Wl,-rpath,{os.path.dirname(omp)}"] if omp else ["-fopenmp"]
            for cmd in ([cc, *FLAGS, "-c", str(src), "-o", str(obj)],
                        [cc, "-shared", str(obj), "-o", str(lib), *link, "-lm"]):
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode:
                    raise CpuKernelUnavailable(f"building {name} failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
            os.replace(lib, path)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise CpuKernelUnavailable(f"loading {path} failed: {e}") from None
    _LOADED[memo] = lib
    return lib
