"""Every real Binance payload in ``../shared/realdata`` into PostgreSQL, on both backends.

Stream events (aggTrade, depthUpdate, markPriceUpdate, forceOrder) go through
``FrameHandler``: combined frames exactly as the recorder received them via ``on_frame``,
raw payloads via ``on_payload``; a second handler takes every message the other way
(payload alone / an envelope built around it) and must produce the same bytes. REST
replies (depth snapshots, open interest) go through ``rows``. The batches are loaded
with binary COPY, and every stored row is compared with columns taken from the payload
here, independently of ``rows``: market, times, symbol, ids, side, the quantity as the
exchange's exact decimal text, and the payload itself (orjson-equal, and ``jsonb =``
the original bytes).

No real ``markPriceUpdate`` stream was recorded: the all-market array is built from the
real ``/fapi/v1/premiumIndex`` reply (521 symbols; same values, stream field names), and
the single event is the documentation example in ``doc_examples``.

At most ``CAP`` messages of each kind are taken from any one file (the hftbacktest USDⓈ-M
file has 6,551 diffs), so this runs in a few seconds per backend.
"""

from __future__ import annotations

import functools
import gzip
import re
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from ingestor.binance.streams import Market
from ingestor.sim.captures import Capture, event_type, read_capture
from ingestor.wire import copy_binary as cb
from ingestor.wire import rows
from ingestor.workers.frames import Batch, FrameHandler

from .conftest import REALDATA

HAVE_REALDATA = (REALDATA / "README.md").is_file()
pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not HAVE_REALDATA, reason=f"real captures not available at {REALDATA}"),
]

CAP = 5000  # messages of one kind taken from one file
KINDS = ("aggTrade", "depthUpdate", "markPriceUpdate", "forceOrder")
TABLE = {"aggTrade": "agg_trades", "depthUpdate": "depth_updates", "markPriceUpdate": "mark_prices",
         "forceOrder": "force_orders"}
UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
PREMIUM_INDEX = "danghungithp_funding-rate-binance-bot__premiumIndex.json"
# "<recv ts>: <frame>" (cryptofeed) or "<recv ts> <frame>" (hftbacktest).
_LINE_FRAME = re.compile(rb"\d+(?:\.\d+)?:? (\{.*)")


def files() -> list[Path]:
    if not HAVE_REALDATA:
        return []
    return sorted(p for p in REALDATA.rglob("*") if p.is_file() and p.name != "README.md")


@functools.cache
def capture(path: Path) -> Capture:
    return read_capture(path)


def received_envelopes(path: Path) -> list[bytes]:
    """The combined-stream frames of a recorder's file, as received (read without captures.py)."""
    raw = path.read_bytes()
    raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    out = []
    for line in raw.split(b"\n"):
        m = _LINE_FRAME.fullmatch(line.rstrip(b"\r"))
        if m and m[1].startswith(b'{"stream":'):
            out.append(m[1])
    return out


def envelope(stream: str, data: bytes) -> bytes:
    return b'{"stream":"' + stream.encode() + b'","data":' + data + b"}"


def ms(value: int) -> datetime:
    return UNIX_EPOCH + timedelta(milliseconds=value)


def canonical(raw: bytes | str) -> bytes:
    """Equal for equal JSON values (real payloads hold only strings, ints, bools, null)."""
    return orjson.dumps(orjson.loads(raw), option=orjson.OPT_SORT_KEYS)


# ------------------------------------------------------------------------ the messages


@dataclass(frozen=True, slots=True)
class Message:
    kind: str
    envelope: bytes  # the combined frame: as received where the recorder kept one, else built
    data: bytes  # the payload bytes (an array for !markPrice@arr)
    received_combined: bool


@dataclass
class Source:
    name: str
    market: Market
    messages: list[Message] = field(default_factory=list)


@functools.cache
def sources() -> tuple[Source, ...]:
    out = []
    for path in files():
        cap = capture(path)
        name = path.relative_to(REALDATA).as_posix()
        frames = [f for f in cap.frames if event_type(f) in KINDS]
        if not frames:
            continue
        assert cap.market is not None, name
        combined = [f for f in cap.frames if f.stream is not None and path.suffix != ".log"]
        as_received = received_envelopes(path) if combined else []
        assert len(as_received) == len(combined), name
        original = dict(zip(map(id, combined), as_received, strict=True))
        source, taken = Source(name, cap.market), Counter[str]()
        for frame in frames:
            kind = event_type(frame)
            taken[kind] += 1
            if taken[kind] > CAP:
                continue
            if id(frame) in original:
                assert frame.stream is not None
                env, received = original[id(frame)], True
                assert env == envelope(frame.stream, frame.data), "the envelope is Binance's exact shape"
            else:
                event = orjson.loads(frame.data)
                symbol = (event["o"]["s"] if kind == "forceOrder" else event["s"]).lower()
                stream = frame.stream or f"{symbol}@{kind}"
                env, received = envelope(stream, frame.data), False
            source.messages.append(Message(kind, env, frame.data, received))
        out.append(source)
    # The all-market mark price array, from the real premiumIndex reply's values.
    (body,) = [b for e, b in capture(REALDATA / PREMIUM_INDEX).rest_bodies if e.endswith("/premiumIndex")]
    items = [
        {"e": "markPriceUpdate", "E": x["time"], "s": x["symbol"], "p": x["markPrice"], "i": x["indexPrice"],
         "P": x["estimatedSettlePrice"], "r": x["lastFundingRate"], "T": x["nextFundingTime"]}
        for x in orjson.loads(body)
    ]
    array = orjson.dumps(items)
    out.append(Source("!markPrice@arr from " + PREMIUM_INDEX, "futures",
                      [Message("markPriceUpdate", envelope("!markPrice@arr", array), array, True)]))
    return tuple(out)


def expected_columns(table: str, market: Market, e: dict[str, Any]) -> tuple[Any, ...]:
    """A row's columns other than payload, from the event, in ``rows.TABLES`` order."""
    if table == "agg_trades":
        return (market, ms(e["E"]), ms(e["T"]), e["s"], e["a"])
    if table == "depth_updates":
        return (market, ms(e["E"]), e["s"], e["U"], e["u"])
    if table == "mark_prices":
        return (market, ms(e["E"]), e["s"])
    if table == "force_orders":
        o = e["o"]
        return (market, ms(e["E"]), ms(o["T"]), o["s"], o["S"], o["q"])
    raise AssertionError(table)


@dataclass
class Fed:
    """What one source's messages should become, worked out here from Binance's rules."""

    messages: Counter[str] = field(default_factory=Counter)
    stale: int = 0
    gaps: int = 0
    rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)  # table -> columns + payload
    event_ms: dict[str, list[int]] = field(default_factory=dict)
    originals: dict[str, list[bytes]] = field(default_factory=dict)  # table -> stored payload bytes


def expectation(source: Source) -> Fed:
    fed, last = Fed(), dict[tuple[str, str], int]()
    for msg in source.messages:
        parsed = orjson.loads(msg.data)
        is_array = isinstance(parsed, list)
        for e in parsed if is_array else [parsed]:
            fed.messages[e["e"]] += 1
            # An id at or behind the last one seen is a replay: not stored (handler.stale).
            if e["e"] in ("aggTrade", "depthUpdate"):
                key, new_id = (e["e"], e["s"]), (e["a"] if e["e"] == "aggTrade" else e["u"])
                prev = last.get(key)
                if prev is not None and new_id <= prev:
                    fed.stale += 1
                    continue
                if prev is not None:
                    if e["e"] == "aggTrade":
                        fed.gaps += e["a"] != prev + 1
                    elif "pu" in e:  # USDⓈ-M diffs chain by pu
                        fed.gaps += e["pu"] != prev
                    else:
                        fed.gaps += e["U"] > prev + 1
                last[key] = new_id
            table = TABLE[e["e"]]
            stored = orjson.dumps(e) if is_array else msg.data
            fed.rows.setdefault(table, []).append(
                expected_columns(table, source.market, e) + (canonical(stored),)
            )
            fed.event_ms.setdefault(table, []).append(e["E"])
            fed.originals.setdefault(table, []).append(stored)
    return fed


@dataclass
class Handled:
    handler: FrameHandler
    batches: list[Batch]

    def tables(self) -> dict[str, list[Batch]]:
        out: dict[str, list[Batch]] = {}
        for b in self.batches:
            out.setdefault(b.table, []).append(b)
        return out


def handle(source: Source, combined_as_received: bool) -> Handled:
    """Feed one source; ``combined_as_received``: frames go in the way they came (combined
    ones through on_frame, raw ones through on_payload), else the other way round."""
    batches: list[Batch] = []
    handler = FrameHandler(source.market, batches.append)
    for msg in source.messages:
        if msg.received_combined == combined_as_received:
            handler.on_frame(msg.envelope)
        else:
            handler.on_payload(msg.data)
    handler.flush(force=True)
    return Handled(handler, batches)


@functools.cache
def handled() -> tuple[tuple[Source, Fed, Handled], ...]:
    return tuple((s, expectation(s), handle(s, True)) for s in sources())


# ------------------------------------------------------------------------ database


@pytest.fixture
async def conn(db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(db_dsn, timeout=10)
    try:
        yield c
    finally:
        await c.close()


async def copy_batch(conn: asyncpg.Connection, table: str, n_rows: int, data: bytes) -> None:
    status = await conn.copy_to_table(
        table, source=memoryview(cb.copy_file(data)), columns=rows.TABLES[table], format="binary"
    )
    assert status == f"COPY {n_rows}"


def select_list(table: str) -> str:
    exact = {"quantity", "open_interest", "payload"}  # numeric and jsonb: read back as text
    return ", ".join(f"{c}::text AS {c}" if c in exact else c for c in rows.TABLES[table])


async def stored_rows(conn: asyncpg.Connection, table: str) -> list[tuple[Any, ...]]:
    got = await conn.fetch(f"SELECT {select_list(table)} FROM {table}")
    return [tuple(r)[:-1] + (canonical(r["payload"]),) for r in got]


def diff(expected: list[tuple[Any, ...]], stored: list[tuple[Any, ...]]) -> dict[str, list[Any]]:
    want, have = Counter(expected), Counter(stored)
    return {"missing": list((want - have).elements())[:3], "unexpected": list((have - want).elements())[:3]}


async def jsonb_equal_count(conn: asyncpg.Connection, table: str, originals: list[bytes]) -> int:
    """Pairs (original, stored row) with ``payload = original::jsonb``."""
    return int(await conn.fetchval(
        f"SELECT count(*) FROM unnest($1::text[]) AS o(j) JOIN {table} t ON t.payload = o.j::jsonb",
        [o.decode() for o in originals],
    ))


# ------------------------------------------------------------------------ tests


def test_every_kind_is_covered() -> None:
    kinds = Counter[str]()
    for _source, fed, _h in handled():
        kinds.update(fed.messages)
    assert set(kinds) == set(KINDS)
    assert kinds["forceOrder"] >= 42 and kinds["aggTrade"] >= 1910 and kinds["markPriceUpdate"] >= 521
    names = {s.name for s in sources()}
    assert {n for n in names if "hftbacktest" in n} == {
        "nkaz001_hftbacktest__examples-spot-btcusdt_20240808.gz",
        "nkaz001_hftbacktest__examples-usdm-btcusdt_20240808.gz",
    }
    assert sum(m.received_combined for s in sources() for m in s.messages) > 10_000


def test_on_frame_and_on_payload_make_the_same_rows() -> None:
    for source, fed, a in handled():
        b = handle(source, False)
        for h in (a, b):
            assert h.handler.rejected == {}, source.name
            assert h.handler.messages == dict(fed.messages), source.name
            assert h.handler.stale == fed.stale, source.name
            assert sum(h.handler.gaps.values()) == fed.gaps, source.name
        data = {t: b"".join(x.data for x in bs) for t, bs in a.tables().items() if t != "stream_gaps"}
        assert data == {t: b"".join(x.data for x in bs) for t, bs in b.tables().items() if t != "stream_gaps"}
        # Each batch reports its rows' event times, in order.
        for table, batches in a.tables().items():
            if table != "stream_gaps":
                times = [t for x in batches for t in memoryview(x.event_ms).cast("q")]
                assert times == fed.event_ms[table], (source.name, table)
                assert sum(x.rows for x in batches) == len(fed.rows[table])


async def test_stream_events_are_stored_exactly(conn: asyncpg.Connection) -> None:
    expected: dict[str, list[tuple[Any, ...]]] = {}
    originals: dict[str, list[bytes]] = {}
    per_source: dict[str, dict[str, int]] = {}
    n_gaps = 0
    for source, fed, h in handled():
        assert h.handler.rejected == {}, (source.name, h.handler.rejected)
        assert h.handler.stale == fed.stale and sum(h.handler.gaps.values()) == fed.gaps, source.name
        n_gaps += fed.gaps
        for batch in h.batches:
            await copy_batch(conn, batch.table, batch.rows, batch.data)
        for table, row_list in fed.rows.items():
            expected.setdefault(table, []).extend(row_list)
            originals.setdefault(table, []).extend(fed.originals[table])
        # Nothing dropped: every message of every kind is a row, bar replays (stale).
        stored = Counter[str]()
        for b in h.batches:
            stored[b.table] += b.rows
        per_source[source.name] = dict(stored)
        n_rows = sum(v for t, v in stored.items() if t != "stream_gaps")
        assert n_rows == sum(fed.messages.values()) - fed.stale, source.name
        assert stored["stream_gaps"] == fed.gaps
    assert set(expected) == set(TABLE.values())
    for table, want in expected.items():
        have = await stored_rows(conn, table)
        assert len(have) == len(want), (table, per_source)
        assert not any(diff(want, have).values()), (table, diff(want, have))
        same = Counter(canonical(o) for o in originals[table])
        assert await jsonb_equal_count(conn, table, originals[table]) == sum(c * c for c in same.values())
    assert await conn.fetchval("SELECT count(*) FROM stream_gaps") == n_gaps


async def test_force_order_quantity_is_the_exchange_text(conn: asyncpg.Connection) -> None:
    (source,) = [s for s in sources() if s.name.endswith("binance_force_orders_ws.log")]
    _s, fed, h = next(x for x in handled() if x[0] is source)
    assert len(source.messages) == 42
    for batch in h.batches:
        await copy_batch(conn, batch.table, batch.rows, batch.data)
    got = await conn.fetch("SELECT quantity::text AS q, side, symbol, payload::text AS p FROM force_orders")
    events = [orjson.loads(m.data) for m in source.messages]
    sent = sorted((e["o"]["q"], e["o"]["S"], e["o"]["s"]) for e in events)
    assert sorted((r["q"], r["side"], r["symbol"]) for r in got) == sent
    assert all(orjson.loads(r["p"])["o"]["q"] == r["q"] for r in got)


def rest_replies() -> tuple[list[tuple[str, Market, str, int, bytes]], list[tuple[str, Market, bytes]]]:
    """(file, market, symbol, time ms, body) per depth snapshot; (file, market, body) per
    open interest reply. A bare /depth body names no symbol (the doc example): not a row."""
    snapshots, open_interest = [], []
    for path in files():
        cap = capture(path)
        name = path.relative_to(REALDATA).as_posix()
        for snap in cap.snapshots:
            body = orjson.loads(snap.body)
            # USDⓈ-M replies carry the matching engine time T; Spot's none: when it arrived.
            time_ms = body["T"] if "T" in body else snap.recv_ns // 1_000_000
            snapshots.append((name, snap.market, snap.symbol, time_ms, snap.body))
        for endpoint, reply in cap.rest_bodies:
            if endpoint.endswith("/openInterest"):
                assert cap.market is not None
                open_interest.append((name, cap.market, reply))
    return snapshots, open_interest


async def test_rest_replies_are_stored_exactly(conn: asyncpg.Connection) -> None:
    snapshots, open_interest = rest_replies()
    assert len(snapshots) == 13 and len(open_interest) == 2  # README: 4 + 4 + 3 + 1 + 1; 1 real + 1 doc
    snapshot_rows = b"".join(rows.depth_snapshot(m, s, t, b) for _n, m, s, t, b in snapshots)
    await copy_batch(conn, "depth_snapshots", len(snapshots), snapshot_rows)
    oi_rows = b"".join(rows.open_interest(m, orjson.loads(b), b) for _n, m, b in open_interest)
    await copy_batch(conn, "open_interest", len(open_interest), oi_rows)

    want = [(m, ms(t), s, m, canonical(b)) for _n, m, s, t, b in snapshots]
    have = await stored_rows(conn, "depth_snapshots")
    assert not any(diff(want, have).values()), diff(want, have)
    assert len(have) == len(want)
    assert await jsonb_equal_count(conn, "depth_snapshots", [b for *_x, b in snapshots]) == len(snapshots)

    oi = [(market, orjson.loads(body), body) for _n, market, body in open_interest]
    want = [(m, ms(x["time"]), x["symbol"], x["openInterest"], canonical(b)) for m, x, b in oi]
    have = await stored_rows(conn, "open_interest")
    assert sorted(have) == sorted(want)
    assert ("futures", ms(1717514517019), "BTCUSDT", "80579.225") in [r[:4] for r in have]
    assert await jsonb_equal_count(conn, "open_interest", [b for _m, _x, b in oi]) == len(oi)
