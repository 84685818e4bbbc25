"""Running the simulator as a program: signals, readiness line, extra worker processes.

``--workers K`` starts K-1 more processes that serve the same WebSocket ports with
SO_REUSEPORT, so the kernel spreads connections over K cores. Each runs the same
seeded model from the same start time, so every process publishes the same message
sequence; REST and admin stay in the first process (their counters cover it only).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ingestor.sim.server import SimConfig, Simulator

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0


def _child(config: SimConfig, start_ms: int, ready: Any) -> None:
    import uvloop

    async def main() -> None:
        sim = Simulator(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await sim.start(start_ms)
        except Exception as exc:
            ready.put(f"worker failed to start: {exc!r}")
            raise
        ready.put("ok")
        try:
            await stop.wait()
        finally:
            await sim.stop()

    uvloop.run(main())


async def run_simulator(config: SimConfig, workers: int, ready: Callable[[dict[str, str]], None]) -> None:
    """Start, announce the URLs through ``ready``, serve until SIGINT/SIGTERM."""
    start_ms = int(time.time() * 1000)
    sim = Simulator(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await sim.start(start_ms)
    children: list[Any] = []
    try:
        if workers > 1:
            ports = {m: int(sim.urls[f"{m}_ws"].rsplit(":", 1)[1]) for m in sim.markets}
            child_cfg = replace(config, ws_only=True, ws_ports=ports, faults=())
            ctx = mp.get_context("spawn")
            started = ctx.Queue()
            for _ in range(workers - 1):
                proc = ctx.Process(target=_child, args=(child_cfg, start_ms, started), daemon=True)
                proc.start()
                children.append(proc)
            # Announce only when every worker listens, so no client lands on one process
            # just because the others were still importing.
            for _ in children:
                status = await loop.run_in_executor(None, started.get, True, READY_TIMEOUT_S)
                if status != "ok":
                    raise RuntimeError(status)
        ready(sim.urls)
        await stop.wait()
    finally:
        for proc in children:
            proc.terminate()
        for proc in children:
            proc.join(5)
        await sim.stop()
