"""``ingestor features replay`` as a job: connections, the sink, progress lines and the summary."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import asyncpg

from ingestor.feature_spec import FeatureSettings
from ingestor.features.output import TableSink, file_sink
from ingestor.features.query import fmt_time, utc
from ingestor.features.replay import ReplayError, ReplayRange, ReplayStats, replay


def progress_line(st: ReplayStats) -> str:
    span = max(1, st.end_ms - st.load_from_ms)
    done = min(1.0, max(0.0, (st.position_ms - st.load_from_ms) / span))
    events = sum(st.events.values())
    return (f"replay  {fmt_time(utc(min(st.position_ms, st.end_ms)))} UTC  {done:4.0%}  {events:>12,} events  "
            f"{st.rows:>10,} rows  {st.elapsed_s:6.1f} s")


def summary(st: ReplayStats, fs: FeatureSettings, where: str) -> str:
    ev = st.events
    bars = (st.end_ms - st.start_ms) // (fs.bar_seconds * 1000)
    return "\n".join((
        f"replayed {st.symbols} symbol(s) from {fmt_time(utc(st.start_ms))} to {fmt_time(utc(st.end_ms))} UTC "
        f"({bars:,} bars of {fs.bar_seconds} s) in {st.elapsed_s:.1f} s: {st.rows:,} rows {where}",
        f"read {ev.get('aggTrade', 0):,} trades, {ev.get('depthUpdate', 0):,} diffs, "
        f"{ev.get('forceOrder', 0):,} liquidations, {ev.get('snapshot', 0):,} snapshots",
        f"books built {st.syncs} time(s); drift checks against stored snapshots: {st.drift_ok:,} ok, "
        f"{st.drift_mismatch} mismatched; book gaps {st.gaps}; late events {st.late}",
    ))


async def run_replay(dsn: str, fs: FeatureSettings, rng: ReplayRange, out: Path | None, snapshot_limit: int,
                     progress: Callable[[str], None]) -> str:
    """Replay into the ``features`` table (replacing the range) or into ``out``; returns the summary."""
    conn = await asyncpg.connect(dsn, timeout=10)
    wconn = None
    try:
        if out is None:
            wconn = await asyncpg.connect(dsn, timeout=10)
            table = TableSink(wconn, fs.bar_seconds)
            try:
                st = await replay(conn, fs, rng, table.write, snapshot_limit=snapshot_limit,
                                  progress=lambda s: progress(progress_line(s)), begin=table.begin)
            except BaseException:
                await table.abort()
                raise
            await table.close()
            where = f"written to the features table (replacing {table.deleted:,})"
        else:
            try:
                sink = file_sink(out, fs.bar_seconds)
            except ValueError as exc:
                raise ReplayError(str(exc)) from None
            try:
                st = await replay(conn, fs, rng, sink.write, snapshot_limit=snapshot_limit,
                                  progress=lambda s: progress(progress_line(s)))
            finally:
                await sink.close()
            where = f"written to {out}"
    finally:
        await conn.close()
        if wconn is not None:
            await wconn.close()
    return summary(st, fs, where)
