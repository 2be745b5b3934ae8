"""Backend dispatch: selection, context manager, env var, and refusal messages."""

import os
import subprocess
import sys

import pytest
import torch

import transkd_fast
from transkd_fast.backend import BackendError, resolve, use_backend
from transkd_fast.ops.attention import efficient_attention


def _qkv(dtype=torch.float32):
    q = torch.randn(1, 5, 2, 16, dtype=dtype)
    k = torch.randn(1, 3, 2, 16, dtype=dtype)
    return q, k, torch.randn_like(k)


def test_set_and_get():
    transkd_fast.set_backend("reference")
    assert transkd_fast.get_backend() == "reference"
    transkd_fast.set_backend("auto")
    assert transkd_fast.get_backend() == "auto"


def test_unknown_backend_names_the_choices():
    with pytest.raises(BackendError, match="unknown backend 'cudnn'.*auto, triton, xformers, torch, reference"):
        transkd_fast.set_backend("cudnn")


def test_use_backend_restores_on_exit_and_on_error():
    transkd_fast.set_backend("torch")
    with use_backend("reference"):
        assert transkd_fast.get_backend() == "reference"
    assert transkd_fast.get_backend() == "torch"
    with pytest.raises(ZeroDivisionError):
        with use_backend("reference"):
            1 / 0
    assert transkd_fast.get_backend() == "torch"


def test_auto_on_cpu_is_torch():
    q, k, v = _qkv()
    assert resolve("efficient_attention", q, k, v, backend="auto") == "torch"


def test_triton_on_cpu_without_interpreter_is_refused_with_reason():
    q, k, v = _qkv()
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with pytest.raises(BackendError) as e:
            resolve("efficient_attention", q, k, v, backend="triton")
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old
    msg = str(e.value)
    assert "transkd_fast::efficient_attention" in msg and "'triton'" in msg
    assert "TRITON_INTERPRET=1" in msg and "CUDA" in msg
    assert "would work here: " in msg and "torch" in msg


def test_xformers_refused_on_cpu_with_reason():
    q, k, v = _qkv()
    with pytest.raises(BackendError, match=r"efficient_attention.*'xformers'.*(not installed|only CUDA)"):
        efficient_attention(q, k, v, backend="xformers")


def test_named_backend_never_falls_back():
    q, k, v = _qkv()
    with use_backend("xformers"):
        with pytest.raises(BackendError):
            efficient_attention(q, k, v)


def test_env_var_sets_default():
    code = "import transkd_fast; print(transkd_fast.get_backend())"
    env = dict(os.environ, TRANSKD_FAST_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["TRANSKD_FAST_BACKEND"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown backend 'bogus'" in bad.stderr


def test_every_op_declares_support_as_data():
    import transkd_fast.ops.attention  # noqa: F401

    ops = transkd_fast.backend.registered_ops()
    assert "efficient_attention" in ops
    for table in ops.values():
        assert "reference" in table.backends and "torch" in table.backends
        for support in table.backends.values():
            assert support.devices and support.dtypes


def _cli():
    from pathlib import Path

    return str(Path(sys.executable).parent / "transkd-fast")


def test_version_and_help_cli():
    out = subprocess.run([_cli(), "--version"], capture_output=True, text=True, check=True)
    assert transkd_fast.__version__ in out.stdout
    out = subprocess.run([_cli(), "--help"], capture_output=True, text=True, check=True)
    assert "usage" in out.stdout.lower()


# ---------------------------------------------------------------------------------------
# Triton launches run on the tensors' CUDA device (fake CUDA tensors: no GPU needed).


def _record_cuda_device(monkeypatch):
    import contextlib

    seen = []

    @contextlib.contextmanager
    def device(d):
        seen.append(torch.device(d))
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    return seen


def test_on_input_device_makes_the_tensors_device_current(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from transkd_fast.backend import on_input_device

    seen = _record_cuda_device(monkeypatch)
    calls = []

    @on_input_device
    def launch(*args, **kwargs):
        calls.append(len(seen))  # how many device switches had happened when the body ran
        return "done"

    with FakeTensorMode():
        a = torch.empty(3, device="cuda:1")
    assert launch(a, 2.0, mode="x") == "done"
    assert seen == [torch.device("cuda:1")] and calls == [1]
    assert launch([a, a], [a]) == "done"  # list arguments (the multi-stage losses)
    assert seen[-1] == torch.device("cuda:1") and calls[-1] == 2
    assert launch(torch.randn(2), a) == "done"  # CPU first tensor: the interpreter, no switch
    assert launch(1, "no tensors") == "done"
    assert len(seen) == 2 and calls[-2:] == [2, 2]


def test_every_triton_launcher_is_guarded():
    """Each op's functions that launch kernels carry the device guard (a new one must too)."""
    import importlib

    found = []
    for name in ("attention", "hcl", "kl_div", "selective_fusion", "weighted_mse"):
        mod = importlib.import_module(f"transkd_fast.ops.{name}")
        for attr, fn in vars(mod).items():
            if attr.startswith("_triton_") and attr != "_triton_check" and callable(fn):
                found.append(f"{name}.{attr}")
                assert getattr(fn, "on_input_device", False), f"{name}.{attr} launches Triton without on_input_device"
    assert len(found) == 12, found


# ---------------------------------------------------------------------------------------
# auto on CUDA: decided per op by evidence, gated on compute capability, logged on request.


def _fake_cuda(*shape):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.empty(*shape, device="cuda:0")


def _op_args(op):
    import transkd_fast.ops  # noqa: F401  (registers every op)
    from transkd_fast.ops import attention, hcl, kl_div, selective_fusion, weighted_mse  # noqa: F401

    if op == "efficient_attention":
        q = _fake_cuda(1, 5, 2, 16)
        return (q, q, q)
    if op in ("selective_pool", "selective_fuse"):
        return (_fake_cuda(1, 8, 4, 4), _fake_cuda(1, 8, 2, 2))
    return (_fake_cuda(1, 8, 4, 4), _fake_cuda(1, 8, 4, 4))


@pytest.mark.parametrize("op, first", [("efficient_attention", "torch"), ("weighted_mse", "torch"),
                                       ("hcl_loss", "triton"), ("kd_kl_div", "triton"),
                                       ("selective_pool", "triton"), ("selective_fuse", "triton")])
def test_auto_on_cuda_follows_the_evidence_table(monkeypatch, op, first):
    from transkd_fast import backend

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    args = _op_args(op)
    assert backend.auto_order(op, "cuda")[0] == first
    assert backend.AUTO_CUDA[op][1]  # every order states its evidence
    if first == "triton" and not backend.triton_available():
        pytest.skip("triton not installed")
    assert resolve(op, *args, backend="auto") == first


def test_triton_refused_below_sm80_in_words(monkeypatch):
    from transkd_fast import backend

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    args = _op_args("hcl_loss")
    with pytest.raises(BackendError, match=r"compute capability 7\.5 is below 8\.0.*sm_80 and sm_90"):
        resolve("hcl_loss", *args, backend="triton")
    # auto steps past the refused backend to the next one of its order
    assert resolve("hcl_loss", *args, backend="auto") == "torch"
    assert backend.explain("hcl_loss", *args)["triton"].startswith("compute capability 7.5")


def test_debug_log_says_once_which_backend_ran_and_why(caplog):
    import logging

    from transkd_fast import backend

    backend._logged.clear()
    q, k, v = _qkv(torch.float64)
    with caplog.at_level(logging.DEBUG, logger="transkd_fast.backend"):
        efficient_attention(q, k, v)
        efficient_attention(q, k, v)
    lines = [r.getMessage() for r in caplog.records if r.name == "transkd_fast.backend"]
    assert len(lines) == 1, lines
    assert lines[0].startswith("efficient_attention on cpu float64: backend torch")
    assert "xformers:" in lines[0] and "triton:" in lines[0]


def test_transkd_debug_env_turns_the_log_on():
    code = ("import torch; from transkd_fast.ops.weighted_mse import weighted_mse; "
            "x = torch.randn(3, 4); weighted_mse([x], [x], [1.0]); weighted_mse([x], [x], [1.0])")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRANSKD_DEBUG"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("[transkd_fast] weighted_mse")]
    assert len(lines) == 1 and "backend torch" in lines[0], out.stderr
