"""PostgreSQL binary COPY encoding, as pure functions.

Format: PostgreSQL's "COPY ... (FORMAT binary)" documentation. A file is a fixed
header, tuples, and a trailer; a tuple is an int16 field count and, per field, an int32
length (-1 for NULL) and the value in the type's binary send format:

- ``bigint``: big-endian int64;
- ``timestamptz``: int64 microseconds since 2000-01-01 00:00 UTC;
- ``numeric``: int16 ndigits, weight, sign, dscale, then ndigits base-10000 digits;
- ``text``: the UTF-8 bytes;
- ``jsonb``: a version byte (1) and the JSON text.

The exchange's numbers arrive as decimal strings; they are encoded digit by digit so no
value ever passes through a float.
"""

from __future__ import annotations

import re
import struct

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
TRAILER = struct.pack("!h", -1)

# 2000-01-01T00:00:00Z in Unix milliseconds: PostgreSQL's timestamp epoch.
PG_EPOCH_MS = 946_684_800_000
# PostgreSQL's timestamp range in microseconds since its epoch (MIN_TIMESTAMP, 4714-11-24
# BC, inclusive; END_TIMESTAMP, year 294277, exclusive). The server rejects anything
# outside it, which would fail the whole COPY rather than one row.
_MIN_TIMESTAMP_US = -211_813_488_000_000_000
_END_TIMESTAMP_US = 9_223_371_331_200_000_000

_NUMERIC_POS = 0x0000
_NUMERIC_NEG = 0x4000
_MAX_DSCALE = 0x3FFF
_MAX_WEIGHT = 0x7FFF  # numeric's weight is an int16: at most 131072 integer digits

_i16 = struct.Struct("!h")
_len_i64 = struct.Struct("!iq")  # a field's length (8) followed by an int64 value
_len_version = struct.Struct("!iB")  # a jsonb field's length and its version byte (1)
_i64_jsonb = struct.Struct("!iqiB")
_i64_i64_jsonb = struct.Struct("!iqiqiB")
NULL = struct.pack("!i", -1)


class EncodeError(ValueError):
    """A value that cannot be encoded for its column (bad decimal, out of range...)."""


def tuple_header(n_fields: int) -> bytes:
    return _i16.pack(n_fields)


def int8(value: int) -> bytes:
    """A ``bigint`` field (length prefix included)."""
    try:
        return _len_i64.pack(8, value)
    except struct.error as exc:
        raise EncodeError(f"bigint out of range: {value!r}") from exc


def timestamptz_ms(ms: int) -> bytes:
    """A ``timestamptz`` field from Unix epoch milliseconds (length prefix included)."""
    try:
        us = (ms - PG_EPOCH_MS) * 1000
        if _MIN_TIMESTAMP_US <= us < _END_TIMESTAMP_US:
            return _len_i64.pack(8, us)
    except (struct.error, TypeError) as exc:
        raise EncodeError(f"timestamp out of range: {ms!r}") from exc
    raise EncodeError(f"timestamp out of PostgreSQL's range: {ms!r}")


def text(value: str) -> bytes:
    """A ``text`` field (length prefix included). PostgreSQL text cannot hold NUL."""
    try:
        raw = value.encode()
    except (AttributeError, UnicodeEncodeError) as exc:  # not a str; lone surrogates
        raise EncodeError(f"not encodable as text: {value!r}") from exc
    if b"\x00" in raw:
        raise EncodeError(f"text with a NUL character: {value!r}")
    return len(raw).to_bytes(4, "big") + raw


# A JSON ``\u0000`` escape: the backslash before the ``u`` is not itself escaped, i.e. an
# even run of backslashes (escaped ones) precedes it.
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
_BACKSLASH = ord("\\")


def _check_jsonb(raw_json: bytes) -> None:
    # A backslash first, searched as an int (a bare memchr; a one-byte bytes needle costs
    # several times more), since Binance's payloads hold none; the six-byte needle alone
    # crawls through digit-heavy payloads (its last byte, "0", matches everywhere).
    if _BACKSLASH in raw_json and b"\\u0000" in raw_json and _NUL_ESCAPE.search(raw_json):
        raise EncodeError("JSON with a \\u0000 escape (jsonb cannot store NUL)")


def jsonb(raw_json: bytes) -> bytes:
    """A ``jsonb`` field holding ``raw_json`` as it is (the server parses and checks it).

    Valid JSON that ``jsonb`` refuses would fail the whole COPY, not one row; its likely
    case, a ``\\u0000`` escape (jsonb cannot hold NUL), is refused here instead.
    """
    _check_jsonb(raw_json)
    return _len_version.pack(len(raw_json) + 1, 1) + raw_json


def jsonb_head(raw_json: bytes) -> bytes:
    """``jsonb(raw_json)`` without the JSON itself: its length prefix and version byte, for a
    caller that joins the payload into the tuple directly (one copy of it fewer)."""
    _check_jsonb(raw_json)
    return _len_version.pack(len(raw_json) + 1, 1)


def int8_jsonb_head(value: int, raw_json: bytes) -> bytes:
    """``int8(value) + jsonb_head(raw_json)`` in one pack: a row's last id and its payload's head."""
    _check_jsonb(raw_json)
    try:
        return _i64_jsonb.pack(8, value, len(raw_json) + 1, 1)
    except struct.error as exc:
        raise EncodeError(f"bigint out of range: {value!r}") from exc


def int8_int8_jsonb_head(first: int, second: int, raw_json: bytes) -> bytes:
    """``int8(first) + int8(second) + jsonb_head(raw_json)`` in one pack (a depth row's ids)."""
    _check_jsonb(raw_json)
    try:
        return _i64_i64_jsonb.pack(8, first, 8, second, len(raw_json) + 1, 1)
    except struct.error as exc:
        raise EncodeError(f"bigint out of range: {(first, second)!r}") from exc


# The payload column is ``jsonb`` (the default) or ``json`` (``--payload-type``): the same
# JSON text, with jsonb's version byte in front or without it. One process writes one
# database, so the choice is made once at its start (``use_payload_type``) and the row
# encoders call these names.
PAYLOAD_TYPES = ("jsonb", "json")
_len = struct.Struct("!i")
_i64_json = struct.Struct("!iqi")
_i64_i64_json = struct.Struct("!iqiqi")


def json(raw_json: bytes) -> bytes:
    """A ``json`` field: the text as it is (the server checks its syntax, keeps it verbatim)."""
    return _len.pack(len(raw_json)) + raw_json


def json_head(raw_json: bytes) -> bytes:
    return _len.pack(len(raw_json))


def int8_json_head(value: int, raw_json: bytes) -> bytes:
    try:
        return _i64_json.pack(8, value, len(raw_json))
    except struct.error as exc:
        raise EncodeError(f"bigint out of range: {value!r}") from exc


def int8_int8_json_head(first: int, second: int, raw_json: bytes) -> bytes:
    try:
        return _i64_i64_json.pack(8, first, 8, second, len(raw_json))
    except struct.error as exc:
        raise EncodeError(f"bigint out of range: {(first, second)!r}") from exc


payload, payload_head, int8_payload_head, int8_int8_payload_head = jsonb, jsonb_head, int8_jsonb_head, \
    int8_int8_jsonb_head


def use_payload_type(kind: str) -> None:
    """Encode payload fields for a ``kind`` column (``jsonb`` or ``json``) from now on."""
    global payload, payload_head, int8_payload_head, int8_int8_payload_head
    if kind == "jsonb":
        payload, payload_head, int8_payload_head, int8_int8_payload_head = \
            jsonb, jsonb_head, int8_jsonb_head, int8_int8_jsonb_head
    elif kind == "json":
        payload, payload_head, int8_payload_head, int8_int8_payload_head = \
            json, json_head, int8_json_head, int8_int8_json_head
    else:
        raise ValueError(f"payload type must be one of {', '.join(PAYLOAD_TYPES)} (got {kind!r})")


def numeric(value: str) -> bytes:
    """A ``numeric`` field from a plain decimal string such as ``"-0.00100000"``.

    The display scale is the number of fractional digits written, so the stored value
    reads back exactly as sent (trailing zeros included).
    """
    if not isinstance(value, str):
        raise EncodeError(f"not a decimal string: {value!r}")
    if len(value) <= _SHORT_DECIMAL:
        field = _short_numeric(value)
        if field is not None:
            return field
    return _numeric(value)


# Prices and quantities are short: up to this many characters they take the one-int path.
_SHORT_DECIMAL = 30
_numeric_structs: dict[int, struct.Struct] = {}  # by ndigits: length, header, digits


def _short_numeric(value: str) -> bytes | None:
    """``numeric(value)`` through one ``int`` (a few divmods instead of a group per slice);
    None for anything but a plain decimal, which ``_numeric`` then refuses as it says."""
    s = value
    sign = _NUMERIC_POS
    first = s[:1]
    if first == "-" or first == "+":
        if first == "-":
            sign = _NUMERIC_NEG
        s = s[1:]
    int_part, _dot, frac_part = s.partition(".")
    digits = int_part + frac_part
    if not digits.isdigit() or not digits.isascii():
        return None
    dscale = len(frac_part)
    pad = -dscale % 4  # the fraction fills whole base-10000 digits
    n = int(digits) * 10**pad
    groups = []  # base-10000 digits, least significant first
    while n:
        n, g = divmod(n, 10000)
        groups.append(g)
    weight = len(groups) - 1 - (dscale + pad) // 4
    low = 0
    while low < len(groups) and groups[low] == 0:  # PostgreSQL stores no trailing zero digits
        low += 1
    kept = groups[:low - 1:-1] if low else groups[::-1]
    if not kept:
        weight, sign = 0, _NUMERIC_POS
    pack = _numeric_structs.get(len(kept))
    if pack is None:
        pack = _numeric_structs[len(kept)] = struct.Struct(f"!iHhHH{len(kept)}H")
    return pack.pack(8 + 2 * len(kept), len(kept), weight, sign, dscale, *kept)


def _numeric(value: str) -> bytes:
    """``numeric`` for any length: base-10000 digits cut from the string."""
    s = value
    sign = _NUMERIC_POS
    if s[:1] in ("-", "+"):
        if s[0] == "-":
            sign = _NUMERIC_NEG
        s = s[1:]
    int_part, dot, frac_part = s.partition(".")
    if not (int_part or frac_part) or not (int_part + frac_part).isdigit() or not s.isascii():
        raise EncodeError(f"not a plain decimal: {value!r}")
    if dot and not frac_part and not int_part:
        raise EncodeError(f"not a plain decimal: {value!r}")
    dscale = len(frac_part)
    if dscale > _MAX_DSCALE:
        raise EncodeError(f"too many fractional digits: {value!r}")
    int_part = int_part.lstrip("0")
    # Group into base-10000 digits aligned on the decimal point.
    lead = -len(int_part) % 4
    int_digits = ("0" * lead + int_part) if int_part else ""
    frac_digits = frac_part + "0" * (-len(frac_part) % 4)
    groups = [int(int_digits[i : i + 4]) for i in range(0, len(int_digits), 4)]
    weight = len(groups) - 1
    groups.extend(int(frac_digits[i : i + 4]) for i in range(0, len(frac_digits), 4))
    # PostgreSQL stores neither leading nor trailing zero digits.
    start = 0
    while start < len(groups) and groups[start] == 0:
        start += 1
    weight -= start
    end = len(groups)
    while end > start and groups[end - 1] == 0:
        end -= 1
    digits = groups[start:end]
    if not digits:
        weight, sign = 0, _NUMERIC_POS
    elif weight > _MAX_WEIGHT:
        raise EncodeError(f"too many integer digits: {value[:40]!r}...")
    # ndigits is unsigned on the wire (up to 32768 integer + 4096 fraction groups).
    body = struct.pack(f"!HhHH{len(digits)}H", len(digits), weight, sign, dscale, *digits)
    return len(body).to_bytes(4, "big") + body


def copy_file(rows: bytes) -> bytes:
    """A complete binary COPY stream from concatenated encoded tuples."""
    return b"".join((HEADER, rows, TRAILER))  # one copy of ``rows``, where ``+`` makes two


def tuple_offsets(rows: bytes) -> list[int]:
    """Start offset of every tuple in concatenated encoded tuples (and the end).

    Used only when the server refuses a batch: the batch is then split to isolate the
    offending rows, so one bad row cannot cost its neighbours.
    """
    out = []
    pos, end = 0, len(rows)
    while pos < end:
        out.append(pos)
        (n_fields,) = _i16.unpack_from(rows, pos)
        pos += 2
        for _ in range(n_fields):
            length = int.from_bytes(rows[pos : pos + 4], "big", signed=True)
            pos += 4 + max(length, 0)
    if pos != end:
        raise EncodeError("truncated tuple data")
    out.append(end)
    return out


_len_f64 = struct.Struct("!id")
_len_i32 = struct.Struct("!ii")
_TRUE = struct.pack("!ib", 1, 1)
_FALSE = struct.pack("!ib", 1, 0)


def float8(value: float) -> bytes:
    """A ``double precision`` field; NaN (an undefined statistic) becomes NULL."""
    return NULL if value != value else _len_f64.pack(8, value)


def int4(value: int) -> bytes:
    try:
        return _len_i32.pack(4, value)
    except struct.error as exc:
        raise EncodeError(f"integer out of range: {value!r}") from exc


def boolean(value: bool) -> bytes:
    return _TRUE if value else _FALSE
