"""What an error while storing means, by its kind and SQLSTATE (pure).

Three answers, and nothing in between:

- ``ROW``: the server refused something in the rows themselves: class 22 (data
  exception), 23 (integrity constraint), 54 (program limit exceeded, e.g. "index row size
  exceeds btree maximum" for an over-long key) and P0001 (an exception a trigger raised
  for a row). The group is split until the refused rows are alone; they are kept in
  ``rejected_rows`` and the rest is stored.
- ``AWAY``: the database cannot take anything now: the connection broke (a socket error,
  class 08), the server is shutting down or refusing connections (class 57, operator
  intervention), or it is out of resources (class 53: disk full, out of memory, too many
  connections). The group is kept (spooled) and stored once the database answers.
- ``FATAL``: anything else (a missing table, a permission, an internal error, a bug of
  ours). Retrying would wedge the writer with /health green, and dropping the group would
  lose it: the writer stops loudly instead (non-zero exit), the supervisor restarts it and
  the producers send every unacknowledged batch again.

PostgreSQL's SQLSTATE classes: https://www.postgresql.org/docs/current/errcodes-appendix.html
Tests: tests/test_writer_errors.py (the table), tests/test_writer_store.py (each kind
against a real server).
"""

from __future__ import annotations

import enum

import asyncpg


class Kind(enum.Enum):
    ROW = "row"
    AWAY = "away"
    FATAL = "fatal"


ROW_CLASSES = frozenset({"22", "23", "54"})
ROW_STATES = frozenset({"P0001"})
AWAY_CLASSES = frozenset({"08", "53", "57"})
# Below asyncpg's PostgresError: the socket or the client's view of the connection.
# InternalClientError: asyncpg's protocol state broken under it, seen when the server
# terminated the backend while a COPY began ("cannot switch to state 21; another operation
# is in progress"): the connection is unusable, so it counts as lost (the group is stored
# again on a new one), not as an error nobody understood.
CONNECTION_TYPES = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, TimeoutError,
                    asyncpg.exceptions._base.InternalClientError)


def kind_of_state(sqlstate: str) -> Kind:
    """The kind of a server error by its five-character SQLSTATE."""
    if sqlstate in ROW_STATES or sqlstate[:2] in ROW_CLASSES:
        return Kind.ROW
    if sqlstate[:2] in AWAY_CLASSES:
        return Kind.AWAY
    return Kind.FATAL


def classify(exc: BaseException) -> Kind:
    """The kind of any exception raised while storing a group."""
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None)
        if isinstance(state, str) and len(state) == 5:
            return kind_of_state(state)
        # asyncpg's client-side connection errors carry no SQLSTATE of their own.
        return Kind.AWAY if isinstance(exc, asyncpg.PostgresConnectionError) else Kind.FATAL
    if isinstance(exc, CONNECTION_TYPES):
        return Kind.AWAY
    return Kind.FATAL


def sqlstate(exc: BaseException) -> str:
    """The SQLSTATE of a server error ('' for anything else)."""
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else ""
