"""The spool's on-disk format: versioned, checksummed, explicit (pure; no pickle).

A segment file starts with a header, ``MAGIC`` and a version (uint16 LE, then two
reserved bytes). Then records, each::

    uint32 LE  length of the body
    uint32 LE  zlib.crc32 of the body
    body       one Batch, field by field (below)

Body, little-endian: ``table`` (str), ``rows`` (int64), ``data``, ``event_ms`` (bytes),
``producer`` (str), ``incarnation``, ``seq`` (int64), ``kind`` (str), ``ids`` (bytes), then
a uint8 saying whether a Backfill follows: ``market``, ``symbol`` (str), ``from_id``,
``to_id`` (int64), ``from_ms``, ``to_ms`` (an optional int64: a uint8 flag, then the
value), ``detected_ms``, ``first_trade_ms``, ``last_trade_ms`` (int64), ``complete``
(uint8). A str is a uint32 length and UTF-8; bytes a uint32 length and the bytes.

Reading back runs no code from the file: a record either decodes into a Batch or is
refused (``RecordError``). Tests: tests/test_writer_spool.py.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from ingestor.wire.batching import Backfill, Batch

MAGIC = b"INGSPOOL"
VERSION = 1
HEADER = MAGIC + struct.pack("<HH", VERSION, 0)
RECORD_HEAD = struct.Struct("<II")  # body length, crc32
MAX_RECORD = 1 << 31  # a length past this is a corrupt header, not a record

_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")


class RecordError(ValueError):
    """A record (or segment header) that cannot be read back as written."""


def encode_batch(b: Batch) -> bytes:
    """A Batch as a record body."""
    parts = [_str(b.table), _I64.pack(b.rows), _bytes(b.data), _bytes(b.event_ms), _str(b.producer),
             _I64.pack(b.incarnation), _I64.pack(b.seq), _str(b.kind), _bytes(b.ids)]
    f = b.backfill
    if f is None:
        parts.append(_U8.pack(0))
    else:
        parts += [_U8.pack(1), _str(f.market), _str(f.symbol), _I64.pack(f.from_id), _I64.pack(f.to_id),
                  _opt(f.from_ms), _opt(f.to_ms), _I64.pack(f.detected_ms), _I64.pack(f.first_trade_ms),
                  _I64.pack(f.last_trade_ms), _U8.pack(1 if f.complete else 0)]
    return b"".join(parts)


def encode_record(b: Batch) -> bytes:
    """A whole record: length, checksum, body (written with one write call)."""
    body = encode_batch(b)
    return RECORD_HEAD.pack(len(body), zlib.crc32(body)) + body


@dataclass
class _Reader:
    buf: bytes | memoryview
    pos: int = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise RecordError("field runs past the end of its record")
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def u8(self) -> int:
        return int(_U8.unpack(self.take(1))[0])

    def i64(self) -> int:
        return int(_I64.unpack(self.take(8))[0])

    def bytes_(self) -> bytes:
        return self.take(_U32.unpack(self.take(4))[0])

    def str_(self) -> str:
        try:
            return self.bytes_().decode()
        except UnicodeDecodeError as exc:
            raise RecordError(f"bad text: {exc}") from None

    def opt(self) -> int | None:
        return self.i64() if self.u8() else None


def decode_batch(body: bytes | memoryview) -> Batch:
    """A record body back into its Batch; RecordError if it is not one."""
    r = _Reader(body)
    table, rows, data, event_ms = r.str_(), r.i64(), r.bytes_(), r.bytes_()
    producer, incarnation, seq, kind, ids = r.str_(), r.i64(), r.i64(), r.str_(), r.bytes_()
    flag = r.u8()
    backfill = None
    if flag == 1:
        market, symbol = r.str_(), r.str_()
        if market not in ("spot", "futures"):
            raise RecordError(f"unknown market {market!r}")
        backfill = Backfill(market, symbol, r.i64(), r.i64(), r.opt(), r.opt(), r.i64(), r.i64(), r.i64(),  # type: ignore[arg-type]
                            bool(r.u8()))
    elif flag != 0:
        raise RecordError(f"bad backfill flag {flag}")
    if r.pos != len(body):
        raise RecordError(f"{len(body) - r.pos} bytes left over in a record")
    if kind not in ("rows", "close", "backfill") or (kind == "backfill") != (backfill is not None):
        raise RecordError(f"bad kind {kind!r}")
    return Batch(table, rows, data, event_ms, producer, incarnation, seq, kind, ids, backfill)


@dataclass
class Segment:
    """What a segment file holds: the batches read back, and where reading stopped (the
    good prefix's length) with why, when it stopped before the end."""

    batches: list[Batch]
    good_bytes: int
    problem: str = ""  # "" (read to the end), or what is wrong from good_bytes on
    truncated: bool = False  # the problem is a record cut short at the end (a crash mid-write)


def read_segment(data: bytes) -> Segment:
    """Every record of a segment's bytes up to the first one that is not whole and correct."""
    if len(data) < len(HEADER):
        return Segment([], 0, "segment header cut short", truncated=True)
    if data[: len(MAGIC)] != MAGIC:
        return Segment([], 0, "not a spool segment of this format (an older version's, or not ours)")
    (version,) = struct.unpack_from("<H", data, len(MAGIC))
    if version != VERSION:
        return Segment([], 0, f"segment format version {version} (this one reads {VERSION})")
    view = memoryview(data)
    pos = len(HEADER)
    out: list[Batch] = []
    while pos < len(data):
        if pos + RECORD_HEAD.size > len(data):
            return Segment(out, pos, f"a record header cut short at byte {pos}", truncated=True)
        length, crc = RECORD_HEAD.unpack_from(data, pos)
        end = pos + RECORD_HEAD.size + length
        if length >= MAX_RECORD:
            return Segment(out, pos, f"an impossible record length {length} at byte {pos}")
        if end > len(data):
            return Segment(out, pos, f"a record cut short at byte {pos}", truncated=True)
        body = view[pos + RECORD_HEAD.size : end]
        if zlib.crc32(body) != crc:
            return Segment(out, pos, f"a record with a bad checksum at byte {pos}")
        try:
            out.append(decode_batch(body))
        except (RecordError, struct.error) as exc:
            return Segment(out, pos, f"a record that does not decode at byte {pos}: {exc}")
        pos = end
    return Segment(out, pos)


def _str(s: str) -> bytes:
    return _bytes(s.encode())


def _bytes(b: bytes) -> bytes:
    return _U32.pack(len(b)) + b


def _opt(v: int | None) -> bytes:
    return _U8.pack(0) if v is None else _U8.pack(1) + _I64.pack(v)
