"""upsample_add_relu (the folded head's middle on CPU): the C kernel against the reference and fp64.

Shapes: the B0 head at a small input (E = 256: the AVX-512 path, 16 lanes per step) and odd ones:
E = 24 and 5 (the scalar path), stage maps of odd sizes, a source as large as the output (the
copied axis), a 1×1 source, a source larger than the output (downsampling), batch 3, one-row
tiles. Fresh random data each case (never zeros). The op has no backward: grad is refused.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from transkd_fast.kernels import _cpu_build

from transkd_fast.ops import _cpu
from transkd_fast.ops import upsample_add_relu as uar
from transkd_fast.ops.upsample_add_relu import upsample_add_relu, upsample_add_relu_reference

# (B, H, W, E, source sizes, row_offset, rows)
CASES = [
    (1, 32, 64, 256, [(16, 32), (8, 16), (4, 8)], 0, 32),       # B0's head at 128×256, one tile
    (1, 32, 64, 256, [(16, 32), (8, 16), (4, 8)], 9, 7),        # a tile inside
    (3, 37, 53, 24, [(19, 27), (10, 14), (5, 7)], 5, 11),       # odd everything, scalar path
    (2, 23, 31, 16, [(23, 31), (1, 1), (12, 16)], 0, 23),       # same-size source, 1×1 source
    (1, 9, 13, 5, [(17, 29), (3, 2)], 8, 1),                    # downsampling, a one-row tile
    (2, 6, 7, 48, [], 1, 4),                                    # no source: ReLU(acc)
]


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _make(B, H, W, E, sizes, row0, R, dtype):
    return _rand(B, R, W, E, dtype=dtype), [_rand(B, h, w, E, dtype=dtype) for h, w in sizes]


def _ref64(acc, sources, size, row0):
    R = acc.shape[1]
    z = acc.double()
    for s in sources:
        up = F.interpolate(s.permute(0, 3, 1, 2).double(), size=size, mode="bilinear", align_corners=False)
        z = z + up.permute(0, 2, 3, 1)[:, row0:row0 + R]
    return torch.relu(z)


@pytest.fixture(autouse=True)
def _kernel_on(monkeypatch):
    monkeypatch.delenv("TRANSKD_FAST_CPU_KERNELS", raising=False)
    assert uar.kernel_available(), "the C kernel must build here (a C compiler, as Triton needs)"


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-{c[1]}x{c[2]}x{c[3]}-n{len(c[4])}-r{c[5]}+{c[6]}")
def test_fp32_matches_reference_and_fp64(case):
    B, H, W, E, sizes, row0, R = case
    acc, srcs = _make(B, H, W, E, sizes, row0, R, torch.float32)
    out = upsample_add_relu(acc, srcs, (H, W), row0)
    ref = upsample_add_relu_reference(acc, srcs, (H, W), row0)
    ref64 = _ref64(acc, srcs, (H, W), row0)
    assert out.dtype == torch.float32 and out.shape == acc.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # against fp64: no worse than the fp32 reference itself, within a few fp32 roundings
    err, ref_err = (out.double() - ref64).abs().max().item(), (ref.double() - ref64).abs().max().item()
    assert err <= max(4 * ref_err, 4e-6), (err, ref_err)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-{c[1]}x{c[2]}x{c[3]}-n{len(c[4])}-r{c[5]}+{c[6]}")
def test_bf16_one_rounding_of_the_fp32_sum(case):
    """bf16 in and out: the fp32 sum rounded once. Against the fp64 value of the same bf16
    inputs: at most one bf16 rounding (half a unit in the last place of 8 bits, 2^-8 relative)
    plus the fp32 summation's error."""
    B, H, W, E, sizes, row0, R = case
    acc, srcs = _make(B, H, W, E, sizes, row0, R, torch.bfloat16)
    out = upsample_add_relu(acc, srcs, (H, W), row0)
    assert out.dtype == torch.bfloat16
    ref64 = _ref64(acc, srcs, (H, W), row0)
    bound = ref64.abs() * 2.0 ** -8 + 1e-5
    assert ((out.double() - ref64).abs() <= bound).all()
    ref = upsample_add_relu_reference(acc, srcs, (H, W), row0)
    assert (out != ref).float().mean().item() < 0.01  # equal but for rare ties of the rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiles_compose_to_the_whole(dtype):
    B, H, W, E = 2, 29, 41, 32
    sizes = [(15, 21), (8, 11), (4, 6)]
    acc, srcs = _make(B, H, W, E, sizes, 0, H, dtype)
    whole = upsample_add_relu(acc, srcs, (H, W), 0)
    tiles = [upsample_add_relu(acc[:, r0:r0 + 6], srcs, (H, W), r0) for r0 in range(0, H, 6)]
    assert torch.equal(torch.cat(tiles, 1), whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_strided_and_thread_count_agree(dtype):
    B, H, W, E, sizes = 2, 19, 27, 64, [(10, 14), (5, 7)]
    acc, srcs = _make(B, H, W, E, sizes, 3, 9, dtype)
    out = upsample_add_relu(acc, srcs, (H, W), 3)
    # non-contiguous views of the same values (E-last transposed buffers, a sliced source)
    acc_t = acc.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    big = _rand(B, 10, 14, 2 * E, dtype=dtype)
    big[..., 1::2] = srcs[0]
    srcs_t = [big[..., 1::2], srcs[1].transpose(1, 2).contiguous().transpose(1, 2)]
    assert not acc_t.is_contiguous() and not srcs_t[0].is_contiguous()
    assert torch.equal(upsample_add_relu(acc_t, srcs_t, (H, W), 3), out)
    inplace = acc.clone()
    assert upsample_add_relu(inplace, srcs, (H, W), 3, out=inplace) is inplace
    assert torch.equal(inplace, out)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = upsample_add_relu(acc, srcs, (H, W), 3)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one, out)  # every output is computed by one thread, the same way


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E", [32, 7])
def test_nan_and_inf_propagate_as_the_reference(dtype, E):
    """NaN in acc or in a source reaches exactly the outputs the reference makes NaN (a tap of
    zero weight still multiplies: 0·NaN = NaN, as in ATen's kernel); ReLU keeps NaN and +inf and
    maps −inf to 0."""
    B, H, W, sizes = 1, 12, 18, [(6, 9), (3, 5)]
    acc, srcs = _make(B, H, W, E, sizes, 2, 8, dtype)
    acc[0, 1, 3, 2] = float("nan")
    acc[0, 2, 4, 1] = float("inf")
    acc[0, 3, 5, 0] = float("-inf")
    srcs[0][0, 2, 4, 3] = float("nan")
    out = upsample_add_relu(acc, srcs, (H, W), 2)
    ref = upsample_add_relu_reference(acc, srcs, (H, W), 2)
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()
    assert out[0, 2, 4, 1] == float("inf") and out[0, 3, 5, 0] == 0
    fin = ~ref.isnan()
    torch.testing.assert_close(out[fin].float(), ref[fin].float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-5)


def test_refuses_bad_input():
    acc, srcs = _make(1, 8, 10, 16, [(4, 5)], 0, 8, torch.float32)
    cases = [
        (lambda: upsample_add_relu(acc[0], srcs, (8, 10)), ValueError, "4 dimensions"),
        (lambda: upsample_add_relu(acc.half(), [s.half() for s in srcs], (8, 10)), TypeError, "float32 and bfloat16"),
        (lambda: upsample_add_relu(acc.double(), [s.double() for s in srcs], (8, 10)), TypeError, "float32"),
        (lambda: upsample_add_relu(acc, [srcs[0].bfloat16()], (8, 10)), TypeError, "sources\\[0\\] is torch.bfloat16"),
        (lambda: upsample_add_relu(acc, [_rand(1, 4, 5, 8)], (8, 10)), ValueError, "expected \\[1, h, w, 16\\]"),
        (lambda: upsample_add_relu(acc, [_rand(2, 4, 5, 16)], (8, 10)), ValueError, "expected \\[1, h, w, 16\\]"),
        (lambda: upsample_add_relu(acc, srcs, (8, 11)), ValueError, "width must be acc's"),
        (lambda: upsample_add_relu(acc, srcs, (8, 10), 1), ValueError, "outside the output height 8"),
        (lambda: upsample_add_relu(acc, srcs, (8, 10), -1), ValueError, "outside"),
        (lambda: upsample_add_relu(acc, srcs, (8,)), ValueError, "size must be"),
        (lambda: upsample_add_relu(acc, srcs[0], (8, 10)), TypeError, "list or tuple"),
        (lambda: upsample_add_relu(acc.to("meta"), srcs, (8, 10)), ValueError, "CPU tensors"),
        (lambda: upsample_add_relu(acc, srcs, (8, 10), out=acc[:, :4]), ValueError, "out must match"),
        (lambda: upsample_add_relu(acc, srcs, (8, 10), out=acc.transpose(1, 2).contiguous().transpose(1, 2)),
         ValueError, "contiguous"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


def test_no_backward():
    acc = _rand(1, 4, 6, 16).requires_grad_()
    src = [_rand(1, 2, 3, 16)]
    with pytest.raises(RuntimeError, match="inference op"):
        upsample_add_relu(acc, src, (4, 6))
    with torch.no_grad():
        out = upsample_add_relu(acc, src, (4, 6))
    assert not out.requires_grad
    torch.testing.assert_close(out, upsample_add_relu_reference(acc.detach(), src, (4, 6)), rtol=1e-5, atol=1e-5)


def test_turned_off_it_raises_never_swaps(monkeypatch):
    monkeypatch.setenv("TRANSKD_FAST_CPU_KERNELS", "0")
    assert not uar.kernel_available()
    acc, srcs = _make(1, 4, 6, 16, [(2, 3)], 0, 4, torch.float32)
    with pytest.raises(_cpu_build.CpuKernelUnavailable, match="TRANSKD_FAST_CPU_KERNELS=0"):
        upsample_add_relu(acc, srcs, (4, 6))


def test_build_failure_warns_once_with_the_reason(monkeypatch):
    def broken():
        raise _cpu_build.CpuKernelUnavailable("no C compiler found (test)")

    monkeypatch.setattr(_cpu, "_STATE", {})
    monkeypatch.setattr(uar._kernel, "available", broken)
    with pytest.warns(RuntimeWarning, match="ATen route.*no C compiler found \\(test\\)"):
        assert not uar.kernel_available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not uar.kernel_available()  # once per process


def test_builder_caches_reports_errors_and_shares_torchs_openmp(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSKD_FAST_CPU_KERNEL_CACHE", str(tmp_path))
    src = "int probe_answer(void) { return 42; }\n"
    lib = _cpu_build.load("probe", src)
    assert lib.probe_answer() == 42
    built = list(tmp_path.glob("probe-*.so"))
    assert len(built) == 1
    # a new process (the memo cleared) loads the cached file and compiles nothing
    monkeypatch.setattr(_cpu_build, "_LOADED", {})
    real_run = _cpu_build.subprocess.run

    def no_compile(cmd, *a, **k):
        assert "--version" in cmd, f"compiled again: {cmd}"
        return real_run(cmd, *a, **k)

    monkeypatch.setattr(_cpu_build.subprocess, "run", no_compile)
    assert _cpu_build.load("probe", src).probe_answer() == 42
    monkeypatch.setattr(_cpu_build.subprocess, "run", real_run)
    with pytest.raises(_cpu_build.CpuKernelUnavailable, match="building broken failed"):
        _cpu_build.load("broken", "int f(void) { return }\n")
    monkeypatch.setattr(_cpu_build.shutil, "which", lambda name: None)
    with pytest.raises(_cpu_build.CpuKernelUnavailable, match="no C compiler"):
        _cpu_build.load("other", "int g(void) { return 1; }\n")
    # one OpenMP runtime in the process: the kernels link the libgomp torch loaded
    with open("/proc/self/maps") as f:
        gomp = {line.rsplit(None, 1)[-1] for line in f if re.search(r"libgomp[^/]*$", line.strip())}
    assert len(gomp) <= 1, gomp
