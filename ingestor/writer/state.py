"""The writer's states and the only transitions between them (a pure table).

- ``direct``: batches go straight to the database;
- ``spooling``: the database is away (or behind): every batch goes to the disk spool, in
  the order taken, and is acknowledged once it is on disk;
- ``replaying``: the database answers again and the spool is replayed, oldest first; new
  batches still go to the spool behind it, so the order holds;
- ``draining``: ``DRAIN`` was taken: everything before it is committed (or spooled, when
  the database is away), then the writer exits 0;
- ``failed``: an error nobody understood: the writer exits non-zero, acknowledging
  nothing more, and the supervisor starts another one (the producers send again what was
  never acknowledged).

Tests: tests/test_writer_state.py.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    DIRECT = "direct"
    SPOOLING = "spooling"
    REPLAYING = "replaying"
    DRAINING = "draining"
    FAILED = "failed"


class Event(enum.Enum):
    AWAY = "away"  # a group's connection broke, or the database fell behind
    SPOOL_LEFT = "spool_left"  # at start: a spool left by an earlier writer
    ANSWERS = "answers"  # the database answers while batches wait in the spool
    EMPTIED = "emptied"  # the spool has been replayed to its end
    DRAIN = "drain"  # DRAIN taken from the queue
    FATAL = "fatal"  # an error that is not understood


S, E = State, Event
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.DIRECT, E.AWAY): S.SPOOLING,
    (S.DIRECT, E.SPOOL_LEFT): S.SPOOLING,
    (S.SPOOLING, E.AWAY): S.SPOOLING,
    (S.SPOOLING, E.ANSWERS): S.REPLAYING,
    (S.REPLAYING, E.ANSWERS): S.REPLAYING,
    (S.REPLAYING, E.AWAY): S.SPOOLING,
    (S.REPLAYING, E.EMPTIED): S.DIRECT,
    (S.DIRECT, E.DRAIN): S.DRAINING,
    (S.SPOOLING, E.DRAIN): S.DRAINING,
    (S.REPLAYING, E.DRAIN): S.DRAINING,
    # Groups that fail while draining are spooled; the writer still only finishes.
    (S.DRAINING, E.AWAY): S.DRAINING,
    (S.DRAINING, E.ANSWERS): S.DRAINING,
    (S.DRAINING, E.EMPTIED): S.DRAINING,
    **{(s, E.FATAL): S.FAILED for s in State if s is not S.FAILED},
}


class IllegalTransition(RuntimeError):
    """An event the state does not allow: a bug in the writer, which then stops loudly."""


def step(state: State, event: Event) -> State:
    """The state after ``event`` in ``state``; IllegalTransition if the table has no such edge."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"writer: {event.value} is not allowed in state {state.value}") from None


def spooling(state: State) -> bool:
    """Whether new batches go to the spool (to keep the order behind what waits there)."""
    return state in (S.SPOOLING, S.REPLAYING)
