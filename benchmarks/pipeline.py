"""End-to-end pipeline: ``ingestor simulate`` -> ``ingestor run --shards K`` -> PostgreSQL.

The requirement (issue text): measure, against the simulator, the sustained
end-to-end rate with zero loss for shards 1, 2, 4, event-to-commit latency p50/p99,
CPU seconds per million messages per process kind and peak RSS per process.

One *level* is one fresh set-up, run as real subprocesses:

1. a fresh database on the system PostgreSQL (TimescaleDB there: hypertables);
2. ``ingestor simulate`` (both markets, N symbols, panic regime off so the offered
   rate is steady) at a ``--rate`` chosen for a target of aggTrade + diff-depth
   messages per second;
3. ``ingestor run --shards K`` against it; wait until ``/health`` shows every
   connection up, then a short warm-up;
4. the window: simulator ``/stats``, ``/health``, ``/metrics`` and ``/proc`` CPU
   counters are read at its start and end, nothing else runs;
5. ``POST /pause`` stops the simulator's clock, so its per-stream ``sent`` counters are
   final; wait until the database holds that many rows (the *drain time*);
6. compare per stream (market, symbol, aggTrade or diff depth): rows stored, distinct
   ids and the last id with what the simulator sent. The simulator counts a message
   only once a connection took it, and the ingestor is its only client, so the
   comparison covers everything since the ingestor connected, warm-up included;
7. read peak RSS (``VmHWM``), SIGTERM the ingestor (must exit 0), stop the simulator,
   drop the database.

The feature worker (on by default) is watched too: its ``/health`` entry (input lag per
market, queue depth, bars) at both ends of the window, the events it processed
(``ingestor_feature_events_total``) at both ends, and after the pause how long it takes
to have processed every trade and diff the simulator sent (its *drain*). It does not
decide whether a level passes: the database does.

The offered rate steps up through the levels for each shard count and stops at the
first level that fails. A level passes with zero loss (every sent message stored
exactly once) and no backlog: the drain after the pause takes at most
``DRAIN_OK_S`` (a pipeline that falls behind during the window needs as long as it
fell behind).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from benchmarks.procs import CLK_TCK, PG_ROOT, Service, cpu_delta, cpu_seconds, postgres_backends, process_tree
from benchmarks.report import metric

SEED = 1
N_SYMBOLS = 20
# Diff-depth messages per symbol and second at the ingestor's default speeds (Spot
# 100 ms, USD-M 500 ms); the simulator sends one per speed interval when the book
# changed, which it does at every rate used here.
DEPTH_MSGS_PER_SYMBOL = 10 + 2
# Offered aggTrade + diff-depth msgs/s, stepped up until a level fails (the knee). The
# simulator plays a tape (its model recorded ahead), so it offers these rates for about
# 2 us of CPU a message; its live model would top out near 65,000 on the 2-core host.
FULL_LEVELS = (25_000, 50_000, 75_000, 100_000, 125_000, 150_000, 175_000, 200_000)
QUICK_LEVELS = (50_000, 100_000, 125_000, 150_000)
LIVE_MODEL_TOP = 60_000  # the live model's own top level (feature_worker's firehose)
# Tape length beyond warm-up + window: connections come up after the first subscription
# starts the tape, and the pause lands on the next whole second.
TAPE_MARGIN_S = 6.0
TAPE_CACHE = Path(__file__).resolve().parent / "results" / "tapes"
SIM_BEHIND_MS = 500  # model lag at the window's end above this: the simulator was the limit
SHARDS = (1, 2, 4)
DRAIN_OK_S = 3.0
KEPT_UP = 0.97  # stored / offered over the window, at least
WATCH_EVERY_S = 10.0
LONG_WINDOW_S = 60.0  # past this, a level's row counts take seconds: the drain is read from metrics
DRAIN_TIMEOUT_S = 60.0
LAG_TABLES = ("agg_trades", "depth_updates")
# Which streams are compared, and with which table and id column.
COMPARED = {"aggTrade": ("agg_trades", "aggregate_trade_id"), "depth": ("depth_updates", "final_update_id")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sim_rate(target: float, n_symbols: int) -> float:
    """``--rate`` (aggTrades/s per market) for ``target`` aggTrade + depth msgs/s in all."""
    return max(1.0, (target - n_symbols * DEPTH_MSGS_PER_SYMBOL) / 2)


@dataclass(frozen=True)
class TapePlan:
    """Play a recording instead of the live model (``simulate --tape-seconds``): one tape,
    recorded at ``peak`` msgs/s for ``seconds`` model seconds and cached in ``cache``,
    serves every level at or below the peak (played slower, it lasts longer)."""

    peak: float
    seconds: float
    cache: Path


def simulator_cmd(target: float, n_symbols: int, tape: TapePlan | None = None) -> list[str]:
    # Panic regimes (x4 orders at random times) would make the offered rate depend on
    # when the window falls; liquidation cascades stay on (small bursts, as in life).
    cmd = [sys.executable, "-m", "ingestor.cli", "--log-level", "WARNING", "simulate",
           "--markets", "spot,futures", "--n-symbols", str(n_symbols),
           "--rate", f"{sim_rate(target if tape is None else tape.peak, n_symbols):g}", "--seed", str(SEED),
           "--panic-every", "1000000"]
    if tape is not None:
        cmd += ["--tape-seconds", f"{tape.seconds:g}", "--tape-rate", f"{target:g}", "--tape-cache", str(tape.cache)]
    return cmd


def ingestor_cmd(dsn: str, shards: int, urls: dict[str, str], http_port: int,
                 extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "ingestor.cli", "--log-level", "WARNING", "run", "--dsn", dsn,
            "--shards", str(shards), "--spot-ws-url", urls["spot_ws"], "--futures-ws-url", urls["futures_ws"],
            "--spot-rest-url", urls["spot_rest"], "--futures-rest-url", urls["futures_rest"],
            "--http-port", str(http_port), *extra]


# ---- /proc ---------------------------------------------------------------------------


def host_cpu() -> tuple[float, int]:
    """(busy CPU seconds of the whole host since boot, cores) from /proc/stat."""
    lines = Path("/proc/stat").read_text().splitlines()
    ticks = [int(x) for x in lines[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    cores = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return (sum(ticks[:8]) - idle) / CLK_TCK, cores


def peak_rss_mb(pid: int) -> float | None:
    """``VmHWM``: the process's peak resident set so far, in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ---- simulator /stats ------------------------------------------------------------------


@dataclass(frozen=True)
class StreamKey:
    market: str
    kind: str  # aggTrade | depth
    symbol: str


def sent_by_stream(stats: dict[str, Any]) -> dict[StreamKey, tuple[int, int]]:
    """(messages sent, last id) of every compared stream in a ``/stats`` answer."""
    out = {}
    for market, m in stats["markets"].items():
        for name, rec in m["streams"].items():
            symbol, _, rest = name.partition("@")
            kind = rest.split("@", 1)[0]
            if kind in COMPARED and not symbol.startswith("!"):
                out[StreamKey(market, kind, symbol.upper())] = (rec["sent"], rec["last_id"])
    return out


def sent_total(stats: dict[str, Any], compared_only: bool) -> int:
    if compared_only:
        return sum(n for n, _ in sent_by_stream(stats).values())
    return sum(rec["sent"] for m in stats["markets"].values() for rec in m["streams"].values())


# ---- /metrics: the event-to-commit histogram --------------------------------------------


def lag_buckets(text: str) -> dict[float, float]:
    """Cumulative counts per upper bound of ``ingestor_event_to_commit_seconds``, summed
    over the compared tables."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "ingestor_event_to_commit_seconds":
            continue
        for s in family.samples:
            if s.name.endswith("_bucket") and s.labels.get("table") in LAG_TABLES:
                le = float(s.labels["le"])
                out[le] = out.get(le, 0.0) + s.value
    return out


def histogram_quantile(buckets: dict[float, float], q: float) -> float | None:
    """Prometheus-style: linear interpolation inside the bucket holding rank q * total.
    Above the last finite bound there is nothing to interpolate: that bound is returned."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = le, count
    return lower


# ---- the feature worker: /metrics and /health ---------------------------------------------

FEATURE_KINDS = ("aggTrade", "depthUpdate")  # what the compared streams carry


def feature_events(text: str) -> float:
    """Trades + diffs the feature worker has processed (``ingestor_feature_events_total``,
    every market). It reports once a second, so this is up to a second old."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "ingestor_feature_events":
            total += sum(s.value for s in family.samples
                         if s.name.endswith("_total") and s.labels.get("kind") in FEATURE_KINDS)
    return total


def feature_status(health: dict[str, Any]) -> dict[str, Any] | None:
    """The feature worker's ``/health`` entry, the figures read here (None: no such worker)."""
    w = next((w for w in health["workers"].values() if w.get("kind") == "features"), None)
    if w is None:
        return None
    markets = w.get("markets") or {}
    return {"input_lag_s": {m: v.get("input_lag_s") for m, v in markets.items()},
            "bars": {m: v.get("bars") for m, v in markets.items()},
            "late": {m: v.get("late") for m, v in markets.items()},
            "books": {m: v.get("books") for m, v in markets.items()},
            "queue_depth": w.get("queue_depth"), "waiting_bars": w.get("waiting_bars"),
            "rejected": w.get("rejected"), "status_age_s": w.get("status_age_s"), "alive": w.get("alive")}


async def wait_features_drained(http: Any, base: str, expected: int, timeout: float) -> tuple[float | None, float]:
    """Monotonic time at which the feature worker had processed ``expected`` trades + diffs
    (None: not within ``timeout``, or its count stopped growing short of it for 5 s)."""
    t0 = time.monotonic()
    last, since = -1.0, t0
    while time.monotonic() - t0 < timeout:
        async with http.get(f"{base}/metrics") as resp:
            n = feature_events(await resp.text())
        now = time.monotonic()
        if n >= expected:
            return now, n
        if n != last:
            last, since = n, now
        elif now - since > 5.0:
            break
        await asyncio.sleep(0.25)
    return None, last


# ---- the database ---------------------------------------------------------------------


async def pg_exec(sql: str) -> None:
    conn = await asyncpg.connect(f"{PG_ROOT}/postgres", timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def stored_total(conn: Any) -> int:
    return int(await conn.fetchval("SELECT (SELECT count(*) FROM agg_trades) + (SELECT count(*) FROM depth_updates)"))


async def compare(conn: Any, sent: dict[StreamKey, tuple[int, int]]) -> dict[str, Any]:
    """Per stream: stored rows, distinct ids and the last id against what was sent."""
    stored: dict[StreamKey, tuple[int, int, int | None]] = {}
    for kind, (table, id_col) in COMPARED.items():
        rows = await conn.fetch(f"SELECT market, symbol, count(*) AS n, count(DISTINCT {id_col}) AS d, "
                                f"max({id_col}) AS last FROM {table} GROUP BY market, symbol")
        for r in rows:
            stored[StreamKey(r["market"], kind, r["symbol"])] = (r["n"], r["d"], r["last"])
    missing = duplicates = 0
    bad: list[str] = []
    for key in sorted(set(sent) | set(stored), key=lambda k: (k.market, k.kind, k.symbol)):
        n_sent, last_sent = sent.get(key, (0, None))
        n, distinct, last = stored.get(key, (0, 0, None))
        missing += max(0, n_sent - distinct)
        duplicates += n - distinct
        if n != n_sent or distinct != n or last != last_sent:
            bad.append(f"{key.market} {key.symbol} {key.kind}: sent {n_sent} (last id {last_sent}), "
                       f"stored {n} ({distinct} distinct, last id {last})")
    by_kind: dict[str, int] = {}
    for key, (n_sent, _) in sent.items():
        by_kind[key.kind] = by_kind.get(key.kind, 0) + n_sent
    return {"streams": len(set(sent) | set(stored)), "sent": sum(n for n, _ in sent.values()),
            "sent_by_kind": by_kind,
            "stored": sum(n for n, _, _ in stored.values()), "missing": missing, "duplicates": duplicates,
            "mismatched_streams": bad[:20], "n_mismatched": len(bad)}


async def wait_drained(conn: Any, expected: int, timeout: float) -> tuple[float | None, int]:
    """Seconds until the compared tables hold ``expected`` rows (None: not within the
    timeout, or the count stopped growing short of it for 5 s)."""
    t0 = time.monotonic()
    last, since = -1, t0
    while time.monotonic() - t0 < timeout:
        n = await stored_total(conn)
        now = time.monotonic()
        if n >= expected:
            return now - t0, n
        if n != last:
            last, since = n, now
        elif now - since > 5.0:
            break
        await asyncio.sleep(0.2)
    return None, last


# ---- one level -------------------------------------------------------------------------


async def get_json(http: Any, url: str) -> dict[str, Any]:
    async with http.get(url) as resp:
        return orjson.loads(await resp.read())  # type: ignore[no-any-return]


async def wait_connected(http: Any, health_url: str, ingestor: Service, timeout: float) -> dict[str, Any]:
    """The first ``/health`` answer with every worker reporting and every connection up."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if ingestor.proc is not None and ingestor.proc.poll() is not None:
            raise RuntimeError(f"ingestor exited with {ingestor.proc.returncode}: {ingestor.stderr_tail()}")
        try:
            last = await get_json(http, health_url)
        except (TimeoutError, OSError, ValueError, aiohttp.ClientError) as exc:
            last = repr(exc)
        else:
            workers = last["workers"].values()
            sockets = [w for w in workers if w.get("kind") == "socket"]
            if (all(w.get("kind") and w["alive"] for w in workers) and sockets
                    and all(w["connected"] == w["connections"] for w in sockets)):
                return last  # type: ignore[no-any-return]
        await asyncio.sleep(0.25)
    raise RuntimeError(f"ingestor not connected within {timeout} s; last /health: {last}")


def kinds_of(health: dict[str, Any], supervisor: int) -> dict[int, str]:
    """pid -> process kind (socket, writer, rest, supervisor, other: mp's resource tracker)."""
    kinds = {w["pid"]: w["kind"] for w in health["workers"].values() if w.get("pid")}
    kinds[supervisor] = "supervisor"
    for pid in process_tree(supervisor):
        kinds.setdefault(pid, "other")
    return kinds


def names_of(health: dict[str, Any], supervisor: int) -> dict[int, str]:
    names = {w["pid"]: name for name, w in health["workers"].items() if w.get("pid")}
    names[supervisor] = "supervisor"
    return names


def per_kind(delta: dict[int, float], kinds: dict[int, str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for pid, sec in delta.items():
        out[kinds.get(pid, "other")] = out.get(kinds.get(pid, "other"), 0.0) + sec
    return out


async def run_level(shards: int, target: float, n_symbols: int, warmup: float, window: float,
                    ingestor_args: tuple[str, ...] = (), tape: TapePlan | None = None,
                    watch: Callable[[dict[int, str]], None] | None = None) -> dict[str, Any]:
    """One fresh simulator + ingestor + database at one offered rate; see the module doc.
    ``ingestor_args``: extra ``ingestor run`` flags (e.g. feature parameters); ``tape``: the
    simulator plays a recording (rates beyond what its live model generates); ``watch``:
    called with the ingestor's processes (pid -> name) every WATCH_EVERY_S of the window."""
    db = f"bench_pipeline_{os.getpid()}_{shards}_{int(target)}"
    dsn = f"{PG_ROOT}/{db}"
    await pg_exec(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    await pg_exec(f"CREATE DATABASE {db}")
    sim = Service("simulator", simulator_cmd(target, n_symbols, tape), read_stdout=True)
    ingestor: Service | None = None
    result: dict[str, Any] = {"shards": shards, "target": target, "sim_rate": sim_rate(target, n_symbols),
                              "n_symbols": n_symbols, "error": None}
    try:
        sim.start()
        # A tape not in the cache yet is recorded before the simulator answers.
        urls = orjson.loads(sim.first_line(30.0 if tape is None else 600.0))
        http_port = free_port()
        ingestor = Service("ingestor", ingestor_cmd(dsn, shards, urls, http_port, ingestor_args))
        base = f"http://127.0.0.1:{http_port}"
        result["commands"] = [" ".join(sim.cmd), " ".join(ingestor.cmd)]
        t_start = time.monotonic()
        ingestor.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            health = await wait_connected(http, f"{base}/health", ingestor, 60.0)
            result["connect_s"] = time.monotonic() - t_start
            await asyncio.sleep(warmup)
            result.update(await measure(http, urls["admin"], base, ingestor.pid, sim.pid, db, window, watch))
            result.update(await finish(http, urls["admin"], base, dsn, result.get("features_end") is not None,
                                       by_metrics=window > LONG_WINDOW_S))
            health = await get_json(http, f"{base}/health")
            result["features_after"] = feature_status(health)
        result["restarts"] = {n: w["restarts"] for n, w in health["workers"].items()}
        result["peak_rss_mb"] = {name: peak_rss_mb(pid) for pid, name in names_of(health, ingestor.pid).items()}
    except Exception as exc:  # noqa: BLE001 - the report says what failed; the next level is skipped
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if ingestor is not None:
            result["ingestor_exit_code"] = ingestor.stop(120.0)
            if result["ingestor_exit_code"] != 0:
                result["ingestor_stderr_tail"] = ingestor.stderr_tail()
        result["sim_exit_code"] = sim.stop(30.0)
        await pg_exec(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    if result.get("tape_ran_out") and result["error"] is None:
        result["error"] = "the simulator's tape ran out inside the window (record a longer one)"
    # Kept up: stored what was offered during the window (a pipeline falling behind stores
    # less and drains the difference after the pause), then drained quickly.
    kept_up = (result.get("stored_per_s") or 0) >= KEPT_UP * (result.get("offered_per_s") or float("inf"))
    result["passed"] = bool(result["error"] is None and result.get("missing") == 0 and result.get("duplicates") == 0
                            and result.get("drain_s") is not None and result["drain_s"] <= DRAIN_OK_S
                            and kept_up and not any(result.get("restarts", {}).values()))
    # Event times are the simulator's model clock: once that falls behind wall time the
    # offered rate is below the nominal one and every latency includes the simulator's lag.
    result["sim_behind"] = (result.get("model_lag_ms") or [0, 0])[1] > SIM_BEHIND_MS
    return result


async def measure(http: Any, admin: str, base: str, supervisor: int, sim_pid: int, db: str,
                  window: float, watch: Callable[[dict[int, str]], None] | None = None) -> dict[str, Any]:
    """The window: counters at its start and end, nothing else in between (but ``watch``,
    which reads /proc, and /health to follow a restarted worker)."""
    conn = await asyncpg.connect(f"{PG_ROOT}/{db}", timeout=10)
    try:
        backends = await postgres_backends(conn, db)
        health0 = await get_json(http, f"{base}/health")
        kinds = kinds_of(health0, supervisor)
        async with http.get(f"{base}/metrics") as resp:
            text0 = await resp.text()
        lag0 = lag_buckets(text0)
        sim_pids = process_tree(sim_pid)
        watched = list(kinds) + backends + sim_pids
        cpu0 = cpu_seconds(watched)
        host0 = host_cpu()
        st0 = await get_json(http, f"{admin}/stats")
        stored0 = await stored_total(conn)
        t0 = time.monotonic()
        if watch is None:
            await asyncio.sleep(window)
        else:
            while (left := t0 + window - time.monotonic()) > 0:
                watch(names_of(await get_json(http, f"{base}/health"), supervisor))
                await asyncio.sleep(min(WATCH_EVERY_S, left))
        st1 = await get_json(http, f"{admin}/stats")
        stored1 = await stored_total(conn)
        t1 = time.monotonic()
        cpu = cpu_delta(cpu0, cpu_seconds(watched))
        host1 = host_cpu()
        async with http.get(f"{base}/metrics") as resp:
            text1 = await resp.text()
        lag1 = lag_buckets(text1)
        health1 = await get_json(http, f"{base}/health")
    finally:
        await conn.close()
    elapsed = t1 - t0
    lag = {le: lag1.get(le, 0.0) - lag0.get(le, 0.0) for le in lag1}
    kinds.update({pid: "postgres" for pid in backends})
    kinds.update({pid: "simulator" for pid in sim_pids})
    sockets = {n: w["messages"] for n, w in health1["workers"].items() if w.get("kind") == "socket"}
    sockets0 = {n: w["messages"] for n, w in health0["workers"].items() if w.get("kind") == "socket"}
    return {
        "window_s": elapsed,
        "offered_per_s": (sent_total(st1, True) - sent_total(st0, True)) / elapsed,
        "all_messages": sent_total(st1, False) - sent_total(st0, False),
        # Rows committed: what a reader of the database sees, counted at both ends.
        "stored_per_s": (stored1 - stored0) / elapsed,
        "lag_p50_s": histogram_quantile(lag, 0.5),
        "lag_p99_s": histogram_quantile(lag, 0.99),
        "lag_samples": lag.get(float("inf"), 0.0),
        "cpu_s_by_kind": per_kind(cpu, kinds),
        "cpu_cores_by_kind": {k: v / elapsed for k, v in per_kind(cpu, kinds).items()},
        # The whole host: what the processes above leave out (PostgreSQL's WAL writer and
        # checkpointer, the kernel's loopback networking, anything else running).
        "host_busy_cores": (host1[0] - host0[0]) / elapsed, "host_cores": host1[1],
        "socket_msgs_per_s": {n: (sockets[n] - sockets0.get(n, 0)) / elapsed for n in sockets},
        "writer_queue_depth_end": health1["workers"]["writer"].get("queue_depth"),
        "model_lag_ms": [st0.get("model_lag_ms"), st1.get("model_lag_ms")],
        "regime": sorted({m["regime"] for s in (st0, st1) for m in s["markets"].values()}),
        "slow_consumer_closed": sum(m["ws"].get("slow_consumer_closed_total", 0) for m in st1["markets"].values()),
        # A tape that ran out inside the window offered less than the level: not a measurement.
        "tape_ran_out": any(m.get("tape", {}).get("finished") for m in st1["markets"].values()),
        # The feature worker: its status at both ends, and trades + diffs processed per second
        # (from its once-a-second report, so within a second at each end).
        "features_start": feature_status(health0),
        "features_end": feature_status(health1),
        "features_per_s": (feature_events(text1) - feature_events(text0)) / elapsed,
    }


async def finish(http: Any, admin: str, base: str, dsn: str, features: bool, by_metrics: bool = False
                 ) -> dict[str, Any]:
    """Pause the simulator; from then on, wait for the database and the feature worker to
    catch up (together); then compare per stream. ``by_metrics``: the database's catching up
    is read from the writer's committed-rows counter (1 s resolution) instead of counting
    rows, which takes seconds on the tens of millions a long run stores."""
    async with http.post(f"{admin}/pause") as resp:
        if resp.status != 200:
            raise RuntimeError(f"simulator did not pause: {await resp.text()}")
    paused_at = time.monotonic()
    stats = await get_json(http, f"{admin}/stats")
    sent = sent_by_stream(stats)
    expected = sum(n for n, _ in sent.values())
    out: dict[str, Any] = {}
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        db_wait = wait_written(http, base, expected, DRAIN_TIMEOUT_S) if by_metrics else \
            wait_drained(conn, expected, DRAIN_TIMEOUT_S)
        feature_wait = wait_features_drained(http, base, expected, DRAIN_TIMEOUT_S) if features else None
        done = await asyncio.gather(db_wait, *([feature_wait] if feature_wait is not None else []))
        out["drain_s"] = done[0][0]
        if features:
            at, n = done[1]
            out["features_drain_s"] = None if at is None else at - paused_at
            out["features_events_after"] = n
        out.update(await compare(conn, sent))
    finally:
        await conn.close()
    return out


async def wait_written(http: Any, base: str, expected: int, timeout: float) -> tuple[float | None, int]:
    """Seconds until the writer has committed ``expected`` agg_trades + depth_updates rows,
    from ``ingestor_rows_written_total`` (None: not within ``timeout``)."""
    from prometheus_client.parser import text_string_to_metric_families

    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < timeout:
        async with http.get(f"{base}/metrics") as resp:
            text = await resp.text()
        n = int(sum(s.value for f in text_string_to_metric_families(text) if f.name == "ingestor_rows_written"
                    for s in f.samples if s.name.endswith("_total") and s.labels.get("table") in LAG_TABLES))
        if n >= expected:
            return time.monotonic() - t0, n
        await asyncio.sleep(0.25)
    return None, n


# ---- the suite -------------------------------------------------------------------------


def quick_tape(window: float = 8.0, warmup: float = 2.0) -> TapePlan:
    """The tape of ``pipeline --quick`` (the sim suite plays it too: one recording)."""
    return TapePlan(max(QUICK_LEVELS), warmup + window + TAPE_MARGIN_S, TAPE_CACHE)


def record_tape(tape: TapePlan, n_symbols: int) -> dict[str, Any]:
    """Record the levels' tape into its cache now (a no-op when it is there), so no level's
    start-up includes the recording."""
    cmd = simulator_cmd(tape.peak, n_symbols, tape) + ["--tape-record-only"]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"recording the tape failed: {out.stderr[-2000:]}")
    return {"markets": orjson.loads(out.stdout), "wall_s": time.monotonic() - t0}


def _level(shards: int, target: float, n_symbols: int, warmup: float, window: float,
           tape: TapePlan | None) -> dict[str, Any]:
    print(f"[pipeline] shards={shards} nominal {target:,.0f} msg/s ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    r = asyncio.run(run_level(shards, target, n_symbols, warmup, window, tape=tape))
    r["level_wall_s"] = time.monotonic() - t0
    print(f"[pipeline]   {verdict(r)} ({r['level_wall_s']:.0f} s)", file=sys.stderr, flush=True)
    return r


def step_up(shards: int, levels: Iterable[float], n_symbols: int, warmup: float, window: float,
            tape: TapePlan | None = None, refine: int = 0) -> list[dict[str, Any]]:
    """Levels in increasing order until the first that fails, or at which the simulator
    could not keep up (a higher level would only offer the same rate); then ``refine``
    halvings of the gap between the last level passed and the first failed (the knee)."""
    results = []
    for target in levels:
        r = _level(shards, target, n_symbols, warmup, window, tape)
        results.append(r)
        if not r["passed"] or r["sim_behind"]:
            break
    for _ in range(refine):
        ok = [r["target"] for r in results if r["passed"] and not r["sim_behind"]]
        bad = [r["target"] for r in results if not r["passed"]]
        if not ok or not bad or min(bad) - max(ok) < 10_000:
            break
        results.append(_level(shards, round((max(ok) + min(bad)) / 2, -3), n_symbols, warmup, window, tape))
    return sorted(results, key=lambda r: r["target"])


def verdict(r: dict[str, Any]) -> str:
    if r["error"]:
        return f"error: {r['error'][:200]}"
    drain = "not drained" if r.get("drain_s") is None else f"drain {r['drain_s']:.1f} s"
    sim = f", simulator {r['model_lag_ms'][1]} ms behind wall time" if r["sim_behind"] else ""
    lag, own = feature_lag(r), feature_own_lag(r)
    feat = "" if lag is None or own is None else \
        f", feature input lag {lag:.2f} s at the window's end ({own:+.2f} s beyond the simulator's)"
    return (f"{'ok' if r['passed'] else 'FAIL'}: offered {r['offered_per_s']:,.0f}/s, stored "
            f"{r['stored_per_s'] or 0:,.0f}/s, missing {r['missing']}, duplicates {r['duplicates']}, "
            f"{drain}{sim}{feat}")


def feature_lag(r: dict[str, Any]) -> float | None:
    """The feature worker's input lag at the window's end, the larger of the markets."""
    lags = [v for v in ((r.get("features_end") or {}).get("input_lag_s") or {}).values() if v is not None]
    return max(lags) if lags else None


def feature_own_lag(r: dict[str, Any]) -> float | None:
    """That lag minus the simulator's model lag (event times are its model clock): what the
    ingestor side adds. The two are read within a second of each other (the worker reports
    once a second), so it is good to about that."""
    lag, sim = feature_lag(r), (r.get("model_lag_ms") or [None, None])[1]
    return None if lag is None or sim is None else lag - sim / 1000


def _ratio(value: float | None, base: float | None) -> str:
    return f"x{value / base:.2f} vs shards=1" if value is not None and base else ""


def cpu_per_million(r: dict[str, Any], kind: str) -> float | None:
    sec = r.get("cpu_s_by_kind", {}).get(kind)
    return sec / (r["all_messages"] / 1e6) if sec is not None and r.get("all_messages") else None


def _rss(r: dict[str, Any], prefix: str) -> list[float]:
    return [v for k, v in (r.get("peak_rss_mb") or {}).items() if k.startswith(prefix) and v is not None]


def _highest(results: list[dict[str, Any]], clean: bool) -> dict[str, Any] | None:
    """The highest level passed (``clean``: with the simulator keeping up)."""
    ok = [r for r in results if r["passed"] and not (clean and r["sim_behind"])]
    return max(ok, key=lambda r: r["target"], default=None)


def _sustained_note(results: list[dict[str, Any]], best: dict[str, Any] | None) -> str:
    if best is None:
        return "no level passed"
    if best["sim_behind"]:
        bound = (f"the simulator fell {best['model_lag_ms'][1]} ms behind wall time there: the load generator, "
                 "not the pipeline, was the limit, so a lower bound")
    elif all(r["passed"] for r in results):
        bound = "every level passed: a lower bound"
    else:
        bound = ""
    return "; ".join(x for x in (f"stored rate at the highest level passed (nominal {best['target']:,.0f})",
                                 bound) if x)


def summary_metrics(by_shards: dict[int, list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], float, list[str]]:
    """Metric rows: the sustained rate per shard count, then every figure at the
    reference level, shard counts side by side so the ratios read down a column.

    The reference level is the highest that every shard count passed with the simulator
    keeping up: the shard counts then compare at the same offered load, and the
    latencies hold no simulator lag."""
    clean = {k: _highest(rs, clean=True) for k, rs in by_shards.items()}
    first = min(r["target"] for rs in by_shards.values() for r in rs)
    all_clean = all(b is not None for b in clean.values())
    ref = min(b["target"] for b in clean.values() if b is not None) if all_clean else first
    at_ref = {k: next((r for r in rs if r["target"] == ref), None) for k, rs in by_shards.items()}
    base = min(by_shards)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []

    def per_shards(name: str, unit: str, value: Any, note: str = "", ratio: bool = True) -> None:
        base_run = at_ref.get(base)
        base_value = value(base_run) if base_run is not None and not base_run["error"] else None
        for k, r in at_ref.items():
            v = value(r) if r is not None and not r["error"] else None
            extra = _ratio(v, base_value) if ratio and k != base else ""
            rows.append(metric(f"{name}, shards={k}", v, unit, "; ".join(x for x in (note, extra) if x)))

    best = {k: _highest(rs, clean=False) for k, rs in by_shards.items()}
    base_best = best[base]
    for k, b in best.items():
        note = _sustained_note(by_shards[k], b)
        c = clean[k]
        if b is not None and b["sim_behind"] and c is not None:
            note += (f" ({c['stored_per_s']:,.0f} at nominal {c['target']:,.0f}, "
                     "the highest with the simulator keeping up)")
        # A ratio of two lower bounds set by the load generator says nothing about shards.
        if k != base and b is not None and base_best is not None and not (b["sim_behind"] or base_best["sim_behind"]):
            note += "; " + _ratio(b["stored_per_s"], base_best["stored_per_s"])
        rows.append(metric(f"sustained zero-loss rate, shards={k}", b["stored_per_s"] if b else None, "msg/s", note))
        levels = "; ".join(f"{r['target']:,.0f}: {verdict(r)}" for r in by_shards[k])
        notes.append(f"shards={k}, levels (nominal msg/s): {levels}")
    notes.insert(0, f"Rows after the sustained rates are at the reference level, nominal {ref:,.0f} msg/s: "
                    + ("the highest that every shard count passed with the simulator keeping up." if all_clean else
                       "the lowest level (not every shard count passed a level with the simulator keeping up)."))

    per_shards("offered", "msg/s", lambda r: r["offered_per_s"], "aggTrade + diff depth sent by the simulator")
    per_shards("stored", "msg/s", lambda r: r["stored_per_s"], "agg_trades + depth_updates rows committed")
    per_shards("loss (sent - stored, whole run)", "msgs", lambda r: r["missing"],
               "per stream, distinct ids; 0 = zero loss", ratio=False)
    per_shards("duplicates", "rows", lambda r: r["duplicates"], ratio=False)
    per_shards("drain after pause", "s", lambda r: r["drain_s"],
               f"until the database holds every sent message; <= {DRAIN_OK_S:g} s = no backlog", ratio=False)
    per_shards("event-to-commit p50", "ms", lambda r: _ms(r["lag_p50_s"]), "bucket-interpolated, see notes")
    per_shards("event-to-commit p99", "ms", lambda r: _ms(r["lag_p99_s"]), "bucket-interpolated, see notes")
    for kind, note in (("socket", "all K socket workers together"), ("writer", ""), ("rest", ""),
                       ("features", "the feature worker: books, bars, indicators"),
                       ("supervisor", ""), ("postgres", "server backends of the benchmark database (not ours)"),
                       ("simulator", "context: the load generator")):
        per_shards(f"CPU per 1M msgs, {kind}", "CPU-s", lambda r, kind=kind: cpu_per_million(r, kind), note)
    per_shards("feature input lag at window end", "s", feature_lag,
               "wall time minus the latest event time the feature worker processed (/health, larger market); "
               "includes the simulator's model lag", ratio=False)
    per_shards("feature lag beyond the simulator's", "s", feature_own_lag,
               "the row above minus the simulator's model lag: what the ingestor adds", ratio=False)
    per_shards("feature queue at window end", "items", lambda r: (r.get("features_end") or {}).get("queue_depth"),
               "Feed batches + snapshots waiting", ratio=False)
    per_shards("feature drain after pause", "s", lambda r: r.get("features_drain_s"),
               "until it has processed every trade and diff sent (1 s report resolution)", ratio=False)
    per_shards("CPU busy, all processes", "cores",
               lambda r: sum(r["cpu_cores_by_kind"].values()), "ingestor + postgres backends + simulator")
    per_shards("peak RSS, supervisor", "MB", lambda r: _first(_rss(r, "supervisor")), "VmHWM")
    per_shards("peak RSS, socket worker (largest)", "MB", lambda r: max(_rss(r, "socket"), default=None),
               "VmHWM of each socket-i in the details")
    per_shards("peak RSS, writer", "MB", lambda r: _first(_rss(r, "writer")), "VmHWM")
    per_shards("peak RSS, rest", "MB", lambda r: _first(_rss(r, "rest")), "VmHWM")
    per_shards("peak RSS, features", "MB", lambda r: _first(_rss(r, "features")), "VmHWM")
    per_shards("peak RSS, all ingestor processes", "MB", lambda r: sum(_rss(r, "")), "sum of VmHWM")
    per_shards("busiest shard's share of messages", "ratio", lambda r: _busiest(r),
               "1/K = perfectly even", ratio=False)
    return rows, ref, notes


def ceiling_rows(by_shards: dict[int, list[dict[str, Any]]], window: float) -> dict[str, Any]:
    """The COPY ceiling for the rows the pipeline stored (the same mix of aggTrades and diffs,
    the writer's number of connections), measured now, in the same run, and the best
    sustained rate over it."""
    from benchmarks.copy_ceiling import measure_ceiling
    from ingestor.config import Settings

    best = max((r for rs in by_shards.values() for r in rs if r["passed"]),
               key=lambda r: r["stored_per_s"], default=None)
    if best is None:
        return {"metrics": [], "result": None}
    kinds = best.get("sent_by_kind") or {"aggTrade": 1}
    mix = {"aggTrade": kinds.get("aggTrade", 0), "depthUpdate": kinds.get("depth", 0)}
    connections = Settings().writer_connections
    print(f"[pipeline] COPY ceiling: {connections} connections, mix {mix} ...", file=sys.stderr, flush=True)
    result = asyncio.run(measure_ceiling(PG_ROOT, {k: v for k, v in mix.items() if v}, connections, window))
    ratio = best["stored_per_s"] / result["rows_per_s"] if result.get("rows_per_s") else None
    return {"result": result, "metrics": [
        metric("COPY ceiling, same rows and connections", result.get("rows_per_s"), "rows/s",
               f"pre-encoded batches of the same kinds ({', '.join(f'{k} {v:,}' for k, v in mix.items())} in the "
               f"best level) COPYed straight into a fresh database's tables over {connections} connections, "
               "nothing else running (benchmarks/copy_ceiling.py)"),
        metric("sustained rate / COPY ceiling", ratio, "ratio",
               f"best sustained zero-loss rate {best['stored_per_s']:,.0f}/s (shards={best['shards']}); "
               "the pipeline shares the 2 cores with the simulator, the ceiling has PostgreSQL alone"),
    ]}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _first(values: list[float]) -> float | None:
    return values[0] if values else None


def _busiest(r: dict[str, Any]) -> float | None:
    rates = list(r.get("socket_msgs_per_s", {}).values())
    return max(rates) / sum(rates) if rates and sum(rates) else None


def run(quick: bool, shards: tuple[int, ...] | None = None, levels: tuple[float, ...] | None = None,
        window: float | None = None, n_symbols: int = N_SYMBOLS, live_model: bool = False) -> dict[str, Any]:
    shards = shards or ((1,) if quick else SHARDS)
    levels = tuple(sorted(levels or (QUICK_LEVELS if quick else FULL_LEVELS)))
    window = window or (8.0 if quick else 20.0)
    warmup = 2.0 if quick else 3.0
    tape = None if live_model else TapePlan(max(levels), warmup + window + TAPE_MARGIN_S, TAPE_CACHE)
    params = {"shards": ",".join(map(str, shards)), "levels_msg_per_s": ",".join(f"{x:g}" for x in levels),
              "n_symbols": n_symbols, "markets": "spot,futures", "warmup_s": warmup, "window_s": window,
              "drain_ok_s": DRAIN_OK_S, "load": "live model" if tape is None else
              f"tape: recorded at {tape.peak:g} msg/s for {tape.seconds:g} s, played at each level's rate"}
    tape_info = record_tape(tape, n_symbols) if tape is not None else None
    by_shards = {k: step_up(k, levels, n_symbols, warmup, window, tape, refine=0 if quick else 2) for k in shards}
    metrics, ref, level_notes = summary_metrics(by_shards)
    ceiling = ceiling_rows(by_shards, window)
    metrics += ceiling["metrics"]
    notes = level_notes + [
        "A level is a fresh database, simulator and `ingestor run`; the offered rate steps up and stops at the "
        f"first level with loss, duplicates, a worker restart or a drain longer than {DRAIN_OK_S:g} s after the "
        "simulator's pause (a drain that long means the pipeline had fallen behind), or where the simulator "
        "could not keep up with wall time.",
        "Loss is counted per stream over the whole run (warm-up included): simulator `/stats` `sent` (it counts "
        "a message once a connection took it) against rows, distinct ids and the last id in agg_trades / "
        "depth_updates. Offered and stored rates are over the window only.",
        "Event-to-commit: the writer's `ingestor_event_to_commit_seconds` histogram, agg_trades + depth_updates, "
        "the window's increase, quantiles interpolated linearly inside buckets (bounds 10, 25, 50, 100, 200, "
        "300, 500 ms, 1 s...): a figure inside a bucket is an estimate, not a measured value. The writer "
        "observes 16 quantiles of each COPY's event times, so every COPY weighs the same, whatever its size.",
        "Event time is the simulator's model clock (10 ms steps), so latency includes up to 10 ms of the "
        "simulator's own batching and the time frames wait in its socket buffer, and, at a level where the "
        f"simulator fell behind wall time (more than {SIM_BEHIND_MS} ms at the window's end), its whole lag: "
        "such a level ends the stepping and is never the reference level.",
        "CPU per 1M msgs: user + system time from /proc over the window, divided by every message the "
        "simulator sent in it (all streams, mark-price arrays and liquidations included). `postgres` is the "
        "server backends connected to the benchmark database (the COPYs' jsonb parsing runs there); WAL writer "
        "and checkpointer are not counted. All processes share the host's cores, simulator included. /proc "
        "counts in 10 ms ticks: rest and supervisor use only a few ticks per window, so their figures are coarse.",
        "Feature worker (on by default, 60 s bars): input lag is wall time minus the latest event time it has "
        "processed, from its once-a-second /health report, so it holds up to a second of report age and, "
        "since event times are the simulator's model clock, the simulator's own lag; the drain is from the "
        "pause until its trade + diff count reaches what the simulator sent. It does not decide a level's "
        "verdict (see `python -m benchmarks feature_worker` for the firehose).",
        f"Levels are nominal: --rate = (level - {DEPTH_MSGS_PER_SYMBOL} x symbols) / 2 taker orders/s per "
        "market; an order that walks several price levels emits several aggTrades, so the offered rate "
        f"(measured) comes out a little higher. {n_symbols} symbols per market; panic regimes off "
        "(`--panic-every 1000000`) so the rate is steady.",
    ]
    slow = [f"shards={r['shards']} @ {r['target']:,.0f}" for rs in by_shards.values() for r in rs
            if r.get("slow_consumer_closed")]
    if slow:
        notes.append("The simulator closed slow consumers in: " + ", ".join(slow))
    bad_exit = [f"shards={r['shards']} @ {r['target']:,.0f}: ingestor {r.get('ingestor_exit_code')}, "
                f"simulator {r.get('sim_exit_code')}" for rs in by_shards.values() for r in rs
                if r.get("ingestor_exit_code") not in (0, None) or r.get("sim_exit_code") != 0]
    if bad_exit:
        notes.append("Non-zero exit codes after SIGTERM: " + "; ".join(bad_exit))
    return {"suite": "pipeline", "title": "end to end: simulator -> ingestor run -> PostgreSQL",
            "params": params, "metrics": metrics, "notes": notes,
            "details": {"reference_level": ref, "tape": tape_info, "copy_ceiling": ceiling["result"],
                        "levels": {str(k): rs for k, rs in by_shards.items()}}}
