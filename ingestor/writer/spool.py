"""Batches on local disk, first in first out, while the database is away or behind.

Segment files ``<directory>/<number>.spool`` hold records ``<u32 length><pickled Batch>``,
appended in the order the writer took the batches. The writer replays the oldest segment
first and deletes it once every batch in it is committed, so after a crash a segment is
replayed whole again: what it had already committed comes back as duplicates, which the
tables' unique keys turn away (sql/005). A record cut short by a crash ends its segment
(the rest of it was never acknowledged); a segment that will not unpickle (written by
another version) is set aside as ``.bad`` and said so, never deleted.

Bounded: ``append`` refuses a batch that would take the spool past ``max_bytes``.
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
from pathlib import Path
from typing import BinaryIO

from ingestor.wire.batching import Batch

log = logging.getLogger(__name__)

SEGMENT_BYTES = 64 * 1024 * 1024
_LEN = struct.Struct("<I")


class Spool:
    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self._segments = sorted(directory.glob("*.spool"), key=lambda p: int(p.stem))
        self._bytes = sum(p.stat().st_size for p in self._segments)
        self._file: BinaryIO | None = None  # the segment being appended to (the newest)
        self._file_bytes = 0
        self.batches_in = 0
        self.refused = 0
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
        """Add ``batch`` at the back; False (and nothing written) when it would not fit."""
        record = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
        size = _LEN.size + len(record)
        if self._bytes + size > self.max_bytes:
            self.refused += 1
            self._full = True
            return False
        self._full = False
        if self._file is None or self._file_bytes + size > self.segment_bytes:
            self._open_segment()
        assert self._file is not None
        self._file.write(_LEN.pack(len(record)))
        self._file.write(record)
        self._file.flush()  # in the OS's hands: a crash of this process loses nothing
        self._file_bytes += size
        self._bytes += size
        self.batches_in += 1
        return True

    def sync(self) -> None:
        """Make what was appended survive a crash of the machine, too."""
        if self._file is not None:
            os.fsync(self._file.fileno())

    def _open_segment(self) -> None:
        self._close_segment()
        number = int(self._segments[-1].stem) + 1 if self._segments else 1
        path = self.directory / f"{number:012d}.spool"
        self._file = path.open("ab")
        self._file_bytes = 0
        self._segments.append(path)

    def _close_segment(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    # -- reading -----------------------------------------------------------------------------

    def oldest(self) -> tuple[Path, list[Batch]] | None:
        """The oldest segment and its batches, in order (None: the spool is empty). The
        segment being appended to is closed first, so new batches go to a new one."""
        while self._segments:
            path = self._segments[0]
            if self._file is not None and len(self._segments) == 1:
                self._close_segment()
            try:
                return path, _read(path)
            except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as exc:
                bad = path.with_suffix(".bad")
                log.error("spool segment %s cannot be read (%s): set aside as %s", path, exc, bad)
                self.remove(path, rename_to=bad)
        return None

    def remove(self, path: Path, rename_to: Path | None = None) -> None:
        """Every batch of ``path`` is committed (or the segment is set aside)."""
        size = path.stat().st_size if path.exists() else 0
        if rename_to is not None:
            path.rename(rename_to)
        else:
            path.unlink(missing_ok=True)
        self._bytes -= size
        self._segments.remove(path)
        self._full = False

    def close(self) -> None:
        self._close_segment()


def _read(path: Path) -> list[Batch]:
    out: list[Batch] = []
    data = path.read_bytes()
    pos = 0
    while pos + _LEN.size <= len(data):
        (n,) = _LEN.unpack_from(data, pos)
        if pos + _LEN.size + n > len(data):
            log.warning("spool segment %s ends in a record cut short at byte %d: the rest was never acknowledged",
                        path, pos)
            break
        batch = pickle.loads(data[pos + _LEN.size : pos + _LEN.size + n])
        if not isinstance(batch, Batch):
            raise TypeError(f"not a Batch: {type(batch).__name__}")
        out.append(batch)
        pos += _LEN.size + n
    return out
