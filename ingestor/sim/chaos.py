"""A seeded mix of everything that goes wrong, for ``ingestor demo --chaos`` and the soak
benchmark: the simulator's faults (drops, stalls, skipped diffs and trades, bad frames,
frames with bogus ids, connections whose close cannot complete, 429/5xx/slow REST),
process kills (each kind of worker), and, where the caller gives the means, the faults of
the writer's side: a database outage (with the writer killed while it replays its spool),
the writer stalled (SIGSTOP), every producer killed while the stalled writer leaves each
in the middle of a batch, and an internal server error the writer does not understand
(a trigger). Connection rotation comes from a short lifetime, set by the caller.

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
    ("stall_writer", 1), ("kill_mid_batch", 1), ("server_error", 1),
)
DB_OUTAGE_S = 8.0
WRITER_STALL_S = 5.0
# Needing the caller's means: a database it may stop, a way to reach every process, SQL.
_ONCE = frozenset({"db_outage"})
_SERVER_ERROR_ROWS = 3  # rows refused with XX000 before the trigger lets rows through
_TRIGGER_SQL = f"""
CREATE SEQUENCE IF NOT EXISTS chaos_fault_seq;
SELECT setval('chaos_fault_seq', 1, false);
CREATE OR REPLACE FUNCTION chaos_fault() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF nextval('chaos_fault_seq') <= {_SERVER_ERROR_ROWS} THEN
    RAISE EXCEPTION 'chaos: an internal error' USING ERRCODE = 'XX000';
  END IF;
  RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS chaos_fault ON depth_updates;
CREATE TRIGGER chaos_fault BEFORE INSERT ON depth_updates FOR EACH ROW EXECUTE FUNCTION chaos_fault();
"""
_UNTRIGGER_SQL = "DROP TRIGGER IF EXISTS chaos_fault ON depth_updates"


@dataclass
class Chaos:
    sim: Simulator
    pids: Callable[[str], int | None]  # worker name prefix -> a live pid (None: not running)
    seed: int = 1
    period_s: float = 3.0
    db_stop: Callable[[], Awaitable[None]] | None = None
    db_start: Callable[[], Awaitable[None]] | None = None
    # Every live pid whose worker name starts with the prefix, and the writer's state
    # (its status): for the faults that stall the writer or kill it mid-replay.
    all_pids: Callable[[str], list[int]] | None = None
    writer_state: Callable[[], str | None] | None = None
    sql: Callable[[str], Awaitable[None]] | None = None  # runs SQL on the recording database
    injected: list[dict[str, Any]] = field(default_factory=list)

    def _possible(self, kind: str) -> bool:
        if kind == "db_outage":
            return self.db_stop is not None
        if kind in ("stall_writer", "kill_mid_batch"):
            return self.all_pids is not None
        if kind == "server_error":
            return self.sql is not None and self.all_pids is not None
        return True

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
                        if self._possible(k) and (k not in _ONCE or not outage_done)]
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
        if kind.startswith("kill_") and kind != "kill_mid_batch":
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
            killed = await self._kill_writer_replaying()
            return f"database stopped for {DB_OUTAGE_S:g} s" + (", then the writer killed with its spool" if killed
                                                                 else "")
        if kind == "stall_writer":
            pids = self._pids("writer")
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(WRITER_STALL_S)
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
            return f"writer stopped for {WRITER_STALL_S:g} s"
        if kind == "kill_mid_batch":
            # The stalled writer fills every producer's pipe: each is left in the middle of a batch.
            writers = self._pids("writer")
            for pid in writers:
                os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(2.0)
            victims = [pid for prefix in ("socket", "rest", "features") for pid in self._pids(prefix)]
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(1.0)
            for pid in writers:
                os.kill(pid, signal.SIGCONT)
            return f"{len(victims)} producers killed behind a stalled writer"
        if kind == "server_error":
            assert self.sql is not None
            before = self._pids("writer")
            await self.sql(_TRIGGER_SQL)
            try:  # until the writer has failed on it and a new one runs (or 20 s)
                for _ in range(200):
                    await asyncio.sleep(0.1)
                    now = self._pids("writer")
                    if now and now != before:
                        break
            finally:
                await self.sql(_UNTRIGGER_SQL)
            return f"{_SERVER_ERROR_ROWS} depth rows refused with XX000"
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

    def _pids(self, prefix: str) -> list[int]:
        assert self.all_pids is not None
        return self.all_pids(prefix)

    async def _kill_writer_replaying(self) -> bool:
        """Once the database is back: kill the writer before or while it replays its spool, if
        it has one within 10 s (the next writer must replay the segment whole)."""
        if self.writer_state is None or self.all_pids is None:
            return False
        for _ in range(100):
            # The status comes once a second and a short outage's spool replays in less:
            # "spooling" after the database is back means the replay is about to start.
            if self.writer_state() in ("spooling", "replaying"):
                for pid in self._pids("writer"):
                    os.kill(pid, signal.SIGKILL)
                return True
            await asyncio.sleep(0.1)
        return False

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for item in self.injected:
            out[item["kind"]] = out.get(item["kind"], 0) + 1
        return out
