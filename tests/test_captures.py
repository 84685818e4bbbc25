"""Tests for ingestor.sim.captures: every real capture in shared/realdata, plus handmade inputs.

The real-data checks take their expected counts and markets from the README's own table,
so a file added to realdata without a README row (or the reverse) fails instead of being
silently ignored.
"""

from __future__ import annotations

import gzip
import re
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingestor.sim.captures import (
    Capture,
    CapturedFrame,
    CapturedSnapshot,
    event_type,
    read_capture,
    snapshot_events,
)

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
HAVE_REALDATA = (REALDATA / "README.md").is_file()
needs_realdata = pytest.mark.skipif(
    not HAVE_REALDATA, reason=f"real captures not available at {REALDATA} (../shared absent)"
)
FILES = (
    sorted(p for p in REALDATA.rglob("*") if p.is_file() and p.name != "README.md")
    if HAVE_REALDATA
    else []
)
FILE_IDS = [p.relative_to(REALDATA).as_posix() for p in FILES]

# Snapshot symbols the README describes in its notes/URLs (in file order).
SNAPSHOT_SYMBOLS = {
    "bmoscon_cryptofeed__sample_data-BINANCE.http.0.0": ["NKNUSDT", "BLZETH", "LRCBTC", "RUNEEUR"],
    "bmoscon_cryptofeed__sample_data-BINANCE_FUTURES.http.0.0": [
        "SUSHIUSDT",
        "AKROUSDT",
        "KEEPUSDT",
        "CTKUSDT",
    ],
    "bmoscon_cryptofeed__sample_data-BINANCE-ee25be.0@29970208": ["DOTUSDT", "BTCUSDT", "ETHUSDT"],
    "nkaz001_hftbacktest__examples-spot-btcusdt_20240808.gz": ["BTCUSDT"],
    "nkaz001_hftbacktest__examples-usdm-btcusdt_20240808.gz": ["BTCUSDT"],
}


def _readme_rows() -> dict[str, tuple[str, str]]:
    """file name -> (message types column, market column) from the README's file table."""
    rows: dict[str, tuple[str, str]] = {}
    header: list[str] = []
    for line in (REALDATA / "README.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if "message types (count)" in cells:
            header = cells
        elif header and len(cells) >= len(header) and cells[header.index("file")].startswith("`"):
            name = cells[header.index("file")].strip("`").split("/")[-1]
            rows[name] = (
                cells[header.index("message types (count)")],
                cells[header.index("market")],
            )
    return rows


README_ROWS = _readme_rows() if HAVE_REALDATA else {}


def _source_frames(path: Path) -> list[tuple[bytes, str | None, Any]]:
    """Independent oracle: (source line, stream, parsed event) for every frame in the file."""
    raw = path.read_bytes()
    raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    if path.suffix == ".json":
        obj = orjson.loads(raw)
        return [(raw, None, obj)] if isinstance(obj, dict) and "e" in obj else []
    out: list[tuple[bytes, str | None, Any]] = []
    for line in raw.splitlines():
        if path.suffix == ".log":
            out.append((line, "!forceOrder@arr", orjson.loads(line)["msg"]))
            continue
        match = re.fullmatch(rb"(\d+(?:\.\d+)?)(?:: | )(\{.*)", line)
        if match is None:
            continue  # URL-prefixed REST / header / configuration lines
        obj = orjson.loads(match[2])
        if "stream" in obj:
            out.append((line, obj["stream"], obj["data"]))
        elif "lastUpdateId" not in obj:
            out.append((line, None, obj))
    return out


@pytest.fixture(scope="module")
def captures() -> dict[str, Capture]:
    return {}


def _read(cache: dict[str, Capture], path: Path) -> Capture:
    if path.name not in cache:
        cache[path.name] = read_capture(path)
    return cache[path.name]


@needs_realdata
@pytest.mark.realdata
def test_every_file_has_a_readme_row() -> None:
    assert FILES, "realdata directory holds no captures"
    assert sorted(README_ROWS) == sorted(p.name for p in FILES)


@needs_realdata
@pytest.mark.realdata
@pytest.mark.parametrize("path", FILES, ids=FILE_IDS)
def test_counts_and_market_match_readme(path: Path, captures: dict[str, Capture]) -> None:
    cap = _read(captures, path)
    types, market = README_ROWS[path.name]
    assert cap.market == ("spot" if market == "spot" else "futures")
    events: dict[str, int] = {}
    rest = Counter(endpoint.rsplit("/", 1)[-1] for endpoint, _ in cap.rest_bodies)
    for item in types.split(";"):
        label, count = (part.strip() for part in item.rsplit(":", 1))
        if label == "REST depth snapshot":
            assert len(cap.snapshots) + rest.pop("depth", 0) == int(count)
        elif label.startswith("REST "):
            endpoint, _, size = label[5:].partition("[")
            assert rest.pop(endpoint, 0) == int(count), label
            if size:  # "[521]": a list body with that many entries
                (body,) = [b for e, b in cap.rest_bodies if e.endswith("/" + endpoint)]
                assert len(orjson.loads(body)) == int(size.rstrip("]"))
        else:
            events[label] = int(count)
    assert not rest, f"REST bodies the README does not list: {rest}"
    assert Counter(event_type(frame) for frame in cap.frames) == events


@needs_realdata
@pytest.mark.realdata
@pytest.mark.parametrize("path", FILES, ids=FILE_IDS)
def test_frame_bytes_are_cut_from_the_source(path: Path, captures: dict[str, Capture]) -> None:
    cap = _read(captures, path)
    source = _source_frames(path)
    assert len(cap.frames) == len(source)
    for frame, (line, stream, event) in zip(cap.frames, source, strict=True):
        assert frame.stream == stream
        assert orjson.loads(frame.data) == event
        assert frame.data in line  # sliced, not re-serialised
        if stream is not None and path.suffix != ".log":
            assert line.endswith(frame.data + b"}")


@needs_realdata
@pytest.mark.realdata
@pytest.mark.parametrize("path", FILES, ids=FILE_IDS)
def test_receive_times_and_snapshots(path: Path, captures: dict[str, Capture]) -> None:
    cap = _read(captures, path)
    for items in (cap.frames, cap.snapshots):
        stamps = [item.recv_ns for item in items]
        assert stamps == sorted(stamps), "every recorder here wrote in receive order"
        if path.parent.name == "doc_examples":
            assert set(stamps) <= {0}  # documentation examples have no receive time
        else:
            assert all(1_500_000_000 * 10**9 < s < 1_900_000_000 * 10**9 for s in stamps)
    assert [s.symbol for s in cap.snapshots] == SNAPSHOT_SYMBOLS.get(path.name, [])
    frame_symbols = {f.stream.split("@")[0].upper() for f in cap.frames if f.stream}
    for snap in cap.snapshots:
        assert snap.market == cap.market
        assert "lastUpdateId" in orjson.loads(snap.body)
        assert snap.symbol in frame_symbols or not cap.frames
        assert snap.limit in (1000, 5000, None)


@needs_realdata
@pytest.mark.realdata
@pytest.mark.parametrize("name", ["spot", "usdm"])
def test_hftbacktest_bridging_diff_arrives_before_snapshot(name: str) -> None:
    cap = read_capture(REALDATA / f"nkaz001_hftbacktest__examples-{name}-btcusdt_20240808.gz")
    (snap,) = cap.snapshots
    last_id = orjson.loads(snap.body)["lastUpdateId"]
    depth = [f for f in cap.frames if event_type(f) == "depthUpdate"]
    bridge = next(f for f in depth if orjson.loads(f.data)["u"] >= last_id)
    assert orjson.loads(bridge.data)["U"] <= last_id + 1
    assert bridge.recv_ns < snap.recv_ns  # the README's trap: buffer diffs during the request
    merged = snapshot_events(cap)
    assert merged.index(bridge) < merged.index(snap)


@needs_realdata
@pytest.mark.realdata
def test_exact_receive_time_conversion() -> None:
    ws = read_capture(REALDATA / "bmoscon_cryptofeed__sample_data-BINANCE.ws.1.0")
    assert ws.frames[0].recv_ns == 1633998512063356900  # "1633998512.0633569"
    log = read_capture(
        REALDATA / "dannyspk_arbitra-backend__tools-ccxt_out-binance_force_orders_ws.log"
    )
    assert log.frames[0].recv_ns == 1759417432206933000  # 2025-10-02T15:03:52.206933+00:00


# ---------------------------------------------------------------- handmade inputs

SPOT_DEPTH = b'{"e":"depthUpdate","E":1,"s":"BTCUSDT","U":5,"u":7,"b":[["1.0","2"]],"a":[]}'
FUT_DEPTH = b'{"e":"depthUpdate","E":1,"T":1,"s":"ETHUSDT","U":5,"u":7,"pu":4,"b":[],"a":[]}'


def _write(tmp_path: Path, name: str, text: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    return path


def test_cryptofeed_ws(tmp_path: Path) -> None:
    raw_event = b'{"e":"aggTrade","E":3,"s":"BTCUSDT","a":1,"p":"1","q":"1"}'
    text = (
        b"wss://stream.binance.com:9443/stream?streams=btcusdt@depth@100ms <-> 1600000000.5\n"
        b'1600000001.123456789123: {"stream":"btcusdt@depth@100ms","data":' + SPOT_DEPTH + b"}\n"
        b"\n"
        b"1600000002: " + raw_event + b"\r\n"
    )
    cap = read_capture(_write(tmp_path, "X.ws.1.0", text))
    assert cap.market == "spot"
    assert cap.frames == (
        CapturedFrame(1600000001123456789, "btcusdt@depth@100ms", SPOT_DEPTH),
        CapturedFrame(1600000002000000000, None, raw_event),
    )
    assert cap.snapshots == () and cap.rest_bodies == ()


def test_cryptofeed_rest_and_configuration_line(tmp_path: Path) -> None:
    depth = b'{"lastUpdateId":9,"E":1,"T":1,"bids":[],"asks":[]}'
    text = (
        b'https://fapi.binance.com/fapi/v1/exchangeInfo -> 1.5: {"symbols":[]}\n'
        b"https://fapi.binance.com/fapi/v1/depth?symbol=ethusdt&limit=5000 -> 2.25: "
        + depth
        + b'\nconfiguration: {"l2_book":["ETH-USDT-PERP"]}\n'
    )
    cap = read_capture(_write(tmp_path, "X.http.0.0", text))
    assert cap.market == "futures"
    assert cap.rest_bodies == (("/fapi/v1/exchangeInfo", b'{"symbols":[]}'),)
    assert cap.snapshots == (CapturedSnapshot(2250000000, "futures", "ETHUSDT", 5000, depth),)


def test_old_single_file_interleaves_both_kinds(tmp_path: Path) -> None:
    depth = b'{"lastUpdateId":6,"bids":[],"asks":[]}'
    text = (
        b"wss://stream.binance.com:9443/stream?streams=btcusdt@depth <-> 10.0\n"
        b'11.0: {"stream":"btcusdt@depth","data":' + SPOT_DEPTH + b"}\n"
        b"https://www.binance.com/api/v1/depth?symbol=BTCUSDT -> 12.0: " + depth + b"\n"
    )
    cap = read_capture(_write(tmp_path, "BINANCE-x.0", text))
    assert cap.market == "spot" and len(cap.frames) == 1
    assert cap.snapshots == (CapturedSnapshot(12 * 10**9, "spot", "BTCUSDT", None, depth),)
    assert snapshot_events(cap) == [cap.frames[0], cap.snapshots[0]]


def test_hftbacktest_gz_ns_and_us_and_bare_snapshot(tmp_path: Path) -> None:
    depth = b'{"lastUpdateId":6,"E":1,"T":1,"bids":[],"asks":[]}'
    text = (
        b'1723161253937085768 {"stream":"ethusdt@depth@0ms","data":' + FUT_DEPTH + b"}\n"
        b"1723161254000000000 " + depth + b"\n"
        b'1723161254000001 {"stream":"ethusdt@bookTicker","data":{"u":1,"s":"ETHUSDT"}}\n'
    )
    cap = read_capture(_write(tmp_path, "eth_20240808.gz", text))
    assert cap.market == "futures"  # from `pu`: the file name says nothing
    assert [f.recv_ns for f in cap.frames] == [1723161253937085768, 1723161254000001000]
    assert cap.snapshots == (
        CapturedSnapshot(1723161254000000000, "futures", "ETHUSDT", None, depth),
    )
    assert [event_type(f) for f in cap.frames] == ["depthUpdate", "bookTicker"]


def test_spot_market_from_depth_diffs_alone(tmp_path: Path) -> None:
    text = b'1723161253937085 {"stream":"btcusdt@depth@100ms","data":' + SPOT_DEPTH + b"}\n"
    cap = read_capture(_write(tmp_path, "btcusdt_20230101.dat.gz", text))
    assert cap.market == "spot"  # no `pu`: spot diffs do not chain to the previous one
    assert cap.frames[0].recv_ns == 1723161253937085000


def test_hftbacktest_snapshot_with_ambiguous_symbol_raises(tmp_path: Path) -> None:
    text = (
        b'1 {"stream":"ethusdt@depth@0ms","data":' + FUT_DEPTH + b"}\n"
        b'2 {"stream":"btcusdt@depth@0ms","data":' + FUT_DEPTH + b"}\n"
        b'3 {"lastUpdateId":6,"E":1,"bids":[],"asks":[]}\n'
    )
    with pytest.raises(ValueError, match=r"usdm\.gz:3: bare depth snapshot"):
        read_capture(_write(tmp_path, "usdm.gz", text))


def test_force_order_log(tmp_path: Path) -> None:
    msg = b'{"e": "forceOrder", "E": 1, "o": {"s": "SOLUSDT", "q": "1"}}'
    text = b'{"ts": "2025-10-02T15:03:52.206933+00:00", "msg": ' + msg + b"}\n\n"
    cap = read_capture(_write(tmp_path, "force.log", text))
    assert cap.market == "futures"
    assert cap.frames == (CapturedFrame(1759417432206933000, "!forceOrder@arr", msg),)
    bad = text + b'{"ts": "2025-10-02T15:03:53+00:00", "msg": {"e": "trade"}}\n'
    with pytest.raises(ValueError, match=r"force\.log:3: .*forceOrder"):
        read_capture(_write(tmp_path, "force.log", bad))


@pytest.mark.parametrize(
    ("name", "body", "endpoint"),
    [
        (
            "openInterest.json",
            b'{"symbol":"BTCUSDT","openInterest":"1.5","time":1}',
            "/fapi/v1/openInterest",
        ),
        ("premiumIndex.json", b'[{"symbol":"BTCUSDT","markPrice":"1"}]', "/fapi/v1/premiumIndex"),
        ("spot_agg.json", b'[\n  {"a": 1, "p": "1", "q": "2", "T": 3}\n]', "/api/v3/aggTrades"),
        (
            "futures_depth.json",
            b'{\n  "lastUpdateId": 1,\n  "E": 2, "bids": [], "asks": []\n}',
            "/fapi/v1/depth",
        ),
    ],
)
def test_plain_json_rest_bodies(tmp_path: Path, name: str, body: bytes, endpoint: str) -> None:
    cap = read_capture(_write(tmp_path, name, body + b"\n"))
    assert cap.rest_bodies == ((endpoint, body),)
    assert cap.frames == () and cap.snapshots == ()


def test_plain_json_pretty_event(tmp_path: Path) -> None:
    body = b'{\n  "e": "markPriceUpdate",\n  "s": "BTCUSDT",\n  "p": "1"\n}'
    cap = read_capture(_write(tmp_path, "mark.json", body + b"\n"))
    assert cap.frames == (CapturedFrame(0, None, body),)
    assert cap.market == "futures"


def test_conflicting_market_evidence_gives_none(tmp_path: Path) -> None:
    text = b"wss://stream.binance.com:9443/stream <-> 1.0\n" + b"2.0: " + FUT_DEPTH + b"\n"
    assert read_capture(_write(tmp_path, "mixed.ws.1.0", text)).market is None


@pytest.mark.parametrize(
    ("text", "line_no"),
    [
        (b"wss://stream.binance.com/stream <-> 1.0\n\ngarbage here\n", 3),
        (b'1.0: {"e":"x"}\n1.5: {}\n', 2),
        (b'1.0: {"stream":"a@depth","data":{"e":"x"}}\n2.0: {"stream":"a@depth","data":\n', 2),
        (b'1.0: {"data":{"e":"x"},"stream":"a@depth"}\n', 1),
        (b'1.0: {"stream":"a@depth","data":{"e":"x"},"extra":1}\n', 1),
        (b'5 {"e":"trade"}\n6 not json\n', 2),
        (b'https://api.binance.com/api/v3/depth?limit=5 -> 1.0: {"lastUpdateId":1}\n', 1),
    ],
)
def test_malformed_lines_raise_with_line_number(tmp_path: Path, text: bytes, line_no: int) -> None:
    with pytest.raises(ValueError, match=rf"bad\.0:{line_no}: "):
        read_capture(_write(tmp_path, "bad.0", text))


def test_unknown_json_document_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"odd\.json: .*unknown kind"):
        read_capture(_write(tmp_path, "odd.json", b'{\n  "code": -1121\n}\n'))


def test_snapshot_events_merges_captures_by_receive_time() -> None:
    frame_a, frame_b = CapturedFrame(1, "s", b"{}"), CapturedFrame(3, "s", b"{}")
    snap = CapturedSnapshot(2, "spot", "BTCUSDT", 1000, b"{}")
    ws = Capture("ws", "spot", (frame_a, frame_b), (), ())
    http = Capture("http", "spot", (), (snap,), ())
    assert snapshot_events(ws, http) == [frame_a, snap, frame_b]
