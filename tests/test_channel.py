"""``wire.channel``: frames that survive damage, and pipes that a killed process cannot wedge.

The process tests use real processes, real pipes and SIGKILL: a sender killed in the
middle of a frame, a reader killed in the middle of one, and a sender that joins later
through the control connection."""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import queue
import signal
import struct
import termios
import time
from multiprocessing.connection import Connection

import pytest

from ingestor.wire.channel import DRAIN, MAGIC, FanIn, FrameReader, Sender, add_sender, frame

CTX = mp.get_context("spawn")


def test_whole_frames_come_out_whatever_the_reads_cut() -> None:
    payloads = [b"a" * n for n in (0, 1, 7, 300, 70_000)]
    data = b"".join(frame(p) for p in payloads)
    for step in (1, 3, 8, 17, 4096, len(data)):
        reader = FrameReader()
        got = [p for i in range(0, len(data), step) for p in reader.feed(data[i : i + step])]
        assert got == payloads and reader.bad_frames == 0 and reader.skipped_bytes == 0


def test_the_rest_of_a_frame_a_dead_reader_began_is_skipped() -> None:
    whole = frame(b"x" * 1000)
    reader = FrameReader()
    assert reader.feed(whole[500:] + frame(b"next")) == [b"next"]
    assert reader.skipped_bytes == len(whole) - 500


def test_a_frame_cut_short_by_a_dead_sender_does_not_swallow_the_frames_after_it() -> None:
    """The cut frame's header claims bytes that the next frames supply: its CRC fails, and
    the frames inside those bytes are still found."""
    cut = frame(b"y" * 5000)[:2000]
    good = [frame(f"b{i}".encode() * 1000) for i in range(5)]
    reader = FrameReader()
    got = reader.feed(cut + b"".join(good))
    assert got == [f"b{i}".encode() * 1000 for i in range(5)]
    assert reader.bad_frames >= 1


def test_an_absurd_length_or_a_bad_crc_is_skipped_not_obeyed() -> None:
    reader = FrameReader()
    bogus = MAGIC + (2**31).to_bytes(4, "little") + b"\0\0\0\0"
    corrupt = bytearray(frame(b"z" * 100))
    corrupt[-1] ^= 0xFF
    assert reader.feed(bogus + bytes(corrupt) + frame(b"ok")) == [b"ok"]
    assert reader.bad_frames == 2


def test_end_drops_a_partial_frame() -> None:
    reader = FrameReader()
    assert reader.feed(frame(b"q" * 100)[:50]) == []
    assert reader.end() == 50


# -- real processes -------------------------------------------------------------------------


def wait_full(reader: Connection) -> None:
    """Until the pipe holds (nearly) all it can: its writer is blocked in a frame."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if struct.unpack("i", fcntl.ioctl(reader.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0] >= 60_000:
            return
        time.sleep(0.01)
    raise AssertionError("the pipe never filled")


def _send_forever(conn: Connection, tag: str, size: int) -> None:
    sender = Sender(conn)
    i = 0
    while True:
        sender.put((tag, i, b"p" * size))  # no event loop: each put blocks until written
        i += 1


def _send_some(conn: Connection, tag: str, n: int) -> None:
    sender = Sender(conn)
    for i in range(n):
        sender.put((tag, i))


def _drain(fan: FanIn, timeout: float = 20.0) -> list[object]:
    out: list[object] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            item = fan.get(0.5)
        except queue.Empty:
            continue
        if item == DRAIN:
            return out
        out.append(item)
    raise AssertionError(f"no DRAIN in {timeout} s; got {len(out)} items")


def test_a_sender_killed_mid_frame_harms_only_its_own_pipe_and_its_successor_gets_through() -> None:
    r1, w1 = CTX.Pipe(duplex=False)
    r2, w2 = CTX.Pipe(duplex=False)
    mine, theirs = CTX.Pipe(duplex=True)
    fan = FanIn({"a": r1, "b": r2}, theirs)
    big = CTX.Process(target=_send_forever, args=(w1, "a", 3 << 20))
    big.start()
    w1.close()
    # The pipe (64 KB) is full with a 3 MB frame half written: the sender is mid-frame.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and fan.qsize() == 0:
        try:
            first = fan.get(0.2)  # one frame out, so the next is begun
            break
        except queue.Empty:
            continue
    else:
        raise AssertionError("no frame from the big sender")
    assert first[0] == "a"
    wait_full(r1)  # the next 3 MB frame is begun and the pipe is full: the sender is mid-frame
    os.kill(big.pid, signal.SIGKILL)
    big.join()
    other = CTX.Process(target=_send_some, args=(w2, "b", 50))
    other.start()
    w2.close()
    r3, w3 = CTX.Pipe(duplex=False)
    successor = CTX.Process(target=_send_some, args=(w3, "a2", 50))
    successor.start()
    w3.close()
    add_sender(mine, "a2", r3, os.getpid())
    r3.close()
    other.join()
    successor.join()
    mine.send(("drain",))
    got = _drain(fan)
    tags = [g[0] for g in got]  # type: ignore[index]
    assert tags.count("b") == 50 and tags.count("a2") == 50
    assert [g[1] for g in got if g[0] == "a2"] == list(range(50))  # type: ignore[index]
    assert fan.ended == 3
    fan.close()


def _read_until_killed(conn: Connection, started: object) -> None:
    fan = FanIn({"p": conn})
    started.set()  # type: ignore[attr-defined]
    while True:
        try:
            fan.get(1.0)
        except queue.Empty:
            pass
        time.sleep(0.01)  # a slow reader: the pipe stays full, frames half read


def test_a_reader_killed_mid_frame_leaves_its_successor_a_readable_pipe() -> None:
    r, w = CTX.Pipe(duplex=False)
    started = CTX.Event()
    dead_reader = CTX.Process(target=_read_until_killed, args=(r, started))
    dead_reader.start()
    assert started.wait(20)
    sender = CTX.Process(target=_send_forever, args=(w, "s", 200_000))
    sender.start()
    w.close()
    wait_full(r)  # frames of 200 KB through a 64 KB pipe: the reader is mid-frame
    os.kill(dead_reader.pid, signal.SIGKILL)
    dead_reader.join()
    fan = FanIn({"p": r})
    got = []
    deadline = time.monotonic() + 20
    while len(got) < 20 and time.monotonic() < deadline:
        try:
            got.append(fan.get(0.5))
        except queue.Empty:
            pass
    os.kill(sender.pid, signal.SIGKILL)
    sender.join()
    assert len(got) == 20
    ids = [g[1] for g in got]
    assert ids == list(range(ids[0], ids[0] + 20))  # in order, none torn
    fan.close()


@pytest.mark.parametrize("n", [0, 3])
def test_drain_waits_for_every_pipe_to_end_after_everything_sent(n: int) -> None:
    r, w = CTX.Pipe(duplex=False)
    mine, theirs = CTX.Pipe(duplex=True)
    fan = FanIn({"p": r}, theirs)
    p = CTX.Process(target=_send_some, args=(w, "p", n))
    p.start()
    w.close()
    mine.send(("drain",))
    p.join()
    assert [g[1] for g in _drain(fan)] == list(range(n))  # type: ignore[index]
    fan.close()
