"""The binary COPY encoders against real PostgreSQL (TimescaleDB server and embedded plain).

Each property draws its values with hypothesis (``EXAMPLES`` test cases of a list each),
then loads all of them with ONE binary COPY into a temp table ``(i bigint, v <type>)``
and compares every row with an oracle that does not use the encoder (Python's ``Decimal``
and ``datetime``, PostgreSQL's own text output, orjson). A mismatch names the exact
input, so no shrinking is needed. The drawn values are cached per module, so both
backends check the same values.

The unit tests at the end need no database: what each encoder refuses, always as
``EncodeError`` (``FrameHandler`` skips such a frame; any other exception would escape it).
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestor.wire import copy_binary as cb
from ingestor.workers.frames import FrameHandler

EXAMPLES = 200  # hypothesis test cases per property; each draws a list of values

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# PostgreSQL's timestamptz range in Unix ms: 4714-11-24 00:00 BC .. 294276-12-31 23:59:59.999.
PG_MIN_MS = -210_866_803_200_000
PG_MAX_MS = 9_224_318_015_999_999
EXCHANGE_MIN_MS = 1_483_228_800_000  # 2017-01-01, before Binance opened
EXCHANGE_MAX_MS = 4_102_444_800_000  # 2100-01-01
PY_MIN_MS, PY_MAX_MS = -62_135_596_800_000, 253_402_300_799_999  # datetime's years 1..9999


def _drawn(strategy: st.SearchStrategy[Any], examples: int = EXAMPLES, per_case: int = 20) -> list[Any]:
    """Every value hypothesis draws over ``examples`` test cases (lists of 1..per_case values)."""
    out: list[Any] = []

    @settings(max_examples=examples, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(strategy, min_size=1, max_size=per_case))
    def draw(values: list[Any]) -> None:
        out.extend(values)

    draw()
    return out


@pytest.fixture
async def conn(db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(db_dsn, timeout=10)
    await c.execute("SET TimeZone = 'UTC'")
    try:
        yield c
    finally:
        await c.close()


async def copy_values(conn: asyncpg.Connection, sql_type: str, fields: list[bytes]) -> None:
    """One binary COPY of rows ``(i, fields[i])`` into a fresh temp table ``t``."""
    await conn.execute(f"DROP TABLE IF EXISTS t; CREATE TEMP TABLE t (i bigint, v {sql_type})")
    body = b"".join(cb.tuple_header(2) + cb.int8(i) + field for i, field in enumerate(fields))
    # asyncpg takes a bytes source for a file *path* (os.fspath): hand it a memoryview.
    status = await conn.copy_to_table(
        "t", source=memoryview(cb.copy_file(body)), columns=("i", "v"), format="binary"
    )
    assert status == f"COPY {len(fields)}"


def _mismatches(pairs: list[tuple[Any, Any, Any]]) -> list[tuple[Any, Any, Any]]:
    """(input, expected, got) triples that differ; the assertion prints the first few."""
    return [p for p in pairs if p[1] != p[2]][:10]


# ------------------------------------------------------------------------ timestamptz

TIMESTAMP_EDGES = [
    0, 1, -1, 999, -999, -1000, -1001,  # the Unix epoch
    cb.PG_EPOCH_MS, cb.PG_EPOCH_MS - 1, cb.PG_EPOCH_MS + 1,  # PostgreSQL's own epoch
    EXCHANGE_MIN_MS, EXCHANGE_MAX_MS, 1_633_998_512_063,
    PY_MIN_MS, PY_MAX_MS, PY_MAX_MS + 1,  # years 1 and 9999 / 10000
    -62_135_596_800_001,  # 1 BC
    PG_MIN_MS, PG_MIN_MS + 1, PG_MAX_MS, PG_MAX_MS - 1,  # the whole range PostgreSQL has
]


@functools.cache
def timestamp_values() -> list[int]:
    return TIMESTAMP_EDGES + _drawn(st.one_of(
        st.integers(EXCHANGE_MIN_MS, EXCHANGE_MAX_MS),  # anything the exchange could send
        st.integers(-10_000, 10_000),
        st.integers(cb.PG_EPOCH_MS - 10_000, cb.PG_EPOCH_MS + 10_000),
        st.integers(PG_MIN_MS, -1),  # before 1970, down to 4714 BC
        st.integers(PG_MIN_MS, PG_MAX_MS),
    ))


async def test_timestamptz_from_ms(conn: asyncpg.Connection) -> None:
    values = timestamp_values()
    await copy_values(conn, "timestamptz", [cb.timestamptz_ms(ms) for ms in values])
    got = await conn.fetch(
        """SELECT i, (extract(epoch FROM v) * 1000)::text AS ms,
                  CASE WHEN v BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59.999999+00'
                       THEN v END AS py
           FROM t ORDER BY i"""
    )
    assert [r["i"] for r in got] == list(range(len(values)))
    # extract(epoch) is an exact numeric (PostgreSQL 14+): the instant to the microsecond.
    assert not _mismatches([(ms, Decimal(ms), Decimal(r["ms"])) for ms, r in zip(values, got, strict=True)])
    in_py = [(ms, UNIX_EPOCH + timedelta(milliseconds=ms), r["py"])
             for ms, r in zip(values, got, strict=True) if PY_MIN_MS <= ms <= PY_MAX_MS]
    assert len(in_py) > len(values) // 2
    assert not _mismatches(in_py)
    assert all(r["py"] is None for ms, r in zip(values, got, strict=True) if not PY_MIN_MS <= ms <= PY_MAX_MS)


async def test_timestamptz_text_is_the_utc_instant(conn: asyncpg.Connection) -> None:
    cases = {
        0: "1970-01-01 00:00:00+00",
        -1: "1969-12-31 23:59:59.999+00",
        cb.PG_EPOCH_MS: "2000-01-01 00:00:00+00",
        1_633_998_512_063: "2021-10-12 00:28:32.063+00",
        EXCHANGE_MAX_MS - 1: "2099-12-31 23:59:59.999+00",
        PG_MIN_MS: "4714-11-24 00:00:00+00 BC",
        PG_MAX_MS: "294276-12-31 23:59:59.999+00",
    }
    await copy_values(conn, "timestamptz", [cb.timestamptz_ms(ms) for ms in cases])
    got = await conn.fetch("SELECT v::text FROM t ORDER BY i")
    assert [r["v"] for r in got] == list(cases.values())


# ------------------------------------------------------------------------ bigint

@functools.cache
def bigint_values() -> list[int]:
    edges = [0, 1, -1, INT64_MIN, INT64_MIN + 1, INT64_MAX, INT64_MAX - 1, 2**31, -(2**31) - 1, 2**53 + 1]
    return edges + _drawn(st.one_of(
        st.integers(INT64_MIN, INT64_MAX),
        st.integers(0, 10**13),  # trade and update ids
        st.sampled_from([INT64_MIN, INT64_MAX]),
    ))


async def test_bigint(conn: asyncpg.Connection) -> None:
    values = bigint_values()
    await copy_values(conn, "bigint", [cb.int8(v) for v in values])
    got = await conn.fetch("SELECT i, v, v::text AS s FROM t ORDER BY i")
    assert not _mismatches([(v, (v, str(v)), (r["v"], r["s"])) for v, r in zip(values, got, strict=True)])


# ------------------------------------------------------------------------ numeric

def pg_numeric_text(s: str) -> str:
    """PostgreSQL's text for a decimal string, by ``Decimal``: the scale written is kept,
    leading zeros go, and zero has no sign ("-0.0" reads back as "0.0")."""
    d = Decimal(s)
    return format(abs(d) if d.is_zero() else d, "f")


NUMERIC_FORMS = [
    "0", "-0", "+0", "0.0", "-0.0", "0.00000000", "-0.00000000", "00.000", "000",
    "0.00100000", "0.001", "1", "-1", "10000", "100000000", "0.0001", "0.00010000", "1.0000",
    "9999.9999", "10000.0001", "0.00000001", "-0.00000001", "80579.225", "41.87", "221.6800",
    "123456789012345678.12345678", "-999999999999999999.99999999", "999999999999999999",
    "000123.4500", "+1.5", ".5", "-.5", "5.", "-5.",
    "1" + "0" * 30 + "." + "0" * 12 + "1",
    "9" * 131072,  # the most integer digits numeric has (weight 32767, 32768 base-10000 digits)
    "0." + "0" * 16382 + "1",  # the largest display scale
    "-" + "9" * 131072 + "." + "9" * 16383,  # 36864 digits: ndigits is unsigned on the wire
]


@st.composite
def decimal_strings(draw: st.DrawFn) -> str:
    alphabet = draw(st.sampled_from(["0123456789", "0000000009", "0", "09"]))
    int_part = draw(st.text(alphabet, max_size=18))
    frac = draw(st.text(alphabet, max_size=12))
    dot = "." if frac else draw(st.sampled_from(["", "", "", "."]))
    if not int_part and not frac:
        int_part = "0"
    return str(draw(st.sampled_from(["", "", "-", "+"]))) + int_part + dot + frac


@functools.cache
def numeric_values() -> list[str]:
    exchange_like = st.builds(  # how the exchange writes prices and quantities: fixed scale
        lambda m, k: format(Decimal(m).scaleb(-k), "f"),
        st.integers(-(10**26), 10**26) | st.integers(-1000, 1000), st.integers(0, 8),
    )
    return NUMERIC_FORMS + _drawn(decimal_strings() | exchange_like)


async def test_numeric_from_decimal_strings(conn: asyncpg.Connection) -> None:
    values = numeric_values()
    assert len({len(v.partition(".")[2]) for v in values}) > 9  # scales 0..8 and beyond
    await copy_values(conn, "numeric", [cb.numeric(v) for v in values])
    got = await conn.fetch("SELECT i, v::text AS s, scale(v) AS scale FROM t ORDER BY i")
    assert not _mismatches([
        (v[:60], (pg_numeric_text(v), len(v.partition(".")[2])), (r["s"], r["scale"]))
        for v, r in zip(values, got, strict=True)
    ])
    # Spelled-out cases from the exchange's own output.
    texts = dict(zip(values, (r["s"] for r in got), strict=False))
    assert texts["0.00100000"] == "0.00100000"
    assert texts["-0.0"] == "0.0"
    assert texts["-0.00000000"] == "0.00000000"
    assert texts["000123.4500"] == "123.4500"


async def test_numeric_equals_postgres_parse(conn: asyncpg.Connection) -> None:
    """The encoded value equals PostgreSQL's own parse of the same string, scale included."""
    values = [v for v in numeric_values() if len(v) < 100]
    await copy_values(conn, "numeric", [cb.numeric(v) for v in values])
    bad = await conn.fetch(
        """SELECT x.s FROM t JOIN unnest($1::text[]) WITH ORDINALITY AS x(s, n) ON t.i = x.n - 1
           WHERE t.v <> x.s::numeric OR t.v::text <> x.s::numeric::text OR t.v IS NULL""",
        values,
    )
    assert [r["s"] for r in bad] == []


# ------------------------------------------------------------------------ text

TEXT_ALPHABET = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
TEXT_FORMS = ["", "BTCUSDT", "1000PEPEUSDT", "BTCUSDT_250627", "SELL", "币安", "😀", "e\u0301",
              "\u200b", "\r\n\t", "'\"\\", "\U0010ffff", "a" * 10_000]


@functools.cache
def text_values() -> list[str]:
    return TEXT_FORMS + _drawn(st.text(TEXT_ALPHABET, max_size=40))


async def test_text_and_null(conn: asyncpg.Connection) -> None:
    values = text_values()
    fields = [cb.text(v) for v in values] + [cb.NULL]
    await copy_values(conn, "text", fields)
    got = await conn.fetch("SELECT i, v, octet_length(v) AS n FROM t ORDER BY i")
    assert not _mismatches([
        (v, (v, len(v.encode())), (r["v"], r["n"])) for v, r in zip(values, got, strict=False)
    ])
    assert got[-1]["i"] == len(values) and got[-1]["v"] is None


# ------------------------------------------------------------------------ jsonb

JSON_KEYS = st.text(TEXT_ALPHABET, max_size=8)
JSON_SCALARS = (
    st.none() | st.booleans() | st.integers(INT64_MIN, INT64_MAX)
    # Floats below 2**53 in magnitude: above it a float's shortest text need not equal its
    # integer value, and jsonb (numeric) prints that text as an integer.
    | st.floats(min_value=-1e15, max_value=1e15, allow_nan=False)
    | st.floats(min_value=-1e-300, max_value=1e-300, allow_nan=False)
    | st.text(TEXT_ALPHABET, max_size=12)
    | st.from_regex(r"\A-?[0-9]{1,6}\.[0-9]{8}\Z")  # the exchange's decimal strings
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(JSON_KEYS, inner, max_size=4),
    max_leaves=20,
)
JSON_SERIALIZERS: list[Callable[[Any], bytes]] = [
    orjson.dumps,  # compact UTF-8, as Binance writes
    lambda obj: orjson.dumps(obj, option=orjson.OPT_INDENT_2),
    lambda obj: json.dumps(obj).encode(),  # ASCII only: \uXXXX escapes, surrogate pairs
    lambda obj: json.dumps(obj, ensure_ascii=False, separators=(" , ", " : ")).encode(),
]
JSON_FORMS = [
    b"{}", b"[]", b'{"a":"\\\\u0000"}',  # an escaped backslash, then "u0000": not a NUL
    b'{"e":"aggTrade","E":1633998512063,"a":1,"p":"0.00100000","q":"-0.0","m":true}',
    b'[{"e":"markPriceUpdate","s":"BTCUSDT"},{"e":"markPriceUpdate","s":"ETHUSDT"}]',
    b'{"k":"\\ud83d\\ude00 \\u00e9 \\"\\/\\b\\f\\n\\r\\t"}', b' \n{"a" : [1, 2.5e-7, -0.0]}\n ',
]


@functools.cache
def json_values() -> list[bytes]:
    docs = _drawn(st.tuples(
        st.dictionaries(JSON_KEYS, JSON_VALUES, max_size=6) | st.lists(JSON_VALUES, max_size=3),
        st.integers(0, len(JSON_SERIALIZERS) - 1),
    ), per_case=4)
    return JSON_FORMS + [JSON_SERIALIZERS[how](obj) for obj, how in docs]


async def test_jsonb_from_raw_json(conn: asyncpg.Connection) -> None:
    values = json_values()
    await copy_values(conn, "jsonb", [cb.jsonb(v) for v in values])
    got = await conn.fetch(
        """SELECT t.i, t.v::text AS v, t.v = x.j::jsonb AS same
           FROM t JOIN unnest($1::text[]) WITH ORDINALITY AS x(j, n) ON t.i = x.n - 1
           ORDER BY t.i""",
        [v.decode() for v in values],
    )
    assert [r["i"] for r in got] == list(range(len(values)))
    assert not _mismatches([
        (v, orjson.loads(v), orjson.loads(r["v"])) for v, r in zip(values, got, strict=True)
    ])
    assert [values[r["i"]] for r in got if not r["same"]] == []


# ------------------------------------------------------------------------ one COPY, every type

async def test_encoders_together_in_one_tuple(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "CREATE TEMP TABLE mix (n bigint, a bigint, b timestamptz, c numeric, d text, e jsonb, f numeric)"
    )
    values = list(zip(bigint_values(), timestamp_values(), numeric_values(), text_values(),
                      json_values(), strict=False))
    body = b"".join(
        cb.tuple_header(7) + cb.int8(n) + cb.int8(a) + cb.timestamptz_ms(b) + cb.numeric(c) + cb.text(d)
        + cb.jsonb(e) + cb.NULL
        for n, (a, b, c, d, e) in enumerate(values)
    )
    await conn.copy_to_table("mix", source=memoryview(cb.copy_file(body)), format="binary")
    got = await conn.fetch(
        "SELECT a, (extract(epoch FROM b) * 1000)::bigint AS b, c::text AS c, d, e::text AS e, f"
        " FROM mix ORDER BY n"
    )
    assert len(got) == len(values)
    assert not _mismatches([
        (n, (a, b, pg_numeric_text(c), d, orjson.loads(e), None),
         (r["a"], r["b"], r["c"], r["d"], orjson.loads(r["e"]), r["f"]))
        for n, ((a, b, c, d, e), r) in enumerate(zip(values, got, strict=True))
    ])


# ------------------------------------------------------------------------ refusals (no database)

@pytest.mark.parametrize("value", [
    "", ".", "-", "+", "-.", "+.", "1e5", "1E5", "abc", "1.2.3", "１", "١", "²", "½", "NaN", "nan",
    "Infinity", "-Infinity", "inf", " 1", "1 ", "1_000", "1,5", "0x10", "--1", "+-1", "-+1", "1-",
    "1.-1", "\x00", "1\x00",
    "0." + "0" * 16384,  # display scale above numeric's 16383
    "1" + "0" * 131072,  # 131073 integer digits: weight above 32767
    None, 1, 1.5, ["1"], b"1",  # not a string at all
])
def test_numeric_refuses(value: Any) -> None:
    with pytest.raises(cb.EncodeError):
        cb.numeric(value)


def test_numeric_limits_are_exact() -> None:
    cb.numeric("0." + "0" * 16382 + "1")
    cb.numeric("9" * 131072)
    cb.numeric("0" * 200_000 + "1")  # leading zeros are not digits
    with pytest.raises(cb.EncodeError):
        cb.numeric("1" + "0" * 131072)


@pytest.mark.parametrize("value", [INT64_MAX + 1, INT64_MIN - 1, 2**64, -(2**64), 10**30, 1.5, "1", None])
def test_int8_refuses_outside_int64(value: Any) -> None:
    with pytest.raises(cb.EncodeError):
        cb.int8(value)


def test_int8_edges() -> None:
    assert cb.int8(INT64_MAX) == b"\x00\x00\x00\x08\x7f" + b"\xff" * 7
    assert cb.int8(INT64_MIN) == b"\x00\x00\x00\x08\x80" + b"\x00" * 7


@pytest.mark.parametrize("value", [PG_MIN_MS - 1, PG_MAX_MS + 1, -(10**15), 9_224_318_721_654_775,
                                   2**63, -(2**63), 1.5, float("nan"), "1", None])
def test_timestamptz_refuses_outside_postgres_range(value: Any) -> None:
    with pytest.raises(cb.EncodeError):
        cb.timestamptz_ms(value)


@pytest.mark.parametrize("value", ["a\x00b", "\x00", "\ud800", 1, None, b"BTCUSDT"])
def test_text_refuses(value: Any) -> None:
    with pytest.raises(cb.EncodeError):
        cb.text(value)


@pytest.mark.parametrize("value", [b'{"a":"\\u0000"}', b'{"\\u0000":1}', b'["x\\\\\\u0000"]'])
def test_jsonb_refuses_nul_escape(value: bytes) -> None:
    assert "\\x00" in repr(json.loads(value))  # valid JSON, holding a NUL character
    with pytest.raises(cb.EncodeError):
        cb.jsonb(value)


def test_jsonb_keeps_an_escaped_backslash_before_u0000() -> None:
    raw = b'{"a":"\\\\u0000","b":"\\\\\\\\u0000"}'
    assert orjson.loads(raw) == {"a": "\\u0000", "b": "\\\\u0000"}
    assert cb.jsonb(raw) == (len(raw) + 1).to_bytes(4, "big") + b"\x01" + raw


@pytest.mark.parametrize("payload", [
    b'{"e":"aggTrade","E":1,"s":1,"a":1}',  # symbol not a string
    b'{"e":"aggTrade","E":-1000000000000000,"s":"X","a":1}',  # before 4714 BC
    b'{"e":"aggTrade","E":1,"s":"X\\u0000","a":1}',
    b'{"e":"forceOrder","E":1,"o":{"s":"X","S":1,"q":"1","T":1}}',
    b'{"e":"forceOrder","E":1,"o":{"s":"X","S":"BUY","q":["1"],"T":1}}',
    b'{"e":"forceOrder","E":1,"o":{"s":"X","S":"BUY","q":"1' + b"0" * 131072 + b'","T":1}}',
])
def test_bad_fields_cost_one_frame_not_the_handler(payload: bytes) -> None:
    batches: list[Any] = []
    handler = FrameHandler("futures", batches.append)
    handler.on_payload(payload)
    handler.flush(force=True)
    assert handler.rejected == {"fields": 1}
    assert batches == []
