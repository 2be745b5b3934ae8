"""Benchmark session set-up shared by every ``benchmarks/test_*.py``.

Benchmarks run compiled kernels only: the Triton interpreter is not a benchmark, so
``TRITON_INTERPRET`` is not set here (triton backends are skipped on CPU). Each run's
machine info (in ``--benchmark-json``) records the device and library versions.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CUDA when available, else CPU."""
    return bench_device()


def pytest_benchmark_update_machine_info(config, machine_info):
    dev = bench_device()
    machine_info["torch_device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    machine_info["torch_version"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    try:
        import triton

        machine_info["triton_version"] = triton.__version__
    except ImportError:
        pass
