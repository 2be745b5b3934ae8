"""pytest-benchmark JSON → a short markdown summary (one table per benchmark group).

Usage: ``python benchmarks/summarize.py benchmarks/results/cpu.json [-o benchmarks/results/cpu.md]``
(``transkd-fast bench`` calls :func:`summarize` itself).

Per group: each benchmark's median / min / rounds and its time relative to the group's
baseline (the entry whose ``extra_info["variant"]`` or name says ``original`` or ``reference``),
followed by the notable ``extra_info`` fields (ratios, agreement, peak RSS, shapes).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

_SKIP_INFO = {"group", "device", "variant", "threads"}


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def _fmt_val(v) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e6:
            return f"{v:.4g}"
        return f"{v:.3e}"
    if isinstance(v, (list, tuple)):
        return "x".join(map(str, v)) if all(isinstance(x, int) for x in v) else json.dumps(v)
    if isinstance(v, dict):
        return json.dumps(v, default=str)
    return str(v)


def _is_baseline(b: dict) -> bool:
    variant = str(b.get("extra_info", {}).get("variant", "")).lower()
    if variant in ("original", "reference"):
        return True
    params = b.get("params") or {}
    if any(str(v).lower() in ("original", "reference") for v in params.values()):
        return True
    return variant == "" and ("reference" in b["name"] or "original" in b["name"])


_BASE_VALUES = ("original", "reference")
_BASE_KEYS = ("variant", "backend")


def _case_key(b: dict) -> tuple:
    """The benchmark's parameters without the one naming the implementation (variant/backend)."""
    params = b.get("params") or {}
    return tuple(sorted((k, str(v)) for k, v in params.items() if k not in _BASE_KEYS))


def _baselines(bs: list[dict]) -> dict:
    """case key → the baseline benchmark of that case (same parameters, reference/original)."""
    out = {}
    for b in bs:
        if _is_baseline(b):
            out.setdefault(_case_key(b), b)
    return out


def _short_name(b: dict) -> str:
    return b["name"].removeprefix("test_")


def summarize(data: dict) -> str:
    mi = data.get("machine_info", {})
    ci = data.get("commit_info", {})
    cpu = mi.get("cpu", {})
    lines = [
        "# Benchmark summary",
        "",
        f"- generated from pytest-benchmark {data.get('version', '?')} JSON of {data.get('datetime', '?')}",
        f"- machine: {mi.get('node', '?')}, {cpu.get('brand_raw', mi.get('processor', '?'))}, "
        f"{cpu.get('count', '?')} logical CPUs, Python {mi.get('python_version', '?')}",
        f"- commit: {ci.get('id', '?')[:12]}{' (dirty)' if ci.get('dirty') else ''}",
        "- times are wall-clock medians measured on this device in one run; `× base` = median / the group's "
        "baseline median (the original-style / reference run of the same case); < 1 is faster.",
        "",
    ]
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in data.get("benchmarks", []):
        groups[b.get("group") or b.get("fullname", "").split("::")[0]].append(b)
    for group in sorted(groups):
        bs = groups[group]
        bases = _baselines(bs)
        group_base = next(iter(bases.values()), None) if len(bases) == 1 else None
        device = next((b.get("extra_info", {}).get("device") for b in bs if b.get("extra_info", {}).get("device")), "")
        lines += [f"## {group}" + (f" ({device})" if device else ""), "",
                  "| benchmark | median | min | rounds | × base |", "|---|---|---|---|---|"]
        for b in sorted(bs, key=lambda b: (_case_key(b), b["name"])):
            st = b["stats"]
            base = bases.get(_case_key(b), group_base)
            ratio = f"{st['median'] / base['stats']['median']:.3f}" if base is not None else "–"
            lines.append(f"| {_short_name(b)} | {_fmt_time(st['median'])} | {_fmt_time(st['min'])} | "
                         f"{st['rounds']} | {ratio} |")
        notes = []
        for b in bs:
            info = {k: v for k, v in b.get("extra_info", {}).items() if k not in _SKIP_INFO}
            if info:
                text = ", ".join(f"{k}={_fmt_val(v)}" for k, v in info.items())
                notes.append(f"- `{_short_name(b)}`: " + (text if len(text) <= 600 else text[:597] + "..."))
        if notes:
            lines += [""] + notes
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path)
    ap.add_argument("-o", "--output", type=Path)
    a = ap.parse_args(argv)
    text = summarize(json.loads(a.json.read_text()))
    if a.output:
        a.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
