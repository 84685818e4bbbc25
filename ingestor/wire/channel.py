"""Channels between processes that a killed process cannot wedge: one pipe per sender.

A ``multiprocessing.Queue`` shared by several producers is two traps under SIGKILL
(tests/chaos/test_restarts.py, ``test_producers_killed_in_the_middle_of_a_batch...``):
its senders share one write lock, held across a blocking write of a whole message, so a
sender killed mid-write holds it for ever and every other sender's feeder blocks; and the
half-written message stays in the pipe, so the reader waits for its other half for ever
(``get(timeout=...)`` times out only the wait for the first byte). The pipeline then
records nothing while every process looks alive.

So each sender has a pipe of its own (no lock to share: a dead sender's half message
harms only its own pipe, which the supervisor replaces with a fresh one for the sender's
successor), frames carry a magic number, a length and a CRC, and the reader never
blocks on a frame: it reads what is there, keeps a partial frame until the rest comes
or the pipe ends (EOF: the sender died; the partial frame is dropped and counted), and
skips to the next magic number after bytes it cannot use (a reader that died mid-frame
leaves its successor the rest of that frame). Nothing dropped here is lost unrecorded:
a frame is a batch its producer keeps until the writer acknowledges it.

- :class:`Sender`: the sending end (``put``), never blocking its event loop: objects wait
  in order and are pickled one at a time as the pipe takes them, so a backlog costs
  the objects themselves (already counted by the producer's budget), not copies.
- :class:`FanIn`: the reading end of many pipes, with ``get(timeout)`` and ``qsize()``
  like a queue's; a control connection from the supervisor adds the pipe of a restarted
  sender (its file descriptor passed with ``SCM_RIGHTS``) and says when to drain.
- :class:`FrameReader`: the framing, pure (unit-tested with every kind of damage).

Pickle is safe here: both ends are this program's processes and the pipes are made by
their supervisor; nothing read from disk or the network is unpickled.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import pickle
import queue
import selectors
import struct
import time
import zlib
from dataclasses import dataclass
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger(__name__)

MAGIC = b"\xf7ING\x1fst\x01"  # 8 bytes: a chance match inside a payload is negligible
_HEAD = struct.Struct("<8sII")  # magic, payload length, CRC32 of the payload
MAX_FRAME = 256 * 1024 * 1024  # a length above this is not a frame of ours (batches are a few MB)
READ_CHUNK = 1 << 20
DRAIN = "drain"
DRAIN_GRACE_S = 10.0  # after the supervisor's drain, how long a pipe may stay open (its sender should be gone)


def frame(payload: bytes) -> bytes:
    return _HEAD.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


class FrameReader:
    """Bytes in, whole payloads out; damaged bytes skipped and counted, never raised."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.skipped_bytes = 0  # bytes before a magic number: the rest of a frame some reader began
        self.bad_frames = 0  # a header or CRC that did not check out

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0  # consumed up to here; cut once at the end (a cut per frame moves the rest each time)
        size = len(buf)
        while True:
            if buf[pos : pos + len(MAGIC)] != MAGIC:
                at = buf.find(MAGIC, pos)
                if at < 0:
                    keep_from = max(pos, size - (len(MAGIC) - 1))  # a magic number may be split across reads
                    self.skipped_bytes += keep_from - pos
                    pos = keep_from
                    break
                self.skipped_bytes += at - pos
                pos = at
            if size - pos < _HEAD.size:
                break
            _, n, crc = _HEAD.unpack_from(buf, pos)
            end = pos + _HEAD.size + n
            if n > MAX_FRAME:
                pos = self._bad(pos)
                continue
            if size < end:
                break  # the rest is still coming
            payload = bytes(buf[pos + _HEAD.size : end])
            if zlib.crc32(payload) != crc:
                # Not a frame after all (or a damaged one): look for the next magic number
                # from just past this one, so a whole frame inside these bytes is kept.
                pos = self._bad(pos)
                continue
            out.append(payload)
            pos = end
        del buf[:pos]
        return out

    def _bad(self, pos: int) -> int:
        self.bad_frames += 1
        self.skipped_bytes += 1
        return pos + 1

    def end(self) -> int:
        """The pipe ended: a partial frame left is dropped; its size is returned."""
        left = len(self._buf)
        if left:
            self.bad_frames += 1
            self.skipped_bytes += left
            self._buf.clear()
        return left


class Sender:
    """The one writing end of a channel. ``put`` never blocks: objects wait in order and go
    out as the pipe takes them (the event loop watches the pipe); with no event loop
    running, ``put`` writes them out at once, blocking."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn  # kept: the descriptor is the connection's
        self._fd = conn.fileno()
        os.set_blocking(self._fd, False)
        self._objects: collections.deque[Any] = collections.deque()
        self._frame: memoryview | None = None  # the frame being written, from where it got to
        self._loop: asyncio.AbstractEventLoop | None = None
        self.frames = 0

    def put(self, obj: Any) -> None:
        self._objects.append(obj)
        if self._loop is not None:
            return  # the loop is already watching the pipe
        self._write()
        if self._frame is not None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush(None)
                return
            self._loop.add_writer(self._fd, self._on_writable)

    def qsize(self) -> int:
        """Objects not written yet (the one being written included)."""
        return len(self._objects) + (self._frame is not None)

    def _on_writable(self) -> None:
        self._write()
        if self._frame is None and self._loop is not None:
            self._loop.remove_writer(self._fd)
            self._loop = None

    def _write(self) -> None:
        """As much as the pipe takes now. A reader that is gone for good (EPIPE: the whole
        tree is going down) raises: the process ends, and what it held was never acked."""
        while True:
            if self._frame is None:
                if not self._objects:
                    return
                self._frame = memoryview(frame(pickle.dumps(self._objects.popleft(), pickle.HIGHEST_PROTOCOL)))
            try:
                n = os.write(self._fd, self._frame)
            except BlockingIOError:
                return
            if n == len(self._frame):
                self._frame = None
                self.frames += 1
            else:
                self._frame = self._frame[n:]

    def flush(self, timeout: float | None) -> bool:
        """Write out everything waiting, blocking up to ``timeout`` seconds (None: for good);
        True when nothing is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self._fd, selectors.EVENT_WRITE)
            while True:
                self._write()
                if self._frame is None and not self._objects:
                    return True
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                sel.select(left)


@dataclass(frozen=True)
class FanInEnds:
    """What a reading process is given: the reading end of each sender's pipe, by name, and
    its end of the control connection."""

    readers: dict[str, Connection]
    control: Connection


class FanIn:
    """The reading ends of many channels, one per sender, read as one queue.

    ``control`` (the supervisor's connection to this process) brings ``("add", name)``
    followed by a passed descriptor: the pipe of a sender started after this reader; and
    ``("drain",)``: no sender will start again, so once every pipe has ended (their
    senders have exited) ``get`` returns ``DRAIN``, after everything they sent."""

    def __init__(self, readers: dict[str, Connection], control: Connection | None = None) -> None:
        self._sel = selectors.DefaultSelector()
        self._frames: dict[int, FrameReader] = {}
        self._names: dict[int, str] = {}
        self._conns: dict[int, Any] = {}
        for name, conn in readers.items():
            self._add(name, conn.fileno(), conn)
        self._control = control
        if control is not None:
            self._sel.register(control.fileno(), selectors.EVENT_READ, "control")
        self._ready: collections.deque[Any] = collections.deque()
        self._draining_since: float | None = None
        self.dropped_frames = 0  # frames that did not check out or were cut short by a sender's death
        self.ended = 0  # pipes that ended (a sender's process exited)

    def _add(self, name: str, fd: int, conn: Any = None) -> None:
        os.set_blocking(fd, False)
        self._frames[fd] = FrameReader()
        self._names[fd] = name
        self._conns[fd] = conn if conn is not None else fd
        self._sel.register(fd, selectors.EVENT_READ, "data")

    def qsize(self) -> int:
        return len(self._ready)

    @property
    def open_pipes(self) -> list[str]:
        return sorted(self._names.values())

    def get(self, timeout: float) -> Any:
        """The next object from any sender (each sender's in its order), or ``DRAIN``;
        raises ``queue.Empty`` after ``timeout`` seconds with nothing."""
        deadline = time.monotonic() + timeout
        while not self._ready:
            if self._draining_since is not None and (
                    not self._frames or time.monotonic() - self._draining_since > DRAIN_GRACE_S):
                if self._frames:
                    log.error("draining with pipe(s) still open after %.0f s: %s (their senders should have "
                              "exited)", DRAIN_GRACE_S, ", ".join(self.open_pipes))
                return DRAIN
            left = deadline - time.monotonic()
            if left <= 0:
                raise queue.Empty
            for key, _ in self._sel.select(min(left, 0.5) if self._draining_since is not None else left):
                if key.data == "control":
                    self._on_control()
                else:
                    self._read(key.fd)
        return self._ready.popleft()

    def _read(self, fd: int) -> None:
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        reader = self._frames[fd]
        if not data:  # every writing end is closed: the sender is gone
            if reader.end():
                log.warning("%s's pipe ended in the middle of a batch (its process was killed): dropped; the "
                            "batch was never acknowledged, so its successor's positions cover it",
                            self._names[fd])
            self._close(fd)
            return
        before = reader.bad_frames
        for payload in reader.feed(data):
            self._ready.append(pickle.loads(payload))
        if reader.bad_frames != before:
            log.warning("%s's pipe: %d frame(s) that did not check out skipped (%d bytes so far)",
                        self._names[fd], reader.bad_frames - before, reader.skipped_bytes)

    def _close(self, fd: int) -> None:
        self.dropped_frames += self._frames.pop(fd).bad_frames
        self.ended += 1
        self._sel.unregister(fd)
        self._names.pop(fd)
        conn = self._conns.pop(fd)
        if isinstance(conn, int):
            os.close(conn)
        else:
            conn.close()

    def _on_control(self) -> None:
        assert self._control is not None
        try:
            msg = self._control.recv()
        except EOFError:  # the supervisor is gone: drain what there is
            self._sel.unregister(self._control.fileno())
            self._control = None
            self._draining_since = time.monotonic()
            return
        if msg[0] == "add":
            self._add(msg[1], reduction.recv_handle(self._control))
        elif msg[0] == "drain":
            self._draining_since = time.monotonic()
        else:
            raise ValueError(f"unknown control message {msg!r}")

    def close(self) -> None:
        for fd in list(self._frames):
            self._close(fd)
        self._sel.close()


def add_sender(control: Connection, name: str, reader: Connection, destination_pid: int) -> None:
    """Give a running ``FanIn`` (in ``destination_pid``) the reading end of a new sender's pipe."""
    control.send(("add", name))
    reduction.send_handle(control, reader.fileno(), destination_pid)
