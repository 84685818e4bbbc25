"""What an error while storing means, by SQLSTATE and type: a table (ingestor/writer/errors.py)."""

from __future__ import annotations

import asyncpg
import pytest

from ingestor.writer.errors import Kind, classify, kind_of_state


@pytest.mark.parametrize(("state", "kind"), [
    ("22P02", Kind.ROW),  # invalid text representation (JSON the server will not parse)
    ("22003", Kind.ROW),  # numeric value out of range
    ("23502", Kind.ROW),  # not null violation
    ("23514", Kind.ROW),  # check violation
    ("54000", Kind.ROW),  # program limit exceeded: index row size exceeds btree maximum
    ("P0001", Kind.ROW),  # raise_exception: a trigger refusing the row
    ("08006", Kind.AWAY),  # connection failure
    ("57P01", Kind.AWAY),  # admin shutdown
    ("53100", Kind.AWAY),  # disk full
    ("53300", Kind.AWAY),  # too many connections
    ("XX000", Kind.FATAL),  # internal error
    ("42P01", Kind.FATAL),  # undefined table
    ("42501", Kind.FATAL),  # insufficient privilege
    ("40P01", Kind.FATAL),  # deadlock detected: not expected of COPY in autocommit; the restart retries it
    ("P0002", Kind.FATAL),  # no data found: not a row refused
])
def test_kind_of_each_sqlstate(state: str, kind: Kind) -> None:
    assert kind_of_state(state) is kind


def test_exceptions_by_type() -> None:
    assert classify(asyncpg.exceptions.ProgramLimitExceededError("index row size")) is Kind.ROW
    assert classify(asyncpg.exceptions.InternalServerError("boom")) is Kind.FATAL
    assert classify(asyncpg.exceptions.ConnectionDoesNotExistError("gone")) is Kind.AWAY
    assert classify(ConnectionResetError()) is Kind.AWAY
    assert classify(TimeoutError()) is Kind.AWAY
    assert classify(asyncpg.InterfaceError("connection is closed")) is Kind.AWAY
    assert classify(ValueError("a bug of ours")) is Kind.FATAL
    assert classify(KeyError("table")) is Kind.FATAL
