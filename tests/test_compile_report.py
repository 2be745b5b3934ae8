"""The committed compile report (benchmarks/results/compile_report.md) covers every Triton build
of every kernel present, for sm_80 and sm_90, with no spill and no failure.

Cheap by design: each per-op test file already compiles its own kernels live and fails on
spills. This test checks that the committed report was built from the current kernel sources
(sha256 recorded in the report) and matches their compile specs build for build. When the
report is missing or stale (a kernel changed), or ``TRANSKD_REBUILD_COMPILE_REPORT=1``, it
runs the full ``compile_check`` over all ops in subprocesses (minutes), rewrites the report
and fails on any spill or error; commit the new file.
"""

import importlib
import os
import re
from pathlib import Path

from transkd_fast import reports

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / reports.COMPILE_REPORT
ROW = re.compile(r"^\| (\w+) \| (\w+) \| (.*?) \| (sm_\d+) \| (\d*) \| (\d*) \| (\w+) \| (\d*) \| (\d*) \|$")


def _table(text):
    return [m.groups() for m in map(ROW.match, text.splitlines()) if m]


def test_hash_line_round_trips():
    ops = reports.present_kernel_ops()
    text = reports.compile_report_markdown([], ops)
    assert reports.committed_hashes(text) == reports.kernel_hashes(ops)
    assert "transkd-fast report --compile" in text


def test_compile_report_is_current_and_has_no_spills():
    ops = reports.present_kernel_ops()
    assert ops, "no kernel modules found"
    text = REPORT.read_text() if REPORT.exists() else ""
    if os.environ.get("TRANSKD_REBUILD_COMPILE_REPORT") == "1" or reports.committed_hashes(text) != \
            reports.kernel_hashes(ops):
        rows = reports.run_compile_report(REPORT, ops)
        bad = [r for r in rows if "error" in r or r.get("spill_bytes", 0) > 0]
        assert not bad, [(r["op"], r["label"], r["arch"], r.get("error", "")[:300] or r["spill_bytes"]) for r in bad]
        text = REPORT.read_text()
    table = _table(text)
    for op in ops:
        specs = importlib.import_module(f"transkd_fast.kernels.{op}").compile_specs()
        mine = [r for r in table if r[0] == op]
        assert len(mine) == 2 * len(specs), (op, len(mine), len(specs))
        assert {r[2] for r in mine} == {s.label for s in specs}, op
        assert {r[3] for r in mine} == {"sm_80", "sm_90"}, op
    assert {r[0] for r in table} == set(ops)
    failed = [r for r in table if r[6] == "FAILED" or r[7] != "0"]
    assert not failed, failed
    assert re.search(rf"^{len(table)} builds, 0 with spills or failures\.$", text, re.M)
