"""``parse_time`` and ``TimeParam``: every accepted form as a table, and the errors."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import click
import pytest
from click.testing import CliRunner

from ingestor.timespec import FORMS, TimeParam, parse_time


def ms(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp() * 1000)


NOW = ms(2026, 11, 27, 10, 0, 0)  # 1795773600000

ACCEPTED = [
    # ISO 8601; no offset means UTC
    ("2026-11-27", ms(2026, 11, 27)),
    ("2026-11-27T10:00", NOW),
    ("2026-11-27t10:00", NOW),
    ("2026-11-27 10:00:00", NOW),
    ("2026-11-27T10", NOW),
    ("2026-11-27T10:00:00Z", NOW),
    ("2026-11-27T10:00z", NOW),
    ("2026-11-27 10:00:00 Z", NOW),
    ("2026-11-27T10:00:00+00:00", NOW),
    ("2026-11-27T12:00:00+02:00", NOW),
    ("2026-11-27T05:30-04:30", NOW),
    ("2026-11-27T12:00+0200", NOW),
    ("2026-11-27 12:00:00 +02:00", NOW),
    ("2026-11-27T10:00:00.250", NOW + 250),
    ("2026-11-27T10:00:00,250Z", NOW + 250),
    ("2026-11-27T10:00:00.123456789Z", NOW + 123),  # below a millisecond: cut, not rounded
    ("1969-12-31T23:59:59Z", -1000),
    ("  2026-11-27T10:00  ", NOW),
    # Unix time: seconds below 1e11, milliseconds from it
    ("1795773600", NOW),
    ("1795773600000", NOW),
    ("0", 0),
    ("99999999999", 99_999_999_999_000),
    ("100000000000", 100_000_000_000),
    # now and offsets from it
    ("now", NOW),
    ("NOW", NOW),
    ("-45s", NOW - 45_000),
    ("-30m", NOW - 1_800_000),
    ("-2h", NOW - 7_200_000),
    ("-1d", NOW - 86_400_000),
    ("-1w", NOW - 7 * 86_400_000),
    ("-1.5h", NOW - 5_400_000),
    ("now-2h", NOW - 7_200_000),
    ("now - 2h", NOW - 7_200_000),
    ("now+15m", NOW + 900_000),
    ("+1d", NOW + 86_400_000),
    ("-0s", NOW),
]

REJECTED = [
    "", "   ", "yesterday", "today", "-30", "30m", "-2x", "now-", "now-h", "--2h", "-2 hours", "1e12",
    "1795773600.5", "-1795773600", "12:00", "10:00:00Z",
    "2026-13-01", "2026-02-30", "2026-11-27T25:00", "2026-11-27T10:61",
    "2026-11-27x10:00",  # fromisoformat would take any separator
    "2026-W48-5", "20261127T1000",  # ISO forms we do not document
    "2026-11-27+02:00",  # an offset needs a time of day
    "2026-11-27T10:00:00 CET", "2026/11/27",
    "99999999999999999999",  # past year 9999
    "-999999999d",
]


@pytest.mark.parametrize(("text", "want"), ACCEPTED)
def test_accepted(text: str, want: int) -> None:
    assert parse_time(text, NOW) == want


@pytest.mark.parametrize("text", REJECTED)
def test_rejected_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_time(text, NOW)
    assert repr(text) in str(exc.value) and FORMS in str(exc.value)


def test_why_is_given_for_a_bad_date() -> None:
    with pytest.raises(ValueError, match=r"'2026-02-30' \(day is out of range for month\)"):
        parse_time("2026-02-30", NOW)


def counting_clock() -> Iterator[int]:
    n = NOW
    while True:
        yield n
        n += 1_000


def test_time_param_converts_and_fails_like_click() -> None:
    param = TimeParam(clock=lambda: NOW)
    assert param.convert("-2h", None, None) == NOW - 7_200_000
    assert param.convert(NOW, None, None) == NOW  # a default already converted
    with pytest.raises(click.BadParameter, match="not a time: 'soon'"):
        param.convert("soon", None, None)


@pytest.mark.parametrize(("args", "code", "out"), [
    (["--from", "-1h", "--to", "now"], 0, f"{NOW - 3_600_000} {NOW}"),
    (["--from", "2026-11-27", "--to", "-1d"], 0, f"{ms(2026, 11, 27)} {NOW - 86_400_000}"),
    (["--from", "later"], 2, "Invalid value for '--from': not a time: 'later'"),
])
def test_time_options_share_one_reading_of_the_clock(args: list[str], code: int, out: str) -> None:
    clock = counting_clock()
    cmd = click.Command("span", params=[click.Option(["--from", "start"], type=TimeParam(lambda: next(clock))),
                                        click.Option(["--to", "end"], type=TimeParam(lambda: next(clock)))],
                        callback=lambda start, end: click.echo(f"{start} {end}"))
    result = CliRunner().invoke(cmd, args)
    assert result.exit_code == code
    assert out in result.output
