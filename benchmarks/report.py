"""Benchmark reports: one JSON file and one Markdown file per invocation.

A suite returns a dict::

    {"suite": "sim", "title": "...", "params": {...},
     "metrics": [{"name": ..., "value": ..., "unit": ..., "runs": [...], "note": ...}],
     "notes": ["..."], "details": {...}}

``value`` is the median over ``runs`` where there are several. The report adds the
machine (cores, CPU model, Python, platform) and the git commit, so figures from
different hosts or revisions are never compared unknowingly.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def metric(name: str, runs: Any, unit: str, note: str = "") -> dict[str, Any]:
    """One row: the median of ``runs`` (a list) or a single value."""
    if isinstance(runs, list):
        clean = [r for r in runs if r is not None]
        return {"name": name, "value": median(clean) if clean else None, "unit": unit,
                "runs": runs, "note": note}
    return {"name": name, "value": runs, "unit": unit, "runs": None, "note": note}


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine_info() -> dict[str, Any]:
    status = _git("status", "--porcelain")
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    return {
        "nproc": affinity,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _fmt_runs(runs: list[Any] | None) -> str:
    if not runs:
        return ""
    return ", ".join(_fmt(r) for r in runs)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# Benchmark report ({report['started_at']})",
        "",
        f"- command: `{report['command']}`",
        f"- mode: {'quick' if report['quick'] else 'full'}; wall time {report['wall_s']:.1f} s",
        f"- machine: {m['nproc']} cores ({m['cpu_model']}), Python {m['python']} "
        f"({m['implementation']}), {m['platform']}",
        f"- load average at start: {m['loadavg_at_start']}",
        f"- git commit: {m['git_commit']}{' (dirty tree)' if m['git_dirty'] else ''}",
        "",
        "Values are medians of the listed runs. The host may be shared and noisy: compare",
        "figures only with the same machine line, and look at the spread of the runs.",
    ]
    for suite in report["suites"]:
        lines += ["", f"## {suite['suite']}: {suite.get('title', '')}", ""]
        params = suite.get("params") or {}
        if params:
            lines.append("Parameters: " + ", ".join(f"`{k}={v}`" for k, v in params.items()))
            lines.append("")
        lines += ["| metric | median | unit | runs | note |", "| --- | ---: | --- | --- | --- |"]
        for row in suite["metrics"]:
            note = str(row.get("note", "")).replace("|", "\\|")
            lines.append(f"| {row['name']} | {_fmt(row['value'])} | {row['unit']} | "
                         f"{_fmt_runs(row.get('runs'))} | {note} |")
        notes = suite.get("notes") or []
        if notes:
            lines += ["", "Notes:", ""]
            lines += [f"- {n}" for n in notes]
        if suite.get("error"):
            lines += ["", f"**Error:** {suite['error']}"]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``<stamp>-<name>.json`` and ``.md`` plus ``latest.json``/``latest.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(report["started_unix"]))
    base = f"{stamp}-{report['name']}"
    js = json.dumps(report, indent=2, sort_keys=False, default=str) + "\n"
    md = markdown(report)
    json_path = out_dir / f"{base}.json"
    md_path = out_dir / f"{base}.md"
    json_path.write_text(js)
    md_path.write_text(md)
    (out_dir / "latest.json").write_text(js)
    (out_dir / "latest.md").write_text(md)
    return json_path, md_path
