"""``Delivery`` on its own, over real multiprocessing queues: this test plays the writer
(it reads the batch queue and puts acknowledgements, as ``writer/process.py`` does)."""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
import tracemalloc
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ingestor.config import MIN_BUFFER_MB, ConfigError, load_settings
from ingestor.supervisor import buffer_budgets
from ingestor.wire.batching import Batch
from ingestor.wire.delivery import RESUME_FRACTION, Delivery, WriterLink

CTX = mp.get_context("spawn")


class Writer:
    """The writer's side of a producer's link: the batch queue, the ack queue, the epoch."""

    def __init__(self, budget: int = 2**30) -> None:
        self.queue = CTX.Queue()
        self.acks = CTX.Queue()
        self.epoch = CTX.Value("q", 1)
        self.link = WriterLink(self.queue, self.acks, self.epoch, budget)

    def take(self, n: int) -> list[Batch]:
        return [self.queue.get(timeout=10) for _ in range(n)]

    def ack(self, d: Delivery, *seqs: int, incarnation: int | None = None) -> None:
        self.acks.put((d.incarnation if incarnation is None else incarnation, seqs))

    def restart(self) -> None:
        with self.epoch.get_lock():
            self.epoch.value += 1

    def close(self) -> None:
        for q in (self.queue, self.acks):
            q.cancel_join_thread()  # a test that failed midway must not hang on a full pipe at exit
            q.close()


@pytest.fixture
def writer() -> Iterator[Writer]:
    w = Writer()
    yield w
    w.close()


def batch(i: int, size: int = 100) -> Batch:
    return Batch("agg_trades", 1, bytes([i % 256]) * size, array("q", [i]).tobytes())


def poll_until(d: Delivery, cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Acks travel through a pipe (the putting side's feeder thread): poll until they are in."""
    deadline = time.monotonic() + timeout
    while True:
        d.poll()
        if cond():
            return
        if time.monotonic() > deadline:
            raise AssertionError("the acknowledgements never arrived")
        time.sleep(0.01)


def test_a_batch_is_kept_until_acknowledged(writer: Writer) -> None:
    d = Delivery("socket-0", writer.link)
    for i in range(3):
        d.send(batch(i))
    got = writer.take(3)
    assert [(b.producer, b.incarnation, b.seq) for b in got] == [("socket-0", d.incarnation, s) for s in (1, 2, 3)]
    writer.ack(d, 1, 2, incarnation=d.incarnation + 1)  # a previous incarnation's: not ours
    writer.ack(d, 1, 2)
    poll_until(d, lambda: list(d.pending) == [3])
    assert d.pending_bytes == got[2].nbytes


def test_a_new_writer_is_sent_everything_not_acknowledged(writer: Writer) -> None:
    d = Delivery("rest", writer.link)
    d.send(batch(1))
    d.send(batch(2))
    writer.take(2)
    writer.ack(d, 1)
    poll_until(d, lambda: list(d.pending) == [2])
    writer.restart()
    d.poll()
    again = writer.take(1)
    assert [(b.seq, b.data) for b in again] == [(2, batch(2).data)] and d.resent == 1
    d.poll()  # the same epoch: nothing more
    with pytest.raises(queue.Empty):
        writer.queue.get(timeout=0.2)


def test_marks_are_safe_only_once_they_and_every_batch_before_are_acknowledged(writer: Writer) -> None:
    d = Delivery("socket-0", writer.link)
    d.send(batch(1), ("aggTrade", 1))
    d.send(batch(2), ("aggTrade", 2))
    d.send(batch(3), ("depthUpdate", 3))
    writer.ack(d, 2, 3)
    poll_until(d, lambda: list(d.pending) == [1])
    assert d.safe_marks() == {}  # batch 1 may still be lost: nothing after it is safe
    writer.ack(d, 1)
    poll_until(d, lambda: not d.pending)
    assert d.safe_marks() == {"aggTrade": 2, "depthUpdate": 3}
    writer.take(3)


async def test_over_budget_pauses_and_keeps_every_batch() -> None:
    size = 1000
    w = Writer(budget=10 * (size + 8))  # ten batches' worth
    try:
        d = Delivery("socket-0", w.link)
        for i in range(1, 31):  # the writer is stalled: nothing is read, nothing acknowledged
            d.send(batch(i, size), ("aggTrade", i))
            assert d.paused == (i >= 10), i
        assert list(d.pending) == list(range(1, 31)) and d.pending_bytes == 30 * (size + 8)
        assert d.safe_marks() == {} and d.pauses == 1
        assert d.status() == {"buffer_bytes": 30 * (size + 8), "buffer_budget_bytes": 10 * (size + 8),
                              "backpressure": True, "backpressure_pauses": 1}
        assert not await d.wait_for_room(lambda: True)  # told to stop while waiting: no room
        w.ack(d, *range(1, 21))
        poll_until(d, lambda: len(d.pending) == 10)
        assert d.paused  # at the budget, not under the resume mark
        w.ack(d, *range(21, 24))
        poll_until(d, lambda: len(d.pending) == 7)
        assert 7 * (size + 8) <= RESUME_FRACTION * d.max_bytes and not d.paused
        assert await d.wait_for_room(lambda: False)
        assert d.safe_marks() == {"aggTrade": 23}
        assert [b.seq for b in w.take(30)] == list(range(1, 31))  # every batch reached the writer
    finally:
        w.close()


def test_resend_to_a_new_writer_shares_the_batches_memory(writer: Writer) -> None:
    """A stalled writer: the feeder thread holds the batches not yet in the pipe; sending
    them again to a new writer must not copy them."""
    size = 1 << 20
    tracemalloc.start()
    try:
        d = Delivery("socket-0", writer.link)
        for i in range(20):
            d.send(batch(i, size))
        before = tracemalloc.get_traced_memory()[0]
        writer.restart()
        d.poll()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert d.resent == 20
    # 20 MB sent again; what is new is at most the pickle of the batch the feeder thread is
    # writing now, and the pipe's few kB (a copy would be 20 batches' worth).
    assert after - before < 3 * size, (before, after)
    got = writer.take(40)
    assert sorted(b.seq for b in got) == sorted([*range(1, 21), *range(1, 21)])


def test_budgets_give_the_socket_workers_most_and_sum_to_the_setting() -> None:
    total = 1024 * 2**20
    b = buffer_budgets(total, 3, features=True)
    assert set(b) == {"socket-0", "socket-1", "socket-2", "rest", "features"}
    assert sum(b.values()) <= total and sum(b.values()) > total - 3
    assert min(b[f"socket-{i}"] for i in range(3)) > max(b["rest"], b["features"])
    assert set(buffer_budgets(total, 1, features=False)) == {"socket-0", "rest"}


@pytest.mark.parametrize("raw, ok", [("1024", True), (str(MIN_BUFFER_MB), True), (str(MIN_BUFFER_MB - 1), False)])
def test_max_buffer_mb_is_validated(tmp_path: Path, raw: str, ok: bool) -> None:
    env: dict[str, Any] = {"INGESTOR_MAX_BUFFER_MB": raw}
    if ok:
        assert load_settings({}, env, tmp_path / ".env").max_buffer_mb == int(raw)
    else:
        with pytest.raises(ConfigError, match="max_buffer_mb"):
            load_settings({}, env, tmp_path / ".env")
