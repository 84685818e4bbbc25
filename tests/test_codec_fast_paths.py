"""The socket worker's fast paths against the general code they replace.

``envelope_payload`` (the per-frame cut), the stream encoders built from cached prefixes and
joined packs (``rows.*`` and their ``*_parts``), ``Batcher.add_parts`` and the reordered
``SequenceTracker.trade`` must give exactly what the plain versions give: the same bytes,
the same refusals. The plain versions are written out here as they were before the fast
paths: ``split_envelope``, and tuples joined from ``copy_binary``'s one-field encoders.
Inputs: every real capture in ``../shared/realdata`` (where present), the documentation's
examples, and random or mutated frames and field values.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestor.binance.sequence import Gap, SequenceTracker
from ingestor.sim import encode as enc
from ingestor.wire import copy_binary as cb
from ingestor.wire import rows
from ingestor.wire.batching import Batch, Batcher
from ingestor.workers.frames import envelope_payload, split_envelope

from .conftest import DOCS_DATA, REALDATA

# What FrameHandler turns into a "fields" refusal: a fast path may raise any of these where
# the general one raises any other of them.
REFUSED = (KeyError, TypeError, ValueError, cb.EncodeError, OverflowError)


# ---- the general versions ------------------------------------------------------------------


def head(table: str, market: str) -> bytes:
    return cb.tuple_header(len(rows.TABLES[table])) + rows.MARKET_FIELD[market]  # type: ignore[index]


def plain_agg_trade(market: str, msg: dict[str, Any], payload: bytes) -> bytes:
    return b"".join((head("agg_trades", market), cb.timestamptz_ms(msg["E"]), cb.timestamptz_ms(msg["T"]),
                     cb.text(msg["s"]),
                     cb.int8(msg["a"]), plain_jsonb(payload)))


def plain_depth_update(market: str, msg: dict[str, Any], payload: bytes) -> bytes:
    return b"".join((head("depth_updates", market), cb.timestamptz_ms(msg["E"]), cb.text(msg["s"]),
                     cb.int8(msg["U"]), cb.int8(msg["u"]), plain_jsonb(payload)))


def plain_mark_price(market: str, msg: dict[str, Any], payload: bytes) -> bytes:
    return b"".join((head("mark_prices", market), cb.timestamptz_ms(msg["E"]), cb.text(msg["s"]),
                     plain_jsonb(payload)))


def plain_force_order(market: str, msg: dict[str, Any], payload: bytes) -> bytes:
    o = msg["o"]
    return b"".join((head("force_orders", market), cb.timestamptz_ms(msg["E"]), cb.timestamptz_ms(o["T"]),
                     cb.text(o["s"]), cb.text(o["S"]), cb.numeric(o["q"]), plain_jsonb(payload)))


def plain_jsonb(raw: bytes) -> bytes:
    if b"\\u0000" in raw and cb._NUL_ESCAPE.search(raw):
        raise cb.EncodeError("NUL")
    return (len(raw) + 1).to_bytes(4, "big") + b"\x01" + raw


def plain_trade(last: dict[str, tuple[int, int]], symbol: str, a: int, e_ms: int) -> tuple[bool, Gap | None]:
    prev = last.get(symbol)
    last[symbol] = (a, e_ms) if prev is None or a > prev[0] else prev
    if prev is None:
        return True, None
    if a <= prev[0]:
        return False, None
    if a == prev[0] + 1:
        return True, None
    return True, Gap(symbol, "aggTrade", prev[0] + 1, a - 1, prev[1], e_ms)


ENCODERS: dict[str, tuple[Callable[..., bytes], Callable[..., bytes]]] = {
    "aggTrade": (rows.agg_trade, plain_agg_trade),
    "depthUpdate": (rows.depth_update, plain_depth_update),
    "markPriceUpdate": (rows.mark_price, plain_mark_price),
    "forceOrder": (rows.force_order, plain_force_order),
}
PARTS = {"aggTrade": rows.agg_trade_parts, "depthUpdate": rows.depth_update_parts}


def outcome(fn: Callable[..., bytes], *args: Any) -> bytes | str:
    """The bytes, or "refused" for an error the frame handler counts as bad fields."""
    try:
        return fn(*args)
    except REFUSED:
        return "refused"


# ---- inputs --------------------------------------------------------------------------------


def docs_frames() -> list[bytes]:
    return [
        enc.envelope("btcusdt@aggTrade", (DOCS_DATA / "agg_trade_stream.json").read_bytes().strip()),
        enc.envelope("btcusdt@depth@100ms", (DOCS_DATA / "depth_update_stream.json").read_bytes().strip()),
        enc.envelope("btcusdt@depth@500ms", (DOCS_DATA / "ws_futures_depth_update.json").read_bytes().strip()),
        enc.envelope("!forceOrder@arr", (DOCS_DATA / "liquidation_stream.json").read_bytes().strip()),
        enc.envelope("!markPrice@arr@1s", b"[" + (DOCS_DATA / "mark_price_stream.json").read_bytes().strip() + b"]"),
    ]


def real_events() -> list[tuple[str, bytes, bytes | None]]:
    """(market, payload, combined frame as built from the capture) for every real stream event."""
    if not (REALDATA / "README.md").is_file():
        return []
    from ingestor.sim.captures import read_capture

    out: list[tuple[str, bytes, bytes | None]] = []
    for path in sorted(p for p in REALDATA.rglob("*") if p.is_file() and p.name != "README.md"):
        cap = read_capture(path)
        for f in cap.frames:
            out.append((cap.market or "futures", f.data, enc.envelope(f.stream, f.data) if f.stream else None))
    return out


REAL = real_events()
needs_realdata = pytest.mark.skipif(not REAL, reason=f"real captures not available at {REALDATA}")


def event_kind(obj: Any) -> str | None:
    return obj.get("e") if isinstance(obj, dict) else None


def expected_cut(frame: bytes) -> bytes | None:
    parts = split_envelope(frame)
    return None if parts is None else parts[1]


# ---- the envelope cut ----------------------------------------------------------------------


@pytest.mark.parametrize("frame", [
    *docs_frames(),
    b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade"}}',
    b'{"stream":"btcusdt@aggTrade","data": {"e":"aggTrade"} }',  # whitespace around the payload
    b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade"}}\r\n',  # trailing whitespace
    b'{"stream":"btcusdt@aggTrade","data":\n[1]\n}\n',
    b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade"} x}',  # payload ends in garbage
    b'{"stream":"btcusdt@aggTrade","data":}',
    b'{"stream":"btcusdt@aggTrade","data": }',
    b'{"stream":"btcusdt@aggTrade","data":5}',
    b'{"stream":"btcusdt@aggTrade","data":"}"}',
    b'{"stream":"\xc3\xa9","data":{}}',  # a non-ASCII name that is UTF-8: cut
    b'{"stream":"\xff","data":{}}',  # one that is not: refused
    b'{"stream":"x","data":{"s":"\xff"}}',  # non-ASCII in the payload only: cut
    b'{"stream":"x","data":{}}   \x0b',
    b'{"stream":"x","data":',
    b'{"stream":"x"',
    b'{"stream":"',
    b"",
    b"}",
    b'{"stream":"x","data":{}',
    b'{"stream":"x","data":\x0c{}\x0c}',
])
def test_cut_equals_split_envelope(frame: bytes) -> None:
    assert envelope_payload(frame) == expected_cut(frame)


@needs_realdata
def test_cut_equals_split_envelope_on_every_real_frame() -> None:
    frames = [f for _m, _p, f in REAL if f is not None]
    assert len(frames) > 100_000
    for frame in frames:
        assert envelope_payload(frame) == expected_cut(frame)


def mutate(frame: bytes, cuts: list[tuple[int, int, bytes]]) -> bytes:
    data = bytearray(frame)
    for pos, length, insert in cuts:
        p = pos % (len(data) + 1)
        data[p : p + length % 8] = insert
    return bytes(data)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(docs_frames()) - 1),
       st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 16),
                          st.binary(max_size=4) | st.sampled_from([b" ", b"\n", b"}", b"{", b"[", b"]", b'"',
                                                                   b'","data":', b"\xff", b"\xc3\xa9"])),
                max_size=3))
def test_cut_equals_split_envelope_on_mutated_frames(i: int, cuts: list[tuple[int, int, bytes]]) -> None:
    frame = mutate(docs_frames()[i], cuts)
    assert envelope_payload(frame) == expected_cut(frame)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_cut_equals_split_envelope_on_random_bytes(tail: bytes) -> None:
    for frame in (tail, b'{"stream":"' + tail, b'{"stream":"x","data":' + tail):
        assert envelope_payload(frame) == expected_cut(frame)


# ---- the encoders --------------------------------------------------------------------------


def check_encoders(market: str, obj: dict[str, Any], payload: bytes) -> None:
    fast, plain = ENCODERS[obj["e"]]
    want = outcome(plain, market, obj, payload)
    assert outcome(fast, market, obj, payload) == want, (obj, payload)
    if obj["e"] in PARTS:
        assert outcome(lambda *a: b"".join(PARTS[obj["e"]](*a)), market, obj, payload) == want


@needs_realdata
def test_encoders_give_the_general_bytes_on_every_real_event() -> None:
    seen: dict[str, int] = {}
    for market, payload, _frame in REAL:
        parsed = orjson.loads(payload)
        for obj, raw in ([(x, orjson.dumps(x)) for x in parsed] if isinstance(parsed, list) else [(parsed, payload)]):
            kind = event_kind(obj)
            if kind in ENCODERS:
                seen[kind] = seen.get(kind, 0) + 1
                check_encoders(market, obj, raw)
    assert seen.keys() == ENCODERS.keys()
    assert seen["aggTrade"] > 2000 and seen["depthUpdate"] > 10_000


def test_encoders_give_the_general_bytes_on_the_docs_examples() -> None:
    for frame in docs_frames():
        payload = expected_cut(frame)
        assert payload is not None
        parsed = orjson.loads(payload)
        for obj in parsed if isinstance(parsed, list) else [parsed]:
            check_encoders("futures", obj, orjson.dumps(obj) if isinstance(parsed, list) else payload)


ODD_VALUES = st.one_of(
    st.integers(-2**63 - 2, 2**63 + 2), st.sampled_from([0, 1, -1, 2**63 - 1, -2**63, 2**64, True, False]),
    st.floats(allow_nan=True), st.none(), st.text(max_size=6), st.sampled_from(["1", "0.5", "-1", "BTCUSDT", ""]),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(["aggTrade", "depthUpdate", "markPriceUpdate", "forceOrder"]),
       st.sampled_from(["spot", "futures", "other"]),
       st.dictionaries(st.sampled_from(["E", "s", "a", "U", "u", "o", "T", "S", "q", "x"]), ODD_VALUES, max_size=6),
       st.dictionaries(st.sampled_from(["s", "S", "q", "T"]), ODD_VALUES, max_size=4),
       st.sampled_from([b"{}", b'{"a":"\\u0000"}', b'{"a":"\\\\u0000"}', b'{"a":"\\\\\\u0000"}', b'"\\\\"',
                        b'{"p":"1.00000000"}']))
def test_encoders_refuse_what_the_general_ones_refuse(kind: str, market: str, fields: dict[str, Any],
                                                      order: dict[str, Any], payload: bytes) -> None:
    base: dict[str, Any] = {"e": kind, "E": 1_700_000_000_000, "T": 1_700_000_000_000, "s": "BTCUSDT", "a": 5,
                            "U": 1, "u": 2,
                            "o": {"s": "BTCUSDT", "S": "SELL", "q": "0.014", "T": 1_700_000_000_000}}
    msg = {**base, **fields}
    if isinstance(msg["o"], dict):
        msg["o"] = {**msg["o"], **order}
    check_encoders(market, msg, payload)


def test_a_new_symbol_is_encoded_and_cached() -> None:
    symbol = f"NEW{random.randrange(10**9)}USDT"
    msg = {"e": "aggTrade", "E": 1_700_000_000_000, "T": 1_700_000_000_000, "s": symbol, "a": 1}
    assert rows.agg_trade("spot", msg, b"{}") == plain_agg_trade("spot", msg, b"{}")
    assert rows.agg_trade("spot", msg, b"{}") == plain_agg_trade("spot", msg, b"{}")  # from the cache


def test_one_pack_heads_equal_the_one_field_encoders() -> None:
    for raw in (b"{}", b'{"a":"\\\\u0000"}', b"x" * 70_000):
        assert cb.jsonb_head(raw) + raw == cb.jsonb(raw) == plain_jsonb(raw)
        for v in (0, 1, -1, 2**63 - 1, -2**63, True):
            assert cb.int8_jsonb_head(v, raw) == cb.int8(v) + cb.jsonb_head(raw)
            assert cb.int8_int8_jsonb_head(v, 7, raw) == cb.int8(v) + cb.int8(7) + cb.jsonb_head(raw)
    for bad in (2**63, -2**63 - 1, 1.5, "1", None):
        with pytest.raises(cb.EncodeError):
            cb.int8_jsonb_head(bad, b"{}")  # type: ignore[arg-type]
        with pytest.raises(cb.EncodeError):
            cb.int8_int8_jsonb_head(1, bad, b"{}")  # type: ignore[arg-type]
    for refused in (cb.jsonb, cb.jsonb_head, lambda r: cb.int8_jsonb_head(1, r)):
        with pytest.raises(cb.EncodeError):
            refused(b'{"a":"\\u0000"}')


# ---- batching and the sequence ------------------------------------------------------------


def test_add_parts_makes_the_batches_add_makes() -> None:
    rnd = random.Random(5)
    whole: list[Batch] = []
    pieces: list[Batch] = []
    a = Batcher(whole.append, batch_rows=7, clock=lambda: 0.0)
    b = Batcher(pieces.append, batch_rows=7, clock=lambda: 0.0)
    for i in range(100):
        table = rnd.choice(("agg_trades", "depth_updates"))
        parts = tuple(rnd.randbytes(rnd.randint(0, 9)) for _ in range(rnd.randint(1, 5)))
        a.add(table, b"".join(parts), i)
        b.add_parts(table, parts, i) if i % 3 else b.add(table, b"".join(parts), i)
        assert a.pending_rows() == b.pending_rows()
    a.flush(force=True)
    b.flush(force=True)
    assert [(x.table, x.rows, x.data, x.event_ms) for x in whole] == [(x.table, x.rows, x.data, x.event_ms)
                                                                     for x in pieces]
    assert a.sent_rows == b.sent_rows and a.sent_batches == b.sent_batches
    assert sum(len(array("q", x.event_ms)) for x in pieces) == 100


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["A", "B"]), st.integers(-3, 40), st.integers(0, 10**6)), max_size=60))
def test_trade_sequence_as_before(events: list[tuple[str, int, int]]) -> None:
    tracker, last = SequenceTracker(), dict[str, tuple[int, int]]()
    for symbol, a, e_ms in events:
        assert tracker.trade(symbol, a, e_ms) == plain_trade(last, symbol, a, e_ms)
        assert tracker.positions("t")["t"] == last


# ---- numeric -------------------------------------------------------------------------------


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(["", "-", "+", "--", " "]), st.text("0123456789", max_size=16),
       st.sampled_from([".", "", "..", "e"]), st.text("0123456789", max_size=16) | st.text(max_size=3))
def test_short_numeric_equals_the_general_one(sign: str, int_part: str, dot: str, frac_part: str) -> None:
    value = sign + int_part + dot + frac_part
    assert outcome(cb.numeric, value) == outcome(cb._numeric, value)
    if len(value) <= cb._SHORT_DECIMAL and outcome(cb._numeric, value) != "refused":
        assert cb._short_numeric(value) == cb._numeric(value)  # the short path took it
