"""Feature worker: does it keep up with the simulator's full firehose?

Issue 4 asks that the benchmarks show the feature worker keeps up with the simulator's
full firehose. Measured here:

(a) The feature worker's per-item work on the firehose. The live simulator of (b) is
    ``ingestor simulate --seed 1 --panic-every 1000000`` at the pipeline suite's top level
    (``--rate`` 29,880 taker orders/s a market, both markets, 20 symbols: about 65,000
    msg/s, where one simulator process tops out on the reference host). Its model is
    stepped here in-process with the same seed and parameters, so the messages are the
    ones it sends, for the streams the ingestor subscribes by default (aggTrade, Spot
    ``@depth@100ms``, USD-M ``@depth@500ms``, ``!forceOrder@arr``). The stepping is timed
    too: the simulator's generation rate (messages per CPU second, as the ``sim`` suite's
    (c) measures it) on exactly these messages.
    The payloads are packed as the socket worker packs them: every 50 ms flush
    (``FLUSH_PERIOD_S``) one ``Feed`` per market and kind, ``data = b"[" +
    b",".join(payloads) + b"]"``; REST snapshots as ``Snapshot`` where they were taken;
    after every flush a clock tick per market. The timed work is what
    ``FeatureWorker.handle`` and the engine part of its ``tick`` do: one ``orjson.loads``
    per batch, the engine call, ``clock`` and draining the outbox; one thread, CPU
    seconds (``process_time``), a fresh engine per pass, medians over the runs. Passes:
    all kinds (the headline); trades only (µs per aggTrade); depth only, snapshots and
    ticks included (µs per depthUpdate); all kinds with 1 s bars (a few seconds of model
    time close no 60 s bar: this pass puts the bar path in); the batches'
    ``orjson.loads`` alone (the parse share).
    **Headline: engine msg/CPU-s / simulator msg/CPU-s**, >= 1 = one feature worker keeps
    up with one simulator process running flat out.
(a2) The same passes on ``ingestor.sim.offline.generate`` at its defaults (300 taker
    orders/s a market, panics about every 20 s and cascades every 4 s): a low-rate mix in
    which diffs are a large share of the messages, and small.
(b) The live feature worker at the firehose: ``benchmarks.pipeline.run_level`` (the
    pipeline suite's machinery: simulator, ``ingestor run``, PostgreSQL as subprocesses)
    at its top level with 1 shard and 1 s bars (so bars are emitted in the window): the
    worker's input lag and queue at the window's end, its drain after the simulator's
    pause, bars, CPU per million messages. Keeps up = input lag beyond the simulator's
    own under ``LAG_OK_S`` at the window's end, and every trade and diff processed with
    the queue empty after the pause.
(c) The real USD-M BTCUSDT ``@depth@0ms`` capture through the engine's depth path
    (µs per real diff), when ``../shared/realdata`` is present.
"""

from __future__ import annotations

import asyncio
import cProfile
import dataclasses
import gc
import pstats
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson

from benchmarks import pipeline
from benchmarks.book import REAL_FILE, REALDATA
from benchmarks.report import median, metric
from ingestor.binance.streams import Market
from ingestor.config import Settings
from ingestor.feature_spec import FeatureSettings
from ingestor.features.engine import FeatureEngine
from ingestor.sim.offline import START_MS, Item, generate
from ingestor.wire.child import tune_gc
from ingestor.wire.feed import FEED_KINDS, Feed, Snapshot
from ingestor.workers.socket_worker import FLUSH_PERIOD_S

MARKETS: tuple[Market, ...] = ("spot", "futures")
DEPTH_SUFFIX = {"spot": "@depth@100ms", "futures": "@depth@500ms"}  # the ingestor's default speeds
N_SYMBOLS = pipeline.N_SYMBOLS
FIREHOSE = pipeline.LIVE_MODEL_TOP  # nominal msg/s where the live model tops out
SEED = pipeline.SEED
NO_PANIC_S = 1_000_000.0  # the pipeline's `--panic-every`: a steady offered rate
FLUSH_MS = int(FLUSH_PERIOD_S * 1000)
LAG_OK_S = 2.0
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Settings)}
SNAPSHOT_LIMIT = int(_DEFAULTS["snapshot_limit"])
# generate()'s default. The REST worker takes one every `snapshot_interval_s` (300 s) and
# whenever the engine asks (a book that could not sync from the first); offline, nothing
# answers a request, so the periodic snapshots stand in for the answers, within 10 s.
SNAPSHOT_EVERY_MS = 10_000
REAL_TICK = 0.1  # USD-M BTCUSDT PRICE_FILTER tickSize
WARM_MS = 1000  # model time fed untimed before the steady-state depth figure
Ticks = dict[tuple[Market, str], float]


@dataclass(frozen=True, slots=True)
class Tick:
    """The worker's clock tick after a turn: exchange time of ``market`` has reached ``ms``."""

    market: Market
    ms: int


WorkItem = Feed | Snapshot | Tick


@dataclass
class Workload:
    name: str
    ticks: Ticks
    start_ms: int  # the first event time: bars start at the boundary at or before it
    passes: dict[str, list[WorkItem]]  # all | trades | depth
    counts: dict[str, int]  # messages per kind, both markets
    levels_per_diff: float
    batch_sizes: dict[str, float]  # mean messages per Feed, per kind
    trades_per_s: list[int]  # aggTrades per model second (a panic shows as a x4 jump)
    # The depth pass's first WARM_MS (books built from their first snapshots): items, diffs.
    depth_warm: tuple[int, int] = (0, 0)


# ---- the message sets --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Msg:
    kind: str  # aggTrade | depthUpdate | forceOrder | snapshot
    time_ms: int  # model time it was generated at (a snapshot: the time it is stored under)
    symbol: str  # snapshots only
    data: bytes  # the payload bytes the simulator sends, which the ingestor stores


def firehose(market: Market, seconds: float, rate: float, n_symbols: int) -> tuple[Ticks, list[Msg], list[int],
                                                                                   list[float]]:
    """``ingestor simulate --seed 1 --panic-every 1000000 --rate R`` stepped in-process: the
    model, seed and parameters of the live simulator in (b), so the same message sequence.
    Also the simulator's generation rate on exactly these messages: messages and CPU seconds
    of ``advance_to`` per model second (REST snapshots are taken outside the timing)."""
    from ingestor.sim.model import STEP_MS, MarketModel, ModelParams
    from ingestor.sim.universe import build_universe

    specs = build_universe(None, n_symbols)
    model = MarketModel(market, specs, seed=SEED, params=ModelParams(rate=rate, panic_every_s=NO_PANIC_S),
                        start_ms=START_MS)
    kinds = {"!forceOrder@arr": "forceOrder"}
    for spec in specs:
        kinds[spec.lower + "@aggTrade"] = "aggTrade"
        kinds[spec.lower + DEPTH_SUFFIX[market]] = "depthUpdate"
    raw: list[tuple[str, int, bytes]] = []
    model.wants = kinds.__contains__
    model.emit = lambda name, payload, seq: raw.append((name, model.t, payload))
    counts: list[int] = []
    cpu: list[float] = []
    t0 = model.t
    for k, until in enumerate([t0 + STEP_MS, *range(t0 + 1000, t0 + int(seconds * 1000) + 1, 1000)]):
        n, c0 = len(raw), time.process_time()
        model.advance_to(until)
        cpu.append(time.process_time() - c0)
        counts.append(len(raw) - n)
        if k == 0 or (until - t0) % SNAPSHOT_EVERY_MS == 0:  # as offline.generate: first step, then periodic
            raw += [(f"snapshot {sp.symbol}", model.t, model.depth_snapshot(sp.symbol, SNAPSHOT_LIMIT))
                    for sp in specs]
    msgs = [Msg("snapshot", t, name.split(" ", 1)[1], data) if name.startswith("snapshot ")
            else Msg(kinds[name], t, "", data) for name, t, data in raw]
    # The first step (10 ms) is folded into the first second.
    counts[1] += counts[0]
    cpu[1] += cpu[0]
    return {(market, sp.symbol): 10.0**-sp.price_dp for sp in specs}, msgs, counts[1:], cpu[1:]


def from_generate(items: list[Item]) -> list[Msg]:
    """``offline.generate``'s parsed items back to bytes (orjson writes what the model wrote)."""
    return [Msg(it.kind, it.time_ms, it.symbol, orjson.dumps(it.payload)) for it in items]


def pack(msgs: dict[Market, list[Msg]], kinds: set[str]) -> list[WorkItem]:
    """What the socket worker's flushes and the REST worker put on the feature queue, in
    order: per ``FLUSH_MS`` of exchange time, each market's feeds (``MarketFeed.flush``
    order), then the snapshots taken in it, then a clock tick per market."""
    windows: dict[int, dict[Market, list[Msg]]] = defaultdict(lambda: {m: [] for m in msgs})
    for market, ms in msgs.items():
        for m in ms:
            windows[(m.time_ms - START_MS) // FLUSH_MS][market].append(m)
    out: list[WorkItem] = []
    for w in sorted(windows):
        for market, ms in windows[w].items():
            for kind in FEED_KINDS:
                if kind in kinds:
                    parts = [m.data for m in ms if m.kind == kind]
                    if parts:
                        out.append(Feed(market, kind, len(parts), b"[" + b",".join(parts) + b"]"))
            if "snapshot" in kinds:
                out += [Snapshot(market, m.symbol, m.time_ms, m.data) for m in ms if m.kind == "snapshot"]
        out += [Tick(market, START_MS + (w + 1) * FLUSH_MS) for market in msgs]
    return out


def workload(name: str, ticks: Ticks, msgs: dict[Market, list[Msg]]) -> Workload:
    every = [m for ms in msgs.values() for m in ms]
    counts = {k: sum(1 for m in every if m.kind == k) for k in (*FEED_KINDS, "snapshot")}
    levels = [len(d["b"]) + len(d["a"]) for d in (orjson.loads(m.data) for m in every if m.kind == "depthUpdate")]
    per_s: dict[int, int] = defaultdict(int)
    for m in every:
        if m.kind == "aggTrade":
            per_s[(m.time_ms - START_MS) // 1000] += 1
    passes = {"all": pack(msgs, {*FEED_KINDS, "snapshot"}), "trades": pack(msgs, {"aggTrade"}),
              "depth": pack(msgs, {"depthUpdate", "snapshot"})}
    feeds = [f for f in passes["all"] if isinstance(f, Feed)]
    sizes = {k: sum(f.count for f in feeds if f.kind == k) / max(1, sum(1 for f in feeds if f.kind == k))
             for k in FEED_KINDS}
    return Workload(name, ticks, min(m.time_ms for m in every), passes, counts, sum(levels) / max(1, len(levels)),
                    sizes, [per_s[k] for k in sorted(per_s)], warm_split(passes["depth"], START_MS + WARM_MS))


def warm_split(items: list[WorkItem], until_ms: int) -> tuple[int, int]:
    """(items up to the first clock tick at ``until_ms``, diffs among them)."""
    for i, item in enumerate(items):
        if isinstance(item, Tick) and item.ms >= until_ms:
            return i + 1, sum(f.count for f in items[:i] if isinstance(f, Feed) and f.kind == "depthUpdate")
    return 0, 0


def firehose_workload(seconds: float, n_symbols: int) -> tuple[Workload, dict[str, Any]]:
    rate = pipeline.sim_rate(FIREHOSE, n_symbols)
    ticks: Ticks = {}
    msgs: dict[Market, list[Msg]] = {}
    gen: dict[str, Any] = {}
    for market in MARKETS:
        t, msgs[market], counts, cpu = firehose(market, seconds, rate, n_symbols)
        ticks.update(t)
        gen[market] = {"msgs": counts, "cpu_s": cpu}
    gen["both_per_s"] = [sum(gen[m]["msgs"][i] for m in MARKETS) / sum(gen[m]["cpu_s"][i] for m in MARKETS)
                         for i in range(len(gen["spot"]["msgs"]))]
    return workload("firehose", ticks, msgs), gen


def low_rate_workload(seconds: float, n_symbols: int) -> Workload:
    ticks: Ticks = {}
    msgs: dict[Market, list[Msg]] = {}
    for market in MARKETS:
        t, items = generate(market, seconds, n_symbols, seed=SEED, snapshot_every_ms=SNAPSHOT_EVERY_MS,
                            depth_suffix=DEPTH_SUFFIX[market])
        ticks.update(t)
        msgs[market] = from_generate(items)
    return workload("low rate", ticks, msgs)


def real_workload() -> Workload | None:
    """The real capture's diffs and its snapshot, packed per 50 ms of receive time."""
    path = REALDATA / REAL_FILE
    if not path.exists():
        return None
    from ingestor.sim.captures import CapturedSnapshot, read_capture, snapshot_events

    out: list[WorkItem] = []
    part: list[bytes] = []
    window, last_e, n, levels = -1, 0, 0, 0

    def flush() -> None:
        if part:
            out.append(Feed("futures", "depthUpdate", len(part), b"[" + b",".join(part) + b"]"))
            part.clear()
            out.append(Tick("futures", last_e))

    for item in snapshot_events(read_capture(path)):
        if item.recv_ns // (FLUSH_MS * 1_000_000) != window:
            flush()
            window = item.recv_ns // (FLUSH_MS * 1_000_000)
        if isinstance(item, CapturedSnapshot):
            flush()
            out.append(Snapshot("futures", item.symbol, item.recv_ns // 1_000_000, item.body))
        elif item.stream and "@depth" in item.stream:
            ev = orjson.loads(item.data)
            last_e = max(last_e, ev["E"])
            levels += len(ev["b"]) + len(ev["a"])
            n += 1
            part.append(item.data)
    flush()
    first_e = min(orjson.loads(f.data)[0]["E"] for f in out if isinstance(f, Feed))
    return Workload(f"real futures BTCUSDT @depth@0ms ({REAL_FILE})", {("futures", "BTCUSDT"): REAL_TICK},
                    first_e, {"depth": out}, {"depthUpdate": n}, levels / max(1, n),
                    {"depthUpdate": n / max(1, sum(1 for f in out if isinstance(f, Feed)))}, [])


# ---- the timed work ----------------------------------------------------------------------


def new_engine(w: Workload, bar_seconds: int) -> FeatureEngine:
    bar_ms = bar_seconds * 1000
    start = w.start_ms - w.start_ms % bar_ms  # every trade lands in a bar (none skipped as "before the first")
    return FeatureEngine(FeatureSettings(bar_seconds=bar_seconds), w.ticks, snapshot_limit=SNAPSHOT_LIMIT,
                         start_ms={m: start for m in MARKETS})


def feed_engine(engine: FeatureEngine, items: list[WorkItem]) -> int:
    """The feature worker's work per queue item (``FeatureWorker.handle``) and per turn
    (the engine part of ``tick``). Returns the events the engine could not use."""
    loads = orjson.loads
    bad = 0
    for item in items:  # a few hundred items a model second: isinstance costs nothing here
        if isinstance(item, Feed):
            events = loads(item.data)
            if item.kind == "aggTrade":
                bad += engine.trades(item.market, events)
            elif item.kind == "depthUpdate":
                bad += engine.depth(item.market, events)
            else:
                bad += engine.force_orders(item.market, events)
        elif isinstance(item, Snapshot):
            engine.snapshot(item.market, item.symbol, item.time_ms, loads(item.body))
        else:
            engine.clock(item.market, item.ms)
            engine.outbox.take()
    return bad


@contextmanager
def worker_gc() -> Iterator[None]:
    """The feature worker's garbage collector settings (``child.tune_gc``: what exists
    is frozen, a larger young generation) for the timed passes; the defaults after."""
    threshold = gc.get_threshold()
    tune_gc()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def timed(w: Workload, name: str, bar_seconds: int = 60, warm: int = 0) -> tuple[float, FeatureEngine]:
    """CPU seconds of one pass, a fresh engine; the first ``warm`` items fed untimed. The
    previous pass's engine (cyclic: its symbols point back at it) is collected first, so
    no pass pays for freeing another's."""
    gc.collect()
    engine = new_engine(w, bar_seconds)
    items = w.passes[name]
    bad = feed_engine(engine, items[:warm])
    c0 = time.process_time()
    bad += feed_engine(engine, items[warm:])
    cpu = time.process_time() - c0
    if bad:
        raise RuntimeError(f"{w.name}, {name}: the engine rejected {bad} generated events")
    return cpu, engine


def parse_only(items: list[WorkItem]) -> float:
    loads = orjson.loads
    c0 = time.process_time()
    for item in items:
        if isinstance(item, Feed):
            loads(item.data)
        elif isinstance(item, Snapshot):
            loads(item.body)
    return time.process_time() - c0


def engine_state(engine: FeatureEngine) -> dict[str, Any]:
    return {m: {"books": engine.book_states(m), "bars": c.bars, "trades": c.trades, "diffs": c.diffs,
                "liquidations": c.liquidations, "snapshots": c.snapshots, "resyncs": dict(c.resyncs),
                "drift_ok": c.drift_ok, "drift_mismatch": c.drift_mismatch}
            for m, c in engine.counters.items() if c.trades or c.diffs}


def bench_sim(w: Workload, runs: int) -> dict[str, Any]:
    """Every pass, ``runs`` times, interleaved so drifts in the host's speed hit all alike."""
    cpu: dict[str, list[float]] = {"all": [], "trades": [], "depth": [], "depth_steady": [], "all_1s": [],
                                   "parse": []}
    state: dict[str, Any] = {}
    for _ in range(runs):
        for name in ("all", "trades", "depth"):
            dt, eng = timed(w, name)
            cpu[name].append(dt)
            state[name] = engine_state(eng)
        cpu["depth_steady"].append(timed(w, "depth", warm=w.depth_warm[0])[0])
        dt, eng = timed(w, "all", bar_seconds=1)
        cpu["all_1s"].append(dt)
        state["all_1s"] = engine_state(eng)
        cpu["parse"].append(parse_only(w.passes["all"]))
    return {"cpu": cpu, "state": state}


def profile_top(w: Workload, n: int = 8) -> list[tuple[str, float]]:
    """(function, share of the pass's time) of the top ``n`` by own time, one all-kinds pass
    under cProfile (which inflates small, often-called functions)."""
    engine = new_engine(w, 60)
    prof = cProfile.Profile()
    prof.runcall(feed_engine, engine, w.passes["all"])
    stats = pstats.Stats(prof)
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]  # type: ignore[attr-defined]
    out = []
    for (path, line, func), (_cc, _nc, tt, _ct, _callers) in rows:
        short = path.split("/ingestor/", 1)[-1] if "/ingestor/" in path else path.rsplit("/", 1)[-1]
        out.append((f"{func} ({short}:{line})" if line else func, tt / total))
    return out


# ---- (b) the live worker -------------------------------------------------------------------


def live(quick: bool) -> dict[str, Any]:
    warmup, window = (2.0, 8.0) if quick else (3.0, 20.0)
    print(f"[feature_worker] live: shards=1 nominal {FIREHOSE:,} msg/s, 1 s bars ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    r = asyncio.run(pipeline.run_level(1, FIREHOSE, N_SYMBOLS, warmup, window,
                                       ingestor_args=("--feature-params", "bar_seconds=1")))
    r["level_wall_s"] = time.monotonic() - t0
    r["warmup_s"], r["window_nominal_s"] = warmup, window
    print(f"[feature_worker]   {pipeline.verdict(r)} ({r['level_wall_s']:.0f} s)", file=sys.stderr, flush=True)
    return r


def _lag(status: dict[str, Any] | None, market: str) -> float | None:
    return ((status or {}).get("input_lag_s") or {}).get(market)


def _bars(status: dict[str, Any] | None) -> int | None:
    bars = (status or {}).get("bars")
    return sum(v or 0 for v in bars.values()) if bars else None


def live_rows(r: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str], bool | None]:
    if r.get("skipped"):
        return [], [f"(b) live: {r['skipped']}"], None
    if r.get("error"):
        return [], [f"(b) live run failed: {r['error']}"], None
    end, after = r.get("features_end"), r.get("features_after")
    own = pipeline.feature_own_lag(r)
    drained = r.get("features_drain_s") is not None and (after or {}).get("queue_depth") == 0
    kept_up = own is not None and own < LAG_OK_S and drained
    start = r.get("features_start")
    bars0, bars1 = _bars(start), _bars(end)
    late = sum(v or 0 for v in ((after or {}).get("late") or {}).values())
    rows = [
        metric("(b) live: offered, all streams", r["all_messages"] / r["window_s"], "msg/s",
               f"aggTrade + diff depth {r['offered_per_s']:,.0f}/s; nominal level {FIREHOSE:,}, 1 shard"),
        metric("(b) live: simulator model lag at window end", r["model_lag_ms"][1], "ms",
               "model clock behind wall time: > 500 = the simulator ran flat out and fell behind"),
        metric("(b) live: feature input lag at window end, spot", _lag(end, "spot"), "s",
               "wall minus the latest event time processed (/health, reported once a second)"),
        metric("(b) live: feature input lag at window end, futures", _lag(end, "futures"), "s",
               "event times are the simulator's model clock: this includes its model lag"),
        metric("(b) live: feature lag beyond the simulator's", own, "s",
               f"larger market's input lag minus the simulator's model lag; target < {LAG_OK_S:g} s"),
        metric("(b) live: feature queue at window end", (end or {}).get("queue_depth"), "items",
               "Feed batches + snapshots waiting"),
        metric("(b) live: trades + diffs processed by the feature worker", r.get("features_per_s"), "msg/s",
               f"over the window (its 1 s reports at both ends); offered {r['offered_per_s']:,.0f}/s"),
        metric("(b) live: feature drain after pause", r.get("features_drain_s"), "s",
               f"until it processed all {r.get('sent', 0):,} trades + diffs sent; queue then "
               f"{(after or {}).get('queue_depth')}"),
        metric("(b) live: bars emitted in the window", None if bars0 is None or bars1 is None else bars1 - bars0,
               "bars", f"1 s bars, {N_SYMBOLS * 2} symbols; {_bars(after)} by the end of the drain; closed bars "
               f"waiting for their book at the window's end: {(end or {}).get('waiting_bars')}"),
        metric("(b) live: late trades and liquidations", late, "msgs",
               "came after their bar had closed (not counted in it), whole run"),
        metric("(b) live: CPU per 1M msgs, features", pipeline.cpu_per_million(r, "features"), "CPU-s",
               f"{r['cpu_cores_by_kind'].get('features', 0):.2f} cores; per million messages the simulator sent"),
        metric("(b) live: CPU per 1M msgs, simulator", pipeline.cpu_per_million(r, "simulator"), "CPU-s",
               f"{r['cpu_cores_by_kind'].get('simulator', 0):.2f} cores"),
        metric("(b) live: CPU busy, all processes", sum(r["cpu_cores_by_kind"].values()), "cores",
               "ingestor + postgres backends + simulator, on a host of 2"),
        metric("(b) live: peak RSS, features", (r.get("peak_rss_mb") or {}).get("features"), "MB", "VmHWM"),
    ]
    books0 = {m: {k: v for k, v in b.items() if v} for m, b in ((start or {}).get("books") or {}).items()}
    notes = [f"(b) books at the window's start (after {r.get('connect_s', 0):.1f} s to connect and "
             f"{r['warmup_s']:g} s of warm-up): {books0}; at its end all synced: "
             f"{all(b.get('synced') == N_SYMBOLS for b in ((end or {}).get('books') or {}).values())}",
             f"(b) live level: {pipeline.verdict(r)}; storage verdict (zero loss, drain <= "
             f"{pipeline.DRAIN_OK_S:g} s) is the pipeline suite's; CPU cores by kind: "
             + ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["cpu_cores_by_kind"].items()))]
    return rows, notes, kept_up


# ---- the suite ---------------------------------------------------------------------------


def _per(cpu: list[float], n: int) -> list[float]:
    return [c / n * 1e6 for c in cpu]


def _rates(msgs: list[int], cpu: list[float], k: int) -> list[float]:
    """Messages per CPU second over ``k`` consecutive stretches of model seconds."""
    n = len(msgs)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [sum(msgs[a:b]) / sum(cpu[a:b]) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def run(quick: bool) -> dict[str, Any]:
    runs = 3 if quick else 5
    fire_s = 5.0 if quick else 20.0
    low_s = 10.0 if quick else 120.0
    rate = pipeline.sim_rate(FIREHOSE, N_SYMBOLS)
    params = {"n_symbols": N_SYMBOLS, "markets": "spot,futures", "firehose_rate": rate, "firehose_model_s": fire_s,
              "low_rate_model_s": low_s, "runs": runs, "flush_ms": FLUSH_MS,
              "depth": "spot @depth@100ms, futures @depth@500ms"}
    metrics: list[dict[str, Any]] = []
    notes: list[str] = []
    details: dict[str, Any] = {}

    t0 = time.monotonic()
    fire, gen = firehose_workload(fire_s, N_SYMBOLS)
    low = low_rate_workload(low_s, N_SYMBOLS)
    real = real_workload()
    details["prepare_s"] = time.monotonic() - t0
    details["sim_generation"] = gen

    eng_rate: float | None = None
    for w, label in ((fire, "(a) firehose"), (low, "(a2) low-rate mix")):
        with worker_gc():
            res = bench_sim(w, runs)
        cpu, c = res["cpu"], w.counts
        n_all = c["aggTrade"] + c["depthUpdate"] + c["forceOrder"]
        rates = [n_all / x for x in cpu["all"]]
        mix = (f"{n_all:,} msgs over {fire_s if w is fire else low_s:g} model-s: {c['aggTrade']:,} aggTrade, "
               f"{c['depthUpdate']:,} depthUpdate ({w.levels_per_diff:.0f} levels each), {c['forceOrder']:,} "
               f"forceOrder; {c['snapshot']} snapshots")
        metrics += [
            metric(f"{label}: engine, all kinds", rates, "msg/CPU-s", mix),
            metric(f"{label}: µs per aggTrade", _per(cpu["trades"], c["aggTrade"]), "µs",
                   f"trades-only pass; {w.batch_sizes['aggTrade']:,.0f} per Feed"),
            metric(f"{label}: µs per depthUpdate", _per(cpu["depth"], c["depthUpdate"]), "µs",
                   f"depth-only pass, snapshots and ticks included; {w.batch_sizes['depthUpdate']:,.1f} per Feed"),
            metric(f"{label}: µs per depthUpdate, books synced", _per(cpu["depth_steady"], c["depthUpdate"] -
                                                                      w.depth_warm[1]), "µs",
                   f"the same after the first {WARM_MS / 1000:g} model-s (first snapshots, book builds) fed "
                   "untimed"),
            metric(f"{label}: orjson.loads share", [p / a for p, a in zip(cpu["parse"], cpu["all"], strict=True)],
                   "ratio", "the batches' parse alone / the all-kinds pass"),
        ]
        bars_1s = sum(v["bars"] for v in res["state"]["all_1s"].values())
        metrics.append(metric(f"{label}: engine, all kinds, 1 s bars", [n_all / x for x in cpu["all_1s"]],
                              "msg/CPU-s", f"{bars_1s:,} symbol-bars closed (60 s bars: "
                              f"{sum(v['bars'] for v in res['state']['all'].values()):,})"))
        if w is fire:
            eng_rate = median(rates)
        details[w.name] = {"counts": c, "levels_per_diff": w.levels_per_diff, "batch_sizes": w.batch_sizes,
                           "trades_per_model_s": w.trades_per_s, "cpu_s": cpu, "engine_end": res["state"],
                           "work_items": len(w.passes["all"])}
        whole = w.trades_per_s[:-1] or w.trades_per_s  # the last second is a step or two
        if whole and max(whole) > 2 * min(whole):
            busy = sum(1 for x in whole if x > 2 * min(whole))
            notes.append(f"{label}: the model's panic regime (x4 orders) covers about {busy} of the {len(whole)} "
                         f"model seconds (aggTrades per model second from {min(whole):,} to {max(whole):,})")
        st = res["state"]["all"]
        notes.append(f"{label}: at the end of the all-kinds pass, books { {m: v['books'] for m, v in st.items()} }; "
                     f"resyncs { {m: v['resyncs'] for m, v in st.items()} }; drift checks ok / mismatched "
                     f"{ {m: (v['drift_ok'], v['drift_mismatch']) for m, v in st.items()} }")

    k = min(5, int(fire_s))
    for m in MARKETS:
        metrics.append(metric(f"(a) simulator generation, {m}", _rates(gen[m]["msgs"], gen[m]["cpu_s"], k),
                              "msg/CPU-s", f"MarketModel stepped as above, --rate {rate:g}; runs: {k} stretches "
                              "of the model seconds"))
    both = [sum(gen[m]["msgs"][i] for m in MARKETS) for i in range(len(gen["spot"]["msgs"]))]
    both_cpu = [sum(gen[m]["cpu_s"][i] for m in MARKETS) for i in range(len(gen["spot"]["msgs"]))]
    sim_rates = _rates(both, both_cpu, k)
    metrics.append(metric("(a) simulator generation, both markets", sim_rates, "msg/CPU-s",
                          "one simulator process runs both markets: it cannot send more"))

    with worker_gc():
        profile = profile_top(fire)
    details["profile_top"] = profile
    notes.append("(a) profile of one firehose all-kinds pass (cProfile, own time, share of the pass): "
                 + "; ".join(f"{name} {share:.0%}" for name, share in profile))

    if quick:
        # The quick run leaves the live level to the pipeline suite, which reports the
        # feature worker's lag, drain and CPU at each of its levels: `all --quick` stays short.
        r = {"skipped": "not run in --quick (the pipeline suite's feature rows cover it; the full run has it)"}
    else:
        try:
            r = live(quick)
        except Exception as exc:  # noqa: BLE001 - e.g. no PostgreSQL: (a) and (c) still stand
            r = {"error": f"{type(exc).__name__}: {exc}"}
    details["live"] = r
    rows, lnotes, kept_up = live_rows(r)
    metrics += rows
    notes += lnotes

    if real is not None:
        cpu_real = []
        with worker_gc():
            for _ in range(runs):
                dt, eng = timed(real, "depth")
                cpu_real.append(dt)
        st = engine_state(eng)["futures"]
        book = eng.symbols[("futures", "BTCUSDT")].sync.book
        metrics.append(metric("(c) real capture: µs per depthUpdate", _per(cpu_real, real.counts["depthUpdate"]),
                              "µs", f"{real.counts['depthUpdate']:,} diffs, {real.levels_per_diff:.0f} levels "
                              f"each, {real.batch_sizes['depthUpdate']:.1f} per Feed"))
        notes.append(f"(c) {real.name}: the book ends {st['books']}, resyncs {st['resyncs']}, final depth "
                     f"{book.depth() if book is not None else None} (bids, asks)")
        details["real"] = {"cpu_s": cpu_real, "engine_end": st}
    else:
        notes.append(f"(c) real capture {REAL_FILE} not found under {REALDATA}: skipped")

    ratio = eng_rate / median(sim_rates) if eng_rate else None
    offered = r["all_messages"] / r["window_s"] if not (r.get("error") or r.get("skipped")) else None
    metrics.append(metric("(d) engine / simulator generation", ratio, "x",
                          f">= 1 keeps up: {'yes' if ratio >= 1 else 'NO'}, margin {(ratio - 1) * 100:+.0f}%"
                          if ratio else ""))
    if offered and eng_rate:
        metrics.append(metric("(d) engine cores needed at the live offered rate", offered / eng_rate, "cores",
                              f"{offered:,.0f} msg/s offered in (b) / the engine's rate in (a); the live worker "
                              f"used {r['cpu_cores_by_kind'].get('features', 0):.2f}"))
    metrics.append(metric("(d) live: feature worker kept up", None if kept_up is None else
                          ("yes" if kept_up else "NO"), "",
                          f"input lag beyond the simulator's < {LAG_OK_S:g} s at the window's end and every "
                          "trade and diff processed, queue empty, after the pause"))
    notes += [
        "(a) CPU seconds of one thread (process_time), the unit of the simulator's generation rate; a fresh "
        "engine per pass, default FeatureSettings (60 s bars) unless said; bars start at the boundary before "
        "the first event, so every trade goes through the bar builder. Not timed: the queue's pickling, the "
        "rows and metrics of emitted bars (FeatureWorker.emit), the status report. The timed passes run with "
        "the worker's garbage collector settings (child.tune_gc: the objects made before are frozen, young "
        "generation 10,000), and the previous pass's engine is collected before each one.",
        "(a) The simulator also fans out and writes frames, so what it can send is below its generation rate "
        "(the sim suite: about 65,000 msg/s delivered on the reference host): the ratio is conservative.",
        f"(a) Batches: per market and kind, what one socket worker's {FLUSH_MS} ms flush holds at that rate. "
        f"REST snapshots every {SNAPSHOT_EVERY_MS // 1000} s of model time (the first builds each book; later "
        "ones stand in for the answers to the engine's requests, and are drift checks on synced books).",
    ]
    return {"suite": "feature_worker", "title": "feature worker vs the simulator's full firehose",
            "params": params, "metrics": metrics, "notes": notes, "details": details}
