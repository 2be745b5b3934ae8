"""Test session set-up.

Triton reads ``TRITON_INTERPRET`` when it is imported, so it is set here, before any test
module imports triton: kernel tests run in Triton's interpreter on CPU tensors. Compile
checks run in a child process without it (``transkd_fast.compile_check``).

``TRANSKD_TEST_DEVICE=cuda`` (CUDA test mode, ``scripts/gpu_check.sh``): the interpreter stays
off and the op tests put their tensors on the GPU (``tests.helpers.DEVICE``), so the compiled
kernels run; tests that need the interpreter skip.
"""

import os

if os.environ.get("TRANSKD_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_backend():
    """Fresh random data per test (seeded for reproducibility) and the backend restored."""
    import transkd_fast

    torch.manual_seed(torch.randint(0, 2**31 - 1, (1,)).item() if os.environ.get("TRANSKD_FAST_RANDOM_SEED") else 0)
    previous = transkd_fast.get_backend()
    yield
    transkd_fast.set_backend(previous)

