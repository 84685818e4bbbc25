"""Readers for real Binance captures (``shared/realdata``) into one normalized ``Capture``.

Container formats, detected from content (not from file names):

* cryptofeed raw capture (``*.ws.N.0``): line 1 ``<wss url> <-> <connect ts>``, then
  ``<recv ts>: <frame>``; ts are unix seconds with a decimal fraction.
* cryptofeed REST capture (``*.http.N.0``, ``*.0``): ``<request url> -> <recv ts>: <body>``.
  ``*.0`` files also end with a ``configuration: {...}`` line (cryptofeed's own feed
  config, not exchange data), which is recognised and dropped.
* cryptofeed old single-file capture: both line kinds above interleaved in one file.
* hftbacktest collector (gzip): ``<recv ts> <frame>`` with an integer ts in ns (2024) or
  µs (2023 ``*.dat.gz``). The REST depth snapshot is a bare ``/depth`` body on its own
  line, so its symbol is inferred from the other frames.
* force-order log: JSON lines ``{"ts": <ISO>, "msg": <event>}``, re-serialised by its
  recorder, so ``data`` holds the recorder's bytes, not Binance's.
* plain JSON documents (possibly pretty-printed): one event (has ``"e"``) or one REST body
  (depth, openInterest, premiumIndex, aggTrades), classified by shape. They carry no
  receive time, so their frames have ``recv_ns == 0``.

Frame ``data`` is sliced out of the envelope rather than re-serialised, so byte-exact
replays stay byte-exact. Anything unrecognised raises ``ValueError`` naming file and line.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import orjson

Market = Literal["spot", "futures"]


@dataclass(frozen=True, slots=True)
class CapturedFrame:
    recv_ns: int  # local receive time, ns since epoch; 0 when the file never recorded one
    stream: str | None  # combined-stream name; None for a raw (non-envelope) event
    data: bytes  # the event's own bytes exactly as in the file, never re-serialised


@dataclass(frozen=True, slots=True)
class CapturedSnapshot:
    recv_ns: int
    market: Market
    symbol: str  # upper case
    limit: int | None  # None when the request URL was not recorded
    body: bytes  # raw /depth response body as in the file


@dataclass(frozen=True, slots=True)
class Capture:
    path: str
    market: Market | None  # None when the evidence conflicts or there is none
    frames: tuple[CapturedFrame, ...]  # file order
    snapshots: tuple[CapturedSnapshot, ...]  # file order
    rest_bodies: tuple[tuple[str, bytes], ...]  # (endpoint path, body) for non-depth REST


_WS_HEADER = re.compile(rb"(\S+://\S+) <-> (\d+(?:\.\d+)?)")
_REST_LINE = re.compile(rb"(\S+://\S+) -> (\d+(?:\.\d+)?): (.+)")
_CF_FRAME = re.compile(rb"(\d+(?:\.\d+)?): (.+)")
_HFT_FRAME = re.compile(rb"(\d+) (.+)")
# The slice is exact only because the parsed key order is checked to be exactly these two
# keys, so everything after the second key's colon up to the closing brace is its value.
_ENVELOPE_HEAD = re.compile(rb'\{\s*"stream"\s*:\s*"[^"\\]*"\s*,\s*"data"\s*:\s*')
_LOG_HEAD = re.compile(rb'\{\s*"ts"\s*:\s*"[^"\\]*"\s*,\s*"msg"\s*:\s*')


def _seconds_to_ns(text: bytes) -> int:
    # Decimal string arithmetic: a float would lose the sub-µs digits cryptofeed writes.
    whole, _, frac = text.partition(b".")
    return int(whole) * 1_000_000_000 + int((frac + b"000000000")[:9])


def _iso_to_ns(text: str) -> int:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no time zone")
    # Integer timedelta division: float seconds would round away the microseconds.
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000


def _slice_last(raw: bytes, head: re.Pattern[bytes]) -> bytes:
    match = head.match(raw)
    tail = raw[match.end() :].rstrip() if match else b""
    if not tail.endswith(b"}"):
        raise ValueError("cannot slice the inner value out of the wrapper")
    return tail[:-1].rstrip()


def _url_market(url: str) -> Market | None:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if any(k in host for k in ("fstream", "fapi", "binancefuture")) or "/fapi/" in parts.path:
        return "futures"
    if host.startswith("stream.binance") or parts.path.startswith("/api/"):
        return "spot"
    return None  # e.g. coin-M dapi/dstream: not a market this project models


def _body_market(obj: Any) -> Market | None:
    if not isinstance(obj, dict):
        return None
    if obj.get("e") == "depthUpdate":
        return "futures" if "pu" in obj else "spot"  # only USDⓈ-M diffs chain via `pu`
    if "lastUpdateId" in obj:
        return "futures" if "E" in obj else "spot"  # only USDⓈ-M /depth has event times
    if obj.get("e") in ("forceOrder", "markPriceUpdate") or "openInterest" in obj:
        return "futures"
    return "futures" if "markPrice" in obj else None


class _Reader:
    def __init__(self, path: str) -> None:
        self.path, name = path, Path(path).name.lower()
        self.hints: set[Market] = set()
        self.hint("futures" if "futures" in name or "usdm" in name else None)
        self.hint("spot" if "spot" in name else None)
        self.frames: list[CapturedFrame] = []
        self.snapshots: list[CapturedSnapshot | None] = []  # None: bare, filled in finish()
        self.bare: list[tuple[int, int, bytes]] = []  # (line number, recv_ns, body)
        self.rest: list[tuple[str, bytes]] = []
        self.symbols: set[str] = set()
        self.line_no = 0

    def hint(self, market: Market | None) -> None:
        if market is not None:
            self.hints.add(market)

    @property
    def market(self) -> Market | None:
        return next(iter(self.hints)) if len(self.hints) == 1 else None

    def frame(self, recv_ns: int, raw: bytes) -> None:
        obj = orjson.loads(raw)
        if isinstance(obj, dict) and list(obj) == ["stream", "data"]:
            data, stream = _slice_last(raw, _ENVELOPE_HEAD), obj["stream"]
            if not stream.startswith("!"):  # "!forceOrder@arr"-style streams name no symbol
                self.symbols.add(stream.split("@", 1)[0].upper())
            obj = obj["data"]
        elif isinstance(obj, dict) and "e" in obj:
            data, stream = raw, None
            self.symbols.update([obj["s"]] if isinstance(obj.get("s"), str) else [])
        elif isinstance(obj, dict) and "lastUpdateId" in obj:
            # hftbacktest writes the /depth response bare; symbol is resolved at the end.
            self.hint(_body_market(obj))
            self.bare.append((self.line_no, recv_ns, raw))
            self.snapshots.append(None)
            return
        else:
            raise ValueError("neither a stream envelope, an event nor a depth snapshot")
        self.hint(_body_market(obj))
        self.frames.append(CapturedFrame(recv_ns, stream, data))

    def rest_line(self, url_raw: bytes, recv_ns: int, body: bytes) -> None:
        url = url_raw.decode()
        obj = orjson.loads(body)
        market = _url_market(url) or _body_market(obj)
        self.hint(market)
        parts = urlsplit(url)
        if not parts.path.endswith("/depth"):
            self.rest.append((parts.path, body))
            return
        query = parse_qs(parts.query)
        if "symbol" not in query or not isinstance(obj, dict) or "lastUpdateId" not in obj:
            raise ValueError("depth request without symbol or response without lastUpdateId")
        if market is None:
            raise ValueError(f"cannot tell the market of {url}")
        limit = int(query["limit"][0]) if "limit" in query else None
        symbol = query["symbol"][0].upper()
        self.snapshots.append(CapturedSnapshot(recv_ns, market, symbol, limit, body))

    def line(self, line: bytes) -> None:
        if m := _REST_LINE.fullmatch(line):
            self.rest_line(m[1], _seconds_to_ns(m[2]), m[3])
        elif m := _WS_HEADER.fullmatch(line):
            self.hint(_url_market(m[1].decode()))
        elif m := _CF_FRAME.fullmatch(line):
            self.frame(_seconds_to_ns(m[1]), m[2])
        elif m := _HFT_FRAME.fullmatch(line):
            stamp = int(m[1])
            # ns stamps have 19 digits today; µs ones 16: scale by magnitude, not file name.
            self.frame(stamp if stamp >= 10**17 else stamp * 1000, m[2])
        elif not line.startswith(b"configuration: "):
            raise ValueError("unrecognised line")

    def log_line(self, line: bytes) -> None:
        obj = orjson.loads(line)
        if not isinstance(obj, dict) or list(obj) != ["ts", "msg"]:
            raise ValueError('expected {"ts": ..., "msg": ...}')
        if not isinstance(obj["msg"], dict) or obj["msg"].get("e") != "forceOrder":
            raise ValueError("log message is not a forceOrder event")
        self.hint("futures")
        data = _slice_last(line, _LOG_HEAD)
        self.frames.append(CapturedFrame(_iso_to_ns(obj["ts"]), "!forceOrder@arr", data))

    def document(self, raw: bytes) -> None:
        body = raw.strip()
        obj = orjson.loads(body)
        first = obj[0] if isinstance(obj, list) and obj else obj
        self.hint(_body_market(first))
        fut = self.market == "futures"
        if isinstance(obj, dict) and "e" in obj:
            self.frames.append(CapturedFrame(0, None, body))
        elif isinstance(first, dict) and "lastUpdateId" in first:
            # No symbol in a bare depth body, so it cannot become a CapturedSnapshot.
            self.rest.append(("/fapi/v1/depth" if fut else "/api/v3/depth", body))
        elif isinstance(first, dict) and "openInterest" in first:
            self.rest.append(("/fapi/v1/openInterest", body))
        elif isinstance(first, dict) and "markPrice" in first:
            self.rest.append(("/fapi/v1/premiumIndex", body))
        elif isinstance(obj, list) and isinstance(first, dict) and {"a", "p", "q"} <= set(first):
            self.rest.append(("/fapi/v1/aggTrades" if fut else "/api/v3/aggTrades", body))
        else:
            raise ValueError("JSON document of unknown kind")

    def finish(self) -> Capture:
        market, bare = self.market, iter(self.bare)
        snapshots: list[CapturedSnapshot] = []
        for snap in self.snapshots:
            if snap is None:
                line_no, recv_ns, body = next(bare)
                if len(self.symbols) != 1 or market is None:
                    raise ValueError(
                        f"{self.path}:{line_no}: bare depth snapshot, but symbols "
                        f"{sorted(self.symbols)} / market {market} are ambiguous"
                    )
                snap = CapturedSnapshot(recv_ns, market, min(self.symbols), None, body)
            snapshots.append(snap)
        return Capture(self.path, market, tuple(self.frames), tuple(snapshots), tuple(self.rest))


def read_capture(path: str | os.PathLike[str]) -> Capture:
    """Read one capture file of any supported format (see module docstring)."""
    reader = _Reader(os.fspath(path))
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    lines = raw.split(b"\n")
    first = next((line.strip() for line in lines if line.strip()), b"")
    try:
        first_obj = orjson.loads(first) if first[:1] == b"{" else None
    except orjson.JSONDecodeError:
        first_obj = None  # a pretty-printed document: its first line alone is not JSON
    is_log = isinstance(first_obj, dict) and list(first_obj) == ["ts", "msg"]
    if first[:1] in (b"{", b"[") and not is_log:
        try:
            reader.document(raw)
        except ValueError as exc:
            raise ValueError(f"{reader.path}: {exc}") from exc
        return reader.finish()
    handle = reader.log_line if is_log else reader.line
    for reader.line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            handle(line.rstrip(b"\r"))
        except ValueError as exc:
            raise ValueError(f"{reader.path}:{reader.line_no}: {exc}") from exc
    return reader.finish()


def snapshot_events(capture: Capture, *more: Capture) -> list[CapturedFrame | CapturedSnapshot]:
    """Frames and snapshots of one or more captures merged by receive time.

    Pairs e.g. a cryptofeed ``.ws`` file with its ``.http`` file. The sort is stable (ties:
    captures in argument order, frames before snapshots). A diff that arrived before the
    snapshot response (the hftbacktest trap) stays before it: consumers must buffer diffs.
    """
    items: list[CapturedFrame | CapturedSnapshot] = []
    for cap in (capture, *more):
        items.extend(cap.frames)
        items.extend(cap.snapshots)
    return sorted(items, key=lambda item: item.recv_ns)


def event_type(frame: CapturedFrame) -> str:
    """The event's ``e``; spot bookTicker has none, so fall back to the stream's kind."""
    obj = orjson.loads(frame.data)
    if isinstance(obj, dict) and isinstance(obj.get("e"), str):
        return str(obj["e"])
    if frame.stream and "@" in frame.stream:
        kind = frame.stream.split("@")[1]
        return {"depth": "depthUpdate"}.get(kind, kind.split("_")[0])
    raise ValueError("frame has neither an 'e' field nor a stream name")
