"""The writer as a real process against a real PostgreSQL, with the test in the
supervisor's and the producers' place: a real multiprocessing queue, real ack queues, the
writer epoch, a ``Delivery`` sending batches and resending what was never acknowledged.

Faults are real: an item on the queue that will not unpickle (the reader thread's error),
a trigger in the test database raising an error the writer does not understand. The rule
checked: the writer stops loudly (non-zero exit), and the next writer stores every batch
exactly once."""

from __future__ import annotations

import array
import asyncio
import multiprocessing as mp
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from ingestor.config import Settings
from ingestor.wire import rows
from ingestor.wire.batching import Batch
from ingestor.wire.delivery import Delivery, WriterLink
from ingestor.writer import process as writer_process

from .pipeline import wait_until

T0 = 1_795_132_800_000


def trade_batch(first: int, n: int, symbol: str = "BTCUSDT") -> Batch:
    data = []
    times = []
    for a in range(first, first + n):
        e = T0 + a
        msg = {"e": "aggTrade", "E": e, "s": symbol, "a": a, "p": "100.0", "q": "1", "f": a, "l": a, "T": e - 3,
               "m": False}
        data.append(rows.agg_trade("futures", msg, orjson.dumps(msg)))
        times.append(e)
    return Batch("agg_trades", n, b"".join(data), array.array("q", times).tobytes())


class Unpicklable:
    """Pickles fine; loading it calls ``int("poison")``, which raises ValueError: what the
    writer's reader thread meets when an item on its queue cannot be read back."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return int, ("poison",)


class Harness:
    """One producer, the writer's queues, and writer processes started as the supervisor
    starts them (the epoch moved first, so the producer sends again what is unacknowledged)."""

    def __init__(self, dsn: str, data_dir: Path) -> None:
        self.ctx = mp.get_context("spawn")
        self.dsn = dsn
        self.settings = Settings(dsn=dsn, data_dir=data_dir, writer_connections=2)
        self.queue = self.ctx.Queue()
        self.status = self.ctx.Queue()
        self.acks = {"producer": self.ctx.Queue()}
        self.epoch = self.ctx.Value("q", 0)
        self.delivery = Delivery("producer", WriterLink(self.queue, self.acks["producer"], self.epoch))
        self.writers: list[Any] = []

    def start_writer(self) -> Any:
        from ingestor.supervisor import release_reader_lock

        if self.writers:  # as the supervisor does: a writer that died waiting on the queue held its lock
            release_reader_lock(self.queue)
        with self.epoch.get_lock():
            self.epoch.value += 1
        proc = self.ctx.Process(target=writer_process.main, name="writer", daemon=True,
                                args=(self.settings, "writer", self.dsn, self.queue, self.status, self.acks))
        proc.start()
        self.writers.append(proc)
        return proc

    @property
    def writer(self) -> Any:
        return self.writers[-1]

    def drain_status(self) -> None:
        while True:
            try:
                self.status.get_nowait()
            except Exception:  # noqa: BLE001 - queue.Empty: nothing more
                return

    async def wait_exit(self, timeout: float, what: str) -> int:
        async def exited() -> bool:
            self.delivery.poll()
            self.drain_status()
            return self.writer.exitcode is not None

        await wait_until(exited, timeout, what)
        return int(self.writer.exitcode)

    async def supervise_until_acked(self, timeout: float) -> int:
        """Restart every writer that exits (as the supervisor does) until the producer has
        every batch acknowledged; returns how many writers exited non-zero."""
        failures = 0

        async def acked() -> bool:
            nonlocal failures
            self.delivery.poll()
            self.drain_status()
            if self.writer.exitcode is not None:
                assert self.writer.exitcode != 0, "a writer exited 0 before DRAIN"
                failures += 1
                self.start_writer()
            return not self.delivery.pending

        await wait_until(acked, timeout, "every batch acknowledged")
        return failures

    async def drain(self) -> int:
        self.queue.put(writer_process.DRAIN)
        return await self.wait_exit(30, "the writer to drain and exit")

    def close(self) -> None:
        for proc in self.writers:
            if proc.exitcode is None:
                proc.kill()
                proc.join(5)


async def trade_ids(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r[0] for r in await conn.fetch("SELECT aggregate_trade_id FROM agg_trades ORDER BY 1")]
    finally:
        await conn.close()


async def execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def test_an_item_that_will_not_unpickle_ends_the_writer_and_the_next_one_stores_everything(
        system_db: str, tmp_path: Path) -> None:
    """Issue 16 item 5: the reader thread's error ends the writer (non-zero exit), never a
    reader dead in silence; the next writer gets the unacknowledged batches again."""
    h = Harness(system_db, tmp_path)
    try:
        h.start_writer()
        for i in range(3):
            h.delivery.send(trade_batch(1 + i * 100, 100))
        h.queue.put(Unpicklable())
        for i in range(3, 6):
            h.delivery.send(trade_batch(1 + i * 100, 100))
        code = await h.wait_exit(30, "the writer to exit after the reader thread's error")
        assert code != 0
        h.start_writer()
        assert await h.supervise_until_acked(60) == 0
        assert await h.drain() == 0
    finally:
        h.close()
    assert await trade_ids(system_db) == list(range(1, 601))  # every trade, once


async def test_an_error_the_writer_does_not_understand_stops_it_loudly_and_nothing_is_lost(
        system_db: str, tmp_path: Path) -> None:
    """Issue 16 item 1: a server error of an unhandled class (XX000, raised by a trigger
    for the first attempts; a sequence counts them, since it is not rolled back) stops the
    writer with a non-zero exit instead of a retry loop or a dropped group; the writers
    after it store every batch exactly once."""
    await execute(system_db, """
        CREATE SEQUENCE writer_fault;
        CREATE FUNCTION writer_fault() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('writer_fault') <= 2 THEN
                RAISE EXCEPTION 'injected internal error' USING ERRCODE = 'XX000';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER writer_fault BEFORE INSERT ON agg_trades FOR EACH ROW EXECUTE FUNCTION writer_fault();
    """)
    h = Harness(system_db, tmp_path)
    try:
        h.start_writer()
        for i in range(5):
            h.delivery.send(trade_batch(1 + i * 100, 100))
        code = await h.wait_exit(30, "the writer to exit on the unhandled error")
        assert code != 0
        h.start_writer()
        await h.supervise_until_acked(90)
        assert await h.drain() == 0
    finally:
        h.close()
    assert await trade_ids(system_db) == list(range(1, 501))  # every trade, once


async def test_a_spool_directory_others_may_write_to_stops_the_writer_with_a_clear_error(
        system_db: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Issue 16 item 9: whoever may write to the spool directory decides what the writer
    stores; the writer refuses it and exits non-zero, saying why."""
    h = Harness(system_db, tmp_path)
    spool = writer_process.spool_dir(tmp_path, system_db)
    spool.mkdir(parents=True)
    spool.chmod(0o777)
    try:
        h.start_writer()
        assert await h.wait_exit(30, "the writer to refuse its spool directory") != 0
    finally:
        h.close()
    err = capfd.readouterr().err
    assert "writer cannot start" in err and "writable by others" in err, err


async def test_a_spool_segment_whose_replay_fails_stays_on_disk_until_it_is_committed(tmp_path: Path) -> None:
    """Issue 16 item 1, the spool half: a segment is removed only after the commits that
    hold all of its rows. The writer spools while the database is away; when it is back,
    the replay meets an error the writer does not understand (XX000 while a flag row
    exists): the writer exits non-zero and the segment stays; the next writer, with the
    flag gone, replays it and every trade is stored once."""
    from ingestor.db.embedded import EmbeddedPostgres
    from ingestor.db.migrate import migrate

    server = EmbeddedPostgres(tmp_path / "db")
    dsn = await asyncio.to_thread(server.start)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        await conn.execute("""
            CREATE TABLE writer_fault_on (x int);
            INSERT INTO writer_fault_on VALUES (1);
            CREATE FUNCTION writer_fault() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF EXISTS (SELECT 1 FROM writer_fault_on) THEN
                    RAISE EXCEPTION 'injected internal error' USING ERRCODE = 'XX000';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER writer_fault BEFORE INSERT ON agg_trades FOR EACH ROW EXECUTE FUNCTION writer_fault();
        """)
    finally:
        await conn.close()
    await asyncio.to_thread(server.stop)
    h = Harness(dsn, tmp_path / "data")
    spool = writer_process.spool_dir(tmp_path / "data", dsn)
    try:
        h.start_writer()  # the database is away: everything goes to the spool, acknowledged there
        for i in range(4):
            h.delivery.send(trade_batch(1 + i * 100, 100))

        async def spooled() -> bool:
            h.delivery.poll()
            h.drain_status()
            return not h.delivery.pending

        await wait_until(spooled, 60, "every batch spooled and acknowledged")
        assert list(spool.glob("*.spool"))
        server = EmbeddedPostgres(tmp_path / "db")
        await asyncio.to_thread(server.start)
        assert await h.wait_exit(60, "the writer to stop on the replay's error") != 0
        assert list(spool.glob("*.spool")), "a segment was removed although its rows were never committed"
        await execute(dsn, "DELETE FROM writer_fault_on")
        h.start_writer()

        async def replayed() -> bool:
            h.drain_status()
            return not list(spool.glob("*.spool"))

        await wait_until(replayed, 60, "the spool replayed by the next writer")
        assert await h.drain() == 0
        assert await trade_ids(dsn) == list(range(1, 401))  # every trade, once
    finally:
        h.close()
        await asyncio.to_thread(server.stop)
