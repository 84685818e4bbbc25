"""Memory: every ingestor process's resident set over minutes at a steady rate.

Issue 6 asks for flat memory, at most 150 MB RSS per process, over a 10-minute run at half
the maximum rate. One level of the pipeline suite (``pipeline.run_level``: a fresh
database on the system PostgreSQL, the simulator, ``ingestor run``, the zero-loss check
at the end), with a window of ``--minutes``, during which the RSS of every ingestor process
is read from ``/proc`` every 10 s, by name (a restarted worker would show as a drop, and
the level would fail).

The load: the simulator's live model, which keeps up with wall time for as long as the
run lasts (a tape of ten minutes at this rate would be gigabytes). On the 2-core host it
offers about 50,000 msgs/s with room to spare next to the ingestor and PostgreSQL, about
half of the pipeline's maximum (``python -m benchmarks pipeline``).

Reported per process: first sample after the warm-up, last, peak, and the least-squares
slope (MB/min) over the samples; flat = slope under 1 MB/min or less than 20% growth; and
whether the level passed (nothing lost or duplicated, no backlog, no restart). A window
this long stores tens of millions of rows, which take seconds to count: the drain after
the pause is read from the writer's committed-rows counter instead (1 s resolution), the
loss check still counts every stream in the database.

``python -m benchmarks memory [--minutes 10] [--rate 50000]``; quick: 2 minutes.
Not part of ``all`` (it takes minutes by design).
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from benchmarks import pipeline
from benchmarks.report import metric
from benchmarks.soak import rss_mb, trend

RSS_LIMIT_MB = 150.0
WARMUP_S = 20.0


def run(quick: bool, minutes: float | None = None, rate: float | None = None) -> dict[str, Any]:
    minutes = minutes or (2.0 if quick else 10.0)
    rate = rate or 50_000.0
    samples: dict[str, list[tuple[float, float]]] = {}
    t0 = time.monotonic()

    def watch(procs: dict[int, str]) -> None:
        t = time.monotonic() - t0
        for pid, name in procs.items():
            mb = rss_mb(pid)
            if mb is not None:
                samples.setdefault(name, []).append((t, mb))

    print(f"[memory] {minutes:g} min at {rate:,.0f} msg/s ...", file=sys.stderr, flush=True)
    r = asyncio.run(pipeline.run_level(1, rate, pipeline.N_SYMBOLS, WARMUP_S, minutes * 60, watch=watch))
    metrics: list[dict[str, Any]] = [
        metric("level", pipeline.verdict(r), ""),
        metric("offered", r.get("offered_per_s"), "msg/s", "over the whole window"),
        metric("event-to-commit p99", None if r.get("lag_p99_s") is None else r["lag_p99_s"] * 1000, "ms",
               "the window's histogram, bucket-interpolated"),
    ]
    flat_all = True
    notes = []
    for name, points in sorted(samples.items()):
        tr = trend(points)
        flat = tr["slope_mb_per_min"] < 1.0 or tr["last"] <= tr["first"] * 1.2
        within = tr["peak"] <= RSS_LIMIT_MB
        flat_all = flat_all and flat and within
        metrics.append(metric(f"RSS {name}", round(tr["last"], 1), "MB",
                              f"first {tr['first']:.1f}, peak {tr['peak']:.1f}, slope {tr['slope_mb_per_min']:+.2f} "
                              f"MB/min over {tr['samples']} samples; {'flat' if flat else 'GROWING'}, "
                              f"{'within' if within else 'OVER'} {RSS_LIMIT_MB:g} MB"))
        notes.append(f"RSS {name} (s, MB): " + ", ".join(f"{t:.0f}:{mb:.0f}" for t, mb in points))
    metrics.append(metric("verdict", "memory flat and within the limit, nothing lost" if flat_all and r["passed"]
                          else "FAILED: see the rows above", ""))
    notes.append(f"{minutes:g} minutes at nominal {rate:,.0f} msg/s, 1 shard, {pipeline.N_SYMBOLS} symbols a market, "
                 "the simulator's live model, the system PostgreSQL; samples every 10 s after a 20 s warm-up.")
    return {"suite": "memory", "title": "memory: RSS of every ingestor process over minutes at a steady rate",
            "params": {"minutes": minutes, "rate": rate}, "metrics": metrics, "notes": notes,
            "details": {"level": r, "samples": samples}}
