"""A seeded mix of everything that goes wrong, for ``ingestor demo --chaos`` and the soak
benchmark: the simulator's faults (drops, stalls, skipped diffs and trades, bad frames,
frames with bogus ids, connections whose close cannot complete, 429/5xx/slow REST),
process kills (each kind of worker), and a database outage when the caller can stop and
start the database. Connection rotation comes from a short lifetime, set by the caller.

Each injection is logged and kept in ``injected``; the same seed gives the same plan.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ingestor.binance.streams import Market
from ingestor.sim.faults import Fault
from ingestor.sim.server import Simulator

log = logging.getLogger(__name__)

# (kind, how many of it in each round of the deck).
MIX: tuple[tuple[str, int], ...] = (
    ("drop", 3), ("stall", 1), ("gap", 2), ("skip_trades", 2), ("malformed", 1), ("non_json", 1),
    ("unknown_event", 1), ("bogus_id", 1), ("hold_close", 1), ("rest_429", 1), ("rest_5xx", 1), ("rest_slow", 1),
    ("kill_socket", 1), ("kill_writer", 1), ("kill_features", 1), ("kill_rest", 1), ("db_outage", 1),
)
DB_OUTAGE_S = 8.0


@dataclass
class Chaos:
    sim: Simulator
    pids: Callable[[str], int | None]  # worker name prefix -> a live pid (None: not running)
    seed: int = 1
    period_s: float = 3.0
    db_stop: Callable[[], Awaitable[None]] | None = None
    db_start: Callable[[], Awaitable[None]] | None = None
    injected: list[dict[str, Any]] = field(default_factory=list)

    async def run(self, duration_s: float) -> None:
        """Inject one fault every ``period_s`` (jittered) until ``duration_s`` has passed, in
        a seeded order that goes through every kind each round (the database outage once)."""
        rng = random.Random(self.seed)
        # A shuffled deck rather than independent draws: every kind comes up once a round.
        deck: list[str] = []
        t0 = time.monotonic()
        outage_done = False
        await asyncio.sleep(self.period_s)  # let everything connect first
        while time.monotonic() - t0 < duration_s - self.period_s:
            if not deck:
                deck = [k for k, n in MIX for _ in range(n)
                        if k != "db_outage" or (self.db_stop is not None and not outage_done)]
                rng.shuffle(deck)
            kind = deck.pop()
            market: Market = rng.choice(sorted(self.sim.markets))
            at = round(time.monotonic() - t0, 1)
            target = await self._inject(kind, market, rng)
            outage_done = outage_done or kind == "db_outage"
            if target is not None:
                self.injected.append({"at_s": at, "kind": kind, "target": target})
                log.warning("chaos: %s (%s) at %.1f s", kind, target, at)
            await asyncio.sleep(self.period_s * rng.uniform(0.6, 1.4))

    async def _inject(self, kind: str, market: Market, rng: random.Random) -> str | None:
        if kind.startswith("kill_"):
            name = kind.removeprefix("kill_")
            pid = self.pids(name)
            if pid is None:
                return None
            os.kill(pid, signal.SIGKILL)
            return f"{name} pid {pid}"
        if kind == "db_outage":
            assert self.db_stop is not None and self.db_start is not None
            await self.db_stop()
            await asyncio.sleep(DB_OUTAGE_S)
            await self.db_start()
            return f"database stopped for {DB_OUTAGE_S:g} s"
        fault = {
            "drop": Fault("drop", 0.0, market=market),
            "stall": Fault("stall", 0.0, market=market, duration=0.0),
            "gap": Fault("gap", 0.0, market=market, count=rng.randint(1, 4)),
            "skip_trades": Fault("skip_trades", 0.0, market=market, count=rng.randint(1, 20)),
            "malformed": Fault("malformed", 0.0, market=market),
            "non_json": Fault("non_json", 0.0, market=market),
            "unknown_event": Fault("unknown_event", 0.0, market=market),
            "bogus_id": Fault("bogus_id", 0.0, market=market),
            # Held until the connection's next rotation, which must abort it (lifetime set by the caller).
            "hold_close": Fault("hold_close", 0.0, market=market),
            "rest_429": Fault("rest_429", 0.0, market=market, count=rng.randint(1, 4), duration=2.0),
            "rest_5xx": Fault("rest_5xx", 0.0, market=market, count=rng.randint(1, 3)),
            "rest_slow": Fault("rest_slow", 0.0, market=market, count=rng.randint(1, 3), delay=3000),
        }[kind]
        hit = self.sim.apply_fault(fault)
        return f"{market}, {hit} target(s)"

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for item in self.injected:
            out[item["kind"]] = out.get(item["kind"], 0) + 1
        return out
