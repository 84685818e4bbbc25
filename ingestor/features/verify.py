"""Live against replay: the ``features`` rows the worker wrote, recomputed from stored data.

The feature worker starts each market's bars at its first whole bar, so replaying from
that bar to the last one stored must give the same rows, value for value (NULL as NaN).
``ingestor demo`` runs this at the end; it is what a user runs to trust the replay.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from ingestor.binance.streams import Market
from ingestor.feature_spec import FEATURE_COLUMNS, FeatureSettings
from ingestor.features.engine import FeatureRow
from ingestor.features.replay import ReplayRange, replay


@dataclass
class Comparison:
    live: int = 0
    replayed: int = 0
    missing: list[tuple[str, str, int]] = field(default_factory=list)  # live rows the replay did not make
    extra: list[tuple[str, str, int]] = field(default_factory=list)  # replayed rows the worker did not write
    differing: list[tuple[str, str, int, str]] = field(default_factory=list)  # (market, symbol, bar, column)

    @property
    def identical(self) -> bool:
        return self.live > 0 and not (self.missing or self.extra or self.differing)


def same_value(stored: Any, computed: Any) -> bool:
    """A stored column (NULL for NaN) against the engine's value."""
    if isinstance(computed, float) and math.isnan(computed):
        return stored is None
    return bool(stored == computed)


def compare(live: list[asyncpg.Record], replayed: list[FeatureRow]) -> Comparison:
    out = Comparison(live=len(live), replayed=len(replayed))
    made = {(fr.market, fr.symbol, fr.bar.start_ms): fr.row for fr in replayed}
    seen = set()
    for rec in live:
        key = (rec["market"], rec["symbol"], rec["ms"])
        seen.add(key)
        row = made.get(key)
        if row is None:
            out.missing.append(key)
            continue
        out.differing.extend((*key, c) for c in FEATURE_COLUMNS if not same_value(rec[c], row[c]))
    out.extra = sorted(k for k in made if k not in seen)
    return out


def _collector(into: list[FeatureRow]) -> Callable[[list[FeatureRow]], Awaitable[None]]:
    async def collect(batch: list[FeatureRow]) -> None:
        into.extend(batch)

    return collect


async def verify_live_rows(conn: asyncpg.Connection, fs: FeatureSettings, markets: tuple[Market, ...],
                           since_ms: int, snapshot_limit: int | None) -> Comparison:
    """Replay, per market, the span of the worker's rows written since ``since_ms`` and compare."""
    total = Comparison()
    since = datetime.fromtimestamp(since_ms / 1000, tz=UTC)
    bar_ms = fs.bar_seconds * 1000
    for market in markets:
        live = await conn.fetch(
            """SELECT *, (extract(epoch FROM bar_time) * 1000)::bigint AS ms FROM features
                WHERE market = $1 AND bar_seconds = $2 AND bar_time >= $3 ORDER BY symbol, bar_time""",
            market, fs.bar_seconds, since)
        if not live:
            continue
        first = min(r["ms"] for r in live)
        last = max(r["ms"] for r in live) + bar_ms
        made: list[FeatureRow] = []
        await replay(conn, fs, ReplayRange(first, last, (market,)), _collector(made), snapshot_limit=snapshot_limit)
        part = compare(live, made)
        total.live += part.live
        total.replayed += part.replayed
        total.missing += part.missing
        total.extra += part.extra
        total.differing += part.differing
    return total
