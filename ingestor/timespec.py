"""Times typed on the command line, to Unix milliseconds (UTC).

Accepted forms (:data:`FORMS` is what error messages show):

* ISO 8601 dates and date-times: ``2026-11-27``, ``2026-11-27T10:00``, ``2026-11-27 10:00:00.250``,
  with an offset (``+02:00``, ``Z``) or without one, which means UTC (the tables store UTC, and a
  trader's charts are in UTC, so the local zone of the machine running the command is never used);
* Unix time as digits: seconds, or milliseconds from ``1e11`` up (``1e11`` s is the year 5138,
  ``1e11`` ms is 1973, so the two ranges of plausible values do not overlap);
* ``now``, and an offset from it: ``-30m``, ``-2h``, ``-1d``, ``-45s``, ``-1w``, ``now-2h``
  (``m`` is minutes: months have no fixed length).

:func:`parse_time` is pure (the current time is an argument); :class:`TimeParam` is the click
parameter type that supplies it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import click

FORMS = ("an ISO 8601 date or time (2026-11-27, 2026-11-27T10:00, 2026-11-27 10:00:00+02:00, ...Z; "
         "without an offset it is UTC), Unix seconds or milliseconds (1795773600, 1795773600000), "
         "now, or an offset from now (-45s, -30m, -2h, -1d, now-2h)")

UNIX_MS_FROM = 100_000_000_000  # digits at or above this are milliseconds, below it seconds

_UNIT_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_RELATIVE = re.compile(r"(?:now)?\s*([+-])\s*(\d+(?:\.\d+)?)\s*([smhdw])")
_DIGITS = re.compile(r"\d+")
# datetime.fromisoformat alone also takes any character as the date/time separator
# ("2026-11-27x10:00") and ISO week dates; the forms we document are checked first.
_ISO = re.compile(
    r"\d{4}-\d{2}-\d{2}"
    # An offset belongs to a time of day: ISO 8601 has none for a date alone.
    r"(?:[t ]\d{2}(?::\d{2}(?::\d{2}(?:[.,]\d{1,9})?)?)?\s*(?:z|[+-]\d{2}(?::?\d{2})?)?)?"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
# datetime's range, so that every value returned can become a timestamptz parameter.
_MIN_MS = (datetime(1, 1, 2, tzinfo=UTC) - _EPOCH) // _MS
_MAX_MS = (datetime(9999, 12, 31, tzinfo=UTC) - _EPOCH) // _MS


def _bad(text: str, why: str = "") -> ValueError:
    return ValueError(f"not a time: {text!r}{f' ({why})' if why else ''}; use {FORMS}")


def _iso_ms(text: str, s: str) -> int:
    s = s.replace(",", ".").replace("t", "T")
    # fromisoformat takes at most 6 fraction digits before 3.12; milliseconds need only 3.
    s = re.sub(r"(\.\d{6})\d+", r"\1", s)
    s = re.sub(r"\s*z$", "+00:00", s)
    s = re.sub(r"\s+([+-]\d)", r"\1", s)
    try:
        dt = datetime.fromisoformat(s)
    except ValueError as exc:
        raise _bad(text, str(exc)) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _MS


def parse_time(text: str, now_ms: int) -> int:
    """``text`` as Unix milliseconds (UTC); ``now_ms`` anchors ``now`` and the relative forms.

    Raises :class:`ValueError` naming the accepted forms when ``text`` is none of them.
    """
    s = text.strip().lower()
    if s == "now":
        ms = now_ms
    elif m := _RELATIVE.fullmatch(s):
        sign, amount, unit = m.groups()
        offset = round(float(amount) * _UNIT_MS[unit])
        ms = now_ms - offset if sign == "-" else now_ms + offset
    elif _DIGITS.fullmatch(s):
        n = int(s)
        ms = n if n >= UNIX_MS_FROM else n * 1000
    elif _ISO.fullmatch(s):
        ms = _iso_ms(text, s)
    else:
        raise _bad(text)
    if not _MIN_MS <= ms <= _MAX_MS:
        raise _bad(text, "out of range")
    return ms


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class TimeParam(click.ParamType):
    """A click option type: ``--from -2h`` becomes Unix milliseconds.

    All time options of one command read the clock once (kept in ``ctx.meta``), so ``--from -1h
    --to now`` is exactly an hour. ``clock`` is a seam for tests.
    """

    name = "time"
    _META_KEY = "ingestor.timespec.now_ms"

    def __init__(self, clock: Callable[[], int] = now_ms) -> None:
        self.clock = clock

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if ctx is None:
            now = self.clock()
        else:
            if self._META_KEY not in ctx.meta:
                ctx.meta[self._META_KEY] = self.clock()
            now = ctx.meta[self._META_KEY]
        try:
            return parse_time(str(value), now)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
