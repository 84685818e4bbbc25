"""Socket worker codec: CPU per message of the frame path, without I/O.

Issue 6 sets the ingestor's CPU per message, all processes together, at <= 5 µs per
aggTrade and <= 10 µs per 20x20 depthUpdate. This suite measures the socket worker's share
of it in one process, per stream type, split into its parts:

- *envelope cut*: ``envelope_payload`` on the combined-stream frame;
- *parse*: ``orjson.loads`` of the payload alone;
- *encode*: the ``rows.*`` function on_frame calls (``*_parts`` for aggTrade and
  depthUpdate), alone, on an already parsed message;
- *on_frame*: the whole ``FrameHandler.on_frame`` (cut, parse, sequence check, encode, batch
  append, the feature feed's append) plus the batches' final join, with a ``Batcher`` of
  ``Settings().batch_rows`` rows and a ``MarketFeed``, as in the socket worker;
- *hand-over*: what leaves the process per message: pickling every ``Batch`` as
  ``multiprocessing.Queue`` does (``ForkingPickler.dumps``, in the feeder thread of the same
  process), and the feature feed's join and pickling;
- *socket worker*: on_frame + hand-over, per run (the figure the issue-6 share is about;
  picows' own frame parsing and the pipe writes are not in it);
- *writer side*: the writer's Python work per row before asyncpg sends the COPY: unpickling
  the batches, joining them into one COPY stream (``copy_file``) and reading their event
  times (numpy); asyncpg and the server are not in it.

Workloads: synthetic messages in Binance's exact shapes (``ingestor.sim.encode``), 10
symbols, consecutive ids (every message kept): Spot and USD-M aggTrade, Spot and USD-M
depthUpdate with 20 bid and 20 ask levels, ``!markPrice@arr@1s`` arrays of 500 symbols
(µs per element), and ``!forceOrder@arr`` events; then the real captures of
``../shared/realdata`` where present, as received (combined frames of the recorders; raw
ones wrapped the way Binance wraps them).

µs per message = CPU seconds (``process_time``) of a pass over the workload / messages;
values are medians of the runs; runs of every part are interleaved, so a noisy neighbour
hits all parts alike. One process, one core.
"""

from __future__ import annotations

import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from benchmarks.report import median, metric
from ingestor.binance.streams import Market
from ingestor.config import Settings
from ingestor.sim import encode as enc
from ingestor.wire import rows
from ingestor.wire.batching import Batch, Batcher
from ingestor.wire.copy_binary import copy_file
from ingestor.wire.feed import Feed, MarketFeed
from ingestor.workers.frames import FrameHandler, envelope_payload, split_envelope

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
SYMBOLS = ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT", "ADAUSDT", "AVAXUSDT",
           "LINKUSDT", "DOTUSDT")
TARGETS_US = {"aggTrade": 2.0, "depthUpdate": 5.0}  # the socket worker's share of issue 6's budget
PARTS = ("envelope cut", "parse (orjson.loads)", "encode (rows.*)", "on_frame", "hand-over (pickle)",
         "socket worker: on_frame + hand-over", "writer side per row")


@dataclass
class Workload:
    name: str
    market: Market
    kind: str  # aggTrade | depthUpdate | markPriceUpdate | forceOrder
    frames: list[bytes]  # combined-stream envelopes, in order
    note: str = ""
    messages: int = 0  # events (an array frame holds several)
    payloads: list[bytes] = field(default_factory=list)
    parsed: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        cut = [split_envelope(f) for f in self.frames]
        self.payloads = [c[1] for c in cut if c is not None]
        assert len(self.payloads) == len(self.frames), self.name
        self.parsed = [orjson.loads(p) for p in self.payloads]
        self.messages = sum(len(m) if isinstance(m, list) else 1 for m in self.parsed)


# ---- synthetic workloads -------------------------------------------------------------------


def _price(ticks: int, market: Market) -> str:
    # Spot writes 8 decimals; USD-M the symbol's own precision (2 for a tick of 0.1 here).
    return enc.fixed(ticks * 10**6, 8) if market == "spot" else enc.fixed(ticks * 10, 2)


def _qty(lots: int, market: Market) -> str:
    return enc.fixed(lots * 10**5, 8) if market == "spot" else enc.fixed(lots, 3)


def agg_trades(market: Market, n: int, seed: int = 1) -> Workload:
    rnd = random.Random(seed)
    ticks = dict.fromkeys(SYMBOLS, 4_200_000)  # 42,000.00 at a 0.01 tick
    ids = {s: 1_000_000_000 + i * 7_000_000 for i, s in enumerate(SYMBOLS)}
    fn = enc.agg_trade_spot if market == "spot" else enc.agg_trade_futures
    e_ms, frames = 1_700_000_000_000, []
    for i in range(n):
        s = SYMBOLS[i % len(SYMBOLS)]
        e_ms += rnd.randint(0, 2)
        ticks[s] += rnd.choice((-1, 0, 1))
        ids[s] += 1
        first = ids[s] * 3
        payload = fn(e_ms, s, ids[s], _price(ticks[s], market), _qty(rnd.randint(1, 5000), market), first,
                     first + rnd.randint(0, 3), e_ms - 1, rnd.random() < 0.5)
        frames.append(enc.envelope(f"{s.lower()}@aggTrade", payload))
    return Workload(f"{market} aggTrade", market, "aggTrade", frames, "synthetic, 10 symbols")


def depth_updates(market: Market, n: int, levels: int = 20, seed: int = 2) -> Workload:
    rnd = random.Random(seed)
    last_u = {s: 40_000_000_000 + i * 10**9 for i, s in enumerate(SYMBOLS)}
    mid = dict.fromkeys(SYMBOLS, 4_200_000)
    e_ms, frames = 1_700_000_000_000, []
    speed = "100ms" if market == "spot" else "500ms"
    for i in range(n):
        s = SYMBOLS[i % len(SYMBOLS)]
        e_ms += rnd.randint(5, 15)
        mid[s] += rnd.choice((-2, -1, 0, 1, 2))
        bids = [(_price(mid[s] - 1 - rnd.randint(0, 200), market), _qty(rnd.randint(0, 90_000), market))
                for _ in range(levels)]
        asks = [(_price(mid[s] + 1 + rnd.randint(0, 200), market), _qty(rnd.randint(0, 90_000), market))
                for _ in range(levels)]
        first, final = last_u[s] + 1, last_u[s] + rnd.randint(levels, 4 * levels)
        if market == "spot":
            payload = enc.depth_update_spot(e_ms, s, first, final, bids, asks)
        else:
            payload = enc.depth_update_futures(e_ms, e_ms - 2, s, first, final, last_u[s], bids, asks)
        last_u[s] = final
        frames.append(enc.envelope(f"{s.lower()}@depth@{speed}", payload))
    return Workload(f"{market} depthUpdate {levels}x{levels}", market, "depthUpdate", frames,
                    f"synthetic, 10 symbols, {levels} bids + {levels} asks")


def mark_price_arrays(n_arrays: int, width: int = 500, seed: int = 3) -> Workload:
    rnd = random.Random(seed)
    symbols = [f"S{i:03d}USDT" for i in range(width)]
    frames = []
    for k in range(n_arrays):
        e_ms = 1_700_000_000_000 + 1000 * k
        items = [enc.mark_price(e_ms, s, _price(rnd.randint(10**4, 10**7), "futures"),
                                _price(rnd.randint(10**4, 10**7), "futures"), "0.00000000",
                                enc.fixed(rnd.randint(-10**5, 10**5), 8), 1_700_006_400_000) for s in symbols]
        frames.append(enc.envelope("!markPrice@arr@1s", enc.mark_price_array(items)))
    return Workload("futures !markPrice@arr@1s", "futures", "markPriceUpdate", frames,
                    f"synthetic, arrays of {width} symbols, µs per element")


def force_orders(n: int, seed: int = 4) -> Workload:
    rnd = random.Random(seed)
    e_ms, frames = 1_700_000_000_000, []
    for i in range(n):
        e_ms += rnd.randint(1, 30)
        s = SYMBOLS[i % len(SYMBOLS)]
        p = _price(rnd.randint(10**4, 10**7), "futures")
        frames.append(enc.envelope("!forceOrder@arr", enc.force_order(
            e_ms, s, rnd.choice(("BUY", "SELL")), _qty(rnd.randint(1, 10**6), "futures"), p, p, e_ms - 3)))
    return Workload("futures forceOrder", "futures", "forceOrder", frames, "synthetic, 10 symbols")


def synthetic(quick: bool) -> list[Workload]:
    k = 1 if quick else 3
    return [
        agg_trades("spot", 20_000 * k), agg_trades("futures", 20_000 * k),
        depth_updates("spot", 5_000 * k), depth_updates("futures", 5_000 * k),
        mark_price_arrays(20 * k), force_orders(10_000 * k),
    ]


# ---- real captures -------------------------------------------------------------------------


_REAL = (  # (file, market, kind, label)
    ("bmoscon_cryptofeed__sample_data-BINANCE-ee25be.0@29970208", "spot", "aggTrade", "spot aggTrade (2021)"),
    ("bmoscon_cryptofeed__sample_data-BINANCE_FUTURES.ws.1.0", "futures", "aggTrade", "futures aggTrade"),
    ("bmoscon_cryptofeed__sample_data-BINANCE-ee25be.0@29970208", "spot", "depthUpdate",
     "spot depthUpdate @100ms (2021)"),
    ("nkaz001_hftbacktest__examples-spot-btcusdt_20240808.gz", "spot", "depthUpdate",
     "spot BTCUSDT depthUpdate @100ms (2024)"),
    ("bmoscon_cryptofeed__sample_data-BINANCE_FUTURES.ws.1.0", "futures", "depthUpdate",
     "futures depthUpdate @100ms"),
    ("nkaz001_hftbacktest__examples-usdm-btcusdt_20240808.gz", "futures", "depthUpdate",
     "futures BTCUSDT depthUpdate @0ms (2024)"),
    ("dannyspk_arbitra-backend__tools-ccxt_out-binance_force_orders_ws.log", "futures", "forceOrder",
     "futures forceOrder (re-serialised by its recorder)"),
)
PREMIUM_INDEX = "danghungithp_funding-rate-binance-bot__premiumIndex.json"


def _kind_of(data: bytes) -> str | None:
    obj = orjson.loads(data)
    return obj.get("e") if isinstance(obj, dict) else None


def real(quick: bool) -> list[Workload]:
    """One workload per (capture, kind) above, and the all-market mark price array built from
    the real premiumIndex reply's values (no real ``!markPrice@arr`` was recorded)."""
    if not (REALDATA / "README.md").is_file():
        return []
    from ingestor.sim.captures import read_capture

    out = []
    cache: dict[str, Any] = {}
    for name, market, kind, label in _REAL:
        path = REALDATA / name
        if not path.is_file():
            continue
        cap = cache.get(name) or cache.setdefault(name, read_capture(path))
        frames = []
        for f in cap.frames:
            if _kind_of(f.data) != kind:
                continue
            if f.stream is None:
                ev = orjson.loads(f.data)
                f_stream = f"{(ev['o']['s'] if kind == 'forceOrder' else ev['s']).lower()}@{kind}"
            else:
                f_stream = f.stream
            frames.append(enc.envelope(f_stream, f.data))
        if frames:
            out.append(Workload(f"real {label}", market, kind, frames, name))  # type: ignore[arg-type]
    path = REALDATA / PREMIUM_INDEX
    if path.is_file():
        items = [{"e": "markPriceUpdate", "E": x["time"], "s": x["symbol"], "p": x["markPrice"],
                  "i": x["indexPrice"], "P": x["estimatedSettlePrice"], "r": x["lastFundingRate"],
                  "T": x["nextFundingTime"]} for x in orjson.loads(path.read_bytes())]
        arrays = []
        for k in range(10 if quick else 30):  # each a second later, so none is stale
            for x in items:
                x["E"] += 1000 * (k > 0)
            arrays.append(enc.envelope("!markPrice@arr@1s", orjson.dumps(items)))
        out.append(Workload(f"real !markPrice@arr@1s ({len(items)} symbols)", "futures", "markPriceUpdate",
                            arrays, f"values of {PREMIUM_INDEX}, µs per element"))
    return out


def describe(w: Workload) -> str:
    """Sizes that explain the figures: payload bytes, and levels per diff for depth."""
    size = sum(map(len, w.payloads)) / w.messages
    text = f"{w.note}; {w.messages:,} messages, {size:,.0f} payload bytes each"
    if w.kind == "depthUpdate":
        levels = sum(len(m["b"]) + len(m["a"]) for m in w.parsed) / len(w.parsed)
        text += f", {levels:.1f} levels each"
    return text


# ---- the parts -----------------------------------------------------------------------------


def _cpu(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.process_time()
    result = fn()
    return time.process_time() - started, result


def _elements(w: Workload) -> list[tuple[dict[str, Any], bytes]]:
    """(event, its stored bytes) per message: array elements re-serialised as the handler does."""
    out: list[tuple[dict[str, Any], bytes]] = []
    for msg, payload in zip(w.parsed, w.payloads, strict=True):
        if isinstance(msg, list):
            out.extend((item, orjson.dumps(item)) for item in msg)
        else:
            out.append((msg, payload))
    return out


# What FrameHandler calls per event: the hot two in parts (joined with their batch).
_ENCODERS: dict[str, Callable[[Market, dict[str, Any], bytes], Any]] = {
    "aggTrade": rows.agg_trade_parts, "depthUpdate": rows.depth_update_parts, "markPriceUpdate": rows.mark_price,
    "forceOrder": rows.force_order,
}


def time_envelope(w: Workload, repeat: int) -> float:
    frames = w.frames

    def loop() -> None:
        for _ in range(repeat):
            for f in frames:
                envelope_payload(f)

    return _cpu(loop)[0]


def time_parse(w: Workload, repeat: int) -> float:
    payloads = w.payloads

    def loop() -> None:
        loads = orjson.loads
        for _ in range(repeat):
            for p in payloads:
                loads(p)

    return _cpu(loop)[0]


def time_encode(w: Workload, repeat: int, elements: list[tuple[dict[str, Any], bytes]]) -> float:
    encode, market = _ENCODERS[w.kind], w.market

    def loop() -> None:
        for _ in range(repeat):
            for msg, payload in elements:
                encode(market, msg, payload)

    return _cpu(loop)[0]


@dataclass
class Handled:
    batches: list[Batch]
    feed: MarketFeed
    rejected: dict[str, int]
    stale: int
    faults: int  # minor page faults during the pass


def run_handler(w: Workload, batch_rows: int) -> tuple[float, Handled]:
    """One pass of on_frame over the workload with a fresh handler (the sequence state starts
    empty, so every pass keeps every message); the batches' final join included."""
    batches: list[Batch] = []
    feeds: list[Feed] = []
    batcher = Batcher(batches.append, batch_rows=batch_rows, batch_age_s=1e9)
    feed = MarketFeed(w.market, feeds.append)
    h = FrameHandler(w.market, batcher, feed=feed)
    on_frame, frames = h.on_frame, w.frames

    def loop() -> None:
        for f in frames:
            on_frame(f)
        batcher.flush(force=True)

    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds, _ = _cpu(loop)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return seconds, Handled(batches, feed, dict(h.rejected), h.stale, faults)


def time_handover(handled: Handled) -> tuple[float, list[Any]]:
    """Pickle every batch as the queue's feeder thread does; join and pickle the feed."""
    dumps = ForkingPickler.dumps
    feeds: list[Feed] = []
    handled.feed.sink = feeds.append

    def work() -> list[Any]:
        out = [dumps(b) for b in handled.batches]  # the buffer the queue writes to its pipe
        handled.feed.flush()
        for f in feeds:
            dumps(f)
        return out

    return _cpu(work)


def time_writer(pickled: list[Any]) -> float:
    """The writer's Python work on these batches: unpickle, one COPY stream per group of up to
    four batches, their event times as one array."""
    import pickle

    def work() -> None:
        batches = [pickle.loads(p) for p in pickled]
        for i in range(0, len(batches), 4):
            group = batches[i : i + 4]
            copy_file(b"".join(b.data for b in group))
            np.concatenate([np.frombuffer(b.event_ms, dtype=np.int64) for b in group])

    return _cpu(work)[0]


def bench(w: Workload, runs: int, min_messages: int, batch_rows: int) -> dict[str, list[float]]:
    """Every part's µs per message, ``runs`` times, interleaved (and on_frame's page faults)."""
    repeat = max(1, -(-min_messages // w.messages))
    elements = _elements(w)
    per = 1e6 / (w.messages * repeat)
    out: dict[str, list[float]] = {p: [] for p in (*PARTS, "faults")}
    for _ in range(runs):
        out["envelope cut"].append(time_envelope(w, repeat) * per)
        out["parse (orjson.loads)"].append(time_parse(w, repeat) * per)
        out["encode (rows.*)"].append(time_encode(w, repeat, elements) * per)
        frame_s = handover_s = writer_s = 0.0
        faults = 0
        for _ in range(repeat):
            s, handled = run_handler(w, batch_rows)
            if handled.rejected or handled.stale:
                raise AssertionError(f"{w.name}: rejected {handled.rejected}, stale {handled.stale}")
            h_s, pickled = time_handover(handled)
            frame_s += s
            handover_s += h_s
            writer_s += time_writer(pickled)
            faults += handled.faults
        out["faults"].append(faults * per / 1e6)
        out["on_frame"].append(frame_s * per)
        out["hand-over (pickle)"].append(handover_s * per)
        out["socket worker: on_frame + hand-over"].append((frame_s + handover_s) * per)
        out["writer side per row"].append(writer_s * per)
    return out


def run(quick: bool, runs: int | None = None) -> dict[str, Any]:
    runs = runs or (5 if quick else 9)
    min_messages = 5_000 if quick else 20_000
    batch_rows = Settings().batch_rows
    workloads = synthetic(quick) + real(quick)
    metrics: list[dict[str, Any]] = []
    notes: list[str] = []
    summary: dict[str, dict[str, float]] = {}
    for w in workloads:
        res = bench(w, runs, min_messages, batch_rows)
        summary[w.name] = {part: round(median(v), 3) for part, v in res.items()}  # "faults": a message
        for part in PARTS:
            note = f"{describe(w)}; {median(res['faults']):.2f} minor page faults a message" \
                if part == "on_frame" else ""
            if part.startswith("socket worker") and w.kind in TARGETS_US and not w.name.startswith("real"):
                target = TARGETS_US[w.kind]
                note = f"share target ~{target:g} µs: {'met' if median(res[part]) <= target else 'NOT met'}"
            metrics.append(metric(f"{w.name}: {part}", [round(v, 3) for v in res[part]], "µs", note))
    notes.append(f"Batches of {batch_rows:,} rows (Settings().batch_rows); a fresh handler per pass, so no "
                 "message is stale (the synthetic ids are consecutive per symbol).")
    notes.append("on_frame includes the envelope cut, the parse and the encode; on_frame + hand-over is the "
                 "socket worker's CPU per message short of picows' frame parsing, StreamConnection.on_text and "
                 "the pipe writes (not measured here).")
    notes.append("CPU time is user + system, so page faults count; on_frame's note gives its minor page faults "
                 "per message (memory glibc handed back to the kernel and takes again: none once this process "
                 "has grown, but a lone pass over 20x20 diffs takes about 0.6 a message, some 0.9 µs).")
    return {"suite": "codec", "title": "socket worker CPU per message, by part and stream type (no I/O)",
            "params": {"runs": runs, "min_messages_per_pass": min_messages, "batch_rows": batch_rows},
            "metrics": metrics, "notes": notes, "details": {"median_us": summary}}


def main() -> None:
    """``python -m benchmarks.codec [--full]``: the table alone, without a report file."""
    import sys

    result = run("--full" not in sys.argv)
    width = max(len(n) for n in result["details"]["median_us"])
    short = ("cut", "parse", "encode", "on_frame", "handover", "socket", "writer", "faults")
    print(f"{'workload':<{width}}  " + "  ".join(f"{s:>8}" for s in short))
    for name, parts in result["details"]["median_us"].items():
        print(f"{name:<{width}}  " + "  ".join(f"{parts[p]:8.3f}" for p in (*PARTS, "faults")))


if __name__ == "__main__":
    main()
