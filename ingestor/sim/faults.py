"""Fault descriptions: parsed from ``--faults`` or posted to the admin endpoint.

Spec grammar (comma-separated items)::

    KIND@AT[/EVERY][:key=value]...

``AT`` and ``EVERY`` are durations since start (``5s``, ``250ms``, ``2m``). Keys:
``market`` (spot|futures), ``symbol`` (BTCUSDT), ``count`` (events or requests
affected, default 1), ``duration`` (seconds, for stall; 0 = until the connection
closes), ``delay`` (ms, for rest_slow). REST faults apply to the market's next
``count`` requests whatever their symbol.

Example: ``drop@5s/30s:market=futures,gap@10s:symbol=BTCUSDT:count=2,rest_429@20s:count=3``
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ingestor.binance.streams import MARKETS, Market

# kind -> what it does
FAULT_KINDS: dict[str, str] = {
    "drop": "close matching connections abruptly (TCP reset, no close frame)",
    "stall": "matching connections get no data, no pings and no pongs for `duration` s",
    "gap": "skip the next `count` diff-depth events of matching streams (a sequence gap)",
    "skip_trades": "skip the next `count` aggTrade events on the stream (REST still has them)",
    "malformed": "send a truncated JSON frame to matching connections",
    "non_json": "send a frame that is not JSON",
    "unknown_event": "send a well-formed event of an unknown type",
    "hold_close": "matching connections stop reading the client and flood it with pings: data flows on, but the "
                  "client's close cannot complete (its send buffer is full)",
    "bogus_id": "send matching connections one event per kind of stream with an absurd id (2**62), or an event "
                "time 11 days ahead for streams without ids",
    "rest_slow": "delay the next `count` REST replies by `delay` ms",
    "rest_5xx": "answer the next `count` REST requests with 503",
    "rest_429": "answer the next `count` REST requests with 429 and Retry-After (`duration` s, default 30)",
    "rest_bad_body": "answer the next `count` REST requests with 200 and a JSON array of strings, whatever "
                     "the endpoint returns",
    "rest_stale": "answer the next `count` REST requests, if depth snapshots, with one older than every diff "
                  "(lastUpdateId 1): a book can never sync from it",
}


class FaultSpecError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    at_s: float = 0.0
    every_s: float | None = None
    market: Market | None = None
    symbol: str | None = None
    count: int = 1
    duration: float = 0.0
    delay: int = 1000

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fault:
        """Build from the admin endpoint's JSON, rejecting unknown keys."""
        allowed = {f.name for f in fields(cls)}
        unknown = set(data) - allowed
        if unknown:
            raise FaultSpecError(f"unknown fault field(s): {', '.join(sorted(unknown))}")
        if "kind" not in data:
            raise FaultSpecError("a fault needs a 'kind'")
        return _validated(cls(**data))


def _duration(text: str) -> float:
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix):
            try:
                return float(text[: -len(suffix)]) * scale
            except ValueError:
                break
    raise FaultSpecError(f"bad duration {text!r} (use e.g. 5s, 250ms, 2m)")


def _validated(f: Fault) -> Fault:
    if f.kind not in FAULT_KINDS:
        raise FaultSpecError(f"unknown fault kind {f.kind!r}; known: {', '.join(FAULT_KINDS)}")
    if f.market is not None and f.market not in MARKETS:
        raise FaultSpecError(f"unknown market {f.market!r}")
    if f.count < 1:
        raise FaultSpecError("count must be >= 1")
    if f.every_s is not None and f.every_s <= 0:
        raise FaultSpecError("the repeat interval must be > 0")
    return f


def parse_faults(spec: str) -> tuple[Fault, ...]:
    """Parse a ``--faults`` string (see the module docstring)."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        head, *pairs = item.split(":")
        kind, sep, when = head.partition("@")
        if not sep:
            raise FaultSpecError(f"{item!r}: expected KIND@TIME")
        at, _, every = when.partition("/")
        kw: dict[str, Any] = {"kind": kind, "at_s": _duration(at)}
        if every:
            kw["every_s"] = _duration(every)
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq:
                raise FaultSpecError(f"{item!r}: expected key=value, got {pair!r}")
            if key in ("count", "delay"):
                kw[key] = int(value)
            elif key == "duration":
                kw[key] = float(value)
            elif key in ("market", "symbol"):
                kw[key] = value.upper() if key == "symbol" else value
            else:
                raise FaultSpecError(f"{item!r}: unknown key {key!r}")
        out.append(_validated(Fault(**kw)))
    return tuple(out)
