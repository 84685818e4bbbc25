"""A pre-recorded market: the model's messages generated ahead of time, played on the wall clock.

Why: the market model generates about 80,000-90,000 messages per CPU second, so a 2-core
box cannot run it live at the rates the pipeline is benchmarked at (100,000 msgs/s and
more, next to the ingestor and PostgreSQL). A tape is the same model's output for some
model seconds, recorded once (both markets in parallel, cached on disk), then played:

- every event time (``E``, and ``T`` except a mark price's next funding time) is moved
  onto the wall clock, scaled by ``speed`` (the offered rate over the recorded one), so
  event-to-commit latency is measured from when a message was really sent;
- ids, diffs and their ``U``/``u``/``pu`` chains are the model's, untouched;
- REST ``/depth`` answers from a book kept by applying each symbol's recorded diffs as
  they are played (before or without a subscriber too), so a snapshot always bridges to
  the stream by Binance's procedure; ``/aggTrades`` answers from the trades played.

Play starts a second after the first client subscribes to anything, so a client that
needs seconds to start up, and opens several connections, still sees the tape from its
beginning. What a tape does not record (other
depth speeds, per-symbol mark price or liquidation streams) is never sent; exchangeInfo,
tickers, open interest and premium index answer from the model's state at the tape's start.
When the tape is played out the streams go quiet and ``/stats`` says so.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ingestor.binance.streams import Market
from ingestor.sim import encode
from ingestor.sim.model import MarketModel, ModelParams
from ingestor.sim.universe import SymbolSpec

log = logging.getLogger(__name__)

TAPE_VERSION = 1
TAPE_START_MS = 1_700_000_000_000  # model time a tape is recorded from (13 digits, as every time after it)
TIME_DIGITS = 13
START_DELAY_MS = 1000  # from the first subscription to the first message played
MAX_PASS_MSGS = 20_000  # messages sent per pass of the clock loop before it yields
_E_FIELD = re.compile(rb'"E":(\d{13})')
_T_FIELD = re.compile(rb'"T":(\d{13})')


def tape_streams(market: Market, specs: tuple[SymbolSpec, ...], depth_speed: str) -> tuple[str, ...]:
    """What a tape records: the streams ``ingestor run`` subscribes at the given depth speed."""
    names = []
    for s in specs:
        names += [f"{s.lower}@aggTrade", f"{s.lower}@depth" + (f"@{depth_speed}" if depth_speed else "")]
    if market == "futures":
        names += ["!markPrice@arr@1s", "!forceOrder@arr"]
    return tuple(names)


@dataclass
class MarketTape:
    """One market's recording. Messages are in emission order; ``blob[off[i]:off[i+1]]`` is
    message i, sent on ``names[sid[i]]`` with hub sequence ``seq[i]`` at model time
    ``step[i]``. ``toff`` are the blob offsets of the 13-digit event times to move,
    ascending. ``books``: each symbol's full book at the start (a REST depth body)."""

    market: Market
    names: list[str]
    blob: bytes
    off: np.ndarray
    sid: np.ndarray
    seq: np.ndarray
    step: np.ndarray
    toff: np.ndarray
    books: dict[str, bytes]
    seconds: float

    @property
    def messages(self) -> int:
        return len(self.sid)

    @property
    def rate(self) -> float:
        """Recorded messages per model second."""
        return self.messages / self.seconds if self.seconds else 0.0


def record(market: Market, specs: tuple[SymbolSpec, ...], seed: int, params: ModelParams, seconds: float,
           streams: tuple[str, ...]) -> MarketTape:
    """Step the model for ``seconds`` of model time and keep what it emits on ``streams``."""
    model = MarketModel(market, specs, seed, params, TAPE_START_MS)
    books = {s.symbol: model.depth_snapshot(s.symbol, 10**9) for s in specs}
    wanted = set(streams)
    index = {name: i for i, name in enumerate(streams)}
    payloads: list[bytes] = []
    sids: list[int] = []
    seqs: list[int] = []
    steps: list[int] = []

    def emit(name: str, payload: bytes, seq: int) -> None:
        payloads.append(payload)
        sids.append(index[name])
        seqs.append(seq)
        steps.append(model.t)

    model.wants = wanted.__contains__
    model.emit = emit
    model.advance_to(model.t + int(seconds * 1000))
    blob = b"".join(payloads)
    off = np.zeros(len(payloads) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, payloads), dtype=np.int64, count=len(payloads)), out=off[1:])
    sid = np.array(sids, dtype=np.int32)
    # Every E moves; a T moves too, but for a mark price's (its next funding time).
    e_at = np.fromiter((m.start(1) for m in _E_FIELD.finditer(blob)), dtype=np.int64)
    t_at = np.fromiter((m.start(1) for m in _T_FIELD.finditer(blob)), dtype=np.int64)
    mark = np.array(["markPrice" in n for n in streams], dtype=bool)
    if len(t_at):
        t_at = t_at[~mark[sid[np.searchsorted(off, t_at, side="right") - 1]]]
    toff = np.sort(np.concatenate([e_at, t_at]))
    return MarketTape(market, list(streams), blob, off, sid, np.array(seqs, dtype=np.int64),
                      np.array(steps, dtype=np.int64), toff, books, seconds)


def _record_job(args: tuple[Any, ...]) -> MarketTape:
    return record(*args)


def load_or_record(markets: tuple[Market, ...], specs: tuple[SymbolSpec, ...], seed: int, params: ModelParams,
                   seconds: float, depth_speeds: dict[Market, str], cache: Path | None) -> dict[Market, MarketTape]:
    """Each market's tape, from ``cache`` when recorded before with the same inputs; the
    markets are recorded in parallel processes (each is one independent model)."""
    jobs = {m: (m, specs, seed, params, seconds, tape_streams(m, specs, depth_speeds[m])) for m in markets}
    tapes: dict[Market, MarketTape] = {}
    paths: dict[Market, Path] = {}
    for m, job in jobs.items():
        if cache is not None:
            key = orjson.dumps([TAPE_VERSION, m, [asdict(s) for s in specs], seed, asdict(params), seconds, job[5]])
            paths[m] = cache / f"tape-{m}-{hashlib.sha256(key).hexdigest()[:16]}.npz"
            if paths[m].is_file():
                tapes[m] = _load(paths[m], m)
    todo = [m for m in markets if m not in tapes]
    if todo:
        t0 = time.monotonic()
        if len(todo) > 1:
            with ProcessPoolExecutor(len(todo)) as pool:
                done = list(pool.map(_record_job, [jobs[m] for m in todo]))
        else:
            done = [record(*jobs[todo[0]])]
        for m, tape in zip(todo, done, strict=True):
            tapes[m] = tape
            if m in paths:
                paths[m].parent.mkdir(parents=True, exist_ok=True)
                _save(paths[m], tape)
        log.info("recorded %s of tape in %.1f s", ", ".join(f"{m} {tapes[m].messages:,} msgs" for m in todo),
                 time.monotonic() - t0)
    return tapes


def _save(path: Path, tape: MarketTape) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, blob=np.frombuffer(tape.blob, dtype=np.uint8), off=tape.off, sid=tape.sid, seq=tape.seq,
             step=tape.step, toff=tape.toff,
             meta=np.frombuffer(orjson.dumps({"names": tape.names, "seconds": tape.seconds,
                                              "books": {k: v.decode() for k, v in tape.books.items()}}),
                                dtype=np.uint8))
    tmp.replace(path)  # whole or not at all: a cache read never sees half a tape


def _load(path: Path, market: Market) -> MarketTape:
    with np.load(path) as z:
        meta = orjson.loads(z["meta"].tobytes())
        return MarketTape(market, meta["names"], z["blob"].tobytes(), z["off"], z["sid"], z["seq"], z["step"],
                          z["toff"], {k: v.encode() for k, v in meta["books"].items()}, meta["seconds"])


# Four ASCII digits of 0..9999 as one uint32, for a lookup per group of four.
_DIGITS4 = np.array([[48 + int(c) for c in f"{i:04d}"] for i in range(10_000)], dtype=np.uint8).view(np.uint32)[:, 0]


def digits(values: np.ndarray) -> np.ndarray:
    """Non-negative int64 ``values`` below 10**13 as rows of 13 zero-padded ASCII digits
    (uint8), vectorised: groups of four digits looked up, no per-digit division."""
    if len(values) and (int(values.min()) < 0 or int(values.max()) >= 10**TIME_DIGITS):
        raise OverflowError("a time or id outgrew 13 digits")
    hi = values // 10**12
    rest = values - hi * 10**12
    g1 = rest // 10**8
    rest -= g1 * 10**8
    g2 = rest // 10**4
    g3 = rest - g2 * 10**4
    groups = np.stack([_DIGITS4[hi], _DIGITS4[g1], _DIGITS4[g2], _DIGITS4[g3]], axis=1)
    return groups.view(np.uint8)[:, 16 - TIME_DIGITS:]  # "000d" + 3 x 4 digits: drop the padding


class TapeClock:
    """When play started (wall ms), shared by the markets so they stay aligned: a moment
    after the first subscription, so a client's other connections are up by then."""

    def __init__(self, speed_of: dict[Market, float]) -> None:
        self.first_sub: int | None = None
        self.w0: int | None = None
        self.speed_of = speed_of


class _Book:
    """A symbol's book as the recorded diffs leave it, for REST snapshots."""

    __slots__ = ("bids", "asks", "last_u", "last_t")

    def __init__(self, body: bytes) -> None:
        snap = orjson.loads(body)
        self.bids: dict[str, str] = {p: q for p, q in snap["bids"]}
        self.asks: dict[str, str] = {p: q for p, q in snap["asks"]}
        self.last_u: int = snap["lastUpdateId"]
        self.last_t: int | None = None  # the recorded snapshot's T is model time: not shown

    def apply(self, diff: dict[str, Any]) -> None:
        for side, levels in ((self.bids, diff["b"]), (self.asks, diff["a"])):
            for p, q in levels:
                if float(q) == 0.0:
                    side.pop(p, None)
                else:
                    side[p] = q
        self.last_u = diff["u"]
        self.last_t = diff.get("T", diff["E"])

    def top(self, side: dict[str, str], limit: int, descending: bool) -> list[tuple[str, str]]:
        keys = sorted(side, key=float, reverse=descending)[:limit]
        return [(k, side[k]) for k in keys]


class TapeMarket(MarketModel):
    """A market that plays a tape instead of stepping its model: ``advance_to`` sends what
    is due. It is a ``MarketModel`` at the tape's start for the REST views that do not
    follow the stream (exchangeInfo, tickers, open interest, premium index)."""

    def __init__(self, tape: MarketTape, specs: tuple[SymbolSpec, ...], seed: int, params: ModelParams,
                 clock: TapeClock, has_subscribers: Callable[[], bool], now_ms: int) -> None:
        super().__init__(tape.market, specs, seed, params, now_ms)
        self.t = now_ms
        self.tape = tape
        self.clock = clock
        self.has_subscribers = has_subscribers
        self.speed = clock.speed_of[tape.market]
        self.t0 = TAPE_START_MS
        step = tape.step
        starts = np.flatnonzero(np.diff(step)) + 1
        self.bounds = np.concatenate([[0], starts, [len(step)]]).astype(np.int64)  # message ranges per step
        self.step_times = step[self.bounds[:-1]] if len(step) else np.zeros(0, dtype=np.int64)
        self.next_step = 0
        self.played = 0
        self.finished = len(step) == 0
        self.names = tape.names
        self.book_of: dict[int, _Book] = {}  # stream index of a symbol's diffs -> its book
        self.trade_sid: dict[str, int] = {}  # symbol -> stream index of its trades
        self.tape_books = {sym: _Book(body) for sym, body in tape.books.items()}
        for i, name in enumerate(tape.names):
            head, _, kind = name.partition("@")
            if kind.startswith("depth"):
                self.book_of[i] = self.tape_books[head.upper()]
            elif kind == "aggTrade":
                self.trade_sid[head.upper()] = i
        # The recorded value of every time field, read back from its digits once.
        raw = np.frombuffer(tape.blob, dtype=np.uint8)
        self.tval = np.zeros(len(tape.toff), dtype=np.int64)
        for k in range(TIME_DIGITS):
            self.tval = self.tval * 10 + (raw[tape.toff + k] - 48)

    def advance_to(self, now_ms: int) -> int:
        """Send the steps whose wall time has come, at most MAX_PASS_MSGS messages' worth (so
        the loop still serves accepts and REST when the tape is played faster than the host
        can); ``t`` is then the wall time of the last step sent. Returns the steps sent."""
        clock = self.clock
        if clock.w0 is None:
            if clock.first_sub is None and self.has_subscribers():
                clock.first_sub = now_ms
            if clock.first_sub is None or now_ms < clock.first_sub + START_DELAY_MS:
                self.t = max(self.t, now_ms)
                return 0
            clock.w0 = clock.first_sub + START_DELAY_MS
        if self.finished:
            self.t = max(self.t, now_ms)
            return 0
        horizon = self.t0 + (now_ms - clock.w0) * self.speed  # model time due by now
        due = int(np.searchsorted(self.step_times, horizon, side="right"))
        first = self.next_step
        cap = int(np.searchsorted(self.bounds, self.bounds[first] + MAX_PASS_MSGS, side="right")) - 1
        end = min(due, max(cap, first + 1))
        if end <= first:
            self.t = max(self.t, now_ms)
            return 0
        self._play(first, end)
        self.next_step = end
        if end >= len(self.step_times):
            self.finished = True
            log.warning("%s: the tape is played out (%s messages); its streams are quiet from now on",
                        self.market, f"{self.played:,}")
        if end < due:  # behind: say so, and the clock loop comes back at once
            self.t = max(self.t, clock.w0 + int((int(self.step_times[end - 1]) - self.t0) / self.speed))
        else:
            self.t = max(self.t, now_ms)
        return end - first

    def _play(self, first_step: int, end_step: int) -> None:
        tape = self.tape
        lo, hi = int(self.bounds[first_step]), int(self.bounds[end_step])
        mv = memoryview(self._on_wall_clock(lo, hi))
        b0 = int(tape.off[lo])
        offs = (tape.off[lo : hi + 1] - b0).tolist()
        sids = tape.sid[lo:hi].tolist()
        seqs = tape.seq[lo:hi].tolist()
        emit, names, book_of = self.emit, self.names, self.book_of
        for j, sid in enumerate(sids):
            payload = bytes(mv[offs[j] : offs[j + 1]])
            emit(names[sid], payload, seqs[j])
            if sid in book_of:
                book_of[sid].apply(orjson.loads(payload))
        self.played += len(sids)

    def _on_wall_clock(self, lo: int, hi: int) -> bytearray:
        """Messages ``lo..hi`` (their bytes, back to back) with every time field moved onto
        the wall clock: one vectorised write of all their 13-digit fields."""
        tape = self.tape
        b0, b1 = int(tape.off[lo]), int(tape.off[hi])
        buf = bytearray(tape.blob[b0:b1])
        f0, f1 = np.searchsorted(tape.toff, [b0, b1])
        if f1 > f0 and self.clock.w0 is not None:
            new = self.clock.w0 + ((self.tval[f0:f1] - self.t0) / self.speed).astype(np.int64)
            np.frombuffer(buf, dtype=np.uint8)[(tape.toff[f0:f1] - b0)[:, None] + np.arange(TIME_DIGITS)] = \
                digits(new)
        return buf

    # ---- REST views that follow the stream ---------------------------------------------

    def depth_snapshot(self, symbol: str, limit: int) -> bytes:
        book = self.tape_books[symbol]
        bids = book.top(book.bids, limit, True)
        asks = book.top(book.asks, limit, False)
        if self.futures:  # T: the last diff's (already on the wall clock), or now before any
            return encode.rest_depth(book.last_u, bids, asks, self.t, book.last_t or self.t)
        return encode.rest_depth(book.last_u, bids, asks)

    def agg_trades(self, symbol: str, from_id: int | None, start: int | None, end: int | None,
                   limit: int) -> bytes:
        # The symbol's trades played so far, found when asked (backfills are rare; the play
        # loop keeps no per-trade record). Ids are consecutive per symbol.
        played = int(self.bounds[self.next_step])
        sid = self.trade_sid.get(symbol)
        idx = np.flatnonzero(self.tape.sid[:played] == sid) if sid is not None else np.zeros(0, dtype=np.int64)
        idx = idx[-self.params.trade_history:]
        if from_id is not None and len(idx):
            first = int(self.tape.seq[idx[0]])
            sel = idx[max(0, from_id - first) : max(0, from_id - first) + limit]
        else:
            sel = idx[-limit:]
        items = []
        for i in sel.tolist():
            ev = orjson.loads(bytes(self._on_wall_clock(i, i + 1)))
            if (start is not None and ev["T"] < start) or (end is not None and ev["T"] > end):
                continue
            item = {k: ev[k] for k in ("a", "p", "q", "f", "l", "T", "m")}
            if "M" in ev:
                item["M"] = ev["M"]
            items.append(item)
        return orjson.dumps(items)

    def stats(self) -> dict[str, Any]:
        return {"messages": self.tape.messages, "played": self.played, "finished": self.finished,
                "recorded_rate": round(self.tape.rate, 1), "speed": self.speed,
                "started": self.clock.w0 is not None, "steps_left": len(self.step_times) - self.next_step}

