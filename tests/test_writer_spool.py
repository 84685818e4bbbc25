"""The disk spool on its own: its record format (no pickle), order, bounds, what a crash or
a corruption leaves, and the directory's permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ingestor.wire.batching import Backfill, Batch
from ingestor.writer import spool as spool_module
from ingestor.writer import spool_format
from ingestor.writer.spool import Spool, SpoolError
from ingestor.writer.spool_format import HEADER, RecordError, decode_batch, encode_batch, read_segment


def batch(i: int, size: int = 10) -> Batch:
    return Batch("agg_trades", 1, bytes([i % 256]) * size, b"\x01" * 8, producer="p", incarnation=1, seq=i)


def drain(spool: Spool) -> list[int]:
    seen = []
    while (oldest := spool.oldest()) is not None:
        path, batches = oldest
        seen += [b.seq for b in batches]
        spool.remove(path)
    return seen


def test_a_batch_round_trips_field_by_field_with_its_backfill() -> None:
    plain = Batch("depth_updates", 3, b"\x00\x05rows", b"\x02" * 24, "socket-1", 2**62 + 5, 77, "rows")
    info = Backfill("spot", "ETHUSDT", 10, 20, None, 1_700_000_000_123, 1_700_000_000_200, 1_700_000_000_001,
                    1_700_000_000_099, False)
    fill = Batch("agg_trades", 2, b"abc", b"\x03" * 16, "rest", 9, 1, "backfill", b"\x04" * 16, info)
    close = Batch("stream_gaps", 1, b"gap", b"", "features", 1, 2, "close")
    for b in (plain, fill, close):
        assert decode_batch(encode_batch(b)) == b


def test_no_pickle_anywhere_in_the_spool() -> None:
    for module in (spool_module, spool_format):
        assert "pickle" not in Path(module.__file__ or "").read_text().replace("no pickle", "")


def test_a_record_that_is_not_a_batch_is_refused() -> None:
    body = encode_batch(batch(1))
    with pytest.raises(RecordError):
        decode_batch(body + b"x")  # bytes left over
    with pytest.raises(RecordError):
        decode_batch(body[:-3])  # cut short
    bad_kind = encode_batch(Batch("agg_trades", 1, b"x", b"", kind="exec"))
    with pytest.raises(RecordError):
        decode_batch(bad_kind)


def test_spool_is_first_in_first_out_across_segments_and_restarts(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000, segment_bytes=300)
    for i in range(1, 21):
        assert spool.append(batch(i))
    spool.sync()
    assert spool and spool.bytes > 0
    spool.close()
    again = Spool(tmp_path, max_bytes=10_000, segment_bytes=300)  # a new process finds it
    assert drain(again) == list(range(1, 21))
    assert not again and again.bytes == 0 and not list(tmp_path.glob("*.spool"))


def test_spool_refuses_past_its_bound(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=2_000)
    n = 0
    while spool.append(batch(n, size=300)):
        n += 1
    assert 3 <= n <= 6 and spool.full and spool.refused == 1
    assert spool.bytes <= 2_000


def test_a_record_cut_short_by_a_crash_keeps_the_good_ones_and_quarantines_the_rest(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    for i in range(1, 4):
        spool.append(batch(i))
    spool.close()
    seg = next(tmp_path.glob("*.spool"))
    whole = seg.read_bytes()
    seg.write_bytes(whole[:-5])  # the process died mid-write
    again = Spool(tmp_path, max_bytes=10_000)
    path, batches = again.oldest()  # type: ignore[misc]
    assert [b.seq for b in batches] == [1, 2]
    quarantined = list((tmp_path / "quarantine").iterdir())
    assert len(quarantined) == 1 and again.quarantined_bytes == len(quarantined[0].read_bytes()) > 0
    # The segment now holds only its good records: a second read quarantines nothing more.
    assert read_segment(seg.read_bytes()).problem == ""
    again.remove(path)
    assert again.oldest() is None and again.bytes == 0


def test_corruption_in_the_middle_replays_what_comes_before_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=100_000)
    for i in range(1, 11):
        spool.append(batch(i, size=50))
    spool.close()
    seg = next(tmp_path.glob("*.spool"))
    data = bytearray(seg.read_bytes())
    record = (len(data) - len(HEADER)) // 10
    data[len(HEADER) + record * 4 + 20] ^= 0xFF  # a flipped byte inside the fifth record's body
    seg.write_bytes(bytes(data))
    again = Spool(tmp_path, max_bytes=100_000)
    path, batches = again.oldest()  # type: ignore[misc]
    assert [b.seq for b in batches] == [1, 2, 3, 4]
    (bad,) = (tmp_path / "quarantine").iterdir()
    assert bad.read_bytes() == bytes(data[len(HEADER) + record * 4:])  # kept whole, never deleted
    assert again.quarantined_bytes == record * 6


def test_a_segment_of_another_format_is_quarantined_whole_not_executed(tmp_path: Path) -> None:
    # What the old pickle spool wrote: a length, then a pickle. Never loaded, set aside.
    old = (14).to_bytes(4, "little") + b"\x80\x05junkjunkjunk."
    (tmp_path / "000000000001.spool").write_bytes(old)
    spool = Spool(tmp_path, max_bytes=10_000)
    assert spool.oldest() is None
    assert [p.name for p in (tmp_path / "quarantine").iterdir()] == ["000000000001.0.bad"]
    assert spool.quarantined_bytes == len(old) and not list(tmp_path.glob("*.spool"))


def test_the_directory_is_made_private_and_refused_when_others_may_write(tmp_path: Path) -> None:
    made = tmp_path / "spool" / "abc"
    Spool(made, max_bytes=1000)
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    made.chmod(0o777)
    with pytest.raises(SpoolError, match="writable by others"):
        Spool(made, max_bytes=1000)
    made.chmod(0o755)  # ours, readable by others: made private, accepted
    Spool(made, max_bytes=1000)
    assert stat.S_IMODE(made.stat().st_mode) == 0o700


@pytest.mark.skipif(os.getuid() != 0, reason="giving a directory to another user needs root")
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 12345, 12345)
    with pytest.raises(SpoolError, match="belongs to uid 12345"):
        Spool(theirs, max_bytes=1000)


def test_new_segments_are_private_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    spool.append(batch(1))
    spool.sync()
    (seg,) = tmp_path.glob("*.spool")
    assert stat.S_IMODE(seg.stat().st_mode) == 0o600
    assert seg.read_bytes().startswith(HEADER)
