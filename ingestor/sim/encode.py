"""Binance payloads as bytes, in the documented field names, order and types.

Field order and types follow Binance's public API documentation examples (kept as
test data under tests/data/binance_docs/). Prices and quantities are decimal strings,
ids and times integers. Values arrive here as integers in units of 10^-dp (ticks,
lots) so that formatting is exact: nothing goes through float.

Spot renders prices and quantities with 8 decimals ("0.35130000"); USD-M renders them
with the symbol's own precision ("7.6110"), as the real captures show.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def fixed(n: int, dp: int) -> str:
    """Render ``n * 10**-dp`` with exactly ``dp`` decimals (``fixed(12345, 2) == "123.45"``)."""
    if dp == 0:
        return str(n)
    sign = "-" if n < 0 else ""
    s = str(abs(n)).rjust(dp + 1, "0")
    return f"{sign}{s[:-dp]}.{s[-dp:]}"


def agg_trade_spot(E: int, s: str, a: int, p: str, q: str, f: int, l: int, T: int, m: bool) -> bytes:  # noqa: E741,N803
    # e: event type, E: event time, s: symbol, a: aggregate trade id, p: price,
    # q: quantity, f/l: first/last trade id, T: trade time, m: buyer is the maker
    # (so the taker sold), M: "ignore" (always true in practice).
    return (
        f'{{"e":"aggTrade","E":{E},"s":"{s}","a":{a},"p":"{p}","q":"{q}","f":{f},"l":{l},'
        f'"T":{T},"m":{"true" if m else "false"},"M":true}}'
    ).encode()


def agg_trade_futures(E: int, s: str, a: int, p: str, q: str, f: int, l: int, T: int, m: bool) -> bytes:  # noqa: E741,N803
    return (
        f'{{"e":"aggTrade","E":{E},"s":"{s}","a":{a},"p":"{p}","q":"{q}","f":{f},"l":{l},'
        f'"T":{T},"m":{"true" if m else "false"}}}'
    ).encode()


def _levels(levels: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'["{p}","{q}"]' for p, q in levels)


def depth_update_spot(
    E: int, s: str, U: int, u: int, bids: Iterable[tuple[str, str]], asks: Iterable[tuple[str, str]]  # noqa: N803
) -> bytes:
    # U/u: first/final update id in the event; b/a: [price, new absolute quantity],
    # quantity "0" removes the level.
    return (
        f'{{"e":"depthUpdate","E":{E},"s":"{s}","U":{U},"u":{u},'
        f'"b":[{_levels(bids)}],"a":[{_levels(asks)}]}}'
    ).encode()


def depth_update_futures(
    E: int, T: int, s: str, U: int, u: int, pu: int,  # noqa: N803
    bids: Iterable[tuple[str, str]], asks: Iterable[tuple[str, str]],
) -> bytes:
    # T: transaction time; pu: the previous event's u on this stream, the continuity
    # check USD-M clients must use (U is not prev u + 1 there).
    return (
        f'{{"e":"depthUpdate","E":{E},"T":{T},"s":"{s}","U":{U},"u":{u},"pu":{pu},'
        f'"b":[{_levels(bids)}],"a":[{_levels(asks)}]}}'
    ).encode()


def mark_price(E: int, s: str, p: str, i: str, P: str, r: str, T: int) -> str:  # noqa: N803
    # p: mark price, i: index price, P: estimated settle price, r: funding rate,
    # T: next funding time. Returned as str so !markPrice@arr can join them cheaply.
    return (
        f'{{"e":"markPriceUpdate","E":{E},"s":"{s}","p":"{p}","i":"{i}","P":"{P}",'
        f'"r":"{r}","T":{T}}}'
    )


def mark_price_array(items: Sequence[str]) -> bytes:
    return ("[" + ",".join(items) + "]").encode()


def force_order(E: int, s: str, S: str, q: str, p: str, ap: str, T: int) -> bytes:  # noqa: N803
    # o.S: side of the liquidation order (SELL = a long was liquidated), o.o: LIMIT,
    # o.f: IOC, q: original quantity, p: price, ap: average price, X: FILLED,
    # l: last filled quantity, z: accumulated filled quantity, T: trade time.
    return (
        f'{{"e":"forceOrder","E":{E},"o":{{"s":"{s}","S":"{S}","o":"LIMIT","f":"IOC",'
        f'"q":"{q}","p":"{p}","ap":"{ap}","X":"FILLED","l":"{q}","z":"{q}","T":{T}}}}}'
    ).encode()


def rest_agg_trade_spot(a: int, p: str, q: str, f: int, l: int, T: int, m: bool) -> str:  # noqa: E741,N803
    return (
        f'{{"a":{a},"p":"{p}","q":"{q}","f":{f},"l":{l},"T":{T},'
        f'"m":{"true" if m else "false"},"M":true}}'
    )


def rest_agg_trade_futures(a: int, p: str, q: str, f: int, l: int, T: int, m: bool) -> str:  # noqa: E741,N803
    return f'{{"a":{a},"p":"{p}","q":"{q}","f":{f},"l":{l},"T":{T},"m":{"true" if m else "false"}}}'


def rest_depth(
    last_update_id: int,
    bids: Iterable[tuple[str, str]],
    asks: Iterable[tuple[str, str]],
    E: int | None = None,  # noqa: N803
    T: int | None = None,  # noqa: N803
) -> bytes:
    # USD-M adds E (message output time) and T (transaction time); spot has neither.
    times = "" if E is None else f'"E":{E},"T":{T},'
    return (
        f'{{"lastUpdateId":{last_update_id},{times}"bids":[{_levels(bids)}],'
        f'"asks":[{_levels(asks)}]}}'
    ).encode()


def envelope(stream: str, data: bytes) -> bytes:
    """Combined-stream wrapper: ``{"stream":"<name>","data":<payload>}``."""
    return b'{"stream":"' + stream.encode() + b'","data":' + data + b"}"
