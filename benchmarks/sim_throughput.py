"""Simulator throughput: what ``ingestor simulate`` pushes to a client that only counts.

The requirement (issue 2): one simulator process pushes at least 200,000 small
messages/s to a client that only counts them, on loopback; ``--workers K`` spreads
connections over K processes.

Measured here:

(a) push rate, ``--workers 1``: ``ingestor simulate --markets spot`` runs as a real
    subprocess; a separate client process (multiprocessing spawn, uvloop + picows)
    opens C connections, each subscribed to every ``<symbol>@aggTrade`` stream of the
    market (raw ``/ws/a/b/...`` path, so frames carry no combined-stream envelope), and
    only counts text frames. After a warm-up it counts over a fixed window.
    *Push rate* = frames delivered to the client per second (all C connections).
    The simulator generates each trade once and fans it out to every subscribed
    connection, so the *unique* rate (distinct messages generated per second, from
    the admin ``/stats`` ``sent`` counters, which count per stream) is reported next
    to it; push = C x unique when the client keeps up.
(b) the same with ``--workers 2``. Each worker runs the same seeded model (the
    message sequence is identical), so generation is repeated in every process and
    only the fan-out and the writes are spread. Admin ``/stats`` covers the first
    process only.
(c) model generation ceiling: ``MarketModel`` stepped in-process with a no-op
    ``emit``, messages generated per CPU second, spot and futures, with every stream
    wanted (aggTrade, every diff-depth speed, mark prices, liquidations) and, for the
    configuration of (a), aggTrade only.
(d) push rate / 200,000.

Also recorded: the frame payload size distribution (so "small messages" is
documented), CPU use of the simulator processes and of the client during the window
(who is saturated), the simulator's model lag (whether it kept up with wall time),
and slow-consumer disconnects.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import sys
import time
import urllib.request
from typing import Any

import orjson

from benchmarks.procs import Service, cpu_seconds, process_tree
from benchmarks.report import median, metric

TARGET = 200_000
# Calm-regime taker orders/s. High enough that 4 connections need > 200,000 frames/s,
# low enough that one simulator process keeps up with wall time on the reference host
# (2 shared cores: about 0.8 of a core). With seed 1 and 10 spot symbols the model
# stays in the calm regime for at least the first 90 s (checked), so the panic regime
# (x4 orders) does not hit the measurement; every run records the regime anyway.
DEFAULT_RATE = 60_000.0
SEED = 1
FLAT_OUT = 10_000_000.0  # a tape rate no simulator reaches: it plays as fast as it can


# ---- the simulator subprocess -------------------------------------------------------


class SimProcess(Service):
    """``ingestor simulate`` as a child process; stderr goes to a temporary file."""

    def __init__(self, n_symbols: int, rate: float, workers: int, seed: int = 1) -> None:
        super().__init__("simulator", [
            sys.executable, "-m", "ingestor.cli", "--log-level", "WARNING", "simulate", "--markets", "spot",
            "--n-symbols", str(n_symbols), "--rate", str(rate), "--workers", str(workers), "--seed", str(seed)],
            read_stdout=True)
        self.urls: dict[str, str] = {}

    def start_and_read_urls(self, timeout: float = 30.0) -> dict[str, str]:
        self.start()
        try:
            self.urls = orjson.loads(self.first_line(timeout))
        except RuntimeError:
            self.stop(5)
            raise
        return self.urls


# ---- the counting client (runs in its own process) ----------------------------------


def _client_entry(urls: list[str], warmup: float, window: float, stats_url: str, sim_pid: int,
                  sample_cap: int, conn: Any) -> None:
    try:
        import uvloop

        result = uvloop.run(_client(urls, warmup, window, stats_url, sim_pid, sample_cap))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        result = {"error": f"{type(exc).__name__}: {exc}"}
    conn.send(result)
    conn.close()


async def _client(urls: list[str], warmup: float, window: float, stats_url: str, sim_pid: int,
                  sample_cap: int) -> dict[str, Any]:
    import aiohttp
    from picows import WSListener, WSMsgType, ws_connect

    text = WSMsgType.TEXT

    class Counter(WSListener):  # type: ignore[misc]
        """Counts text frames and their payload bytes; keeps sizes while sampling."""

        def __init__(self) -> None:
            super().__init__()
            self.n = 0
            self.nbytes = 0
            self.sizes: list[int] | None = []
            self.disconnected = False

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            if frame.msg_type is text:
                size = frame.payload_size
                self.n += 1
                self.nbytes += size
                sizes = self.sizes
                if sizes is not None and len(sizes) < sample_cap:
                    sizes.append(size)

        def on_ws_disconnected(self, transport: Any) -> None:
            self.disconnected = True

    pairs = [await ws_connect(Counter, url, enable_auto_pong=True, read_buffer_init_size=1 << 20,
                             websocket_handshake_timeout=20)
             for url in urls]
    listeners: list[Counter] = [lst for _, lst in pairs]  # type: ignore[misc]
    await asyncio.sleep(warmup)
    sizes = sorted(s for lst in listeners for s in (lst.sizes or []))
    for lst in listeners:
        lst.sizes = None
    pids = process_tree(sim_pid)

    async with aiohttp.ClientSession() as http:
        async def stats() -> dict[str, Any]:
            async with http.get(stats_url + "/stats") as resp:
                return orjson.loads(await resp.read())  # type: ignore[no-any-return]

        st0 = await stats()
        sim0 = cpu_seconds(pids)
        cpu0 = time.process_time()
        n0 = [lst.n for lst in listeners]
        b0 = sum(lst.nbytes for lst in listeners)
        t0 = time.perf_counter()
        await asyncio.sleep(window)
        n1 = [lst.n for lst in listeners]
        b1 = sum(lst.nbytes for lst in listeners)
        t1 = time.perf_counter()
        cpu1 = time.process_time()
        sim1 = cpu_seconds(pids)
        st1 = await stats()

    for transport, _ in pairs:
        transport.disconnect()
    elapsed = t1 - t0
    frames = sum(n1) - sum(n0)

    def unique(st: dict[str, Any]) -> int:
        streams = st["markets"]["spot"]["streams"]
        return sum(v["sent"] for k, v in streams.items() if k.endswith("@aggTrade"))

    sim_cpu = {pid: sim1[pid] - sim0[pid] for pid in sim1 if pid in sim0}
    on_admin = st1["markets"]["spot"]["ws"]["connections"]
    # `sent` only grows in a process that has subscribers; with --workers the admin
    # process may hold none of the connections, and then it says nothing.
    n_unique = unique(st1) - unique(st0) if on_admin else None
    return {
        "elapsed_s": elapsed,
        "frames": frames,
        "push_rate": frames / elapsed,
        "per_connection": [(b - a) / elapsed for a, b in zip(n0, n1, strict=True)],
        "bytes_per_s": (b1 - b0) / elapsed,
        "mean_payload_bytes": (b1 - b0) / frames if frames else None,
        "unique": n_unique,
        "unique_rate": n_unique / elapsed if n_unique is not None else None,
        "model_lag_ms": [st0.get("model_lag_ms"), st1.get("model_lag_ms")],
        "regime": [st0["markets"]["spot"]["regime"], st1["markets"]["spot"]["regime"]],
        "conns_on_admin_process": on_admin,
        "slow_consumer_closed": st1["markets"]["spot"]["ws"]["slow_consumer_closed_total"],
        "client_disconnects": sum(lst.disconnected for lst in listeners),
        "client_cpu": (cpu1 - cpu0) / elapsed,
        "sim_cpu_by_pid": {str(pid): c / elapsed for pid, c in sim_cpu.items()},
        "sim_cpu_total": sum(sim_cpu.values()) / elapsed,
        "size_sample": _size_summary(sizes),
    }


def _size_summary(sizes: list[int]) -> dict[str, Any]:
    if not sizes:
        return {"n": 0}

    def q(p: float) -> int:
        return sizes[min(len(sizes) - 1, int(p * len(sizes)))]

    return {"n": len(sizes), "mean": sum(sizes) / len(sizes), "min": sizes[0], "p50": q(0.5),
            "p90": q(0.9), "p99": q(0.99), "max": sizes[-1]}


def run_client(urls: list[str], warmup: float, window: float, stats_url: str, sim_pid: int,
               sample_cap: int = 20_000) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_client_entry, daemon=True,
                       args=(urls, warmup, window, stats_url, sim_pid, sample_cap, child))
    proc.start()
    child.close()
    try:
        if not parent.poll(warmup + window + 60):
            raise RuntimeError("client process gave no result")
        result: dict[str, Any] = parent.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if "error" in result:
        raise RuntimeError(f"client failed: {result['error']}")
    return result


# ---- (a), (b): push rate --------------------------------------------------------------


def push_rate(workers: int, rate: float, n_symbols: int, connections: int, runs: int, warmup: float,
              window: float, settle: float) -> dict[str, Any]:
    """One simulator, ``runs`` client processes in turn; raw per-run results."""
    from ingestor.sim.universe import build_universe

    streams = "/".join(f"{s.symbol.lower()}@aggTrade" for s in build_universe(None, n_symbols))
    sim = SimProcess(n_symbols, rate, workers, SEED)
    urls = sim.start_and_read_urls()
    results: list[dict[str, Any]] = []
    error = None
    try:
        time.sleep(settle)  # let --workers children bind their SO_REUSEPORT sockets
        url = f"{urls['spot_ws']}/ws/{streams}"
        for _ in range(runs):
            results.append(run_client([url] * connections, warmup, window, urls["admin"], sim.pid))
    except Exception as exc:  # noqa: BLE001 - the report says what failed
        error = f"{type(exc).__name__}: {exc}"
    finally:
        rc = sim.stop(30.0)
    return {"workers": workers, "rate": rate, "runs": results, "sim_exit_code": rc,
            "sim_stderr_tail": sim.stderr_tail(), "error": error, "command": " ".join(sim.cmd)}


# ---- (e): a tape played flat out -------------------------------------------------------


def tape_push(n_symbols: int, runs: int, warmup: float, window: float) -> dict[str, Any]:
    """The pipeline suite's tape (both markets) played as fast as the simulator can, to one
    client subscribed the way one ``ingestor run`` shard subscribes: every stream once, on
    combined-stream connections (envelopes included), so push = distinct messages."""
    from benchmarks import pipeline
    from ingestor.sim.universe import build_universe

    plan = pipeline.quick_tape()
    pipeline.record_tape(plan, n_symbols)
    low = [s.symbol.lower() for s in build_universe(None, n_symbols)]
    sim = Service("simulator", pipeline.simulator_cmd(FLAT_OUT, n_symbols, plan), read_stdout=True)
    sim.start()
    results: list[dict[str, Any]] = []
    error = None
    try:
        urls = orjson.loads(sim.first_line(120.0))
        spot = "/".join(f"{s}@aggTrade/{s}@depth@100ms" for s in low)
        depth = "/".join(f"{s}@depth@500ms" for s in low)
        market = "/".join([f"{s}@aggTrade" for s in low] + ["!markPrice@arr@1s", "!forceOrder@arr"])
        conns = [f"{urls['spot_ws']}/stream?streams={spot}", f"{urls['futures_ws']}/public/stream?streams={depth}",
                 f"{urls['futures_ws']}/market/stream?streams={market}"]
        results.append(run_client(conns, warmup, window, urls["admin"], sim.pid))
        with urllib.request.urlopen(urls["admin"] + "/stats", timeout=10) as resp:
            tapes = {m: v["tape"] for m, v in orjson.loads(resp.read())["markets"].items()}
        results[-1]["tape"] = tapes
    except Exception as exc:  # noqa: BLE001 - the report says what failed
        error = f"{type(exc).__name__}: {exc}"
    finally:
        rc = sim.stop(30.0)
    return {"runs": results, "sim_exit_code": rc, "error": error, "command": " ".join(sim.cmd),
            "sim_stderr_tail": sim.stderr_tail() if error else ""}


# ---- (c): model generation ceiling ----------------------------------------------------


def model_ceiling(market: str, wanted: str, rate: float, n_symbols: int, model_s: float,
                  repeats: int) -> dict[str, Any]:
    """Messages generated per CPU second by ``MarketModel`` with a no-op emit."""
    from ingestor.sim.model import MarketModel, ModelParams
    from ingestor.sim.universe import build_universe

    universe = build_universe(None, n_symbols)
    per_cpu_s: list[float] = []
    realtime: list[float] = []
    counts: list[int] = []
    for _ in range(repeats):
        model = MarketModel(market, universe, 1, ModelParams(rate=rate),  # type: ignore[arg-type]
                            1_700_000_000_000)
        n = 0

        def emit(name: str, payload: bytes, seq: int) -> None:
            nonlocal n
            n += 1

        model.emit = emit
        model.wants = (lambda name: True) if wanted == "all" else (lambda name: name.endswith("@aggTrade"))
        c0 = time.process_time()
        model.advance_to(model.t + int(model_s * 1000))
        cpu = time.process_time() - c0
        per_cpu_s.append(n / cpu)
        realtime.append(model_s / cpu)
        counts.append(n)
    return {"market": market, "wanted": wanted, "msgs_per_cpu_s": per_cpu_s,
            "model_s_per_cpu_s": realtime, "messages": counts}


# ---- the suite --------------------------------------------------------------------------


def run(quick: bool, rate: float | None = None, connections: int | None = None,
        runs: int | None = None, window: float | None = None, n_symbols: int = 10) -> dict[str, Any]:
    rate = rate if rate is not None else DEFAULT_RATE
    connections = connections or 4
    runs = runs or (2 if quick else 5)
    window = window or (3.0 if quick else 10.0)
    warmup = 1.5 if quick else 3.0
    params = {"market": "spot", "n_symbols": n_symbols, "rate": rate, "connections": connections,
              "runs": runs, "warmup_s": warmup, "window_s": window, "target": TARGET}
    metrics: list[dict[str, Any]] = []
    notes: list[str] = []
    details: dict[str, Any] = {}

    pushes: dict[int, dict[str, Any]] = {}
    worker_counts = (1,) if quick else (1, 2)  # --workers 2 adds nothing on 2 cores: the full run shows it
    for workers in worker_counts:
        res = push_rate(workers, rate, n_symbols, connections, runs, warmup, window,
                        settle=0.5 if workers == 1 else 2.0)
        pushes[workers] = res
        details[f"push_workers{workers}"] = res
        rs = res["runs"]
        label = f"workers={workers}"
        metrics += [
            metric(f"(a/b) push rate, {label}", [r["push_rate"] for r in rs], "msg/s",
                   f"text frames received by the counting client over {connections} connections"),
            metric(f"(a/b) unique rate, {label}", [r["unique_rate"] for r in rs], "msg/s",
                   "distinct aggTrades generated (admin /stats `sent`, first process)"),
            metric(f"(a/b) delivered / (C x unique), {label}",
                   [r["push_rate"] / (connections * r["unique_rate"]) if r["unique_rate"] else None
                    for r in rs], "ratio", "1.0 = the client received everything generated"),
            metric(f"(a/b) simulator CPU, {label}", [r["sim_cpu_total"] for r in rs], "cores",
                   "all simulator processes, during the window"),
            metric(f"(a/b) client CPU, {label}", [r["client_cpu"] for r in rs], "cores",
                   "the counting client process"),
            metric(f"(a/b) model lag at window end, {label}", [r["model_lag_ms"][1] for r in rs], "ms",
                   "model time behind wall time; growing = the simulator cannot keep up"),
            metric(f"(a/b) payload bytes/s, {label}", [r["bytes_per_s"] for r in rs], "B/s",
                   "WebSocket payload only (headers add 2 bytes per frame)"),
        ]
        if workers > 1:
            metrics.append(metric(f"(b) connections on the first process, {label}",
                                  [r["conns_on_admin_process"] for r in rs], "conns",
                                  f"of {connections}; SO_REUSEPORT hashes each connection"))
        bad = [r for r in rs if r["slow_consumer_closed"] or r["client_disconnects"]]
        if bad:
            notes.append(f"{label}: {len(bad)} run(s) saw disconnects (slow consumer or other).")
        panics = [r for r in rs if "panic" in r["regime"]]
        if panics:
            notes.append(f"{label}: {len(panics)} run(s) overlapped the panic regime (x4 orders).")
        if res["error"]:
            notes.append(f"{label}: error: {res['error']} (a 'handshake timeout' means the simulator's "
                         "event loop was blocked: its model fell behind wall time, see README)")
        metrics.append(metric(f"(a/b) simulator exit code after SIGTERM, {label}", res["sim_exit_code"],
                              "", "0 expected"))

    # Frame sizes, from the warm-up samples of every run.
    sample_means = [r["size_sample"]["mean"] for p in pushes.values() for r in p["runs"]
                    if r["size_sample"].get("n")]
    first = next((r["size_sample"] for p in pushes.values() for r in p["runs"]
                  if r["size_sample"].get("n")), None)
    metrics.append(metric("frame payload size, mean", sample_means, "bytes",
                          "spot aggTrade, raw stream (no envelope); sampled during warm-up"))
    if first:
        metrics.append(metric("frame payload size, min/p50/p99/max (first run)",
                              f"{first['min']}/{first['p50']}/{first['p99']}/{first['max']}", "bytes",
                              f"n={first['n']} frames; +2 bytes WebSocket header each"))

    # (c) model ceiling.
    model_s = 1.0 if quick else 3.0
    reps = 3
    cases = [("spot", "all"), ("futures", "all"), ("spot", "aggTrade")]
    for market, wanted in cases:
        res = model_ceiling(market, wanted, rate, n_symbols, model_s, reps)
        details[f"model_{market}_{wanted}"] = res
        metrics.append(metric(f"(c) model generation, {market}, wanted={wanted}", res["msgs_per_cpu_s"],
                              "msg/CPU-s", f"no-op emit, --rate {rate:g}, {model_s:g} model-s per run"))

    # (e) the tape, flat out: what the simulator can offer the pipeline suite.
    res = tape_push(20, 1, 0.5, 2.0 if quick else 3.0)
    details["tape_push"] = res
    rs = res["runs"]
    out_early = any(t.get("finished") for r in rs for t in r.get("tape", {}).values())
    metrics += [
        metric("(e) tape push rate, flat out", [r["push_rate"] for r in rs], "msg/s",
               "both markets, 20 symbols each, every stream once over 3 combined-stream connections (one "
               "ingestor shard's), so every frame is a distinct message" +
               ("; the tape ran out inside the window: a lower bound" if out_early else "")),
        metric("(e) tape payload bytes/s", [r["bytes_per_s"] for r in rs], "B/s", "envelopes included"),
        metric("(e) simulator CPU, tape", [r["sim_cpu_total"] for r in rs], "cores", "1.0 = its one core saturated"),
        metric("(e) client CPU, tape", [r["client_cpu"] for r in rs], "cores", "the counting client"),
    ]
    if res["error"]:
        notes.append(f"(e) error: {res['error']}")

    # (d) against the target.
    for workers in worker_counts:
        rs = pushes[workers]["runs"]
        if rs:
            metrics.append(metric(f"(d) push rate / {TARGET:,}, workers={workers}",
                                  [r["push_rate"] / TARGET for r in rs], "ratio", ">= 1 meets the target"))
    w1 = median([r["push_rate"] for r in pushes[1]["runs"]]) if pushes[1]["runs"] else float("nan")
    u1 = median([r["unique_rate"] for r in pushes[1]["runs"] if r["unique_rate"] is not None])
    notes += [
        f"Push rate counts every frame the client received over {connections} connections that "
        f"subscribe to the same {n_symbols} aggTrade streams, so each generated trade is delivered "
        f"{connections} times. With workers=1: {w1:,.0f} frames/s pushed = {u1:,.0f} distinct "
        f"messages/s generated x {connections}.",
        "With --workers 2 every process runs the whole model (same seed, same sequence): "
        "generation is repeated, only fan-out and writes are split; on a 2-core host the two "
        "workers and the client share 2 cores.",
        "--rate is calm-regime taker orders/s per market; the panic regime multiplies it "
        "(x4), and an order that walks several levels emits several aggTrades.",
    ]
    return {"suite": "sim", "title": "simulator push throughput (issue 2: >= 200,000 msg/s)",
            "params": params, "metrics": metrics, "notes": notes, "details": details}
