"""What a restarted producer carries on from must never skip a hole nobody recorded.

A socket worker's data batch carries the sequence positions it reached (``Delivery``
marks); once the writer acknowledges it and every batch before it, a successor is seeded
there. So the row recording a gap found before those positions must be handed on before
that batch: were it behind, an acknowledged data batch could make the positions past the
gap safe while the gap row was still in the dead worker's hands."""

from __future__ import annotations

import orjson

from ingestor.sim import encode as enc
from ingestor.supervisor import with_time_floor
from ingestor.wire import rows as R
from ingestor.wire.batching import Batch, Batcher
from ingestor.workers.frames import FrameHandler

from .test_unit_frames import ts
from .test_unit_frames import tuples as fields_of


def diff(first: int, final: int, e_ms: int) -> bytes:
    return orjson.dumps({"e": "depthUpdate", "E": e_ms, "s": "BTCUSDT", "U": first, "u": final,
                         "b": [["100.0", "1.0"]], "a": []})


def trade(a: int, e_ms: int) -> bytes:
    return orjson.dumps({"e": "aggTrade", "E": e_ms, "s": "BTCUSDT", "a": a, "p": "100.0", "q": "1.0",
                         "f": a, "l": a, "T": e_ms, "m": False, "M": True})


def test_a_gap_row_is_handed_on_before_the_data_batch_that_passes_the_gap() -> None:
    sent: list[Batch] = []
    handler = FrameHandler("spot", Batcher(sent.append, batch_rows=2))
    handler.on_payload(diff(1, 1, 1_000))
    handler.on_payload(diff(5, 5, 1_100))  # ids 2..4 never came: the second row fills the batch
    assert [b.table for b in sent] == ["stream_gaps", "depth_updates"]


def test_the_same_for_trades_across_tables() -> None:
    """A trade gap leads every batch after it, whatever its table: at a flush the trades'
    batch (whose mark passes the gap) would otherwise go first, having been started first."""
    sent: list[Batch] = []
    handler = FrameHandler("spot", Batcher(sent.append, batch_rows=3))
    handler.on_payload(trade(10, 1_000))
    handler.on_payload(trade(13, 1_010))  # 11..12 missing: an open gap row, a backfill follows
    handler.on_payload(diff(1, 1, 1_020))
    handler.on_payload(diff(2, 2, 1_030))
    handler.on_payload(diff(3, 3, 1_040))  # the depth batch is full
    assert [b.table for b in sent] == ["stream_gaps", "depth_updates"]
    handler.flush(force=True)
    assert [b.table for b in sent] == ["stream_gaps", "depth_updates", "agg_trades"]


def test_flush_hands_gap_rows_on_first_whatever_came_first() -> None:
    sent: list[Batch] = []
    handler = FrameHandler("spot", Batcher(sent.append, batch_rows=100))
    handler.on_payload(diff(1, 1, 1_000))
    handler.on_payload(diff(3, 3, 1_100))
    handler.flush(force=True)
    assert [b.table for b in sent] == ["stream_gaps", "depth_updates"]


def test_a_liquidation_stream_no_acknowledged_batch_placed_gets_its_gap_from_the_run_start() -> None:
    """A worker killed before any of its liquidations was acknowledged: its successor's time
    gap must start where the run did, not where the successor did (``demo --chaos`` found
    liquidations lost with no gap around them)."""

    positions = with_time_floor({"futures": {"t": {"BTCUSDT": (7, 900)}}}, {"futures"}, since_ms=1_000)
    assert positions["futures"]["t"] == {"BTCUSDT": (7, 900)}  # what was placed stays
    assert positions["futures"]["f"] == positions["futures"]["m"] == {"*": (1_000, 1_000)}
    sent: list[Batch] = []
    handler = FrameHandler("futures", Batcher(sent.append, batch_rows=100))
    handler.seed(positions["futures"], {"forceOrder"})
    handler.on_payload(enc.force_order(5_000, "BTCUSDT", "SELL", "0.014", "9910", "9910", 4_999))
    handler.flush(force=True)
    assert [b.table for b in sent] == ["stream_gaps", "force_orders"]
    (gap,) = fields_of(sent[0])
    cols = dict(zip(R.TABLES["stream_gaps"], gap, strict=True))
    assert cols["stream"] == b"forceOrder" and cols["from_time"] == ts(1_000) and cols["to_time"] == ts(5_000)
