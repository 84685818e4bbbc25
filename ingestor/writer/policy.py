"""When the writer stops sending to the database and spools instead (pure, with a clock).

Two reasons: a group's connection broke (``copier.Lost``: the state machine's ``away``),
or the database is *behind*: the writer's backlog has been full with every connection
busy for ``after_s`` without a break. A slow database then gets its backlog moved to disk
(acknowledged there) instead of holding every producer's batches in memory, and the spool
is replayed at its pace. Tests: tests/test_writer_state.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

SPOOL_AFTER_S = 5.0


@dataclass
class Behind:
    after_s: float = SPOOL_AFTER_S
    clock: Callable[[], float] = field(default=time.monotonic)
    since: float | None = None  # when the backlog was last seen full with every connection busy

    def observe(self, backlog_full: bool, all_busy: bool) -> bool:
        """One look at the writer; True (once, then it starts over) when it has been behind
        for ``after_s``."""
        if not (backlog_full and all_busy):
            self.since = None
            return False
        now = self.clock()
        if self.since is None:
            self.since = now
            return False
        if now - self.since >= self.after_s:
            self.since = None
            return True
        return False
