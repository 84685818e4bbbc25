"""Unit tests of ``ingestor.workers.frames`` (envelope cut, FrameHandler) and
``ingestor.wire.batching`` (Batcher)."""

from __future__ import annotations

import struct
import time
from array import array
from pathlib import Path

import orjson
import pytest

from ingestor.sim import encode as enc
from ingestor.wire.batching import Batch, Batcher
from ingestor.wire.copy_binary import tuple_offsets
from ingestor.workers.frames import FrameHandler, split_envelope

DOCS = Path(__file__).resolve().parent / "data" / "binance_docs"
PG_EPOCH_MS = 946_684_800_000  # 2000-01-01 in Unix ms


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fields(row: bytes) -> list[bytes | None]:
    """One COPY tuple split into its fields' bytes (None for NULL), decoded by hand."""
    (n,) = struct.unpack_from("!h", row)
    pos = 2
    out: list[bytes | None] = []
    for _ in range(n):
        (length,) = struct.unpack_from("!i", row, pos)
        pos += 4
        if length < 0:
            out.append(None)
        else:
            out.append(row[pos : pos + length])
            pos += length
    assert pos == len(row)
    return out


def tuples(batch: Batch) -> list[list[bytes | None]]:
    offs = tuple_offsets(batch.data)
    assert len(offs) - 1 == batch.rows
    return [fields(batch.data[a:b]) for a, b in zip(offs, offs[1:], strict=False)]


def event_ms(batch: Batch) -> list[int]:
    a = array("q")
    a.frombytes(batch.event_ms)
    return a.tolist()


def ts(ms: int) -> bytes:
    return struct.pack("!q", (ms - PG_EPOCH_MS) * 1000)


def i8(v: int) -> bytes:
    return struct.pack("!q", v)


def jsonb(raw: bytes) -> bytes:
    return b"\x01" + raw


class Sink:
    def __init__(self) -> None:
        self.batches: list[Batch] = []

    def __call__(self, batch: Batch) -> None:
        self.batches.append(batch)

    def table(self, name: str) -> list[Batch]:
        return [b for b in self.batches if b.table == name]

    def rows(self, name: str) -> list[list[bytes | None]]:
        return [r for b in self.table(name) for r in tuples(b)]


def handler(market: str = "spot", **kw: object) -> tuple[FrameHandler, Sink]:
    sink = Sink()
    return FrameHandler(market, sink, **kw), sink  # type: ignore[arg-type]


def spot_trade(a: int, E: int = 1_700_000_000_000, s: str = "BTCUSDT") -> bytes:  # noqa: N803
    return enc.agg_trade_spot(E, s, a, "42000.01000000", "0.00100000", a * 10, a * 10 + 2, E - 1, True)


# -- split_envelope -------------------------------------------------------------------

def test_envelope_cut_gives_the_exact_payload() -> None:
    payload = spot_trade(5)
    assert split_envelope(enc.envelope("btcusdt@aggTrade", payload)) == ("btcusdt@aggTrade", payload)


def test_envelope_with_whitespace_around_the_payload() -> None:
    payload = (DOCS / "depth_update_stream.json").read_bytes().strip()
    frame = b'{"stream":"btcusdt@depth@500ms","data":\n ' + payload + b" \n}\r\n"
    assert split_envelope(frame) == ("btcusdt@depth@500ms", payload)


def test_envelope_with_an_array_payload() -> None:
    payload = enc.mark_price_array([enc.mark_price(1, "BTCUSDT", "1.0", "1.0", "1.0", "0.0001", 2)] * 2)
    assert split_envelope(enc.envelope("!markPrice@arr@1s", payload)) == ("!markPrice@arr@1s", payload)


def test_envelope_with_data_keys_inside_the_payload() -> None:
    payload = b'{"e":"x","data":{"stream":"y","data":[1,{"data":2}]},"k":"\\",\\"data\\":"}'
    assert split_envelope(b'{"stream":"s@aggTrade","data":' + payload + b"}") == ("s@aggTrade", payload)


@pytest.mark.parametrize("frame", [
    b"",
    b"not json",
    b'{"data":{"e":"aggTrade"},"stream":"btcusdt@aggTrade"}',  # order not Binance's
    b'{"stream": "btcusdt@aggTrade", "data": {}}',  # not Binance's spelling
    b'{"stream":"btcusdt@aggTrade"}',  # no data
    b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade"',  # truncated
    b'{"stream":"btcusdt@aggTrade","data":5}',  # payload not an object or array
    b'{"stream":"btcusdt@aggTrade","data":"x"}',
    b'{"stream":"btcusdt@aggTrade","data":}',  # empty payload
    b'{"stream":"\xff\xfe","data":{}}',  # stream name not UTF-8
    b'[{"stream":"x","data":{}}]',
])
def test_envelope_refused(frame: bytes) -> None:
    assert split_envelope(frame) is None


# -- FrameHandler: rows ---------------------------------------------------------------

def test_spot_agg_trade_row() -> None:
    h, sink = handler("spot")
    payload = spot_trade(5933014, E=1_700_000_000_123)
    h.on_frame(enc.envelope("btcusdt@aggTrade", payload))
    h.flush(force=True)
    [batch] = sink.batches
    assert (batch.table, batch.rows) == ("agg_trades", 1)
    assert sink.rows("agg_trades") == [[b"spot", ts(1_700_000_000_123), ts(1_700_000_000_122), b"BTCUSDT", i8(5933014),
                                        jsonb(payload)]]
    assert event_ms(batch) == [1_700_000_000_123]
    assert h.messages == {"aggTrade": 1}
    assert h.rejected == {}
    assert h.bytes_in == len(enc.envelope("btcusdt@aggTrade", payload))


def test_docs_payloads_raw_and_in_envelopes() -> None:
    """The documentation's examples (pretty-printed, with extra fields) stored byte for byte."""
    h, sink = handler("futures")
    trade = (DOCS / "agg_trade_stream.json").read_bytes()
    depth = (DOCS / "ws_futures_depth_update.json").read_bytes()
    mark = (DOCS / "mark_price_stream.json").read_bytes()
    liq = (DOCS / "liquidation_stream.json").read_bytes()
    h.on_payload(trade)
    h.on_frame(enc.envelope("btcusdt@depth@500ms", depth.strip()))
    h.on_frame(enc.envelope("btcusdt@markPrice", mark.strip()))
    h.on_payload(liq)
    h.flush(force=True)
    assert h.rejected == {}
    assert sink.rows("agg_trades") == [[b"futures", ts(123456789), ts(123456785), b"BTCUSDT", i8(5933014),
                                        jsonb(trade)]]
    assert sink.rows("depth_updates") == [
        [b"futures", ts(1571889248277), b"BTCUSDT", i8(390497796), i8(390497878), jsonb(depth.strip())],
    ]
    assert sink.rows("mark_prices") == [[b"futures", ts(1562305380000), b"BTCUSDT", jsonb(mark.strip())]]
    # quantity "0.014": one base-10000 digit 140, weight -1, positive, display scale 3.
    qty = struct.pack("!HhHHH", 1, -1, 0, 3, 140)
    assert sink.rows("force_orders") == [
        [b"futures", ts(1568014460893), ts(1568014460893), b"BTCUSDT", b"SELL", qty, jsonb(liq)],
    ]
    assert h.messages == {"aggTrade": 1, "depthUpdate": 1, "markPriceUpdate": 1, "forceOrder": 1}


def test_spot_depth_rows_and_gap() -> None:
    h, sink = handler("spot")
    first = enc.depth_update_spot(1000, "BTCUSDT", 157, 160, [("1.00", "2")], [])
    second = enc.depth_update_spot(1100, "BTCUSDT", 161, 165, [], [("1.01", "0")])
    third = enc.depth_update_spot(1300, "BTCUSDT", 170, 172, [], [])
    for p in (first, second, third):
        h.on_frame(enc.envelope("btcusdt@depth@100ms", p))
    h.flush(force=True)
    assert [r[3:5] for r in sink.rows("depth_updates")] == [[i8(157), i8(160)], [i8(161), i8(165)],
                                                            [i8(170), i8(172)]]
    [gap_row] = sink.rows("stream_gaps")
    # market, symbol, stream, from_id, to_id, from_time, to_time, detected_at, closed_how, closed_rows, closed_at
    assert gap_row[:7] == [b"spot", b"BTCUSDT", b"depth", i8(166), i8(169), ts(1100), ts(1300)]
    # Diffs cannot be fetched afterwards: the gap is closed as unrecoverable when it is found.
    assert gap_row[8] == b"unrecoverable" and gap_row[9] is None and gap_row[10] == gap_row[7]
    assert h.gaps == {"depth": 1}


def test_futures_depth_pu_gap_and_callback() -> None:
    seen: list[tuple[str, object]] = []
    h, sink = handler("futures", on_gap=lambda m, g, detected_ms: seen.append((m, g)))
    h.on_payload(enc.depth_update_futures(1000, 999, "ETHUSDT", 100, 160, 90, [], []))
    h.on_payload(enc.depth_update_futures(1250, 1249, "ETHUSDT", 161, 170, 160, [], []))
    h.on_payload(enc.depth_update_futures(1750, 1749, "ETHUSDT", 190, 200, 180, [], []))
    h.flush(force=True)
    assert len(sink.rows("depth_updates")) == 3
    [gap_row] = sink.rows("stream_gaps")
    assert gap_row[:7] == [b"futures", b"ETHUSDT", b"depth", i8(171), i8(180), ts(1250), ts(1750)]
    assert [(m, g.from_id, g.to_id) for m, g in seen] == [("futures", 171, 180)]  # type: ignore[attr-defined]


def test_trade_gap_row_and_stale_trades() -> None:
    h, sink = handler("spot")
    for a, e in ((100, 5000), (101, 5001), (101, 5001), (99, 4000), (105, 5900)):
        h.on_payload(spot_trade(a, E=e))
    h.flush(force=True)
    assert [r[4] for r in sink.rows("agg_trades")] == [i8(100), i8(101), i8(105)]
    assert h.stale == 2
    [gap_row] = sink.rows("stream_gaps")
    assert gap_row[:7] == [b"spot", b"BTCUSDT", b"aggTrade", i8(102), i8(104), ts(5001), ts(5900)]
    assert gap_row[8] == b"open" and gap_row[10] is None  # open until the backfill closes it
    assert h.messages == {"aggTrade": 5}


def test_stale_depth_is_counted_not_stored() -> None:
    h, sink = handler("futures")
    p = enc.depth_update_futures(1000, 999, "BTCUSDT", 100, 160, 90, [], [])
    h.on_payload(p)
    h.on_payload(p)
    h.flush(force=True)
    assert len(sink.rows("depth_updates")) == 1
    assert h.stale == 1


# -- symbol filter --------------------------------------------------------------------

def mark(E: int, s: str) -> str:  # noqa: N803
    return enc.mark_price(E, s, "11794.15000000", "11784.62659091", "11784.25641265", "0.00038167", 1562306400000)


def test_symbol_filter_on_mark_price_array() -> None:
    h, sink = handler("futures", symbols=frozenset({"BTCUSDT", "ETHUSDT"}))
    items = [mark(10, "BTCUSDT"), mark(10, "XRPUSDT"), mark(10, "ETHUSDT"), mark(10, "DOGEUSDT")]
    h.on_frame(enc.envelope("!markPrice@arr@1s", enc.mark_price_array(items)))
    h.flush(force=True)
    rows = sink.rows("mark_prices")
    assert [r[2] for r in rows] == [b"BTCUSDT", b"ETHUSDT"]
    # Each element is stored on its own, with the same values as sent.
    assert [orjson.loads(r[3][1:]) for r in rows] == [orjson.loads(items[0]), orjson.loads(items[2])]  # type: ignore[index]
    assert h.messages == {"markPriceUpdate": 4}
    assert h.rejected == {}


def test_no_filter_keeps_every_symbol() -> None:
    h, sink = handler("futures")
    h.on_payload(enc.mark_price_array([mark(10, "BTCUSDT"), mark(10, "XRPUSDT")]))
    h.flush(force=True)
    assert [r[2] for r in sink.rows("mark_prices")] == [b"BTCUSDT", b"XRPUSDT"]


def test_symbol_filter_on_force_orders() -> None:
    h, sink = handler("futures", symbols=frozenset({"BTCUSDT"}))
    h.on_frame(enc.envelope("!forceOrder@arr", enc.force_order(1, "XRPUSDT", "BUY", "10", "0.5", "0.5", 1)))
    h.on_frame(enc.envelope("!forceOrder@arr", enc.force_order(2, "BTCUSDT", "SELL", "0.014", "9910", "9910", 2)))
    h.flush(force=True)
    assert [(r[3], r[4]) for r in sink.rows("force_orders")] == [(b"BTCUSDT", b"SELL")]
    assert h.messages == {"forceOrder": 2}


def test_one_bad_array_element_costs_only_itself() -> None:
    h, sink = handler("futures")
    items = [mark(10, "BTCUSDT"), '{"e":"markPriceUpdate","E":10}', '{"e":"kline"}', "7", mark(10, "ETHUSDT")]
    h.on_payload(("[" + ",".join(items) + "]").encode())
    h.flush(force=True)
    assert [r[2] for r in sink.rows("mark_prices")] == [b"BTCUSDT", b"ETHUSDT"]
    assert h.rejected == {"fields": 1, "unknown_event": 2}


# -- malformed input ------------------------------------------------------------------

GOOD_TRADE = spot_trade(1).decode()


@pytest.mark.parametrize(("via", "data", "reason"), [
    ("frame", b"not json", "envelope"),
    ("frame", b"", "envelope"),
    ("frame", b"5", "envelope"),
    ("frame", b'"a string"', "envelope"),
    ("frame", b'{"stream":"btcusdt@aggTrade","data":' + GOOD_TRADE[:-5].encode(), "envelope"),  # truncated
    ("frame", b'{"stream":"btcusdt@aggTrade","data":' + GOOD_TRADE.encode(), "json"),  # envelope brace lost
    ("frame", b'{"stream":"btcusdt@aggTrade","data":' + GOOD_TRADE[:-5].encode() + b"}", "json"),
    ("frame", b'{"stream":"btcusdt@aggTrade","data":' + GOOD_TRADE.encode() + b',"x":1}', "json"),
    ("frame", b'{"stream":"\xff","data":' + GOOD_TRADE.encode() + b"}", "envelope"),
    ("frame", b'{"stream":"btcusdt@aggTrade","data":{"e":"a\xffb"}}', "json"),  # not UTF-8
    ("frame", b'{"stream":"btcusdt@kline_1m","data":{"e":"kline","E":1,"s":"BTCUSDT"}}', "unknown_event"),
    ("payload", b"not json", "json"),
    ("payload", b'{"e":"aggTrade","E":1,', "json"),
    ("payload", b"", "json"),
    ("payload", b"5", "fields"),
    ("payload", b'"aggTrade"', "fields"),
    ("payload", b"null", "fields"),
    ("payload", b"true", "fields"),
    ("payload", b"{}", "fields"),  # no "e"
    ("payload", b'{"e":"trade","E":1}', "unknown_event"),
    ("payload", b'{"e":["aggTrade"]}', "unknown_event"),
    ("payload", b'{"e":null}', "unknown_event"),
    ("payload", b'[1,"x",null]', "unknown_event"),
    # Missing fields.
    ("payload", b'{"e":"aggTrade","E":1,"s":"BTCUSDT"}', "fields"),
    ("payload", b'{"e":"aggTrade","s":"BTCUSDT","a":1}', "fields"),
    ("payload", b'{"e":"depthUpdate","E":1,"s":"BTCUSDT","u":5}', "fields"),
    ("payload", b'{"e":"forceOrder","E":1}', "fields"),
    ("payload", b'{"e":"forceOrder","E":1,"o":{"s":"BTCUSDT","S":"SELL","q":"1"}}', "fields"),
    ("payload", b'{"e":"markPriceUpdate","E":1}', "fields"),
    # Wrong types.
    ("payload", b'{"e":"aggTrade","E":"1","s":"BTCUSDT","a":1}', "fields"),
    ("payload", b'{"e":"aggTrade","E":1,"s":"BTCUSDT","a":"1"}', "fields"),
    ("payload", b'{"e":"aggTrade","E":1,"s":5,"a":1}', "fields"),
    ("payload", b'{"e":"aggTrade","E":1.5,"s":"BTCUSDT","a":1}', "fields"),
    ("payload", b'{"e":"aggTrade","E":1,"s":"BTCUSDT","a":99999999999999999999}', "fields"),
    ("payload", b'{"e":"depthUpdate","E":1,"s":"BTCUSDT","U":1.0,"u":2}', "fields"),
    ("payload", b'{"e":"forceOrder","E":1,"o":["BTCUSDT"]}', "fields"),
    ("payload", b'{"e":"forceOrder","E":1,"o":{"s":"BTCUSDT","S":"SELL","q":"lots","T":1}}', "fields"),
    ("payload", b'{"e":"forceOrder","E":1,"o":"BTCUSDT"}', "fields"),
    ("payload", b'{"e":"markPriceUpdate","E":1,"s":["BTCUSDT"]}', "fields"),
    ("payload", b'{"e":"markPriceUpdate","E":1,"s":{"a":1}}', "fields"),
])
def test_malformed_input_is_counted_and_never_raises(via: str, data: bytes, reason: str) -> None:
    h, sink = handler("futures", symbols=frozenset({"BTCUSDT"}))
    (h.on_frame if via == "frame" else h.on_payload)(data)
    h.flush(force=True)
    n = 3 if data == b'[1,"x",null]' else 1
    assert h.rejected == {reason: n}
    assert sink.batches == []
    assert h.batcher.pending_rows() == 0


def test_a_rejected_event_does_not_move_the_sequence() -> None:
    h, sink = handler("spot")
    h.on_payload(spot_trade(1, E=100))
    h.on_payload(b'{"e":"aggTrade","E":"200","s":"BTCUSDT","a":2}')
    h.on_payload(spot_trade(3, E=300))
    h.flush(force=True)
    assert h.rejected == {"fields": 1}
    [gap_row] = sink.rows("stream_gaps")
    assert gap_row[3:7] == [i8(2), i8(2), ts(100), ts(300)]


def test_a_depth_event_with_a_bad_pu_does_not_move_the_sequence() -> None:
    h, sink = handler("futures")
    h.on_payload(enc.depth_update_futures(1000, 999, "BTCUSDT", 100, 160, 90, [], []))
    h.on_payload(b'{"e":"depthUpdate","E":1100,"T":1099,"s":"BTCUSDT","U":161,"u":170,"pu":"160","b":[],"a":[]}')
    h.on_payload(enc.depth_update_futures(1200, 1199, "BTCUSDT", 171, 180, 170, [], []))
    h.flush(force=True)
    assert h.rejected == {"fields": 1}
    assert [r[4] for r in sink.rows("depth_updates")] == [i8(160), i8(180)]
    # The rejected event is the hole: 161..170.
    [gap_row] = sink.rows("stream_gaps")
    assert gap_row[3:7] == [i8(161), i8(170), ts(1000), ts(1200)]


def test_rejects_keep_counting_by_reason() -> None:
    h, _ = handler("spot")
    for data in (b"x", b"y", b'{"stream":"a","data":{"e":"z"}}'):
        h.on_frame(data)
    h.on_payload(b"{}")
    assert h.rejected == {"envelope": 2, "unknown_event": 1, "fields": 1}


# -- batching -------------------------------------------------------------------------

def test_batches_by_size() -> None:
    h, sink = handler("spot", batch_rows=3, batch_age_s=1e9, clock=Clock())
    for a in range(1, 8):
        h.on_payload(spot_trade(a, E=1000 + a))
    assert [b.rows for b in sink.batches] == [3, 3]
    assert h.batcher.pending_rows() == 1
    h.flush()  # not old enough
    assert len(sink.batches) == 2
    h.flush(force=True)
    assert [b.rows for b in sink.batches] == [3, 3, 1]
    assert [event_ms(b) for b in sink.batches] == [[1001, 1002, 1003], [1004, 1005, 1006], [1007]]
    assert [[r[4] for r in tuples(b)] for b in sink.batches] == [[i8(1), i8(2), i8(3)], [i8(4), i8(5), i8(6)],
                                                                 [i8(7)]]
    assert h.batcher.sent_rows == {"agg_trades": 7}
    assert h.batcher.sent_batches == 3


def test_batches_by_age() -> None:
    clock = Clock(100.0)
    h, sink = handler("spot", batch_rows=1000, batch_age_s=0.5, clock=clock)
    h.on_payload(spot_trade(1))
    clock.now = 100.3
    h.on_payload(spot_trade(2))
    clock.now = 100.49
    h.flush()
    assert sink.batches == []
    clock.now = 100.5  # the oldest row is 0.5 s old
    h.flush()
    assert [b.rows for b in sink.batches] == [2]
    # The next batch's age counts from its own first row.
    clock.now = 200.0
    h.on_payload(spot_trade(3))
    clock.now = 200.4
    h.flush()
    assert len(sink.batches) == 1
    clock.now = 200.5
    h.flush()
    assert [b.rows for b in sink.batches] == [2, 1]


def test_force_flush_sends_every_table_once() -> None:
    h, sink = handler("futures", batch_rows=100, clock=Clock())
    h.on_payload(enc.agg_trade_futures(5, "BTCUSDT", 1, "1.0", "1", 1, 1, 5, False))
    h.on_payload(enc.depth_update_futures(6, 6, "BTCUSDT", 1, 2, 0, [], []))
    h.on_payload(enc.agg_trade_futures(7, "BTCUSDT", 2, "1.0", "1", 2, 2, 7, False))
    h.flush(force=True)
    assert [(b.table, b.rows, event_ms(b)) for b in sink.batches] == [
        ("agg_trades", 2, [5, 7]), ("depth_updates", 1, [6]),
    ]
    h.flush(force=True)  # nothing left
    assert len(sink.batches) == 2


def test_batcher_directly() -> None:
    clock = Clock(10.0)
    out: list[Batch] = []
    b = Batcher(out.append, batch_rows=2, batch_age_s=1.0, producer="shard-1", clock=clock)
    r1, r2, r3 = b"\x00\x00", b"\x00\x01\xff\xff\xff\xff", b"\x00\x01\x00\x00\x00\x01x"
    b.add("t", r1, 1)
    b.add("u", r3, 3)
    b.add("t", r2, 2)
    assert len(out) == 1
    assert (out[0].table, out[0].rows, out[0].data, event_ms(out[0]), out[0].producer) == (
        "t", 2, r1 + r2, [1, 2], "shard-1")
    assert tuple_offsets(out[0].data) == [0, 2, 8]
    assert b.pending_rows() == 1
    clock.now = 11.0
    b.flush()
    assert [(x.table, x.data) for x in out] == [("t", r1 + r2), ("u", r3)]
    assert b.pending_rows() == 0
    assert b.sent_rows == {"t": 2, "u": 1}
    assert b.sent_batches == 2


def test_a_shared_batcher_is_used_as_given() -> None:
    out: list[Batch] = []
    shared = Batcher(out.append, batch_rows=2)
    spot = FrameHandler("spot", shared, batch_rows=1000)
    futures = FrameHandler("futures", shared, batch_rows=1000)
    assert spot.batcher is shared and futures.batcher is shared
    spot.on_payload(spot_trade(1))
    futures.on_payload(enc.agg_trade_futures(2, "BTCUSDT", 1, "1.0", "1", 1, 1, 2, False))
    [batch] = out
    assert [r[0] for r in tuples(batch)] == [b"spot", b"futures"]


# -- streams without ids: duplicates by event time, gaps by time -----------------------

def liquidation(E: int, s: str = "BTCUSDT") -> bytes:  # noqa: N803
    return enc.force_order(E, s, "SELL", "0.014", "9910", "9910", E - 2)


def test_mark_prices_and_liquidations_seen_twice_are_stored_once() -> None:
    # A rotated connection's overlap delivers the same arrays and events on both connections.
    h, sink = handler("futures")
    for _ in range(2):
        h.on_frame(enc.envelope("!markPrice@arr@1s", enc.mark_price_array([mark(10, "BTCUSDT"), mark(10, "XRPUSDT")])))
        h.on_frame(enc.envelope("!forceOrder@arr", liquidation(20)))
    h.on_frame(enc.envelope("!markPrice@arr@1s", enc.mark_price_array([mark(11, "BTCUSDT")])))
    h.flush(force=True)
    assert [(r[1], r[2]) for r in sink.rows("mark_prices")] == [(ts(10), b"BTCUSDT"), (ts(10), b"XRPUSDT"),
                                                               (ts(11), b"BTCUSDT")]
    assert len(sink.rows("force_orders")) == 1
    assert h.stale == 3


def test_a_lost_connection_leaves_a_time_gap_for_streams_without_ids() -> None:
    h, sink = handler("futures")
    h.on_frame(enc.envelope("!markPrice@arr@1s", enc.mark_price_array([mark(1000, "BTCUSDT")])))
    h.on_frame(enc.envelope("!forceOrder@arr", liquidation(1500)))
    h.connection_lost({"markPrice", "forceOrder"})
    h.connection_lost({"markPrice"})  # again before anything came: still the one gap
    h.on_frame(enc.envelope("!markPrice@arr@1s", enc.mark_price_array([mark(4000, "BTCUSDT")])))
    h.flush(force=True)
    [gap] = sink.rows("stream_gaps")
    # market, symbol, stream, from_id, to_id, from_time, to_time, detected_at, closed_how, closed_rows, closed_at
    assert gap[:7] == [b"futures", b"*", b"markPrice", None, None, ts(1000), ts(4000)]
    assert gap[8] == b"unrecoverable"
    # The liquidation stream's gap stays open until it flows again, or the worker stops.
    h.close_time_gaps()
    h.flush(force=True)
    gaps = sink.rows("stream_gaps")
    assert [g[2] for g in gaps] == [b"markPrice", b"forceOrder"] and gaps[1][5] == ts(1500)


def test_a_successor_carries_on_from_the_positions_of_a_dead_worker() -> None:
    dead, _ = handler("futures")
    for a in (100, 101, 102):
        dead.on_payload(spot_trade(a, E=5000 + a, s="ETHUSDT"))
    dead.on_frame(enc.envelope("!markPrice@arr@1s", enc.mark_price_array([mark(6000, "ETHUSDT")])))
    positions = dead.seq.positions()
    seen: list[tuple[int, int, int]] = []
    h, sink = handler("futures", on_gap=lambda m, g, d: seen.append((g.from_id, g.to_id, d)))
    h.seed(positions, {"markPrice"})
    h.on_payload(spot_trade(102, E=5102, s="ETHUSDT"))  # delivered to both: not stored twice
    h.on_payload(spot_trade(106, E=5106, s="ETHUSDT"))  # 103-105 died with the predecessor
    h.on_frame(enc.envelope("!markPrice@arr@1s", enc.mark_price_array([mark(6000, "ETHUSDT"), mark(9000, "ETHUSDT")])))
    h.flush(force=True)
    assert [r[4] for r in sink.rows("agg_trades")] == [i8(106)]
    assert [(a, b) for a, b, _ in seen] == [(103, 105)]
    assert [(r[2], r[5], r[6]) for r in sink.rows("stream_gaps")] == [(b"aggTrade", ts(5102), ts(5106)),
                                                                      (b"markPrice", ts(6000), ts(9000))]
    assert [r[1] for r in sink.rows("mark_prices")] == [ts(9000)]


# -- implausible ids and times: rejected, counted, one frame each ----------------------

def test_a_bogus_trade_id_costs_one_frame_and_is_counted() -> None:
    h, sink = handler("spot")
    for i, a in enumerate((100, 101, 2**62, 102, 103)):
        E = 1_700_000_000_000 + i  # noqa: N806
        h.on_frame(enc.envelope("btcusdt@aggTrade", enc.agg_trade_spot(E, "BTCUSDT", a, "42000.01", "0.001", 7, 7,
                                                                       E - 1, True)))
    h.flush(force=True)
    assert [r[4] for r in sink.rows("agg_trades")] == [i8(100), i8(101), i8(102), i8(103)]
    assert h.rejected == {"implausible_id": 1}
    assert h.stale == 0 and sink.rows("stream_gaps") == [] and h.gaps == {}


def test_a_bogus_depth_id_costs_one_frame_and_is_counted() -> None:
    h, sink = handler("futures")
    h.on_payload(enc.depth_update_futures(1000, 999, "BTCUSDT", 100, 160, 90, [], []))
    h.on_payload(enc.depth_update_futures(1100, 1099, "BTCUSDT", 161, 2**62, 160, [], []))
    h.on_payload(enc.depth_update_futures(1200, 1199, "BTCUSDT", 161, 170, 160, [], []))
    h.flush(force=True)
    assert [r[4] for r in sink.rows("depth_updates")] == [i8(160), i8(170)]
    assert h.rejected == {"implausible_id": 1} and sink.rows("stream_gaps") == []


def test_a_mark_price_far_in_the_future_costs_itself_not_the_array_nor_the_stream() -> None:
    h, sink = handler("futures")
    now = int(time.time() * 1000)
    h.on_payload(enc.mark_price_array([mark(now - 1000, "BTCUSDT"), mark(now - 1000, "ETHUSDT")]))
    h.on_payload(enc.mark_price_array([mark(now + 10**9, "BTCUSDT"), mark(now, "ETHUSDT")]))
    h.on_payload(enc.mark_price_array([mark(now, "BTCUSDT")]))
    h.on_frame(enc.envelope("!forceOrder@arr", liquidation(now + 10**9)))
    h.on_frame(enc.envelope("!forceOrder@arr", liquidation(now)))
    h.flush(force=True)
    assert [(r[1], r[2]) for r in sink.rows("mark_prices")] == [
        (ts(now - 1000), b"BTCUSDT"), (ts(now - 1000), b"ETHUSDT"), (ts(now), b"ETHUSDT"), (ts(now), b"BTCUSDT")]
    assert [r[1] for r in sink.rows("force_orders")] == [ts(now)]
    assert h.rejected == {"implausible_time": 2}


def test_gaps_are_counted_per_stream() -> None:
    h, _ = handler("spot")
    for a in (1, 3, 5, 6):
        h.on_payload(spot_trade(a))
    h.on_payload(enc.depth_update_spot(1000, "BTCUSDT", 1, 2, [], []))
    h.on_payload(enc.depth_update_spot(1001, "BTCUSDT", 5, 6, [], []))
    h.connection_lost({"markPrice"})
    h.close_time_gaps()
    assert h.gaps == {"aggTrade": 2, "depth": 1, "markPrice": 1}
