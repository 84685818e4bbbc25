"""The feature worker's input is bounded: a socket worker never waits for it, and what it
could not hand over is counted and told to the worker with the next Feed that gets through."""

from __future__ import annotations

import multiprocessing as mp

import orjson

from ingestor.wire.feed import Feed, MarketFeed, put_bounded


def test_a_full_queue_refuses_without_blocking_and_takes_again_once_drained() -> None:
    q = mp.get_context("spawn").Queue()
    try:
        assert all(put_bounded(q, i, 3) for i in range(3))
        assert not put_bounded(q, 3, 3)
        assert q.get(timeout=5) == 0
        assert put_bounded(q, 4, 3)
        assert [q.get(timeout=5) for _ in range(3)] == [1, 2, 4]
    finally:
        q.close()
        q.join_thread()


def test_refused_feeds_are_counted_and_announced_with_the_next_one() -> None:
    taken: list[Feed] = []
    accept = [False]

    def sink(feed: Feed) -> bool:
        if accept[0]:
            taken.append(feed)
        return accept[0]

    feed = MarketFeed("futures", sink)
    feed.trades += [b'{"a":1}', b'{"a":2}']
    feed.depth.append(b'{"u":9}')
    feed.flush()
    assert taken == [] and feed.dropped == 3 and feed.sent == 0
    feed.trades.append(b'{"a":3}')
    feed.flush()
    assert feed.dropped == 4 and feed.lost == {"aggTrade": 3, "depthUpdate": 1}
    accept[0] = True
    feed.trades.append(b'{"a":4}')
    feed.flush()
    assert [(f.kind, f.count, f.lost, orjson.loads(f.data)) for f in taken] == [("aggTrade", 1, 3, [{"a": 4}])]
    assert feed.lost == {"depthUpdate": 1} and feed.sent == 1
    feed.depth.append(b'{"u":10}')
    feed.flush()
    assert (taken[-1].kind, taken[-1].lost) == ("depthUpdate", 1) and feed.lost == {}
    assert feed.pending() == 0
