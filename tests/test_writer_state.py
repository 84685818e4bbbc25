"""The writer's state machine as a table: every allowed edge, and every other one refused."""

from __future__ import annotations

import pytest

from ingestor.writer.policy import Behind
from ingestor.writer.state import TRANSITIONS, Event, IllegalTransition, State, spooling, step

S, E = State, Event


def test_the_life_of_a_writer_through_an_outage() -> None:
    path = [(E.AWAY, S.SPOOLING), (E.AWAY, S.SPOOLING), (E.ANSWERS, S.REPLAYING), (E.AWAY, S.SPOOLING),
            (E.ANSWERS, S.REPLAYING), (E.EMPTIED, S.DIRECT), (E.DRAIN, S.DRAINING), (E.AWAY, S.DRAINING)]
    state = S.DIRECT
    for event, expected in path:
        state = step(state, event)
        assert state is expected, (event, state)


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", list(Event))
def test_every_pair_is_either_in_the_table_or_refused(state: State, event: Event) -> None:
    if (state, event) in TRANSITIONS:
        assert step(state, event) is TRANSITIONS[(state, event)]
    else:
        with pytest.raises(IllegalTransition, match=f"{event.value} is not allowed in state {state.value}"):
            step(state, event)


def test_failed_is_final_and_every_other_state_can_fail() -> None:
    for state in State:
        if state is S.FAILED:
            assert not any(s is S.FAILED for s, _ in TRANSITIONS)
        else:
            assert step(state, E.FATAL) is S.FAILED


def test_the_spool_is_left_only_through_replaying_it_to_its_end() -> None:
    # No edge from spooling straight to direct: batches behind a non-empty spool would
    # overtake it (a backfill must come after what was taken before it).
    assert (S.SPOOLING, E.EMPTIED) not in TRANSITIONS
    assert [s for (s, _), t in TRANSITIONS.items() if t is S.DIRECT] == [S.REPLAYING]
    assert spooling(S.SPOOLING) and spooling(S.REPLAYING) and not spooling(S.DIRECT)


def test_the_database_is_behind_after_the_backlog_stays_full_with_every_connection_busy() -> None:
    now = [0.0]
    behind = Behind(after_s=5.0, clock=lambda: now[0])
    for t in (0.0, 2.0, 4.9):
        now[0] = t
        assert not behind.observe(True, True)
    now[0] = 5.0
    assert behind.observe(True, True)
    # It starts over, and any break in between (a free connection, room in the backlog) resets it.
    for t, full, busy in ((6.0, True, True), (9.0, True, False), (10.0, True, True), (14.0, False, True),
                          (15.0, True, True), (19.9, True, True)):
        now[0] = t
        assert not behind.observe(full, busy), t
    now[0] = 20.0
    assert behind.observe(True, True)
