"""``ingestor report``: one symbol's features over a time range, drawn to an image file.

The range is read with one index range scan, capped: past :data:`MAX_BARS` bars a chart 1400
pixels wide shows nothing more (a bar would be a tenth of a pixel), so the user is told to pick
a bigger bar or a shorter range instead of waiting for a picture that cannot show them.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg

from ingestor.features import query
from ingestor.features.query import NoFeatures

MAX_BARS = 20_000


class ReportError(ValueError):
    """A report that cannot be drawn as asked (too many bars, unknown image format); the message
    says what to change."""


async def report(dsn: str, market: str, symbol: str, start_ms: int, end_ms: int, bar_seconds: int | None,
                 out: Path, max_bars: int = MAX_BARS) -> str:
    """Draw bars starting in ``[start_ms, end_ms)`` to ``out``; returns the line to print.

    Raises :class:`NoFeatures` when the range holds no bars, :class:`ReportError` above ``max_bars``
    bars or for a file suffix that is no image format.
    """
    from ingestor.features.chart import render, supported_formats

    fmt = out.suffix.lstrip(".").lower()
    if fmt not in supported_formats():
        raise ReportError(f"cannot write {out}: the file name must end in one of "
                          f"{', '.join('.' + f for f in sorted(supported_formats()))}")
    start, end = query.utc(start_ms), query.utc(end_ms)
    span = f"between {query.fmt_time(start)} and {query.fmt_time(end)} UTC"
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        sizes = await query.bar_sizes(conn, market, symbol)
        bar = query.choose_bar_seconds(sizes, market, symbol, bar_seconds, start, end)
        recs = await query.in_range(conn, market, symbol, bar, start, end, max_bars + 1)
    finally:
        await conn.close()
    if not recs:
        raise NoFeatures(f"no {bar} s bars of {market} {symbol} {span}; stored: {query.describe(sizes)}")
    if len(recs) > max_bars:
        about = (end_ms - start_ms) // (bar * 1000)
        bigger = [s.bar_seconds for s in sizes if s.bar_seconds > bar]
        hint = f" (stored: {', '.join(f'{b} s' for b in bigger)})" if bigger else ""
        raise ReportError(f"more than {max_bars:,} {bar} s bars {span} (up to {about:,}): pass a bigger "
                          f"--bar{hint} or a shorter range")
    render(recs, market, symbol, bar, out)
    first, last = query.fmt_time(recs[0]["bar_time"]), query.fmt_time(recs[-1]["bar_time"])
    return f"wrote {out}: {len(recs):,} {bar} s bars of {market} {symbol}, {first} to {last} UTC"
