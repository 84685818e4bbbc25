"""Soak: the whole pipeline for minutes against the simulator, with faults throughout.

``ingestor demo --chaos`` run long (``ingestor.demo.run_demo``): the simulator and every
worker, on the embedded PostgreSQL (so the chaos plan can stop and start the database),
a seeded deck of every fault (``ingestor.sim.chaos``: drops, stalls, skipped diffs and
trades, bad frames, bogus ids, connections that will not close, 429/5xx/slow REST, each
worker kind SIGKILLed, the writer stalled, every producer killed mid-batch, an internal
server error, a database outage with the writer killed after it) one every
``--every`` seconds, connections rotated every 15 s. Every 10 s the resident memory of
each process is read from ``/proc``.

Reported: faults injected, messages sent, stored, lost, duplicated and unrecorded per
table (``ingestor.sim.audit``), gaps by how they closed, and memory over time per process:
first and last sample after warm-up, peak, and the slope of a straight line through the
samples (MB per minute). A process restarted by a fault starts over: its samples are
followed by name, so a kill shows as a drop, not a leak.

``python -m benchmarks soak [--minutes 10] [--every 5]``; quick: 2 minutes. Not part of
``all`` (it takes minutes by design).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import metric

SAMPLE_EVERY_S = 10.0
# The demo runs the supervisor and the simulator in one process, and the simulator keeps
# every message it sent (the audit compares them with the database), so that process grows
# with the messages by design: it is reported, but not held to the flatness verdict.
HOST = "supervisor+simulator"
WARMUP_S = 20.0


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Sampler:
    """Every SAMPLE_EVERY_S: the RSS of the supervisor and of each live child, by name."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.last = 0.0
        self.samples: dict[str, list[tuple[float, float]]] = {}

    def __call__(self, sup: Any) -> None:
        now = time.monotonic()
        if now - self.last < SAMPLE_EVERY_S:
            return
        self.last = now
        t = now - self.t0
        procs = {HOST: os.getpid()}
        for c in sup.children:
            if c.process is not None and c.process.exitcode is None:
                procs[c.name] = c.process.pid
        for name, pid in procs.items():
            mb = rss_mb(pid)
            if mb is not None:
                self.samples.setdefault(name, []).append((t, mb))


def trend(points: list[tuple[float, float]]) -> dict[str, float]:
    """First and last sample after warm-up, peak, and the least-squares slope (MB/min)."""
    pts = [p for p in points if p[0] >= WARMUP_S] or points
    t = np.array([p[0] for p in pts])
    mb = np.array([p[1] for p in pts])
    slope = float(np.polyfit(t / 60, mb, 1)[0]) if len(pts) >= 3 else 0.0
    return {"first": float(mb[0]), "last": float(mb[-1]), "peak": float(mb.max()), "slope_mb_per_min": slope,
            "samples": len(pts)}


async def _soak(duration_s: float, every_s: float, seed: int) -> dict[str, Any]:
    from ingestor.config import load_settings
    from ingestor.demo import run_demo

    data = tempfile.mkdtemp(prefix="ingestor-soak-")
    settings = load_settings({"data_dir": data, "log_level": "WARNING"}, environ={}, env_file=None)
    sampler = Sampler()
    last = 0.0

    def progress(line: str) -> None:
        # The demo reports every second; minutes of that would bury the report.
        nonlocal last
        if time.monotonic() - last >= 30.0:
            last = time.monotonic()
            print(f"[soak] {line}", file=sys.stderr, flush=True)

    try:
        result = await run_demo(settings, duration_s, 5, progress, seed, every_s, sampler)
    finally:
        shutil.rmtree(data, ignore_errors=True)
    return {"result": result, "memory": sampler.samples}


def run(quick: bool, minutes: float | None = None, every: float | None = None, seed: int = 1) -> dict[str, Any]:
    duration = (minutes or (2.0 if quick else 10.0)) * 60
    every = every or 5.0
    started = time.monotonic()
    out = asyncio.run(_soak(duration, every, seed))
    wall = time.monotonic() - started
    res = out["result"]
    chaos = res["chaos"]
    metrics: list[dict[str, Any]] = [
        metric("faults injected", sum(chaos["faults"].values()), "faults",
               ", ".join(f"{k} {n}" for k, n in sorted(chaos["faults"].items()))),
        metric("connection rotations", chaos["rotations"], "rotations", "connections live 20 s, rotated at 15 s"),
    ]
    for table, t in chaos["tables"].items():
        metrics += [
            metric(f"{table}: sent", t["sent"], "msgs", "delivered by the simulator over the WebSocket"),
            metric(f"{table}: stored", t["stored"], "rows", f"extra (fetched over REST): {t['extra']:,}"),
            metric(f"{table}: lost", t["lost"], "msgs",
                   "must be 0" if table == "agg_trades" else f"in a recorded gap; unrecorded: {t['uncovered']}"),
            metric(f"{table}: duplicated", t["duplicated"], "rows", "must be 0"),
        ]
    metrics.append(metric("gaps by how they closed", sum(chaos["gaps"].values()), "gaps",
                          ", ".join(f"{k} {n}" for k, n in sorted(chaos["gaps"].items()))))
    notes: list[str] = []
    flat = True
    for name, points in sorted(out["memory"].items()):
        tr = trend(points)
        growing = tr["slope_mb_per_min"] > 1.0 and tr["last"] > tr["first"] * 1.2
        if name != HOST:
            flat = flat and not growing
        metrics.append(metric(f"RSS {name}", round(tr["last"], 1), "MB",
                              f"first {tr['first']:.1f}, peak {tr['peak']:.1f}, slope {tr['slope_mb_per_min']:+.2f} "
                              f"MB/min over {tr['samples']} samples{' GROWING' if growing else ''}"
                              f"{' (the simulator keeps every message sent, for the audit)' if name == HOST else ''}"))
        notes.append(f"RSS {name} (s, MB): " + ", ".join(f"{t:.0f}:{mb:.0f}" for t, mb in points))
    trades = chaos["tables"]["agg_trades"]
    verdict = (trades["lost"] == 0 and all(t["duplicated"] == 0 and t["uncovered"] == 0
                                           for t in chaos["tables"].values()))
    metrics.append(metric("verdict", "nothing lost or duplicated that is promised, memory flat"
                          if verdict and flat else "FAILED: see the rows above", ""))
    notes.append(f"{duration / 60:g} minutes, a fault every {every:g} s on average (seed {seed}), 5 symbols a market, "
                 f"embedded PostgreSQL in a temporary data directory; wall {wall:.0f} s")
    return {"suite": "soak", "title": "soak: minutes of the whole pipeline with faults throughout",
            "params": {"minutes": duration / 60, "every_s": every, "seed": seed}, "metrics": metrics,
            "notes": notes, "details": {"chaos": chaos, "memory": out["memory"], "demo": {
                k: v for k, v in res.items() if k not in ("chaos", "features")}}}
