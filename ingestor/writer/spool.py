"""Batches on local disk, first in first out, while the database is away or behind.

Segment files ``<directory>/<number>.spool`` in the format of ``spool_format`` (a
versioned header, then per batch a record with its length and CRC32; no pickle), appended
in the order the writer took the batches. The writer acknowledges a spooled batch only
after ``sync`` (an fsync; one per writer turn for every batch of the turn), and a new
segment's directory entry is fsynced too, so an acknowledged batch survives a crash of
the machine. The writer replays the oldest segment first and deletes it once every batch
in it is committed, so after a crash a segment is replayed whole again: what it had
already committed comes back as duplicates, which the tables' unique keys turn away
(sql/005).

A segment that is cut short (a crash mid-write: never acknowledged) or corrupted: its good
records are replayed; the rest is moved to ``quarantine/`` next to the segments (never
deleted), counted (``quarantined_bytes``) and logged.

The directory is made 0700 and refused (``SpoolError``) when another user owns it or
others may write to it: whoever writes there decides what the writer stores.

Bounded: ``append`` refuses a batch that would take the spool past ``max_bytes``.
Tests: tests/test_writer_spool.py, tests/chaos/test_writer_faults.py (a crash mid-replay).
"""

from __future__ import annotations

import builtins
import logging
import os
import stat
from pathlib import Path

from ingestor.wire.batching import Batch
from ingestor.writer.spool_format import HEADER, encode_record, read_segment

log = logging.getLogger(__name__)

SEGMENT_BYTES = 64 * 1024 * 1024


class SpoolError(Exception):
    """The spool directory cannot be used safely; the message says why."""


def check_directory(directory: Path) -> None:
    """Make ``directory`` (0700) or check it: ours, and writable by nobody else."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = directory.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise SpoolError(f"spool directory {directory} is not a directory")
    if st.st_uid != os.getuid():
        raise SpoolError(f"spool directory {directory} belongs to uid {st.st_uid}, not to this user "
                         f"({os.getuid()}): refusing to replay batches someone else could have written")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise SpoolError(f"spool directory {directory} is writable by others (mode {stat.S_IMODE(st.st_mode):o}): "
                         "refusing to replay batches someone else could have written; chmod 700 it")
    if stat.S_IMODE(st.st_mode) != 0o700:
        directory.chmod(0o700)  # ours and safe, only readable by others: made private


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        check_directory(directory)
        self._segments = sorted(directory.glob("*.spool"), key=lambda p: int(p.stem))
        self._bytes = sum(p.stat().st_size for p in self._segments)
        self._fd: int | None = None  # the segment being appended to (the newest)
        self._file_bytes = 0
        self._dirty = False  # written since the last fsync
        self.batches_in = 0
        self.refused = 0
        self.quarantined_bytes = 0
        self._full = False

    # -- state -------------------------------------------------------------------------------

    @property
    def bytes(self) -> int:
        return self._bytes

    def __bool__(self) -> bool:
        return bool(self._segments)

    @property
    def full(self) -> bool:
        """The last batch offered did not fit (until one fits, or a segment is removed)."""
        return self._full

    # -- writing -----------------------------------------------------------------------------

    def append(self, batch: Batch) -> bool:
        """Add ``batch`` at the back; False (and nothing written) when it would not fit. It
        is on disk only after ``sync``."""
        record = encode_record(batch)
        size = len(record)
        if self._bytes + size > self.max_bytes:
            self.refused += 1
            self._full = True
            return False
        self._full = False
        if self._fd is None or self._file_bytes + size > self.segment_bytes:
            self._open_segment()
        assert self._fd is not None
        _write_all(self._fd, record)  # one record, one write: a crash cuts at most the last one
        self._dirty = True
        self._file_bytes += size
        self._bytes += size
        self.batches_in += 1
        return True

    def sync(self) -> None:
        """Make everything appended so far survive a crash of the machine (fsync)."""
        if self._fd is not None and self._dirty:
            os.fsync(self._fd)
            self._dirty = False

    def _open_segment(self) -> None:
        self._close_segment()
        number = int(self._segments[-1].stem) + 1 if self._segments else 1
        path = self.directory / f"{number:012d}.spool"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        _write_all(self._fd, HEADER)
        os.fsync(self._fd)
        _fsync_dir(self.directory)  # the new file's name is on disk before anything in it is acknowledged
        self._file_bytes = len(HEADER)
        self._bytes += len(HEADER)
        self._segments.append(path)

    def _close_segment(self) -> None:
        if self._fd is not None:
            self.sync()
            os.close(self._fd)
            self._fd = None

    # -- reading -----------------------------------------------------------------------------

    def oldest(self) -> tuple[Path, list[Batch]] | None:
        """The oldest segment and its batches, in order (None: the spool is empty). The
        segment being appended to is closed first, so new batches go to a new one. What
        cannot be read is quarantined; the good records before it are returned."""
        while self._segments:
            path = self._segments[0]
            if self._fd is not None and len(self._segments) == 1:
                self._close_segment()
            data = path.read_bytes()
            segment = read_segment(data)
            if segment.problem:
                self._quarantine(path, data, segment.good_bytes, segment.problem, segment.truncated)
            if segment.batches:
                return path, segment.batches
            self.remove(path)
        return None

    def _quarantine(self, path: Path, data: builtins.bytes, good: int, problem: str, truncated: bool) -> None:
        """Move ``data[good:]`` to quarantine/ (kept, never deleted) and cut the segment there."""
        qdir = self.directory / "quarantine"
        qdir.mkdir(mode=0o700, exist_ok=True)
        target = qdir / f"{path.stem}.{good}.bad"
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, data[good:])
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(qdir)
        with path.open("r+b") as f:  # the segment keeps its good records only: quarantined once
            f.truncate(good)
            os.fsync(f.fileno())
        cut = len(data) - good
        self.quarantined_bytes += cut
        self._bytes -= cut
        (log.warning if truncated else log.error)(
            "spool segment %s: %s; %d good batch bytes kept, %d bytes moved to %s%s", path, problem, good, cut,
            target, " (a crash mid-write: that batch was never acknowledged)" if truncated else "",
            extra={"event": "spool_quarantine", "segment": str(path), "problem": problem, "bytes": cut,
                   "quarantine": str(target)})

    def remove(self, path: Path) -> None:
        """Every batch of ``path`` is committed: delete it."""
        size = path.stat().st_size if path.exists() else 0
        path.unlink(missing_ok=True)
        self._bytes -= size
        self._segments.remove(path)
        self._full = False

    def close(self) -> None:
        self._close_segment()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
