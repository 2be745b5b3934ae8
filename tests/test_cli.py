"""The ``transkd-fast`` command line: every subcommand's help, and the quick demo end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from transkd_fast.cli import build_parser

CLI = str(Path(sys.executable).parent / "transkd-fast")
SUBCOMMANDS = ("train", "distill", "evaluate", "demo", "report", "bench")


def test_every_subcommand_is_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(SUBCOMMANDS) <= set(sub.choices)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help(name):
    out = subprocess.run([CLI, name, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: transkd-fast {name}")


def test_unknown_model_is_a_clear_error(tmp_path):
    out = subprocess.run([CLI, "train", "--model", "segformer_b9", "--steps", "1", "--output-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "segformer_b9" in out.stderr


def test_demo_quick_end_to_end(tmp_path):
    out = subprocess.run([CLI, "demo", "--quick", "--no-progress", "--output-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("report.json", "predictions.png", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    report = json.loads((tmp_path / "report.json").read_text())
    text = json.dumps(report)
    for key in ("teacher", "plain", "miou"):
        assert key in text.lower(), key
    assert "mIoU" in out.stdout and "GFLOPs" in out.stdout
