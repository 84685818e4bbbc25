"""``ingestor demo``: the simulator and the whole pipeline in one command, with a tally.

The simulator runs in this process and records what it delivers; the supervisor runs
beside it on the same loop with its usual child processes. At the end the simulator is
paused, the pipeline catches up, and each table's stored rows are counted against the
messages sent. Then the feature worker's rows are recomputed from the stored data by
``ingestor features replay``'s code and compared, value for value. The demo uses 1 s bars
(unless ``--feature-params`` says otherwise) so that a short run has bars to show.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import asyncpg
import orjson

from ingestor.binance.streams import DEFAULT_LIMITS
from ingestor.config import Settings, mask_dsn
from ingestor.db.embedded import EmbeddedPostgres
from ingestor.features.verify import verify_live_rows
from ingestor.sim.audit import audit
from ingestor.sim.chaos import Chaos
from ingestor.sim.server import SimConfig, Simulator
from ingestor.supervisor import Supervisor, open_database

log = logging.getLogger(__name__)

WS_TABLES = {"agg_trades": "event_time", "depth_updates": "event_time", "mark_prices": "event_time",
             "force_orders": "event_time"}
REST_TABLES = {"depth_snapshots": "time", "open_interest": "time"}
CATCH_UP_S = 30.0
CHAOS_LIFETIME_S = 20.0


def sent_rows(sim: Simulator) -> dict[str, int]:
    """Rows the simulator's deliveries should become, per table."""
    out = dict.fromkeys([*WS_TABLES, *REST_TABLES], 0)
    for rt in sim.markets.values():
        assert rt.hub.record is not None
        for stream, payloads in rt.hub.record.items():
            if stream.endswith("@aggTrade"):
                out["agg_trades"] += len(payloads)
            elif "@depth" in stream:
                out["depth_updates"] += len(payloads)
            elif stream.startswith("!markPrice@arr"):
                out["mark_prices"] += sum(len(orjson.loads(p)) for p in payloads)
            elif stream.startswith("!forceOrder@arr"):
                out["force_orders"] += len(payloads)
        for path, n in rt.rest.served.items():  # answered with data: an error reply stores nothing
            if path.endswith("/depth"):
                out["depth_snapshots"] += n
            elif path.endswith("/openInterest"):
                out["open_interest"] += n
    return out


async def stored_rows(dsn: str, since_ms: int) -> tuple[dict[str, int], int]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        since = since_ms / 1000
        counts = {}
        for table, col in {**WS_TABLES, **REST_TABLES}.items():
            counts[table] = await conn.fetchval(
                f"SELECT count(*) FROM {table} WHERE {col} >= to_timestamp($1)", since)
        gaps = await conn.fetchval("SELECT count(*) FROM stream_gaps WHERE detected_at >= to_timestamp($1)", since)
        return counts, gaps
    finally:
        await conn.close()


async def run_demo(settings: Settings, duration_s: float, n_symbols: int,
                   progress: Callable[[str], None], chaos_seed: int | None = None,
                   chaos_every_s: float = 3.0, watch: Callable[[Supervisor], None] | None = None) -> dict[str, Any]:
    # The demo owns the embedded server (when there is no DSN) so the tally can be read
    # after the pipeline has stopped: only then are the REST counts final.
    if settings.features and not any(p.startswith("bar_seconds=") for p in settings.feature_params):
        settings = replace(settings, feature_params=("bar_seconds=1", *settings.feature_params))
    config = SimConfig(n_symbols=n_symbols, record=True)
    if chaos_seed is not None:
        # Connections live 20 s on the simulator and are rotated at 15 s: rotation is part of
        # the mix. Two shards, so that killing one leaves the other recording.
        config = replace(config, limits={m: replace(lim, max_lifetime_s=CHAOS_LIFETIME_S)
                                         for m, lim in DEFAULT_LIMITS.items()})
        settings = replace(settings, connection_max_age_s=CHAOS_LIFETIME_S - 5, shards=max(2, settings.shards))
    dsn, embedded = await open_database(settings)
    try:
        async with Simulator(config) as sim:
            return await _run(sim, replace(settings, dsn=dsn), duration_s, progress,
                              "embedded" if embedded is not None else mask_dsn(dsn), chaos_seed, embedded,
                              chaos_every_s, watch)
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


async def _run(sim: Simulator, settings: Settings, duration_s: float, progress: Callable[[str], None],
               shown_dsn: str, chaos_seed: int | None = None,
               embedded: EmbeddedPostgres | None = None, chaos_every_s: float = 3.0,
               watch: Callable[[Supervisor], None] | None = None) -> dict[str, Any]:
    u = sim.urls
    settings = replace(settings, spot_ws_url=u["spot_ws"], futures_ws_url=u["futures_ws"],
                       spot_rest_url=u["spot_rest"], futures_rest_url=u["futures_rest"],
                       snapshot_interval_s=min(settings.snapshot_interval_s, 5.0) or 5.0,
                       open_interest_interval_s=min(settings.open_interest_interval_s, 2.0) or 2.0)
    assert settings.dsn is not None
    started_ms = int(time.time() * 1000)
    ready = asyncio.Event()
    sup = Supervisor(settings)
    task = asyncio.ensure_future(sup.run(lambda _: ready.set()))
    done_or_ready = await asyncio.wait((task, asyncio.ensure_future(ready.wait())),
                                       return_when=asyncio.FIRST_COMPLETED)
    if task in done_or_ready[0]:
        task.result()  # raises the start-up error
    chaos = chaos_task = None
    if chaos_seed is not None:
        chaos = _chaos(sim, sup, chaos_seed, embedded, chaos_every_s)
        chaos_task = asyncio.ensure_future(chaos.run(duration_s))
    try:
        t0 = time.monotonic()
        while (elapsed := time.monotonic() - t0) < duration_s or (chaos_task and not chaos_task.done()):
            await asyncio.sleep(1.0)
            if watch is not None:
                watch(sup)
            _, health = sup.health()
            msgs = sum(w.get("messages", 0) for w in health["workers"].values())
            rows = sum(health["workers"].get("writer", {}).get("rows", {}).values())
            progress(f"{elapsed:5.1f}/{duration_s:.0f} s  {msgs:>9,} messages  {rows:>9,} rows stored  "
                     f"{health['status']}")
        if chaos_task is not None:
            await chaos_task  # a database outage in progress ends first
            await _settle(sup)
        await sim.pause()
        ran_s = time.monotonic() - t0
        # Frames already sent may still be crossing loopback: wait for them before the
        # stop closes the sockets.
        ws_sent = sent_rows(sim)
        deadline = time.monotonic() + CATCH_UP_S
        while time.monotonic() < deadline:
            if chaos is None:
                stored, _ = await stored_rows(settings.dsn, started_ms)
                if all(stored[t] >= ws_sent[t] for t in WS_TABLES):
                    break
            else:  # some messages are gone on purpose: wait for the backfills and the gap rows
                found = await audit(sim, settings.dsn, started_ms)
                if found.total("agg_trades").lost == 0 and all(t.uncovered == 0 for t in (
                        found.total(x) for x in found.tables)):
                    break
            await asyncio.sleep(0.25 if chaos is None else 1.0)
        _, health = sup.health()
    finally:
        sup.request_stop()
        await task
    sent = sent_rows(sim)  # final: the REST worker has stopped too
    stored, gaps = await stored_rows(settings.dsn, started_ms)
    errors = sum(w.get("rejected", 0) + w.get("failed", 0) + sum(w.get("rejected_rows", {}).values())
                 for w in health["workers"].values())
    total = sum(stored[t] for t in WS_TABLES)
    features = None
    if settings.features and chaos is None:
        progress("recomputing the features from the stored data ...")
        features = await _check_features(settings, started_ms, health["workers"].get("features", {}))
    chaos_result = None
    if chaos is not None:
        found = await audit(sim, settings.dsn, started_ms)
        chaos_result = {"seed": chaos_seed, "faults": chaos.counts(), "injected": chaos.injected,
                        "tables": {t: vars(found.total(t)) for t in found.tables}, "gaps": found.gaps,
                        "rotations": sum(w.get("rotations", 0) for w in health["workers"].values())}
    return {
        "dsn": shown_dsn,
        "duration_s": round(ran_s, 1),
        "tables": {t: {"sent": sent[t], "stored": stored[t]} for t in sent},
        "gaps": gaps, "errors": errors,
        "msgs_per_s": round(total / max(ran_s, 1e-9), 1),
        "features": features,
        "chaos": chaos_result,
    }


def _chaos(sim: Simulator, sup: Supervisor, seed: int, embedded: EmbeddedPostgres | None,
           every_s: float) -> Chaos:
    def pids(prefix: str) -> list[int]:
        return [c.process.pid for c in sup.children if c.name.startswith(prefix) and c.process is not None
                and c.process.exitcode is None]

    def pid(prefix: str) -> int | None:
        live = pids(prefix)
        return live[0] if live else None

    def writer_state() -> str | None:
        return next((c.status.get("state") for c in sup.children if c.kind == "writer"), None)

    async def sql(statement: str) -> None:
        assert sup.dsn
        conn = await asyncpg.connect(sup.dsn, timeout=10)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    db_stop = db_start = None
    if embedded is not None:  # a server of the user's own is not ours to stop
        server = embedded

        async def db_stop() -> None:
            await asyncio.to_thread(server.stop)

        async def db_start() -> None:
            await asyncio.to_thread(server.start)

    return Chaos(sim, pid, seed, every_s, db_stop=db_stop, db_start=db_start, all_pids=pids,
                 writer_state=writer_state, sql=sql)


async def _settle(sup: Supervisor, timeout_s: float = 60.0) -> None:
    """After the last fault: until every worker runs and the writer is back on the database
    (its spool replayed), so that the tally counts what recovery brings back."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, health = sup.health()
        writer = health["workers"].get("writer", {})
        if all(w["alive"] for w in health["workers"].values()) and writer.get("mode") == "direct" \
                and health["database"]["reachable"]:
            return
        await asyncio.sleep(0.5)


async def _check_features(settings: Settings, since_ms: int, status: dict[str, Any]) -> dict[str, Any]:
    assert settings.dsn is not None
    fs = settings.feature_settings()
    conn = await asyncpg.connect(settings.dsn, timeout=10)
    try:
        cmp = await verify_live_rows(conn, fs, settings.market_list, since_ms, settings.snapshot_limit)
        syncs = await conn.fetchval("SELECT count(*) FROM book_syncs WHERE time >= to_timestamp($1)", since_ms / 1000)
        symbols = await conn.fetchval(
            "SELECT count(DISTINCT (market, symbol)) FROM features WHERE bar_time >= to_timestamp($1)", since_ms / 1000)
    finally:
        await conn.close()
    markets = status.get("markets", {}).values()
    return {
        "bar_seconds": fs.bar_seconds, "rows": cmp.live, "symbols": symbols, "replayed": cmp.replayed,
        "replay_identical": cmp.identical, "missing": len(cmp.missing), "extra": len(cmp.extra),
        "differing_values": len(cmp.differing), "book_syncs": syncs,
        "drift_checks": sum(m.get("drift_checks", 0) for m in markets),
        "drift_mismatches": sum(m.get("drift_mismatches", 0) for m in markets),
    }


def print_table(result: dict[str, Any]) -> None:
    out = sys.stdout
    out.write(f"\ndatabase: {result['dsn']}   ran {result['duration_s']} s   "
              f"{result['msgs_per_s']:,} msgs/s stored\n\n")
    out.write(f"{'table':<16}{'sent':>10}{'stored':>10}\n")
    for table, c in result["tables"].items():
        mark = "" if c["stored"] == c["sent"] else "   <- differs"
        if result.get("chaos") and table in result["chaos"]["tables"]:
            mark = ""  # messages lost to faults and trades fetched back over REST: the chaos table below
        out.write(f"{table:<16}{c['sent']:>10,}{c['stored']:>10,}{mark}\n")
    out.write(f"\ngaps: {result['gaps']}   errors: {result['errors']}\n")
    c = result.get("chaos")
    if c:
        out.write(f"\nchaos (seed {c['seed']}): {sum(c['faults'].values())} faults injected: "
                  + ", ".join(f"{k} {n}" for k, n in sorted(c["faults"].items()))
                  + f"; {c['rotations']} connection rotations\n")
        out.write(f"{'table':<16}{'sent':>10}{'stored':>10}{'lost':>8}{'dup':>6}{'unrecorded':>12}{'extra':>8}\n")
        for table, t in c["tables"].items():
            out.write(f"{table:<16}{t['sent']:>10,}{t['stored']:>10,}{t['lost']:>8,}{t['duplicated']:>6,}"
                      f"{t['uncovered']:>12,}{t['extra']:>8,}\n")
        out.write("lost: sent, not stored (trades must be 0: backfilled over REST; other messages lost in a "
                  "dropped connection are recorded as gaps, 'unrecorded' must be 0); extra: trades the "
                  "simulator skipped on purpose, fetched over REST\n")
        out.write("gaps by how they were closed: " + (", ".join(f"{k} {n}" for k, n in sorted(c["gaps"].items()))
                                                     or "none") + "\n")
    f = result.get("features")
    if f:
        verdict = "identical" if f["replay_identical"] else (
            f"DIFFERENT ({f['missing']} missing, {f['extra']} extra, {f['differing_values']} values differ)")
        out.write(f"\nfeatures: {f['rows']:,} rows ({f['symbols']} symbols, {f['bar_seconds']} s bars), "
                  f"{f['book_syncs']} books built, drift checks {f['drift_checks']:,} "
                  f"({f['drift_mismatches']} mismatched)\n"
                  f"replayed from the stored data: {f['replayed']:,} rows, {verdict}\n")
