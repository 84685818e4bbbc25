"""Shared by the chaos scenarios: a recording simulator, the pipeline, and the verdict.

Each scenario ends the same way: the simulator is paused (what it sent is final), the
pipeline is given time to store it all and stopped, and ``ingestor.sim.audit`` compares
per table and symbol what was sent with what is stored."""

from __future__ import annotations

from typing import Any

from ingestor.sim.audit import TABLES, Audit, audit
from ingestor.sim.server import Simulator

from ..conftest import post_json
from ..pipeline import Pipeline, wait_until


async def finish(sim: Simulator, pipe: Pipeline, dsn: str, settle_s: float = 45.0) -> Audit:
    """Pause the simulator, let the pipeline store everything it can, stop it, audit."""
    await post_json(sim.urls["admin"] + "/pause")
    result: dict[str, Audit] = {}

    async def settled() -> bool:
        result["a"] = a = await audit(sim, dsn)
        return all(a.total(t).lost == 0 for t in TABLES)

    try:
        await wait_until(settled, settle_s, "every message stored", period=1.0)
    except AssertionError:
        pass  # the audit below says what is missing
    assert await pipe.stop() == 0, pipe.text()
    return await audit(sim, dsn)


def assert_nothing_lost_or_duplicated(a: Audit, tables: tuple[str, ...] = TABLES) -> dict[str, Any]:
    summary = a.summary()
    assert a.total("agg_trades").sent > 0 and a.total("depth_updates").sent > 0, summary
    for t in tables:
        tally = a.total(t)
        assert tally.lost == 0 and tally.duplicated == 0, (t, summary)
    return summary


async def kill_when(pipe: Pipeline, worker: str, signal_number: int) -> int:
    """Signal one worker process; returns its pid."""
    import os

    _, health = await pipe.health()
    pid = health["workers"][worker]["pid"]
    os.kill(pid, signal_number)
    return int(pid)


async def restarted(pipe: Pipeline, worker: str, old_pid: int, timeout: float = 20.0) -> dict[str, Any]:
    return await pipe.wait_health(200, timeout=timeout, check=lambda b: b["workers"][worker]["pid"] != old_pid
                                  and b["workers"][worker]["alive"] and b["workers"][worker]["restarts"] >= 1)


