"""``ingestor gaps``: the audit of every hole in the recorded streams, and how it was closed.

Each ``stream_gaps`` row is one hole: the ids it misses (trades, diffs), or for streams
without ids (mark prices, liquidations; symbol ``*``: all of them) the time it spans.
``closed_how``: ``backfilled`` (trades fetched over REST; ``closed_rows`` of them stored),
``resynced`` (the feature worker's book rebuilt from a new snapshot; stream ``book``),
``unrecoverable`` (nothing to fetch them from: diffs, mark prices, liquidations, trades
REST no longer has), ``open`` (a backfill not done yet).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

COLUMNS = ("detected_at", "market", "symbol", "stream", "from_id", "to_id", "from_time", "to_time", "closed_how",
           "closed_rows", "closed_at")


async def list_gaps(dsn: str, since_ms: int, markets: tuple[str, ...], symbols: tuple[str, ...],
                    only_open: bool, limit: int) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return list(await conn.fetch(
            f"""SELECT {", ".join(COLUMNS)} FROM stream_gaps
                WHERE detected_at >= $1 AND market = ANY($2::text[])
                  AND ($3::text[] = '{{}}' OR symbol = ANY($3::text[]) OR symbol = '*')
                  AND (NOT $4 OR closed_how = 'open')
                ORDER BY detected_at DESC LIMIT $5""",
            datetime.fromtimestamp(since_ms / 1000, tz=UTC), list(markets), list(symbols), only_open, limit))
    finally:
        await conn.close()


def _t(v: datetime | None) -> str:
    return "" if v is None else v.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _span(r: asyncpg.Record) -> str:
    if r["from_id"] is not None:
        n = r["to_id"] - r["from_id"] + 1
        return f"ids {r['from_id']}..{r['to_id']} ({n:,})"
    if r["from_time"] is not None and r["to_time"] is not None:
        return f"{(r['to_time'] - r['from_time']).total_seconds():.1f} s without events"
    return ""


def render(recs: list[asyncpg.Record], as_json: bool, since_ms: int) -> str:
    if as_json:
        return orjson.dumps([{k: (_t(r[k]) + "Z" if isinstance(r[k], datetime) else r[k]) for k in COLUMNS}
                             for r in recs]).decode()
    since = _t(datetime.fromtimestamp(since_ms / 1000, tz=UTC))
    if not recs:
        return f"no gaps since {since} UTC"
    by_how: dict[str, int] = {}
    for r in recs:
        by_how[r["closed_how"]] = by_how.get(r["closed_how"], 0) + 1
    head = ("detected (UTC)", "market", "symbol", "stream", "missing", "from (UTC)", "to (UTC)", "closed", "rows",
            "closed at (UTC)")
    table: list[tuple[Any, ...]] = [head]
    for r in reversed(recs):  # oldest first
        table.append((_t(r["detected_at"]), r["market"], r["symbol"], r["stream"], _span(r), _t(r["from_time"]),
                      _t(r["to_time"]), r["closed_how"], "" if r["closed_rows"] is None else f"{r['closed_rows']:,}",
                      _t(r["closed_at"])))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in table]
    summary = ", ".join(f"{n} {how}" for how, n in sorted(by_how.items()))
    return "\n".join([f"{len(recs)} gap(s) since {since} UTC: {summary}", "", *lines])
