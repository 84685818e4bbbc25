"""What every child process does first: logging, signals, uvloop, and a watch on its parent.

Children ignore SIGINT (a terminal's Ctrl-C reaches the whole process group; the
supervisor decides the order of shutdown) and treat SIGTERM as "stop cleanly". A child
whose supervisor has died stops too, rather than run on unsupervised.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ingestor.config import Settings
from ingestor.logs import setup_logging

log = logging.getLogger(__name__)


# Young generation of the cyclic garbage collector (CPython's default: 700 allocations).
# Every worker allocates containers per message (a parsed dict, a row's parts, a list per
# diff level) that their reference counts free at once: a collection every 700 of them
# walks the batch still being built and promotes it, and the promotions bring full
# collections of everything.
GC_GEN0 = 10_000


def tune_gc() -> None:
    """What exists now (modules, settings, tables) is moved out of the collector's sight
    (``gc.freeze``), so a full collection walks only what came after, and the young
    generation is larger (``GC_GEN0``), so most per-message objects are freed by their
    reference counts before a collection sees them."""
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0, gen1, gen2)


class ChildContext:
    def __init__(self, settings: Settings, name: str, stop_event: Any) -> None:
        self.settings = settings
        self.name = name
        self.stop_event = stop_event  # multiprocessing.Event shared with the supervisor
        self.parent = os.getppid()
        self.stopping = asyncio.Event()

    @property
    def orphaned(self) -> bool:
        return os.getppid() != self.parent

    def release_queues(self, *queues: Any) -> None:
        """Let the process exit without waiting to push its queues' last items.

        A multiprocessing queue joins its feeder thread at exit, and that thread blocks
        for good when the pipe is full and nobody reads: status queues always (a lost
        last status is harmless), the batch queue only when the supervisor is gone.
        """
        for q in queues:
            if hasattr(q, "cancel_join_thread"):  # a batch pipe (wire/channel.py) has no feeder thread
                q.cancel_join_thread()

    def should_stop(self) -> bool:
        if self.stopping.is_set():
            return True
        if (self.stop_event is not None and self.stop_event.is_set()) or os.getppid() != self.parent:
            self.stopping.set()
        return self.stopping.is_set()

    async def watch(self, period_s: float = 0.1) -> None:
        while not self.should_stop():
            await asyncio.sleep(period_s)


def run_child(settings: Settings, name: str, stop_event: Any,
              main: Callable[[ChildContext], Coroutine[Any, Any, None]]) -> None:
    # Spawned: nothing of the parent's logging set-up is inherited; the settings say how.
    setup_logging(settings.log_level, settings.log_format, name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from ingestor.wire import copy_binary

    copy_binary.use_payload_type(settings.payload_type)  # the tables' type: the supervisor made it so
    import uvloop

    async def runner() -> None:
        ctx = ChildContext(settings, name, stop_event)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, ctx.stopping.set)
        tune_gc()
        await main(ctx)

    started = time.monotonic()
    uvloop.run(runner())
    log.info("stopped after %.1f s", time.monotonic() - started)
