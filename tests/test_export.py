"""``transkd-fast export``: ONNX, Hugging Face folder and torch.export program, each round-tripped.

One CLI run exports a random SegFormer-B0 ``model.pt`` to every format with ``--verify`` (one
``torch.export`` trace serves ONNX and the program); the tests then load each artifact the way a
user would, with nothing of transkd_fast where the format promises it, and compare logits.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import rel_err

from transkd_fast import export as ex
from transkd_fast.cli import main
from transkd_fast.engine.checkpoint import FORMAT, save_weights
from transkd_fast.models import MIT_CONFIGS, build_model, to_hf_state_dict


def _importable(*names: str) -> bool:
    try:
        for n in names:
            importlib.import_module(n)
    except ImportError:
        return False
    return True


HAVE_ONNX = _importable("onnx", "onnxscript", "onnxruntime")


def _random_b0(outputs: int = 20, **kw) -> torch.nn.Module:
    """SegFormer-B0 with every tensor perturbed, BN statistics included (a wrong mapping shows)."""
    m = build_model("segformer_b0", num_classes=outputs, drop_path_rate=0.0, dropout=0.0, **kw).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        bn = m.decode_head.linear_fuse.bn
        bn.running_var.uniform_(0.5, 2.0)
        bn.running_mean.normal_()
    return m


def _logits(model, x):
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = _random_b0()
    weights = root / "model.pt"
    save_weights(model, str(weights), meta={"model": "segformer_b0", "num_outputs": 20, "num_classes": 19,
                                            "void": "class"})
    formats = "torch-export,hf" + (",onnx" if HAVE_ONNX else "")
    out = root / "out"
    rc = main(["export", "--weights", str(weights), "--format", formats, "--output", str(out), "--verify"])
    assert rc == 0
    return model, out


def _need_onnx():
    """Skip cleanly without the deploy extra (the fixture then exports no ONNX file)."""
    pytest.importorskip("onnxscript")
    return pytest.importorskip("onnx"), pytest.importorskip("onnxruntime")


def test_onnx_runs_in_onnxruntime_at_any_batch_and_size(exported):
    onnx, ort = _need_onnx()
    model, out = exported
    path = out / "model.onnx"
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    # transkd_fast's custom ops and oneDNN ops lowered: only standard-domain ONNX nodes
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}, {n.op_type for n in proto.graph.node if n.domain}
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 64, 128), (3, 3, 80, 112), (1, 3, 131, 77)]:
        x = torch.rand(shape)
        got = torch.from_numpy(sess.run(["logits"], {"pixel_values": x.numpy()})[0])
        ref = _logits(model, x)
        assert got.shape == ref.shape
        assert rel_err(got, ref) <= ex.VERIFY_RTOL, shape


def test_onnx_verify_fails_on_other_weights(exported):
    _need_onnx()
    model, out = exported
    # every test starts from seed 0 (conftest), as did the test that built the fixture's model:
    # another seed, or `other` would be the very same model
    torch.manual_seed(12345)
    other = _random_b0()
    assert not torch.equal(other.decode_head.linear_pred.weight, model.decode_head.linear_pred.weight)
    with pytest.raises(ex.ExportError, match=r"ONNX verification failed: relative logit difference .* > 1e-04"):
        ex.verify_onnx(str(out / "model.onnx"), other)
    diffs = ex.verify_onnx(str(out / "model.onnx"), model)
    assert len(diffs) == 2 and all(d <= ex.VERIFY_RTOL for _, d in diffs)


_LOAD_WITHOUT_TRANSKD = r"""
import sys, torch
class _Block:  # transkd_fast must not be needed: make importing it fail
    def find_spec(self, name, path=None, target=None):
        if name == "transkd_fast" or name.startswith("transkd_fast."):
            raise ImportError("transkd_fast is blocked in this test")
sys.meta_path.insert(0, _Block())
program = torch.export.load(sys.argv[1]).module()
xs = torch.load(sys.argv[2])
torch.save([program(x) for x in xs], sys.argv[3])
assert not any(m.startswith("transkd_fast") for m in sys.modules)
"""


def test_torch_export_program_runs_without_transkd_fast(exported, tmp_path):
    model, out = exported
    xs = [torch.rand(1, 3, 64, 128), torch.rand(2, 3, 96, 72), torch.rand(1, 3, 129, 161)]
    torch.save(xs, tmp_path / "xs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_TRANSKD, str(out / "model.pt2"),
                           str(tmp_path / "xs.pt"), str(tmp_path / "ys.pt")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ys = torch.load(tmp_path / "ys.pt")
    for x, y in zip(xs, ys):
        ref = _logits(model, x)
        assert y.shape == ref.shape and rel_err(y, ref) <= 1e-5, tuple(x.shape)


def test_hf_folder_loads_offline_with_equal_logits(exported):
    transformers = pytest.importorskip("transformers")
    model, out = exported
    folder = out / "hf"
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(os.listdir(folder))
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_labels"] == 20 and cfg["id2label"]["0"] == "road" and cfg["id2label"]["19"] == "void"
    hf, info = transformers.SegformerForSemanticSegmentation.from_pretrained(
        str(folder), output_loading_info=True, local_files_only=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = torch.rand(2, 3, 64, 128)
    with torch.no_grad():
        got = hf.eval()(pixel_values=x).logits
    # HF's blocks use LayerNorm eps 1e-5 where ours use 1e-6: a few 1e-6 apart, no more
    assert rel_err(got, _logits(model, x)) <= 2e-5


def test_hf_equal_logits_with_hf_eps_and_every_size_maps(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _random_b0(7, norm_eps=1e-5)  # HF's own eps: the implementations agree to rounding
    ex.export_hf(model, str(tmp_path / "hf"), class_names=[f"c{i}" for i in range(7)])
    diffs = ex.verify_hf(str(tmp_path / "hf"), model)
    assert all(d <= 2e-6 for _, d in diffs), diffs
    # Every size B0-B5: the config we write builds an HF model whose tensors match ours name for
    # name and shape for shape (on the meta device: no memory, no compute).
    for key in MIT_CONFIGS:
        with torch.device("meta"):
            ours = build_model(f"segformer_{key}", num_classes=19)
            cfg = transformers.SegformerConfig(**ex.hf_config_dict(ours))
            hf = transformers.SegformerForSemanticSegmentation(cfg)
        theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
        mine = {k: tuple(v.shape) for k, v in to_hf_state_dict(ours, style=None).items()}
        assert mine == theirs, f"segformer_{key}: {sorted(set(mine) ^ set(theirs))[:5]}"
        assert cfg.decoder_hidden_size == (256 if key in ("b0", "b1") else 768)


def test_distill_checkpoint_exports_its_student(tmp_path):
    """A distill checkpoint: the student's tensors load, the KD modules and teacher are dropped."""
    student = _random_b0(20)
    state = {f"student.{k}": v for k, v in student.state_dict().items()}
    state["csf.0.conv.weight"] = torch.randn(4, 4)
    torch.save({"format": FORMAT, "kind": "distill", "step": 3, "model": state,
                "config": {"model": "segformer_b0", "void": "class", "normalize": True, "height": 96}},
               tmp_path / "last.pt")
    loaded = ex.load_model(str(tmp_path / "last.pt"))
    assert (loaded.name, loaded.num_outputs, loaded.num_classes, loaded.normalize, loaded.height) == \
        ("segformer_b0", 20, 19, True, 96)
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(_logits(loaded.model, x), _logits(student, x))


def test_refusals_name_the_problem(tmp_path):
    with pytest.raises(ex.ExportError, match="'tflite' is not a format"):
        ex.parse_formats("onnx,tflite")
    with pytest.raises(ex.ExportError, match="takes a SegFormer"):
        ex.export_hf(build_model("pvt_v2_b0", num_classes=3), str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="not found"):
        ex.load_model(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ex.ExportError, match="cannot read it as a PyTorch checkpoint"):
        ex.load_model(str(tmp_path / "junk.pt"))
    with pytest.raises(ex.ExportError, match="opset must be ≥ 17"):
        ex.export_onnx(_random_b0(), str(tmp_path / "m.onnx"), opset=13)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["export", "--weights", str(tmp_path / "missing.pt"), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0] and "missing.pt" in err[0]
    assert main(["export", "--weights", str(tmp_path / "missing.pt"), "--format", "tflite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'tflite' is not a format" in err[0]


def test_onnx_graph_is_in_the_forms_onnxruntime_fuses(exported, tmp_path):
    """Each MixFFN is a chain of convolutions (fc1, fc2 as 1×1 convs: no MatMul for them) and
    each GELU is the erf pattern ONNX Runtime fuses into one Gelu node (nothing of it left over)."""
    onnx, ort = _need_onnx()
    _, out = exported
    proto = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    blocks = sum(MIT_CONFIGS["b0"][1])
    # 4 patch embeddings, sr convs in the blocks of stages 1-3, per block a depthwise conv + fc1 + fc2
    srs = sum(d for d, r in zip(MIT_CONFIGS["b0"][1], MIT_CONFIGS["b0"][4]) if r > 1)
    assert ops.count("Conv") == 4 + srs + 3 * blocks
    assert ops.count("Erf") == blocks
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # portable fusions only
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(out / "model.onnx"), so, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert fused.count("Gelu") == blocks and "Erf" not in fused


def test_onnx_forms_compute_the_same_and_are_undone():
    import transkd_fast
    from transkd_fast.models.mit import MixFFN

    model = _random_b0(5)
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad(), transkd_fast.use_backend("reference"):
        ref = model(x)
        with ex.onnx_forms(model):
            assert all("forward" in m.__dict__ for m in model.modules() if isinstance(m, MixFFN))
            got = model(x)
    assert rel_err(got, ref) <= 1e-5
    assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, MixFFN))
