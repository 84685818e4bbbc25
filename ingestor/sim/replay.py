"""Replaying recorded messages through the simulator (``--replay FILE ... --speed X``).

Input: the real capture formats of ``captures.py`` (cryptofeed, hftbacktest, JSON logs)
and the simulator's own JSON-lines format (``*.jsonl``: one combined-stream envelope or
bare event per line, paced by the events' ``E``). Frames go to subscribers of their
stream in file order, at the recorded pace divided by ``speed`` (0 = as fast as
possible). Recorded REST depth snapshots are served by ``/depth``: the latest one
recorded before the replay position, else the first, so a client syncs a real book
from the replay exactly as from the exchange.

The replay starts when the first connection subscribes to one of its streams, so a
client that connects, subscribes and then asks for the snapshot sees the file from
its beginning.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ingestor.binance.streams import MARKETS, Market, StreamSpec
from ingestor.sim.captures import Capture, read_capture
from ingestor.sim.hub import Hub
from ingestor.sim.universe import SymbolSpec

_PUBLIC_KINDS = {"depth", "bookTicker"}


def event_market(obj: Any) -> Market:
    """Which market an event belongs to, from its own fields."""
    if isinstance(obj, list):
        return "futures"  # !markPrice@arr
    if "pu" in obj or obj.get("e") in ("markPriceUpdate", "forceOrder"):
        return "futures"
    if obj.get("e") == "aggTrade":
        return "spot" if "M" in obj else "futures"
    return "spot" if obj.get("e") == "depthUpdate" else "futures"


def derive_stream(obj: Any) -> str:
    """The stream a bare event was published on (the most common one of its kind)."""
    if isinstance(obj, list):
        return "!markPrice@arr"
    e = obj.get("e")
    if e == "forceOrder":
        return "!forceOrder@arr"
    low = str(obj.get("s", "")).lower()
    kind = {"depthUpdate": "depth", "markPriceUpdate": "markPrice"}.get(e, e)
    if kind is None and "b" in obj and "a" in obj and "u" in obj:
        kind = "bookTicker"
    return f"{low}@{kind}"


@dataclass(frozen=True, slots=True)
class ReplayFrame:
    t_ns: int
    stream: str
    data: bytes


def _read_jsonl(path: Path) -> list[tuple[Market, ReplayFrame]]:
    out = []
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not JSON ({exc})") from None
        if isinstance(obj, dict) and "stream" in obj and "data" in obj:
            stream, event = obj["stream"], obj["data"]
            data = line[line.index(b'"data":') + 7 : line.rindex(b"}")].strip()
        else:
            stream, event, data = derive_stream(obj), obj, line.strip()
        first = event[0] if isinstance(event, list) and event else event
        e_ms = first.get("E", 0) if isinstance(first, dict) else 0
        out.append((event_market(event), ReplayFrame(int(e_ms) * 1_000_000, stream, data)))
    return out


def _from_capture(cap: Capture) -> list[tuple[Market, ReplayFrame]]:
    out = []
    for f in cap.frames:
        obj = orjson.loads(f.data)
        market = cap.market or event_market(obj)
        out.append((market, ReplayFrame(f.recv_ns, f.stream or derive_stream(obj), f.data)))
    return out


class Replay:
    def __init__(self, frames: dict[Market, list[ReplayFrame]], captures: list[Capture], speed: float):
        self.frames = frames
        self.speed = speed
        self.snapshots: dict[tuple[Market, str], list[tuple[int, bytes]]] = {}
        for cap in captures:
            for s in cap.snapshots:
                self.snapshots.setdefault((s.market, s.symbol), []).append((s.recv_ns, s.body))
        self.streams = {m: {f.stream for f in fs} for m, fs in frames.items()}
        self.position_ns = 0
        self.sent = 0
        self.started = False
        self.finished = False

    @classmethod
    def load(cls, paths: tuple[str, ...], speed: float) -> Replay:
        if speed < 0:
            raise ValueError("--speed must be >= 0 (0 = as fast as possible)")
        tagged: list[tuple[Market, ReplayFrame]] = []
        captures = []
        for p in map(Path, paths):
            if not p.is_file():
                raise ValueError(f"replay file not found: {p}")
            if p.suffix == ".jsonl":
                tagged += _read_jsonl(p)
            else:
                cap = read_capture(p)
                captures.append(cap)
                tagged += _from_capture(cap)
        frames: dict[Market, list[ReplayFrame]] = {}
        for market, frame in tagged:
            frames.setdefault(market, []).append(frame)
        for fs in frames.values():
            fs.sort(key=lambda f: f.t_ns)  # stable: file order among equal times
        for cap in captures:
            for snap in cap.snapshots:
                frames.setdefault(snap.market, [])
        if not frames:
            raise ValueError("the replay files hold no WebSocket frames or snapshots")
        return cls(frames, captures, speed)

    @property
    def markets(self) -> tuple[Market, ...]:
        return tuple(m for m in MARKETS if m in self.frames)

    def universe(self, market: Market) -> tuple[SymbolSpec, ...]:
        names = {s.split("@")[0].upper() for s in self.streams[market] if not s.startswith("!")}
        names |= {sym for (m, sym) in self.snapshots if m == market}
        return tuple(SymbolSpec(n, n, "", 8, 8, 10**8, 1.0 / len(names)) for n in sorted(names))

    def stream_spec(self, market: Market, name: str) -> StreamSpec | None:
        if name not in self.streams.get(market, ()):
            return None
        head, _, rest = name.partition("@")
        kind = rest.split("@")[0]
        symbol = None if head.startswith("!") else head.upper()
        route = "spot" if market == "spot" else ("public" if kind in _PUBLIC_KINDS else "market")
        return StreamSpec(name, market, kind, symbol, None, route)  # type: ignore[arg-type]

    def snapshot_for(self, market: Market) -> Callable[[str], bytes | None]:
        def pick(symbol: str) -> bytes | None:
            snaps = self.snapshots.get((market, symbol))
            if not snaps:
                return None
            before = [body for t, body in snaps if t <= self.position_ns]
            return before[-1] if before else snaps[0][1]
        return pick

    async def run(self, market_hubs: dict[Market, Hub]) -> None:
        # The hubs, not the Simulator: the simulator holds this replay (no import cycle).
        hubs = {m: market_hubs[m] for m in self.frames if m in market_hubs}
        while not any(n in hub.subs for m, hub in hubs.items() for n in self.streams[m]):
            await asyncio.sleep(0.01)
        self.started = True
        merged = sorted(((f, m) for m, fs in self.frames.items() for f in fs),
                        key=lambda x: x[0].t_ns)
        if not merged:
            self.finished = True
            return
        t0 = time.monotonic()
        first = merged[0][0].t_ns
        for i, (frame, market) in enumerate(merged):
            if self.speed > 0:
                due = (frame.t_ns - first) / 1e9 / self.speed
                wait = due - (time.monotonic() - t0)
                if wait > 0.001:
                    for hub in hubs.values():
                        hub.flush()
                    await asyncio.sleep(wait)
            elif i % 500 == 0:
                for hub in hubs.values():
                    hub.flush()
                await asyncio.sleep(0)
            self.position_ns = frame.t_ns
            hubs[market].emit(frame.stream, frame.data, i)
            self.sent += 1
        for hub in hubs.values():
            hub.flush()
        self.finished = True

    def stats(self) -> dict[str, Any]:
        return {"frames": sum(len(f) for f in self.frames.values()), "played": self.sent,
                "started": self.started, "finished": self.finished}
