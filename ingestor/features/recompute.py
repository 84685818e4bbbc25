"""The bars a feature worker missed, recomputed from stored data after it comes back.

A feature worker started in place of one that died starts its own bars at its first whole
bar; the bars between its predecessor's last stored one and that first bar were never
emitted (the data of that span was recorded all along: the socket workers never stopped). Once
the data of that span is stored, this runs ``ingestor features replay`` over it, in a
process of its own (the replay is CPU work, and the worker must keep up with the feed),
with warm-up bars before it so the rolling windows start full, as the live ones were.
The replay builds its books from the snapshots the dead worker recorded (book_syncs).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from ingestor.binance.streams import Market
from ingestor.config import Settings, env_name

log = logging.getLogger(__name__)

RECENT_MS = 15 * 60_000  # a last stored bar older than this: not a restart, nothing to fill



@dataclass(frozen=True)
class Span:
    market: Market
    from_ms: int  # the end of the last stored bar
    to_ms: int  # the first bar of the new worker


async def missed_span(dsn: str, market: Market, bar_seconds: int, first_bar_ms: int,
                      owed_from_ms: int | None = None) -> Span | None:
    """The bars between the last stored one (if recent) and ``first_bar_ms``; with none
    stored, from ``owed_from_ms`` (the dead predecessors' first bar), if known."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        last = await conn.fetchval(
            """SELECT max(bar_time) FROM features WHERE market = $1 AND bar_seconds = $2 AND bar_time < $3
               AND bar_time >= $4""", market, bar_seconds, _dt(first_bar_ms), _dt(first_bar_ms - RECENT_MS))
    finally:
        await conn.close()
    if last is not None:
        from_ms = int(last.timestamp() * 1000) + bar_seconds * 1000
    elif owed_from_ms is not None and first_bar_ms - owed_from_ms <= RECENT_MS:
        from_ms = owed_from_ms
    else:
        return None
    return Span(market, from_ms, first_bar_ms) if from_ms < first_bar_ms else None


async def recompute(settings: Settings, dsn: str, span: Span) -> bool:
    """``ingestor features replay`` over ``span`` (warm-up included), as a child process."""
    fs = settings.feature_settings()
    # The settings go in as INGESTOR_* variables: the DSN's password stays out of the
    # process list.
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTOR_")}
    env[env_name("dsn")] = dsn
    env[env_name("feature_params")] = ",".join(settings.feature_params)
    env[env_name("snapshot_limit")] = str(settings.snapshot_limit)
    env[env_name("data_dir")] = str(settings.data_dir)
    args = [sys.executable, "-m", "ingestor.cli", "--log-level", "WARNING", "features", "replay",
            "--from", str(span.from_ms), "--to", str(span.to_ms), "--markets", span.market,
            "--warmup-bars", str(fs.window)]
    proc = await asyncio.create_subprocess_exec(*args, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode == 0:
        log.info("%s: the bars from %s to %s, missed while no feature worker ran, recomputed from stored data: %s",
                 span.market, _dt(span.from_ms), _dt(span.to_ms), out.decode().splitlines()[0] if out else "")
        return True
    log.error("%s: recomputing the missed bars from %s to %s failed: %s", span.market, _dt(span.from_ms),
              _dt(span.to_ms), (err or out).decode(errors="replace")[-500:])
    return False


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
