"""The committed compile report (benchmarks/results/compile_report.md) covers every recorded
Triton launch (transkd_fast.compile_check: the TransKD step's and B0 inference's op calls and
the tests' odd sizes, fp32/fp16/bf16, both layouts) for sm_80 and sm_90, with no spill and no
failure.

Cheap when current: the report records the sha256 of everything that decides the launches
(kernels, launchers, the harness, and the op calls recorded from the models on meta). When the report
is missing or stale, or ``TRANSKD_REBUILD_COMPILE_REPORT=1``, the full check runs here (both
archs in parallel processes), rewrites the report and fails on any spill or error: commit the
new file. The per-op test files compile their odd-size launches live in every run.
"""

import os
import re
from pathlib import Path

from transkd_fast import reports

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / reports.COMPILE_REPORT
ROW = re.compile(r"^\| (\w+) \| (\w+) \| (.*?) \| (.*?) \| (sm_\d+) \| (\d*) \| (\d*) \| (\w+) \| (\d*) \| (\d*) \|")


def _table(text):
    return [m.groups() for m in map(ROW.match, text.splitlines()) if m]


def test_hash_line_round_trips():
    ops = reports.present_kernel_ops()
    text = reports.compile_report_markdown([], ops)
    assert reports.committed_hashes(text) == reports.kernel_hashes(ops)
    assert "transkd-fast report --compile" in text


def test_hashes_cover_launchers_and_the_recorded_calls(monkeypatch):
    from transkd_fast import compile_check as cc

    ops = reports.present_kernel_ops()
    hashes = reports.kernel_hashes(ops)
    assert set(hashes) == set(ops) | {"harness", "calls"}
    # a change in what the models hand the ops (one more recorded call) makes the report stale
    real = cc.odd_calls
    monkeypatch.setattr(cc, "odd_calls", lambda: real()[:-1])
    assert reports.kernel_hashes(ops)["calls"] != hashes["calls"]


def test_compile_report_is_current_and_has_no_spills():
    ops = reports.present_kernel_ops()
    assert ops, "no kernel modules found"
    text = REPORT.read_text() if REPORT.exists() else ""
    if os.environ.get("TRANSKD_REBUILD_COMPILE_REPORT") == "1" or reports.committed_hashes(text) != \
            reports.kernel_hashes(ops):
        rows = reports.run_compile_report(REPORT, ops)
        bad = [r for r in rows if "error" in r or r.get("spill_bytes", 0) > 0]
        assert not bad, [(r["op"], r.get("config"), r["arch"], r["cases"][0], r.get("error", "")[:300]
                          or r["spill_bytes"]) for r in bad]
        text = REPORT.read_text()
    table = _table(text)
    assert {r[0] for r in table} == set(ops)
    for op in ops:
        mine = [r for r in table if r[0] == op]
        assert {r[4] for r in mine} == {"sm_80", "sm_90"}, op
    failed = [r for r in table if r[7] == "FAILED" or r[8] != "0"]
    assert not failed, failed
    assert re.search(rf"^{len(table)} builds, 0 with spills or failures\.$", text, re.M)
    # the launches a GPU step makes are in it: batch 1 specializations and both layouts' cases
    assert "const N=1" in text or "N=1" in text
    assert "TransKD-base step 512x1024 batch 1" in text and "B0 inference 1024x2048" in text
